from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from vggtrain.synthetic import write_synthetic_cifar10


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA: without it they are skipped, saying so."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def ctrl_c_raises_keyboard_interrupt():
    """Tests that send SIGINT expect Python's default handler; a shell that starts pytest in the
    background (`pytest &`, nohup) hands it SIGINT ignored instead."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def cifar_bin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar_bin")
    write_synthetic_cifar10(root, "bin", per_batch=200, test_size=400, seed=1)
    return root


@pytest.fixture(scope="session")
def cifar_py(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar_py")
    write_synthetic_cifar10(root, "py", per_batch=200, test_size=400, seed=1)
    return root


def tiny_config(data_root: Path, out_dir: Path, **sections) -> dict:
    """A config for a VGG-style net small enough to train in seconds on two CPU cores."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "data": {"root": str(data_root), "val_size": 200},
        "model": {"arch": "custom", "layers": [8, "M", 16, "M", 16, "M"], "global_pool": "max"},
        "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
        "schedule": {"step_size": 2, "gamma": 0.5},
        "train": {"epochs": 3, "batch_size": 50, "eval_batch_size": 200, "device": "cpu",
                  "log_every": 4, "out_dir": str(out_dir)},
    }
    kind = sections["schedule"].get("kind", "step") if isinstance(sections.get("schedule"), dict) else "step"
    if kind != "step":  # tiny's step_size (and gamma) are StepLR's: refused under a kind that ignores them
        cfg["schedule"] = {"gamma": 0.5} if kind == "multistep" else {}
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    return cfg


def die_after_mid_epoch_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next fit stop as if killed (KeyboardInterrupt, exit 130) right after it writes its
    first mid-epoch checkpoint (train.checkpoint_every_steps): a resume test's worst moment, in process."""
    from vggtrain import train as train_module

    real_save = train_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["progress"]["step"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """A run's TensorBoard scalars, tag -> [(step, value)], as TensorBoard reads them (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fit_tiny_run(data_root: Path, tmp: Path) -> Path:
    """tiny_config's run fitted quietly under tmp; its run directory."""
    from vggtrain.cli import main

    cfg = write_yaml(tmp / "tiny.yaml", tiny_config(data_root, tmp / "runs"))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["fit", "--config", str(cfg)]) == 0
    return tmp / "runs" / "tiny"


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 600) -> None:
    """Read proc's stdout up to the first line starting with prefix; the rest stays unread.

    A plain `for line in proc.stdout` blocks for good on a child that hangs without printing;
    reading in a thread bounds the wait: past the deadline the child is killed and the test fails
    with its stderr."""
    found = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            if line.startswith(prefix):
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if found.is_set():
        return
    timed_out = reader.is_alive()
    proc.kill()
    reader.join()
    _, err = proc.communicate()
    what = f"no line starting {prefix!r} within {timeout:.0f} s" if timed_out else \
        f"the process ended before printing {prefix!r}"
    raise AssertionError(f"{what}: {err}")


def md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def serve_as_download(dataset: type, base: Path, tmp_path: Path, monkeypatch) -> Iterator[str]:
    """Serve the layout directory `base` as a torchvision dataset's archive over HTTP from this
    machine (it has no internet), with the dataset's url and archive md5 pointing at it."""
    import functools
    import http.server
    import tarfile

    archive = tmp_path / "served" / dataset.filename
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(base, arcname=base.name)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(archive.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # a CI proxy could not reach this local server
    monkeypatch.setattr(dataset, "url", f"http://127.0.0.1:{server.server_address[1]}/{archive.name}")
    monkeypatch.setattr(dataset, "tgz_md5", md5(archive))
    try:
        yield dataset.url
    finally:
        server.shutdown()
        server.server_close()


def block_import(monkeypatch, package: str) -> None:
    """Make `import package` (and its submodules) fail, as on a machine without that extra."""
    import builtins

    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name.split(".")[0] == package:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
