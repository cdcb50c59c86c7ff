"""The training loop: steps, then at each interval the losses, the stop signal, the weights and
the checkpoint; at each epoch end validation, the epoch's scalars and checkpoints.

Under torchrun every rank runs this; rank 0 alone prints and writes. The run's state, its
schedule and its weight averaging live in run.py, schedule.py and averaging.py; `fit` (fit.py)
sets the run up and writes the test report.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vggtrain import distributed, graphs
from vggtrain.averaging import float_tensors
from vggtrain.checkpoint import save_checkpoint
from vggtrain.data import Augmentation, Split, TrainLoader, batch_mixer, norm_stats
from vggtrain.device import autocast
from vggtrain.distill import loss_function, with_soft_targets
from vggtrain.errors import RunStopped, shown
from vggtrain.evaluate import eval_settings, evaluate_split
from vggtrain.run import EpochProgress, Run, steps_per_epoch
from vggtrain.rundir import status_text, write_status, write_status_text
from vggtrain.schedule import rate_at
from vggtrain.tb import EpochMetrics, NullWriter
from vggtrain.tracking import TrackedWriter
from vggtrain.trainable import apply_gradients, optimizer_step

EpochHook = Callable[[Run], bool]
# images, the loss's targets (with teachers: the pair (targets, their soft targets)), the labels
Prepared = tuple[torch.Tensor, Any, torch.Tensor]
# loss, logits, the labels train/acc counts against, the gradients' norm (None without clipping)
StepResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]
LoopStep = Callable[[torch.Tensor, torch.Tensor], StepResult]


class StopSignals:
    """The first SIGINT or SIGTERM asks the loop to stop after the current step and checkpoint;
    a second one aborts at once (atomic writes still leave every file whole)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step (under torchrun: at "
                  f"the next log interval); send it again to abort at once", file=sys.stderr, flush=True)
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise RunStopped(f"aborted by a second {signal.Signals(signum).name}", 128 + signum)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module, cast_cache: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward, backward, (clipping,) optimizer step. Returns the detached loss and logits and the
    gradients' norm before clipping (None without optim.clip_grad_norm); no host sync.
    cast_cache: autocast's cache of weight casts (off while a CUDA graph captures the step)."""
    with autocast(run.device, run.cfg.train.precision, cache=cast_cache):
        logits = run.forward(x)
        loss = criterion(logits.float(), y)
    norm = optimizer_step(run.model, run.optimizer, run.scaler, loss, run.cfg.optim.clip_grad_norm)
    return loss.detach(), logits.detach(), norm


def train_one_epoch(run: Run, train: Split, writer: Any = None, stop: StopSignals | None = None,
                    bar: tqdm | None = None) -> dict[str, float]:
    """One epoch (the rest of it, after a mid-epoch resume): the loader's batches, each through
    the run's step, the epoch's meter and the interval hook. Returns its loss, accuracy, speed and
    time. writer: TensorBoard's (default: none); stop: the signals to honour (default: none)."""
    writer, stop, bar = writer or NullWriter(), stop or StopSignals(), bar or tqdm(disable=True)
    step = loop_step(run, steps_per_epoch(len(train), run.dist, run.cfg.train.batch_size))
    meter = EpochMeter(run)
    bar.update(run.progress.step)
    run.model.train()
    for x, y in epoch_batches(run, train):
        loss, logits, y, norm = step(x, y)
        meter.add(loss, logits, y, norm)
        bar.update(1)
        interval_hook(run, writer, stop, meter, bar)
    return meter.finish(run, writer)


def epoch_batches(run: Run, train: Split) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The rest of the run's current epoch: from the step a resume starts at to the epoch's end,
    or to the run's last step (a fractional last epoch, train.epochs: 9.9, ends early)."""
    cfg, d = run.cfg, run.dist
    loader = TrainLoader(train, cfg.train.batch_size, cfg.seed, Augmentation.of(cfg.data),
                         norm_stats(cfg.data), run.channels_last, d.rank, d.world)
    return loader.epoch(run.epoch, start=run.progress.step,
                        stop=run.total_steps - run.epoch * run.steps_per_epoch)


