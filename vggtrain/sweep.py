"""`vggtrain sweep` (an Optuna study: each trial a normal `fit`) and `vggtrain seeds` (one config
over several seeds, with median and spread).

Optuna keeps the study: its RDB storage (SQLite by default, any SQLAlchemy URL such as
PostgreSQL to share one study across machines) is what lets several processes ask for trials
without duplicates and resume after a kill. Trials are chosen on the validation split only: fit
runs with test=False and reports validation accuracy to the pruner after every epoch; the test
set is measured once, for the best trial, when the study is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vggtrain.atomic import atomic_write_text
from vggtrain.config import TrainConfig, _show, load_config
from vggtrain.errors import ConfigError, RunStopped, UserError, first_line, os_reason, shown
from vggtrain.safeio import finite_number, open_regular, read_yaml

SWEEP_EXTRA = "vggtrain sweep needs optuna: pip install 'vggtrain[sweep]'"
SPACE_TYPES = ("float", "int", "categorical")
SPACE_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
MAX_CHOICES = 1000
FINISHED = ("COMPLETE", "PRUNED", "FAIL")
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
OPTUNA_TABLES = frozenset({"studies", "trials", "version_info", "alembic_version"})  # Optuna's own
LOCK_WAIT_S = 10.0  # another sweep's write lock lasts milliseconds; one held this long is not that


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError(SWEEP_EXTRA) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # vggtrain prints its own lines
    for handler in logging.getLogger("optuna").handlers:  # its warnings quote trial parameters
        if not any(isinstance(f, _ShownRecords) for f in handler.filters):
            handler.addFilter(_ShownRecords())
    return optuna


class _ShownRecords(logging.Filter):
    """A log record's message through errors.shown (a choice may hold an escape sequence)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = shown(record.getMessage()), None
        return True


# --- the search space -----------------------------------------------------------------------------

def load_space(path: str | Path, base: TrainConfig, config: str, overrides: list[str]) -> dict[str, Any]:
    """The space file as Optuna distributions, each key checked against the config: every
    bound and choice must make a config that validates."""
    optuna = require_optuna()
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    raw = read_yaml(path, error=ConfigError, label=f"--space {path}")  # bounded: a file of a few KB
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"--space {path}: expected a mapping of dotted config keys to distributions, "
                          f"e.g. optim.lr: {{type: float, low: 0.01, high: 0.2, log: true}}")
    space = {}
    for key, spec in raw.items():
        if not isinstance(key, str) or not SPACE_KEY_RE.match(key):
            raise ConfigError(f"--space {path}: {_show(key)} is not a dotted config key (e.g. optim.lr)")
        where = f"--space {path}: {key}"
        if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
            raise ConfigError(f"{where}: needs type: {' | '.join(SPACE_TYPES)}")
        kind, extra = spec["type"], set(spec) - {"type"}
        for bound in ("low", "high", "step"):  # YAML 1.1 reads 1e-4 (no dot) as a string
            if isinstance(spec.get(bound), str):
                try:
                    spec[bound] = float(spec[bound])
                except ValueError:
                    raise ConfigError(f"{where}: {bound} is not a number ({_show(spec[bound])})") from None
        # Each value checked for its type before anything walks it: an alias may stand for a
        # structure of billions of values (written out as JSON below, it would never end).
        for bound in ("low", "high", "step"):
            if bound in spec and not finite_number(spec[bound]):
                raise ConfigError(f"{where}: {bound} must be a finite number (got {_show(spec[bound])})")
        if "log" in spec and not isinstance(spec["log"], bool):
            raise ConfigError(f"{where}: log must be true or false (got {_show(spec['log'])})")
        if kind == "categorical" and isinstance(spec.get("choices"), list):
            choices = spec["choices"]
            if len(choices) > MAX_CHOICES or not all(_plain_choice(c) for c in choices):
                raise ConfigError(f"{where}: choices are at most {MAX_CHOICES} plain values (numbers, "
                                  f"strings of up to 200 characters, true, false, null)")
        try:
            if kind == "categorical":
                if extra != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
                    raise ValueError("a categorical takes choices: [a, b, ...] and nothing else")
                dist = CategoricalDistribution(spec["choices"])
                probes = list(spec["choices"])
            else:
                if not {"low", "high"} <= extra <= {"low", "high", "log", "step"}:
                    raise ValueError(f"a {kind} takes low, high and optionally log or step")
                cls = FloatDistribution if kind == "float" else IntDistribution
                args = {k: spec[k] for k in ("low", "high", "log", "step") if k in spec}
                if kind == "int" and not all(isinstance(spec[k], int) for k in ("low", "high")):
                    raise ValueError("an int's low and high are integers")
                dist = cls(**args)
                probes = [dist.low, dist.high]
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
        for value in probes:  # the key exists and its values validate, before any trial runs
            load_config(config, [*overrides, f"{key}={json.dumps(value)}"])
        space[str(key)] = dist
    del optuna
    return space


