"""cellwatch on Dask distributed: real schedulers and worker processes on 127.0.0.1.

``cellwatch predict`` over an existing scheduler (``dask scheduler`` and two ``dask
worker`` processes started here) must give what the in-process run gives; ``cellwatch
watch`` with ``compute.workers: 2`` must count a burst once each, survive a worker killed
while it holds a job, and give an image that kills every worker it meets one ``failed``
row. Worker processes cost seconds of start-up each (TensorFlow), so each test starts as
few as it can.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import tifffile
import yaml
from conftest import DATA
from test_crash_points import burst, write_compute_config
from test_daemon import by_image, check_files_whole, run_cellwatch, status_json

from cellwatch.config import ComputeConfig, load_config
from cellwatch.errors import ClusterError, ConfigError
from cellwatch.service.cluster import resolve_workers, worker_environments
from cellwatch.service.worker import check_folders

__all__ = ["run_cellwatch"]  # the fixture, from tests/test_daemon.py

DASK = Path(sys.executable).with_name("dask")


def cellwatch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "cellwatch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DaskCluster:
    """``dask scheduler`` and ``dask worker`` processes, as a user starts them."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        self.tmp, self.port = tmp, port or free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def _start(self, name: str, *args: str) -> None:
        log = (self.tmp / f"{name}-{len(self.procs)}.log").open("wb")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        self.procs.append(
            subprocess.Popen([DASK, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        )
        log.close()

    def scheduler(self) -> None:
        self._start(
            "scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
            "--no-dashboard",
        )  # fmt: skip

    def workers(self, n: int) -> None:
        for _ in range(n):
            self._start(
                "worker", "worker", self.address, "--nthreads", "1", "--host", "127.0.0.1",
                "--no-dashboard", "--nworkers", "1",
            )  # fmt: skip

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def dask_cluster(tmp_path: Path):
    clusters: list[DaskCluster] = []

    def make(port: int | None = None) -> DaskCluster:
        clusters.append(DaskCluster(tmp_path, port))
        return clusters[-1]

    yield make
    for cluster in clusters:
        cluster.close()


# --- fast: sizing, environments, settings, the folder check ---------------------------


def test_auto_is_in_process_without_a_gpu_and_processes_with_one():
    assert resolve_workers(ComputeConfig(), cpus=2, gpus=0) == 0
    assert resolve_workers(ComputeConfig(), cpus=64, gpus=0) == 0
    assert resolve_workers(ComputeConfig(), cpus=16, gpus=1) == 8
    assert resolve_workers(ComputeConfig(), cpus=4, gpus=1) == 3  # one core for the driver
    assert resolve_workers(ComputeConfig(gpu_sharing="exclusive"), cpus=16, gpus=4) == 4
    assert resolve_workers(ComputeConfig(workers=3), cpus=2, gpus=0) == 3


def test_worker_environments_deal_out_gpus_and_threads():
    envs = worker_environments(4, threads=2, gpus=2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0", "1"]
    assert all(e["OMP_NUM_THREADS"] == e["TF_NUM_INTRAOP_THREADS"] == "2" for e in envs)
    assert envs[0]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.450"  # two processes per GPU
    alone = worker_environments(2, threads=1, gpus=2, sharing="exclusive")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in alone] == ["0", "1"]
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in alone[0]
    assert "CUDA_VISIBLE_DEVICES" not in worker_environments(2, threads=1, gpus=0)[0]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("compute:\n  workers: -1\n", "compute.workers must be auto or a number"),
        ("compute:\n  workers: many\n", "compute.workers must be int"),
        ("compute:\n  scheduler: 10.0.0.5\n", "must be a Dask scheduler address such as tcp://"),
        ("compute:\n  gpu_sharing: half\n", "compute.gpu_sharing must be one of shared, exclusive"),
        ("compute:\n  threads_per_worker: 0\n", "compute.threads_per_worker must be at least 1"),
    ],
)
def test_compute_settings_are_checked(tmp_path: Path, text: str, match: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_folder_check_names_the_folder_a_worker_cannot_see(tmp_path: Path):
    check_folders([(str(tmp_path), True)], where="worker w")
    with pytest.raises(
        ClusterError, match=r"worker w cannot see the folder /nowhere/inbox.*shared"
    ):
        check_folders([(str(tmp_path), True), ("/nowhere/inbox", False)], where="worker w")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # running as root: permissions do not stop it
        pytest.skip("this user can write anywhere")
    with pytest.raises(ClusterError, match=f"worker w cannot write to {locked}"):
        check_folders([(str(locked), True)], where="worker w")


# --- predict ----------------------------------------------------------------------------


def test_predict_fails_within_30_s_naming_an_unreachable_scheduler(tmp_path: Path):
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.zeros((32, 32), np.uint8))
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = cellwatch("predict", str(image), "--out", str(tmp_path / "o"), "--scheduler", address)
    took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert f"cannot reach the Dask scheduler at {address}" in done.stderr
    assert took < 30, took
    assert not (tmp_path / "o" / "ledger.csv").exists()


