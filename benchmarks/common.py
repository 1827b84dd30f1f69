"""What the benchmarks over a folder of annotated images share."""

from __future__ import annotations

import argparse
from pathlib import Path

#: The DSB 2018 nucleus images beside the checkout (``train/``, ``val/``), what the
#: benchmarks build their mosaics and bursts from.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018-fluo"


def dataset_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the options every such benchmark takes: the image and mask folders,
    the model, and ``--every N`` to use a share of the pairs."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="model file (default: the bundled model)")
    parser.add_argument("--every", type=int, default=1, help="use every N-th image pair")
    return parser
