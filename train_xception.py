#!/usr/bin/env python
"""Train Xception on RecordIO shards: `python train_xception.py --config configs/demo_digits.yaml` (see --help)."""
import sys

from xception_mx.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
