"""Evaluation data that would make a metric lie is refused or counted: duplicate gallery ids and duplicate query ids
are errors; a query whose reference image is unusable stays in the denominator as a miss, and the result says how
many there were."""

import json

import pytest
import torch
from datasets import Dataset
from PIL import Image

from processing import processing_mqirtn
from processing.data.loaders import CIREvaluationData, find_bad_images, load_evaluation_data
from processing.data.metrics import evaluate_protocol


def write_files_dataset(root, gallery_ids: list[str], query_ids: list[str] | None = None, missing_reference=False):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(len(gallery_ids)):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(root / f"g{i}.png")
    (root / "gallery.jsonl").write_text(
        "\n".join(json.dumps({"image": f"g{i}.png", "id": g}) for i, g in enumerate(gallery_ids))
    )
    rows = [
        {"reference": "g0.png" if not missing_reference else "gone.png", "text": "make it red", "target": "g1.png"}
    ]
    if query_ids is not None:
        rows = [{**rows[0], "id": q} for q in query_ids]
    (root / "test.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return root


def test_duplicate_gallery_ids_are_an_error(tmp_path):
    """Before: eight gallery images sharing one id made every ranking a hit (R@1 = 100)."""
    root = write_files_dataset(tmp_path / "data", ["same"] * 8)
    with pytest.raises(ValueError, match=r"duplicate gallery image id.*'same' x8"):
        load_evaluation_data("files", root, "test")


def test_duplicate_query_ids_are_an_error(tmp_path):
    root = write_files_dataset(tmp_path / "data", ["a", "b"], query_ids=["q1", "q1"])
    with pytest.raises(ValueError, match=r"duplicate query id.*'q1' x2"):
        load_evaluation_data("files", root, "test")


def test_the_same_id_in_two_categories_is_not_a_duplicate():
    gallery = Dataset.from_dict({"image_id": ["D1", "D1"], "category": ["dress", "shirt"]})
    queries = Dataset.from_dict({"query_id": ["q"], "target_id": ["D1"], "category": ["dress"]})
    CIREvaluationData(queries, gallery, "fashioniq")
    with pytest.raises(ValueError, match="within a category"):
        CIREvaluationData(
            queries, Dataset.from_dict({"image_id": ["D1", "D1"], "category": ["dress", "dress"]}), "fashioniq"
        )


def test_a_query_with_a_missing_reference_is_a_miss_not_a_smaller_denominator(tmp_path, caplog):
    root = write_files_dataset(tmp_path / "data", ["a", "b"], query_ids=["q0"])
    (root / "test.jsonl").write_text(
        json.dumps({"reference": "g0.png", "text": "x", "target": "g1.png", "id": "q0"})
        + "\n"
        + json.dumps({"reference": "gone.png", "text": "y", "target": "g1.png", "id": "q1"})
    )
    data = load_evaluation_data("files", root, "test")
    assert list(data.queries["query_id"]) == ["q0", "q1"] and data.unusable_query_ids == {"q1"}
    gallery = torch.eye(2)
    oracle = gallery[[1, 1]]  # both embeddings point at the target: the unusable one must still miss
    result = evaluate_protocol(
        "exact", oracle, gallery, data.queries, data.gallery, ks=(1,), unusable_query_ids=data.unusable_query_ids
    )
    assert result == {"recall@1": 50.0, "unusable_queries": 1}
    assert evaluate_protocol("exact", oracle, gallery, data.queries, data.gallery, ks=(1,)) == {"recall@1": 100.0}
    with pytest.raises(ValueError, match="not queries"):
        evaluate_protocol("exact", oracle, gallery, data.queries, data.gallery, ks=(1,), unusable_query_ids={"zz"})


@pytest.mark.parametrize("protocol, label", [("cirr", "target_id"), ("mitstates", "target_caption")])
def test_forced_misses_in_the_other_protocols(protocol, label):
    gallery = {"image_id": ["a", "b", "c"], "caption": ["x a", "x b", "x c"]}
    queries = {
        "query_id": ["0", "1"], "reference_id": ["c", "c"], "target_id": ["a", "b"], "target_caption": ["x a", "x b"],
        "subset_ids": [["a", "b", "c"], ["a", "b", "c"]],
    }  # fmt: skip
    oracle = torch.eye(3)[[0, 1]]
    result = evaluate_protocol(protocol, oracle, torch.eye(3), queries, gallery, ks=(1,), unusable_query_ids={"1"})
    assert result["recall@1"] == 50.0 and result["unusable_queries"] == 1
    if protocol == "cirr":
        assert result["recall_subset@1"] == 50.0


def test_image_check_marks_an_image_over_the_pixel_cap(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    monkeypatch.setattr(processing_mqirtn, "MAX_IMAGE_PIXELS", 1000)
    assert find_bad_images([str(tmp_path / "big.png"), str(tmp_path / "small.png")]) == {
        str(tmp_path / "big.png"): "corrupt"
    }


def test_a_reference_that_fails_only_at_embedding_time_is_a_miss(tmp_path):
    """With `check_images="none"` the loader cannot know; train.py's evaluation finds it when decoding (blank image)."""
    import argparse

    from accelerate import Accelerator

    from mqirtn_train.evaluation import evaluate_split

    from utils import tiny_model, tiny_processor

    root = write_files_dataset(tmp_path / "data", ["a", "b"], query_ids=["q0"])
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "test.jsonl").write_text(
        json.dumps({"reference": "g0.png", "text": "make it red", "target": "g1.png", "id": "q0"})
        + "\n"
        + json.dumps({"reference": "broken.png", "text": "make it red", "target": "g1.png", "id": "q1"})
    )
    data = load_evaluation_data("files", root, "test", check_images="none")
    assert not data.unusable_query_ids
    args = argparse.Namespace(
        max_eval_samples=None, per_device_eval_batch_size=4, dataloader_num_workers=0, max_text_length=16
    )
    model, processor = tiny_model().eval(), tiny_processor(tmp_path)
    metrics, query_embeds, _ = evaluate_split(Accelerator(cpu=True), model, processor, data, args, "test")
    assert metrics["unusable_queries"] == 1 and query_embeds.shape[0] == 2
    assert metrics["recall@1"] <= 50.0
