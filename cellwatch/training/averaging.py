"""Weight averaging for fine-tuning: an exponential moving average of the weights, judged
on held-out crops and saved when best, while the weights that train stay as they are.

With a few images and batches of 4 crops, the last steps' noise decides much of which
model a fine-tune ends with; the average over about the last ``1 / (1 - momentum)`` steps
smooths it (``cellwatch finetune --ema``; measured in docs/teach.md, "Sixth round").
"""

from __future__ import annotations

__all__ = ["averaging"]

import math
from pathlib import Path
from typing import Any

import numpy as np


def averaging(
    work: Path,
    momentum: float,
    validation: tuple[np.ndarray, np.ndarray] | None,
    batch_size: int,
) -> Any:
    """A Keras callback keeping an exponential moving average of the network's trainable
    weights while it trains (each step: ``average = momentum * average + (1 - momentum) *
    weights``, starting from the base model's); at the end of each epoch (and by
    ``check()`` when stopped) it saves the averaged network at ``work`` if its loss on
    the held-out crops ``validation`` is the lowest so far. The weights that train are
    never changed: the average is put in only to be judged and saved, then taken out.
    ``history`` holds (step, held-out loss of the average). With ``validation`` None the
    average is not judged: the latest is saved, when training ends or is stopped."""
    import keras

    class Averaging(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.average: list[np.ndarray] = []
            self.steps = self.checked = 0
            self.best = math.inf
            self.history: list[tuple[int, float]] = []

        def on_train_begin(self, logs: Any = None) -> None:
            self.average = [np.array(v.numpy(), np.float32) for v in self.model.trainable_variables]

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            variables = self.model.trainable_variables
            for average, variable in zip(self.average, variables, strict=True):
                average *= momentum
                average += (1 - momentum) * np.asarray(variable.numpy(), np.float32)
            self.steps += 1

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if validation is not None:
                self.check(self.model)

        def on_train_end(self, logs: Any = None) -> None:
            self.check(self.model)

        def check(self, network: Any) -> None:
            if not self.average or self.steps == self.checked:
                return
            variables = network.trainable_variables
            trained = [v.numpy() for v in variables]
            for variable, average in zip(variables, self.average, strict=True):
                variable.assign(average.astype(variable.dtype))
            try:
                if validation is None:  # the latest average is the one kept
                    self.checked = self.steps
                    network.save(work)
                    return
                x, y = validation
                loss = network.evaluate(x, y, batch_size=batch_size, verbose=0)
                loss = float(loss[0] if isinstance(loss, list | tuple) else loss)
                self.checked = self.steps
                self.history.append((self.steps, loss))
                if loss < self.best:
                    self.best = loss
                    network.save(work)
            finally:
                for variable, weights in zip(variables, trained, strict=True):
                    variable.assign(weights)

    return Averaging()
