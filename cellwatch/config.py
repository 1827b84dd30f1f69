"""One frozen, typed configuration object, loaded from YAML with ``yaml.safe_load``.

Sections mirror the pipeline stages. Unknown keys, wrong types and impossible values are
errors that name the key and the file, raised when the file is loaded, so a typo never
silently falls back to a default. Command-line flags override values with
:func:`override`.
"""

from __future__ import annotations

__all__ = [
    "MAX_OUTLINE_GROWTH_PX",
    "NUCLEAR_CHANNELS",
    "VENDOR_FORMATS",
    "ComputeConfig",
    "Config",
    "InputConfig",
    "MetricsConfig",
    "ModelConfig",
    "ModelsConfig",
    "NormalizeConfig",
    "OutputConfig",
    "PostprocessConfig",
    "ReportConfig",
    "ScaleConfig",
    "TilingConfig",
    "WatchConfig",
    "check_address",
    "config_from_args",
    "installed_vendor_suffixes",
    "load_config",
    "local_today",
    "override",
    "tcp_host_port",
    "time_zone",
    "validate",
    "with_card_input",
]

import argparse
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cellwatch.errors import ConfigError
from cellwatch.formats import (
    BASE_SUFFIXES,
    NUCLEAR_CHANNELS,
    VENDOR_FORMATS,
    installed_vendor_suffixes,
)
from cellwatch.values import check_address, local_today, tcp_host_port, time_zone


def _default_extensions() -> tuple[str, ...]:
    return BASE_SUFFIXES + installed_vendor_suffixes()


def _default_include() -> tuple[str, ...]:
    return tuple(f"*{suffix}" for suffix in _default_extensions())


@dataclass(frozen=True)
class ModelConfig:
    """``model``: which model file (empty: the bundled one)."""

    path: str | None = None  # None: the model bundled with cellwatch


@dataclass(frozen=True)
class ModelsConfig:
    """``models``: where ``cellwatch finetune`` puts models and ``cellwatch models`` lists them."""

    dir: str | None = None  # None: <output.dir>/models


@dataclass(frozen=True)
class InputConfig:
    """``input``: how a file becomes one 2-D plane (channel, stack, size limit, suffixes)."""

    # auto: the only channel, or the one named after a nuclear stain (RGB as None);
    # None: gray, or RGB whose channels are equal; a str: the channel's name in the file
    channel: int | str | None = "auto"
    nuclear_channels: tuple[str, ...] = NUCLEAR_CHANNELS
    invert: bool | None = None  # True: dark cells shown bright to the network; None: the card's
    stack: Literal["max", "plane"] = "max"
    plane: int = 0
    max_pixels: int = 400_000_000
    # by default TIFF, PNG, JPEG and the VENDOR_FORMATS whose extra is installed
    extensions: tuple[str, ...] = field(default_factory=_default_extensions)


@dataclass(frozen=True)
class NormalizeConfig:
    """``normalize``: the percentiles mapped to 0 and 1."""

    low_percentile: float = 1.0
    high_percentile: float = 99.8


@dataclass(frozen=True)
class ScaleConfig:
    """``scale``: how cells are brought to the model's size."""

    mode: Literal["auto", "none"] = "auto"  # "none": feed the image at its own scale
    scale: float | None = None  # explicit zoom factor applied to the image
    diameter_px: float | None = None  # typical cell diameter in the image, in pixels
    pixel_size_um: float | None = None  # overrides the pixel size read from the file
    nucleus_diameter_um: float | None = None  # with a pixel size: the scale, not the estimate
    large_nuclei_growth: float | None = None  # 0..1; None: the model card's (docs/scale.md)
    # [low, high] px an estimated diameter is kept within; None: the model card's range
    # (from its fine-tuning corrections), if any; false (or off): none (docs/scale.md)
    diameter_range_px: tuple[float, ...] | Literal[False] | None = None
    min_scale: float = 0.08
    max_scale: float = 5.0


@dataclass(frozen=True)
class TilingConfig:
    """``tiling``: tile size, overlap and batch size of the network's passes."""

    tile_size: int = 1536  # the largest tile: tiles shrink to fit each image, and for memory
    overlap: int | Literal["auto"] = "auto"  # auto: from the model's receptive field
    batch_size: int = 1
    images_at_once: int = 8  # images worked on together; their tiles share the batches


