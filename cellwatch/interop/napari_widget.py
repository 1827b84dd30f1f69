"""The napari dock widget "cellwatch: corrections": pick a Labels layer the cellwatch
reader opened, edit it with napari's own label tools, and save it with the plane cellwatch
counted through :func:`cellwatch.interop.corrections.save_correction`.

The widget only gathers the layer, the folder and the settings file; the saving is the
library's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton

from cellwatch.config import load_config
from cellwatch.errors import CellwatchError
from cellwatch.interop import corrections
from cellwatch.interop.napari_reader import RESULTS_KEY

if TYPE_CHECKING:
    import napari

__all__ = ["CorrectionsWidget"]


class CorrectionsWidget(Container):
    """Save the chosen cellwatch Labels layer, as edited, as a correction."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self._default: Path | None = None  # the folder proposed for the current layer
        self.labels = ComboBox(label="labels", choices=self._cellwatch_labels)
        self.folder = FileEdit(label="save to", mode="d")
        self.config = FileEdit(label="config (optional)", mode="r", filter="*.yaml *.yml")
        self.save_button = PushButton(text="Save correction")
        self.status = Label(value="")
        self.extend([self.labels, self.folder, self.config, self.save_button, self.status])
        self.labels.changed.connect(self._propose_folder)
        self.save_button.changed.connect(self.save)
        napari_viewer.layers.selection.events.active.connect(self._follow_selection)
        self.reset_choices()

    def save(self, *_: Any) -> corrections.Correction | None:
        """Save the chosen layer; the result (or what went wrong) shows in the widget."""
        from napari.utils.notifications import show_error, show_info

        layer = self.labels.value
        if layer is None:
            self.status.value = "Open a cellwatch results folder first (File > Open Folder)."
            show_error(self.status.value)
            return None
        try:
            saved = corrections.save_correction(
                layer.data,
                layer.metadata["cellwatch"],
                Path(layer.metadata[RESULTS_KEY]),
                _chosen(self.folder.value),
                config=None if (path := _chosen(self.config.value)) is None else load_config(path),
            )
        except CellwatchError as exc:
            self.status.value = f"Not saved: {exc}"
            show_error(self.status.value)
            return None
        self.status.value = f"Saved {saved.cells} cell(s): {saved.mask.name}"
        show_info(f"{self.status.value} in {saved.mask.parent.parent}")
        return saved

    def reset_choices(self, *_: Any) -> None:
        """Called by napari when layers come and go: list the cellwatch Labels layers."""
        super().reset_choices()
        self._follow_selection()
        self._propose_folder(self.labels.value)

    def _cellwatch_labels(self, _widget: Any = None) -> list[tuple[str, Any]]:
        """The Labels layers the cellwatch reader opened, as (name, layer) choices."""
        from napari.layers import Labels

        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if isinstance(layer, Labels) and RESULTS_KEY in layer.metadata
        ]

    def _follow_selection(self, *_: Any) -> None:
        """Choose the layer selected in the layer list when it is a cellwatch one."""
        active = self._viewer.layers.selection.active
        # by name: napari hands plugins proxies of its viewer and layers, not the objects
        chosen = [
            layer for name, layer in self._cellwatch_labels() if active and name == active.name
        ]
        if chosen:
            self.labels.value = chosen[0]

    def _propose_folder(self, layer: Any) -> None:
        """Propose ``corrections/`` beside the layer's results folder, unless the user has
        chosen a folder of their own."""
        if layer is None:
            return
        proposed = corrections.default_folder(Path(layer.metadata[RESULTS_KEY]))
        current = Path(self.folder.value)
        if self._default is None or current == self._default or str(current) in ("", "."):
            self.folder.value = proposed
        self._default = proposed


def _chosen(value: object) -> Path | None:
    """A file box's path, or None when it is empty (magicgui shows an empty one as ".")."""
    text = str(value or "").strip()
    return None if text in ("", ".") else Path(text)
