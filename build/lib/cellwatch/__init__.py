"""cellwatch: turn every new microscope image into a cell count."""

from __future__ import annotations

__version__ = "0.1.0"
