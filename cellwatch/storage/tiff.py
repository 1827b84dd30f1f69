"""TIFF and OME-TIFF with tifffile: which series are scenes, their metadata, completeness.

Each series of a TIFF that is an image of its own (an OME-TIFF's positions, wells or
fields; the series of a multi-series TIFF) is a scene, as a CZI's scenes are. A pyramid's
sub-resolution levels belong to their series (level 0, the full resolution, is read), and
the label, macro, thumbnail and overview images of slide files are not scenes.
Nothing here reads pixels except :mod:`cellwatch.storage.imageio` through the series.
"""

from __future__ import annotations

__all__ = [
    "channel_names",
    "check_not_truncated",
    "pick_scene",
    "pixel_size_um",
    "scene_series",
    "tiff_incomplete",
]

import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import tifffile

from cellwatch.errors import BadInputError

_UM_PER_UNIT = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
                "\\u00b5m": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}  # fmt: skip
_UM_PER_RESUNIT = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}  # inch, cm, mm, µm
_DEFAULT_DPI = (72.0, 96.0)  # what desktop software writes when it knows nothing
# The side images of slide scanners (SVS, NDPI, BIF, QPI; Bio-Formats names them the same)
_NOT_A_SCENE = re.compile(r"(label|macro|thumbnail|overview|map)( image)?", re.IGNORECASE)
_REDUCED = 1  # NewSubfileType bit: a reduced-resolution copy (a thumbnail or a pyramid level)


def scene_series(tif: tifffile.TiffFile) -> list[tifffile.TiffPageSeries]:
    """The series of an open TIFF that are scenes, in file order.

    Label, macro, thumbnail, overview and map images of slide files are left out (by the
    name tifffile or the OME-XML gives them, or their reduced-resolution flag); so are
    empty series. A file whose only series is such an image keeps it: it is all there is.
    """
    every = [s for s in tif.series if s.shape and s.keyframe is not None]
    scenes = [
        s
        for s in every
        if not _NOT_A_SCENE.fullmatch((s.name or "").strip())
        and not s.keyframe.subfiletype & _REDUCED
    ]
    return scenes or every[:1]


def pick_scene(
    tif: tifffile.TiffFile, path: Path, scene: int | None
) -> tuple[tifffile.TiffPageSeries, str]:
    """The series that is scene ``scene`` (None: the only one), and a note naming it."""
    scenes = scene_series(tif)
    if scene is None and len(scenes) > 1:
        raise BadInputError(
            f"{path} holds {len(scenes)} series (positions); each is counted as its own image, "
            "so one scene must be named"
        )
    index = scene or 0
    if not 0 <= index < len(scenes):
        raise BadInputError(f"{path} has {len(scenes)} scene(s), so scene {index} does not exist")
    series = scenes[index]
    name = f" ({series.name})" if series.name else ""
    return series, (f"series {index}{name} of {len(scenes)}" if len(scenes) > 1 else "")


def _ome_image(tif: tifffile.TiffFile, series: tifffile.TiffPageSeries) -> ET.Element | None:
    """The OME-XML ``Image`` element that describes ``series``, if there is one."""
    if not (tif.is_ome and tif.ome_metadata):
        return None
    images = ET.fromstring(tif.ome_metadata).findall("{*}Image")
    index = next((i for i, s in enumerate(tif.series) if s is series), None)
    if index is not None and len(images) == len(tif.series):
        return images[index]
    named = [im for im in images if im.get("Name") == series.name]
    return named[0] if len(named) == 1 else (images[0] if len(images) == 1 else None)


def channel_names(
    tif: tifffile.TiffFile, series: tifffile.TiffPageSeries
) -> tuple[str, ...] | None:
    """The series' channel names from OME metadata, if every channel has one."""
    image = _ome_image(tif, series)
    pixels = image.find("{*}Pixels") if image is not None else None
    if pixels is None:
        return None
    names = tuple(c.get("Name") or "" for c in pixels.findall("{*}Channel"))
    return names if names and all(names) else None


def pixel_size_um(tif: tifffile.TiffFile, series: tifffile.TiffPageSeries) -> float | None:
    """Pixel size in µm: OME PhysicalSizeX, else ImageJ unit, else TIFF resolution tags."""
    image = _ome_image(tif, series)
    pixels = image.find("{*}Pixels") if image is not None else None
    if pixels is not None and pixels.get("PhysicalSizeX"):
        factor = _UM_PER_UNIT.get(pixels.get("PhysicalSizeXUnit", "µm"))
        size = float(pixels.get("PhysicalSizeX", "nan"))
        return size * factor if factor and size > 0 else None
    tags = series.keyframe.tags
    xres, unit_tag = tags.get("XResolution"), tags.get("ResolutionUnit")
    if xres is None or not xres.value[0] or not xres.value[1]:
        return None
    px_per_unit = xres.value[0] / xres.value[1]
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default unit is inch
    imagej_unit = str((tif.imagej_metadata or {}).get("unit", "")).lower()
    if imagej_unit in _UM_PER_UNIT:
        return _UM_PER_UNIT[imagej_unit] / px_per_unit
    if (
        unit not in _UM_PER_RESUNIT
        or px_per_unit == 1
        or (unit == 2 and px_per_unit in _DEFAULT_DPI)
    ):
        return None
    return _UM_PER_RESUNIT[unit] / px_per_unit


