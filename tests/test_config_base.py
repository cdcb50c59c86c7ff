"""base: in a config: chains, lists, deep merge, overrides, provenance in errors, cycles and
missing bases refused, the run's config.yaml resolved; the shipped configs built on bases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config, write_yaml
from vggtrain.checkpoint import load_checkpoint
from vggtrain.cli import main
from vggtrain.config import (
    BASE_MAX_DEPTH,
    PROJECT_CONFIGS,
    check_run_name,
    config_from_dict,
    dump_config,
    load_config,
)
from vggtrain.errors import ConfigError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _error(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(str(path), overrides)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config error: "), msg
    return msg


def test_a_chain_merges_key_by_key_later_files_winning(tmp_path):
    _write(tmp_path / "lib" / "_a.yaml", "seed: 1\noptim:\n  lr: 0.3\n  momentum: 0.5\n"
                                         "model:\n  arch: custom\n  layers: [8, M, 16]\n")
    _write(tmp_path / "lib" / "_b.yaml", "base: _a.yaml\noptim:\n  momentum: 0.7\n"  # beside _b
                                         "model:\n  layers: [4]\n")
    top = _write(tmp_path / "top.yaml", "base: lib/_b.yaml\nseed: 3\ntrain:\n  epochs: 2\n")
    cfg = load_config(str(top))
    assert (cfg.seed, cfg.optim.lr, cfg.optim.momentum, cfg.train.epochs) == (3, 0.3, 0.7, 2)
    assert cfg.model.arch == "custom" and cfg.model.layers == [4]  # a list is replaced, not merged
    assert cfg.optim.weight_decay == 5e-4  # untouched keys keep their defaults
    cfg = load_config(str(top), ["optim.momentum=0.8", "model.layers=[2, M]"])  # --set after the merge
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.model.layers) == (0.3, 0.8, [2, "M"])


def test_a_list_of_bases_later_wins_and_a_diamond_is_no_cycle(tmp_path):
    _write(tmp_path / "_d.yaml", "optim:\n  lr: 0.1\n  momentum: 0.2\n  weight_decay: 0.01\n")
    _write(tmp_path / "_b.yaml", "base: _d.yaml\noptim:\n  lr: 0.4\n")
    _write(tmp_path / "_c.yaml", "base: _d.yaml\noptim:\n  momentum: 0.6\n")
    cfg = load_config(str(_write(tmp_path / "a.yaml", "base: [_b.yaml, _c.yaml]\n")))
    # _c's chain sets lr 0.1 again (from _d), after _b's 0.4: the later base wins whole
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.6, 0.01)
    cfg = load_config(str(_write(tmp_path / "e.yaml", "base: [_c.yaml, _b.yaml]\n")))
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.4, 0.2)
    assert load_config(str(_write(tmp_path / "n.yaml", "base: []\nseed: 4\n"))).seed == 4


def test_the_run_is_named_by_the_file_that_is_run(tmp_path):
    _write(tmp_path / "_base.yaml", "name: from-base\nseed: 9\n")
    cfg = load_config(str(_write(tmp_path / "exp1.yaml", "base: _base.yaml\n")))
    assert (cfg.name, cfg.seed) == ("exp1", 9)  # the stem, not the base's name: nor its stem
    cfg = load_config(str(_write(tmp_path / "exp2.yaml", "base: _base.yaml\nname: mine\n")))
    assert cfg.name == "mine"
    # a file basing on a runnable config is its own run, not that config's
    cfg = load_config(str(_write(tmp_path / "v.yaml", "base: vgg16_cifar.yaml\noptim:\n  lr: 0.05\n")))
    assert (cfg.name, cfg.optim.lr, cfg.optim.ema_decay, cfg.model.arch) == ("v", 0.05, 0.999, "vgg16")


def test_an_error_names_the_file_that_set_the_key(tmp_path):
    _write(tmp_path / "lib" / "_vgg.yaml", "optim:\n  lr: -1\n  lrr: 1\n")
    top = _write(tmp_path / "run.yaml", "base: lib/_vgg.yaml\noptim:\n  momentum: 0.5\n")
    lib = tmp_path / "lib" / "_vgg.yaml"
    error = _error(top)
    assert error.startswith(f"config error: {top} (set in {lib}): unknown key optim.lrr "
                            "(expected one of: lr, momentum, nesterov, ")  # the section's keys follow
    assert error.endswith(")") and "\n" not in error
    _write(lib, "optim:\n  lr: -1\n")
    assert _error(top) == f"config error: {top} (set in {lib}): optim.lr must be > 0 (got -1)"
    # through a chain: the file deepest down that set it
    mid = _write(tmp_path / "lib" / "_mid.yaml", "base: _vgg.yaml\nseed: 1\n")
    top2 = _write(tmp_path / "run2.yaml", f"base: {mid}\n")
    assert f"{top2} (set in {lib}): optim.lr must be > 0" in _error(top2)
    # the file itself, or a --set, that sets it over the base: its own error, today's format
    top3 = _write(tmp_path / "run3.yaml", "base: lib/_vgg.yaml\noptim:\n  lr: -2\n")
    assert _error(top3) == f"config error: {top3}: optim.lr must be > 0 (got -2)"
    assert _error(top, ["optim.lr=-3"]) == "config error: --set optim.lr=-3: optim.lr must be > 0 (got -3)"
    assert load_config(str(top), ["optim.lr=0.1"]).optim.lr == 0.1


def test_a_rule_across_files_names_the_base_of_the_refused_key(tmp_path):
    # model.whiten_bias_epochs comes from _airbench.yaml, through airbench94.yaml
    mine = _write(tmp_path / "mine.yaml", "base: airbench94.yaml\nmodel:\n  whiten: none\n")
    assert _error(mine) == (f"config error: {mine} (set in _airbench.yaml): model.whiten_bias_epochs "
                            "needs model.whiten (a whitening layer whose bias trains)")
    # a section a base set as a whole: the section's file
    _write(tmp_path / "_bad.yaml", "data: 3\n")
    assert _error(_write(tmp_path / "s.yaml", "base: _bad.yaml\n")).endswith(
        f"s.yaml (set in {tmp_path / '_bad.yaml'}): data must be a mapping (got 3)")


def test_a_section_replaced_whole_forgets_the_files_of_its_keys(tmp_path):
    _write(tmp_path / "_one.yaml", "data:\n  mean: [0.5, 0.5, 0.5]\n")
    _write(tmp_path / "_two.yaml", "data: null\n")
    top = _write(tmp_path / "t.yaml", "base: [_one.yaml, _two.yaml]\ndata:\n  std: [0.2, 0.2, 0.2]\n")
    # data.mean is absent in the end (_two.yaml dropped it): the rule's key is t.yaml's, not _one.yaml's
    assert _error(top) == f"config error: {top}: data.mean and data.std are set together (or both null)"
    top.write_text("base: [_one.yaml]\ndata:\n  std: [0.2, 0.2, 0.2]\n")
    cfg = load_config(str(top))  # merged key by key: both set
    assert (cfg.data.mean, cfg.data.std) == ([0.5] * 3, [0.2] * 3)


@pytest.mark.parametrize("files, top, expected", [
    ({"a.yaml": "base: a.yaml\n"}, "a.yaml", "a.yaml: base a.yaml: a cycle (A/a.yaml -> A/a.yaml)"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: [c.yaml, a.yaml]\n", "c.yaml": "seed: 1\n"}, "a.yaml",
     "b.yaml: base a.yaml: a cycle (A/a.yaml -> A/b.yaml -> A/a.yaml)"),
    ({"a.yaml": "base: nope.yaml\n"}, "a.yaml",
     "A/a.yaml: base nope.yaml: no such config file (looked beside it, in configs/ and "),
    ({"a.yaml": "base: sub/nope.yaml\n"}, "a.yaml",
     "A/a.yaml: base sub/nope.yaml: no such config file (looked beside it)"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "optim: {lr: [1\n"}, "a.yaml", "A/b.yaml: invalid YAML"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": ""}, "a.yaml", "A/b.yaml: file is empty"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "- 1\n"}, "a.yaml", "A/b.yaml: the top level must be a mapping"),
    ({"a.yaml": "base: 3\n"}, "a.yaml", "A/a.yaml: base must be a config file name or a list of them "
                                         "(got 3)"),
    ({"a.yaml": "base: [b.yaml, {x: 1}]\n"}, "a.yaml", "base must be a config file name or a list of them"),
    ({"a.yaml": "base: ''\n"}, "a.yaml", "base must be a config file name or a list of them"),
    ({"a.yaml": "base: \"b\\0.yaml\"\n"}, "a.yaml", "base b\\x00.yaml: no such config file"),
    ({"a.yaml": "base: " + "x" * 5000 + ".yaml\n"}, "a.yaml", "no such config file"),
    ({"a.yaml": "optim:\n  base: b.yaml\n"}, "a.yaml", "unknown key optim.base"),
])
def test_bad_bases_are_one_line_errors(tmp_path, files, top, expected):
    folder = tmp_path / "A"
    for name, text in files.items():
        _write(folder / name, text)
    assert expected.replace("A/", f"{folder}/") in _error(folder / top)


def test_a_base_that_is_a_directory_or_a_fifo_is_refused(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    top = _write(tmp_path / "a.yaml", "base: d.yaml\n")
    assert "base d.yaml: no such config file" in _error(top)
    (tmp_path / "d.yaml").rmdir()
    os.mkfifo(tmp_path / "d.yaml")
    assert _error(top).endswith(f"{tmp_path / 'd.yaml'}: a FIFO (named pipe), not a regular file")


def test_chains_are_bounded(tmp_path):
    for i in range(BASE_MAX_DEPTH + 2):
        _write(tmp_path / f"f{i}.yaml", f"base: f{i + 1}.yaml\n")
    _write(tmp_path / f"f{BASE_MAX_DEPTH + 2}.yaml", "seed: 7\n")
    assert f"bases nest more than {BASE_MAX_DEPTH} files deep" in _error(tmp_path / "f0.yaml")
    assert load_config(str(tmp_path / "f3.yaml")).seed == 7  # 16 files in all: allowed
    # a wide tree: each file bases two others, four levels: more files than allowed in all
    for level in range(7):
        _write(tmp_path / f"w{level}.yaml", f"base: [w{level + 1}.yaml, w{level + 1}.yaml]\n")
    _write(tmp_path / "w7.yaml", "seed: 1\n")
    assert "more than 64 files in all" in _error(tmp_path / "w0.yaml")


def test_set_base_is_refused(tmp_path):
    top = _write(tmp_path / "a.yaml", "seed: 1\n")
    assert _error(top, ["base=b.yaml"]).startswith("config error: --set base=b.yaml: base: is read from "
                                                   "config files only")


def test_cli_refuses_a_cycle_with_one_line_and_exit_2(tmp_path, capsys):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    assert main(["fit", "--config", str(tmp_path / "a.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a cycle" in err and "Traceback" not in err


def test_the_run_directory_holds_the_resolved_config(cifar_bin, tmp_path):
    base = tiny_config(cifar_bin, tmp_path / "runs", train={"epochs": 1})
    del base["name"]
    (tmp_path / "lib").mkdir()
    write_yaml(tmp_path / "lib" / "_tiny.yaml", base)
    top = _write(tmp_path / "exp.yaml", "base: lib/_tiny.yaml\noptim:\n  lr: 0.02\n")
    assert main(["fit", "--config", str(top)]) == 0
    run = tmp_path / "runs" / "exp"
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert "base" not in stored and stored["optim"]["lr"] == 0.02 and stored["name"] == "exp"
    assert (run / "config.yaml").read_text() == dump_config(load_config(str(top)))
    assert load_checkpoint(run / "last.pt")["config"] == stored
    # the bases may change or go: the run resumes, and is evaluated, from its own config
    (tmp_path / "lib" / "_tiny.yaml").unlink()
    assert main(["fit", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert main(["eval", "--ckpt", str(run / "last.pt")]) == 0


# --- the shipped configs ---------------------------------------------------------------------------

RUNNABLE = sorted(p for p in PROJECT_CONFIGS.glob("*.yaml") if not p.name.startswith("_"))
BASES = sorted(PROJECT_CONFIGS.glob("_*.yaml"))


def test_every_shipped_config_loads_and_is_named_by_its_file():
    assert len(RUNNABLE) >= 9 and len(BASES) >= 2
    for path in RUNNABLE:
        cfg = load_config(path.name)
        assert cfg.name == path.stem, path.name
        assert "base" not in yaml.safe_load(dump_config(cfg))
        assert config_from_dict(yaml.safe_load(dump_config(cfg)), "round-trip") == cfg


def test_shipped_bases_cannot_name_a_run():
    for path in BASES:
        with pytest.raises(ConfigError, match="cannot name the run"):
            check_run_name(load_config(path.name), path.name)


def test_the_vgg_recipes_differ_only_in_the_arch():
    dicts = {n: load_config(f"vgg{n}_cifar").to_dict() for n in (11, 13, 19)}
    for n, d in dicts.items():
        assert d["model"].pop("arch") == f"vgg{n}" and d.pop("name") == f"vgg{n}_cifar"
    assert dicts[11] == dicts[13] == dicts[19]
    # vgg16's recipe is the same base with its regularisers on top
    vgg16, vgg11 = load_config("vgg16_cifar"), load_config("vgg11_cifar")
    assert (vgg16.optim.momentum, vgg16.optim.weight_decay, vgg16.train.epochs, vgg16.train.batch_size) == \
        (vgg11.optim.momentum, vgg11.optim.weight_decay, vgg11.train.epochs, vgg11.train.batch_size)
    assert (vgg16.data.cutout, vgg16.optim.ema_decay, vgg16.schedule.milestones) == (12, 0.999, [45, 70])


def test_the_16_epoch_muon_recipe_differs_only_in_length():
    short, long = load_config("airbench94_muon").to_dict(), load_config("airbench94_muon_16ep").to_dict()
    assert (short["train"].pop("epochs"), long["train"].pop("epochs")) == (8, 16)
    assert (short.pop("name"), long.pop("name")) == ("airbench94_muon", "airbench94_muon_16ep")
    assert short == long
    # airbench94 and airbench94_muon share the network, data and evaluation (_airbench.yaml)
    a94 = load_config("airbench94").to_dict()
    for d in (a94, short):
        d["model"].pop("logit_scale")
    assert (a94["model"], a94["data"], a94["train"]["tta"]) == (short["model"], short["data"], "multicrop")
