"""How fast fine-tuning steps run on this CPU: float32 against bfloat16 mixed precision,
crop sizes, and TensorFlow thread settings. Pixels per second is what matters (a 256 crop
holds 4× the pixels of a 128 one), printed per setting as the median of timed steps after
warm-up steps.

    python benchmarks/finetune_speed.py                    # every setting, 20 timed steps
    python benchmarks/finetune_speed.py --only bf16 --crop 128

Each setting runs in a fresh process (precision and threads are fixed at TensorFlow's
start). On a machine others are using the figures move with their load: compare settings
measured side by side, and repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "cellwatch" / "models" / "cellwatch-nuclei.keras"


def one(crop: int, batch: int, bf16: bool, steps: int, warmup: int) -> dict[str, float]:
    """Time ``steps`` training steps of the bundled model (in this process)."""
    import keras
    import numpy as np

    from cellwatch.training.finetune import FinetuneSettings, _trainable_copy
    from cellwatch.training.train import make_losses

    if bf16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    network = _trainable_copy(BUNDLED, FinetuneSettings(bf16=bf16))
    keras.mixed_precision.set_global_policy("float32")
    loss, dice = make_losses("ce+dice")
    network.compile(optimizer=keras.optimizers.Adam(1e-4), loss=loss, metrics=[dice])
    rng = np.random.default_rng(0)
    x = rng.random((batch, crop, crop, 1), dtype=np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (batch, crop, crop))]
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        network.train_on_batch(x, y)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    seconds = float(np.median(times))
    return {
        "seconds_per_step": round(seconds, 4),
        "megapixels_per_second": round(batch * crop * crop / seconds / 1e6, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--only", choices=("float32", "bf16"))
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="intra-op; 0: TF's")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        crop, batch, bf16, steps, warmup = json.loads(args.child)
        print(json.dumps(one(crop, batch, bf16, steps, warmup)))
        return
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print("| precision | crop | batch | intra-op threads | s/step | Mpixel/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    precisions = [args.only] if args.only else ["float32", "bf16"]
    for threads in args.threads:
        for crop in args.crop:
            for precision in precisions:
                env = dict(os.environ)
                if threads:
                    env["TF_NUM_INTRAOP_THREADS"] = str(threads)
                    env["TF_NUM_INTEROP_THREADS"] = "1"
                child = json.dumps([crop, args.batch, precision == "bf16", args.steps, args.warmup])
                done = subprocess.run(
                    [sys.executable, __file__, "--child", child],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"| {precision} | {crop} | {args.batch} | {threads or 'default'} | "
                    f"{r['seconds_per_step']:.3f} | {r['megapixels_per_second']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
