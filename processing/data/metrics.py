"""Evaluation protocols of composed image retrieval as pure functions over embeddings.

Every function takes L2-normalised query embeddings ``(num_queries, dim)`` and gallery embeddings
``(num_galleries, dim)`` (so a dot product is the cosine similarity) plus the metadata its protocol
needs, and returns recalls **in percent** (0–100), as the field reports them. Similarities are
computed in blocks of queries, so memory stays bounded by ``max_block_elements`` floats whatever
the gallery size.

================  ===================================================================================
protocol          rule
================  ===================================================================================
``shapes``        hit = same scene id; R@1/5/10/50
``fashioniq``     gallery restricted to the query's category; R@10/50 per category and their means
``cirr``          reference removed; R@1/5/10/50 and Recall_subset@1/2/3 within ``img_set.members``
``fashion200k``   hit = retrieved caption equals the target caption; query image removed; R@1/10/50
``mitstates``     hit = caption ``"adj noun"`` match; query image removed; R@1/5/10
``exact``         hit = same id (user data); reference removed on request; R@1/5/10/50
================  ===================================================================================

>>> import torch
>>> from processing.data.metrics import recall_at_k
>>> gallery = torch.eye(3)
>>> queries = torch.tensor([[0.0, 1.0, 0.0], [0.6, 0.0, 0.8]])
>>> recall_at_k(queries, gallery, target_ids=["b", "a"], gallery_ids=["a", "b", "c"], ks=(1, 2))
{'recall@1': 50.0, 'recall@2': 100.0}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
from transformers.utils import logging

from modeling_mqirtn.search_mqirtn import check_embedding_pair, exact_search

from .registry import PROTOCOL_KS


logger = logging.get_logger(__name__)

PROTOCOLS: tuple[str, ...] = tuple(PROTOCOL_KS)
CIRR_SUBSET_KS: tuple[int, ...] = (1, 2, 3)
FASHIONIQ_CATEGORIES: tuple[str, ...] = ("dress", "shirt", "toptee")
# 16M floats (64 MiB) of similarities per block.
DEFAULT_MAX_BLOCK_ELEMENTS = 1 << 24


def _check_length(name: str, values: Sequence | torch.Tensor, expected: int, of: str) -> None:
    if len(values) != expected:
        raise ValueError(f"`{name}` must have one entry per {of} ({expected}), got {len(values)}")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"`ks` must be a non-empty sequence of positive integers, got {ks!r}")
    return ks


def encode_labels(
    gallery_labels: Sequence, query_labels: Sequence | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map labels (ids or captions) to integer codes so matches can be computed as tensor comparisons.

    Returns ``gallery_codes`` (num_galleries,) with codes >= 0 and ``query_codes`` (num_queries,), where a query
    label absent from the gallery (or ``None``) gets ``-1`` and therefore never matches.
    """
    vocabulary: dict = {}
    gallery_codes = [vocabulary.setdefault(label, len(vocabulary)) for label in gallery_labels]
    query_codes = None
    if query_labels is not None:
        query_codes = torch.tensor(
            [vocabulary.get(label, -1) if label is not None else -1 for label in query_labels], dtype=torch.long
        )
    return torch.tensor(gallery_codes, dtype=torch.long), query_codes