@pytest.mark.skipif(not DATA.exists(), reason="shared data not present")
def test_predict_over_a_dask_cluster_equals_the_in_process_run(tmp_path: Path, dask_cluster):
    """The bundled model on real images: the same rows and bit-identical label images
    from two `dask worker` processes as from one process."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("03398329ced0.tif", "06c779330d6d.tif", "0acd2c223d30.tif", "139946af9e2c.tif"):
        shutil.copy(DATA / "val" / "images" / name, images / name)  # 256² and 360²
    cluster = dask_cluster()
    cluster.scheduler()
    cluster.workers(2)
    alone = cellwatch("predict", str(images), "--out", str(tmp_path / "alone"), "--workers", "0")
    assert alone.returncode == 0, alone.stderr
    spread = cellwatch(
        "predict", str(images), "--out", str(tmp_path / "dask"), "--scheduler", cluster.address
    )
    assert spread.returncode == 0, spread.stderr
    assert f"Dask scheduler {cluster.address}" in spread.stderr
    assert "2 worker(s): 2 × cpu" in spread.stderr
    a, b = (
        pd.read_csv(tmp_path / run / "ledger.csv").sort_values("image").reset_index(drop=True)
        for run in ("alone", "dask")
    )
    assert len(a) == len(b) == 4
    same = ["image", "sha256", "cell_count", "mean_area_px", "median_area_px", "confluence",
            "status", "model", "settings_hash", "scale", "diameter_px"]  # fmt: skip
    pd.testing.assert_frame_equal(a[same], b[same])
    assert a["cell_count"].sum() > 0
    for left, right in zip(a["labels"], b["labels"], strict=True):
        assert Path(left).name == Path(right).name
        assert np.array_equal(tifffile.imread(left), tifffile.imread(right)), left
    cells = [pd.read_csv(tmp_path / run / "cells.csv") for run in ("alone", "dask")]
    key = ["image", "label"]
    left, right = (c.drop(columns="job_id").sort_values(key).reset_index(drop=True) for c in cells)
    pd.testing.assert_frame_equal(left, right)


# --- the daemon -------------------------------------------------------------------------


def test_watch_with_two_workers_counts_a_burst_once_despite_dying_workers(
    run_cellwatch, tmp_path: Path, threshold_model: Path, monkeypatch
):
    """A burst, one image whose worker is killed once while it holds it (after its label
    image is written), and one that kills every worker it meets: every image one row,
    the poison one ``failed`` after ``watch.max_attempts``; status names the workers;
    SIGTERM stops the daemon and its workers."""
    config = write_compute_config(
        tmp_path / "config.yaml", threshold_model, 2, stable_time_s=0.2, rescan_interval_s=0.5
    )
    cw = run_cellwatch(config)
    counts = tmp_path / "crash-counts"
    counts.mkdir()
    monkeypatch.setenv("CELLWATCH_CRASH_AT", "after-labels@poison,after-labels@b03:1")
    monkeypatch.setenv("CELLWATCH_CRASH_DIR", str(counts))
    cw.start()
    workers = psutil.Process(cw.proc.pid).children(recursive=True)
    assert workers, "no worker processes"
    expected = burst(cw.inbox, 16)
    shutil.copy(cw.inbox / "b01.tif", cw.inbox / "poison.tif")
    names = {*expected, "poison.tif"}
    cw.wait_rows(lambda rows: names <= set(by_image(rows)), timeout=180)
    time.sleep(0.5)
    rows = by_image(cw.rows())
    assert set(rows) == names
    for name, n in expected.items():
        assert [(r["status"], r["cell_count"]) for r in rows[name]] == [("ok", str(n))], name
    [poison] = rows["poison.tif"]
    assert poison["status"] == "failed"
    assert "gave up after 3 attempts" in poison["error"]
    assert "a worker process died while processing this image" in poison["error"]
    passes = {p.read_text() for p in counts.iterdir()}  # b03: killed once, then done
    assert ".." in passes, passes
    check_files_whole(cw.out)

    deadline = time.monotonic() + 120
    while True:  # restarted workers load the model again; the heartbeat (10 s) tells status
        report = status_json(["--config", str(config), "--out", str(cw.out)])
        compute = report["compute"]
        workers = (compute or {}).get("workers") or []
        known = [w for w in workers if w["device"].startswith("cpu")]
        if len(known) == 2 or (known and time.monotonic() > deadline):
            break  # a loaded machine may take long to restart the killed workers
        assert time.monotonic() < deadline, workers
        time.sleep(1)
    assert all(isinstance(w["in_flight"], int) for w in workers)
    assert compute["mode"] == "dask"
    assert compute["scheduler"].startswith("tcp://127.0.0.1:")
    assert compute["problem"] is None

    workers = psutil.Process(cw.proc.pid).children(recursive=True)
    assert cw.stop() == 0
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"worker processes outlived the daemon: {alive}"
    assert "Dask scheduler tcp://127.0.0.1:" in cw.log()


def test_watch_waits_for_an_unreachable_scheduler_and_resumes(
    run_cellwatch, tmp_path: Path, threshold_model: Path, dask_cluster
):
    """The scheduler is not there: the daemon queues the images, says so in the log and
    in `cellwatch status`, and counts them once a scheduler and a worker appear."""
    cluster = dask_cluster()
    config = write_compute_config(
        tmp_path / "config.yaml", threshold_model, 0, stable_time_s=0.2, rescan_interval_s=0.5
    )
    settings = yaml.safe_load(config.read_text())
    settings["compute"] = {"scheduler": cluster.address}
    config.write_text(yaml.safe_dump(settings))
    cw = run_cellwatch(config)
    cw.start()
    expected = burst(cw.inbox, 4)
    deadline = time.monotonic() + 60
    while True:
        report = status_json(["--config", str(config), "--out", str(cw.out)])
        problem = (report["compute"] or {}).get("problem") or ""
        if cluster.address in problem and report["queue"]["waiting"] == 4:
            break
        assert time.monotonic() < deadline, report
        time.sleep(0.5)
    assert f"cannot reach the Dask scheduler at {cluster.address}" in problem
    assert cw.rows() == []
    cluster.scheduler()
    cluster.workers(1)
    rows = cw.wait_rows(lambda rows: set(expected) <= set(by_image(rows)), timeout=120)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert cw.stop() == 0
    log = cw.log()
    assert f"cannot reach the Dask scheduler at {cluster.address}" in log
    assert "is back; resuming" in log
    assert cluster.procs[-1].poll() is None, "stopping the daemon stopped a worker not its own"


# --- scheduler addresses: every wrong form fails within 30 s, exit 2, naming its origin ---


@pytest.fixture
def dashboard_port(dask_cluster) -> tuple[str, int]:
    """A real `dask scheduler` with its dashboard on 127.0.0.1: (its address, the
    dashboard's port, the one users give by mistake)."""
    cluster, dashboard = dask_cluster(), free_port()
    cluster._start(
        "scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(cluster.port),
        "--dashboard-address", f"127.0.0.1:{dashboard}",
    )  # fmt: skip
    deadline = time.monotonic() + 60
    for port in (cluster.port, dashboard):
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, f"the scheduler did not start on {port}"
            time.sleep(0.2)
    return cluster.address, dashboard


def _predict_with(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, float]:
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.zeros((32, 32), np.uint8))
    started = time.monotonic()
    done = cellwatch("predict", str(image), "--out", str(tmp_path / "o"), *flags, timeout=60)
    return done, time.monotonic() - started


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ("127.0.0.1:{port}", "--scheduler must be a Dask scheduler address .*tcp://"),
        ("tcp://127.0.0.1", "--scheduler 'tcp://127.0.0.1' names no port"),
        ("tcp://127.0.0.1:{dashboard}", r"\(--scheduler\) is a web server \(HTTP\).*dashboard"),
    ],
)
def test_a_wrong_scheduler_address_fails_fast_naming_the_flag(
    tmp_path: Path, dashboard_port, form: str, message: str
):
    address, dashboard = dashboard_port
    port = address.rsplit(":", 1)[1]
    done, took = _predict_with(tmp_path, "--scheduler", form.format(port=port, dashboard=dashboard))
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(message, done.stderr), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "<defaults>" not in done.stderr
    assert took < 30, took