def _plain_choice(v: Any) -> bool:
    return v is None or isinstance(v, bool) or finite_number(v) or (isinstance(v, str) and len(v) <= 200)


# --- the sweep ------------------------------------------------------------------------------------

def make_pruner(optuna: Any, prune_from: int) -> Any:
    """Optuna's median rule: a trial whose best validation accuracy so far is below the median of
    the earlier trials' at the same epoch stops, once 4 trials have finished and from epoch
    prune_from (trials report their epochs as steps 1, 2, ...)."""
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=prune_from)


def default_prune_from(epochs: float) -> int:
    """Half the planned epochs. Optuna's default (prune from the first step) suits curves that keep
    their order; a schedule that anneals to the end (linear, cosine, one-cycle) ranks trials late:
    in the fast recipe's study the second-best trial sat below the others' median at every epoch
    before its last (docs/sweeps-and-seeds.md)."""
    return max(1, math.ceil(math.ceil(epochs) / 2))


def run_sweep(config: str, overrides: list[str], space_file: str, trials: int, study_name: str,
              storage: str | None, prune_from: int | None = None) -> dict[str, Any] | None:
    """Run trials until the study holds `trials` of them; returns the study report when the study
    is complete (None while other processes still run trials). prune_from: the first epoch at
    which a trial may be pruned (None: default_prune_from); the last epoch never is."""
    optuna = require_optuna()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UserError("usage error: vggtrain sweep runs its trials in one process, not under torchrun; "
                        "start one sweep per GPU instead (CUDA_VISIBLE_DEVICES=K vggtrain sweep ...)")
    base = load_config(config, overrides)
    if not base.data.val_size:
        raise ConfigError("a sweep chooses on the validation split: set data.val_size > 0 "
                          "(e.g. --set data.val_size=5000)")
    space = load_space(space_file, base, config, overrides)
    if prune_from is None:
        prune_from = default_prune_from(base.train.epochs)
    study_dir = (Path(base.train.out_dir) / study_name).resolve()  # stored per trial: any cwd finds it
    made = [d for d in (study_dir, *study_dir.parents) if not d.exists()]  # deepest first
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{study_dir}: cannot create it ({os_reason(e)})") from None
    url = storage or f"sqlite:///{study_dir / 'study.db'}"
    shown_url = _without_password(url)
    try:
        check_sqlite_storage(url, shown_url)
        study = _open_study(optuna, study_name, url, shown_url, prune_from)
    except UserError:
        for d in made:  # a study that never opened leaves no directories behind
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty: a database file written there stays
        raise
    print(shown(f"study {study_name} in {shown_url}: {trials} trials, trial runs in {study_dir}, pruning "
                f"from epoch {prune_from}"), flush=True)
    requeue_dead_trials(study, optuna)
    waiting = optuna.trial.TrialState.WAITING
    while True:
        with _ask_lock(study_dir):  # count and ask as one step, or two processes both take the last trial
            if not (counted_trials(study) < trials or study.get_trials(deepcopy=False, states=(waiting,))):
                break
            trial = study.ask(space)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("prune_from", prune_from)  # processes on one study may differ
        run_trial(study, trial, config, overrides, study_dir, optuna)
    return study_report(study, study_dir, base, optuna)


