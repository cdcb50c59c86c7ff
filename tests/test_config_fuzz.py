"""Property: any mapping or text is either a valid config or a one-line config error."""

from __future__ import annotations

import dataclasses

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vggtrain.config import TrainConfig, config_from_dict, dump_config, load_config, yaml_key
from vggtrain.errors import ConfigError

SECTIONS = {f.name: [yaml_key(g) for g in dataclasses.fields(f.default_factory())]
            for f in dataclasses.fields(TrainConfig) if f.default_factory is not dataclasses.MISSING}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["vgg16", "custom", "M", "cpu", "bf16", "mlp", "max", "5e-4", "auto"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
keys = st.one_of(st.sampled_from(["name", "seed"]), st.text(max_size=8))


@st.composite
def config_mappings(draw):
    raw = draw(st.dictionaries(keys, values, max_size=2))
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True)):
        fields = st.sampled_from(SECTIONS[section]) | st.text(max_size=6)
        raw[section] = draw(st.dictionaries(fields, values, max_size=4))
    return raw


def _check(outcome) -> None:
    if isinstance(outcome, ConfigError):
        msg = str(outcome)
        assert msg.startswith("config error: ") and "\n" not in msg
    else:
        assert isinstance(outcome, TrainConfig)
        # a valid config survives being written out and read back
        assert config_from_dict(yaml.safe_load(dump_config(outcome)), "again") == outcome


@settings(max_examples=400, deadline=None)
@given(config_mappings())
def test_any_mapping_is_a_config_or_one_line_error(raw):
    try:
        outcome = config_from_dict(raw, "fuzz.yaml")
    except ConfigError as e:
        outcome = e
    _check(outcome)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_any_file_is_a_config_or_one_line_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    try:
        outcome = load_config(str(path))
    except ConfigError as e:
        outcome = e
    _check(outcome)
