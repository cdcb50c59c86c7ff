"""log.mlflow: a run's params, metrics and report in MLflow, besides its own directory.

Rank 0 alone logs. `connect` runs before the run directory is made: a missing extra, a store it
cannot open or a server that does not answer stop the run there, in one line. `Connection.start`
creates the MLflow run (or continues the one the checkpoint names), `TrackedWriter` sends every
scalar the TensorBoard writer is given, at its step, and `Tracker.finish` uploads the report and
the config and ends the MLflow run. The run directory stays the source of truth: a tracking store
that fails mid-run costs a warning, never the training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from vggtrain import __version__
from vggtrain.errors import UserError, first_line, os_reason, shown

MLFLOW_EXTRA = "log.mlflow needs mlflow: pip install 'vggtrain[mlflow]'"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"  # MLflow's own variable for it
DEFAULT_EXPERIMENT = "vggtrain"
LOCAL_DB, LOCAL_ARTIFACTS = "mlflow.db", "artifacts"  # a local store: one SQLite file, one directory
CHECK_TIMEOUT_S = 5  # the up-front check's request: one try, this long
SEND_EVERY_S = 2.0  # the sender thread's batching period
FINISH_WAIT_S = 120.0  # how long the end of a run waits for the last metrics and the artifacts
STOPPED_WAIT_S = 10.0  # the same after Ctrl-C or a signal: whoever stopped the run wants it gone
BATCH_LIMIT = 1000  # MLflow's limit on metrics per log_batch call
PARAMS_LIMIT = 100  # and on params (and tags) per call
ENDED = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


def require_mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise UserError(MLFLOW_EXTRA) from None
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines (creating a store's tables)
    return mlflow


def tracking_uri(value: str) -> tuple[str, Path | None]:
    """(MLflow's tracking URI, the local store's directory or None) for log.mlflow's value: a
    path or a file: URI is a local store in that directory (a relative path is taken from the
    current directory, as train.out_dir is), an SQLite database and its artifacts beside it
    (MLflow 3 keeps its plain-file store for old data only); any other URI (http, https, or
    one of MLflow's databases) is MLflow's to open."""
    parsed = urlparse(value)
    if len(parsed.scheme) > 1 and parsed.scheme != "file":  # one letter: a Windows drive
        return value, None
    root = Path(url2pathname(parsed.path) if parsed.scheme == "file" else value).expanduser().absolute()
    return f"sqlite:///{root / LOCAL_DB}", root


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


@contextlib.contextmanager
def quick_requests() -> Iterator[None]:
    """MLflow's HTTP requests with no retries and a short timeout (MLflow's defaults retry for
    minutes), unless the user set their own: the up-front check answers in seconds."""
    chosen = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CHECK_TIMEOUT_S)}
    chosen = {k: v for k, v in chosen.items() if k not in os.environ}
    os.environ.update(chosen)
    try:
        yield
    finally:
        for key in chosen:
            os.environ.pop(key, None)


def connect(value: str | None) -> Connection | None:
    """The tracking store of log.mlflow's value, checked (None where it is null): the experiment
    found or created. A missing extra, a local store that cannot be made, a server that does not
    answer or refuses: a UserError (exit 2) before the run directory exists."""
    if value is None:
        return None
    require_mlflow()
    from mlflow import MlflowClient

    uri, root = tracking_uri(value)
    where = f"log.mlflow: {value}" + (f" ({uri})" if uri != value else "")
    if root is not None:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{where}: cannot create the local store ({os_reason(e)})") from None
    name = experiment_name()
    try:
        with quick_requests(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SQLAlchemy's deprecation notes, from MLflow's store
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                artifacts = (root / LOCAL_ARTIFACTS).as_uri() if root is not None else None
                experiment_id = client.create_experiment(name, artifact_location=artifacts)
            elif experiment.lifecycle_stage != "active":
                raise UserError(f"{where}: the experiment {name!r} is deleted; restore it, or set "
                                f"{EXPERIMENT_ENV} to another name")
            else:
                experiment_id = experiment.experiment_id
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow's, requests' and SQLAlchemy's errors alike
        raise UserError(f"{where}: cannot use the MLflow tracking store ({reason(e)})") from None
    return Connection(client, uri, experiment_id)


def reason(e: BaseException) -> str:
    """An MLflow error in a few words: its first line, without the retry adapter's preamble."""
    text = first_line(e, 400)
    for marker in ("Caused by ", "Failed to establish a new connection: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.strip(" ()'\"")[:200]


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: dotted keys, each value as text (a string as it is, anything
    else as JSON: true, null, [64, "M"])."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, str) else json.dumps(value)
    return flat


def warn(message: str) -> None:
    print(shown(f"warning: MLflow: {message}"), file=sys.stderr, flush=True)


class Connection:
    """A checked tracking store and the experiment the runs go to."""

    def __init__(self, client: Any, uri: str, experiment_id: str) -> None:
        self.client, self.uri, self.experiment_id = client, uri, experiment_id

    def start(self, run: Any, rows: list[dict[str, str]]) -> Tracker | NullTracker:
        """The MLflow run of a vggtrain run (run.Run): the one its checkpoint names (run.tracking)
        where this store has it, else a new one with the config as params; run.tracking then
        names it, for the checkpoints. rows: metrics.csv's rows of the epochs done, sent where
        the MLflow run lacks them (a new MLflow run of a resumed vggtrain run, or epochs whose
        metrics a killed run never sent). A store that fails here: a warning, and no tracking."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mlflow_run, last_steps = self._continued(run), {}
                if mlflow_run is None:
                    mlflow_run = self._created(run)
                else:
                    last_steps = self._resumed(mlflow_run, run)
        except Exception as e:  # noqa: BLE001 - MLflow's, requests' and SQLAlchemy's errors alike
            warn(f"{self.uri}: cannot start the run ({reason(e)}); training goes on untracked, the "
                 f"run directory keeps every metric")
            return NullTracker()
        run_id = mlflow_run.info.run_id
        run.tracking = {"mlflow_run_id": run_id, "tracking_uri": self.uri}
        tracker = Tracker(self.client, run_id, self.uri, last_steps)
        for row in rows:  # metrics.csv is the user's file too: a cell that is no number is skipped
            try:
                step = int(row["step"])
                points = [(key, float(value)) for key, value in row.items() if key != "step"]
            except (KeyError, TypeError, ValueError):
                continue
            for key, value in points:
                tracker.log_metric(key, value, step)
        return tracker

    def _continued(self, run: Any) -> Any:
        """The MLflow run the checkpoint names, if this store holds it (not deleted); else None."""
        before = run.tracking
        if not isinstance(before, dict) or not isinstance(before.get("mlflow_run_id"), str):
            return None
        if before.get("tracking_uri") != self.uri:
            print(shown(f"MLflow: the run was tracked at {before.get('tracking_uri')}; it goes on in a "
                        f"new MLflow run at {self.uri}"), flush=True)
            return None
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_run(before["mlflow_run_id"])
        except MlflowException:
            found = None
        if found is None or found.info.lifecycle_stage != "active":
            print(shown(f"MLflow: run {before['mlflow_run_id']} is not in {self.uri} (deleted?); the run "
                        f"goes on in a new MLflow run"), flush=True)
            return None
        return found

    def _created(self, run: Any) -> Any:
        from mlflow.entities import Param

        tags = {"vggtrain.run_dir": str(Path(run.dir).absolute()), "vggtrain.version": __version__}
        created = self.client.create_run(self.experiment_id, run_name=run.cfg.name, tags=tags)
        params = [Param(k, v) for k, v in flat_params(run.cfg.to_dict()).items()]
        self._log_params(created.info.run_id, params, [])
        return created

    def _resumed(self, found: Any, run: Any) -> dict[str, int]:
        """Continue found: RUNNING again, the params a resume changed (train.epochs...) as tags
        resumed.KEY (a param cannot change), a new key as a param. Returns each metric's last step."""
        from mlflow.entities import Param, RunTag

        run_id, logged = found.info.run_id, found.data.params
        now = flat_params(run.cfg.to_dict())
        self.client.update_run(run_id, status="RUNNING")
        new = [Param(k, v) for k, v in now.items() if k not in logged]
        changed = [RunTag(f"resumed.{k}", v) for k, v in now.items() if k in logged and logged[k] != v]
        self._log_params(run_id, new, changed)
        return {key: max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
                for key in found.data.metrics}

    def _log_params(self, run_id: str, params: list[Any], tags: list[Any]) -> None:
        """params and tags in as few log_batch calls as MLflow's PARAMS_LIMIT allows."""
        for i in range(0, max(len(params), len(tags)), PARAMS_LIMIT):
            self.client.log_batch(run_id, params=params[i:i + PARAMS_LIMIT], tags=tags[i:i + PARAMS_LIMIT])


class NullTracker:
    """No tracking: every call does nothing."""

    def log_metric(self, key: str, value: float, step: int) -> None:
        pass

    def hold(self, scalars: dict[str, float], step: int) -> None:
        pass

    def released(self, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, state: str, artifacts: list[Path]) -> None:
        pass


class Tracker:
    """One MLflow run's metrics, sent by a thread in batches (a store's latency never holds up a
    training step), then its artifacts and its end.

    After a kill, a resume redoes the steps after its checkpoint, which MLflow may already hold
    (it cannot delete a point; TensorBoard purges them). So an epoch's scalars are held until the
    checkpoint that holds the epoch is on disk (hold, released): MLflow's epochs are metrics.csv's
    rows, the redone epoch's; and a step metric at a step the MLflow run already has for its key
    is not sent again: one point per step, the first run's.

    Hand-written rather than MLflow's own asynchronous logging, whose failures surface as its log
    lines and whose flush waits out every retry: here a failure is one warning line and the end of
    the run waits FINISH_WAIT_S at most (STOPPED_WAIT_S after a stop)."""

    def __init__(self, client: Any, run_id: str, uri: str, last_steps: dict[str, int]) -> None:
        from mlflow.entities import Metric

        self._metric_class = Metric  # imported once: _metric runs for every step's points
        self.client, self.run_id, self.uri = client, run_id, uri
        self._last = dict(last_steps)
        self._pending: list[Any] = []
        self._held: list[Any] = []  # epoch scalars whose checkpoint is not on disk yet
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ending: tuple[str, list[Path]] | None = None
        self.lost = 0  # metric points the store refused
        self._warned = False
        self._thread = threading.Thread(target=self._send_loop, name="vggtrain-mlflow", daemon=True)
        self._thread.start()

    def log_metric(self, key: str, value: float, step: int) -> None:
        """Send (key, value) at step soon."""
        metric = self._metric(key, value, step)
        if metric is not None:
            with self._lock:
                self._pending.append(metric)

    def hold(self, scalars: dict[str, float], step: int) -> None:
        """An epoch's scalars, sent once its checkpoint is on disk (released)."""
        metrics = [m for m in (self._metric(k, v, step) for k, v in scalars.items()) if m is not None]
        with self._lock:
            self._held += metrics

    def released(self, step: int) -> None:
        """The checkpoint at step is on disk (called on the checkpoint writer's thread)."""
        with self._lock:
            self._pending += [m for m in self._held if m.step <= step]
            self._held = [m for m in self._held if m.step > step]
        self._wake.set()

    def _metric(self, key: str, value: float, step: int) -> Any:
        if step <= self._last.get(key, -1):
            return None
        self._last[key] = step
        return self._metric_class(key, float(value), int(time.time() * 1000), int(step))

    def flush(self) -> None:
        self._wake.set()

    def finish(self, state: str, artifacts: list[Path]) -> None:
        """Send what is pending, upload the artifacts that exist, end the MLflow run as
        ENDED[state] (finished, stopped or failed): at most FINISH_WAIT_S, STOPPED_WAIT_S when
        stopped. Scalars still held are dropped: their checkpoint never landed, and the resume
        redoes their epoch. A second Ctrl-C while waiting ends the wait (the join is interrupted)."""
        self._ending = (state, artifacts)
        self._wake.set()
        wait_s = STOPPED_WAIT_S if state == "stopped" else FINISH_WAIT_S
        self._thread.join(wait_s)
        if self._thread.is_alive():
            warn(f"{self.uri}: still sending after {wait_s:.0f} s; gave up (the run directory "
                 f"keeps every metric)")
        elif self.lost:
            warn(f"{self.lost} metric point(s) were not logged to run {self.run_id}")

    def _send_loop(self) -> None:
        while True:
            self._wake.wait(SEND_EVERY_S)
            self._wake.clear()
            ending = self._ending  # read before the batch: nothing logged before finish() is left
            with self._lock:
                batch, self._pending = self._pending, []
            for i in range(0, len(batch), BATCH_LIMIT):
                if not self._call(self.client.log_batch, self.run_id, metrics=batch[i:i + BATCH_LIMIT]):
                    self.lost += len(batch[i:i + BATCH_LIMIT])
            if ending is not None:
                state, artifacts = ending
                for path in artifacts:
                    if path.is_file():
                        self._call(self.client.log_artifact, self.run_id, str(path))
                self._call(self.client.set_terminated, self.run_id, ENDED[state])
                return

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> bool:
        """method(*args, **kwargs); False when it failed (the first failure warned, once)."""
        try:
            method(*args, **kwargs)
            return True
        except Exception as e:  # noqa: BLE001 - any failure of the store: the run goes on
            if not self._warned:
                self._warned = True
                warn(f"{self.uri}: {reason(e)}; training goes on, the run directory keeps every "
                     f"metric (metrics.csv, tb/, report.json)")
            return False


class TrackedWriter:
    """A SummaryWriter whose scalars also go to the tracker, at the same steps (the test report's,
    written by report.log_report)."""

    def __init__(self, writer: Any, tracker: Tracker | NullTracker) -> None:
        self._writer, self._tracker = writer, tracker

    def add_scalar(self, tag: str, value: float, global_step: int | None = None, *args: Any,
                   **kwargs: Any) -> None:
        self._writer.add_scalar(tag, value, global_step, *args, **kwargs)
        if global_step is not None:
            self._tracker.log_metric(tag, float(value), int(global_step))

    def flush(self) -> None:
        self._writer.flush()
        self._tracker.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)