def _open_study(optuna: Any, study_name: str, url: str, shown_url: str, prune_from: int) -> Any:
    from sqlalchemy.exc import ArgumentError  # Optuna's RDB storage is SQLAlchemy

    for attempt in range(5):
        try:
            return optuna.create_study(study_name=study_name, storage=url, direction="maximize",
                                       load_if_exists=True, pruner=make_pruner(optuna, prune_from),
                                       # unseeded: processes sharing a study must not draw alike
                                       sampler=optuna.samplers.TPESampler())
        except Exception as e:  # a storage URL that does not connect: SQLAlchemy's many error types
            # Two processes creating one new database race to write its schema; the loser finds it
            # written on the next try. A URL that names no database (unparsable, an unknown
            # dialect, a driver not installed) fails alike every time: said at once.
            # A RuntimeError is Optuna's own word on a schema of another version: final too.
            if attempt == 4 or isinstance(e, (ArgumentError, ImportError, RuntimeError)):
                raise UserError(f"--storage {shown_url}: cannot open the study ({type(e).__name__}: "
                                f"{first_line(e)})") from None
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _ask_lock(study_dir: Path) -> Iterator[None]:
    """An exclusive flock on the study directory itself (as rundir.lock_run_dir locks run
    directories: no lock file left behind), shared by the sweeps of one machine. Processes on other
    machines (a shared RDB storage) are not covered: there --trials may be passed by one per extra
    process at the end; so too where directories cannot be flocked (Windows, some network file
    systems), where the count is best effort."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(study_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # unguarded, as above
        yield
    finally:
        os.close(fd)  # drops the lock


def check_sqlite_storage(url: str, shown_url: str) -> None:
    """Refuse, before SQLAlchemy opens it, an SQLite file that is not an Optuna study's: garbage,
    another program's database (Optuna would add its tables to it), a directory, a FIFO (SQLite
    would block reading it), a read-only file or one locked by another process for LOCK_WAIT_S.
    The file is only read here (a missing file is SQLite's to create); other URLs pass as they are."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: _open_study says so
        return
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return
    path, where = Path(parsed.database), f"--storage {shown_url}"
    if not path.exists():
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise UserError(f"{where}: {path.parent} is not a directory this process can write in")
        return
    with open_regular(path, UserError, where) as f:  # a directory, FIFO or device: refused here
        head, mode = f.read(len(SQLITE_MAGIC)), os.fstat(f.fileno()).st_mode
    if not os.access(path, os.R_OK | os.W_OK) or not mode & 0o222 or not os.access(path.parent, os.W_OK):
        raise UserError(f"{where}: read-only (a study writes every trial; its directory too, "
                        f"for SQLite's journal)")
    if not head:
        return  # an empty file: SQLite makes it a database, as it would a missing one
    if head != SQLITE_MAGIC:
        raise UserError(f"{where}: not an SQLite database (its first bytes say otherwise)")
    tables = _sqlite_tables(path, where)
    if tables and not tables & OPTUNA_TABLES:  # any one: another sweep may be writing the schema now
        listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise UserError(f"{where}: an SQLite database of something else (tables {listed}), not an "
                        f"Optuna study's; name another file")


def _sqlite_tables(path: Path, where: str) -> set[str]:
    """The tables of an SQLite file, read without writing it; an open write lock (BEGIN
    IMMEDIATE, rolled back: nothing written) shows that a study could write there."""
    import sqlite3
    from urllib.parse import quote

    try:
        con = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=rw", uri=True, timeout=LOCK_WAIT_S,
                              isolation_level=None)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            raise UserError(f"{where}: locked by another process for more than {LOCK_WAIT_S:g} s") from None
        raise UserError(f"{where}: cannot open it as SQLite ({first_line(e)})") from None
    except sqlite3.DatabaseError as e:  # "file is not a database", a damaged page
        raise UserError(f"{where}: not a readable SQLite database ({first_line(e)})") from None
    return tables


