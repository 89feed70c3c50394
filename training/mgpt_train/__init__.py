"""mgpt_train: the compact 5D-parallel SFT/RL training package (folder ``training/``). Built in a later issue."""
