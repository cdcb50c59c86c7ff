"""The CLI from shared parts: each common option declared once, one meaning of --json, the Python
fit() resuming a run directory as `fit --resume` does, and nothing importing the CLI."""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pytest

from conftest import tiny_config, write_yaml
from vggtrain.checkpoint import load_checkpoint
from vggtrain.cli import build_parser, main
from vggtrain.config import load_config
from vggtrain.errors import UserError
from vggtrain.fit import fit

ROOT = Path(__file__).resolve().parent.parent


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_shared_options_mean_the_same_in_every_command():
    subs = _subparsers()
    with_json = {name for name, p in subs.items() if _option(p, "--json")}
    assert with_json == {"eval", "predict", "bench", "runs", "seeds", "lr-find", "info"}
    for name in with_json:  # --json [PATH]: '-' when given alone
        action = _option(subs[name], "--json")
        assert action.nargs == "?" and action.const == "-" and action.metavar == "PATH", name
    assert _option(subs["bench"], "--json").default == "bench/results.json"
    for name in ("fit", "summary", "bench", "sweep", "seeds", "lr-find"):
        action = _option(subs[name], "--set")
        assert action.dest == "overrides" and isinstance(action, argparse._AppendAction), name
    for name in ("fit", "eval", "predict", "gradcam", "lr-find"):
        assert _option(subs[name], "--device").type is _option(subs["eval"], "--device").type, name
    assert _option(subs["fit"], "--device").default is None  # train.device decides
    assert _option(subs["predict"], "--device").default == "auto"


def test_runs_json_to_stdout_to_a_file_and_the_old_spelling(tmp_path, capsys, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["runs", "--json", str(tmp_path / "rows.json")]) == 0
    assert capsys.readouterr().out == "" and json.loads((tmp_path / "rows.json").read_text()) == []
    # `runs --json DIR` from when --json was a switch: DIR is still the directory listed
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert main(["runs", "--json", str(other)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["runs", str(other), "--json", str(other)]) == 2  # DIR given: this one is a file
    assert f"--json {other}: cannot write it" in capsys.readouterr().err


def test_info_json_goes_where_told(tmp_path, capsys):
    assert main(["info", "--json", "-"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert main(["info", "--json", str(tmp_path / "info.json")]) == 0
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / "info.json").read_text()).keys() == facts.keys()


def test_python_fit_resumes_a_run_directory(cifar_bin, tmp_path, capsys):
    raw = tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 1})
    cfg_file = write_yaml(tmp_path / "tiny.yaml", raw)
    with pytest.raises(UserError, match="nothing to resume: .*last.pt does not exist"):
        fit(load_config(str(cfg_file)), resume=True)
    fit(load_config(str(cfg_file)))  # run_dir: <train.out_dir>/<name>
    run = tmp_path / "runs" / "tiny"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1

    # as `vggtrain fit --resume runs/tiny --set train.epochs=2`: the stored config, overrides on top
    report = fit(resume=run, overrides=["train.epochs=2"])
    assert report["epochs"] == 2 and load_checkpoint(run / "last.pt")["epoch"] == 2
    capsys.readouterr()

    # a config of its own may change only what a resume may
    changed = load_config(str(cfg_file), ["train.epochs=3", "optim.lr=0.5"])
    with pytest.raises(UserError, match="optim.lr cannot change when resuming"):
        fit(changed, resume=run / "last.pt")
    with pytest.raises(ValueError, match="overrides"):
        fit(changed, resume=run, overrides=["train.epochs=3"])

    # a renamed run directory (as a sweep renames a requeued trial's) resumes under its new name
    run.rename(tmp_path / "runs" / "moved")
    assert fit(load_config(str(cfg_file), ["name=moved", "train.epochs=3"]), resume=True)["epochs"] == 3
    assert main(["fit", "--resume", str(tmp_path / "runs" / "moved"), "--name", "other"]) == 2
    assert "name cannot change when resuming" in capsys.readouterr().err


def test_config_keys_prints_the_reference(capsys):
    from vggtrain.config_reference import render

    assert main(["config", "--keys"]) == 0
    assert capsys.readouterr().out == render()  # the whole page, as docs/config.md
    assert main(["config", "--keys", "optim"]) == 0
    out = capsys.readouterr().out
    assert "`optim.muon_lr`" in out and "`train.epochs`" not in out
    assert main(["config", "--keys", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config section 'nope'" in err
    with pytest.raises(SystemExit) as stop:
        main(["config"])
    assert stop.value.code == 2 and "required: --keys" in capsys.readouterr().err


def test_nothing_imports_the_cli():
    """Only the entry points (__main__, the tests) import vggtrain.cli; the parts it shares with
    the other programs live in vggtrain.program."""
    offenders = []
    for path in [*ROOT.joinpath("vggtrain").rglob("*.py"), *ROOT.joinpath("scripts").glob("*.py")]:
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module == "vggtrain":
                names += [f"vggtrain.{a.name}" for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.level and node.module in ("cli", None):
                names += [f"vggtrain.{node.module or a.name}" for a in node.names]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "vggtrain.cli"]
    assert offenders == []