def _without_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url  # Optuna's RDB storage is SQLAlchemy

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: Optuna will say so
        return url


def counted_trials(study: Any) -> int:
    """Trials toward --trials: all of them but those closed only to be run again, and those queued
    (the next ask takes them)."""
    requeued = {k for k in study.user_attrs if k.startswith("requeued.")}
    return sum(f"requeued.{t.number}" not in requeued and t.state.name != "WAITING"
               for t in study.get_trials(deepcopy=False))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def requeue_dead_trials(study: Any, optuna: Any) -> None:
    """A trial still RUNNING whose process on this machine is gone was killed (Ctrl-C, SIGKILL):
    it is closed as failed and its parameters queued again with its directory, so the next ask
    continues it from its last.pt. Trials of other machines are theirs to requeue (only the
    machine that ran a process can tell it is gone). Two processes racing for one trial: Optuna
    lets only one tell succeed."""
    running = optuna.trial.TrialState.RUNNING
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(running,)):
        attrs = t.user_attrs
        if attrs.get("host") != host or not isinstance(attrs.get("pid"), int) or _alive(attrs["pid"]):
            continue
        study.set_user_attr(f"requeued.{t.number}", True)  # first: a counter never sees it as a result
        try:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        except Exception:  # noqa: BLE001 - another process closed it first, and requeues it
            continue
        run_dir = attrs.get("run_dir")
        study.enqueue_trial(t.params, user_attrs={"resume_from": run_dir} if run_dir else None)
        print(shown(f"trial {t.number} was cut short: queued again"
                    + (f", to resume from {run_dir}/last.pt" if run_dir else "")), flush=True)


def run_trial(study: Any, trial: Any, config: str, overrides: list[str], study_dir: Path, optuna: Any
              ) -> None:
    """One trial: a normal fit in <study_dir>/trial-<n>, validation accuracy reported after every
    epoch, pruned when the pruner says so; its result told to the study."""
    from vggtrain.fit import fit

    t0 = time.perf_counter()
    name = f"trial-{trial.number}"
    run_dir = study_dir / name
    params = dict(trial.params)
    try:
        cfg = load_config(config, [*overrides, *(f"{k}={json.dumps(v)}" for k, v in params.items()),
                                   f"name={name}", f"train.out_dir={json.dumps(str(study_dir))}"])
    except UserError as e:
        return _trial_failed(study, trial, optuna, e)
    resume = None
    earlier = trial.user_attrs.get("resume_from")
    if earlier and (Path(earlier) / "last.pt").is_file() and not run_dir.exists():
        os.replace(earlier, run_dir)  # the killed trial's directory becomes this one's
        resume = run_dir
    trial.set_user_attr("run_dir", str(run_dir))
    pruned = False

    def report_epoch(run: Any) -> bool:
        nonlocal pruned
        trial.report(run.best_acc, step=run.epoch)  # the best validation accuracy so far
        pruned = run.epoch < math.ceil(cfg.train.epochs) and trial.should_prune()  # a finished one is not
        return pruned

    print(shown(f"trial {trial.number}: {_params_text(params)}{' (resumed)' if resume else ''}"), flush=True)
    t_fit = time.perf_counter()
    try:
        result = fit(cfg, run_dir, resume=resume, force=resume is None, on_epoch_end=report_epoch,
                     test=False)
    except RunStopped as e:
        if e.exit_code != 1:  # Ctrl-C / SIGTERM: the trial stays running in the study, resumable
            raise
        return _trial_failed(study, trial, optuna, e)  # diverged: a result of these parameters
    except UserError as e:  # e.g. two values each valid alone but not together: the next trial
        if e.exit_code == 74:  # a full disk is the machine's, not the parameters'
            raise
        return _trial_failed(study, trial, optuna, e)
    except Exception:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)  # recorded; not retried forever
        raise
    fit_s = time.perf_counter() - t_fit
    assert result is not None
    trial.set_user_attr("epochs", result["epochs"])
    trial.set_user_attr("train_time_s", result["train_time_s"])
    trial.set_user_attr("fit_s", round(fit_s, 2))
    if pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, result["best_val_acc"])
    trial_s = time.perf_counter() - t0
    study.set_user_attr(f"overhead_s.{trial.number}", round(trial_s - fit_s, 3))
    print(f"trial {trial.number}: {'pruned' if pruned else 'complete'} after {result['epochs']} epochs, "
          f"best val {result['best_val_acc']:.2%} ({trial_s - fit_s:.2f} s outside fit)", flush=True)


