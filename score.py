#!/usr/bin/env python
"""Score an exported Xception checkpoint on RecordIO shards, benchmark it, or predict images (see --help)."""
import sys

from xception_mx.score_cli import main

if __name__ == "__main__":
    sys.exit(main())
