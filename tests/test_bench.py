from __future__ import annotations

import json

import torch

from conftest import tiny_config, write_yaml
from vggtrain.cli import main


def test_bench_writes_positive_numbers(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path / "unused", tmp_path / "runs"))
    out = tmp_path / "bench.json"
    code = main(["bench", "--config", str(cfg), "--steps", "3", "--warmup", "1", "--data-steps", "8",
                 "--json", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    for key in ("bare_step", "data_path", "reference_data_path", "fit", "real_fit", "eval", "peak_memory_mib",
                "fit_over_bare_step", "real_fit_over_bare_step", "data_over_reference", "ops_per_step"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["syncs_per_step"] == 0  # the tiny net's step reads nothing from the device
    assert res["batch_size"] == 50 and res["precision"] == "fp32" and res["machine"]["cores"] >= 1
    alloc = res["allocators"]
    assert alloc["system"]["allocator"].startswith("system")
    assert alloc["system"]["bare_step_images_per_s"] > 0 and alloc["configured"]["peak_rss_mib"] > 0
    assert alloc["ratio"] > 0 and alloc["fit_ratio"] > 0 and alloc["rounds"] == 2
    table = capsys.readouterr().out
    assert "bare step" in table and "real fit / bare step" in table and "ratio" in table
    assert "ATen ops per step" in table


def test_bench_rejects_unknown_parts(tmp_path, capsys):
    assert main(["bench", "--config", "smoke.yaml", "--parts", "bare,warp"]) == 2
    assert "--parts takes" in capsys.readouterr().err


def test_bench_policies_measures_each_policy_both_ways(tmp_path, capsys, monkeypatch):
    from vggtrain import data

    monkeypatch.setattr(data, "AUGMENT_CHUNK_IMAGES", 100)  # chunks of 2 batches of 50: seconds, not minutes
    monkeypatch.setattr(data, "POLICY_CHUNK_IMAGES", 100)
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path / "unused", tmp_path / "runs"))
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # kornia's many small operators: two spinning threads on a busy machine crawl
    try:
        assert main(["bench", "--config", str(cfg), "--parts", "policies", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())["policies"]
    assert res["workers"] == 2 and res["rounds"] == 2 and res["images"] == 300
    assert set(res["by_policy"]) == {"crop, flip only", "autoaugment", "randaugment", "trivialaugment",
                                   "random erasing 0.25"}
    for name, r in res["by_policy"].items():
        assert r["batched"] > 0 and r["reference"] > 0 and r["ratio"] == r["batched"] / r["reference"], name
    table = capsys.readouterr().out
    assert "torchvision" in table and "trivialaugment" in table
