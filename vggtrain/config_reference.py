"""The config reference, rendered from the declarations in config.py (each field's type, default,
rule, meaning and when it applies; each section's rules across keys): docs/config.md is its
output, and `vggtrain config --keys [SECTION]` prints it.

    python -m vggtrain.config_reference > docs/config.md     # after changing a field
"""

from __future__ import annotations

import re
import sys
import typing
from dataclasses import Field, fields

from vggtrain.config import BASE_DOC, BASE_RULE, SECTION_RULES, SECTIONS, TrainConfig, default_of, yaml_key
from vggtrain.errors import ConfigError, UserError

COMMAND = "python -m vggtrain.config_reference > docs/config.md"
TOP = "top"  # the keys outside any section: base, name, seed
ALL_SECTIONS = (TOP, *SECTIONS)

INTRO = f"""\
*Generated from vggtrain/config.py by `{COMMAND}` — do not edit.*

# Config reference

A config is a YAML file of the sections below (`vggtrain fit --config FILE`); `--set
section.key=value` changes one key (the value read as YAML). Every key is optional: an absent
key takes its default. `vggtrain config --keys [SECTION]` prints this page, or one section.

Loading validates every key against its type and its rule; an error names the file (or the
`--set`) and the dotted key on one line and exits 2, e.g. `config error: run.yaml: optim.lr must
be > 0 (got -1)`. A key that only some runs use says so ("applies only with"): set to anything
but its default where it does not apply, it is refused, e.g. `config error: run.yaml:
optim.muon_lr applies only with optim.name: muon`. A run's own config read back (from a
checkpoint or its run directory's `config.yaml`, to evaluate or resume it) is not refused for
such a key, which older versions ignored; a `--set` of it is.

A file may build on others with `base:` (below): their keys merge under its own, and an error in
a key that a base set names that file too, e.g. `config error: run.yaml (set in _base.yaml):
optim.lr must be > 0 (got -1)`.
"""


_UNRULED = {"bool": "true, false", "bool | None": "true, false, null", "str": "any string"}


def _type_text(f: Field) -> str:
    """The field's type as YAML sees it: what it accepts where that differs from what it holds."""
    text = str(f.metadata.get("accepts") or f.type).replace(" | ", " or ").replace("None", "null")
    return re.sub(r"\b\w+Config\b", "mapping", text)  # a sub-mapping's dataclass (train.early_stop)


def yaml_text(value: object) -> str:
    """A default as YAML writes it, flow style: null, true, 0.0005, 1.0e-05, [30, 60, 80], M."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    text = repr(value) if isinstance(value, float) else str(value)
    mantissa, e, exponent = text.partition("e")
    if isinstance(value, float) and e and "." not in mantissa:  # YAML 1.1 reads 1e-05 as a string
        text = f"{mantissa}.0e{exponent}"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(section: str, f: Field) -> str:
    key = f"{section}.{yaml_key(f)}" if section != TOP else f.name
    check, applies = f.metadata.get("check"), f.metadata.get("applies")
    allowed = getattr(check, "rule", None) or _UNRULED.get(str(f.type), "any")
    meaning = f.metadata["doc"].rstrip(".") + "."
    if applies is not None:
        meaning += f" *Applies only with {applies.when}.*"
    cells = [f"`{key}`", _type_text(f), f"`{yaml_text(default_of(f))}`", allowed, meaning]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _base_row() -> str:
    """base: is a key of a config file but no field of TrainConfig: a run's config.yaml is the
    resolved config, without it."""
    cells = ["`base`", "str or list[str] or null", "`null`", BASE_RULE, BASE_DOC + "."]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _section_fields(section: str) -> tuple[str, list[Field]]:
    """(the section's description, its fields) from its dataclass."""
    if section == TOP:
        top = [f for f in fields(TrainConfig) if f.name not in SECTIONS]
        return "The keys outside any section.", top
    cls = typing.get_type_hints(TrainConfig)[section]
    return " ".join((cls.__doc__ or "").split()), list(fields(cls))


def render_section(section: str) -> str:
    """One section's Markdown: its heading, description, table of keys and rules across keys."""
    doc, section_fields = _section_fields(section)
    heading = "Top level" if section == TOP else f"`{section}:`"
    lines = [f"## {heading}", "", doc, "", "| key | type | default | allowed | meaning |",
             "|---|---|---|---|---|"]
    lines += [_base_row()] if section == TOP else []
    lines += [_row(section, f) for f in section_fields]
    rules = SECTION_RULES.get(section, [])
    if rules:
        lines += ["", "Checked across keys:", ""]
        lines += [f"- {' '.join((rule.__doc__ or '').split())}" for _, rule in rules]
    return "\n".join(lines) + "\n"


def render(section: str | None = None) -> str:
    """The reference as Markdown: the whole page (docs/config.md), or one section ("optim", or
    "top" for base, name and seed). An unknown section is a ConfigError naming the valid ones."""
    if section is None:
        return INTRO + "".join("\n" + render_section(s) for s in ALL_SECTIONS)
    if section not in ALL_SECTIONS:
        raise ConfigError(f"unknown config section {section!r} "
                          f"(expected one of: {', '.join(ALL_SECTIONS)})")
    return render_section(section)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        sys.stdout.write(render(args[0] if args else None))
    except UserError as e:
        print(e, file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
