"""The allocator mechanism (not its speed: that is `vggtrain bench`'s job)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config, wait_for_line, write_yaml
from vggtrain import allocator
from vggtrain.allocator import APPLIED, GLIBC_SETTING, SWITCH, plan

ROOT = Path(__file__).resolve().parents[1]
LINUX_GLIBC = sys.platform == "linux" and allocator.platform.libc_ver()[0] == "glibc"


def test_plan_prefers_a_preloadable_library(monkeypatch):
    found = {"jemalloc": "/usr/lib/x/libjemalloc.so.2", "tcmalloc": "/usr/lib/x/libtcmalloc.so.4"}
    monkeypatch.setattr(allocator, "find_library", lambda kind, env=None: found.get(kind))
    what, changes = plan({}, "linux", "glibc")
    assert what.startswith("jemalloc (/usr/lib/x/libjemalloc.so.2")
    assert changes == {"LD_PRELOAD": found["jemalloc"], "MALLOC_CONF": allocator.JEMALLOC_CONF}
    what, changes = plan({SWITCH: "tcmalloc", "LD_PRELOAD": "/opt/libfoo.so"}, "linux", "glibc")
    assert changes == {"LD_PRELOAD": "/opt/libfoo.so:" + found["tcmalloc"]}  # theirs kept, first
    del found["jemalloc"], found["tcmalloc"]
    what, changes = plan({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX"}, "linux", "glibc")
    assert changes == {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX:" + GLIBC_SETTING}
    assert what.startswith("glibc tunables")


@pytest.mark.parametrize("env, system, expected", [
    ({SWITCH: "system"}, "linux", "system (VGGTRAIN_ALLOCATOR=system)"),
    ({}, "darwin", "system (not Linux with glibc)"),
    ({"LD_PRELOAD": "/x/libjemalloc.so.2"}, "linux", "user's own (LD_PRELOAD=/x/libjemalloc.so.2)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, "linux", "user's own (GLIBC_TUNABLES="),
    ({"MALLOC_CONF": "narenas:1"}, "linux", "user's own (MALLOC_CONF=narenas:1)"),
    ({SWITCH: "fastest"}, "linux", "system (ignored VGGTRAIN_ALLOCATOR='fastest'"),
])
def test_plan_leaves_alone_what_it_should(env, system, expected):
    what, changes = plan(env, system, "glibc")
    assert what.startswith(expected) and changes == {}


def _vggtrain(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m vggtrain ARGS` in a clean allocator environment plus env; records its PID."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for k in (APPLIED, SWITCH, "GLIBC_TUNABLES", "MALLOC_CONF", "LD_PRELOAD"):
        if env is None or k not in env:
            full.pop(k, None)
    with subprocess.Popen([sys.executable, "-m", "vggtrain", *args], env=full, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        out, err = proc.communicate(timeout=300)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    done.pid = proc.pid
    return done


@pytest.mark.skipif(not LINUX_GLIBC, reason="the mechanism is a no-op off Linux/glibc")
def test_fit_runs_with_the_allocator_applied_and_recorded(cifar_bin, tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 1}))
    proc = _vggtrain("fit", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    expected = plan({k: v for k, v in os.environ.items()
                     if k not in (APPLIED, SWITCH, "GLIBC_TUNABLES", "MALLOC_CONF", "LD_PRELOAD")})[0]
    assert f"allocator: {expected}" in proc.stdout
    report = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    assert report["allocator"] == expected


@pytest.mark.skipif(not LINUX_GLIBC, reason="the mechanism is a no-op off Linux/glibc")
@pytest.mark.parametrize("env, expected, check", [
    ({}, "", lambda e: (GLIBC_SETTING in e.get("GLIBC_TUNABLES", "")
                        or "alloc" in e.get("LD_PRELOAD", ""))),
    ({SWITCH: "system"}, "system (VGGTRAIN_ALLOCATOR=system)",
     lambda e: "GLIBC_TUNABLES" not in e and "LD_PRELOAD" not in e),
    ({SWITCH: "glibc"}, "glibc tunables", lambda e: e["GLIBC_TUNABLES"] == GLIBC_SETTING),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "user's own",
     lambda e: e["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"),
    ({APPLIED: "decided upstream"}, "decided upstream", lambda e: "GLIBC_TUNABLES" not in e),
])
def test_info_shows_the_environment_the_process_really_has(env, expected, check):
    proc = _vggtrain("info", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["allocator"].startswith(expected)
    assert check(info["allocator_env"]), info["allocator_env"]
    assert info["allocator_env"].get(APPLIED) == info["allocator"]
    assert info["pid"] == proc.pid  # re-executed in place: same process, signals reach it


def test_exit_codes_and_one_line_errors_are_unchanged(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: -1\n")
    proc = _vggtrain("fit", "--config", str(bad))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stdout == ""
    proc = _vggtrain("fit", "--no-such-flag")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_sigint_reaches_the_reexecuted_process(cifar_bin, tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(cifar_bin, tmp_path / "runs",
                                                         train={"epochs": 500}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop(APPLIED, None)
    proc = subprocess.Popen([sys.executable, "-m", "vggtrain", "fit", "--config", str(cfg)],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_line(proc, "epoch 1/")
    proc.send_signal(signal.SIGINT)  # the PID we started: the re-exec kept it
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped by SIGINT" in err
