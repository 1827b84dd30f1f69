"""What cellwatch reads, by name: the microscope formats it opens through bioio (and
which are installed) and the nuclear stains ``input.channel: auto`` knows. Tables only,
no cellwatch imports, so that the configuration and storage can both read them.
"""

from __future__ import annotations

__all__ = ["BASE_SUFFIXES", "NUCLEAR_CHANNELS", "VENDOR_FORMATS", "installed_vendor_suffixes"]

import importlib.util

#: Microscope formats read through bioio: suffix → (format, bioio plugin module, the
#: cellwatch extra that installs the plugin). The one table of them; storage reads it too.
VENDOR_FORMATS: dict[str, tuple[str, str, str]] = {
    ".czi": ("Zeiss CZI", "bioio_czi", "czi"),
    ".nd2": ("Nikon ND2", "bioio_nd2", "nd2"),
    ".lif": ("Leica LIF", "bioio_lif", "lif"),
}
BASE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")  #: read without any extra

#: Nuclear stains that ``input.channel: auto`` finds by channel name (any case, as a word:
#: "DAPI 405" and "Hoechst 33342" match; PI only on its own).
NUCLEAR_CHANNELS: tuple[str, ...] = (
    "DAPI", "Hoechst", "DRAQ5", "DRAQ7", "NucBlue", "NucSpot", "NucRed", "SiR-DNA",
    "SPY-DNA", "SYTO", "RedDot", "TO-PRO", "propidium", "PI", "H2B",
)  # fmt: skip


def installed_vendor_suffixes() -> tuple[str, ...]:
    """The suffixes of :data:`VENDOR_FORMATS` whose bioio plugin is installed.

    Found without importing the plugin (``importlib.util.find_spec``): bioio is heavy.
    """
    found = []
    for suffix, (_, module, _) in VENDOR_FORMATS.items():
        try:
            if importlib.util.find_spec(module) is not None:
                found.append(suffix)
        except (ImportError, ValueError):  # a broken install counts as missing
            continue
    return tuple(found)
