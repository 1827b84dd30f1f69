"""What the benchmarks over a folder of annotated images share."""

from __future__ import annotations

import argparse
from pathlib import Path


def dataset_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the options every such benchmark takes: the image and mask folders,
    the model, and ``--every N`` to use a share of the pairs."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="model file (default: the bundled model)")
    parser.add_argument("--every", type=int, default=1, help="use every N-th image pair")
    return parser
