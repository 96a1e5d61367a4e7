"""Evaluation protocols against rankings worked out by hand, the CIRR submission format, and the evaluate module."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from processing.data.metrics import (
    cirr_submission,
    evaluate_caption_match,
    evaluate_cirr,
    evaluate_fashioniq,
    evaluate_protocol,
    rank_gallery,
    recall_at_k,
)

from utils import ANNOTATION_FIXTURES


REPO = Path(__file__).resolve().parents[1]


def query_with_order(order, num_galleries):
    """A unit query whose dot products with the one-hot gallery `torch.eye(num_galleries)` rank `order` first,
    in that order, then every other item."""
    scores = torch.zeros(num_galleries)
    for position, index in enumerate(order):
        scores[index] = num_galleries - position
    return scores / scores.norm()


def queries_with_orders(orders, num_galleries):
    return torch.stack([query_with_order(order, num_galleries) for order in orders])


def test_rank_gallery_orders_by_similarity_and_removes_codes():
    gallery = torch.eye(5)
    queries = queries_with_orders([[3, 1, 4, 0, 2], [0, 2, 1, 3, 4]], 5)
    assert rank_gallery(queries, gallery, 3).tolist() == [[3, 1, 4], [0, 2, 1]]
    # query 0 removes code 3 (item 3), query 1 removes nothing (-1)
    ranking = rank_gallery(queries, gallery, 3, torch.tensor([3, -1]), torch.arange(5))
    assert ranking.tolist() == [[1, 4, 0], [0, 2, 1]]
    # a ranking shortened by the removal is padded with -1
    assert rank_gallery(queries[:1], torch.eye(5)[3:4], 2, torch.tensor([3]), torch.tensor([3])).tolist() == [[-1]]


def test_recall_at_k_by_hand_and_blocking():
    gallery_ids = ["a", "b", "c", "d", "e"]
    # targets at ranks 1, 2, 4 and not in the top 4
    orders = [[0, 1, 2, 3], [2, 1, 0, 3], [4, 3, 2, 0], [0, 1, 2, 3]]
    targets = ["a", "b", "a", "e"]
    queries = queries_with_orders(orders, 5)
    expected = {"recall@1": 25.0, "recall@2": 50.0, "recall@4": 75.0, "recall@5": 100.0}
    assert recall_at_k(queries, torch.eye(5), targets, gallery_ids, ks=(1, 2, 4, 5)) == expected
    # tiny blocks give the same result: one query per block
    assert recall_at_k(queries, torch.eye(5), targets, gallery_ids, ks=(1, 2, 4, 5), max_block_elements=1) == expected


def test_reference_removal_moves_target_up():
    gallery_ids = ["ref", "tgt", "other"]
    queries = queries_with_orders([[0, 1, 2]], 3)
    assert recall_at_k(queries, torch.eye(3), ["tgt"], gallery_ids, ks=(1,))["recall@1"] == 0.0
    removed = recall_at_k(queries, torch.eye(3), ["tgt"], gallery_ids, ks=(1,), reference_ids=["ref"])
    assert removed["recall@1"] == 100.0


def test_queries_without_targets_are_left_out_or_rejected():
    queries = queries_with_orders([[0], [1]], 2)
    assert recall_at_k(queries, torch.eye(2), ["a", None], ["a", "b"], ks=(1,)) == {"recall@1": 100.0}
    with pytest.raises(ValueError, match="no ground truth"):
        recall_at_k(queries, torch.eye(2), [None, None], ["a", "b"], ks=(1,))


def test_input_validation():
    with pytest.raises(ValueError, match="same dim"):
        recall_at_k(torch.zeros(1, 3), torch.zeros(2, 4), ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="one entry per query"):
        recall_at_k(torch.zeros(2, 3), torch.zeros(2, 3), ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="positive integers"):
        recall_at_k(torch.zeros(1, 3), torch.zeros(2, 3), ["a"], ["a", "b"], ks=(0,))


def test_cirr_global_and_subset_recall_by_hand():
    gallery_ids = ["r0", "t0", "x", "y", "r1", "t1", "z"]
    subsets = [["r0", "t0", "x", "y"], ["r1", "t1", "x", "z"]]
    # query 0: overall r0 > x > t0 ...; without r0: x, t0 -> R@1 miss, R@2 hit; subset (t0, x, y): x, t0 -> Rs@1 miss, Rs@2 hit
    # query 1: overall r1 > t1 > ...; without r1: t1 first -> hits everywhere
    orders = [[0, 2, 1, 3, 4, 5, 6], [4, 5, 2, 6, 0, 1, 3]]
    queries = queries_with_orders(orders, 7)
    result = evaluate_cirr(
        queries, torch.eye(7), ["r0", "r1"], ["t0", "t1"], subsets, gallery_ids, ks=(1, 2, 5), subset_ks=(1, 2, 3)
    )
    assert result == {
        "recall@1": 50.0,
        "recall@2": 100.0,
        "recall@5": 100.0,
        "recall_subset@1": 50.0,
        "recall_subset@2": 100.0,
        "recall_subset@3": 100.0,
        "average": 75.0,
    }


def test_cirr_subset_ignores_items_outside_the_subset():
    gallery_ids = ["r", "t", "outside", "m"]
    # overall: outside > m > t; subset (r, t, m) minus r ranks m > t: Rs@1 = 0, Rs@2 = 100
    queries = queries_with_orders([[2, 3, 1, 0]], 4)
    result = evaluate_cirr(
        queries, torch.eye(4), ["r"], ["t"], [["r", "t", "m"]], gallery_ids, ks=(1, 5), subset_ks=(1, 2)
    )
    assert result["recall@1"] == 0.0 and result["recall_subset@1"] == 0.0 and result["recall_subset@2"] == 100.0


def test_fashioniq_ranks_within_category_and_averages():
    # gallery: dress d0 d1, shirt s0 s1 s2 (index 2..4); "d1" also appears in shirt to show the category restriction
    gallery_ids = ["d0", "d1", "s0", "s1", "d1"]
    gallery_categories = ["dress", "dress", "shirt", "shirt", "shirt"]
    # dress query: overall best is the shirt copy of d1 (4), then d0, then d1 (dress): within dress -> d0, d1
    # shirt query: s1 first -> hit at 1; second shirt query: target s0 second in shirt gallery
    orders = [[4, 0, 1], [3, 2], [4, 2, 3]]
    queries = queries_with_orders(orders, 5)
    result = evaluate_fashioniq(
        queries,
        torch.eye(5),
        ["d1", "s1", "s0"],
        ["dress", "shirt", "shirt"],
        gallery_ids,
        gallery_categories,
        ks=(1, 2),
    )
    assert result["dress_recall@1"] == 0.0 and result["dress_recall@2"] == 100.0
    assert result["shirt_recall@1"] == 50.0 and result["shirt_recall@2"] == 100.0
    assert result["average_recall@1"] == 25.0 and result["average_recall@2"] == 100.0
    assert result["average"] == 62.5
    assert [key for key in result if key.startswith("toptee")] == []


def test_caption_match_counts_any_image_with_the_target_caption_and_removes_query_image():
    gallery_ids = ["q.jpg", "a.jpg", "b.jpg", "c.jpg"]
    captions = ["red dress", "blue dress", "red dress", "blue dress"]
    # query image q (caption "red dress") is nearest; target caption "red dress" -> a hit only if q is not removed
    queries = queries_with_orders([[0, 1, 2, 3]], 4)
    kept = evaluate_caption_match(
        queries, torch.eye(4), ["red dress"], captions, ["other.jpg"], gallery_ids, ks=(1, 3)
    )
    assert kept == {"recall@1": 100.0, "recall@3": 100.0}
    removed = evaluate_caption_match(queries, torch.eye(4), ["red dress"], captions, ["q.jpg"], gallery_ids, ks=(1, 2))
    # without q: a (blue), b (red) -> R@1 miss, R@2 hit
    assert removed == {"recall@1": 0.0, "recall@2": 100.0}
    # duplicate captions: target "blue dress" hits through c.jpg even though its own target image is a.jpg
    assert evaluate_caption_match(
        queries_with_orders([[3, 0]], 4), torch.eye(4), ["blue dress"], captions, ["q.jpg"], gallery_ids, ks=(1,)
    ) == {"recall@1": 100.0}


def test_evaluate_protocol_reads_metadata_columns():
    from datasets import Dataset

    queries = Dataset.from_dict(
        {
            "reference_id": ["r", "r"],
            "target_id": ["t", "x"],
            "target_caption": ["c1", "c2"],
            "subset_ids": [["r", "t"], ["r", "x"]],
        }
    )
    gallery = Dataset.from_dict({"image_id": ["r", "t", "x"], "caption": ["c0", "c1", "c2"]})
    embeds = queries_with_orders([[0, 1, 2], [0, 1, 2]], 3)
    shapes = evaluate_protocol("shapes", embeds, torch.eye(3), queries, gallery, ks=(1, 2))
    assert shapes == {"recall@1": 0.0, "recall@2": 50.0}
    exact = evaluate_protocol("exact", embeds, torch.eye(3), queries, gallery, ks=(1,), remove_reference=True)
    assert exact == {"recall@1": 50.0}
    cirr = evaluate_protocol("cirr", embeds, torch.eye(3), queries, gallery, ks=(1, 5))
    assert cirr["recall@1"] == 50.0 and cirr["recall_subset@1"] == 100.0
    assert evaluate_protocol("mitstates", embeds, torch.eye(3), queries, gallery, ks=(1,)) == {"recall@1": 50.0}
    with pytest.raises(ValueError, match="protocol"):
        evaluate_protocol("nope", embeds, torch.eye(3), queries, gallery)
    with pytest.raises(ValueError, match="`category` column"):
        evaluate_protocol("fashioniq", embeds, torch.eye(3), queries, gallery)


@pytest.mark.parametrize("fixtures", ANNOTATION_FIXTURES)
def test_cirr_submission_matches_official_examples(tmp_path, fixtures):
    from processing.data.loaders import load_evaluation_data

    data = load_evaluation_data("cirr", fixtures / "cirr", "test1", check_images="none")
    pair_ids = data.queries["pair_id"]
    reference_ids = data.queries["reference_id"]
    subset_ids = data.queries["subset_ids"]
    gallery_ids = list(data.gallery["image_id"])
    generator = torch.Generator().manual_seed(0)
    query_embeds = torch.nn.functional.normalize(torch.randn(len(pair_ids), 16, generator=generator), dim=-1)
    gallery_embeds = torch.nn.functional.normalize(torch.randn(len(gallery_ids), 16, generator=generator), dim=-1)
    recall_path, subset_path = cirr_submission(
        pair_ids, query_embeds, gallery_embeds, reference_ids, subset_ids, gallery_ids, tmp_path, name="test"
    )
    ours = json.loads(recall_path.read_text()), json.loads(subset_path.read_text())
    examples = [
        json.loads((fixtures / "cirr" / "submission_examples" / f"test1_pred_ranks_{metric}.json").read_text())
        for metric in ("recall", "recall_subset")
    ]
    members = {str(p): (r, set(m)) for p, r, m in zip(pair_ids, reference_ids, subset_ids)}
    for payload, example, metric, length in zip(ours, examples, ("recall", "recall_subset"), (50, 3)):
        assert payload["version"] == example["version"] == "rc2"
        assert payload["metric"] == example["metric"] == metric
        assert set(payload) == set(example)  # same pair ids, as strings
        for pair_id, names in payload.items():
            if pair_id in ("version", "metric"):
                continue
            reference, subset = members[pair_id]
            assert len(names) == len(example[pair_id]) == length
            assert len(set(names)) == length and reference not in names
            if metric == "recall_subset":
                assert set(names) <= subset and set(example[pair_id]) <= subset
    # the top-1 of the full ranking is the best non-reference gallery item
    scores = query_embeds[0] @ gallery_embeds.T
    order = [gallery_ids[i] for i in scores.argsort(descending=True).tolist() if gallery_ids[i] != reference_ids[0]]
    assert ours[0][str(pair_ids[0])] == order[:50]


def test_evaluate_module_loads_offline_and_agrees_with_protocol_functions(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(str(REPO / "metrics" / "recall_at_k"))
    assert metric.compute(predictions=[["a", "b", "c"], ["c", "a", "b"]], references=["b", "b"], k=[1, 2, 3]) == {
        "recall@1": 0.0,
        "recall@2": 50.0,
        "recall@3": 100.0,
    }
    # scores: ties count against the query (target index 0 ties with index 1 -> rank 1)
    assert metric.compute(predictions=[[0.5, 0.5, 0.1]], references=[0], k=[1, 2]) == {
        "recall@1": 0.0,
        "recall@2": 100.0,
    }
    # Integer rankings against an integer target would be read as scores: refused in one line, whichever way they come.
    for predictions in ([[3, 1, 2]], [np.array([3, 1, 2])], np.array([[3, 1, 2]])):
        with pytest.raises(ValueError, match="rankings of integer ids") as error:
            metric.compute(predictions=predictions, references=[1], k=[2])
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="rankings of integer ids"):
        metric.add_batch(predictions=[[3, 1, 2]], references=[1])
    assert metric.compute(predictions=[["3", "1", "2"]], references=["1"], k=[2]) == {"recall@2": 100.0}
    assert metric.compute(predictions=[[3.0, 1.0, 2.0]], references=[1], k=[2]) == {"recall@2": 0.0}  # floats: scores

    generator = torch.Generator().manual_seed(1)
    queries = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    gallery = torch.nn.functional.normalize(torch.randn(30, 8, generator=generator), dim=-1)
    targets = torch.randint(0, 30, (40,), generator=generator)
    gallery_ids = [f"g{i}" for i in range(30)]
    expected = recall_at_k(queries, gallery, [gallery_ids[t] for t in targets], gallery_ids, ks=(1, 5, 10))
    from_scores = metric.compute(predictions=(queries @ gallery.T).tolist(), references=targets.tolist(), k=[1, 5, 10])
    rankings = [
        [gallery_ids[i] for i in row] for row in (queries @ gallery.T).argsort(dim=1, descending=True).tolist()
    ]
    from_rankings = metric.compute(predictions=rankings, references=[gallery_ids[t] for t in targets], k=[1, 5, 10])
    for key, value in expected.items():
        assert from_scores[key] == pytest.approx(value)
        assert from_rankings[key] == pytest.approx(value)


def test_one_search_engine_exclusions_across_blocks_match_a_plain_ranking():
    """`rank_gallery` is `exact_search` (the pipeline's and the index's search) with the reference removed; small
    blocks and query batches give the same ranking as one block."""
    from modeling_mqirtn.search_mqirtn import exact_search

    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(7, 6, generator=generator), dim=-1)
    gallery = torch.nn.functional.normalize(torch.randn(11, 6, generator=generator), dim=-1)
    exclude = torch.tensor([0, 3, -1, 10, 5, 5, 1])
    codes = torch.arange(11)
    full = rank_gallery(queries, gallery, 11, exclude, codes)
    _, blocked = exact_search(
        queries, gallery, 11, block_size=3, query_batch_size=2, query_exclude=exclude, gallery_exclude=codes
    )
    assert torch.equal(full, blocked)
    scores = queries @ gallery.T
    for row, code in enumerate(exclude.tolist()):
        expected = [i for i in scores[row].argsort(descending=True).tolist() if i != code]
        assert full[row].tolist() == expected + [-1] * (11 - len(expected))
    with pytest.raises(ValueError, match="given together"):
        exact_search(queries, gallery, 3, query_exclude=exclude)


class ColumnWithoutIndexing:
    """A column that can be read whole but not item by item (indexing `datasets` columns one by one is 50x slower)."""

    def __init__(self, values):
        self.values = list(values)

    def __len__(self):
        return len(self.values)

    def __iter__(self):
        return iter(self.values)

    def __getitem__(self, index):
        raise AssertionError("indexed item by item")


def test_cirr_submission_reads_each_column_once(tmp_path):
    queries = torch.nn.functional.normalize(torch.randn(4, 5), dim=-1)
    gallery = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1)
    names = [f"img{i}" for i in range(6)]
    paths = cirr_submission(
        ColumnWithoutIndexing([10, 11, 12, 13]),
        queries,
        gallery,
        ColumnWithoutIndexing(names[:4]),
        ColumnWithoutIndexing([names[:3]] * 4),
        ColumnWithoutIndexing(names),
        tmp_path,
    )
    recall = json.loads(paths[0].read_text())
    assert recall["version"] == "rc2" and len(recall["10"]) == 5 and "img0" not in recall["10"]


def test_retrieval_diagnostics_by_type_and_own_reference_first_by_hand():
    from processing.data.metrics import retrieval_diagnostics

    gallery = {"image_id": ["a", "b", "c", "d", "e"]}
    # q0 (add): target first. q1 (add): its reference "c" first, target second. q2 (remove): target 3rd.
    # q3 (remove): its reference "a" first, target not in the top 3.
    orders = [[0, 1, 2], [2, 1, 0], [4, 3, 2], [0, 1, 2]]
    queries = {
        "query_id": ["0", "1", "2", "3"], "reference_id": ["d", "c", "a", "a"], "target_id": ["a", "b", "c", "e"],
        "modification_type": ["add", "add", "remove", "remove"],
    }  # fmt: skip
    embeds = queries_with_orders(orders, 5)
    result = retrieval_diagnostics("shapes", embeds, torch.eye(5), queries, gallery)
    assert result["reference_ranked_first"] == 50.0  # q1 and q3
    assert result["by_modification_type"]["add"] == {
        "queries": 2,
        "recall@1": 50.0,
        "recall@5": 100.0,
        "recall@10": 100.0,
        "recall@50": 100.0,
    }
    assert result["by_modification_type"]["remove"]["recall@1"] == 0.0
    assert result["by_modification_type"]["remove"]["recall@5"] == 100.0
    # Each type's figures are the protocol's own on that type's queries (the one Recall path).
    assert (
        result["by_modification_type"]["remove"]["recall@1"]
        == evaluate_protocol("shapes", embeds[2:], torch.eye(5), {k: v[2:] for k, v in queries.items()}, gallery)[
            "recall@1"
        ]
    )
    # An unusable query counts as a miss in its own type only.
    unusable = retrieval_diagnostics("shapes", embeds, torch.eye(5), queries, gallery, unusable_query_ids={"0"})
    assert unusable["by_modification_type"]["add"]["recall@1"] == 0.0
    assert unusable["by_modification_type"]["remove"] == {**result["by_modification_type"]["remove"]}
    # Without a type column: only the reference share; a reference outside the gallery: None.
    untyped = {k: v for k, v in queries.items() if k != "modification_type"}
    assert retrieval_diagnostics("exact", embeds, torch.eye(5), untyped, gallery) == {"reference_ranked_first": 50.0}
    elsewhere = {**untyped, "reference_id": ["x", "y", "z", "w"]}
    assert retrieval_diagnostics("exact", embeds, torch.eye(5), elsewhere, gallery) == {"reference_ranked_first": None}
