"""``python -m mgpt_train [--config FILE] [--key.sub=value ...]``: the training CLI of ``mgpt_train.train``."""

import sys

from mgpt_train.train import main

sys.exit(main())
