"""How tests/data/legacy_run/ was made: a tiny run trained by vggtrain at commit 82d82d0 (before
the loop was split into schedule.py, averaging.py, run.py, ...), kept so that the tests can check
that checkpoints written by that code still resume bit-identically and evaluate the same.

    python tests/data/make_legacy_run.py tests/data/legacy_run   # at commit 82d82d0

The config keeps every learning rate exact in binary (warm-up over 16 steps, gamma 0.5), so the
old StepLR-plus-warm-up arithmetic and the per-step schedule give the same floats.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest

from conftest import tiny_config  # noqa: E402
from vggtrain import train as train_module  # noqa: E402
from vggtrain.cli import main  # noqa: E402
from vggtrain.synthetic import write_synthetic_cifar10  # noqa: E402

LEGACY = {"optim": {"lookahead_every": 3, "nesterov": True, "label_smoothing": 0.1},
          "schedule": {"warmup_epochs": 1, "step_size": 1, "gamma": 0.5},
          "train": {"epochs": 3, "checkpoint_every_steps": 20, "tta": "flip"}}


def main_(out: Path) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic_cifar10(data, "bin", per_batch=200, test_size=400, seed=1)  # conftest's cifar_bin
        cfg = Path(tmp) / "legacy.yaml"
        cfg.write_text(yaml.safe_dump(tiny_config(data, Path(tmp) / "runs", name="legacy", **LEGACY)))
        real_save = train_module.save_checkpoint

        def save(path, state):
            real_save(path, state)
            if state["progress"]["step"] and not (out / "mid.pt").exists():  # epoch 2, step 4
                shutil.copy(path, out / "mid.pt")

        train_module.save_checkpoint = save
        assert main(["fit", "--config", str(cfg)]) == 0
        run = Path(tmp) / "runs" / "legacy"
        for name in ("best.pt", "last.pt", "report.json"):
            shutil.copy(run / name, out / name)
    report = json.loads((out / "report.json").read_text())
    print(f"legacy run: test acc {report['test']['acc']}, best epoch {report['best_epoch']}")


if __name__ == "__main__":
    main_(Path(sys.argv[1]))