def _trial_failed(study: Any, trial: Any, optuna: Any, e: Exception) -> None:
    """A trial these parameters made fail (a config they break, a diverged loss): told to the
    study as failed, and the sweep goes on."""
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    print(shown(f"trial {trial.number}: failed ({e})"), flush=True)


def study_report(study: Any, study_dir: Path, base: TrainConfig, optuna: Any) -> dict[str, Any] | None:
    """Once no trial runs any more: the best trial measured on the test set (the only time the
    test set is touched), and the study's facts; written to <study_dir>/report.{json,md}."""
    from vggtrain.eval import evaluate_checkpoint

    requeued = {k for k in study.user_attrs if k.startswith("requeued.")}
    all_trials = [t for t in study.get_trials(deepcopy=False) if f"requeued.{t.number}" not in requeued]
    if any(t.state.name in ("RUNNING", "WAITING") for t in all_trials):
        print("other processes are still running trials: the last to finish writes the study's report")
        return None
    done = [t for t in all_trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise UserError(f"study {study.study_name}: no trial completed, so there is no best trial")
    best = study.best_trial
    run_dir = Path(best.user_attrs["run_dir"])
    test = evaluate_checkpoint(run_dir / "best.pt", "test")["metrics"]
    planned = base.train.epochs
    epochs_run = sum(t.user_attrs.get("epochs", 0) for t in all_trials)
    overheads = [v for k, v in study.user_attrs.items() if k.startswith("overhead_s.")]
    report = {
        "schema": "vggtrain.sweep/1", "study": study.study_name, "direction": "maximize val accuracy",
        "trials": {s: sum(t.state.name == s for t in all_trials) for s in FINISHED},
        "best_trial": {"number": best.number, "params": best.params, "val_acc": best.value,
                       "run_dir": str(run_dir), "test_top1": test["top1"], "test_loss": test["loss"]},
        "epochs_run": epochs_run, "epochs_without_pruning": len(all_trials) * planned,
        "pruning_saved": 1 - epochs_run / (len(all_trials) * planned) if all_trials else 0.0,
        "train_time_s": sum(t.user_attrs.get("train_time_s", 0.0) for t in all_trials),
        "overhead_s_per_trial_max": max(overheads, default=None),
        "rows": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                  "epochs": t.user_attrs.get("epochs"), "prune_from": t.user_attrs.get("prune_from")}
                 for t in all_trials],
    }
    atomic_write_text(study_dir / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(study_dir / "report.md", format_study(report))
    print(shown(f"best trial {best.number}: val {best.value:.2%}, test {test['top1']:.2%} (measured once, "
                f"now); {epochs_run:g} of {len(all_trials) * planned:g} trial-epochs run "
                f"({report['pruning_saved']:.0%} saved by pruning); report in {study_dir / 'report.md'}"))
    return report


def _params_text(params: dict[str, Any]) -> str:
    """k=v, ...: a categorical's choices come from the space file, and go to the terminal escaped."""
    return shown(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()))