def rank_gallery(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    k: int,
    query_exclude_codes: torch.Tensor | None = None,
    gallery_exclude_codes: torch.Tensor | None = None,
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Top-``k`` gallery indices per query by dot product, best first, through the package's one top-k search
    (:func:`modeling_mqirtn.search_mqirtn.exact_search`), with at most ``max_block_elements`` scores at once.

    Args:
        query_embeds: (num_queries, dim), L2-normalised.
        gallery_embeds: (num_galleries, dim), L2-normalised.
        k: ranking depth; clipped to the gallery size.
        query_exclude_codes: (num_queries,) long; with ``gallery_exclude_codes`` (num_galleries,) every gallery item
            whose code equals the query's code is removed from that query's ranking (the reference-removal rule;
            ``-1`` removes nothing).
        max_block_elements: bound on the number of similarities held at once.

    Returns:
        (num_queries, min(k, num_galleries)) long tensor of gallery indices; ``-1`` marks positions past the
        end of a ranking shortened by removals.
    """
    check_embedding_pair(query_embeds, gallery_embeds)
    num_queries, num_galleries = query_embeds.shape[0], gallery_embeds.shape[0]
    k = min(k, num_galleries)
    if num_queries == 0 or k == 0:
        return torch.full((num_queries, k), -1, dtype=torch.long)
    _, indices = exact_search(
        query_embeds.float(),
        gallery_embeds.float(),
        k,
        block_size=num_galleries,
        query_batch_size=max(1, max_block_elements // num_galleries),
        query_exclude=query_exclude_codes,
        gallery_exclude=gallery_exclude_codes,
    )
    return indices


def hits_from_ranking(ranking: torch.Tensor, gallery_codes: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
    """(num_queries, k) bool: whether the item at each rank carries the query's target code (``-1`` never hits)."""
    valid = ranking >= 0
    ranked_codes = gallery_codes[ranking.clamp(min=0)]
    return valid & (ranked_codes == target_codes[:, None]) & (target_codes[:, None] >= 0)


def recall_from_hits(hits: torch.Tensor, ks: Sequence[int], prefix: str = "recall") -> dict[str, float]:
    """Percentage of queries with at least one hit in the first ``k`` ranks, for each ``k``.

    ``hits`` is (num_queries, depth); ``k`` beyond ``depth`` uses the whole ranking (the gallery was smaller).
    """
    ks = _check_ks(ks)
    if hits.shape[0] == 0:
        raise ValueError("Cannot compute recall over zero queries")
    found = hits.cumsum(dim=1) > 0 if hits.shape[1] else hits
    result = {}
    for k in ks:
        depth = min(k, hits.shape[1])
        value = found[:, depth - 1].float().mean().item() if depth else 0.0
        result[f"{prefix}@{k}"] = 100.0 * value
    return result


def _labelled_queries(target_labels: Sequence, warn: bool = True) -> torch.Tensor:
    keep = torch.tensor([label is not None for label in target_labels], dtype=torch.bool)
    if not keep.any():
        raise ValueError("No query has a target: this split has no ground truth (use a submission for CIRR test1)")
    if warn and not keep.all():
        logger.warning(f"{int((~keep).sum())} of {len(keep)} queries have no target and are left out of the recalls")
    return keep


def _match_recall(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    query_labels: Sequence,
    gallery_labels: Sequence,
    ks: Sequence[int],
    query_reference_ids: Sequence | None,
    gallery_ids: Sequence | None,
    max_block_elements: int,
) -> dict[str, float]:
    """Shared core: rank, optionally remove the reference by id, count label matches."""
    check_embedding_pair(query_embeds, gallery_embeds)
    ks = _check_ks(ks)
    _check_length("query labels", query_labels, query_embeds.shape[0], "query")
    _check_length("gallery labels", gallery_labels, gallery_embeds.shape[0], "gallery item")
    keep = _labelled_queries(query_labels)
    gallery_codes, target_codes = encode_labels(gallery_labels, query_labels)
    exclude_query = exclude_gallery = None
    if query_reference_ids is not None:
        if gallery_ids is None:
            raise ValueError("Removing the reference needs `gallery_ids`")
        _check_length("query_reference_ids", query_reference_ids, query_embeds.shape[0], "query")
        _check_length("gallery_ids", gallery_ids, gallery_embeds.shape[0], "gallery item")
        exclude_gallery, exclude_query = encode_labels(gallery_ids, query_reference_ids)
    ranking = rank_gallery(
        query_embeds[keep],
        gallery_embeds,
        max(ks),
        None if exclude_query is None else exclude_query[keep],
        exclude_gallery,
        max_block_elements,
    )
    return recall_from_hits(hits_from_ranking(ranking, gallery_codes, target_codes[keep]), ks)


def recall_at_k(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    target_ids: Sequence[str | None],
    gallery_ids: Sequence[str],
    ks: Sequence[int] = PROTOCOL_KS["exact"],
    reference_ids: Sequence[str] | None = None,
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> dict[str, float]:
    """Exact-id Recall@K: a hit is a retrieved gallery item whose id equals the query's target id.

    Args:
        query_embeds: (num_queries, dim); gallery_embeds: (num_galleries, dim); both L2-normalised.
        target_ids: num_queries ids; queries with ``None`` are left out (with a warning).
        gallery_ids: num_galleries ids.
        ks: ranks at which to report recall.
        reference_ids: when given, each query's reference id is removed from its own ranking.

    Returns:
        ``{"recall@K": percent}`` for every K in ``ks``.
    """
    return _match_recall(
        query_embeds, gallery_embeds, target_ids, gallery_ids, ks, reference_ids, gallery_ids, max_block_elements
    )


def evaluate_caption_match(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    target_captions: Sequence[str],
    gallery_captions: Sequence[str],
    reference_ids: Sequence[str],
    gallery_ids: Sequence[str],
    ks: Sequence[int],
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> dict[str, float]:
    """TIRG caption-match protocol (Fashion200k, MIT-States): a hit is a retrieved image whose caption equals the
    target caption; each query's own image (gallery items with its reference id) is removed from its ranking."""
    return _match_recall(
        query_embeds,
        gallery_embeds,
        target_captions,
        gallery_captions,
        ks,
        reference_ids,
        gallery_ids,
        max_block_elements,
    )


def evaluate_fashioniq(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    target_ids: Sequence[str],
    query_categories: Sequence[str],
    gallery_ids: Sequence[str],
    gallery_categories: Sequence[str],
    ks: Sequence[int] = PROTOCOL_KS["fashioniq"],
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> dict[str, float]:
    """FashionIQ: each query ranks only the gallery of its own category (``split.{cat}.val.json``).

    Returns ``{"{cat}_recall@K": ...}`` per category present, ``"average_recall@K"`` (mean over categories) and
    ``"average"`` (mean of the ``average_recall@K`` values, the usual headline number).
    """
    check_embedding_pair(query_embeds, gallery_embeds)
    ks = _check_ks(ks)
    _check_length("query_categories", query_categories, query_embeds.shape[0], "query")
    _check_length("gallery_categories", gallery_categories, gallery_embeds.shape[0], "gallery item")
    _check_length("target_ids", target_ids, query_embeds.shape[0], "query")
    _check_length("gallery_ids", gallery_ids, gallery_embeds.shape[0], "gallery item")
    categories = [c for c in FASHIONIQ_CATEGORIES if c in set(query_categories)]
    categories += sorted(set(query_categories) - set(categories))
    result: dict[str, float] = {}
    for category in categories:
        query_rows = [i for i, c in enumerate(query_categories) if c == category]
        gallery_rows = [i for i, c in enumerate(gallery_categories) if c == category]
        if not gallery_rows:
            raise ValueError(f"FashionIQ category {category!r} has queries but no gallery images")
        recalls = recall_at_k(
            query_embeds[query_rows],
            gallery_embeds[gallery_rows],
            [target_ids[i] for i in query_rows],
            [gallery_ids[i] for i in gallery_rows],
            ks,
            None,
            max_block_elements,
        )
        result.update({f"{category}_{name}": value for name, value in recalls.items()})
    for k in ks:
        result[f"average_recall@{k}"] = sum(result[f"{c}_recall@{k}"] for c in categories) / len(categories)
    result["average"] = sum(result[f"average_recall@{k}"] for k in ks) / len(ks)
    return result


def _subset_indices(
    subset_ids: Sequence[Sequence[str]], reference_ids: Sequence[str], gallery_index: Mapping[str, int]
) -> torch.Tensor:
    """(num_queries, max_members) gallery indices of each query's subset minus its reference, ``-1``-padded."""
    rows = [
        [gallery_index[name] for name in members if name != reference and name in gallery_index]
        for members, reference in zip(subset_ids, reference_ids)
    ]
    width = max((len(row) for row in rows), default=0)
    return torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long).reshape(len(rows), width)


def rank_subsets(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    subset_indices: torch.Tensor,
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Rank each query's own candidate subset.

    Args:
        query_embeds: (num_queries, dim); gallery_embeds: (num_galleries, dim).
        subset_indices: (num_queries, width) gallery indices, ``-1`` for padding.

    Returns:
        (num_queries, width) gallery indices sorted by similarity, best first, padding (``-1``) last.
    """
    check_embedding_pair(query_embeds, gallery_embeds)
    num_queries, width = subset_indices.shape
    if width == 0:
        return subset_indices.clone()
    block = max(1, max_block_elements // max(width * query_embeds.shape[1], 1))
    rankings = []
    for start in range(0, num_queries, block):
        indices = subset_indices[start : start + block]
        members = gallery_embeds.float()[indices.clamp(min=0)]  # (block, width, dim)
        scores = torch.einsum("bd,bwd->bw", query_embeds[start : start + block].float(), members)
        scores = scores.masked_fill(indices < 0, -math.inf)
        order = scores.argsort(dim=1, descending=True, stable=True)
        rankings.append(indices.gather(1, order))
    return torch.cat(rankings)


def evaluate_cirr(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    reference_ids: Sequence[str],
    target_ids: Sequence[str],
    subset_ids: Sequence[Sequence[str]],
    gallery_ids: Sequence[str],
    ks: Sequence[int] = PROTOCOL_KS["cirr"],
    subset_ks: Sequence[int] = CIRR_SUBSET_KS,
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> dict[str, float]:
    """CIRR: Recall@K over the whole split with the reference removed, Recall_subset@K within ``img_set.members``
    (reference removed), and ``"average"`` = (Recall@5 + Recall_subset@1) / 2 as on the CIRR leaderboard.

    ``subset_ids`` holds, per query, the image names of its ``img_set.members``.
    """
    _check_length("subset_ids", subset_ids, query_embeds.shape[0], "query")
    result = recall_at_k(query_embeds, gallery_embeds, target_ids, gallery_ids, ks, reference_ids, max_block_elements)
    keep = _labelled_queries(target_ids, warn=False)
    gallery_index = {name: i for i, name in enumerate(gallery_ids)}
    rows = keep.nonzero().flatten().tolist()
    subset_indices = _subset_indices([subset_ids[i] for i in rows], [reference_ids[i] for i in rows], gallery_index)
    ranking = rank_subsets(query_embeds[keep], gallery_embeds, subset_indices, max_block_elements)
    gallery_codes, target_codes = encode_labels(gallery_ids, [target_ids[i] for i in rows])
    result.update(
        recall_from_hits(hits_from_ranking(ranking, gallery_codes, target_codes), subset_ks, "recall_subset")
    )
    if 5 in ks and 1 in subset_ks:
        result["average"] = (result["recall@5"] + result["recall_subset@1"]) / 2
    return result


def _column(table, name: str) -> list:
    try:
        return list(table[name])
    # `datasets.Dataset` raises ValueError for an unknown column, a dict KeyError.
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"Expected a `{name}` column, got columns {list(getattr(table, 'column_names', table))}"
        ) from error


_QUERY_METADATA = ("query_id", "reference_id", "target_id", "target_caption", "category", "subset_ids")


class _NeverRetrieved:
    """A target label equal to no gallery label (so the query is counted and never hits), unlike ``None`` (left out)."""

    def __repr__(self) -> str:
        return "<unusable query>"


def _with_forced_misses(protocol: str, queries, unusable_ids: set[str]) -> dict[str, list]:
    """The query columns with the target label (``target_id``, or ``target_caption`` for the caption-match protocols)
    of each unusable query replaced by a label no gallery item has."""
    query_ids = _column(queries, "query_id")
    unknown = unusable_ids - set(query_ids)
    if unknown:
        raise ValueError(
            f"`unusable_query_ids` names {len(unknown)} ids that are not queries, e.g. {sorted(unknown)[:3]}"
        )
    label_column = "target_caption" if protocol in ("fashion200k", "mitstates") else "target_id"
    present = getattr(queries, "column_names", None) or list(queries)
    # Only the metadata the protocols read: never an image column (reading it would decode every image).
    columns = {name: _column(queries, name) for name in _QUERY_METADATA if name in present}
    columns[label_column] = [
        _NeverRetrieved() if query_id in unusable_ids and label is not None else label
        for query_id, label in zip(query_ids, columns[label_column])
    ]
    logger.warning(
        f"{len(unusable_ids)} of {len(query_ids)} queries have an unusable reference image: counted as misses"
    )
    return columns


def evaluate_protocol(
    protocol: str,
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    queries,
    gallery,
    ks: Sequence[int] | None = None,
    remove_reference: bool = False,
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
    unusable_query_ids: Collection[str] = (),
) -> dict[str, float]:
    """Run the protocol named ``protocol`` with metadata read from the query and gallery tables.

    Args:
        protocol: one of ``PROTOCOLS``.
        query_embeds: (num_queries, dim), rows in the order of ``queries``.
        gallery_embeds: (num_galleries, dim), rows in the order of ``gallery``.
        queries: a `datasets.Dataset` (or mapping of column name → list) with ``reference_id`` and ``target_id``,
            plus ``category`` (fashioniq), ``subset_ids`` (cirr) or ``target_caption`` (fashion200k, mitstates).
        gallery: same for the gallery: ``image_id``, plus ``category`` (fashioniq) or ``caption`` (caption match).
        ks: override the protocol's default ranks.
        remove_reference: only for ``exact``: remove each query's reference from its ranking.
        unusable_query_ids: ``query_id`` of queries whose reference image could not be read
            (`CIREvaluationData.unusable_query_ids`): each counts as a miss at every rank, so the denominator stays
            the number of queries with a target.

    Returns:
        the protocol's ``{name: percent}`` dictionary, plus ``"unusable_queries"`` (a count) when some were.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {PROTOCOLS}, got {protocol!r}")
    ks = PROTOCOL_KS[protocol] if ks is None else ks
    if unusable_query_ids:
        queries = _with_forced_misses(protocol, queries, set(unusable_query_ids))
        result = evaluate_protocol(
            protocol, query_embeds, gallery_embeds, queries, gallery, ks, remove_reference, max_block_elements
        )
        return {**result, "unusable_queries": len(set(unusable_query_ids))}
    gallery_ids = _column(gallery, "image_id")
    if protocol == "fashioniq":
        return evaluate_fashioniq(
            query_embeds,
            gallery_embeds,
            _column(queries, "target_id"),
            _column(queries, "category"),
            gallery_ids,
            _column(gallery, "category"),
            ks,
            max_block_elements,
        )
    if protocol == "cirr":
        return evaluate_cirr(
            query_embeds,
            gallery_embeds,
            _column(queries, "reference_id"),
            _column(queries, "target_id"),
            _column(queries, "subset_ids"),
            gallery_ids,
            ks,
            CIRR_SUBSET_KS,
            max_block_elements,
        )
    if protocol in ("fashion200k", "mitstates"):
        return evaluate_caption_match(
            query_embeds,
            gallery_embeds,
            _column(queries, "target_caption"),
            _column(gallery, "caption"),
            _column(queries, "reference_id"),
            gallery_ids,
            ks,
            max_block_elements,
        )
    reference_ids = _column(queries, "reference_id") if remove_reference and protocol == "exact" else None
    return recall_at_k(
        query_embeds, gallery_embeds, _column(queries, "target_id"), gallery_ids, ks, reference_ids, max_block_elements
    )


MODIFICATION_TYPE_COLUMN = "modification_type"


def reference_ranked_first(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    reference_ids: Sequence[str],
    gallery_ids: Sequence[str],
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> float | None:
    """Percentage of queries whose best-ranked gallery item is their own reference image, before any reference
    removal: queries that ignore their modification text. Over the queries whose reference is in the gallery; ``None``
    when none is."""
    check_embedding_pair(query_embeds, gallery_embeds)
    _check_length("reference_ids", reference_ids, query_embeds.shape[0], "query")
    gallery_codes, reference_codes = encode_labels(gallery_ids, reference_ids)
    present = reference_codes >= 0
    if not present.any():
        return None
    ranking = rank_gallery(query_embeds[present], gallery_embeds, 1, max_block_elements=max_block_elements)
    return 100.0 * hits_from_ranking(ranking, gallery_codes, reference_codes[present])[:, 0].float().mean().item()


def retrieval_diagnostics(
    protocol: str,
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    queries,
    gallery,
    remove_reference: bool = False,
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
    unusable_query_ids: Collection[str] = (),
) -> dict:
    """What the headline Recall hides, for users: the protocol's metrics per modification type, where the queries have
    a ``modification_type`` column (shapes: add / remove / change colour, size, shape), each through
    :func:`evaluate_protocol` on that type's queries, and the share of queries whose own reference is ranked first
    (:func:`reference_ranked_first`; the protocols where the reference is a gallery image by id).

    Returns:
        ``{"reference_ranked_first": percent or None, "by_modification_type": {type: {"queries": n, metric: percent}}}``
        (the second only with the column).
    """
    present = set(getattr(queries, "column_names", None) or list(queries))
    result: dict = {}
    if protocol in ("shapes", "exact", "cirr") and "reference_id" in present:
        result["reference_ranked_first"] = reference_ranked_first(
            query_embeds,
            gallery_embeds,
            _column(queries, "reference_id"),
            _column(gallery, "image_id"),
            max_block_elements,
        )
    if MODIFICATION_TYPE_COLUMN in present:
        types = [
            str(value) if value not in (None, "") else "unlabelled"
            for value in _column(queries, MODIFICATION_TYPE_COLUMN)
        ]
        columns = {name: _column(queries, name) for name in _QUERY_METADATA if name in present}
        query_ids = columns.get("query_id")
        by_type = {}
        for kind in sorted(set(types)):
            rows = [i for i, value in enumerate(types) if value == kind]
            subset = {name: [values[i] for i in rows] for name, values in columns.items()}
            unusable = set(unusable_query_ids) & {query_ids[i] for i in rows} if query_ids is not None else set()
            if all(label is None for label in subset.get("target_id", [0])):
                continue  # no ground truth for this type (e.g. a test split without targets)
            metrics = evaluate_protocol(
                protocol,
                query_embeds[rows],
                gallery_embeds,
                subset,
                gallery,
                remove_reference=remove_reference,
                max_block_elements=max_block_elements,
                unusable_query_ids=unusable,
            )
            by_type[kind] = {"queries": len(rows), **metrics}
        result["by_modification_type"] = by_type
    return result


def cirr_submission_dicts(
    pair_ids: Sequence[int | str],
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    reference_ids: Sequence[str],
    subset_ids: Sequence[Sequence[str]],
    gallery_ids: Sequence[str],
    top_k: int = 50,
    subset_top_k: int = 3,
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> tuple[dict, dict]:
    """The two CIRR test-server payloads: ``{"version": "rc2", "metric": "recall", "<pairid>": [top-50 names]}`` and
    ``{"version": "rc2", "metric": "recall_subset", "<pairid>": [top-3 names within the subset]}``, references removed."""
    check_embedding_pair(query_embeds, gallery_embeds)
    for name, values in (("pair_ids", pair_ids), ("reference_ids", reference_ids), ("subset_ids", subset_ids)):
        _check_length(name, values, query_embeds.shape[0], "query")
    _check_length("gallery_ids", gallery_ids, gallery_embeds.shape[0], "gallery item")
    # `datasets` columns index item by item (35.7 s for a CIRR test1 submission): plain lists once (0.7 s).
    pair_ids, reference_ids, subset_ids, gallery_ids = (
        list(v) for v in (pair_ids, reference_ids, subset_ids, gallery_ids)
    )
    gallery_codes, reference_codes = encode_labels(gallery_ids, reference_ids)
    ranking = rank_gallery(query_embeds, gallery_embeds, top_k, reference_codes, gallery_codes, max_block_elements)
    gallery_index = {name: i for i, name in enumerate(gallery_ids)}
    subset_ranking = rank_subsets(
        query_embeds, gallery_embeds, _subset_indices(subset_ids, reference_ids, gallery_index), max_block_elements
    )
    recall: dict = {"version": "rc2", "metric": "recall"}
    recall_subset: dict = {"version": "rc2", "metric": "recall_subset"}
    for row, pair_id in enumerate(pair_ids):
        recall[str(pair_id)] = [gallery_ids[i] for i in ranking[row].tolist() if i >= 0]
        recall_subset[str(pair_id)] = [gallery_ids[i] for i in subset_ranking[row, :subset_top_k].tolist() if i >= 0]
    return recall, recall_subset


def cirr_submission(
    pair_ids: Sequence[int | str],
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    reference_ids: Sequence[str],
    subset_ids: Sequence[Sequence[str]],
    gallery_ids: Sequence[str],
    output_dir: str | os.PathLike,
    name: str = "mqirtn",
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> tuple[Path, Path]:
    """Write the CIRR test-server files ``recall_submission_{name}.json`` (top-50) and
    ``recall_subset_submission_{name}.json`` (top-3 within the subset) into ``output_dir``; returns their paths."""
    recall, recall_subset = cirr_submission_dicts(
        pair_ids,
        query_embeds,
        gallery_embeds,
        reference_ids,
        subset_ids,
        gallery_ids,
        max_block_elements=max_block_elements,
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = (output_dir / f"recall_submission_{name}.json", output_dir / f"recall_subset_submission_{name}.json")
    for path, payload in zip(paths, (recall, recall_subset)):
        path.write_text(json.dumps(payload))
    return paths
