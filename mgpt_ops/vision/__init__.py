"""Vision family: packed variable-length ViT attention with fused 2D RoPE, and Hugging Face drop-ins."""
