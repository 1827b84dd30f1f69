"""Peak resident memory of processing images, measured in a fresh process.

Used by ``tests/test_pipeline.py`` in a child process, because ``tracemalloc`` does not see
what TensorFlow, Pillow or scikit-image allocate outside Python's allocator::

    python peak_memory.py MODEL OUT IMAGE... [--set KEY=VALUE ...]

The segmenter is built from the default settings (with ``--set`` overrides) and warmed up
on a small image, so imports and the compiled network are paid before measuring. Then,
for each image in turn, the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``),
``process_image`` runs, and the peak (VmHWM) is read. Prints one JSON object:
``{"images": [{"path", "pixels", "rss_before_mb", "peak_mb", "cell_count", "scale"}]}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tifffile
import yaml

from cellwatch.config import Config, override
from cellwatch.model import load_model
from cellwatch.pipeline import Segmenter, process_image

MB = 1e6


def status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Set VmHWM back to the current resident size (Linux 4.0 and later)."""
    Path("/proc/self/clear_refs").write_text("5")


def main(argv: list[str]) -> None:
    model, out, *rest = argv
    images = [Path(a) for a in rest if "=" not in a and a != "--set"]
    settings = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in rest if "=" in a)}
    config = override(Config(), **{"model.path": model, **settings})
    segmenter = Segmenter(config, load_model(Path(model)))
    warm = Path(out) / "warm-up.tif"
    warm.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(warm, tifffile.imread(images[0])[:300, :300])
    process_image(warm, config=config, segmenter=segmenter, out_dir=Path(out), job_id="warm")
    found = []
    for path in images:
        reset_peak()
        before = status_mb("VmRSS")
        result = process_image(
            path, config=config, segmenter=segmenter, out_dir=Path(out), job_id=path.stem
        )
        found.append(
            {
                "path": str(path),
                "pixels": int(np.prod(tifffile.TiffFile(path).pages[0].shape)),
                "rss_before_mb": round(before, 1),
                "peak_mb": round(status_mb("VmHWM"), 1),
                "cell_count": result.row.get("cell_count"),
                "scale": result.row.get("scale"),
                "error": result.row.get("error"),
            }
        )
    print(json.dumps({"images": found}))


if __name__ == "__main__":
    main(sys.argv[1:])
