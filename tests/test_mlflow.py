"""log.mlflow (issue 43), against a real `mlflow server` this module starts on localhost: params,
step and epoch metrics, the report as artifacts, one MLflow run across a kill and a resume; a
local store; a store that cannot be reached or the extra missing, as one line before any run
directory. The server starts once, in the background, while the first tests run."""

from __future__ import annotations

import csv
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from conftest import block_import, die_after_mid_epoch_checkpoint, tb_scalars, tiny_config, write_yaml
from vggtrain.cli import main
from vggtrain.synthetic import write_synthetic_cifar10
from vggtrain.tracking import LOCAL_DB, MLFLOW_EXTRA, flat_params

NO_EXTRA = "the mlflow extra is not installed: pip install 'vggtrain[mlflow]'"
EPOCHS, STEPS = 3, 4  # steps per epoch: 160 training images in batches of 40
SERVER_START_S = 300  # a cold start on two busy cores has taken about a minute


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def server_process(tmp_path_factory):
    """`mlflow server` on a free port, its store and artifacts in a temporary directory, started
    before the module's first test (it takes a while) and stopped after its last."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        yield None
        return
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
         "--artifacts-destination", str(root / "art")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}", root / "server.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own group: the server and its workers
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(server_process) -> str:
    """The server's URI, once it answers."""
    if server_process is None:
        pytest.skip(NO_EXTRA)
    proc, uri, log = server_process
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return uri
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer in {SERVER_START_S} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlflow_data")
    write_synthetic_cifar10(root, "bin", per_batch=40, test_size=80, seed=1)
    return root


def config(data: Path, tmp_path: Path, store: object, **train) -> Path:
    train = {"epochs": EPOCHS, "batch_size": 40, "eval_batch_size": 80, "log_every": 2, **train}
    raw = tiny_config(data, tmp_path / "runs", data={"val_size": 40}, train=train, log={"mlflow": store})
    return write_yaml(tmp_path / "tiny.yaml", raw)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(c, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


def csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_tracked(c, run: Path, started_with: dict[str, str] | None = None) -> str:
    """The MLflow run that status.json and last.pt name holds run's params (config.yaml's, or
    started_with's values where a resume changed them), its step losses at TensorBoard's steps,
    metrics.csv's rows (one point per epoch) and the report's metrics."""
    run_id = json.loads((run / "status.json").read_text())["mlflow_run_id"]
    assert torch.load(run / "last.pt", weights_only=True)["tracking"]["mlflow_run_id"] == run_id
    logged = c.get_run(run_id)
    assert logged.info.status == "FINISHED"
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert logged.data.params == {**flat_params(stored), **(started_with or {})}
    assert logged.data.params["optim.lr"] == "0.05"
    assert logged.data.params["model.layers"] == '[8, "M", 16, "M", 16, "M"]'
    steps = list(range(1, EPOCHS * STEPS + 1))
    assert [s for s, _ in history(c, run_id, "train/loss_step")] == steps  # one point per step
    assert [s for s, _ in tb_scalars(run)["train/loss_step"]] == steps
    rows = csv_rows(run)
    for key in ("train/epoch", "train/loss", "train/acc", "train/lr", "train/images_per_s", "val/loss",
                "val/acc"):
        assert history(c, run_id, key) == [(int(r["step"]), float(r[key])) for r in rows], key
    report = json.loads((run / "report.json").read_text())
    assert history(c, run_id, "test/acc") == [(EPOCHS * STEPS, report["metrics"]["top1"])]
    return run_id


def test_the_missing_extra_is_one_line_before_any_run_directory(data, tmp_path, monkeypatch, capsys):
    block_import(monkeypatch, "mlflow")
    assert main(["fit", "--config", str(config(data, tmp_path, "mlruns"))]) == 2
    assert capsys.readouterr().err == f"vggtrain: {MLFLOW_EXTRA}\n"
    assert not (tmp_path / "runs").exists()


class Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(403)
        self.end_headers()
        self.wfile.write(b"forbidden")

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("kind", ["nothing listening", "403"])
def test_a_server_that_does_not_answer_stops_the_run_at_once(kind, data, tmp_path, capsys):
    pytest.importorskip("mlflow", reason=NO_EXTRA)
    refusing = None
    if kind == "403":
        refusing = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
        threading.Thread(target=refusing.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{refusing.server_address[1] if refusing else free_port()}"
    try:
        start = time.monotonic()
        assert main(["fit", "--config", str(config(data, tmp_path, uri))]) == 2
        took = time.monotonic() - start
    finally:
        if refusing:
            refusing.shutdown()
            refusing.server_close()
    err = capsys.readouterr().err
    assert err.startswith(f"vggtrain: log.mlflow: {uri}: cannot use the MLflow tracking store (")
    assert err.count("\n") == 1 and ("403" in err if refusing else "refused" in err.lower()), err
    assert not (tmp_path / "runs").exists()
    assert took < 90  # MLflow's default retries would take minutes: the check tries once


def test_true_is_a_local_store_in_the_current_directory(data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason=NO_EXTRA)
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(config(data, tmp_path, True))]) == 0
    store = tmp_path / "mlruns"
    run_id = assert_tracked(client(f"sqlite:///{store / LOCAL_DB}"), tmp_path / "runs" / "tiny")
    assert {p.name for p in (store / "artifacts" / run_id / "artifacts").iterdir()} >= {
        "config.yaml", "metrics.csv", "report.json", "report.md"}


