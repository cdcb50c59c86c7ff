"""The loop's shape (issue 41): the loader makes each epoch's batches, alternating flips included,
and train_one_epoch only runs the step chosen once per run over them."""

from __future__ import annotations

import ast
import inspect
import textwrap

import torch

from conftest import tiny_config
from vggtrain import train as train_module
from vggtrain.config import config_from_dict
from vggtrain.data import Augmentation, Split, TrainLoader
from vggtrain.run import build_run


def _split(n: int = 40) -> Split:
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(5))
    return Split(images, torch.arange(n))  # the labels name the images


def test_the_loader_alternates_the_flips_from_one_epoch_to_the_next():
    seen: dict[str, dict[int, list[torch.Tensor]]] = {"alternating": {}, "random": {}}
    for flip, images in seen.items():
        loader = TrainLoader(_split(), 8, seed=3, aug=Augmentation(padding=0, flip=flip))
        for epoch in (0, 1):
            for x, y in loader.epoch(epoch):
                for img, label in zip(x, y.tolist(), strict=True):
                    images.setdefault(label, []).append(img)
    # alternating: every image once as it is and once mirrored; random flips leave some the same twice
    assert all(torch.equal(a, b.flip(2)) and not torch.equal(a, b) for a, b in seen["alternating"].values())
    assert any(torch.equal(a, b) for a, b in seen["random"].values())


def test_a_resumed_or_cut_short_epoch_is_a_slice_of_the_whole_one():
    loader = TrainLoader(_split(), 8, seed=1, aug=Augmentation(padding=2, pad_mode="reflect",
                                                               flip="alternating", cutout=6))
    whole = list(loader.epoch(1))
    assert len(whole) == 5

    def same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1])
                                        for u, v in zip(a, b, strict=True))

    assert same(list(loader.epoch(1)), whole)  # a function of (seed, epoch) alone
    assert same(list(loader.epoch(1, start=2)), whole[2:])  # a mid-epoch resume
    assert same(list(loader.epoch(1, start=1, stop=3)), whole[1:3])  # a fractional last epoch
    assert list(loader.epoch(1, start=2, stop=2)) == [] and list(loader.epoch(1, stop=-1)) == []
    assert not torch.equal(torch.cat([y for _, y in loader.epoch(2)]), torch.cat([y for _, y in whole]))


def test_the_step_is_chosen_once_and_the_epoch_loop_has_no_branches(tmp_path, monkeypatch):
    tree = ast.parse(textwrap.dedent(inspect.getsource(train_module.train_one_epoch)))
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp))]
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.For))
    assert len(loop.body) <= 5  # step, meter, progress bar, interval hook

    cfg = config_from_dict(tiny_config(tmp_path, tmp_path, train={"batch_size": 10}), "t")
    run = build_run(cfg, tmp_path, ["x"] * 10, 40)
    chosen = []
    real = train_module.step_function
    monkeypatch.setattr(train_module, "step_function", lambda *a: chosen.append(1) or real(*a))
    split = _split()
    train_module.train_one_epoch(run, Split(split.images, split.labels % 10))
    assert chosen == [1] and run.progress.step == run.global_step == 4
