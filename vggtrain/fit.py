"""`vggtrain fit`: the run's directory, data and state set up in order, the loop, the test report.

Under torchrun every rank calls fit; rank 0 owns the run directory, TensorBoard and the report,
and a check it fails stops every rank with the same one-line message.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vggtrain import allocator, distributed, graphs
from vggtrain.atomic import atomic_write_text
from vggtrain.checkpoint import add_temperatures, check_weights_fit, load_checkpoint, model_weights, save_of
from vggtrain.config import TrainConfig, check_resume_changes, config_with_overrides, dump_config
from vggtrain.curves import learning_curves
from vggtrain.data import Split, ValidationDraw, cap_per_class, load_dataset, measure_stats, run_split
from vggtrain.device import set_deterministic
from vggtrain.distill import Teachers, notes, open_teachers
from vggtrain.distributed import Dist
from vggtrain.errors import STORAGE_ERRNOS, CheckpointError, RunStopped, UserError, shown
from vggtrain.evaluate import EvalSettings, Evaluation, eval_settings, evaluate_split, fit_temperatures
from vggtrain.finetune import Start, choose_stats, open_source
from vggtrain.model import count_parameters
from vggtrain.policies import require_policy_extra
from vggtrain.run import Run, build_run, refuse_finished_run, steps_per_epoch
from vggtrain.rundir import RunDir, write_error, write_status
from vggtrain.tb import METRICS_FILE, EpochMetrics, NullWriter, open_summary_writer
from vggtrain.tracking import Connection, TrackedWriter, connect
from vggtrain.train import EpochHook, train_epochs

# What fit(resume=...) continues from: True (the config's own run), a run directory (its last.pt)
# or a checkpoint, or the (path, state) load_checkpoint read; None starts a new run.
Resume = bool | str | Path | tuple[Path, dict] | None


def fit(cfg: TrainConfig | None = None, run_dir: str | Path | None = None, resume: Resume = None,
        force: bool = False, on_epoch_end: EpochHook | None = None, test: bool = True,
        overrides: Sequence[str] = ()) -> dict | None:
    """Train, checkpoint every epoch, then test the best checkpoint. Returns the report (None on
    ranks other than 0 of a torchrun job).

    run_dir: default <train.out_dir>/<name>, or the resumed checkpoint's directory.
    resume: True continues <run_dir>/last.pt; a run directory or a checkpoint continues that one
    (`vggtrain fit --resume RUN_DIR_OR_CKPT`): with cfg None under its stored config and overrides
    ("key=value", as --set), else under cfg, which may change only what config.RESUMABLE_KEYS
    allows (and the name, to the run directory's). A (path, state) pair is used as it is, unchecked.
    on_epoch_end: see train.train_epochs.
    test: False leaves the test set alone (a sweep's trial: selection sees validation only) and
    returns {best_val_acc, best_epoch, epochs, train_time_s} instead of the report.
    """
    cfg, run_dir, resume = resume_point(cfg, run_dir, resume, overrides)
    d = distributed.from_env()
    device_spec = distributed.init(d, cfg.train.device)
    try:
        with RunDir(run_dir, resume, force) as rd:  # rank 0 holds its lock for the run's lifetime
            report = _fit(cfg, rd, d, device_spec, on_epoch_end, test)
        distributed.barrier(d)  # the other ranks wait for rank 0's report before the group ends
        return report
    except OSError as e:  # a checkpoint, an event file or a report the disk would not take
        if e.errno not in STORAGE_ERRNOS:
            raise
        raise write_error(e, run_dir) from None
    finally:
        distributed.shutdown()


def resume_point(cfg: TrainConfig | None, run_dir: str | Path | None, resume: Resume,
                 overrides: Sequence[str] = ()) -> tuple[TrainConfig, Path, tuple[Path, dict] | None]:
    """(config, run directory, (checkpoint, state) or None) of a fit() call's arguments: the
    checkpoint loaded and the config checked against it before anything else starts."""
    if overrides and cfg is not None:
        raise ValueError("overrides apply to a resumed run's stored config: pass cfg=None with them")
    if resume is True:
        if cfg is None:
            raise UserError("usage error: resuming a config's own run needs the config")
        run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
        ckpt = run_dir / "last.pt"
        if not ckpt.is_file():
            raise UserError(f"nothing to resume: {ckpt} does not exist")
    elif isinstance(resume, (str, Path)):
        ckpt = Path(resume)
        ckpt = ckpt / "last.pt" if ckpt.is_dir() else ckpt
    elif cfg is None:
        raise UserError("usage error: fit needs a config (or a run directory or checkpoint to resume)")
    else:  # a new run, or a checkpoint its caller has loaded
        return cfg, Path(run_dir) if run_dir is not None else default_run_dir(cfg), resume or None
    state = load_checkpoint(ckpt)
    if cfg is None:
        cfg = config_with_overrides(state["config"], str(ckpt), overrides, stored=True)
    run_dir = Path(run_dir) if run_dir is not None else ckpt.parent
    stored = state["config"]
    if cfg.name == run_dir.name:
        # A run directory renamed (a sweep's requeued trial takes the next trial's) takes its name.
        stored = {**stored, "name": cfg.name}
    cfg = check_resume_changes(stored, cfg, "--resume")
    return cfg, run_dir, (ckpt, state)


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.train.out_dir) / str(cfg.name)


def _fit(cfg: TrainConfig, rd: RunDir, d: Dist, device_spec: str, on_epoch_end: EpochHook | None,
         test_at_end: bool = True) -> dict | None:
    clock = Laps()  # where the command's time goes, into report.json
    rank0_verdict(d, rd.claim)  # before any work: a used directory, a live run, a stale resume
    connection = connect_tracking(cfg, d)  # log.mlflow: before the data load and the run directory
    if rd.resume is not None:  # before the data and the model are loaded and built
        check_weights_fit(cfg.model, rd.resume[1]["model"], rd.resume[0])
    start = fine_tuning_start(cfg, rd)  # init.from checked before the run directory is made
    require_policy_extra(cfg.data)  # a missing kornia stops the run before its directory is made
    set_deterministic(cfg.train.deterministic)  # before the first CUDA kernel
    train, val, test, class_names = load_data(cfg, d)
    clock.lap("data_load_s")
    if start is not None:
        choose_stats(cfg, start)  # before the model's whitening and config.yaml use them
        if d.is_main:
            print("\n".join(shown(note) for note in start.notes), flush=True)
    teachers = distillation_teachers(cfg, rd, class_names)  # read and checked before the run directory
    run = build_run(cfg, rd.path, class_names, len(train), d, device_spec, whiten_images=train.images,
                    start=start, teachers=teachers)
    if teachers is not None and d.is_main:
        val_draw = ValidationDraw.of(cfg.data, cfg.seed)
        print("\n".join(shown(note) for note in notes(teachers, val_draw)), flush=True)
    if rd.resume is not None:
        run.restore(rd.resume[1], rd.resume[0], weights_scanned=True)  # check_weights_fit scanned them
        rank0_verdict(d, lambda: refuse_finished_run(run))
    train, val, test = train.to(run.device), val.to(run.device), test.to(run.device)
    rank0_verdict(d, lambda: rd.prepare(dump_config(cfg)))  # every rank stops, not only the one that knows
    writer: Any = NullWriter()
    metrics: EpochMetrics | None = None
    if d.is_main:
        announce(run, rd, len(train), len(val), len(test))
        writer = open_summary_writer(rd.path / "tb", run.global_step + 1 if rd.resume else None)
        metrics = EpochMetrics(rd.path / METRICS_FILE, run.epoch)  # read once: for MLflow and the epochs
        if connection is not None:  # the MLflow run: the checkpoint's, or a new one
            run.tracker = connection.start(run, metrics.rows)
        else:  # log.mlflow off (a resume may turn it off): no checkpoint names an MLflow run it is not in
            run.tracking = None
    clock.lap("setup_s")
    try:
        report = train_and_report(run, rd, writer, metrics, (train, val, test), clock, on_epoch_end,
                                  test_at_end)
    except BaseException as e:
        try:
            run.tracker.finish(ended_state(e), tracked_files(rd.path))
        except KeyboardInterrupt:  # a second Ctrl-C ends the wait; e still says how the run ended
            pass
        raise
    run.tracker.finish("finished", tracked_files(rd.path))
    return report


def train_and_report(run: Run, rd: RunDir, writer: Any, metrics: EpochMetrics | None,
                     splits: tuple[Split, Split, Split], clock: Laps, on_epoch_end: EpochHook | None,
                     test_at_end: bool) -> dict | None:
    """The epochs, then (rank 0) the test report, its files and its line; the writer closed.
    metrics: metrics.csv as _fit read it (rank 0's; None on the others)."""
    cfg, d = run.cfg, run.dist
    train, val, test = splits
    try:
        train_epochs(run, train, val, writer, metrics, on_epoch_end)
        clock.lap("train_s")  # epochs, validation and checkpoints
        if not d.is_main:
            return None
        if not test_at_end:
            write_status(run, "finished")
            return {"best_val_acc": run.best_acc, "best_epoch": run.best_epoch, "epochs": run.epoch,
                    "train_time_s": run.train_time_s}
        from vggtrain.report import log_report, report_json, report_pictures, write_report_files  # Pillow

        report, evaluation = test_report(run, test, val)
        clock.lap("test_s")
        writer.flush()  # the curves are read back from the event files
        pictures = learning_curves(rd.path / "tb", f"{cfg.name}: learning curves")
        pictures.update(report_pictures(report, evaluation, test))
        log_report(TrackedWriter(writer, run.tracker), report, pictures, run.global_step)
    finally:
        writer.close()
    write_report_files(rd.path, report, pictures)
    clock.lap("report_s")
    report["timings_s"] = clock.summary()
    # Last: a report.json means the pictures and report.md beside it are complete.
    atomic_write_text(rd.path / "report.json", report_json(report))
    write_status(run, "finished")  # after the report: a run killed in its test pass is stopped
    m = report["metrics"]
    loss = "n/a" if m["loss"] is None else f"{m['loss']:.4f}"
    print(shown(f"test accuracy {m['top1']:.2%} (top-5 {m['top5']:.2%}, loss {loss}, {m['images']} "
                f"images) with best.pt from epoch {report['best_epoch']}; report in {rd.path / 'report.md'}"),
          flush=True)
    return report


def connect_tracking(cfg: TrainConfig, d: Dist) -> Connection | None:
    """log.mlflow's store, checked on rank 0 (a missing extra, a server that does not answer: every
    rank stops with its one line); None elsewhere and without log.mlflow."""
    found: list[Connection | None] = [None]

    def check() -> None:
        found[0] = connect(cfg.log.mlflow)

    rank0_verdict(d, check)
    return found[0]


def ended_state(e: BaseException) -> str:
    """How an exception ends the MLflow run: stopped (a signal, Ctrl-C) or failed."""
    signalled = isinstance(e, RunStopped) and e.exit_code >= 128
    return "stopped" if signalled or isinstance(e, KeyboardInterrupt) else "failed"


def tracked_files(run_dir: Path) -> list[Path]:
    """What the MLflow run keeps of the run directory (those that exist when it ends): the config,
    the epochs' table, the report and its pictures."""
    names = ["config.yaml", METRICS_FILE, "report.json", "report.md"]
    return [run_dir / n for n in names] + sorted(run_dir.glob("*.png"))


def fine_tuning_start(cfg: TrainConfig, rd: RunDir) -> Start | None:
    """Where init.from's run starts: the source read and checked (a new run), or the record its
    checkpoint holds (a resumed one: the source is not read again); None without init.from."""
    if cfg.init.from_ is None:
        return None
    if rd.resume is not None:
        return Start.of_record(rd.resume[1].get("init"), rd.resume[0])
    return open_source(cfg)


def distillation_teachers(cfg: TrainConfig, rd: RunDir, class_names: list[str]) -> Teachers | None:
    """distill.teachers read and checked against the data's classes (None without any); a resumed
    run's are the files its checkpoint recorded, unchanged."""
    recorded = rd.resume[1].get("distill") if rd.resume is not None else None
    if rd.resume is not None and cfg.distill.teachers and recorded is None:
        raise CheckpointError(f"{rd.resume[0]}: cannot resume from it: distill.teachers is set but it "
                              f"records no teachers")
    return open_teachers(cfg, class_names, recorded)


class Laps:
    """Wall-clock laps of one fit, and the start-up before it (the process's age when fit began:
    the interpreter, the imports, the config and the argument parsing)."""

    def __init__(self) -> None:
        self.startup_s = process_age_s()
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now

    def summary(self) -> dict[str, float | None]:
        total = None if self.startup_s is None else round(self.startup_s + sum(self.laps.values()), 3)
        return {"startup_s": None if self.startup_s is None else round(self.startup_s, 3), **self.laps,
                "total_s": total}


def process_age_s() -> float | None:
    """Seconds since this process started (Linux's /proc), or None where that cannot be read."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def rank0_verdict(d: Dist, check: Callable[[], None]) -> None:
    """Run check on rank 0 alone (it owns the run directory and the report); the UserError it
    raises, if any, stops every rank of the job with the same message."""
    problem = None
    if d.is_main:
        try:
            check()
        except UserError as e:
            if not d.enabled:
                raise
            problem = (str(e), e.exit_code)
    problem = distributed.agree(problem, d)
    if problem:
        error = UserError(problem[0])
        error.exit_code = problem[1]  # a full disk stays 74 on every rank
        raise error


def load_data(cfg: TrainConfig, d: Dist) -> tuple[Split, Split, Split, list[str]]:
    """(train, val, test, class names), checked against the config; each node's local rank 0
    downloads the data first, if it must."""
    if d.enabled and d.local_rank != 0:
        distributed.barrier(d)
    train_full, test, class_names = load_dataset(cfg.data)
    if d.enabled and d.local_rank == 0:
        distributed.barrier(d)
    if len(class_names) != cfg.model.num_classes:
        raise UserError(f"config error: model.num_classes is {cfg.model.num_classes} but the data "
                        f"in {cfg.data.root} has {len(class_names)} classes")
    train, val = run_split(train_full, cfg.data, cfg.seed)
    if cfg.data.train_per_class is not None:  # after the validation split: it never moves with the cap
        train = cap_per_class(train, cfg.data.train_per_class, cfg.seed, class_names)
    if cfg.data.mean is None and cfg.data.dataset == "folder":  # its own, from the training split
        mean, std = measure_stats(train.images)
        cfg.data.mean, cfg.data.std = list(mean), list(std)  # into config.yaml and every checkpoint
    steps = steps_per_epoch(len(train), d, cfg.train.batch_size)
    if steps == 0:
        raise UserError(f"config error: train.batch_size {cfg.train.batch_size} is larger than the "
                        f"{len(train) // d.world} training images of each of {d.world} rank(s)")
    accum, total = cfg.train.accum_steps, math.ceil(cfg.train.epochs * steps)
    if steps % accum or total % accum:  # every accumulation whole: no epoch ends inside one
        raise UserError(f"config error: train.accum_steps {accum} must divide the {steps} batches of "
                        f"each epoch and the run's {total}")
    return train, val, test, class_names


def announce(run: Run, rd: RunDir, n_train: int, n_val: int, n_test: int) -> None:
    cfg, d = run.cfg, run.dist
    where = f"; resuming at epoch {run.epoch + 1}, step {run.progress.step}" if rd.resume else ""
    ranks = f" x {d.world} ranks (batch {cfg.train.batch_size} each)" if d.enabled else ""
    print(shown(f"run {rd.path}: {cfg.model.arch} ({count_parameters(run.model):,} parameters) on "
                f"{run.device}{ranks}, {cfg.train.precision}; {n_train} train / {n_val} val / "
                f"{n_test} test images{where}"), flush=True)
    print(shown(f"allocator: {allocator.in_effect()}"), flush=True)


def test_report(run: Run, test: Split, val: Split | None = None) -> tuple[dict[str, Any], Evaluation]:
    """Load best.pt into the model and measure it on the test set, which nothing else touches;
    with a validation split, first fit its temperatures there (calibrate_best).

    Returns the report (the schema `vggtrain eval` writes, plus the run's training facts) and the
    evaluation itself, whose per-image predictions the report's pictures need.
    """
    from vggtrain.report import build_report

    best = load_checkpoint(run.dir / "best.pt", map_location=run.device)
    weights, which = model_weights(best)  # the weight EMA's, where the run kept one
    run.model.load_state_dict(weights)
    cfg = run.cfg
    settings = eval_settings(cfg, run.device)
    temperature = calibrate_best(run, val, settings).get(cfg.train.tta)
    ev = evaluate_split(run.model, test, replace(settings, calibration=True, temperature=temperature))
    report = build_report(ev, split="test", model=run.model, cfg=cfg, class_names=run.class_names,
                          checkpoint=run.dir / "best.pt", checkpoint_epoch=int(best["epoch"]),
                          device=run.device, precision=cfg.train.precision, tta=cfg.train.tta,
                          weights=which, temperature=temperature,
                          temperature_from=f"fitted on the {len(val):,} validation images"
                          if temperature is not None else None)
    m = report["metrics"]
    report.update({
        "test": {"loss": m["loss"], "acc": m["top1"], "images": m["images"]},  # fit's first keys
        "best_epoch": int(best["epoch"]),
        "val_acc": best["best_metric"] if cfg.data.val_size else None,
        "epochs": run.epoch,
        # train.early_stop's stop: the epoch it came after and why (null: the run did its epochs)
        "stopped_early": ({"epoch": run.early_stop.stopped_epoch, "reason": run.early_stop.reason}
                          if run.early_stop.stopped_epoch else None),
        "train_time_s": run.train_time_s,
        "allocator": allocator.in_effect(),  # the CPU memory allocator the run trained with
        "deterministic": cfg.train.deterministic,  # train.deterministic's kernels
        "cuda_graphs": graphs.in_use(run),  # the steps replayed a captured CUDA graph
        "init": run.init,  # init.from's: where the weights started (path, config digest)
        "distill": run.teachers.record() if run.teachers else None,  # the teachers' paths and digests
    })
    return report, ev


def calibrate_best(run: Run, val: Split | None, settings: EvalSettings) -> dict[str, float]:
    """With a validation split: temperatures fitted there for the model as loaded (best.pt's
    measured weights), under the run's TTA and without TTA (what predict and export run), and
    stored in best.pt, and in last.pt where it holds the same weights. {} without one."""
    if val is None or not len(val):
        return {}
    temperatures = fit_temperatures(run.model, val, settings, [run.cfg.train.tta, "none"])
    best, last = run.dir / "best.pt", run.dir / "last.pt"
    stored = add_temperatures(best, temperatures)  # best.pt as read to rewrite it: not read again
    # only where last.pt is of the same save: else its weights are not the ones measured
    if last.is_file() and save_of(load_checkpoint(last, mmap=True)) == save_of(stored):
        add_temperatures(last, temperatures)
    return temperatures
