"""Prometheus metrics: the real daemon scraped over HTTP, and the pieces in process."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import Cellwatch, write_config, write_tiff

from cellwatch.errors import CellwatchError
from cellwatch.service.jobs import FileVersion, JobQueue
from cellwatch.service.metrics import Metrics, serve
from cellwatch.storage.imageio import sha256_file
from cellwatch.timing import Stopwatch

#: The only labels a cellwatch metric may carry (``le`` is a histogram's bucket bound).
ALLOWED_LABELS = {"status", "stage", "name", "hash", "le", "reason"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> tuple[str, dict[tuple[str, frozenset], float]]:
    """The exposition text, and each sample's value keyed by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def value(samples: dict, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


@pytest.fixture
def daemon_with_metrics(tmp_path: Path, threshold_model: Path):
    config = write_config(tmp_path / "config.yaml", threshold_model)
    settings = yaml.safe_load(config.read_text())
    port = free_port()
    settings["metrics"] = {"address": "127.0.0.1", "port": port}
    config.write_text(yaml.safe_dump(settings))
    cw = Cellwatch(tmp_path, config)
    yield cw, port
    cw.close()


def test_daemon_counts_three_images_and_a_scrape_shows_them(
    daemon_with_metrics, tmp_path: Path, threshold_model: Path
):
    cw, port = daemon_with_metrics
    cw.start()
    _, before = scrape(port)
    assert value(before, "cellwatch_images_total", status="ok") == 0
    started = value(before, "process_start_time_seconds")

    for name, centres in {
        "one.tif": [(20, 20)],
        "two.tif": [(20, 20), (44, 44)],
        "three.tif": [(15, 15), (30, 45), (50, 20)],
    }.items():
        write_tiff(tmp_path / "staging" / name, centres)
        (tmp_path / "staging" / name).rename(cw.inbox / name)
    rows = cw.wait_rows(lambda rows: len(rows) == 3)
    assert [r["status"] for r in rows] == ["ok"] * 3

    # the ledger rows land a moment before their jobs are marked done
    deadline = time.monotonic() + 30
    while True:
        text, samples = scrape(port)
        if value(samples, "cellwatch_jobs_in_progress") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert 'cellwatch_images_total{status="ok"} 3.0' in text.splitlines()
    assert value(samples, "cellwatch_images_total", status="failed") == 0
    assert value(samples, "cellwatch_cells_total") == 6
    assert value(samples, "cellwatch_queue_depth") == 0
    assert value(samples, "cellwatch_jobs_in_progress") == 0
    assert value(samples, "cellwatch_queue_wait_seconds_count") == 3
    assert value(samples, "cellwatch_last_success_timestamp_seconds") >= started
    assert value(samples, "cellwatch_paused", reason="disk_full") == 0
    for stage in ("read", "inference", "measure", "write"):
        assert value(samples, "cellwatch_stage_seconds_count", stage=stage) >= 1, stage
    assert value(samples, "cellwatch_stage_seconds_count", stage="read") == 3
    digest = sha256_file(threshold_model)[:12]
    assert value(samples, "cellwatch_model_info", name="threshold", hash=digest) == 1
    labels = {key for (_, pairs) in samples for key, _ in pairs}
    assert labels <= ALLOWED_LABELS, labels - ALLOWED_LABELS  # nothing per image

    assert cw.stop() == 0
    with pytest.raises(urllib.error.URLError):  # the port is given back on a clean stop
        scrape(port)


def test_a_taken_port_stops_the_daemon_with_a_clear_message(daemon_with_metrics):
    cw, port = daemon_with_metrics
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        cw.start(wait_ready=False)
        assert cw.proc is not None
        assert cw.proc.wait(120) == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in cw.log()
    assert "choose another metrics.port" in cw.log().lower()


def test_two_daemons_in_one_process_keep_their_own_metrics():
    first, second = Metrics(), Metrics()
    servers = [serve(first, "127.0.0.1", 0), serve(second, "127.0.0.1", 0)]
    try:
        first.recorded({"status": "ok", "cell_count": 4})
        second.recorded({"status": "failed"})
        _, a = scrape(servers[0].port)
        _, b = scrape(servers[1].port)
    finally:
        for server in servers:
            server.close()
    assert value(a, "cellwatch_images_total", status="ok") == 1
    assert value(a, "cellwatch_images_total", status="failed") == 0
    assert value(a, "cellwatch_cells_total") == 4
    assert value(b, "cellwatch_images_total", status="ok") == 0
    assert value(b, "cellwatch_images_total", status="failed") == 1
    assert value(b, "cellwatch_last_success_timestamp_seconds") == 0


