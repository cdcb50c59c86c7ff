"""`vggtrain summary`: the model a config builds, layer by layer, with parameters and
multiply-accumulates, and the paper's argument for stacks of 3x3 convolutions in numbers.

Layers get the paper's names (model.blocks): convS_I is the I-th convolution of stage S (a stage
ends at a 2x2 max-pool, poolS), each with its batch norm and ReLU; fc (or fc1..fc3 for the MLP
head) is the classifier. `vggtrain gradcam --layer` takes the same names.

The model is built on the meta device: shapes and parameter counts without allocating weights,
so even a width-16 VGG19 summarises instantly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vggtrain.config import ModelConfig
from vggtrain.model import IMAGE_SIZE, Block, blocks, build_model


@dataclass
class Row:
    name: str
    what: str
    shape: tuple[int, ...]  # output, without the batch dimension
    params: int
    macs: int  # multiply-accumulates for one image
    rf: int | None  # receptive field (pixels, one side) of one output unit; None: the whole image
    stage: str  # "stage 1".. or "classifier", for the where-it-goes table


def _describe(block: Block) -> str:
    m = block.head
    extras = [type(x).__name__.replace("BatchNorm2d", "BN") for _, x in block.modules[1:]]
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        what = f"conv {kh}x{kw}, {m.in_channels}->{m.out_channels}"
    elif isinstance(m, nn.MaxPool2d):
        what = "max pool 2x2"
    elif isinstance(m, nn.AdaptiveMaxPool2d):
        what = "global max pool"
    elif isinstance(m, nn.AdaptiveAvgPool2d):
        what = "global avg pool"
    elif isinstance(m, nn.Linear):
        what = f"linear {m.in_features}->{m.out_features}"
    else:
        what = type(m).__name__
    return ", ".join([what, *extras])


def summarize(cfg: ModelConfig) -> list[Row]:
    """One row per block, from a forward pass of one meta-device image."""
    with torch.device("meta"):
        model = build_model(cfg).eval()
    named = blocks(model)
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(key: str) -> object:
        return lambda _m, _i, out: shapes.__setitem__(key, tuple(out.shape[1:]))

    hooks = [b.output[1].register_forward_hook(hook(b.name)) for b in named]
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, IMAGE_SIZE, IMAGE_SIZE, device="meta"))
    finally:
        for h in hooks:
            h.remove()

    rows, rf, jump, stage = [], 1, 1, 1
    for b in named:
        m = b.head
        params = sum(p.numel() for _, mod in b.modules for p in mod.parameters(recurse=False))
        shape = shapes[b.name]
        macs = 0
        if isinstance(m, nn.Conv2d):
            macs = shape[0] * shape[1] * shape[2] * (m.in_channels // m.groups) * m.kernel_size[0] \
                * m.kernel_size[1]
            rf += (m.kernel_size[0] - 1) * jump
            where = f"stage {stage}"
        elif isinstance(m, nn.MaxPool2d):
            rf += (m.kernel_size - 1) * jump if isinstance(m.kernel_size, int) else 0
            jump *= 2
            where = f"stage {stage}"
            stage += 1
        elif isinstance(m, nn.Linear):
            macs = m.in_features * m.out_features
            where = "classifier"
        else:  # a global pool
            where = "classifier"
        rf_shown = rf if where != "classifier" else None
        rows.append(Row(b.name, _describe(b), shape, params, macs, rf_shown, where))
    return rows


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _stack_note(rows: list[Row]) -> list[str]:
    """The paper's section 2.3 in this model's numbers: its longest stack of 3x3 convolutions
    against the one large convolution with the same receptive field."""
    best: list[Row] = []
    run: list[Row] = []
    for r in rows:
        if r.what.startswith("conv 3x3"):
            run = run + [r] if run and run[-1].stage == r.stage else [r]
            if len(run) >= len(best):
                best = run
        else:
            run = []
    if len(best) < 2:
        return []
    n = len(best)
    k = 2 * n + 1
    chans = [tuple(int(c) for c in r.what.split(", ")[1].split("->")) for r in best]
    stacked = sum(9 * ci * co for ci, co in chans)
    single = k * k * chans[0][0] * chans[-1][1]
    return ["", f"Why stacks of 3x3 convolutions: {best[0].name}..{best[-1].name} see a {k}x{k} window of "
                f"their input through {n} ReLUs",
            f"with {stacked:,} weights; one {k}x{k} convolution {chans[0][0]}->{chans[-1][1]} would see the "
            f"same window through one ReLU",
            f"with {single:,} weights: {single / stacked:.2f}x the parameters, and {single / stacked:.2f}x "
            f"the MACs at every position."]


def format_summary(cfg: ModelConfig, rows: list[Row]) -> str:
    total_p = sum(r.params for r in rows)
    total_m = sum(r.macs for r in rows)
    head = "linear head" if cfg.head == "linear" else f"MLP head ({cfg.hidden} hidden)"
    title = (f"{cfg.arch}{' (width x' + format(cfg.width, 'g') + ')' if cfg.width != 1 else ''}: "
             f"{'batch norm' if cfg.batch_norm else 'no batch norm'}, {head}, {cfg.num_classes} classes, "
             f"3x{IMAGE_SIZE}x{IMAGE_SIZE} input")
    table = [("layer", "what", "output", "params", "MACs", "% MACs", "RF")]
    for r in rows:
        table.append((r.name, r.what, "x".join(map(str, r.shape)), f"{r.params:,}",
                      _si(r.macs) if r.macs else "-", f"{r.macs / max(total_m, 1):.1%}" if r.macs else "",
                      str(r.rf) if r.rf is not None else "all"))
    table.append(("total", "", "", f"{total_p:,}", _si(total_m), "100.0%", ""))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {3, 4, 5, 6}

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    out = [title, "", line(table[0])]
    out += [line(row) for row in table[1:-1]]
    out += ["-" * len(line(table[0])), line(table[-1]), "",
            f"{total_p:,} parameters; {total_m:,} multiply-accumulates (MACs, about {_si(2 * total_m)} "
            f"FLOPs) per image,",
            "counting convolutions and linear layers (the elementwise BN, ReLU and pooling are left out).",
            "RF: the receptive field, in input pixels, of one unit of the layer's output."]

    stages: dict[str, list[Row]] = {}
    for r in rows:
        stages.setdefault(r.stage, []).append(r)
    out += ["", f"{'where it goes':<16}{'resolution':>12}{'params':>10}{'MACs':>10}"]
    for stage, rs in stages.items():
        res = "x".join(map(str, rs[0].shape[1:])) if stage != "classifier" else ""
        out.append(f"{stage:<16}{res:>12}{sum(r.params for r in rs) / max(total_p, 1):>10.1%}"
                   f"{sum(r.macs for r in rs) / max(total_m, 1):>10.1%}")
    out += _stack_note(rows)
    return "\n".join(out) + "\n"