MAX_OUTLINE_GROWTH_PX = 5.0  #: the most outlines may be grown (network px): not a redraw


@dataclass(frozen=True)
class PostprocessConfig:
    """``postprocess``: how probabilities become separate cells."""

    interior_threshold: float = 0.8
    foreground_threshold: float = 0.8
    split_threshold: float = 0.97
    split_min_area_px: int = 50
    distance_threshold: float = 0.7  # seed-head models: inner distance that seeds a cell
    distance_split_threshold: float = 1.0  # ... and splits a seed between its cores (1: off)
    min_cell_area_px: int = 12
    outline_growth_px: float | None = None  # network px; None: the card's, else 0 (teach.md)
    peak_threshold: float | None = None  # a cell must reach it; None: the card's, else 0 (off)


@dataclass(frozen=True)
class OutputConfig:
    """``output``: the results folder and what is written there."""

    dir: str = "results"
    overlays: bool = True


@dataclass(frozen=True)
class WatchConfig:
    """``watch``: the inbox, what is watched in it, and when a file counts as whole."""

    inbox: str = "inbox"
    state_dir: str | None = None  # None: <output.dir>/.state
    include: tuple[str, ...] = field(default_factory=_default_include)  # as input.extensions
    exclude: tuple[str, ...] = ("*.part", "*.tmp", "~*", ".*")
    polling: bool = False
    rescan_interval_s: float = 30.0
    stable_time_s: float = 2.0
    # a stable file that does not open as a complete image yet is waited for this long
    # before it is recorded as failed (a writer may pause longer than stable_time_s)
    incomplete_timeout_s: float = 60.0
    max_attempts: int = 3
    # false: a symbolic link leading outside the inbox gets a failed row and is never
    # opened, so whoever can write the inbox cannot read what cellwatch can read
    follow_symlinks: bool = False


