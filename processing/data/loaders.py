"""Composed-image-retrieval dataset loaders with one schema for training and evaluation.

Each dataset registers a `DatasetSpec` (`processing.data.registry`) next to its reader, and two entry points serve
them all, one return type each:

- :func:`load_training_queries` returns a `datasets.Dataset` with at least ``reference_image`` (Image),
  ``modification_text`` (str), ``target_image`` (Image), ``reference_id``, ``target_id`` (str; the dataset's ids);
- :func:`load_evaluation_data` returns a :class:`CIREvaluationData` with

  - ``queries``: ``query_id`` (str), ``reference_image`` (Image), ``modification_text`` (str), ``reference_id``
    (str), ``target_id`` (str or None where unknown) and the protocol's extras: ``category`` (FashionIQ),
    ``pair_id`` + ``subset_ids`` (CIRR), ``target_caption`` (Fashion200k, MIT-States);
  - ``gallery``: ``image_id`` (str), ``image`` (Image), and ``category`` (FashionIQ) or ``caption`` (caption match);
  - ``protocol``: the name :func:`processing.data.metrics.evaluate_protocol` takes.

The folder datasets (`processing.data.folder_datasets`: FashionIQ, CIRR, Fashion200k, MIT-States, your own files)
share one scaffold, here: a reader turns the distributed layout into rows of image paths (:class:`SplitRows`), and
:func:`folder_loaders` makes its two loaders, which check the images, drop the rows
with a missing or corrupt one (``check_images``: ``"verify"`` opens and verifies every image, ``"exists"`` only
checks the file, ``"none"`` trusts the annotations, for counting without images), say in one warning how many,
and build the `datasets` tables. Images are stored as paths in `datasets.Image` columns, decoded only when a row
is read (or never, with ``decode_images=False``). Skipping at load time keeps every batch whole, which the
multi-process in-batch loss needs.

>>> from processing.data.loaders import load_evaluation_data, load_training_queries
>>> train = load_training_queries("fashioniq", "data/fashioniq", "train", both_caption_orders=True)  # doctest: +SKIP
>>> val = load_evaluation_data("cirr", "data/cirr", "val")                                         # doctest: +SKIP
>>> val.protocol, val.queries.column_names                                                        # doctest: +SKIP
('cirr', ['query_id', 'reference_image', 'modification_text', 'reference_id', 'target_id', 'pair_id', 'subset_ids'])
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Image, Value, concatenate_datasets, load_dataset
from PIL import Image as PILImage
from tqdm.auto import tqdm
from transformers.utils import logging

from .. import processing_mqirtn
from .registry import DatasetSpec, get_dataset_spec, register_dataset
from .shapes import load_shapes, load_shapes_gallery


logger = logging.get_logger(__name__)

CHECK_MODES: tuple[str, ...] = ("verify", "exists", "none")


@dataclass
class CIREvaluationData:
    """What an evaluation needs: the queries, the gallery they are ranked against, and the protocol.

    Attributes:
        queries: `datasets.Dataset`, one row per query (see the module docstring for columns).
        gallery: `datasets.Dataset`, one row per gallery image.
        protocol: one of `processing.data.metrics.PROTOCOLS`.
        remove_reference: for the ``exact`` protocol, whether a query's reference is removed from its ranking
            (the other protocols fix this themselves).
        unusable_query_ids: ``query_id`` of the queries whose reference image is missing or unreadable. They stay in
            ``queries`` and count as misses (`evaluate_protocol`), so the protocol's denominator never shrinks.

    Gallery ids (per category where the gallery has a ``category`` column) and query ids must be unique: a duplicate
    raises ``ValueError`` (eight images sharing one id would all be "the target").
    """

    queries: Dataset
    gallery: Dataset
    protocol: str
    remove_reference: bool = False
    unusable_query_ids: frozenset = frozenset()

    def __post_init__(self):
        self.unusable_query_ids = frozenset(self.unusable_query_ids)
        grouped = "category" in self.gallery.column_names
        gallery_keys = (
            list(zip(self.gallery["category"], self.gallery["image_id"]))
            if grouped
            else list(self.gallery["image_id"])
        )
        _refuse_duplicates(gallery_keys, "gallery image id" + (" (within a category)" if grouped else ""))
        if "query_id" in self.queries.column_names:
            _refuse_duplicates(list(self.queries["query_id"]), "query id")

    def __getitem__(self, key: str) -> Any:
        # Dict-style access (`data["queries"]`) for code that treats the result as a mapping.
        if key not in ("queries", "gallery", "protocol", "remove_reference"):
            raise KeyError(key)
        return getattr(self, key)

    @property
    def has_targets(self) -> bool:
        """False for splits without ground truth (FashionIQ test, CIRR test1)."""
        return any(target is not None for target in self.queries["target_id"])


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers


def _refuse_duplicates(keys: list, what: str) -> None:
    counts = Counter(keys)
    repeated = [(key, count) for key, count in counts.items() if count > 1]
    if repeated:
        shown = ", ".join(f"{key!r} x{count}" for key, count in repeated[:5])
        raise ValueError(
            f"{len(repeated)} duplicate {what}(s) in the evaluation data ({shown}{', ...' if len(repeated) > 5 else ''}); "
            "ids must be unique"
        )


def _check_mode(check_images: bool | str) -> str:
    if check_images is True:
        return "verify"
    if check_images is False:
        return "none"
    if check_images not in CHECK_MODES:
        raise ValueError(f"`check_images` must be a bool or one of {CHECK_MODES}, got {check_images!r}")
    return check_images


def _image_problem(path: str, mode: str) -> str | None:
    """``None`` for a usable image, else ``"missing"`` or ``"corrupt"``."""
    if not os.path.isfile(path):
        return "missing"
    if mode == "verify":
        cap = processing_mqirtn.MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():  # the decoder's own cap is checked below
                warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
                with PILImage.open(path) as image:
                    if cap is not None and image.size[0] * image.size[1] > cap:
                        return "corrupt"  # over the decoder's pixel cap: it would never be read
                    image.verify()
        # PIL raises many exception types for bad files (OSError, SyntaxError, ValueError, struct.error, ...).
        except Exception:
            return "corrupt"
    return None


def find_bad_images(
    paths: Iterable[str], check_images: bool | str = "verify", desc: str = "Checking images"
) -> dict[str, str]:
    """Check image files; returns ``{path: "missing" | "corrupt"}`` for the unusable ones (empty when all are fine).

    ``check_images``: ``"verify"`` (open + `PIL.Image.Image.verify`), ``"exists"`` or ``"none"``.
    """
    mode = _check_mode(check_images)
    if mode == "none":
        return {}
    unique = list(dict.fromkeys(paths))
    bad = {}
    for path in tqdm(unique, desc=desc, disable=len(unique) < 1000, leave=False):
        problem = _image_problem(path, mode)
        if problem is not None:
            bad[path] = problem
    return bad


def _warn_skipped(source: str, bad: dict[str, str], dropped: dict[str, int]) -> None:
    """The one warning per load about unusable images."""
    if not bad:
        return
    missing = sum(problem == "missing" for problem in bad.values())
    examples = ", ".join(sorted(bad)[:3])
    dropped_text = ", ".join(f"{count} {what}" for what, count in dropped.items() if count)
    logger.warning(
        f"{source}: skipped {len(bad)} unusable images ({missing} missing, {len(bad) - missing} corrupt; e.g. {examples}); "
        f"dropped {dropped_text or 'no rows'}"
    )


# ----------------------------------------------------------------------------------------------------------------
# The scaffold every folder dataset shares: reader -> rows of paths -> checked images -> `datasets` tables

QUERY_IMAGE_COLUMNS: tuple[str, ...] = ("reference_image", "target_image")


@dataclass
class SplitRows:
    """What a folder dataset's reader makes of its layout: rows of image paths, before the images are checked.

    Attributes:
        source: how the warning names the split, e.g. ``"CIRR val"``.
        protocol: the evaluation protocol (`processing.data.metrics.PROTOCOLS`).
        queries: one dict per query with ``reference_image`` / ``target_image`` (paths; ``target_image`` ``None`` or
            absent where unknown), ``modification_text``, ``reference_id``, ``target_id``, ``query_id`` (evaluation)
            and the ``query_extra`` columns.
        gallery: evaluation only: one dict per image with ``image_id``, ``image`` (path) and the ``gallery_extra``
            columns.
        query_extra, gallery_extra: `datasets` features of the extra columns, by name.
        bad: ``{path: "missing" | "corrupt"}`` when the reader had to check the images itself to build its rows
            (Fashion200k and MIT-States pair only usable images); ``None`` lets the scaffold check them.
        dropped: what the reader already left out because of ``bad``, for the one warning.
        remove_reference: ``exact`` protocol: remove each query's reference image from its own ranking.
    """

    source: str
    protocol: str
    queries: list[dict]
    gallery: list[dict] = field(default_factory=list)
    query_extra: dict[str, Any] = field(default_factory=dict)
    gallery_extra: dict[str, Any] = field(default_factory=dict)
    bad: dict[str, str] | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    remove_reference: bool = False


def _filter_rows(rows: list[dict], path_keys: Sequence[str], bad: dict[str, str]) -> tuple[list[dict], int]:
    """Drop rows any of whose ``path_keys`` (present and not None) is a bad image."""
    kept = [row for row in rows if not any(row.get(key) is not None and row[key] in bad for key in path_keys)]
    return kept, len(rows) - len(kept)


def _drop_unusable(rows: SplitRows, mode: str, evaluation: bool = False) -> tuple[list[dict], list[dict], set[str]]:
    """(queries, gallery, unusable query ids) without the rows holding a missing or corrupt image; one warning says
    what was dropped. For evaluation, queries are never dropped: one whose reference image is unusable is kept and
    its id returned (it counts as a miss), one whose target image is unusable loses its target from the gallery."""
    bad = rows.bad
    if bad is None:
        paths = [row[key] for row in rows.queries for key in QUERY_IMAGE_COLUMNS if row.get(key)]
        bad = find_bad_images(
            paths + [row["image"] for row in rows.gallery], mode, desc=f"Checking images of {rows.source}"
        )
    unusable: set[str] = set()
    if evaluation:
        queries, dropped_queries = rows.queries, 0
        unusable = {row["query_id"] for row in queries if row.get("reference_image") in bad}
    else:
        queries, dropped_queries = _filter_rows(rows.queries, QUERY_IMAGE_COLUMNS, bad)
    gallery, dropped_gallery = _filter_rows(rows.gallery, ("image",), bad)
    counts = {"queries": dropped_queries, "gallery images": dropped_gallery, **rows.dropped}
    if unusable:
        counts["queries kept as misses (unusable reference image)"] = len(unusable)
    _warn_skipped(rows.source, bad, counts)
    return queries, gallery, unusable


def _table(rows: list[dict], features: dict[str, Any]) -> Dataset:
    return Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=Features(features))


def _training_dataset(rows: SplitRows, mode: str, decode_images: bool) -> Dataset:
    """The training table of ``rows``: ``reference_image``, ``modification_text``, ``target_image``,
    ``reference_id``, ``target_id`` and the extra columns."""
    if any(row.get("target_id") is None for row in rows.queries):
        raise ValueError(f"{rows.source} has no targets and cannot be used for training")
    queries, _, _ = _drop_unusable(rows, mode)
    features = {
        "reference_image": Image(decode=decode_images),
        "modification_text": Value("string"),
        "target_image": Image(decode=decode_images),
        "reference_id": Value("string"),
        "target_id": Value("string"),
        **rows.query_extra,
    }
    return _table(queries, features)


def _evaluation_data(rows: SplitRows, mode: str, decode_images: bool) -> CIREvaluationData:
    """Queries (without target images) and gallery of ``rows`` as a :class:`CIREvaluationData`."""
    queries, gallery, unusable = _drop_unusable(rows, mode, evaluation=True)
    if rows.protocol == "exact":
        gallery_ids = {row["image_id"] for row in gallery}
        outside = sum(row["target_id"] is not None and row["target_id"] not in gallery_ids for row in queries)
        if outside:
            logger.warning(f"{rows.source}: {outside} query targets are not in the gallery and can never be retrieved")
    query_features = {
        "query_id": Value("string"),
        "reference_image": Image(decode=decode_images),
        "modification_text": Value("string"),
        "reference_id": Value("string"),
        "target_id": Value("string"),
        **rows.query_extra,
    }
    gallery_features = {"image_id": Value("string"), "image": Image(decode=decode_images), **rows.gallery_extra}
    return CIREvaluationData(
        queries=_table(queries, query_features),
        gallery=_table(gallery, gallery_features),
        protocol=rows.protocol,
        remove_reference=rows.remove_reference,
        unusable_query_ids=unusable,
    )


def folder_loaders(read: Callable[..., SplitRows]) -> tuple[Callable[..., Dataset], Callable[..., CIREvaluationData]]:
    """The (training, evaluation) loaders of a folder dataset whose reader is
    ``read(data_dir: Path, split, evaluation: bool, mode, **options) -> SplitRows``."""

    def load_training(
        data_dir: str | os.PathLike,
        split: str = "train",
        check_images: bool | str = "verify",
        decode_images: bool = True,
        **options,
    ) -> Dataset:
        mode = _check_mode(check_images)
        return _training_dataset(read(Path(data_dir), split, False, mode, **options), mode, decode_images)

    def load_evaluation(
        data_dir: str | os.PathLike,
        split: str,
        check_images: bool | str = "verify",
        decode_images: bool = True,
        **options,
    ) -> CIREvaluationData:
        mode = _check_mode(check_images)
        return _evaluation_data(read(Path(data_dir), split, True, mode, **options), mode, decode_images)

    return load_training, load_evaluation


# ----------------------------------------------------------------------------------------------------------------
# `datasets` datasets (local or on the Hub)


def _hf_columns(
    dataset: Dataset,
    reference_image_column: str,
    text_column: str,
    target_image_column: str,
    reference_id_column: str | None,
    target_id_column: str | None,
    modification_type_column: str | None = None,
) -> Dataset:
    columns = {
        reference_image_column: "reference_image",
        text_column: "modification_text",
        target_image_column: "target_image",
    }
    if reference_id_column is not None:
        columns[reference_id_column] = "reference_id"
    if target_id_column is not None:
        columns[target_id_column] = "target_id"
    if modification_type_column is not None:
        columns[modification_type_column] = "modification_type"
    missing = [name for name in columns if name not in dataset.column_names]
    if missing:
        raise ValueError(f"Columns {missing} are not in the dataset; it has {dataset.column_names}")
    dataset = dataset.select_columns(list(columns)).rename_columns({k: v for k, v in columns.items() if k != v})
    for name in ("reference_image", "target_image"):
        feature = dataset.features[name]
        if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
            dataset = dataset.cast_column(name, Image())
        elif not isinstance(feature, Image):
            raise ValueError(f"Column for `{name}` must hold images or image paths, got feature {feature}")
    for name in ("reference_id", "target_id", "modification_type"):
        if name in dataset.column_names and dataset.features[name] != Value("string"):
            dataset = dataset.cast_column(name, Value("string"))
    return dataset


def from_hf_dataset(
    dataset: Dataset,
    reference_image_column: str = "reference_image",
    text_column: str = "modification_text",
    target_image_column: str = "target_image",
    reference_id_column: str | None = None,
    target_id_column: str | None = None,
    modification_type_column: str | None = None,
) -> Dataset:
    """Training queries in the unified schema from any `datasets.Dataset`, by naming its columns (like
    ``run_clip.py``'s ``--image_column`` / ``--caption_column``). String image columns are read as image paths."""
    return _hf_columns(
        dataset,
        reference_image_column,
        text_column,
        target_image_column,
        reference_id_column,
        target_id_column,
        modification_type_column,
    )


def evaluation_data_from_hf(
    dataset: Dataset,
    reference_image_column: str = "reference_image",
    text_column: str = "modification_text",
    target_image_column: str = "target_image",
    reference_id_column: str | None = None,
    target_id_column: str | None = None,
    remove_reference: bool = False,
    modification_type_column: str | None = None,
) -> CIREvaluationData:
    """:class:`CIREvaluationData` (protocol ``"exact"``) from any `datasets.Dataset`: the gallery is every distinct
    target and reference image by id, so ``reference_id_column`` and ``target_id_column`` are required. A
    ``modification_type_column`` gives the evaluation's per-type breakdown (`metrics.retrieval_diagnostics`)."""
    if reference_id_column is None or target_id_column is None:
        raise ValueError("Evaluation on a `datasets` dataset needs `reference_id_column` and `target_id_column`")
    dataset = _hf_columns(
        dataset,
        reference_image_column,
        text_column,
        target_image_column,
        reference_id_column,
        target_id_column,
        modification_type_column,
    )
    first_row: dict[str, tuple[str, int]] = {}
    for column, ids in (("target_image", dataset["target_id"]), ("reference_image", dataset["reference_id"])):
        for row, identifier in enumerate(ids):
            first_row.setdefault(identifier, (column, row))
    parts = []
    for column in ("target_image", "reference_image"):
        rows = [row for identifier, (source, row) in first_row.items() if source == column]
        id_column = "target_id" if column == "target_image" else "reference_id"
        part = dataset.select(rows).select_columns([id_column, column])
        parts.append(part.rename_columns({id_column: "image_id", column: "image"}))
    queries = dataset.remove_columns(["target_image"]).add_column("query_id", [str(i) for i in range(len(dataset))])
    return CIREvaluationData(
        queries=queries, gallery=concatenate_datasets(parts), protocol="exact", remove_reference=remove_reference
    )


HUB_OPTIONS: tuple[str, ...] = (
    "dataset_config_name",
    "reference_image_column",
    "text_column",
    "target_image_column",
    "reference_id_column",
    "target_id_column",
    "modification_type_column",
)


def _load_hub_training(
    dataset_name: str,
    split: str = "train",
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
    **columns,
) -> Dataset:
    """`datasets.load_dataset(dataset_name, dataset_config_name, split=split)`, then :func:`from_hf_dataset` (the
    modification type is for evaluation only: training leaves it out)."""
    columns.pop("modification_type_column", None)
    return from_hf_dataset(
        load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir), **columns
    )


