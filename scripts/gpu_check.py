"""The body of scripts/gpu_check.sh: every measurement of issue 39 on one GPU, as one table.

Each row runs vggtrain's own commands (python -m vggtrain) in a subprocess, timing the epoch
lines as they arrive: a "real" epoch is the wall time from one epoch line to the next, so it
holds the step, validation, checkpoints and logging alike. Nothing is estimated: a row that
fails says so and the table goes on.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("gpu_check")
# GPU_CHECK_DRY=1: the same script on the CPU, on small synthetic data and a narrow network, to check
# the script itself where no GPU is at hand (its numbers mean nothing; the yardstick is skipped).
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
DRY_SETS = ["train.device=cpu", "model.width=0.0625", "train.batch_size=100", "data.val_size=500",
            "train.precision=fp32"]
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) \|.*\| (\d+) img/s \| ([\d.]+)s")
rows: list[tuple[str, str, str]] = []  # (what, measured, note)


def log(msg: str) -> None:
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)


def run(name: str, cmd: list[str], timeout: float, cwd: Path | None = None
        ) -> tuple[int, list[tuple[float, str]], float]:
    """Run cmd; return its exit code, its stdout lines stamped with arrival times, its wall time."""
    log(f"{name}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with (OUT / f"{name}.log").open("w") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append((time.perf_counter() - t0, line.rstrip("\n")))
                logf.write(line)
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    break
            proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode, lines, time.perf_counter() - t0


def vggtrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "vggtrain", *args]


def fit_row(label: str, data: Path, config: str, overrides: list[str], timeout: float = 90) -> dict | None:
    name = re.sub(r"\W+", "_", label).strip("_")
    sets = [a for o in [f"data.root={data}", "data.download=false", f"name=gc_{name}",
                        f"train.out_dir={OUT / 'runs'}", *overrides, *(DRY_SETS if DRY else [])]
            for a in ("--set", o)]
    code, lines, wall = run(name, vggtrain("fit", "--config", config, "--force", *sets), timeout)
    epochs = [(t, EPOCH_LINE.match(s)) for t, s in lines if EPOCH_LINE.match(s)]
    report_path = OUT / "runs" / f"gc_{name}" / "report.json"
    if code != 0 or not epochs or not report_path.is_file():
        rows.append((label, f"failed (exit {code})", f"see gpu_check/{name}.log"))
        return None
    report = json.loads(report_path.read_text())
    steady = [b[0] - a[0] for a, b in zip(epochs, epochs[1:], strict=False)]  # line to line: the real epoch
    train_images = int(re.search(r"(\d+) train /", next(s for _, s in lines if " train / " in s)).group(1))
    real = train_images / statistics.median(steady) if steady else None
    step_rate = statistics.median(int(m.group(3)) for _, m in epochs[1:]) if len(epochs) > 1 else None
    t = report["timings_s"]
    first = epochs[0][1].group(4)
    rows.append((label, f"{real:,.0f} img/s real epoch" if real else "one epoch only",
                 f"loop {step_rate:,.0f} img/s; epoch 1 {first} s; test {report['metrics']['top1']:.2%}; "
                 f"graphs {report['cuda_graphs']}; whole command {wall:.1f} s (start-up "
                 f"{t['startup_s']} s, data {t['data_load_s']} s, train {t['train_s']} s, "
                 f"test {t['test_s']} s)"))
    return {"real": real, "test": report["metrics"]["top1"], "train_s": t["train_s"], "wall": wall}


def bench_row(label: str, config: str, overrides: list[str]) -> None:
    name = re.sub(r"\W+", "_", label).strip("_")
    dry = [o for o in DRY_SETS if not o.startswith("data.")] if DRY else []  # bench makes its own data
    sets = [a for o in [*overrides, *dry] for a in ("--set", o)]
    out = OUT / f"{name}.json"
    code, _, _ = run(name, vggtrain("bench", "--config", config, *sets, "--parts", "bare,real,ops",
                                    "--steps", "60", "--json", str(out)), 240)
    if code != 0 or not out.is_file():
        rows.append((label, f"failed (exit {code})", f"see gpu_check/{name}.log"))
        return
    r = json.loads(out.read_text())
    rows.append((label, f"bare step {r['bare_step']:,.0f} img/s", f"real fit {r['real_fit']:,.0f} img/s "
                 f"(x{r['real_fit_over_bare_step']:.2f}); {r['ops_per_step']:.0f} ops, "
                 f"{r['syncs_per_step']:.0f} syncs per step"))


def fast_recipe(data: Path, graphs: bool) -> None:
    flag = f"train.cuda_graphs={str(graphs).lower()}"
    results = [fit_row(f"airbench94_muon.yaml seed {s}{' graphs' if graphs else ''}", data,
                       "airbench94_muon.yaml", [f"seed={s}", flag], 60) for s in range(3)]
    ok = [r for r in results if r]
    if ok:
        rows.append((f"airbench94_muon.yaml{' graphs' if graphs else ''}, median of {len(ok)}",
                     f"{statistics.median(r['test'] for r in ok):.2%} test",
                     f"training {statistics.median(r['train_s'] for r in ok):.2f} s, whole command "
                     f"{statistics.median(r['wall'] for r in ok):.1f} s (median)"))


def yardstick(script: Path, data: Path) -> None:
    work = OUT / "yardstick"
    work.mkdir(exist_ok=True)
    code, lines, wall = run("yardstick", [sys.executable, str(script.resolve()), str(data.resolve()), "3"],
                            240, cwd=work)
    mean = next((s for _, s in lines if s.startswith("Mean:")), None)
    times = []  # its final row per run: | run | eval | ... | time_seconds |
    for _, s in lines:
        cells = [c.strip() for c in s.split("|")]
        if len(cells) > 6 and cells[2] == "eval" and cells[1] != "warmup":
            times.append(float(cells[6]))
    rows.append(("airbench94_muon_gpu.py (yardstick), 3 timed runs", mean or f"failed (exit {code})",
                 f"timed runs {', '.join(f'{x:.2f}' for x in times)} s (its own clock); whole {wall:.0f} s"))


def deterministic_resume(data: Path) -> None:
    """The same 2 epochs uninterrupted and stopped (SIGINT mid-run) then resumed: last.pt equal?"""
    base = ["--config", "vgg16_cifar.yaml", "--set", f"data.root={data}", "--set", "data.download=false",
            "--set", "train.epochs=2", "--set", "train.deterministic=true", "--set",
            "train.checkpoint_every_steps=50", "--set", f"train.out_dir={OUT / 'runs'}", "--force",
            *[a for o in (DRY_SETS if DRY else []) for a in ("--set", o)]]
    code_a, _, _ = run("det_a", vggtrain("fit", *base, "--set", "name=det_a"), 120)
    log("det_b: stopped by SIGINT after 7-12 s, then resumed")
    proc = subprocess.Popen(vggtrain("fit", *base, "--set", "name=det_b"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(7 + 5 * (os.getpid() % 7) / 7)  # somewhere in the epochs, not always the same step
    proc.send_signal(2)
    stopped = proc.wait(timeout=60)
    code_b, _, _ = run("det_b_resume", vggtrain("fit", "--resume", str(OUT / "runs" / "det_b")), 120)
    verdict = f"failed (uninterrupted run exit {code_a}, resume exit {code_b})"
    if code_a == 0 and code_b == 0:
        import torch

        a, b = (torch.load(OUT / "runs" / n / "last.pt", weights_only=True, map_location="cpu")
                for n in ("det_a", "det_b"))
        same = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and \
            all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
        verdict = "bit-identical" if same else "DIFFERENT"
    if stopped == 0:
        verdict = "not measured: the run ended before the signal"
    rows.append(("deterministic resume (vgg16_cifar.yaml, 2 epochs, SIGINT mid-run)", verdict,
                 f"stop exit {stopped}, resume exit {code_b}"))


def gpu_tests() -> None:
    try:
        import pytest  # noqa: F401
    except ImportError:
        rows.append(("CUDA tests (pytest -m gpu)", "not run", "pytest is not installed on this machine"))
        return
    code, lines, _ = run("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                                       "no:cacheprovider", "tests"], 240)
    summary = next((s for _, s in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", s)), "")
    ran = "passed" in summary and "failed" not in summary and "error" not in summary
    rows.append(("CUDA tests (pytest -m gpu)", "passed" if code == 0 and ran else f"exit {code}",
                 summary.strip("= ")))


def prepare_data(arg: Path) -> Path:
    if (arg / "cifar-10-batches-bin").is_dir():
        return arg
    if arg.is_file() and arg.name.endswith(".tar.gz"):
        converter = arg.parent / "cifar10_from_jpeg.py"
        tools = OUT / "shared" / "tools"
        tools.mkdir(parents=True, exist_ok=True)
        (OUT / "shared" / "data").mkdir(exist_ok=True)
        # the converter reads ../data/cifar10-jpeg75.tar.gz beside itself
        target = OUT / "shared" / "data" / "cifar10-jpeg75.tar.gz"
        if not target.exists():
            target.symlink_to(arg.resolve())
        (tools / "cifar10_from_jpeg.py").write_text(converter.read_text())
        dest = OUT / "data"
        subprocess.run([sys.executable, str(tools / "cifar10_from_jpeg.py"), str(dest)], check=True)
        return dest
    sys.exit(f"gpu_check: {arg}: neither a directory with cifar-10-batches-bin/ nor the .tar.gz archive")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    import torch

    if not torch.cuda.is_available() and not DRY:
        sys.exit("gpu_check: no CUDA device")
    t0 = time.perf_counter()
    if DRY:
        from vggtrain.synthetic import write_synthetic_cifar10

        write_synthetic_cifar10(OUT / "dry_data", "bin", per_batch=1300, test_size=500, seed=0)
        data = OUT / "dry_data"
    else:
        data = prepare_data(Path(sys.argv[1]))
    short = ["train.epochs=3"]  # the shipped recipe's steady epochs (2 intervals), not its 90
    fit_row("vgg16_cifar.yaml bf16 (shipped), eager", data, "vgg16_cifar.yaml", short)
    fit_row("vgg16_cifar.yaml bf16, CUDA graphs", data, "vgg16_cifar.yaml",
            [*short, "train.cuda_graphs=true"])
    fit_row("vgg16_cifar.yaml fp32, CUDA graphs", data, "vgg16_cifar.yaml",
            [*short, "train.cuda_graphs=true", "train.precision=fp32"])
    bench_row("bench vgg16_cifar.yaml (shipped), eager", "vgg16_cifar.yaml", [])
    bench_row("bench vgg16_cifar.yaml, CUDA graphs", "vgg16_cifar.yaml", ["train.cuda_graphs=true"])
    fast_recipe(data, graphs=False)
    fast_recipe(data, graphs=True)
    if not DRY:
        yardstick(Path(sys.argv[2]), data)
    deterministic_resume(data)
    gpu_tests()
    name = "a dry run on the CPU" if DRY else torch.cuda.get_device_name()
    table = [f"gpu_check on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
             f"{time.perf_counter() - t0:.0f} s in all", "", "| what | measured | note |", "|---|---|---|"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(table) + "\n"
    (OUT / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
