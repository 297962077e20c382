#!/usr/bin/env python
"""Command line of the harness; see `python run_study.py --help` and README.md."""

import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
