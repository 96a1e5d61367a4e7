"""Recall@K for retrieval, as an `evaluate` metric module (self-contained: `evaluate` copies this file alone)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np


_CITATION = """\
@inproceedings{vo2019composing,
  title={Composing Text and Image for Image Retrieval - an Empirical Odyssey},
  author={Vo, Nam and Jiang, Lu and Sun, Chen and Murphy, Kevin and Li, Li-Jia and Fei-Fei, Li and Hays, James},
  booktitle={CVPR},
  year={2019}
}
"""

_DESCRIPTION = """\
Recall@K: the percentage of queries whose target appears among the first K retrieved items. The standard
metric of composed image retrieval (FashionIQ, CIRR, Fashion200k, MIT-States, CSS/shapes).

Two input forms:
- rankings: `predictions` is, per query, the list of retrieved ids best first, and `references` the target id;
  a hit is the target id within the first K ids. (For caption-match protocols pass captions as ids.)
- scores: `predictions` is, per query, the similarity to every gallery item, and `references` the index of the
  target item; the target's rank counts every *other* item scoring at least as high (ties count against the
  query), and a hit is a rank below K. Scores are floats: rows of Python or numpy integers with integer references
  are refused (they look like rankings of integer ids, which would be read as scores); pass such ids as strings.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str`, or `list` of `list` of `float`): per query, the ranked ids (best
        first) or the scores over the gallery (num_queries, num_galleries).
    references (`list` of `str`, or `list` of `int`): per query, the target id or the target's gallery index.
    k (`int` or `list` of `int`, defaults to `[1, 5, 10, 50]`): the cut-offs.
Returns:
    `dict` mapping `"recall@K"` to a percentage (0-100) for each K.
Examples:
    >>> recall = evaluate.load("metrics/recall_at_k")
    >>> recall.compute(predictions=[["a", "b", "c"], ["c", "a", "b"]], references=["b", "b"], k=[1, 2, 3])
    {'recall@1': 0.0, 'recall@2': 50.0, 'recall@3': 100.0}
    >>> recall.compute(predictions=[[0.1, 0.9, 0.3], [0.8, 0.2, 0.5]], references=[1, 2], k=[1, 2])
    {'recall@1': 50.0, 'recall@2': 100.0}
"""


def hits_at_k(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Percentage of ranks (0-based; -1 = not retrieved) below each k."""
    found = ranks >= 0
    return {f"recall@{k}": float(100.0 * np.mean(found & (ranks < k))) for k in ks}


def ranks_from_rankings(rankings: Sequence[Sequence[str]], targets: Sequence[str]) -> np.ndarray:
    """0-based position of each target in its ranking; -1 when absent. Shape (num_queries,)."""
    return np.array([list(ranking).index(t) if t in ranking else -1 for ranking, t in zip(rankings, targets)])


def ranks_from_scores(scores: np.ndarray, target_indices: np.ndarray) -> np.ndarray:
    """Pessimistic 0-based rank of each target: the number of other items scoring >= the target.

    scores: (num_queries, num_galleries); target_indices: (num_queries,).
    """
    rows = np.arange(scores.shape[0])
    target_scores = scores[rows, target_indices]
    return (scores >= target_scores[:, None]).sum(axis=1) - 1


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_not_integer_rankings(predictions, references) -> None:
    """`ValueError` when `predictions` are rows of integers and `references` integers: rankings of integer ids, which
    the scores form would read as similarities (`[[3, 1, 2]]` against `1` would score recall@2 = 0)."""
    if predictions is None or references is None or len(predictions) == 0 or len(references) == 0:
        return
    if not _is_integer(references[0]):
        return
    rows = [np.asarray(row) if isinstance(row, np.ndarray) else row for row in predictions]
    if all(
        (isinstance(row, np.ndarray) and np.issubdtype(row.dtype, np.integer))
        or (not isinstance(row, np.ndarray) and len(row) > 0 and all(_is_integer(value) for value in row))
        for row in rows
    ):
        raise ValueError(
            "`predictions` are rows of integers with integer `references`: rankings of integer ids? Pass the ids "
            "as strings for the rankings form (predictions=[['3', '1', '2']], references=['1']), or float scores "
            "over the gallery for the scores form"
        )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    """Recall@K over rankings or score matrices."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("string")),
                        "references": datasets.Value("string"),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float32")),
                        "references": datasets.Value("int64"),
                    }
                ),
            ],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """`evaluate.Metric.add_batch`; integer rankings are refused (see `check_not_integer_rankings`)."""
        check_not_integer_rankings(predictions, references)
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """`evaluate.Metric.compute`; integer rankings are refused (see `check_not_integer_rankings`)."""
        check_not_integer_rankings(predictions, references)
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, k=(1, 5, 10, 50)):
        ks = [k] if isinstance(k, int) else list(k)
        if not ks or any(not isinstance(value, int) or value < 1 for value in ks):
            raise ValueError(f"`k` must be a positive integer or a list of them, got {k!r}")
        if len(predictions) == 0:
            raise ValueError("Recall@K needs at least one query, got none")
        if isinstance(references[0], str):
            ranks = ranks_from_rankings(predictions, references)
        else:
            scores = np.asarray(predictions, dtype=np.float64)
            if scores.ndim != 2:
                raise ValueError(f"Score predictions must all have the same gallery length, got shape {scores.shape}")
            targets = np.asarray(references, dtype=np.int64)
            if targets.min() < 0 or targets.max() >= scores.shape[1]:
                raise ValueError(
                    f"Target indices must lie in [0, {scores.shape[1]}), got {targets.min()}..{targets.max()}"
                )
            ranks = ranks_from_scores(scores, targets)
        return hits_at_k(ranks, ks)