def format_study(r: dict[str, Any]) -> str:
    b = r["best_trial"]
    lines = [f"# Study {r['study']}", "",
             f"Best trial {b['number']}: validation accuracy {b['val_acc']:.2%}; its best.pt on the test "
             f"set: **{b['test_top1']:.2%}** (the only test measurement of the study).", "",
             "| | |", "|---|---|",
             *(f"| {k} | {v} |" for k, v in b["params"].items()),
             f"| trials | {', '.join(f'{n} {s.lower()}' for s, n in r['trials'].items())} |",
             f"| trial-epochs | {r['epochs_run']:g} run of {r['epochs_without_pruning']:g} without pruning "
             f"({r['pruning_saved']:.0%} saved) |",
             "", "| trial | state | val acc | epochs | prunable from epoch | params |",
             "|--:|---|--:|--:|--:|---|"]
    for row in r["rows"]:
        val = "-" if row["value"] is None else f"{row['value']:.2%}"
        lines.append(f"| {row['number']} | {row['state'].lower()} | {val} | {row['epochs'] or '-'} | "
                     f"{row.get('prune_from') or '-'} | {_params_text(row['params'])} |")
    return "\n".join(lines) + "\n"


# --- seeds ----------------------------------------------------------------------------------------

def run_seeds(config: str, overrides: list[str], seeds: int, first_seed: int = 0,
              target: float | None = None) -> dict[str, Any]:
    """The config over seeds first_seed .. first_seed + seeds - 1, each a normal fit in
    <out_dir>/<name>-seeds/seed-<k>; finished seeds are kept (a rerun completes the set).

    target: also measure the test accuracy after every epoch (a probe outside the training time,
    choosing nothing) and record the training time at which it first reached target."""
    from vggtrain.data import load_dataset
    from vggtrain.fit import fit

    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UserError("usage error: vggtrain seeds runs in one process, not under torchrun")
    base = load_config(config, overrides)
    out = Path(base.train.out_dir) / f"{base.name}-seeds"
    test = load_dataset(base.data)[1] if target is not None else None
    rows = []
    for seed in range(first_seed, first_seed + seeds):
        run_dir = out / f"seed-{seed}"
        report_file, reached_file = run_dir / "report.json", run_dir / "time_to_target.json"
        cfg = load_config(config, [*overrides, f"seed={seed}", f"name=seed-{seed}",
                                   f"train.out_dir={json.dumps(str(out))}"])
        if os.path.lexists(report_file):  # reused only if it ran this very config
            if not _ran(_seed_report(report_file), cfg, report_file):
                raise UserError(f"{run_dir} was trained with another config; move it away (or pick "
                                f"another name) to run these seeds")
        else:
            reached: dict[str, Any] = {"target": target, "train_time_s": None, "epoch": None}
            probe = _target_probe(test, target, reached) if test is not None else None
            fit(cfg, run_dir, force=True, on_epoch_end=probe)
            if target is not None:
                atomic_write_text(reached_file, json.dumps(reached) + "\n")
        r = _seed_report(report_file)
        ttt = _time_to_target(reached_file) if os.path.lexists(reached_file) else {}
        rows.append({"seed": seed, "test_top1": r["top1"], "val_acc": r["val_acc"],
                     "test_ece": r["ece"], "test_ece_calibrated": r["ece_calibrated"],
                     "train_time_s": r["train_time_s"], "corruption_acc": r["corruption_acc"],
                     "time_to_target_s": ttt.get("train_time_s") if ttt.get("target") == target else None,
                     "run_dir": str(run_dir)})
    summary = {"schema": "vggtrain.seeds/1", "config": config, "overrides": overrides, "target": target,
               "runs": rows, "test_top1": describe([r["test_top1"] for r in rows]),
               # calibration (reports before it have none; calibrated: runs with a validation split)
               **{key: describe([r[key] for r in rows if r[key] is not None])
                  for key in ("test_ece", "test_ece_calibrated")},
               "train_time_s": describe([r["train_time_s"] for r in rows if r["train_time_s"] is not None]),
               "time_to_target_s": describe([r["time_to_target_s"] for r in rows
                                             if r["time_to_target_s"] is not None])}
    corrupted = [r["corruption_acc"] for r in rows if r["corruption_acc"] is not None]
    if corrupted:  # the seeds measured with `eval --corruptions --out <seed dir>`
        summary["corruption_acc"] = describe(corrupted)
    atomic_write_text(out / "seeds.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _seed_error(run_dir: Path) -> Any:
    return lambda message: UserError(f"{message}; move {run_dir} away to run this seed again")


def _ran(report: dict[str, Any], cfg: TrainConfig, path: Path) -> bool:
    """Whether a finished seed ran cfg: its stored config, as resume compares it
    (config.comparable), has cfg's digest; a report without its config, by the digest it recorded."""
    from vggtrain.config import comparable, digest_of
    from vggtrain.report import config_digest

    if report["config"] is None:
        return report["config_digest"] == config_digest(cfg)
    stored, cfg = comparable(report["config"], cfg, str(path))
    return stored is not None and digest_of(stored) == config_digest(cfg)  # unreadable: not cfg


def _seed_report(path: Path) -> dict[str, Any]:
    """What seeds takes from a seed's report.json, each field typed: the file may be damaged, or
    another program's."""
    from vggtrain.safeio import REPORT_LIMIT, field, read_json

    error = _seed_error(path.parent)
    data = read_json(path, REPORT_LIMIT, error)
    return {"config_digest": field(data, "config_digest", "string", error, path),
            "config": field(data, "config", "mapping|null", error, path),
            "top1": field(data, "metrics.top1", "fraction", error, path),
            "val_acc": field(data, "val_acc", "fraction|null", error, path),
            "ece": field(data, "calibration.ece", "fraction|null", error, path),
            "ece_calibrated": field(data, "calibration.calibrated.ece", "fraction|null", error, path),
            "train_time_s": field(data, "train_time_s", "number|null", error, path),
            "corruption_acc": field(data, "corruptions.mean_acc", "fraction|null", error, path)}


def _time_to_target(path: Path) -> dict[str, Any]:
    from vggtrain.safeio import field, read_json

    error = _seed_error(path.parent)
    data = read_json(path, error=error)
    return {"target": field(data, "target", "number|null", error, path),
            "train_time_s": field(data, "train_time_s", "number|null", error, path)}


def _target_probe(test: Any, target: float, reached: dict[str, Any]) -> Any:
    """An epoch hook: the first epoch (and training time) at which the test accuracy reached
    target, measured with the run's evaluation settings and weights (the EMA's where kept)."""
    from vggtrain.evaluate import eval_settings, evaluate_split

    def probe(run: Any) -> bool:
        if reached["epoch"] is None:
            ev = evaluate_split(run.measured, test.to(run.device), eval_settings(run.cfg, run.device))
            if ev.top1 >= target:
                reached.update(train_time_s=run.train_time_s, epoch=run.epoch)
        return False

    return probe


def describe(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "median": None, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "median": statistics.median(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values),
            "max": max(values)}


def _percent(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v * 100 if isinstance(v, float) and k != "n" else v) for k, v in d.items()}


def format_seeds(s: dict[str, Any]) -> str:
    def row(name: str, d: dict, fmt: str) -> str:
        cells = [format(d[k], fmt) if d[k] is not None and not math.isnan(d[k]) else "-"
                 for k in ("median", "mean", "std", "min", "max")]
        return f"| {name} | {d['n']} | " + " | ".join(cells) + " |"

    acc = _percent(s["test_top1"])
    lines = ["| | runs | median | mean | std | min | max |", "|---|--:|--:|--:|--:|--:|--:|",
             row("test top-1 (%)", acc, ".2f"),
             *[row(name, _percent(s[key]), ".2f") for key, name in
               (("test_ece", "test ECE (%)"), ("test_ece_calibrated", "test ECE after T (%)"),
                ("corruption_acc", "mean corruption accuracy (%)"))
               if s.get(key, {}).get("n")],
             row("training time (s)", s["train_time_s"], ".1f"),
             *([row(f"time to {s['target']:.2%} (s)", s["time_to_target_s"], ".1f")] if s["target"] else []),
             "",
             "seeds: " + ", ".join(f"{r['seed']}: {r['test_top1']:.2%}" for r in s["runs"])]
    return "\n".join(lines) + "\n"