def test_a_wrong_scheduler_address_in_the_config_names_the_file_and_key(
    tmp_path: Path, dashboard_port
):
    _, dashboard = dashboard_port
    config = tmp_path / "config.yaml"
    for address, message in [
        ("127.0.0.1:8786", "must be a Dask scheduler address"),
        (f"tcp://127.0.0.1:{dashboard}", "is a web server"),
    ]:
        config.write_text(yaml.safe_dump({"compute": {"scheduler": address}}))
        done, took = _predict_with(tmp_path, "--config", str(config))
        assert done.returncode == 2, done.stderr[-3000:]
        assert f"{config}: compute.scheduler" in done.stderr, done.stderr[-3000:]
        assert message in done.stderr and took < 30, (took, done.stderr[-3000:])


def test_the_local_clusters_dashboard_listens_on_this_machine_only():
    from cellwatch.service.cluster import Pool

    cluster = Pool(ComputeConfig(workers=0), workers=0)._start_local()
    try:
        bound = [s.getsockname()[0] for s in cluster.scheduler.http_server._sockets.values()]
    finally:
        cluster.close()
    assert bound and set(bound) == {"127.0.0.1"}, bound


def test_the_local_workers_keep_no_profile_of_their_tasks():
    """Dask's statistical profiler kept a growing record of the pipeline's stacks in each
    worker (the Dask soak: +50 MB per 1,000 images per worker); it is off."""
    from distributed import Client

    from cellwatch.service.cluster import Pool

    cluster = Pool(ComputeConfig(workers=1), workers=1)._start_local()
    try:
        with Client(cluster) as client:
            client.submit(lambda: sum(i * i for i in range(3_000_000)), pure=False).result()
            samples = client.run(
                lambda dask_worker: (
                    dask_worker.profile_recent["count"]
                    + sum(p["count"] for p in dask_worker.profile_keys.values())
                )
            )
    finally:
        cluster.close()
    assert list(samples.values()) == [0], samples


