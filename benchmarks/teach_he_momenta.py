"""Several weight-averaging momenta from one fine-tune, scored like ``teach_he.py``.

``--ema`` changes only which weights are judged and kept (a moving average of the weights
that train), never the weights that train: two runs with the same seed and different
momenta train the same trajectory. So one run can keep several averages side by side,
each judged on the same held-out crops after every 10 steps and saved when its held-out
loss is lowest, and compare the momenta on the very same training (paired), at the cost
of one run instead of several:

    python benchmarks/teach_he_momenta.py --out /tmp/x --also 0.998 --sets other val \
        -- --steps 3000 --seed 1 --ema 0.99

``he.keras`` is the model ``cellwatch finetune --keep loss`` kept (its ``--ema``);
``he-ema0.998.keras`` the one the 0.998 average would have kept, with a copy of the card
(its outline growth measured and its held-out scores recomputed); ``--last`` adds each
average as training ended (``he-ema0.99-last.keras``: what the default ``--keep last``
keeps, on the same training). ``results.json`` holds each model's scores and each
average's held-out loss after every checkpoint (``averages``), so which step was kept can
be read off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import teach_he  # benchmarks/ is on the path when this file is run

from cellwatch.cli import main as cellwatch_main
from cellwatch.model import read_card, write_card
from cellwatch.postprocess import CARD_GROWTH_KEY
from cellwatch.training import finetune as tuning
from cellwatch.training.averaging import averaging
from cellwatch.training.judge import score_model, with_dtype
from cellwatch.training.shapes import measure_growth


def side_by_side(out: Path, also: list[float], histories: dict[str, Any], last: bool) -> Any:
    """A stand-in for ``averaging`` that keeps, beside the average ``finetune`` asked
    for, one average per momentum in ``also``, saved at ``out``'s name plus ``-emaM``;
    with ``last``, each average as training ended is saved too (``-emaM-last``)."""

    def several(
        work: Path, momentum: float, validation: tuple[np.ndarray, np.ndarray], batch_size: int
    ) -> Any:
        import keras

        children = {momentum: averaging(work, momentum, validation, batch_size)}
        for m in also:
            path = out.with_name(f"{out.stem}-ema{m}.training.keras")
            children[m] = averaging(path, m, validation, batch_size)

        class Several(keras.callbacks.Callback):
            def set_model(self, model: Any) -> None:
                super().set_model(model)
                for child in children.values():
                    child.set_model(model)

            def on_train_begin(self, logs: Any = None) -> None:
                for child in children.values():
                    child.on_train_begin(logs)

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                for child in children.values():
                    child.on_train_batch_end(batch, logs)

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                for child in children.values():
                    child.on_epoch_end(epoch, logs)

            def on_train_end(self, logs: Any = None) -> None:
                for child in children.values():
                    child.on_train_end(logs)
                if last:  # each average as training ended, whatever its held-out loss
                    variables = self.model.trainable_variables
                    trained = [v.numpy() for v in variables]
                    for m, child in children.items():
                        for variable, average in zip(variables, child.average, strict=True):
                            variable.assign(average.astype(variable.dtype))
                        self.model.save(out.with_name(f"{out.stem}-ema{m}-last.training.keras"))
                    for variable, weights in zip(variables, trained, strict=True):
                        variable.assign(weights)
                for m, child in children.items():
                    histories[str(m)] = child.history

            def check(self, network: Any) -> None:
                for child in children.values():
                    child.check(network)
                for m, child in children.items():
                    histories[str(m)] = child.history

        return Several()

    return several


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--also", type=float, nargs="*", default=[], metavar="MOMENTUM")
    parser.add_argument(
        "--last", action="store_true", help="also save and score each average as training ended"
    )
    parser.add_argument("--corrections", type=int, default=8)
    parser.add_argument("--channel", default="hematoxylin")
    parser.add_argument("--other-train", type=int, default=73)
    parser.add_argument(
        "--sets", nargs="+", choices=("val", "other", "choosing"), default=["other"]
    )
    parser.add_argument("extra", nargs="*", help="more flags for cellwatch finetune (after --)")
    args = parser.parse_args()
    if any(not 0 < m < 1 for m in args.also):
        parser.error(f"--also takes momenta between 0 and 1, got {args.also}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sets, corrections = teach_he.folders(out, args.corrections, args.other_train)
    extra = ["--keep", "loss", *args.extra]  # each average judged by its held-out loss
    config, model, command = teach_he.finetune_run(out, corrections, args.channel, 600, extra)
    histories: dict[str, Any] = {}
    tuning.averaging = side_by_side(model, args.also, histories, args.last)
    started = time.perf_counter()
    code = cellwatch_main(command)
    seconds = time.perf_counter() - started
    if code not in (0, 1):
        raise SystemExit(f"cellwatch {' '.join(command)} failed ({code})")
    card = read_card(model)
    done = card[tuning.CARD_KEY]
    held = [
        (corrections / "images" / n, corrections / "masks" / n) for n in done["scores"]["images"]
    ]
    training = [
        pair
        for pair in tuning.find_pairs(corrections / "images", corrections / "masks")
        if pair[0].name not in done["scores"]["images"]
    ]
    import keras

    main_ema = done["settings"]["ema"]
    models = {str(main_ema): model}
    extras = [(str(m), m) for m in args.also]
    if args.last:
        extras += [(f"{m}-last", m) for m in (main_ema, *args.also)]
    for key, m in extras:
        work = model.with_name(f"{model.stem}-ema{key}.training.keras")
        path = model.with_name(f"{model.stem}-ema{key}.keras")
        with_dtype(keras.saving.load_model(work, compile=False), "float32").save(path)
        work.unlink()
        copy = json.loads(json.dumps(card))
        copy[tuning.CARD_KEY]["settings"]["ema"] = m
        copy[tuning.CARD_KEY]["note"] = f"benchmarks/teach_he_momenta.py: the ema {key} average"
        write_card(path, copy)
        if "outline_growth" in done:  # measured for the kept network: measure this one's
            growth = measure_growth(path, training, args.channel)
            copy[tuning.CARD_KEY]["outline_growth"] = growth
            copy[CARD_GROWTH_KEY] = growth["chosen"]
            write_card(path, copy)
        copy[tuning.CARD_KEY]["scores"]["new"] = score_model(path, held, args.channel)
        write_card(path, copy)
        models[key] = path
    shutil.copy(model.with_suffix(".json"), out / "card-main.json")
    results: dict[str, Any] = {
        "command": "cellwatch " + " ".join(command),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "finetune_seconds": round(seconds, 1),
        "training_seconds": done["training_seconds"],
        "steps": done["steps"],
        "held_out_images": done["scores"]["images"],
        "held_out_base": done["scores"]["base"],
        "models": {},
        "averages": {},
    }
    for m, path in models.items():
        history = histories.get(m.removesuffix("-last"), [])
        kept = min(history, key=lambda h: h[1]) if history else None
        if m.endswith("-last"):
            kept = (done["steps"], history[-1][1]) if history else None
        results["averages"][m] = {
            "kept_step": kept[0] if kept else None,
            "kept_loss": round(kept[1], 4) if kept else None,
            "history": [[s, round(loss, 4)] for s, loss in history],
        }
        entry = {"path": str(path), "held_out": read_card(path)[tuning.CARD_KEY]["scores"]["new"]}
        for name in args.sets:
            entry[name] = teach_he.score(path, sets[name], config, out)
        results["models"][m] = entry
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"# {results['command']} (also averaged: {args.also})")
    print(f"# {results['steps']} steps in {results['training_seconds']:.0f} s of training")
    print("| ema | kept step | held-out 2 | " + " | ".join(args.sets) + " |")
    for m, entry in results["models"].items():
        cells = [
            f"{entry[s]['accuracy_0.5']:.3f} / {entry[s]['count_mape_percent']:.1f}"
            for s in args.sets
        ]
        h = entry["held_out"]
        print(
            f"| {m} | {results['averages'][m]['kept_step']} | "
            f"{h['accuracy_0.5']:.3f} / {h['count_mape_percent']:.1f} | " + " | ".join(cells) + " |"
        )


if __name__ == "__main__":
    main()