def test_queue_wait_counts_from_queueing_or_the_end_of_a_retry_delay(tmp_path: Path):
    clock = SimpleNamespace(now=1000.0)
    metrics = Metrics(clock=lambda: clock.now)
    with JobQueue(tmp_path / "jobs.sqlite3", clock=lambda: clock.now) as queue:
        queue.add([FileVersion("a.tif", 1, 1, "sha-a")])
        clock.now = 1030.0
        metrics.started(queue.claim(8))  # waited 30 s since queued
        queue.retry(queue.jobs(["running"])[0].job_id, "share went away", 60.0)
        clock.now = 1100.0
        metrics.started(queue.claim(8))  # due at 1090: waited 10 s, not 70 s
        metrics.queue(queue.counts())
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in metrics.registry.collect()
        for s in family.samples
    }
    assert value(samples, "cellwatch_queue_wait_seconds_count") == 2
    assert value(samples, "cellwatch_queue_wait_seconds_sum") == 40
    assert value(samples, "cellwatch_jobs_in_progress") == 1
    assert value(samples, "cellwatch_queue_depth") == 0


def test_stopwatch_stages_reach_the_histogram():
    metrics, watch = Metrics(), Stopwatch()
    metrics.use_model("nuclei@0123456789ab", watch)
    with watch("read"):
        pass
    watch.add("inference", 0.75)
    read = metrics.stage_seconds.labels(stage="read").collect()[0].samples
    count = {s.name: s.value for s in read}["cellwatch_stage_seconds_count"]
    inference = metrics.stage_seconds.labels(stage="inference").collect()[0].samples
    total = {s.name: s.value for s in inference}["cellwatch_stage_seconds_sum"]
    assert (count, total) == (1, 0.75)


PROMTOOL_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - {series: 'cellwatch_last_success_timestamp_seconds{instance="stuck"}', values: '0x120'}
      - {series: 'process_start_time_seconds{instance="stuck"}', values: '0x120'}
      - {series: 'cellwatch_queue_depth{instance="stuck"}', values: '5x120'}
      - {series: 'cellwatch_jobs_in_progress{instance="stuck"}', values: '0x120'}
      - {series: 'cellwatch_last_success_timestamp_seconds{instance="idle"}', values: '0x120'}
      - {series: 'process_start_time_seconds{instance="idle"}', values: '0x120'}
      - {series: 'cellwatch_queue_depth{instance="idle"}', values: '0x120'}
      - {series: 'cellwatch_jobs_in_progress{instance="idle"}', values: '0x120'}
    alert_rule_test:
      - {eval_time: 50m, alertname: CellwatchNoSuccessForAnHour, exp_alerts: []}
      - eval_time: 70m
        alertname: CellwatchNoSuccessForAnHour
        exp_alerts:
          - exp_labels: {severity: page, instance: stuck}
            exp_annotations:
              summary: "cellwatch on stuck has counted nothing for an hour while images wait"
              description: "See `cellwatch status` and `journalctl -u cellwatch` on that machine."
  - interval: 1m
    input_series:
      - {series: 'cellwatch_images_total{instance="bad",status="ok"}', values: '0+4x120'}
      - {series: 'cellwatch_images_total{instance="bad",status="failed"}', values: '0+1x120'}
      - {series: 'cellwatch_images_total{instance="good",status="ok"}', values: '0+19x120'}
      - {series: 'cellwatch_images_total{instance="good",status="failed"}', values: '0+1x120'}
    alert_rule_test:
      - eval_time: 90m
        alertname: CellwatchManyFailures
        exp_alerts:
          - exp_labels: {severity: ticket, instance: bad}
            exp_annotations:
              summary: "20% of the images on bad failed in the last hour"
              description: "The ledger's error column says why; `cellwatch status` shows the last error."
"""


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool (Prometheus's rule checker) is not installed; apt-get install prometheus",
)
def test_documented_alert_rules_fire_when_they_should(tmp_path: Path):
    """The two alert rules in docs/daemon.md, as written there, through ``promtool test
    rules``: no success for an hour fires only while images wait (and not in the first
    hour after a start); failures fire at 20 % and stay quiet at 5 %."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "daemon.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    rules = [b for b in blocks if b.startswith("groups:")]
    scrape = [b for b in blocks if b.startswith("scrape_configs:")]
    assert len(rules) == len(scrape) == 1, "docs/daemon.md should show one rules file"
    (tmp_path / "rules.yml").write_text(rules[0])
    (tmp_path / "prometheus.yml").write_text(scrape[0] + "rule_files: [rules.yml]\n")
    (tmp_path / "tests.yml").write_text(PROMTOOL_TESTS)
    for argv in (["check", "config", "prometheus.yml"], ["test", "rules", "tests.yml"]):
        run = subprocess.run(
            ["promtool", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stdout + run.stderr


def test_serve_on_a_taken_port_names_the_port_and_what_to_do():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CellwatchError, match=rf"127\.0\.0\.1:{port}: .*metrics\.port"):
            serve(Metrics(), "127.0.0.1", port)