def test_the_local_scheduler_keeps_few_messages_of_each_stream():
    """Dask logs the last 1,000 messages of each stream for debugging, and a message that
    hands a worker an image holds its whole task: the daemon hosting the local scheduler
    grew 67 MB over 5,000 images with two workers. The logs are short now."""
    from cellwatch.service.cluster import DASK_MESSAGE_LOG, Pool

    pool = Pool(ComputeConfig(workers=1), workers=1).open()
    try:
        pool.client.submit(sum, [1, 2], pure=False).result()
        lengths = pool.client.run_on_scheduler(
            lambda dask_scheduler: [
                *(s.recent_message_log.maxlen for s in dask_scheduler.stream_comms.values()),
                dask_scheduler.transition_log.maxlen,
            ]
        )
        lengths.append(pool.client.scheduler_comm.recent_message_log.maxlen)
    finally:
        pool.close()
    assert len(lengths) == 3 and set(lengths) == {DASK_MESSAGE_LOG}, lengths
    assert DASK_MESSAGE_LOG <= 100


# --- a worker process keeps its exit status ---------------------------------------------


def _python(script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )


def test_a_worker_that_loaded_the_model_exits_with_its_own_status(
    tmp_path: Path, threshold_model: Path
):
    """Loading the model makes the process end without waiting for TensorFlow; that must
    not turn a failure into exit 0 (systemd's Restart=on-failure and Dask's nanny read it)."""
    done = _python(
        "import sys\n"
        "from cellwatch.config import load_config, override\n"
        "from cellwatch.service import worker\n"
        f"config = override(load_config(None), **{{'model.path': {str(threshold_model)!r}}})\n"
        "worker._segmenter(config, '')\n"
        "sys.exit(3)\n"
    )
    assert done.returncode == 3, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("ending", "expected"),
    [("raise RuntimeError('boom')", 1), ("sys.exit('a message')", 1), ("pass", 0)],
)
def test_exiting_without_waiting_keeps_the_status(ending: str, expected: int):
    done = _python(
        f"import sys\nfrom cellwatch.service import worker\nworker._exit_without_waiting()\n{ending}\n"
    )
    assert done.returncode == expected, done.stderr[-2000:]
    if expected == 1:
        assert "boom" in done.stderr or "a message" in done.stderr  # still shown
