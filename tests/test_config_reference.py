"""docs/config.md is config_reference.render() of config.py's declarations, and shows every key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from vggtrain.config import SECTIONS, TrainConfig, default_of, yaml_key
from vggtrain.config_reference import ALL_SECTIONS, COMMAND, main, render
from vggtrain.errors import ConfigError

PAGE = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def _section_fields(section: str) -> list[dataclasses.Field]:
    if section == "top":
        return [f for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS]
    return list(dataclasses.fields(typing.get_type_hints(TrainConfig)[section]))


def _rows(text: str) -> dict[str, list[str]]:
    """The table rows of a rendered page by key: [type, default, allowed, meaning]."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_the_page_is_the_rendered_reference():
    assert PAGE.read_text(encoding="utf-8") == render(), \
        f"docs/config.md differs from config.py's declarations: regenerate it with `{COMMAND}`"
    assert render().splitlines()[0] == f"*Generated from vggtrain/config.py by `{COMMAND}` — do not edit.*"


def test_every_key_of_every_section_has_its_type_default_and_meaning():
    rows = _rows(render())
    keys = []
    for section in ALL_SECTIONS:
        for f in _section_fields(section):
            key = f.name if section == "top" else f"{section}.{yaml_key(f)}"
            keys.append(key)
            assert key in rows, f"{key} is missing from the reference"
            type_, default, allowed, meaning = rows[key]
            assert type_ and allowed and meaning.startswith(f.metadata["doc"][:20]), key
            assert yaml.safe_load(default.strip("`")) == default_of(f), key  # the default, as YAML reads it
            applies = f.metadata["applies"]
            shown = f"*Applies only with {applies.when}.*" if applies else "*Applies only with"
            assert (shown in meaning) == (applies is not None), key
    assert rows["base"][:2] == ["str or list[str] or null", "`null`"]  # a file's key, no field
    assert sorted(rows) == sorted([*keys, "base"])  # nothing else


def test_one_section_and_an_unknown_one():
    optim = render("optim")
    assert optim.startswith("## `optim:`") and "optim.muon_lr" in optim and "schedule.kind" not in optim
    assert optim in render()
    assert set(_rows(render("top"))) == {"base", "name", "seed"}
    with pytest.raises(ConfigError, match=r"unknown config section 'optimizer' \(expected one of: top, "
                                          r"data, model, optim, schedule, train, init, distill, log\)"):
        render("optimizer")


def test_the_module_prints_the_page_or_one_line_error(capsys):
    assert main([]) == 0
    assert capsys.readouterr().out == render()
    assert main(["nope"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("config error: unknown config section")
