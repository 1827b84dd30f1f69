"""``cellwatch status``: what the daemon is doing, for a person or a script.

Reads the job database (read-only) and the ledger, so it works while the daemon runs and
after it stopped, and needs no model. Numbers: queue depth, images counted and failed
today (in ``report.timezone``), images per minute over the last ten minutes, the last
error, the model in use and whether the daemon is alive.
"""

from __future__ import annotations

__all__ = ["ALIVE_WITHIN_S", "RATE_WINDOW", "add_arguments", "collect", "format_text", "run"]

import argparse
import json
import os
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from cellwatch.config import Config, override, time_zone
from cellwatch.service.jobs import DB_NAME, JobQueue, state_dir
from cellwatch.storage import ledger

RATE_WINDOW = timedelta(minutes=10)
ALIVE_WITHIN_S = 60.0  # a heartbeat older than this means the daemon is not running
ASK_SCHEDULER_S = 3.0  # how long status waits for the Dask scheduler's own answer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``cellwatch status``."""
    parser.add_argument("--config", type=Path, help="configuration file (YAML)")
    parser.add_argument("--out", type=Path, help="output folder (default: output.dir)")
    parser.add_argument(
        "--state", type=Path, help="folder of the job database (default: OUT/.state)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    """``cellwatch status``: print the daemon's state (``--json`` for scripts); exit status 0."""
    from cellwatch.config import config_from_args

    config = override(
        config_from_args(args),
        **{"watch.state_dir": str(args.state) if args.state else None},
    )
    report = collect(config)
    print(json.dumps(report, indent=2) if args.json else format_text(report), file=sys.stdout)
    return 0


def collect(config: Config, *, now: datetime | None = None) -> dict[str, Any]:
    """The status as plain data (what ``--json`` prints).

    Raises
    ------
    QueueError
        There is no job database in the state folder, or it cannot be read.
    """
    now = now or datetime.now(UTC)
    zone = time_zone(config.report.timezone)
    out, state = Path(config.output.dir), state_dir(config)
    with JobQueue(state / DB_NAME, readonly=True) as queue:
        counts, meta = queue.counts(), queue.meta()
        retrying = [job for job in queue.jobs(("pending",)) if job.attempts > 0]
    rows = ledger.read(out / "ledger.csv")
    times = pd.to_datetime(rows["processed_at"], utc=True, errors="coerce", format="ISO8601")
    midnight = now.astimezone(zone).replace(hour=0, minute=0, second=0, microsecond=0)
    today = rows[times >= midnight]
    recent = rows[times >= now - RATE_WINDOW]
    failed = rows[rows["status"].eq("failed")]
    last_error = None
    if len(failed):
        last = failed.iloc[-1]
        last_error = {
            "time": str(last["processed_at"]),
            "image": str(last["image"]),
            "error": str(last["error"]),
        }
    daemon = _daemon(meta, now)
    return {
        "daemon": daemon,
        # the daemon waits for room on a full results disk (it says so at once)
        "paused": (meta.get("paused") or None) if daemon["running"] else None,
        "model": meta.get("model") or (str(rows["model"].iloc[-1]) if len(rows) else None),
        "last_reload": meta.get("last_reload")
        or None,  # when, and what it changed or why it failed
        "queue": {
            "waiting": counts["pending"],
            "in_progress": counts["running"],
            "retrying": len(retrying),
            "last_retry_error": retrying[-1].last_error if retrying else None,
        },
        "today": {
            "counted": int(today["status"].eq("ok").sum()),
            "failed": int(today["status"].eq("failed").sum()),
            "since": midnight.isoformat(),
        },
        "compute": _compute(meta, daemon["running"], counts["running"]),
        "images_per_minute": round(len(recent) / (RATE_WINDOW.total_seconds() / 60), 2),
        "last_error": last_error,
        "state_dir": str(state),
        "output_dir": str(out),
    }


def format_text(report: dict[str, Any]) -> str:
    """The status as a few aligned lines for a person."""
    d, q, t = report["daemon"], report["queue"], report["today"]
    if d["running"]:
        daemon = f"running, pid {d['pid']}, last heartbeat {d['heartbeat_age_s']:.0f} s ago"
    elif d["heartbeat"]:
        daemon = f"not running (last seen {d['heartbeat']})"
    else:
        daemon = "not running"
    queue = f"{q['waiting']} waiting, {q['in_progress']} in progress"
    if q["retrying"]:
        queue += f", {q['retrying']} to retry (last error: {q['last_retry_error']})"
    error = "none"
    if report["last_error"]:
        e = report["last_error"]
        error = f"{e['time']}  {e['image']}: {e['error']}"
    lines = [
        ("daemon", daemon),
        *([("paused", report["paused"])] if report.get("paused") else []),
        ("model", report["model"] or "unknown (nothing processed yet)"),
        *([("last reload", report["last_reload"])] if report.get("last_reload") else []),
        ("queue", queue),
        ("today", f"{t['counted']} counted, {t['failed']} failed (since {t['since']})"),
        ("rate", f"{report['images_per_minute']:g} images/min over the last 10 min"),
        ("last error", error),
        *_compute_lines(report.get("compute"), running=d["running"]),
    ]
    head = f"cellwatch status — output {report['output_dir']}, state {report['state_dir']}"
    return "\n".join([head, *(f"  {key:<11} {value}" for key, value in lines)])


def _compute_lines(compute: dict[str, Any] | None, *, running: bool) -> list[tuple[str, str]]:
    """Where the images are processed: this process's device, or the Dask workers, their
    device and jobs in flight, and a problem (no scheduler, no workers) if there is one."""
    if not compute:
        return []
    if compute.get("mode") != "dask":
        return [("compute", f"in the daemon's process, on {compute.get('device') or 'unknown'}")]
    workers = compute.get("workers") or []
    if not compute.get("scheduler"):
        what = "connecting" if running else "the daemon is not running"
        lines = [("compute", f"Dask, {what}: scheduler and workers not known yet")]
    else:
        seen = "" if compute.get("live") else " (as the daemon last saw it)"
        lines = [
            (
                "compute",
                f"Dask scheduler {compute['scheduler']}, {len(workers)} worker(s), "
                f"{compute.get('in_flight', 0)} job(s) in flight; dashboard "
                f"{compute.get('dashboard') or 'off'}{seen}",
            )
        ]
    for w in workers:
        lines.append(("worker", f"{w['name']} on {w['device']}: {w['in_flight']} in flight"))
    if compute.get("problem"):
        lines.append(("problem", str(compute["problem"])))
    return lines


def _daemon(meta: dict[str, str], now: datetime) -> dict[str, Any]:
    heartbeat = meta.get("heartbeat")
    age = None
    if heartbeat:
        age = (now - datetime.fromisoformat(heartbeat)).total_seconds()
    pid = int(meta["pid"]) if meta.get("pid") else None
    running = meta.get("state") == "running" and age is not None and age < ALIVE_WITHIN_S
    if (
        running
        and pid is not None
        and meta.get("host", socket.gethostname()) == socket.gethostname()
    ):
        running = _alive(pid)  # killed (kill -9, a power cut) within the last minute?
    return {
        "running": running,
        "pid": pid,
        "heartbeat": heartbeat,
        "heartbeat_age_s": round(age, 1) if age is not None else None,
    }


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _compute(meta: dict[str, str], running: bool, in_progress: int) -> dict[str, Any] | None:
    """The daemon's last word on its compute, corrected by what is known now: nothing is
    in flight that the queue does not hold as in progress, and the Dask scheduler itself
    is asked for its workers (the daemon's word can be up to a heartbeat old)."""
    if not meta.get("compute"):
        return None
    compute: dict[str, Any] = json.loads(meta["compute"])
    if compute.get("mode") != "dask":
        return compute
    compute["in_flight"] = min(int(compute.get("in_flight") or 0), in_progress)
    compute["live"] = False
    if not running:
        compute["in_flight"] = 0
        return compute
    address = compute.get("scheduler")
    workers = _ask_scheduler(address) if address else None
    if workers is not None:
        devices = {w.get("address"): w.get("device") for w in compute.get("workers") or []}
        for w in workers:
            w["device"] = devices.get(w["address"]) or "not known yet"
        compute["workers"], compute["live"] = workers, True
    return compute


def _ask_scheduler(address: str) -> list[dict[str, Any]] | None:
    """The workers the scheduler at ``address`` has now, or None when it does not answer
    within :data:`ASK_SCHEDULER_S`."""
    from cellwatch.config import tcp_host_port

    where = tcp_host_port(address)
    if where is None:
        return None
    try:  # a port nobody listens on answers at once; no Dask import for that
        socket.create_connection(where, timeout=ASK_SCHEDULER_S).close()
    except OSError:
        return None
    import logging

    from distributed import Client

    logging.getLogger("distributed").setLevel(logging.ERROR)
    try:
        with Client(address, timeout=ASK_SCHEDULER_S, set_as_default=False) as client:
            info = client.scheduler_info(n_workers=-1)["workers"]
            processing = client.processing()
    except Exception:  # gone between the two looks, or not a scheduler: keep the daemon's word
        return None
    return [
        {
            "address": address,
            "name": str(w.get("name", address)),
            "threads": int(w.get("nthreads", 0)),
            "in_flight": len(processing.get(address, ())),
        }
        for address, w in sorted(info.items())
    ]