def test_a_run_on_a_server_logs_params_metrics_and_the_report(server, data, tmp_path):
    assert main(["fit", "--config", str(config(data, tmp_path, server))]) == 0
    run = tmp_path / "runs" / "tiny"
    c = client(server)
    run_id = assert_tracked(c, run)
    names = {a.path for a in c.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.csv", "report.json", "report.md", "curves.png"} <= names
    fetched = Path(c.download_artifacts(run_id, "report.json", str(tmp_path)))
    assert fetched.read_bytes() == (run / "report.json").read_bytes()
    assert c.get_run(run_id).data.tags["vggtrain.run_dir"] == str(run.absolute())


def test_a_killed_run_resumed_goes_on_in_the_same_mlflow_run(server, data, tmp_path, monkeypatch):
    """Killed after the mid-epoch checkpoint at step 6 (epoch 2): the killed process still logged
    steps 7 and 8, and epoch 2's scalars were held, never sent (its checkpoint did not land). The
    resume redoes steps 7-8 (not sent again: one point per step) and epoch 2, whose scalars it
    sends: one point per epoch, metrics.csv's. The resume's change of a resumable key is a tag
    (a param cannot change)."""
    cfg = config(data, tmp_path, server, checkpoint_every_steps=6)
    die_after_mid_epoch_checkpoint(monkeypatch)
    assert main(["fit", "--config", str(cfg)]) == 130
    run = tmp_path / "runs" / "tiny"
    killed_id = torch.load(run / "last.pt", weights_only=True)["tracking"]["mlflow_run_id"]
    c = client(server)
    killed = c.get_run(killed_id)
    assert killed.info.status == "KILLED"
    assert [s for s, _ in history(c, killed_id, "train/loss_step")] == list(range(1, 2 * STEPS + 1))
    assert [s for s, _ in history(c, killed_id, "train/epoch")] == [STEPS]  # epoch 1's only
    monkeypatch.undo()
    assert main(["fit", "--resume", str(run), "--set", "train.eval_batch_size=40"]) == 0
    assert assert_tracked(c, run, started_with={"train.eval_batch_size": "80"}) == killed_id
    assert c.get_run(killed_id).data.tags["resumed.train.eval_batch_size"] == "40"


def test_a_store_that_fails_mid_run_costs_a_warning_not_the_run(server, data, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    real = MlflowClient.log_batch

    def metrics_refused(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            raise ConnectionError("the server went away")
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", metrics_refused)
    assert main(["fit", "--config", str(config(data, tmp_path, server))]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: MLflow")]
    assert len(warnings) == 2, warnings  # the first failure, then how many points were lost
    assert "the server went away; training goes on" in warnings[0] and "not logged" in warnings[1]
    run = tmp_path / "runs" / "tiny"
    assert (run / "report.json").is_file()
    run_id = json.loads((run / "status.json").read_text())["mlflow_run_id"]
    c = client(server)
    assert c.get_run(run_id).info.status == "FINISHED"  # the artifacts and the end still went through
    assert "report.json" in {a.path for a in c.list_artifacts(run_id)}


def test_under_torchrun_rank_0_alone_logs(server, data, tmp_path):
    """Two ranks of 20 images a batch: the same 4 global steps an epoch, one MLflow run, one point
    per step (the ranks' mean loss, as TensorBoard's)."""
    cfg = config(data, tmp_path, server, batch_size=20)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "vggtrain", "fit", "--config", str(cfg)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    c = client(server)
    run_id = assert_tracked(c, run)
    experiment = c.get_run(run_id).info.experiment_id
    same_dir = c.search_runs([experiment], f"tags.`vggtrain.run_dir` = '{run.absolute()}'")
    assert [r.info.run_id for r in same_dir] == [run_id]


def test_a_stopped_run_waits_briefly_for_a_store_that_hangs(monkeypatch, capsys):
    """After Ctrl-C or a signal the end of the run waits STOPPED_WAIT_S for a hung store, not the
    whole FINISH_WAIT_S a finished run allows; either way it says it gave up."""
    pytest.importorskip("mlflow", reason=NO_EXTRA)
    from vggtrain import tracking

    release = threading.Event()

    class HungStore:
        def log_batch(self, *args, **kwargs):
            release.wait(60)

        def log_artifact(self, *args, **kwargs):
            pass

        def set_terminated(self, *args, **kwargs):
            pass

    monkeypatch.setattr(tracking, "FINISH_WAIT_S", 4.0)
    monkeypatch.setattr(tracking, "STOPPED_WAIT_S", 1.0)
    waited = {}
    try:
        for state in ("stopped", "finished"):
            tracker = tracking.Tracker(HungStore(), "r1", "http://127.0.0.1:9", {})
            tracker.log_metric("train/loss_step", 1.0, 1)
            t0 = time.perf_counter()
            tracker.finish(state, [])
            waited[state] = time.perf_counter() - t0
    finally:
        release.set()
    assert 1.0 <= waited["stopped"] < 3.0 <= waited["finished"], waited
    err = capsys.readouterr().err
    assert "still sending after 1 s; gave up" in err and "still sending after 4 s; gave up" in err


def test_a_second_ctrl_c_while_waiting_for_the_store_keeps_the_stop_and_its_resume_hint(
        data, tmp_path, monkeypatch, capsys):
    """A Ctrl-C during the end-of-run wait ends the wait; the run's own stop (exit code, resume hint)
    is still what the user sees, not a bare 'interrupted'."""
    from vggtrain import fit as fit_module
    from vggtrain import tracking
    from vggtrain.errors import RunStopped

    def stopped(run, rd, *args, **kwargs):
        raise RunStopped(f"stopped by SIGINT at epoch 1: vggtrain fit --resume {rd.path}", 130)

    def impatient(self, state, artifacts):
        assert state == "stopped"
        raise KeyboardInterrupt  # the second Ctrl-C, while finish waits

    monkeypatch.setattr(fit_module, "train_and_report", stopped)
    monkeypatch.setattr(tracking.NullTracker, "finish", impatient)
    assert main(["fit", "--config", str(config(data, tmp_path, None))]) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT at epoch 1: vggtrain fit --resume" in err and "interrupted" not in err