def loop_step(run: Run, epoch_steps: int) -> LoopStep:
    """What the loop does with each batch, every per-run choice made here, once: the batch's
    preparation (prepare_batch, the teachers' soft targets included), the optimizer step
    (step_function, with the run's loss: eager, or the captured graph), then the schedule, the
    step counters and the weight averagers, in that order. The step returns the loss, the logits,
    the labels train/acc counts them against and the gradients' norm."""
    prepare = prepare_batch(run)
    optimize = step_function(run, loss_function(run.cfg, run.teachers))
    averagers = run.averagers  # lookahead, then the weight EMA
    if run.cfg.train.accum_steps > 1:
        return accumulated_step(run, prepare, optimize, epoch_steps)

    def step(x: torch.Tensor, y: torch.Tensor) -> StepResult:
        x, target, y = prepare(x, y)
        loss, logits, norm = optimize(x, target)
        run.scheduler.step()
        run.global_step += 1
        run.progress.step += 1
        for averager in averagers:
            averager.step(run.position, run.total_steps, epoch_end=run.progress.step == epoch_steps)
        return loss, logits, y, norm

    return step


def accumulated_step(run: Run, prepare: Callable[[torch.Tensor, torch.Tensor], Prepared],
                     optimize: Callable[[torch.Tensor, torch.Tensor], Any], epoch_steps: int) -> LoopStep:
    """loop_step's step under train.accum_steps N: each batch is one micro-batch (the step counters
    and train/loss_step count batches); after every Nth the optimizer has stepped, and the schedule
    moves on N batches (its rate is the one at the accumulation's first batch) and the averagers
    step, counting optimizer steps (lookahead_every is in optimizer steps)."""
    n, averagers = run.cfg.train.accum_steps, run.averagers

    def step(x: torch.Tensor, y: torch.Tensor) -> StepResult:
        x, target, y = prepare(x, y)
        loss, logits, norm = optimize(x, target)
        run.global_step += 1
        run.progress.step += 1
        if run.progress.step % n == 0:  # the optimizer stepped
            for _ in range(n):
                run.scheduler.step()
            for averager in averagers:
                averager.step(run.position // n, run.total_steps // n,
                              epoch_end=run.progress.step == epoch_steps)
        return loss, logits, y, norm

    return step


