"""What a model's misses at IoU 0.5 are: nuclei missed, merged with a neighbour, split, or
outlined poorly; and what its unmatched cells are: false finds or fragments.

    python benchmarks/error_kinds.py --model /tmp/teach-he/he.keras \
        --images /tmp/teach-he/other-train/images --masks /tmp/teach-he/other-train/masks \
        --channel hematoxylin
    python benchmarks/error_kinds.py --ceiling --images … --masks …

A true nucleus with a cell of IoU ≥ 0.5 is found. Otherwise it is *missed* when cells
cover under half of it, *merged* when the cell covering most of it also covers over half
of another true nucleus, *split* when two or more cells cover at least a fifth of it each,
and *poor* (outlined badly) else. A cell matched to no nucleus is *false* when under half
of it lies on true nuclei, else a *fragment*. ``--ceiling`` counts the masks' own three
classes (background, interior, boundary) as if a network had predicted them exactly: what
the counting's post-processing could reach. Prints one JSON line of totals.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from cellwatch.config import Config, InputConfig
from cellwatch.postprocess import labels_from_probabilities
from cellwatch.storage import imageio
from cellwatch.training.matching import iou_matrix, match
from cellwatch.training.targets import as_instances, three_class

KINDS = ("found", "missed", "merged", "split", "poor", "false", "fragment")


def error_kinds(truth: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    """Counts of each kind (module docstring) for one image."""
    iou, true_ids, cell_ids = iou_matrix(truth, labels)
    counts = dict.fromkeys(KINDS, 0)
    true_area = np.array([(truth == t).sum() for t in true_ids], dtype=float)
    cell_area = np.array([(labels == c).sum() for c in cell_ids], dtype=float)
    # overlap in pixels from IoU: |A∩B| = IoU (|A| + |B|) / (1 + IoU)
    overlap = iou * (true_area[:, None] + cell_area[None, :]) / (1 + iou)
    for i in range(true_ids.size):
        if cell_ids.size and iou[i].max() >= 0.5:
            counts["found"] += 1
            continue
        cover = overlap[i] / true_area[i]
        if cover.sum() < 0.5:
            counts["missed"] += 1
        elif (overlap[:, int(np.argmax(overlap[i]))] / true_area >= 0.5).sum() >= 2:
            counts["merged"] += 1
        elif (cover >= 0.2).sum() >= 2:
            counts["split"] += 1
        else:
            counts["poor"] += 1
    for j in range(cell_ids.size):
        if true_ids.size and iou[:, j].max() >= 0.5:
            continue
        on_nuclei = overlap[:, j].sum() / cell_area[j]
        counts["false" if on_nuclei < 0.5 else "fragment"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="model to count with (.keras)")
    parser.add_argument("--channel", help="input.channel, e.g. hematoxylin")
    parser.add_argument("--ceiling", action="store_true", help="the masks' own three classes")
    args = parser.parse_args()
    names = sorted(p.name for p in args.images.iterdir())
    totals = dict.fromkeys(("true", "cells", *KINDS), 0)
    segmenter = None
    if not args.ceiling:
        from cellwatch.model import load_model
        from cellwatch.pipeline import Segmenter, read

        config = replace(Config(), input=InputConfig(channel=args.channel))
        segmenter = Segmenter(config, load_model(args.model))
    accuracy = [0, 0]  # found at 0.5, found + false + missed (any unmatched)
    for name in names:
        truth = as_instances(imageio.read_image(args.masks / name).pixels)
        if segmenter is None:
            labels = labels_from_probabilities(np.eye(3, dtype=np.float32)[three_class(truth)])
        else:
            data = read(args.images / name, config)
            labels = segmenter.segment(data.pixels, data.pixel_size_um).labels
        at = match(truth, labels, [0.5])[0]
        accuracy[0] += at.tp
        accuracy[1] += at.tp + at.fp + at.fn
        totals["true"] += at.n_true
        totals["cells"] += at.n_pred
        for kind, n in error_kinds(truth, labels).items():
            totals[kind] += n
    totals["accuracy_0.5"] = round(accuracy[0] / max(accuracy[1], 1), 4)
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
