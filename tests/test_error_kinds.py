"""benchmarks/error_kinds.py sorts a model's mistakes into the kinds docs/teach.md reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "error_kinds.py"
spec = importlib.util.spec_from_file_location("error_kinds", SCRIPT)
error_kinds_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(error_kinds_module)
error_kinds = error_kinds_module.error_kinds


def square(image: np.ndarray, value: int, row: int, col: int, size: int = 10) -> None:
    image[row : row + size, col : col + size] = value


def test_each_kind_of_mistake_is_told_apart():
    truth, cells = np.zeros((60, 80), np.int32), np.zeros((60, 80), np.int32)
    square(truth, 1, 0, 0)  # found: the same square
    square(cells, 1, 0, 0)
    square(truth, 2, 0, 20)  # missed: nothing there
    square(truth, 3, 20, 0)  # merged: one cell over 3 and 4, which touch
    square(truth, 4, 20, 10)
    cells[20:30, 0:21] = 2
    square(truth, 5, 40, 0)  # split: three pieces, none of half of it
    cells[40:50, 0:3], cells[40:50, 3:6], cells[40:50, 6:10] = 3, 4, 5
    square(truth, 6, 40, 20)  # poor: a cell over 60 % of it, 40 % of the cell outside
    cells[40:50, 24:34] = 6
    square(cells, 7, 0, 60)  # false: a cell on background
    assert error_kinds(truth, cells) == {
        "found": 1,
        "missed": 1,
        "merged": 2,
        "split": 1,
        "poor": 1,
        "false": 1,
        "fragment": 5,  # the merged cell, the three pieces, the poor cell
    }