def accumulating_train_step(run: Run, criterion: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """train_step for train.accum_steps N > 1: each batch's loss / N backward, summing into the
    gradients; the optimizer step (clipping, loss scaler) after the Nth. The micro-batch's place in
    its accumulation is the epoch's batch count mod N, which a resume restores: checkpoints land
    only between accumulations (train.checkpoint_every_steps is a multiple of N, a stop signal
    waits for the accumulation's end), so no partial gradients need saving. Under torchrun the
    first N - 1 backward passes skip DDP's all-reduce (no_sync). With clipping, each batch reports
    the norm of the last optimizer step (0 before the first)."""
    n, cfg = run.cfg.train.accum_steps, run.cfg
    no_sync = getattr(run.forward, "no_sync", None) if run.dist.enabled else None
    last_norm = [torch.zeros((), device=run.device) if cfg.optim.clip_grad_norm is not None else None]

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        final = run.progress.step % n == n - 1
        if run.progress.step % n == 0:
            run.optimizer.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if final or no_sync is None else no_sync():
            with autocast(run.device, cfg.train.precision):
                logits = run.forward(x)
                loss = criterion(logits.float(), y)
            run.scaler.scale(loss / n).backward()
        if final:
            last_norm[0] = apply_gradients(run.model, run.optimizer, run.scaler, cfg.optim.clip_grad_norm)
        return loss.detach(), logits.detach(), last_norm[0]

    return step


def prepare_batch(run: Run) -> Callable[[torch.Tensor, torch.Tensor], Prepared]:
    """A batch between the loader and the optimizer step: data.select_keep's proxy keeps part of
    it, then MixUp/CutMix mix it (either only when the config asks), then the teachers, if any,
    predict on the result. Returns the images, the targets the loss is taken against, and the
    labels train/acc counts the predictions against."""
    cfg, selector = run.cfg, run.selector
    mixer = batch_mixer(cfg.data, cfg.model.num_classes) if cfg.data.augment else None
    layout = torch.channels_last if run.channels_last else torch.contiguous_format  # the mix's output's

    def prepare(x: torch.Tensor, y: torch.Tensor) -> Prepared:
        if selector is not None:  # before mixing: the proxy scores the images as they are
            x, y = selector.select(x, y, run.position)
        if mixer is None:
            return x, y, y
        x, target = mixer(x, y)
        # train/acc then counts a prediction right when it is the mixed target's larger share
        return x.contiguous(memory_format=layout), target, target.argmax(1) if target.ndim == 2 else target

    return prepare if run.teachers is None else with_soft_targets(prepare, run.teachers)


def step_function(run: Run, criterion: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """The optimizer step the loop calls: the captured CUDA graph's (train.cuda_graphs, made once
    per run and kept across epochs), else train_step."""
    if run.cfg.train.cuda_graphs:
        if run.graphed is None:
            run.graphed = graphs.graphed_step(run, criterion, train_step) or False
        if run.graphed:
            return run.graphed
    if run.cfg.train.accum_steps > 1:
        return accumulating_train_step(run, criterion)
    return lambda x, y: train_step(run, x, y, criterion)


def interval_hook(run: Run, writer: Any, stop: StopSignals, meter: EpochMeter, bar: tqdm) -> None:
    """After each step: at a log interval's end (train.log_every), when a checkpoint is due
    (train.checkpoint_every_steps) or on a stop signal, end the interval and show the epoch so far;
    on a signal, stop the run there."""
    every = run.cfg.train.checkpoint_every_steps
    between = run.progress.step % run.cfg.train.accum_steps == 0  # no checkpoint inside an accumulation
    due = bool(every) and run.global_step % every == 0 and between
    # One process stops at once; ranks of a job decide together at the next log interval.
    signalled = stop.signum is not None and not run.dist.enabled and between
    if not (len(meter.pending) == run.cfg.train.log_every or due or signalled):
        return
    where = f"epoch {run.epoch + 1}, step {run.progress.step}"
    signum = end_interval(run, writer, stop, meter=meter, due=due, where=where, can_stop=between)
    meter.show(bar, run)
    if signum:
        stop_run(run, signum, f"at {where}; saved {run.dir / 'last.pt'}. Resume with")


def end_interval(run: Run, writer: Any, stop: StopSignals, *, due: bool, where: str,
                 meter: EpochMeter | None = None, scalars: dict[str, float] | None = None,
                 improved: bool = False, can_stop: bool = True) -> int:
    """What every interval ends with, mid-epoch (meter: the epoch so far) and at an epoch end
    (scalars: the epoch's) alike: write the interval's step losses, agree on a stop, and when a
    checkpoint is due or the run stops, check the weights and write last.pt (best.pt first when
    improved). Returns the signal every rank stops for, or 0 (always 0 unless can_stop: inside a
    gradient accumulation; every rank is at the same batch, so all skip the vote alike)."""
    if meter is not None:
        meter.flush_losses(run, writer)
    signum = agreed_signal(run, stop) if can_stop else 0
    if due or signum:
        check_weights_finite(run, where)
        if meter is not None:
            meter.store(run)
        if run.dist.is_main:
            for tag, value in (scalars or {}).items():
                writer.add_scalar(tag, value, run.global_step)
            run.tracker.hold(scalars or {}, run.global_step)  # MLflow gets them once the checkpoint lands
            writer.flush()  # before the checkpoint: a resume purges whatever came after it
            # best.pt first: a run killed between the two writes resumes from the previous
            # last.pt and redoes this epoch, instead of keeping a last.pt whose best_epoch
            # points at weights that best.pt never received. Written in the background
            # (checkpoint.CheckpointWriter): the next steps run while the files are written.
            files = [run.dir / "best.pt"] * improved + [run.dir / "last.pt"]
            status, step = status_text(run, "running"), run.global_step  # written after them, by that thread

            def landed() -> None:
                write_status_text(run.dir, status)
                run.tracker.released(step)

            run.checkpoints.save(files, run.state(), write=save_checkpoint, then=landed)
    return signum


def stop_run(run: Run, signum: int, where: str) -> None:
    run.checkpoints.wait()  # the message says last.pt is saved
    if run.dist.is_main:
        write_status(run, "stopped")
    distributed.barrier(run.dist)  # no rank leaves (and gets killed) before rank 0 has saved
    raise RunStopped(f"stopped by {signal.Signals(signum).name} {where}: vggtrain fit --resume {run.dir}",
                     128 + signum)


def train_epochs(run: Run, train: Split, val: Split, writer: Any, metrics: EpochMetrics | None,
                 on_epoch_end: EpochHook | None = None) -> None:
    """Epochs until cfg.train.epochs: train, validate, log, checkpoint (last.pt, best.pt).

    metrics: metrics.csv, which each epoch's scalars are added to: rank 0's, None on the other
    ranks. The caller reads it (fit: once, its rows also what a new MLflow run is sent).

    on_epoch_end(run), called after each epoch's checkpoints were handed to the background writer
    (run.checkpoints.wait() waits until they are on disk), may end training early by returning
    True (scripts/time_to_accuracy.py measures the test accuracy there)."""
    with StopSignals() as stop:
        try:
            _epochs(run, train, val, writer, metrics, stop, on_epoch_end)
        finally:  # every way out waits for the checkpoint in flight, and reports its failure
            run.checkpoints.wait()


def _epochs(run: Run, train: Split, val: Split, writer: Any, metrics: EpochMetrics | None, stop: StopSignals,
            on_epoch_end: EpochHook | None) -> None:
    cfg, d = run.cfg, run.dist
    while run.epoch < cfg.train.epochs and not run.early_stop.stopped_epoch:  # (a resume after the stop)
        lr = rate_at(run.scheduler, run.epoch * run.steps_per_epoch)  # the epoch's first step's
        with tqdm(total=steps_per_epoch(len(train), d, cfg.train.batch_size), leave=False,
                  desc=f"epoch {run.epoch + 1}/{math.ceil(cfg.train.epochs)}", file=sys.stdout,
                  disable=not (sys.stdout.isatty() and d.is_main), dynamic_ncols=True) as bar:
            started = time.perf_counter()
            tr = train_one_epoch(run, train, writer, stop, bar)
            # the teachers' share of this process's part of the epoch (a resumed one's rest)
            cost = run.teachers.cost_text(time.perf_counter() - started) if run.teachers else ""
        run.epoch, run.progress = run.epoch + 1, EpochProgress()
        run.train_time_s += tr["time_s"]
        va = validate(run, val)
        improved = va is None or va["acc"] > run.best_acc
        if improved:
            run.best_acc, run.best_epoch = (va["acc"] if va else -1.0), run.epoch
        if cfg.train.early_stop is not None and va is not None:  # before the checkpoint that holds it
            run.early_stop.update(va["acc"], run.epoch, cfg.train.early_stop)
        scalars = {"train/loss": tr["loss"], "train/acc": tr["acc"], "train/lr": lr,
                   "train/images_per_s": tr["images_per_s"], "train/epoch": run.epoch}
        scalars.update({f"val/{k}": v for k, v in va.items()} if va else {})
        signum = end_interval(run, writer, stop, due=True, where=f"epoch {run.epoch}",
                              scalars=scalars, improved=improved)
        if metrics is not None:  # the same scalars at the same step as TensorBoard's
            metrics.add(run.global_step, scalars)
        if d.is_main:
            val_text = f" | val loss {va['loss']:.4f} acc {va['acc']:.2%}" if va else ""
            if va and "raw_acc" in va:
                val_text += f" (EMA; raw {va['raw_acc']:.2%})"
            print(f"epoch {run.epoch}/{math.ceil(cfg.train.epochs)} | train loss {tr['loss']:.4f} "
                  f"acc {tr['acc']:.2%}{val_text} | lr {lr:.4g} | {tr['images_per_s']:.0f} img/s | "
                  f"{tr['time_s']:.1f}s{cost}{' | best' if improved and va else ''}", flush=True)
        signum = signum or agreed_signal(run, stop)  # one that came during the save, too
        if signum:
            stop_run(run, signum, f"after epoch {run.epoch}; resume with")
        if run.early_stop.stopped_epoch:
            if d.is_main:
                print(shown(f"early stop after epoch {run.epoch}: {run.early_stop.reason}"), flush=True)
            break
        if on_epoch_end is not None:  # any rank's True ends training on every rank
            done = torch.tensor(int(bool(on_epoch_end(run))), device=run.device)
            if int(distributed.all_max(done, d)):
                break


def validate(run: Run, val: Split) -> dict[str, float] | None:
    """Loss and accuracy on the validation split (None without one); each rank measures its
    shard and the sums are all-reduced, after every rank takes rank 0's BN statistics (what
    last.pt will hold). With a weight EMA, loss and acc are the EMA's (the weights best.pt is
    chosen by and the report tests), raw_loss and raw_acc the trained weights' own."""
    distributed.sync_buffers(run.model, run.dist)
    if run.ema is not None:
        distributed.sync_buffers(run.ema.module, run.dist)
    if not len(val):
        return None
    settings = eval_settings(run.cfg, run.device)
    ev = evaluate_split(run.model, val, settings, dist=run.dist)
    if not math.isfinite(ev.loss):  # the epoch's last update broke the weights
        raise diverged(run, f"non-finite validation loss after epoch {run.epoch}")
    if run.ema is None:
        return {"loss": ev.loss, "acc": ev.top1}
    avg = evaluate_split(run.measured, val, settings, dist=run.dist)
    return {"loss": avg.loss, "acc": avg.top1, "raw_loss": ev.loss, "raw_acc": ev.top1}


class EpochMeter:
    """The epoch's running sums, kept on the device: the host reads them once per log interval,
    not per step. A checkpoint holds the sums over all ranks, so on resume rank 0 alone starts
    from them."""

    def __init__(self, run: Run) -> None:
        p, device = run.progress, run.device
        carried = (p.loss_sum, p.correct, p.seen) if run.dist.is_main else (0.0, 0, 0)
        self.loss_sum = torch.tensor(carried[0], device=device, dtype=torch.float32)
        self.correct = torch.tensor(carried[1], device=device, dtype=torch.int64)
        self.seen = carried[2]
        self.pending: list[torch.Tensor] = []  # per-step losses not yet written to TensorBoard
        self.norms: list[torch.Tensor] = []  # and gradient norms (when clipping)
        self.t0 = time.perf_counter() - p.time_s

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
            grad_norm: torch.Tensor | None = None) -> None:
        self.seen += len(y)
        self.pending.append(loss)
        if grad_norm is not None:
            self.norms.append(grad_norm)
        self.loss_sum.add_(loss, alpha=len(y))
        self.correct += (logits.argmax(1) == y).sum()

    def flush_losses(self, run: Run, writer: Any) -> None:
        """Write the interval's per-step losses, averaged over ranks, and stop on a non-finite one:
        one host read."""
        self._read(run, writer, totals=False)

    def _read(self, run: Run, writer: Any, totals: bool) -> tuple[float, int, int] | None:
        """The interval's losses and gradient norms (written to TensorBoard), and with totals the
        epoch's sums over all ranks (loss, correct, images), in one host read."""
        dtype = torch.float32 if run.device.type == "mps" else torch.float64  # MPS has no float64
        n_losses, n_norms = len(self.pending), len(self.norms)
        parts = [torch.stack(t).to(dtype) for t in (self.pending, self.norms) if t]
        if totals:
            parts.append(torch.stack([self.loss_sum.to(dtype), self.correct.to(dtype),
                                      torch.full((), self.seen, device=run.device, dtype=dtype)]))
        if not parts:
            return None
        # The gradients are all-reduced before clipping: every rank's norm is the same, so the
        # ranks' mean of the losses and the norms is their sum over the ranks, divided.
        values = distributed.all_sum(torch.cat(parts), run.dist).tolist()
        world = run.dist.world
        losses = [v / world for v in values[:n_losses]]
        norms = [v / world for v in values[n_losses:n_losses + n_norms]]
        first = run.global_step - n_losses + 1
        self.pending.clear()
        self.norms.clear()
        # The step scalars reach MLflow as they are written (TrackedWriter); only here: the epoch's
        # wait for the checkpoint that holds them (end_interval's hold), so that writer stays plain.
        tracked = TrackedWriter(writer, run.tracker)
        for i, value in enumerate(losses):
            if not math.isfinite(value):
                raise diverged(run, f"non-finite loss ({value}) at epoch {run.epoch + 1}, step {first + i}")
            tracked.add_scalar("train/loss_step", value, first + i)
        for i, value in enumerate(norms):
            tracked.add_scalar("train/grad_norm", value, first + i)
        if not totals:
            return None
        loss, n_correct, n_seen = values[n_losses + n_norms:]
        return loss, int(n_correct), int(n_seen)

    def store(self, run: Run) -> None:
        """The sums so far, into the progress a mid-epoch checkpoint holds (after the interval's
        losses were written: one host read)."""
        p = run.progress
        p.loss_sum, p.correct, p.seen = self._read(run, NullWriter(), totals=True)
        p.time_s = time.perf_counter() - self.t0

    def finish(self, run: Run, writer: Any) -> dict[str, float]:
        """The epoch's last losses written and its loss, accuracy, speed and time: one host read."""
        elapsed = time.perf_counter() - self.t0
        loss, correct, seen = self._read(run, writer, totals=True)
        n = max(seen, 1)
        return {"loss": loss / n, "acc": correct / n, "images_per_s": seen / elapsed, "time_s": elapsed}

    def show(self, bar: tqdm, run: Run) -> None:
        if not bar.disable:  # two more host reads, only for a person watching
            bar.set_postfix(loss=f"{self.loss_sum.item() / self.seen:.3f}",
                            acc=f"{self.correct.item() / self.seen:.3f}",
                            lr=f"{run.optimizer.param_groups[0]['lr']:.3g}",
                            img_s=f"{self.seen / (time.perf_counter() - self.t0):.0f}", refresh=False)


def diverged(run: Run, what: str) -> RunStopped:
    run.checkpoints.wait()
    if run.dist.is_main and run.dir.is_dir():
        write_status(run, "diverged")
    last = run.dir / "last.pt"
    kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint yet"
    return RunStopped(f"{what}; {kept} (try a lower optim.lr)", 1)


def check_weights_finite(run: Run, where: str) -> None:
    """Stop before a checkpoint is written if the last update left a NaN or inf in the weights
    (the losses so far were finite, so they cannot tell): a checkpoint on disk is always one a run
    can go on from. One host read; ranks agree, as their weights are the same."""
    bad = ~torch.stack([t.isfinite().all() for t in float_tensors(run.model)]).all()
    if int(distributed.all_max(bad.to(torch.int64), run.dist)):
        raise diverged(run, f"non-finite weights after {where}: training diverged")


def agreed_signal(run: Run, stop: StopSignals) -> int:
    """The signal any rank was sent (the largest number), or 0: every rank stops at the same step."""
    if not run.dist.enabled:
        return stop.signum or 0
    flag = torch.tensor(stop.signum or 0, device=run.device)
    return int(distributed.all_max(flag, run.dist))
