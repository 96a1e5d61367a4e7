"""Smoke tests of the benchmark scripts at tiny sizes: they run and write JSON with the expected keys.

No timing assertions: the figures depend on the machine. The two scripts are loaded from their files (`benchmarks/`
is not a package) and run in-process, so the test pays for the imports once.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return _load("speed")


def _check_ratio_entry(entry):
    assert {"ratio", "target", "met", "batch_size", "sizes", "baseline_s", "candidate_s"} <= set(entry)
    assert math.isfinite(entry["ratio"]) and entry["ratio"] > 0
    assert entry["baseline_s"] > 0 and entry["candidate_s"] > 0
    assert isinstance(entry["met"], bool)


def test_speed_quick_writes_every_item(speed, tmp_path):
    output = tmp_path / "speed.json"
    speed.main(["--quick", "--repeats", "1", "--no-nice", "--output", str(output)])
    report = json.loads(output.read_text())
    assert {"date", "machine", "command", "results"} <= set(report)
    results = report["results"]
    for key in ("query_overhead", "gallery_throughput", "train_step", "soft_triplet"):
        _check_ratio_entry(results[key])
    assert results["search_1m"] == {"see": "benchmarks/search_speed.py"}
    # The profile attributes the MQIRTN-only work to its own groups; the baseline has none of it.
    profile = results["train_step"]["profile_ms"]
    assert {"towers", "fusion", "composition", "symmetric pass", "loss", "optimizer"} <= set(profile["mqirtn"])
    assert not {"fusion", "composition", "symmetric pass"} & set(profile["baseline"])
    assert results["soft_triplet"]["same_value"] is True
    memory = results["memory"]
    assert memory["train_step"]["mqirtn_peak_mib"] > memory["train_step"]["mqirtn_at_peak_mib"]["parameter"] > 0
    assert memory["gallery"]["raw_mib"] > 0 and memory["gallery"]["search_peak_mib"] > 0


def test_soft_triplet_loop_reference_matches_the_vectorised_loss(speed):
    import torch
    from torch.nn import functional as F

    from modeling_mqirtn.losses_mqirtn import MQIRTNSoftTripletLoss

    generator = torch.Generator().manual_seed(1)
    query = F.normalize(torch.randn(6, 16, generator=generator), dim=-1)
    target = F.normalize(torch.randn(6, 16, generator=generator), dim=-1)
    scale = torch.tensor(3.0)
    expected = MQIRTNSoftTripletLoss()(query, target, scale)
    torch.testing.assert_close(speed.soft_triplet_loop(query, target, scale), expected, rtol=1e-5, atol=1e-5)


def test_speed_rejects_unknown_items(speed):
    with pytest.raises(ValueError, match="--items"):
        speed.parse_args(["--items", "5"])


def test_gpu_step_tiny_writes_json(tmp_path):
    gpu_step = _load("gpu_step")
    output = tmp_path / "gpu.json"
    gpu_step.main(["--tiny", "--device", "cpu", "--warmup", "0", "--rounds", "1", "--output", str(output)])
    report = json.loads(output.read_text())
    assert {
        "device",
        "batch_size",
        "ratio_vs_dual_encoder",
        "ratio_vs_towers_contrastive",
        "target",
        "met",
        "flops_ratio_vs_dual_encoder",
        "models",
    } <= set(report)
    assert set(report["models"]) == {"mqirtn", "dual_encoder", "towers_contrastive"}
    for result in report["models"].values():
        assert result["samples_per_s"] > 0 and result["flops_per_step"] > 0 and math.isfinite(result["loss"])
        assert result["attn_implementation"] == ["sdpa"]
    # MQIRTN embeds the target image too, so a triplet costs more FLOPs than an (image, text) pair.
    assert report["flops_ratio_vs_dual_encoder"] > 1


def test_peak_table_matches_device_names():
    gpu_step = _load("gpu_step")
    assert gpu_step.peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu_step.peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert gpu_step.peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert gpu_step.peak_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert gpu_step.peak_tflops("cpu") is None


def test_memory_child_measures_the_gallery(speed):
    # The RSS cross-check normally runs in a fresh subprocess; called directly it still reports its fields.
    result = speed.memory_child("gallery", "tiny", 2, gallery_size=1000, dim=32)
    assert result["raw_bytes"] == 1000 * 32 * 4
    assert result["search_peak_bytes"] >= 0 and result["queries"] == 1000


def test_search_speed_tiny_writes_json(tmp_path):
    pytest.importorskip("faiss")
    search_speed = _load("search_speed")
    output = tmp_path / "search.json"
    search_speed.main(
        ["--gallery-size", "3000", "--dim", "16", "--queries", "20", "--clusters", "30", "--repeats", "1",
         "--threads", "1", "--hnsw-ef-search", "4", "64", "--output", str(output)]
    )  # fmt: skip
    report = json.loads(output.read_text())
    assert {"date", "command", "machine", "gallery_size", "rows"} <= set(report)
    hnsw = [row for row in report["rows"] if row["backend"] == "faiss-hnsw"]
    assert [row["settings"]["efSearch"] for row in hnsw] == [4, 64]  # one row per swept value, on one built index
    assert hnsw[0]["recall_at_k"] <= hnsw[1]["recall_at_k"] and hnsw[0]["build_s"] == hnsw[1]["build_s"]
    rows = {row["backend"]: row for row in report["rows"]}
    assert set(rows) == {"exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"}
    assert rows["exact"]["recall_at_k"] == 1.0 and rows["exact"]["ratio_vs_exact"] == 1.0
    assert rows["faiss-flat"]["recall_at_k"] > 0.99  # exact too, up to float ties
    assert rows["faiss-ivf"]["settings"]["nlist"] == min(int(4 * 3000**0.5), 3000 // 39)
    assert all(row["queries_per_s"] > 0 and 0 <= row["recall_at_k"] <= 1 for row in rows.values())


def test_pixel_path_quick_writes_json(tmp_path):
    output = tmp_path / "pixel_path.json"
    _load("pixel_path").main(["--quick", "--output", str(output)])
    report = json.loads(output.read_text())
    assert {"date", "command", "machine", "results"} <= set(report)
    assert [(r["source"], r["target_px"]) for r in report["results"]] == [
        ("48 px", 48),
        ("48 px", 224),
        ("256-512 px", 48),
        ("256-512 px", 224),
    ]
    for entry in report["results"]:
        assert entry["bit_identical"] is True
        assert all(value > 0 for value in entry["ms_per_image"].values()) and entry["ratio"] > 0