@dataclass(frozen=True)
class ReportConfig:
    """``report``: the daily report's time zone, groups and QC thresholds."""

    timezone: str = "UTC"
    group_pattern: str | None = None
    refresh_interval_s: float = 600.0
    outlier_k: float = 3.5  # flag counts this many robust SDs from the typical count
    saturated_max_fraction: float = 0.01  # flag images with more pixels at the maximum
    focus_min_ratio: float = 0.3  # flag focus scores below this share of the day's median
    familiarity_min: float = 0.001  # flag images whose familiarity (0–1) is below this


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics``: where ``cellwatch watch`` serves Prometheus metrics (no port: none)."""

    address: str = "127.0.0.1"  # where `cellwatch watch` serves /metrics for Prometheus
    port: int | None = None  # None: no metrics served


@dataclass(frozen=True)
class InferenceConfig:
    """``inference``: which engine runs the network, at which precision, with which cache."""

    runtime: Literal["auto", "openvino", "keras"] = "auto"  # auto: OpenVINO on CPU, Keras on GPU
    precision: Literal["auto", "f32", "bf16", "int8"] = "auto"  # auto: see docs/speed.md
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/cellwatch or ~/.cache/cellwatch
    augment: bool = False  # average the 8 flips and rotations of each tile


@dataclass(frozen=True)
class ComputeConfig:
    """Where images are processed: in this process, or in Dask worker processes."""

    workers: int | Literal["auto"] = "auto"  # 0: in this process; "auto": what is fastest here
    scheduler: str | None = None  # address of an existing Dask scheduler (tcp://host:8786)
    threads_per_worker: int = 1  # images one worker process works on at once
    gpu_sharing: Literal["shared", "exclusive"] = "shared"  # several processes per GPU, or one
    in_flight_per_worker: int = 2  # jobs handed to Dask per worker thread: bounds the driver
    worker_timeout_s: float = 120.0  # how long a command waits for a first Dask worker
    dashboard_address: str | None = (
        "127.0.0.1:0"  # local cluster's dashboard: this machine only, any port
    )


@dataclass(frozen=True)
class Config:
    """Every setting, one frozen object: loaded with :func:`load_config`, laid over with :func:`override`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    input: InputConfig = field(default_factory=InputConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    source: str = field(default="<defaults>", compare=False)

    def settings_hash(self) -> str:
        """A short hash of the settings that change the counts, for the ledger.

        ``input.extensions`` is left out: it decides which files are read, not how they are
        counted, and its default depends on which extras are installed. So is
        ``tiling.images_at_once``: each image's result is the same whatever it is, and
        ``inference.cache_dir``. ``postprocess.outline_growth_px``, ``peak_threshold`` and
        ``input.invert`` count once set, so an unchanged config keeps its hash (and its images
        are not counted again after an upgrade). The runtime and precision count (once resolved from
        ``auto`` by :func:`cellwatch.runtime.resolve`, the values that ran).
        """
        relevant = {
            name: dataclasses.asdict(getattr(self, name))
            for name in ("input", "normalize", "scale", "tiling", "postprocess", "inference")
        }
        del relevant["input"]["extensions"]
        del relevant["tiling"]["images_at_once"]  # how many at once, not how each is counted
        del relevant["inference"]["cache_dir"]  # where the converted model is kept
        unset_keys = (
            ("postprocess", "outline_growth_px"),
            ("postprocess", "peak_threshold"),
            ("input", "invert"),
        )
        for section, key in unset_keys:
            if relevant[section][key] is None:  # unset: hashed as before the key existed
                del relevant[section][key]
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def load_config(path: str | Path | None = None) -> Config:
    """Read a YAML file into a validated :class:`Config` (defaults when ``path`` is None)."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    cfg = _build(Config, raw, str(path), prefix="")
    cfg = dataclasses.replace(cfg, source=str(path))
    validate(cfg)
    return cfg


def override(cfg: Config, **values: Any) -> Config:
    """Return ``cfg`` with dotted keys replaced, e.g. ``override(cfg, **{"tiling.overlap": 16})``.

    None values are skipped, so unset command-line flags leave the file's values alone.
    """
    for dotted, value in values.items():
        if value is None:
            continue
        section_name, _, key = dotted.partition(".")
        section = getattr(cfg, section_name)
        hints = typing.get_type_hints(type(section))
        if key not in hints:
            raise ConfigError(f"unknown setting '{dotted}'")
        checked = _coerce(hints[key], value, f"{dotted} (command line)", "")
        cfg = dataclasses.replace(
            cfg, **{section_name: dataclasses.replace(section, **{key: checked})}
        )
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject values that are well typed but impossible."""
    where = cfg.source
    t = cfg.tiling
    if t.tile_size < 32 or t.tile_size % 16:
        _fail(
            where,
            "tiling.tile_size",
            f"must be a multiple of 16 and at least 32, got {t.tile_size}",
        )
    if t.overlap != "auto" and not 0 <= t.overlap <= t.tile_size - 16:
        _fail(
            where,
            "tiling.overlap",
            f"must be auto, or ≥ 0 and at most the tile size less 16 ({t.tile_size - 16}), "
            f"got {t.overlap}",
        )
    if t.batch_size < 1:
        _fail(where, "tiling.batch_size", f"must be at least 1, got {t.batch_size}")
    if t.images_at_once < 1:
        _fail(where, "tiling.images_at_once", f"must be at least 1, got {t.images_at_once}")
    n = cfg.normalize
    if not 0 <= n.low_percentile < n.high_percentile <= 100:
        _fail(where, "normalize", "need 0 ≤ low_percentile < high_percentile ≤ 100")
    s = cfg.scale
    for key in ("scale", "diameter_px", "pixel_size_um", "nucleus_diameter_um"):
        value = getattr(s, key)
        if value is not None and value <= 0:
            _fail(where, f"scale.{key}", f"must be positive, got {value}")
    if s.large_nuclei_growth is not None and not 0 <= s.large_nuclei_growth <= 1:
        _fail(
            where,
            "scale.large_nuclei_growth",
            f"must be between 0 and 1 (or null for the model's), got {s.large_nuclei_growth}",
        )
    size_range = s.diameter_range_px
    if (
        size_range is not None
        and size_range is not False
        and not (
            isinstance(size_range, tuple)
            and len(size_range) == 2
            and 0 < size_range[0] <= size_range[1]
        )
    ):
        _fail(
            where,
            "scale.diameter_range_px",
            "must be two sizes in pixels, the smallest and the largest typical nucleus "
            f"(e.g. [12, 45]), or false for none, or null for the model's; got {size_range!r}",
        )
    if not 0 < s.min_scale <= 1 <= s.max_scale:
        _fail(where, "scale.min_scale/max_scale", "need 0 < min_scale ≤ 1 ≤ max_scale")
    p = cfg.postprocess
    for key in ("interior_threshold", "foreground_threshold", "distance_threshold"):
        value = getattr(p, key)
        if not 0 < value < 1:
            _fail(where, f"postprocess.{key}", f"must be between 0 and 1, got {value}")
    if not p.distance_threshold < p.distance_split_threshold <= 1:
        _fail(
            where,
            "postprocess.distance_split_threshold",
            f"must lie above distance_threshold ({p.distance_threshold}) and be at most 1 "
            f"(1 turns splitting off), got {p.distance_split_threshold}",
        )
    if not p.interior_threshold < p.split_threshold <= 1:
        _fail(
            where,
            "postprocess.split_threshold",
            f"must lie above interior_threshold ({p.interior_threshold}) and be at most 1 "
            f"(1 turns splitting off), got {p.split_threshold}",
        )
    if p.peak_threshold is not None and not 0 <= p.peak_threshold < 1:
        _fail(
            where,
            "postprocess.peak_threshold",
            f"must be at least 0 and below 1 (0 keeps every cell; null: the model's), "
            f"got {p.peak_threshold}",
        )
    growth = p.outline_growth_px
    if growth is not None and not 0 <= growth <= MAX_OUTLINE_GROWTH_PX:
        _fail(
            where,
            "postprocess.outline_growth_px",
            f"must be between 0 and {MAX_OUTLINE_GROWTH_PX:g} pixels (or null for the model's), "
            f"got {growth}",
        )
    for key in ("min_cell_area_px", "split_min_area_px"):
        if getattr(p, key) < 0:
            _fail(where, f"postprocess.{key}", f"must not be negative, got {getattr(p, key)}")
    if cfg.input.plane < 0 or cfg.input.max_pixels < 1:
        _fail(where, "input", "plane must be ≥ 0 and max_pixels ≥ 1")
    channel = cfg.input.channel
    if isinstance(channel, int) and channel < 0:
        _fail(where, "input.channel", f"must be ≥ 0, got {channel}")
    if isinstance(channel, str) and not channel.strip():
        _fail(where, "input.channel", "must be auto, a channel number or a channel name, got ''")
    if channel == "auto" and not any(s.strip() for s in cfg.input.nuclear_channels):
        _fail(
            where,
            "input.nuclear_channels",
            "must name at least one stain when input.channel is auto",
        )
    w = cfg.watch
    if w.stable_time_s < 0 or w.rescan_interval_s <= 0 or w.max_attempts < 1:
        _fail(where, "watch", "stable_time_s ≥ 0, rescan_interval_s > 0 and max_attempts ≥ 1")
    if w.incomplete_timeout_s < 0:
        _fail(
            where,
            "watch.incomplete_timeout_s",
            f"must not be negative, got {w.incomplete_timeout_s}",
        )
    _check_report(cfg.report, where)
    m = cfg.metrics
    if m.port is not None and not 1 <= m.port <= 65535:
        _fail(
            where, "metrics.port", f"must be a port number from 1 to 65535, or null, got {m.port}"
        )
    if not m.address.strip():
        _fail(where, "metrics.address", "must not be empty (127.0.0.1 serves this machine only)")
    _check_compute(cfg.compute, where)
    if cfg.model.path is not None and not Path(cfg.model.path).is_file():
        _fail(
            where,
            "model.path",
            f"no model file at {cfg.model.path}; give the path of a .keras file or leave it empty for the bundled model",
        )


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file named by ``args.config`` (or the defaults) with the command-line
    flags every command shares (``--out``, ``--model``) laid over it."""
    config = load_config(getattr(args, "config", None))
    return override(
        config,
        **{
            "output.dir": str(args.out) if getattr(args, "out", None) else None,
            "model.path": str(args.model) if getattr(args, "model", None) else None,
        },
    )


def with_card_input(cfg: Config, card: dict[str, Any]) -> Config:
    """``cfg`` with the input a model card names (``{"input": {"channel": ..., "invert":
    ...}}``, what ``cellwatch finetune`` writes) where the config leaves it at its default.

    >>> card, gray = {"input": {"channel": "hematoxylin", "invert": True}}, InputConfig(channel=0)
    >>> [(c.input.channel, c.input.invert) for c in (with_card_input(Config(), card),
    ...     with_card_input(dataclasses.replace(Config(), input=gray), card))]
    [('hematoxylin', True), (0, True)]
    """
    named = card.get("input") or {}
    changes: dict[str, Any] = {}
    if named.get("channel") is not None and cfg.input.channel == InputConfig().channel:
        changes["channel"] = named["channel"]
    if cfg.input.invert is None and named.get("invert"):
        changes["invert"] = True
    return dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, **changes))


def _check_report(r: ReportConfig, where: str) -> None:
    time_zone(r.timezone, where)
    if r.group_pattern:
        try:
            regex = re.compile(r.group_pattern)
        except re.error as exc:
            _fail(where, "report.group_pattern", f"is not a valid regular expression: {exc}")
        if not regex.groupindex:
            _fail(
                where,
                "report.group_pattern",
                "needs named groups such as (?P<well>[A-H][0-9]{2}); "
                f"{r.group_pattern!r} has none",
            )
    if not r.outlier_k > 0:
        _fail(where, "report.outlier_k", f"must be positive, got {r.outlier_k}")
    for key in ("saturated_max_fraction", "focus_min_ratio", "familiarity_min"):
        if not 0 <= getattr(r, key) < 1:
            _fail(where, f"report.{key}", f"must be between 0 and 1, got {getattr(r, key)}")
    if r.refresh_interval_s <= 0:
        _fail(where, "report.refresh_interval_s", f"must be positive, got {r.refresh_interval_s}")


def _check_compute(c: ComputeConfig, where: str) -> None:
    if c.workers != "auto" and c.workers < 0:
        _fail(where, "compute.workers", f"must be auto or a number ≥ 0, got {c.workers}")
    if c.threads_per_worker < 1:
        _fail(
            where, "compute.threads_per_worker", f"must be at least 1, got {c.threads_per_worker}"
        )
    if c.in_flight_per_worker < 1:
        _fail(
            where,
            "compute.in_flight_per_worker",
            f"must be at least 1, got {c.in_flight_per_worker}",
        )
    if c.worker_timeout_s <= 0:
        _fail(where, "compute.worker_timeout_s", f"must be positive, got {c.worker_timeout_s}")
    if c.scheduler is not None:
        check_address(c.scheduler, f"{where}: compute.scheduler")


def _fail(where: str, key: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{where}: {key} {message}")


def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: {prefix.rstrip('.') or 'the file'} must be a mapping of keys to values"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{unknown[0]}' (known keys here: {', '.join(sorted(names))})"
        )
    values = {}
    for name, value in raw.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value or {}, where, f"{prefix}{name}.")
        else:
            values[name] = _coerce(kind, value, f"{prefix}{name}", where)
    return cls(**values)


def _coerce(kind: Any, value: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``kind``; ints are accepted for floats."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key, where)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) > 1:  # e.g. int | Literal["auto"]
            kinds = " or ".join(
                "/".join(map(str, typing.get_args(o)))
                if typing.get_origin(o) is Literal
                else o.__name__
                for o in args
                if o is not type(None)
            )
            raise ConfigError(f"{where}: {key} must be {kinds}, got {value!r}".lstrip(": "))
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{where}: {key} must be one of {', '.join(map(str, args))}, got {value!r}".lstrip(
                    ": "
                )
            )
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}".lstrip(": "))
        return tuple(_coerce(args[0], v, key, where) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(
            f"{where}: {key} must be {kind.__name__}, got {value!r} ({type(value).__name__})".lstrip(
                ": "
            )
        )
    return value
