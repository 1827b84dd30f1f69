"""Score rules for the automatic size estimate offline, on what ``scale_grid.py`` recorded.

Each rule turns an image's recorded pyramid readings (and the refining passes, taken from
the grid's nearest zoom) into a zoom; the image is scored at the grid's zoom nearest to
it. Rows: accuracy@0.5 (summed over the images, as ``cellwatch evaluate``), count MAPE,
and how many images' estimates are more than 1.5× off the masks' median diameter.

    python benchmarks/scale_rules.py /tmp/hescale/grid-*.json [--prior 17 41.5]

``--prior LOW HIGH``: the corrections' range of median nuclei diameters (px), for the
rules that use it. The reference rows: ``recorded`` (the zoom the counting chose, as
recorded), ``emulated`` (today's estimate replayed: should match it), ``true size`` (the
zoom the masks' median diameter asks for) and ``best zoom`` (the grid's best per image:
the ceiling of any size estimate).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TARGET = 20.0
MIN_SCALE, MAX_SCALE = 0.08, 5.0


@dataclass(frozen=True)
class Rule:
    """A variant of the estimate (today's when every field has its default)."""

    quantile: float = 0.5
    agreement: float = 1.5
    min_cells: int = 3
    speck_ratio: float = 0.5
    speck_share: float = 0.25
    refine_passes: int = 2
    prior: tuple[float, float] | None = None  # corrections' range of median diameters
    prior_margin: float = 1.5  # estimates beyond range × / ÷ this are outside it
    prior_action: str = "none"  # "clamp", "median", "relook", "relook-clamp"
    whole_below: float = 0.0  # a reading under target / this (network px) is kept: whole nuclei


def single_cells(d: np.ndarray, rule: Rule) -> np.ndarray:
    if len(d) == 0:
        return d
    order = np.argsort(d)
    area = np.cumsum(d[order] ** 2)
    wm = d[order][np.searchsorted(area, area[-1] / 2)]
    specks = d < rule.speck_ratio * wm
    if np.count_nonzero(specks) >= rule.speck_share * len(d) and np.count_nonzero(~specks) >= 3:
        d = d[~specks]
    return d


def typical(objects: dict[str, list[float]], min_diameter: float, rule: Rule) -> float | None:
    inner = np.asarray(objects["inner"])
    use = inner if len(inner) >= rule.min_cells else np.asarray(objects["all"])
    use = single_cells(use[use >= min_diameter], rule)
    if len(use) < rule.min_cells:
        return None
    return float(np.quantile(use, rule.quantile))


def nearest(grid: dict[str, Any], scale: float) -> str:
    return min(grid, key=lambda s: abs(math.log(float(s) / scale)))


def close(a: float, b: float, tol: float = 0.15) -> bool:
    return abs(math.log(a / b)) < math.log1p(tol)


def refine(image: dict[str, Any], scale: float, diameter: float, rule: Rule) -> float:
    for _ in range(rule.refine_passes):
        corrected = min(max(TARGET / diameter, MIN_SCALE), MAX_SCALE)
        if close(corrected, scale):
            break
        scale = corrected
        key = nearest(image["grid"], scale)
        found = typical(image["grid"][key]["refine"], TARGET / 4 / float(key), rule)
        if found is None:
            break
        diameter = found
    return diameter


def estimate(image: dict[str, Any], rule: Rule) -> float | None:
    readings: list[tuple[float, float]] = []
    best = None
    for level_key, objects in image["pyramid"].items():
        level = float(level_key)
        found = typical(objects, TARGET / 4, rule)
        if found is not None:
            readings.append((level, found / level))
            if rule.whole_below and found < TARGET / rule.whole_below:
                best = readings[-1]  # smaller than the network's size: seen whole
                break
        if len(readings) >= 2:
            (h, hd), (lo, ld) = readings[-2:]
            if math.isclose(h, 2 * lo) and abs(math.log(hd / ld)) < math.log(rule.agreement):
                best = readings[-2]
                break
    if best is None and readings:
        best = readings[0]
    if best is None:
        return None
    diameter = refine(image, best[0], best[1], rule)
    if rule.prior is None or rule.prior_action == "none":
        return diameter
    low, high = rule.prior[0] / rule.prior_margin, rule.prior[1] * rule.prior_margin
    if low <= diameter <= high:
        return diameter
    clamped = min(max(diameter, low), high)
    if rule.prior_action == "clamp":
        return clamped
    median = math.sqrt(rule.prior[0] * rule.prior[1])
    if rule.prior_action == "median":
        return median
    # look again at the zoom the corrections' typical nuclei ask for
    key = nearest(image["grid"], TARGET / median)
    found = typical(image["grid"][key]["refine"], TARGET / 4 / float(key), rule)
    looked = median if found is None else refine(image, float(key), found, rule)
    if rule.prior_action == "relook-clamp":
        return min(max(looked, low), high)
    return looked


def score(images: list[dict[str, Any]], pick: Callable[[dict[str, Any]], float]) -> dict:
    tp = fp = fn = 0
    errors, off = [], 0
    for image in images:
        scale = pick(image)
        cell = image["grid"][nearest(image["grid"], scale)]
        tp, fp, fn = tp + cell["tp"], fp + cell["fp"], fn + cell["fn"]
        errors.append(abs(cell["count"] - image["true_count"]) / image["true_count"])
        if abs(math.log(TARGET / scale / image["true_diameter_px"])) > math.log(1.5):
            off += 1
    return {
        "accuracy_0.5": round(tp / (tp + fp + fn), 3),
        "count_mape_percent": round(100 * float(np.mean(errors)), 1),
        "off_1.5x": off,
    }


def zoom_of(diameter: float | None) -> float:
    return 1.0 if diameter is None else min(max(TARGET / diameter, MIN_SCALE), MAX_SCALE)


def rows(images: list[dict[str, Any]], prior: tuple[float, float] | None) -> dict[str, dict]:
    def best(image: dict[str, Any]) -> float:
        g = image["grid"]
        return float(
            max(g, key=lambda s: g[s]["tp"] / max(1, g[s]["tp"] + g[s]["fp"] + g[s]["fn"]))
        )

    out = {
        "recorded": score(images, lambda i: i["automatic"]["scale"]),
        "emulated": score(images, lambda i: zoom_of(estimate(i, Rule()))),
        "true size": score(images, lambda i: zoom_of(i["true_diameter_px"])),
        "best zoom": score(images, best),
    }
    variants: dict[str, Rule] = (
        {f"quantile {q}": Rule(quantile=q) for q in (0.3, 0.4, 0.6, 0.7)}
        | {f"agreement {a}": Rule(agreement=a) for a in (1.3, 1.7, 2.0)}
        | {
            "min cells 5": Rule(min_cells=5),
            "min cells 8": Rule(min_cells=8),
            "no refine": Rule(refine_passes=0),
            "whole below /1.2": Rule(whole_below=1.2),
            "whole below /1.3": Rule(whole_below=1.3),
            "whole below /1.5": Rule(whole_below=1.5),
            "refine 4": Rule(refine_passes=4),
        }
    )
    if prior is not None:
        for action in ("clamp", "median", "relook", "relook-clamp"):
            for margin in (1.0, 1.25, 1.5, 2.0):
                variants[f"prior {action} ×{margin}"] = Rule(
                    prior=prior, prior_action=action, prior_margin=margin
                )
    for name, rule in variants.items():
        out[name] = score(images, lambda i, r=rule: zoom_of(estimate(i, r)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grids", type=Path, nargs="+")
    parser.add_argument("--prior", type=float, nargs=2)
    args = parser.parse_args()
    tables = {p.stem: rows(json.loads(p.read_text())["images"], args.prior) for p in args.grids}
    names = list(next(iter(tables.values())))
    print("| rule | " + " | ".join(tables) + " |")
    print("| --- |" + " --- |" * len(tables))
    for name in names:
        cells = [
            f"{t[name]['accuracy_0.5']:.3f} / {t[name]['count_mape_percent']:.1f} / {t[name]['off_1.5x']}"
            for t in tables.values()
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
