"""The Dask scheduler dies under a running daemon and comes back at the same address.

Real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 and a real
``cellwatch watch`` joined to them (``compute.scheduler``): the scheduler is killed with
SIGKILL mid-burst, started again on the same port, and each ``dask worker`` that exits is
started again, as ``cellwatch-worker@.service`` (``Restart=always``) does. Every image
must end with exactly one ``ok`` row, and the daemon must keep running throughout.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import yaml
from test_crash_points import write_compute_config
from test_daemon import by_image, check_files_whole, run_cellwatch, write_tiff
from test_distributed import DaskCluster, dask_cluster

__all__ = ["dask_cluster", "run_cellwatch"]  # the fixtures


def restart_workers_like_systemd(cluster: DaskCluster, done: threading.Event) -> threading.Thread:
    """Start a ``dask worker`` again whenever one exits, whatever its status."""

    def watch() -> None:
        restarted: set[int] = set()
        while not done.wait(0.5):
            for proc in list(cluster.procs):
                exited = proc.args[1] == "worker" and proc.poll() is not None
                if exited and proc.pid not in restarted:
                    restarted.add(proc.pid)
                    cluster.workers(1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_restarted_scheduler_resumes_the_work_and_every_image_gets_one_row(
    run_cellwatch, tmp_path: Path, threshold_model: Path, dask_cluster
):
    cluster = dask_cluster()
    cluster.scheduler()
    cluster.workers(2)
    config = write_compute_config(
        tmp_path / "config.yaml", threshold_model, 0, stable_time_s=0.2, rescan_interval_s=0.5
    )
    settings = yaml.safe_load(config.read_text())
    settings["compute"] = {"scheduler": cluster.address}
    config.write_text(yaml.safe_dump(settings))
    cw = run_cellwatch(config)
    cw.start()
    pid = cw.proc.pid
    done = threading.Event()
    restart_workers_like_systemd(cluster, done)
    try:
        names = set()
        for i in range(24):
            centres = [(30 + 60 * (k // 3), 30 + 60 * (k % 3)) for k in range(1 + i % 6)]
            write_tiff(cw.inbox / f"c{i:02d}.tif", centres, shape=(256, 256), radius=10)
            names.add(f"c{i:02d}.tif")
        cw.wait_rows(lambda rows: len(rows) >= 3, timeout=180)
        [scheduler] = [p for p in cluster.procs if p.args[1] == "scheduler"]
        scheduler.kill()  # SIGKILL, mid-burst
        scheduler.wait(10)
        assert len(cw.rows()) < len(names), "the burst was over before the scheduler died"
        time.sleep(3.0)
        cluster.scheduler()  # the same port
        rows = cw.wait_rows(lambda rows: names <= set(by_image(rows)), timeout=300)
        time.sleep(1.0)  # room for a duplicate to show up, were there one
        rows = by_image(cw.rows())
        assert set(rows) == names
        assert all([r["status"] for r in rows[n]] == ["ok"] for n in names), rows
        check_files_whole(cw.out)
        assert cw.proc.poll() is None and cw.proc.pid == pid and cw.starts == 1
        assert cw.stop() == 0
    finally:
        done.set()
    log = cw.log()
    assert "Traceback" not in log, log[-6000:]  # in words, once; not distributed's traceback
    # Said once, never per try. On a busy machine the client may reconnect between two of
    # the daemon's checks: it never sees the loss, and the lost tasks come back cancelled
    # and go back to the queue (the rows above), so nothing is said at all.
    lost = log.count("lost the Dask scheduler at")
    assert lost <= 1 and log.count("is back; resuming") == lost, log[-3000:]
