"""``python -m cellwatch.bench``, e.g. against an older checkout."""

from __future__ import annotations

import argparse
import sys

from cellwatch.bench.command import add_arguments, run

parser = argparse.ArgumentParser(prog="python -m cellwatch.bench")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
