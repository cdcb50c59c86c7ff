from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vggtrain.cli import main
from vggtrain.config import (
    PROJECT_CONFIGS,
    SECTIONS,
    TrainConfig,
    check_resume_changes,
    config_from_dict,
    config_with_overrides,
    dump_config,
    load_config,
)
from vggtrain.errors import ConfigError

SHIPPED = sorted(p.name for p in PROJECT_CONFIGS.glob("*.yaml"))


def test_shipped_configs_are_valid():
    assert {"vgg11_cifar.yaml", "vgg13_cifar.yaml", "vgg16_cifar.yaml", "vgg19_cifar.yaml",
            "smoke.yaml"} <= set(SHIPPED)
    for name in SHIPPED:
        cfg = load_config(name)
        assert isinstance(cfg, TrainConfig)
    cfg = load_config("vgg16_cifar.yaml")
    assert (cfg.model.arch, cfg.model.batch_norm, cfg.optim.momentum, cfg.optim.weight_decay) == \
        ("vgg16", True, 0.9, 5e-4)


def test_bare_name_is_found_in_project_configs_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("vgg13_cifar.yaml").model.arch == "vgg13"
    assert load_config("vgg13_cifar").model.arch == "vgg13"


def test_resolved_config_round_trips():
    cfg = load_config("vgg19_cifar.yaml", ["optim.lr=0.2", "model.layers=null"])
    import yaml

    again = config_from_dict(yaml.safe_load(dump_config(cfg)), "round-trip")
    assert again == cfg and again.optim.lr == 0.2


def test_set_values_are_parsed_as_yaml_scalars():
    cfg = load_config("smoke.yaml", ["optim.lr=1e-3", "optim.nesterov=true", "train.epochs=7",
                                     "model.layers=[8, M, 16]", "data.root=/x/y"])
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.nesterov is True and cfg.train.epochs == 7
    assert cfg.model.layers == [8, "M", 16] and cfg.data.root == "/x/y"


def _error(tmp_path: Path, text: str | bytes, overrides: list[str] = ()) -> str:
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path), overrides)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config error: ")
    return msg


def test_error_names_file_and_dotted_key(tmp_path):
    msg = _error(tmp_path, "optim:\n  lr: -1\n")
    assert msg == f"config error: {tmp_path / 'c.yaml'}: optim.lr must be > 0 (got -1)"


@pytest.mark.parametrize("text, expected", [
    ("optim:\n  lr: 0\n", "optim.lr must be > 0"),
    ("optim:\n  lr: .nan\n", "optim.lr must be a number"),
    ("optim:\n  lr: .inf\n", "optim.lr must be a number"),
    ("optim:\n  lr: fast\n", "optim.lr must be a number (got 'fast')"),
    ("optim:\n  lr: 1e999\n", "optim.lr must be a number"),
    ("optim:\n  momentum: 1.0\n", "optim.momentum must be in [0, 1)"),
    ("optim:\n  weight_decay: -0.1\n", "optim.weight_decay must be in [0, 1)"),
    ("optim:\n  nesterov: 1\n", "optim.nesterov must be true or false (got 1)"),
    ("optim:\n  label_smoothing: 1\n", "optim.label_smoothing must be in [0, 1)"),
    ("schedule:\n  gamma: 0\n", "schedule.gamma must be in (0, 1]"),
    ("schedule:\n  gamma: 1.5\n", "schedule.gamma must be in (0, 1]"),
    ("schedule:\n  step_size: 0\n", "schedule.step_size must be >= 1"),
    ("train:\n  batch_size: 0\n", "train.batch_size must be >= 1"),
    ("train:\n  batch_size: 12.5\n", "train.batch_size must be an integer (got 12.5)"),
    ("train:\n  batch_size: true\n", "train.batch_size must be an integer (got True)"),
    ("train:\n  epochs: 100000000000000000000000000000\n", "train.epochs must be <= 1e+06"),
    ("train:\n  precision: fp8\n", "train.precision must be one of fp32, bf16, fp16"),
    ("train:\n  device: tpu\n", "train.device must be auto, cpu, cuda, cuda:N or mps"),
    ("data:\n  val_size: -5\n", "data.val_size must be >= 0"),
    ("model:\n  arch: vgg17\n", "model.arch must be one of vgg11, vgg13, vgg16, vgg19, custom"),
    ("model:\n  width: 0\n", "model.width must be > 0"),
    ("model:\n  width: 17\n", "model.width must be <= 16"),
    ("optim:\n  lr: 1000\n", "optim.lr must be <= 100"),
    ("model:\n  head: conv\n", "model.head must be one of linear, mlp"),
    ("model:\n  arch: custom\n", "model.layers is required when model.arch is custom"),
    ("model:\n  layers: [8, M]\n", "model.layers is only used with model.arch: custom"),
    ("model:\n  arch: custom\n  layers: [8, X]\n", "model.layers entries must be channel counts"),
    ("model:\n  arch: custom\n  layers: [M, M]\n", "model.layers must contain at least one"),
    ("model:\n  arch: custom\n  layers: [8, M, M, M, M, M, M]\n", "at most 5 'M' pools"),
    ("model:\n  arch: custom\n  layers: 8\n", "model.layers must be a list or null (got 8)"),
    ("optim:\n  lrr: 0.1\n", "unknown key optim.lrr (expected one of: lr, momentum"),
    ("trainer:\n  epochs: 1\n", "unknown key trainer (expected one of: name, seed, data"),
    ("optim: 3\n", "optim must be a mapping (got 3)"),
    ("name: ../escape\n", "name must be 1-100 letters"),
    ("", "file is empty"),
    ("- 1\n- 2\n", "the top level must be a mapping"),
    ("optim: {lr: [1\n", "invalid YAML"),
    ("!!python/object/apply:os.system ['touch pwned']\n", "invalid YAML"),
    (b"name: caf\xe9\n", "not UTF-8"),
])
def test_invalid_values_are_one_line_errors(tmp_path, text, expected):
    assert expected in _error(tmp_path, text)