def check_not_truncated(path: Path, series: tifffile.TiffPageSeries, file_size: int) -> None:
    pages = [p for p in series.pages if p is not None]
    ends = (o + n for p in pages for o, n in zip(p.dataoffsets, p.databytecounts, strict=True))
    end = max(ends, default=0)
    if end > file_size:
        raise BadInputError(
            f"{path} is truncated or corrupt: its pixel data should reach byte {end:,} but "
            f"the file has {file_size:,} bytes. Copy the file again from the microscope."
        )


def tiff_incomplete(tif: tifffile.TiffFile, file_size: int) -> str | None:
    """Why an open TIFF is not whole yet, in words; None when it looks whole.

    Cheap enough to ask of a file that is still being written: it reads the page headers
    and the header's metadata, never the pixels. A TIFF is not whole when

    - its last page points to a next page that lies past the end of the file,
    - a page's pixel data reaches past the end of the file, or
    - it has fewer pages than the planes it declares: OME-XML ``SizeZ × SizeC × SizeT``
      (one page per plane; RGB samples share a page), or ImageJ's ``images=``.

    Parameters
    ----------
    tif : tifffile.TiffFile
        The open file.
    file_size : int
        Its size in bytes now.

    Returns
    -------
    str or None
        For example ``"it has 1 of the 3 planes its OME-XML declares (SizeZ 3 × SizeC 1 ×
        SizeT 1)"``.
    """
    pages = tif.pages
    if len(pages) == 0:
        return "it has no image pages yet"
    following = _next_page_pointer(tif)
    if following is None or following >= file_size:
        where = "past the end of the file" if following else "missing"
        return f"it stops after page {len(pages)}: the pointer to the next page is {where}"
    for number, page in enumerate(pages, start=1):
        ends = zip(page.dataoffsets, page.databytecounts, strict=False)
        end = max((offset + count for offset, count in ends), default=0)
        if end > file_size:
            return (
                f"the pixel data of page {number} should reach byte {end:,} but the file "
                f"has {file_size:,} bytes"
            )
    declared = _declared_planes(tif)
    if declared is None:
        return None
    expected, source = declared
    found = _planes_present(tif, file_size, expected)
    if found < expected:
        return f"it has {found} of the {expected} planes its {source}"
    return None


def _next_page_pointer(tif: tifffile.TiffFile) -> int | None:
    """The offset the last page read points to (0: it is the last page); None if the
    pointer itself lies past the end of the file."""
    position = tif.pages.next_page_offset
    if position is None:
        return None
    fh = tif.filehandle
    fh.seek(position)
    raw = fh.read(tif.tiff.offsetsize)
    if len(raw) < tif.tiff.offsetsize:
        return None
    return int(struct.unpack(tif.tiff.offsetformat, raw)[0])


def _declared_planes(tif: tifffile.TiffFile) -> tuple[int, str] | None:
    """(planes, "OME-XML declares (SizeZ …)") from OME-XML or an ImageJ header; None if
    the file does not say how many planes it has."""
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
        except ET.ParseError:
            return None
        name = Path(tif.filename).name
        if any(u.get("FileName") not in (None, "", name) for u in root.iter("{*}UUID")):
            return None  # planes spread over several files: this one holds only some
        samples = tif.pages.first.samplesperpixel
        total, parts = 0, []
        for pixels in root.findall("{*}Image/{*}Pixels"):
            z, c, t = (int(pixels.get(key, "1")) for key in ("SizeZ", "SizeC", "SizeT"))
            pages_c = c // samples if samples > 1 and c % samples == 0 else c
            total += z * pages_c * t
            parts.append(f"SizeZ {z} × SizeC {c} × SizeT {t}")
        return (total, f"OME-XML declares ({'; '.join(parts)})") if total else None
    if tif.is_imagej:
        images = (tif.imagej_metadata or {}).get("images")
        if isinstance(images, int) and images > 1:
            return images, f"ImageJ header declares (images={images})"
    return None


def _planes_present(tif: tifffile.TiffFile, file_size: int, expected: int) -> int:
    """Pages in the file; for an ImageJ file saved as one page followed by the other
    planes' pixels (ImageJ does this above 4 GB), the planes whose pixels are there."""
    pages = len(tif.pages)
    first = tif.pages.first
    if pages == 1 and tif.is_imagej and first.is_contiguous and first.nbytes:
        start = first.dataoffsets[0]
        return min(expected, max(0, (file_size - start) // first.nbytes))
    return pages
