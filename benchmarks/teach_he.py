"""Teach the bundled model H&E nuclei from 8 corrected images, and score it on others.

The proxy for "a modality the bundled model never saw": the H&E images of the 2018 Data
Science Bowl (``../shared/data/dsb2018-he``, RGB, train 81 / val 26). The correcting is
simulated by taking the ground-truth masks of 8 training images (the napari widget would
save the same pairs); ``cellwatch finetune`` runs with the documented command, and
``cellwatch evaluate`` scores the base and the new model on the 26 validation images and
on the 73 training images not used.

    python benchmarks/teach_he.py --minutes 10 --out /tmp/teach-he          # the default
    python benchmarks/teach_he.py --minutes 10 --out /tmp/x -- --crop 256    # a variant
    python benchmarks/teach_he.py --minutes 60 --out /tmp/x --skip-base --sets choosing \
        -- --steps 524 --warmup-steps 50      # a variant at equal steps, scored for choosing
    python benchmarks/teach_he.py --minutes 10 --out /tmp/bf --luminance   # gray brightfield

``--luminance`` turns every H&E image into its luminance (one 8-bit plane, nuclei dark on a
light background, as a gray brightfield camera sees them) under ``OUT/luminance`` and
teaches and counts those with ``input.channel`` left at auto: the proxy for brightfield.

``--sets choosing`` scores only every third of the other training images (25): the set
recipes are chosen on, so that the validation images are scored once, at the end.

Prints one Markdown row per model and scored set, and writes ``results.json`` to ``--out``.
Timings depend on the machine and on what else runs on it; say so when you quote them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018-he"
BUNDLED = Path(__file__).resolve().parents[1] / "cellwatch" / "models" / "cellwatch-nuclei.keras"


def luminance_copy(data: Path, out: Path) -> Path:
    """``data`` (train/ and val/ of RGB images and masks) as 8-bit luminance planes under
    ``out`` (masks linked), made once."""
    import numpy as np
    import tifffile
    from skimage.color import rgb2gray

    for split in ("train", "val"):
        images = out / split / "images"
        images.mkdir(parents=True, exist_ok=True)
        for path in sorted((data / split / "images").iterdir()):
            if not (images / path.name).exists():
                gray = np.round(rgb2gray(tifffile.imread(path)) * 255).clip(0, 255)
                tifffile.imwrite(images / path.name, gray.astype(np.uint8))
        link_pairs([p.name for p in images.iterdir()], data / split, out / split, ("masks",))
    return out


def link_pairs(
    names: list[str], source: Path, folder: Path, kinds: tuple[str, ...] = ("images", "masks")
) -> Path:
    """``folder/images`` and ``folder/masks`` holding links to ``names`` in ``source``."""
    for kind in kinds:
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for name in names:
            link = folder / kind / name
            if not link.exists():
                link.symlink_to(source / kind / name)
    return folder


def cellwatch(*words: str) -> tuple[float, str]:
    """Run ``cellwatch WORDS``; (seconds, its standard output). Fails loudly."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "cellwatch", *words], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        sys.exit(f"cellwatch {' '.join(words)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def score(model: Path, folder: Path, config: Path, out: Path) -> dict[str, float]:
    """``cellwatch evaluate`` of ``model`` on ``folder``: accuracy@0.5, F1, MAPE, s/image."""
    summary_path = out / f"{model.stem}-{folder.name}.json"
    cellwatch(
        "evaluate",
        "--images", str(folder / "images"),
        "--masks", str(folder / "masks"),
        "--model", str(model),
        "--config", str(config),
        "--json", str(summary_path),
        "--per-image", str(out / f"{model.stem}-{folder.name}.csv"),
    )  # fmt: skip
    summary = json.loads(summary_path.read_text())
    at = summary["thresholds"]["0.50"]
    return {
        "images": summary["images"],
        "accuracy_0.5": round(at["accuracy"], 3),
        "f1_0.5": round(at["f1"], 3),
        "count_mape_percent": round(summary["count_mape_percent"], 1),
        "seconds_per_image": round(summary["seconds_per_image"], 2),
    }


def folders(
    out: Path, corrections: int, other_train: int, data: Path = DATA
) -> tuple[dict[str, Path], Path]:
    """The scored sets (``val``, ``other``, ``choosing``) and the corrections folder under
    ``out``: ``corrections`` training images spread over the sorted file list, the first
    ``other_train`` of the rest, every third of those, and the 26 validation images."""
    names = sorted(p.name for p in (data / "train" / "images").iterdir())
    step = len(names) / corrections
    chosen = [names[int(i * step)] for i in range(corrections)]
    others = [n for n in names if n not in chosen][:other_train]
    val_names = sorted(p.name for p in (data / "val" / "images").iterdir())
    sets = {
        "val": link_pairs(val_names, data / "val", out / "val"),
        "other": link_pairs(others, data / "train", out / "other-train"),
        "choosing": link_pairs(others[::3], data / "train", out / "choosing"),
    }
    return sets, link_pairs(chosen, data / "train", out / "corrections")


def finetune_run(
    out: Path, corrections: Path, channel: str, minutes: float, extra: list[str]
) -> tuple[Path, Path, list[str]]:
    """The config file (which channel to count), the model path and the ``cellwatch
    finetune`` command line of a run in ``out`` (``--force``: the model is kept whatever
    its held-out score, to be reported)."""
    config = out / "config.yaml"
    config.write_text(f"input:\n  channel: {channel}\n")
    model = out / "he.keras"
    command = [
        "finetune",
        "--corrections", str(corrections),
        "--out", str(model),
        "--minutes", str(minutes),
        *(["--channel", channel] if channel != "auto" else []),
        "--force",
        *extra,
    ]  # fmt: skip
    return config, model, command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--corrections", type=int, default=8)
    parser.add_argument(
        "--channel",
        default="hematoxylin",
        help="input.channel to count and teach (hematoxylin; auto for one-channel images)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DATA,
        help="a folder with train/ and val/, each of images/ and masks/ (default: the H&E set)",
    )
    parser.add_argument("--skip-base", action="store_true", help="do not score the base model")
    parser.add_argument("--other-train", type=int, default=73, help="other train images scored")
    parser.add_argument(
        "--sets",
        nargs="+",
        choices=("val", "other", "choosing"),
        default=["val", "other"],
        help="what to score: val (26), other (the other training images), choosing (every "
        "third of the other training images: the set recipes are chosen on)",
    )
    parser.add_argument(
        "--luminance",
        action="store_true",
        help="teach and count the images' luminance (gray brightfield; channel auto)",
    )
    parser.add_argument("extra", nargs="*", help="more flags for cellwatch finetune (after --)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, channel = args.data, args.channel
    if args.luminance:
        data, channel = luminance_copy(args.data, out / "luminance"), "auto"
    sets, corrections = folders(out, args.corrections, args.other_train, data)
    others = args.other_train
    config, model, command = finetune_run(out, corrections, channel, args.minutes, args.extra)
    seconds, log = cellwatch(*command)
    (out / "finetune.log").write_text(log)
    card = json.loads(model.with_suffix(".json").read_text())["finetune"]
    results = {
        "command": "cellwatch " + " ".join(command),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "finetune_seconds": round(seconds, 1),
        "training_seconds": card["training_seconds"],
        "steps": card["steps"],
        "held_out": card["scores"],
        "scores": {},
    }
    models = {"new": model} if args.skip_base else {"base": BUNDLED, "new": model}
    for label, path in models.items():
        for folder in (sets[name] for name in args.sets if name == "val" or others):
            results["scores"][f"{label} {folder.name}"] = score(path, folder, config, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"# {results['command']}")
    print(
        f"# {results['steps']} steps in {results['training_seconds']:.0f} s of training, "
        f"{seconds:.0f} s in all; load average {results['load_average'][0]:.1f} on {os.cpu_count()} CPUs"
    )
    print("| model | images | accuracy@0.5 | F1@0.5 | count MAPE % | s/image |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, s in results["scores"].items():
        print(
            f"| {name} | {s['images']} | {s['accuracy_0.5']:.3f} | {s['f1_0.5']:.3f} | "
            f"{s['count_mape_percent']:.1f} | {s['seconds_per_image']:.2f} |"
        )


if __name__ == "__main__":
    main()