def test_yaml_tags_execute_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _error(tmp_path, "!!python/object/apply:os.system ['touch pwned']\n")
    assert not (tmp_path / "pwned").exists()


def test_scientific_notation_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 5e-4\n")
    assert load_config(str(path)).optim.weight_decay == pytest.approx(5e-4)


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=-1", "--set optim.lr=-1: optim.lr must be > 0 (got -1)"),
    ("optim.lrr=1", "unknown key optim.lrr"),
    ("optim", "--set optim: expected key.sub=value"),
    ("optim.lr.x=1", "--set optim.lr.x=1: lr is not a section"),
    ("train.epochs=[1", "value is not valid YAML"),
])
def test_set_overrides_are_validated_the_same_way(tmp_path, override, expected):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n")
    assert expected in _error(tmp_path, path.read_text(), [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no-such.yaml: no such config file"):
        load_config("no-such.yaml")


def test_cli_config_error_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: -1\n")
    assert main(["fit", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lr must be > 0 (got -1)" in err and "Traceback" not in err


def test_cli_usage_error_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--bogus"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("flag, value, expected", [
    ("--device", "gpu", "argument --device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("--name", "my run", "argument --name: a run name is 1-100 letters"),
])
def test_fit_flags_are_checked_as_flags(flag, value, expected, capsys):
    # The error names the flag the user typed, not the --set it becomes.
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "smoke.yaml", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and expected in err and "--set" not in err, err


def test_a_file_name_that_cannot_name_a_new_run_is_refused(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    for stem in ("my run", "_base", ".", "x" * 101, "run\n"):
        path = tmp_path / f"{stem}.yaml"
        path.write_text(f"train:\n  out_dir: {tmp_path / 'runs'}\ndata:\n  root: {tmp_path / 'data'}\n")
        assert main(["fit", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot name the run" in err and "pass --name" in err, err
        assert main(["summary", "--config", str(path)]) == 0  # names no run: nothing to refuse
        capsys.readouterr()
        assert main(["fit", "--config", str(path), "--name", "ok"]) == 2  # on to the (missing) data
        assert "no CIFAR-10 found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_errors_show_huge_or_deep_values_briefly(tmp_path, capsys):
    # Ten levels of aliases, ten-fold each: 10^10 leaves if the error message expanded them.
    levels = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"model:\n  arch: [{', '.join(levels)}]\n")
    with pytest.raises(ConfigError, match=r"more than 100,000 values once its aliases are expanded") as e:
        load_config(str(bomb))  # refused by the loader before any caller walks the value
    assert len(str(e.value)) < 300
    small = tmp_path / "small.yaml"  # a few nested aliases: loads, and the message stays brief
    small.write_text(f"model:\n  arch: [{', '.join(levels[:3])}]\n")
    with pytest.raises(ConfigError, match=r"model\.arch must be a string \(got \[\[") as e:
        load_config(str(small))
    assert len(str(e.value)) < 200
    cases = [("[" * 5000, "--set seed: value is nested too deeply"),
             ("x" * 5000, "--set seed=xxxxx"), ("[" * 400 + "]" * 400, "--set seed=[[[[[")]
    if hasattr(sys, "get_int_max_str_digits"):  # Python's int/text digit limit (3.10.7 and later)
        digits = tmp_path / "digits.yaml"
        digits.write_text("seed: " + "9" * 6000 + "\n")
        with pytest.raises(ConfigError, match=r"digits\.yaml: invalid YAML: a value cannot be read"):
            load_config(str(digits))
        with pytest.raises(ConfigError, match=r"seed must be .*\(got a value too large to show\)"):
            config_from_dict({"seed": 10 ** 6000}, "a checkpoint")  # a pickled int has no such limit
        with pytest.raises(ConfigError, match=r"bad entry a value too large to show"):
            config_from_dict({"model": {"layers": [10 ** 6000]}}, "a checkpoint")
        cases.append(("9" * 6000, "--set seed: value cannot be read"))
    for value, expected in cases:
        assert main(["fit", "--config", str(small), "--set", "seed=" + value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and len(err) < 300, err[:300]


# Each key that only some runs use: set away from its default where it does not apply (refused,
# naming the key and what uses it), and the same value where it applies (loads).
NOT_APPLYING = [
    ("data.labels", "data: {labels: coarse}", "data: {labels: coarse, dataset: cifar100}",
     "data.labels: coarse is CIFAR-100's 20 superclasses (data.dataset is cifar10)"),
    ("data.download", "data: {dataset: folder, download: true}", "data: {download: true}",
     "data.download applies only with data.dataset: cifar10 or cifar100"),
    ("data.val_seed", "data: {val_size: 0, val_seed: 3}", "data: {val_seed: 3}",
     "data.val_seed needs a validation split (data.val_size is 0)"),
    ("data.crop_padding", "data: {augment: false, crop_padding: 2}", "data: {crop_padding: 2}",
     "data.crop_padding applies only with data.augment: true"),
    ("data.crop_pad_mode", "data: {crop_padding: 0, crop_pad_mode: reflect}",
     "data: {crop_pad_mode: reflect}",
     "data.crop_pad_mode applies only with data.augment: true and data.crop_padding > 0"),
    ("data.flip", "data: {augment: false, flip: alternating}", "data: {flip: alternating}",
     "data.flip applies only with data.augment: true"),
    ("data.cutout", "data: {augment: false, cutout: 8}", "data: {cutout: 8}",
     "data.cutout applies only with data.augment: true"),
    ("data.policy", "data: {augment: false, policy: trivialaugment}", "data: {policy: trivialaugment}",
     "data.policy applies only with data.augment: true"),
    ("data.policy_ops", "data: {policy: autoaugment, policy_ops: 3}",
     "data: {policy: randaugment, policy_ops: 3}",
     "data.policy_ops applies only with data.policy: randaugment"),
    ("data.policy_magnitude", "data: {policy_magnitude: 15}",
     "data: {policy: randaugment, policy_magnitude: 15}",
     "data.policy_magnitude applies only with data.policy: randaugment"),
    ("data.random_erasing", "data: {augment: false, random_erasing: 0.25}", "data: {random_erasing: 0.25}",
     "data.random_erasing applies only with data.augment: true"),
    ("data.mix_prob", "data: {mix_prob: 0.5}", "data: {mix_prob: 0.5, cutmix_alpha: 1.0}",
     "data.mix_prob applies only with data.mixup_alpha > 0 or data.cutmix_alpha > 0"),
    ("data.mix_switch_prob", "data: {mix_switch_prob: 0.2, mixup_alpha: 0.2}",
     "data: {mix_switch_prob: 0.2, mixup_alpha: 0.2, cutmix_alpha: 1.0}",
     "data.mix_switch_prob applies only with data.mixup_alpha > 0 and data.cutmix_alpha > 0"),
    ("data.select_layers", "data: {select_layers: [8, M]}", "data: {select_layers: [8, M], select_keep: 0.5}",
     "data.select_layers applies only with data.select_keep set"),
    ("data.select_every", "data: {select_every: 2}", "data: {select_every: 2, select_keep: 0.5}",
     "data.select_every applies only with data.select_keep set"),
    ("model.layers", "model: {layers: [8, M]}", "model: {layers: [8, M], arch: custom}",
     "model.layers is only used with model.arch: custom (got arch 'vgg16')"),
    ("model.hidden", "model: {hidden: 256}", "model: {hidden: 256, head: mlp}",
     "model.hidden applies only with model.head: mlp"),
    ("model.dropout", "model: {dropout: 0.1}", "model: {dropout: 0.1, head: mlp}",
     "model.dropout applies only with model.head: mlp"),
    ("model.whiten_bias_epochs", "model: {whiten_bias_epochs: 3}",
     "model: {whiten_bias_epochs: 3, whiten: 2x2}",
     "model.whiten_bias_epochs needs model.whiten (a whitening layer whose bias trains)"),
    ("model.bn_momentum", "model: {batch_norm: false, bn_momentum: 0.4}", "model: {bn_momentum: 0.4}",
     "model.bn_momentum applies only with model.batch_norm: true"),
    ("model.bn_eps", "model: {batch_norm: false, bn_eps: 1.0e-12}", "model: {bn_eps: 1.0e-12}",
     "model.bn_eps applies only with model.batch_norm: true"),
    ("model.bn_weight", "model: {batch_norm: false, bn_weight: false}", "model: {bn_weight: false}",
     "model.bn_weight applies only with model.batch_norm: true"),
    ("optim.nesterov", "optim: {name: adamw, nesterov: true}", "optim: {name: muon, nesterov: true}",
     "optim.nesterov applies only with optim.name: sgd or muon, and optim.momentum > 0"),
    ("optim.bn_bias_lr_scale", "{model: {batch_norm: false}, optim: {bn_bias_lr_scale: 64}}",
     "optim: {bn_bias_lr_scale: 64}", "optim.bn_bias_lr_scale applies only with model.batch_norm: true"),
    ("optim.lookahead_final_full_sync", "optim: {lookahead_final_full_sync: true}",
     "optim: {lookahead_final_full_sync: true, lookahead_every: 5}",
     "optim.lookahead_final_full_sync applies only with optim.lookahead_every > 0"),
    ("optim.whiten_bias_lr_scale", "optim: {whiten_bias_lr_scale: 64}",
     "{optim: {whiten_bias_lr_scale: 64}, model: {whiten: 2x2, whiten_bias_epochs: 3}}",
     "optim.whiten_bias_lr_scale applies to the whitening bias of model.whiten_bias_epochs, which is not "
     "set"),
    ("optim.muon_lr", "optim: {muon_lr: 0.3}", "optim: {muon_lr: 0.3, name: muon}",
     "optim.muon_lr applies only with optim.name: muon"),
    ("optim.muon_momentum", "optim: {name: adamw, muon_momentum: 0.9}",
     "optim: {muon_momentum: 0.9, name: muon}", "optim.muon_momentum applies only with optim.name: muon"),
    ("optim.adam_beta2", "optim: {adam_beta2: 0.99}", "optim: {adam_beta2: 0.99, name: adamw}",
     "optim.adam_beta2 applies only with optim.name: adamw"),
    ("schedule.step_size", "schedule: {kind: cosine, step_size: 10}", "schedule: {step_size: 10}",
     "schedule.step_size applies only with schedule.kind: step"),
    ("schedule.gamma", "schedule: {kind: linear, gamma: 0.5}", "schedule: {kind: multistep, gamma: 0.5}",
     "schedule.gamma applies only with schedule.kind: step or multistep"),
    ("schedule.milestones", "schedule: {milestones: [10, 20]}",
     "schedule: {milestones: [10, 20], kind: multistep}",
     "schedule.milestones applies only with schedule.kind: multistep"),
    ("schedule.start_factor", "schedule: {kind: linear, start_factor: 1.0}",
     "schedule: {kind: onecycle, start_factor: 1.0, warmup_epochs: 0.5}",
     "schedule.start_factor applies only with schedule.warmup_epochs > 0 and schedule.kind: multistep, "
     "linear, cosine or onecycle"),
    ("schedule.end_factor", "schedule: {end_factor: 0.1}", "schedule: {end_factor: 0.1, kind: cosine}",
     "schedule.end_factor applies only with schedule.kind: linear, cosine or onecycle"),
    ("train.sync_bn", "{model: {batch_norm: false}, train: {sync_bn: true}}", "train: {sync_bn: true}",
     "train.sync_bn applies only with model.batch_norm: true"),
    ("train.early_stop", "{data: {val_size: 0}, train: {early_stop: {patience: 3}}}",
     "train: {early_stop: {patience: 3}}", "train.early_stop needs a validation split (data.val_size is 0)"),
    ("optim.lr_scale_backbone", "optim: {lr_scale_backbone: 0.1}",
     "{optim: {lr_scale_backbone: 0.1}, init: {from: runs/a}}",
     "optim.lr_scale_backbone applies only with init.from set"),
    ("init.freeze", "init: {freeze: [features]}", "init: {freeze: [features], from: runs/a}",
     "init.freeze applies only with init.from set"),
    ("distill.alpha", "distill: {alpha: 0.9}", "distill: {alpha: 0.9, teachers: [runs/a]}",
     "distill.alpha applies only with distill.teachers set"),
    ("distill.temperature", "distill: {temperature: 2}", "distill: {temperature: 2, teachers: [runs/a]}",
     "distill.temperature applies only with distill.teachers set"),
]


@pytest.mark.parametrize("key, refused, loads, expected", NOT_APPLYING, ids=[c[0] for c in NOT_APPLYING])
def test_a_key_set_where_it_does_not_apply_is_refused(tmp_path, key, refused, loads, expected):
    assert _error(tmp_path, refused + "\n") == f"config error: {tmp_path / 'c.yaml'}: {expected}"
    (tmp_path / "ok.yaml").write_text(loads + "\n")
    load_config(str(tmp_path / "ok.yaml"))


def test_every_applies_rule_has_its_case():
    import dataclasses
    import typing

    declared = {f"{s}.{f.name}" for s in SECTIONS
                for f in dataclasses.fields(typing.get_type_hints(TrainConfig)[s]) if f.metadata["applies"]}
    assert declared == {key for key, *_ in NOT_APPLYING}


def test_a_default_value_where_it_does_not_apply_is_no_change(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {muon_lr: 0.24, adam_beta2: 0.999}\n"
                    "schedule: {kind: cosine, milestones: [30, 60, 80]}\n"
                    "model: {hidden: 512, batch_norm: false, bn_eps: 1.0e-5}\n")
    assert load_config(str(path)).schedule.kind == "cosine"
    assert "--set optim.muon_lr=0.3: optim.muon_lr applies only with optim.name: muon" in \
        _error(tmp_path, path.read_text(), ["optim.muon_lr=0.3"])
    assert "c.yaml: optim.muon_lr applies only with optim.name: muon" in \
        _error(tmp_path, "optim: {name: muon, muon_lr: 0.3}\n", ["optim.name=sgd"])


def test_a_runs_own_config_with_a_key_that_did_not_apply_still_reads_back():
    # A run from before the rule (the key then silently ignored) still evaluates and resumes ...
    stored = TrainConfig().to_dict()
    stored["optim"]["muon_lr"], stored["schedule"]["kind"] = 0.3, "cosine"
    cfg = config_from_dict(stored, "last.pt", stored=True)
    assert cfg.optim.muon_lr == 0.3
    check_resume_changes(stored, config_with_overrides(stored, "last.pt", ["train.epochs=50"], stored=True),
                         "last.pt")
    # ... but a --set of such a key now is refused, and so is the same config as a new one.
    with pytest.raises(ConfigError, match=r"--set schedule.step_size=5: schedule.step_size applies only"):
        config_with_overrides(stored, "last.pt", ["schedule.step_size=5"], stored=True)
    with pytest.raises(ConfigError, match="optim.muon_lr applies only with optim.name: muon"):
        config_from_dict(stored, "new.yaml")


@pytest.mark.parametrize("section, key, given, held", [
    ("train", "tta", "true", "flip"), ("train", "tta", "false", "none"),
    ("train", "tta", "multicrop", "multicrop"), ("model", "whiten", "true", "3x3"),
    ("model", "whiten", "false", "none"), ("model", "whiten", "2x2", "2x2"),
    ("model", "whiten", "none", "none"),
])
def test_tta_and_whiten_take_true_false_or_a_name_and_hold_the_name(tmp_path, section, key, given, held):
    import yaml

    raw = {"model": {"arch": "custom", "layers": [16, "M"]}}  # a first width 3x3 whitening takes
    raw.setdefault(section, {})[key] = yaml.safe_load(given)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(str(path))
    assert getattr(getattr(cfg, section), key) == held
    assert config_from_dict(yaml.safe_load(dump_config(cfg)), "again") == cfg  # written as the name
    assert f"{section}.{key} must be true or false or a string (got 3)" in \
        _error(tmp_path, f"{section}: {{{key}: 3}}\n")