def _load_hub_evaluation(
    dataset_name: str, split: str, dataset_config_name: str | None = None, cache_dir: str | None = None, **columns
) -> CIREvaluationData:
    """`datasets.load_dataset(dataset_name, dataset_config_name, split=split)`, then :func:`evaluation_data_from_hf`."""
    dataset = load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
    return evaluation_data_from_hf(dataset, **columns)


# ----------------------------------------------------------------------------------------------------------------
# shapes (generated, see `processing.data.shapes`)

SHAPES_OPTIONS: tuple[str, ...] = ("num_queries", "image_size", "seed", "cache_dir")


def _load_shapes_training(
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    num_queries: int | None = None,
    image_size: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    return load_shapes(split, num_queries, image_size=image_size, seed=seed, cache_dir=cache_dir or data_dir)


def _load_shapes_evaluation(
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
    num_queries: int | None = None,
    image_size: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> CIREvaluationData:
    options = dict(image_size=image_size, seed=seed, cache_dir=cache_dir or data_dir)
    queries = load_shapes(split, num_queries, **options)
    gallery = load_shapes_gallery(split, num_queries, **options)
    return CIREvaluationData(queries=queries.remove_columns(["target_image"]), gallery=gallery, protocol="shapes")


# ----------------------------------------------------------------------------------------------------------------
# The registry entries of the generated and `datasets` datasets, and the two entry points

register_dataset(
    DatasetSpec(
        "shapes", "shapes (built-in CSS-style benchmark)", "shapes", "test", _load_shapes_training,
        _load_shapes_evaluation, validation_split="validation", data_dir="none", options=SHAPES_OPTIONS,
    )
)  # fmt: skip
register_dataset(
    DatasetSpec(
        "hub", "a `datasets` dataset", "exact", "test", _load_hub_training, _load_hub_evaluation, data_dir="dataset",
        options=HUB_OPTIONS,
    )
)  # fmt: skip


def _checked_spec(name: str, data_dir) -> DatasetSpec:
    spec = get_dataset_spec(name)
    if spec.data_dir == "folder" and data_dir is None:
        raise ValueError(f"`data_dir` is required for the {name} dataset (its root folder in the distributed layout)")
    if spec.data_dir == "dataset" and data_dir is None:
        raise ValueError(f"`data_dir` must name the `datasets` dataset (Hub name or local path) for name={name!r}")
    return spec


def load_training_queries(
    name: str, data_dir: str | os.PathLike | None = None, split: str = "train", **options: Any
) -> Dataset:
    """Training queries of a registered dataset (``processing.data.registry.dataset_names()``).

    Args:
        name: ``"shapes"`` (built in, no ``data_dir``), ``"fashioniq"``, ``"cirr"``, ``"fashion200k"``,
            ``"mitstates"``, ``"files"`` (``data_dir`` = the query file or its folder), ``"hub"`` (``data_dir`` = a
            `datasets` dataset name or local path, column names as options), or one you registered.
        data_dir: the dataset's root folder, in the layout it is distributed in.
        split: the split to read (usually ``"train"``).
        **options: the dataset's loader options (an unknown one is a `TypeError`); folder datasets also take
            ``check_images`` (``"verify"``, ``"exists"``, ``"none"``) and ``decode_images``.

    Returns:
        `datasets.Dataset` with ``reference_image``, ``modification_text``, ``target_image``, ``reference_id``,
        ``target_id`` (and the dataset's extra columns).
    """
    spec = _checked_spec(name, data_dir)
    return spec.load_training(str(data_dir) if spec.data_dir == "dataset" else data_dir, split, **options)


def load_evaluation_data(
    name: str, data_dir: str | os.PathLike | None = None, split: str | None = None, **options: Any
) -> CIREvaluationData:
    """Queries, gallery and protocol of one evaluation split of a registered dataset.

    Same arguments as :func:`load_training_queries`; ``split`` defaults to the dataset's evaluation split
    (`DatasetSpec.eval_split`). Returns a :class:`CIREvaluationData` (columns in the module docstring).
    """
    spec = _checked_spec(name, data_dir)
    return spec.load_evaluation(
        str(data_dir) if spec.data_dir == "dataset" else data_dir,
        spec.eval_split if split is None else split,
        **options,
    )


__all__ = [
    "CIREvaluationData",
    "SplitRows",
    "evaluation_data_from_hf",
    "find_bad_images",
    "folder_loaders",
    "from_hf_dataset",
    "load_evaluation_data",
    "load_training_queries",
]
