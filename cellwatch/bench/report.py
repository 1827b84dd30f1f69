"""What a run reports: the machine, the targets met or missed, the printed table, and
the comparison with an earlier run."""

from __future__ import annotations

__all__ = ["format_comparison", "format_table", "machine", "targets"]

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from cellwatch.bench.workloads import STAGES

TARGETS = {
    "non_network_share": 0.15,  # at most, of end-to-end wall time
    "network_share_of_peak": 0.5,  # at least
    "seed_vs_default_time": 1.0,  # the default takes at most as long per megapixel
    "big_image_peak_rss_mb": 1500.0,
    "big_image_default_config_peak_rss_mb": 1500.0,  # automatic scale, as users run it
    "backlog_growth_mb": 50.0,  # resident memory added over the backlog, at most
    "total_s": 600.0,
}


def machine() -> dict[str, Any]:
    """What the figures came from."""
    import keras
    import tensorflow as tf

    from cellwatch.config import Config
    from cellwatch.runtime import resolve

    chosen = resolve(Config()).inference
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        memory_kb = int(Path("/proc/meminfo").read_text(encoding="utf-8").split()[1])
    except OSError:
        memory_kb = 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(memory_kb / 1e6, 1),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "inference": f"{chosen.runtime} {chosen.precision}",  # what the default config runs
        "commit": _commit(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the speed-and-memory issue: the measured value and whether it is met."""
    work, net, mem = report["workloads"], report["network"], report["memory"]
    found: dict[str, tuple[float, float, bool]] = {}  # name: (value, limit, at most?)
    for name in ("mosaic", "burst"):
        value = work[name]["default"]["non_network_share"]
        found[f"non_network_share_{name}"] = (value, TARGETS["non_network_share"], True)
        if "seed" in work[name]:  # the default's time per megapixel ÷ the seed's
            value = work[name]["seed"]["mp_per_s"] / work[name]["default"]["mp_per_s"]
            found[f"default_vs_seed_time_{name}"] = (value, TARGETS["seed_vs_default_time"], True)
    value = net["default"]["share_of_peak"]
    found["network_share_of_peak"] = (value, TARGETS["network_share_of_peak"], False)
    for case in ("big_image", "big_image_default_config"):
        if case in mem:
            target = f"{case}_peak_rss_mb"
            found[target] = (mem[case]["peak_rss_mb"], TARGETS[target], True)
    if "growth_mb" in mem.get("backlog", {}):
        value = mem["backlog"]["growth_mb"]
        found["backlog_growth_mb"] = (value, TARGETS["backlog_growth_mb"], True)
    found["total_s"] = (report["total_s"], TARGETS["total_s"], True)
    return {
        name: {
            "value": round(value, 4),
            "target": f"{'≤' if at_most else '≥'} {limit:g}",
            "met": bool(value <= limit if at_most else value >= limit),
        }
        for name, (value, limit, at_most) in found.items()
    }


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of a run."""
    m = report["machine"]
    lines = [
        f"cellwatch bench — {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, "
        f"TF {m['tensorflow']}, network on {m.get('inference', 'keras f32')}, "
        f"commit {m['commit']}, {m['date']}",
        f"data: {report['data']}",
        "",
        "plain TensorFlow rates (GFLOP/s): "
        + ", ".join(f"{k} {v}" for k, v in report["peak"].items()),
        "",
        f"{'network alone':<22}{'tile':>5}{'GFLOP/tile':>11}{'tiles/s':>9}{'GFLOP/s':>9}"
        f"{'of peak':>9}",
    ]
    for name, r in report["network"].items():
        model = "seed" if name == "seed" else "default"
        gflop = report["models"][model]["gflop_per_tile"]
        lines.append(
            f"{name:<22}{r.get('tile_px', 256):>5}{gflop:>11.2f}{r['tiles_per_s']:>9.2f}"
            f"{r['gflops']:>9.1f}{r['share_of_peak']:>9.0%}"
        )
    lines += ["", _workload_table(report["workloads"]), ""]
    for name, r in report["memory"].items():
        lines.append(
            f"memory {name}: peak {r['peak_rss_mb']:.0f} MB (after loading the model "
            f"{r['ready_rss_mb']:.0f} MB)"
            + (f", at scale {r['scale']:.3g}" if r.get("scale") is not None else "")
            + (f", growth {r['growth_mb']:+.0f} MB over the backlog" if "growth_mb" in r else "")
        )
    lines += ["", f"total {report['total_s']:.0f} s", "", "targets:"]
    for name, t in report["targets"].items():
        lines.append(
            f"  {'met ' if t['met'] else 'MISS'} {name}: {t['value']} (target {t['target']})"
        )
    return "\n".join(lines)


def _workload_table(work: dict[str, dict[str, Any]]) -> str:
    stages = [
        s for s in STAGES if any(s in r["stage_s"] for w in work.values() for r in w.values())
    ]
    head = (
        f"{'workload':<16}{'MP':>7}{'wall s':>8}{'MP/s':>8}{'÷dflt':>7}{'non-net':>8}"
        f"{'net busy':>9}  "
    )
    lines = [head + " ".join(f"{s[:7]:>7}" for s in stages) + "   (stage time ÷ wall)"]
    for workload, runs in work.items():
        base = runs["default"]["mp_per_s"]
        for label, r in runs.items():
            shares = " ".join(f"{r['stage_share'].get(s, 0):>7.1%}" for s in stages)
            lines.append(
                f"{workload + ' ' + label:<16}{r['megapixels']:>7.2f}{r['wall_s']:>8.1f}"
                f"{r['mp_per_s']:>8.3f}{r['mp_per_s'] / base:>7.2f}"
                f"{r.get('non_network_share', float('nan')):>8.1%}"
                f"{r['network_busy_share']:>9.1%}  {shares}"
            )
    lines.append(
        "non-net: 1 − (the run's batches timed on the network alone) ÷ wall; net busy: share"
        " of wall with a batch in the network; stages overlap across threads"
    )
    return "\n".join(lines)


HEADLINES = (
    "workloads.mosaic.default.mp_per_s",
    "workloads.burst.default.mp_per_s",
    "workloads.mosaic.default.non_network_share",
    "workloads.burst.default.non_network_share",
    "network.default.gflops",
    "network.default.share_of_peak",
    "peak.best_gflops",
    "memory.big_image.peak_rss_mb",
    "memory.big_image_default_config.peak_rss_mb",
    "memory.backlog.growth_mb",
    "total_s",
)


def format_comparison(new: dict[str, Any], old: dict[str, Any]) -> str:
    """New/old ratios of the headline figures (and a warning when machines differ)."""
    lines = ["", "compared with the earlier run (new ÷ old):"]
    if new["machine"].get("cpu") != old.get("machine", {}).get("cpu"):
        lines.append("  note: a different CPU; compare ratios of ratios, not times")
    flat_new, flat_old = _flatten(new), _flatten(old)
    for key in HEADLINES:
        a, b = flat_new.get(key), flat_old.get(key)
        if isinstance(a, int | float) and isinstance(b, int | float) and b:
            lines.append(f"  {key:<46} {b:>10.4g} → {a:>10.4g}  ×{a / b:.2f}")
    return "\n".join(lines)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
