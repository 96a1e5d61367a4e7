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

The folder datasets share one scaffold: a reader turns the distributed layout into rows of image paths
(:class:`SplitRows`), and :func:`_training_dataset` / :func:`_evaluation_data` check the images, drop the rows
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

import csv
import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Image, Value, concatenate_datasets, load_dataset
from datasets import Sequence as SequenceFeature
from PIL import Image as PILImage
from tqdm.auto import tqdm
from transformers.utils import logging

from ..processing_mqirtn import IMAGE_EXTENSIONS
from .metrics import FASHIONIQ_CATEGORIES
from .registry import DatasetSpec, get_dataset_spec, register_dataset
from .shapes import load_shapes, load_shapes_gallery


logger = logging.get_logger(__name__)

CHECK_MODES: tuple[str, ...] = ("verify", "exists", "none")
# The 49 held-out MIT-States test nouns of TIRG (Vo et al., CVPR 2019), as used by its released code.
MITSTATES_TEST_NOUNS: tuple[str, ...] = (
    "armor", "bracelet", "bush", "camera", "candy", "castle", "ceramic", "cheese", "clock", "clothes",
    "coffee", "fan", "fig", "fish", "foam", "forest", "fruit", "furniture", "garden", "gate",
    "glass", "horse", "island", "laptop", "lead", "lightning", "mirror", "orange", "paint", "persimmon",
    "plastic", "plate", "potato", "road", "rubber", "sand", "shell", "sky", "smoke", "steel",
    "stream", "table", "tea", "tomato", "vacuum", "wax", "wheel", "window", "wool",
)  # fmt: skip

FASHIONIQ_LAYOUT = """expected the FashionIQ layout:
  {data_dir}/captions/cap.{{dress,shirt,toptee}}.{{train,val,test}}.json
  {data_dir}/image_splits/split.{{dress,shirt,toptee}}.{{train,val,test}}.json
  {data_dir}/images/<asin>.png (or .jpg)"""
CIRR_LAYOUT = """expected the CIRR layout (github.com/Cuberick-Orion/CIRR, branch cirr_dataset):
  {data_dir}/captions/cap.rc2.{{train,val,test1}}.json
  {data_dir}/image_splits/split.rc2.{{train,val,test1}}.json
  {data_dir}/img_raw/{{train/<n>,dev,test1}}/<name>.png   (or the image folders next to captions/, or in its parent)
where data_dir is the annotation folder `cirr` (a folder holding `cirr/` is accepted too)"""
FASHION200K_LAYOUT = """expected the Fashion200k layout used by TIRG:
  {data_dir}/labels/<category>_{{train,test}}_detect_all.txt   (lines: image_path<TAB>detection_score<TAB>caption)
  {data_dir}/test_queries.txt                                 (lines: source_image_path target_image_path)
  {data_dir}/<image_path>                                     (e.g. women/dresses/.../123_0.jpeg)"""
MITSTATES_LAYOUT = """expected the MIT-States layout:
  {data_dir}/images/<adjective> <noun>/<name>.jpg   (e.g. images/ancient castle/image_123.jpg)"""


@dataclass
class CIREvaluationData:
    """What an evaluation needs: the queries, the gallery they are ranked against, and the protocol.

    Attributes:
        queries: `datasets.Dataset`, one row per query (see the module docstring for columns).
        gallery: `datasets.Dataset`, one row per gallery image.
        protocol: one of `processing.data.metrics.PROTOCOLS`.
        remove_reference: for the ``exact`` protocol, whether a query's reference is removed from its ranking
            (the other protocols fix this themselves).
    """

    queries: Dataset
    gallery: Dataset
    protocol: str
    remove_reference: bool = False

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


def _check_mode(check_images: bool | str) -> str:
    if check_images is True:
        return "verify"
    if check_images is False:
        return "none"
    if check_images not in CHECK_MODES:
        raise ValueError(f"`check_images` must be a bool or one of {CHECK_MODES}, got {check_images!r}")
    return check_images


def _require_file(path: Path, layout: str, data_dir: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Missing {path}: {layout.format(data_dir=data_dir)}")
    return path


def _read_json(path: Path, layout: str, data_dir: Path) -> Any:
    _require_file(path, layout, data_dir)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): {layout.format(data_dir=data_dir)}") from error


def _image_problem(path: str, mode: str) -> str | None:
    """``None`` for a usable image, else ``"missing"`` or ``"corrupt"``."""
    if not os.path.isfile(path):
        return "missing"
    if mode == "verify":
        try:
            with PILImage.open(path) as image:
                image.verify()
        # PIL raises many exception types for bad files (OSError, SyntaxError, ValueError, struct.error, ...).
        except Exception:
            return "corrupt"
    return None


def find_bad_images(paths: Iterable[str], check_images: bool | str = "verify", desc: str = "Checking images") -> dict[str, str]:
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


def _drop_unusable(rows: SplitRows, mode: str) -> tuple[list[dict], list[dict]]:
    """(queries, gallery) without the rows holding a missing or corrupt image; one warning says what was dropped."""
    bad = rows.bad
    if bad is None:
        paths = [row[key] for row in rows.queries for key in QUERY_IMAGE_COLUMNS if row.get(key)]
        bad = find_bad_images(paths + [row["image"] for row in rows.gallery], mode, desc=f"Checking images of {rows.source}")
    queries, dropped_queries = _filter_rows(rows.queries, QUERY_IMAGE_COLUMNS, bad)
    gallery, dropped_gallery = _filter_rows(rows.gallery, ("image",), bad)
    _warn_skipped(rows.source, bad, {"queries": dropped_queries, "gallery images": dropped_gallery, **rows.dropped})
    return queries, gallery


def _table(rows: list[dict], features: dict[str, Any]) -> Dataset:
    return Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=Features(features))


def _training_dataset(rows: SplitRows, mode: str, decode_images: bool) -> Dataset:
    """The training table of ``rows``: ``reference_image``, ``modification_text``, ``target_image``,
    ``reference_id``, ``target_id`` and the extra columns."""
    if any(row.get("target_id") is None for row in rows.queries):
        raise ValueError(f"{rows.source} has no targets and cannot be used for training")
    queries, _ = _drop_unusable(rows, mode)
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
    queries, gallery = _drop_unusable(rows, mode)
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
    )


def _folder_loaders(read: Callable[..., SplitRows]) -> tuple[Callable[..., Dataset], Callable[..., CIREvaluationData]]:
    """The (training, evaluation) loaders of a folder dataset whose reader is
    ``read(data_dir: Path, split, evaluation: bool, mode, **options) -> SplitRows``."""

    def load_training(
        data_dir: str | os.PathLike, split: str = "train", check_images: bool | str = "verify", decode_images: bool = True, **options
    ) -> Dataset:
        mode = _check_mode(check_images)
        return _training_dataset(read(Path(data_dir), split, False, mode, **options), mode, decode_images)

    def load_evaluation(
        data_dir: str | os.PathLike, split: str, check_images: bool | str = "verify", decode_images: bool = True, **options
    ) -> CIREvaluationData:
        mode = _check_mode(check_images)
        return _evaluation_data(read(Path(data_dir), split, True, mode, **options), mode, decode_images)

    return load_training, load_evaluation


def _normalize_split(split: str, aliases: dict[str, str], allowed: Sequence[str], dataset: str) -> str:
    split = aliases.get(split, split)
    if split not in allowed:
        raise ValueError(f"`split` for {dataset} must be one of {tuple(allowed)}, got {split!r}")
    return split


# ----------------------------------------------------------------------------------------------------------------
# FashionIQ


def fashioniq_caption(captions: Sequence[str]) -> str:
    """Join FashionIQ's two relative captions as ``"{c1} and {c2}"``, stripping ``.?, `` from their ends."""
    return " and ".join(caption.strip(".?, ") for caption in captions)



def _read_fashioniq(
    data_dir: Path,
    split: str,
    evaluation: bool,
    mode: str,
    categories: Sequence[str] = FASHIONIQ_CATEGORIES,
    both_caption_orders: bool = False,
) -> SplitRows:
    """FashionIQ (Wu et al., CVPR 2021) in its distributed layout (see ``FASHIONIQ_LAYOUT``).

    ``split``: ``"train"``, ``"val"`` (aliases ``"validation"``, ``"dev"``) or ``"test"`` (no targets);
    ``categories``: a subset of ``("dress", "shirt", "toptee")``; ``both_caption_orders`` (training only) adds each
    pair a second time with its captions swapped. Queries and both tables carry ``category``; the evaluation gallery
    of a category is its ``split.{category}.{split}.json`` images (protocol ``"fashioniq"``).
    """
    split = _normalize_split(split, {"validation": "val", "dev": "val"}, ("train", "val", "test"), "FashionIQ")
    unknown = sorted(set(categories) - set(FASHIONIQ_CATEGORIES))
    if unknown or not categories:
        raise ValueError(f"`categories` must be a non-empty subset of {FASHIONIQ_CATEGORIES}, got {tuple(categories)}")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"FashionIQ folder {data_dir} does not exist: {FASHIONIQ_LAYOUT.format(data_dir=data_dir)}")

    def image_path(asin: str) -> str:
        png = data_dir / "images" / f"{asin}.png"
        if mode != "none" and not png.is_file():
            jpg = png.with_suffix(".jpg")
            if jpg.is_file():
                return str(jpg)
        return str(png)

    queries: list[dict] = []
    gallery: list[dict] = []
    for category in categories:
        entries = _read_json(data_dir / "captions" / f"cap.{category}.{split}.json", FASHIONIQ_LAYOUT, data_dir)
        for index, entry in enumerate(entries):
            target = entry.get("target")
            orders = [entry["captions"]]
            if both_caption_orders and not evaluation:
                orders.append(list(reversed(entry["captions"])))
            for captions in orders:
                queries.append(
                    {
                        "query_id": f"{category}-{index}",
                        "reference_id": entry["candidate"],
                        "target_id": target,
                        "modification_text": fashioniq_caption(captions),
                        "category": category,
                        "reference_image": image_path(entry["candidate"]),
                        "target_image": image_path(target) if target is not None else None,
                    }
                )
        if evaluation:
            names = _read_json(data_dir / "image_splits" / f"split.{category}.{split}.json", FASHIONIQ_LAYOUT, data_dir)
            gallery.extend({"image_id": name, "image": image_path(name), "category": category} for name in names)
    category = {"category": Value("string")}
    return SplitRows(f"FashionIQ {split}", "fashioniq", queries, gallery, query_extra=category, gallery_extra=category)


# ----------------------------------------------------------------------------------------------------------------
# CIRR

def _cirr_annotation_dir(data_dir: Path) -> Path:
    """The folder holding ``captions/`` and ``image_splits/``: ``data_dir`` itself or ``data_dir/cirr``."""
    for folder in (data_dir, data_dir / "cirr"):
        if (folder / "captions").is_dir() or (folder / "image_splits").is_dir():
            return folder
    raise FileNotFoundError(f"No `captions/` folder in {data_dir}: {CIRR_LAYOUT.format(data_dir=data_dir)}")


def _cirr_image_root(annotations: Path, split_file_values: Sequence[str], mode: str) -> Path:
    """The folder the split file's relative paths (``./dev/...``) start from: the documented ``img_raw/``, else the
    annotation folder or its parent (the layout of several public code bases)."""
    candidates = [annotations / "img_raw", annotations, annotations.parent]
    for root in candidates:
        if _has_split_folder(root, split_file_values):
            return root
    if mode == "none":
        return candidates[0]
    top = _split_folder(split_file_values)
    raise FileNotFoundError(
        f"CIRR images not found: none of {[str(root / top) for root in candidates]} exists; "
        f"{CIRR_LAYOUT.format(data_dir=annotations)}"
    )


def _split_folder(split_file_values: Sequence[str]) -> str:
    """The first folder of the split file's paths: ``"./dev/dev-244-0-img0.png"`` → ``"dev"``."""
    parts = Path(split_file_values[0]).parts if split_file_values else ()
    return parts[0] if len(parts) > 1 else "dev"


def _has_split_folder(root: Path, split_file_values: Sequence[str]) -> bool:
    return bool(split_file_values) and (root / _split_folder(split_file_values)).is_dir()



def _read_cirr(data_dir: Path, split: str, evaluation: bool, mode: str) -> SplitRows:
    """CIRR (Liu et al., ICCV 2021) in its distributed layout (see ``CIRR_LAYOUT``); images come from NLVR2.

    ``data_dir`` is the annotation folder (``cirr/``, holding ``captions/`` and ``image_splits/``); ``split``:
    ``"train"``, ``"val"`` (aliases ``"validation"``, ``"dev"``) or ``"test1"`` (alias ``"test"``, no targets).
    Evaluation queries carry ``pair_id`` (int) and ``subset_ids`` (the names of ``img_set.members``); the gallery is
    every image of the split (protocol ``"cirr"``).
    """
    split = _normalize_split(split, {"validation": "val", "dev": "val", "test": "test1"}, ("train", "val", "test1"), "CIRR")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"CIRR folder {data_dir} does not exist: {CIRR_LAYOUT.format(data_dir=data_dir)}")
    annotations = _cirr_annotation_dir(data_dir)
    split_map: dict[str, str] = _read_json(annotations / "image_splits" / f"split.rc2.{split}.json", CIRR_LAYOUT, data_dir)
    entries = _read_json(annotations / "captions" / f"cap.rc2.{split}.json", CIRR_LAYOUT, data_dir)
    image_root = _cirr_image_root(annotations, list(split_map.values()), mode)

    def image_path(name: str) -> str:
        try:
            return str(image_root / split_map[name])
        except KeyError:
            raise ValueError(f"CIRR image {name!r} is in cap.rc2.{split}.json but not in split.rc2.{split}.json") from None

    queries = [
        {
            "query_id": str(entry["pairid"]),
            "pair_id": int(entry["pairid"]),
            "reference_id": entry["reference"],
            "target_id": entry.get("target_hard"),
            "modification_text": entry["caption"],
            "subset_ids": list(entry["img_set"]["members"]),
            "reference_image": image_path(entry["reference"]),
            "target_image": image_path(entry["target_hard"]) if entry.get("target_hard") else None,
        }
        for entry in entries
    ]
    gallery = [{"image_id": name, "image": image_path(name)} for name in split_map] if evaluation else []
    extras = {"pair_id": Value("int64"), "subset_ids": SequenceFeature(Value("string"))} if evaluation else {}
    return SplitRows(f"CIRR {split}", "cirr", queries, gallery, query_extra=extras)


# ----------------------------------------------------------------------------------------------------------------
# Fashion200k (TIRG protocol)

def replacement_text(source_caption: str, target_caption: str) -> str:
    """TIRG's modification text for two captions differing by one word: ``"replace <source word> with <target word>"``.

    The source word is the first word of the source caption missing from the target caption, and vice versa.
    """
    source_words, target_words = source_caption.split(), target_caption.split()
    if not source_words or not target_words:
        raise ValueError(f"Expected two non-empty captions, got {source_caption!r} and {target_caption!r}")
    source_word = next((word for word in source_words if word not in target_words), source_words[-1])
    target_word = next((word for word in target_words if word not in source_words), target_words[-1])
    return f"replace {source_word} with {target_word}"


def _read_fashion200k_labels(data_dir: Path, split: str) -> list[dict]:
    label_dir = data_dir / "labels"
    files = sorted(label_dir.glob(f"*_{split}_detect_all.txt")) if label_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"No {label_dir}/*_{split}_detect_all.txt label files: {FASHION200K_LAYOUT.format(data_dir=data_dir)}"
        )
    images = []
    for file in files:
        for line_number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 3:
                raise ValueError(
                    f"{file}:{line_number}: expected `image_path<TAB>detection_score<TAB>caption`, got {line!r}"
                )
            images.append({"image_id": fields[0].strip(), "caption": fields[2].strip()})
    return images



def _fashion200k_training_pairs(images: list[dict], pairs_per_image: int, seed: int) -> list[tuple[dict, dict]]:
    """(source, target) image pairs whose captions differ by exactly one word position."""
    caption_to_images: dict[str, list[dict]] = {}
    for image in images:
        caption_to_images.setdefault(image["caption"], []).append(image)
    # A parent is a caption with one word removed (by position, so substrings of other words are untouched).
    parent_to_captions: dict[str, set[str]] = {}
    for caption in caption_to_images:
        words = caption.split()
        for position in range(len(words)):
            parent = " ".join(words[:position] + words[position + 1 :])
            parent_to_captions.setdefault(parent, set()).add(caption)
    caption_to_siblings: dict[str, set[str]] = {}
    for siblings in parent_to_captions.values():
        if len(siblings) < 2:
            continue
        for caption in siblings:
            caption_to_siblings.setdefault(caption, set()).update(siblings - {caption})
    rng = random.Random(f"mqirtn-fashion200k/{seed}")
    pairs = []
    for image in images:
        siblings = sorted(caption_to_siblings.get(image["caption"], ()))
        for _ in range(pairs_per_image if siblings else 0):
            target_caption = rng.choice(siblings)
            pairs.append((image, rng.choice(caption_to_images[target_caption])))
    if not pairs:
        raise ValueError("No Fashion200k training pairs: no two captions differ by exactly one word")
    return pairs



def _read_fashion200k(
    data_dir: Path, split: str, evaluation: bool, mode: str, pairs_per_image: int = 1, seed: int = 0
) -> SplitRows:
    """Fashion200k (Han et al., ICCV 2017) with the TIRG protocol (see ``FASHION200K_LAYOUT``).

    Training pairs are images whose captions differ by one word (they share a *parent* caption, the caption minus
    one word), text ``"replace X with Y"``; TIRG samples them on the fly, here ``pairs_per_image`` pairs per
    modifiable image are drawn once, deterministically from ``seed``; rows carry ``reference_caption`` and
    ``target_caption``. Evaluation uses the fixed ``test_queries.txt`` pairs (queries with ``target_caption``); a hit
    is any retrieved image with the target caption, the query image removed from its own ranking; the gallery (every
    test image) carries ``caption``. Ids are image paths relative to ``data_dir``.
    """
    split = _normalize_split(split, {}, ("train", "test"), "Fashion200k")
    if pairs_per_image < 1:
        raise ValueError(f"`pairs_per_image` must be a positive integer, got {pairs_per_image}")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Fashion200k folder {data_dir} does not exist: {FASHION200K_LAYOUT.format(data_dir=data_dir)}")
    images = _read_fashion200k_labels(data_dir, split)
    source = f"Fashion200k {split}"
    caption = {"caption": Value("string")}
    if evaluation:
        caption_of = {image["image_id"]: image["caption"] for image in images}
        queries_file = _require_file(data_dir / "test_queries.txt", FASHION200K_LAYOUT, data_dir)
        queries = []
        for line_number, line in enumerate(queries_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"{queries_file}:{line_number}: expected `source_path target_path`, got {line!r}")
            source_path, target_path = fields
            for path in (source_path, target_path):
                if path not in caption_of:
                    raise ValueError(f"{queries_file}:{line_number}: {path!r} is not in the {split} label files")
            # Only the reference image is needed: hits are decided by caption, not by the target image.
            queries.append(
                {
                    "query_id": str(len(queries)),
                    "reference_image": str(data_dir / source_path),
                    "modification_text": replacement_text(caption_of[source_path], caption_of[target_path]),
                    "reference_id": source_path,
                    "target_id": target_path,
                    "target_caption": caption_of[target_path],
                }
            )
        gallery = [{"image_id": i["image_id"], "image": str(data_dir / i["image_id"]), "caption": i["caption"]} for i in images]
        return SplitRows(
            source, "fashion200k", queries, gallery, query_extra={"target_caption": Value("string")}, gallery_extra=caption
        )

    bad = find_bad_images((str(data_dir / image["image_id"]) for image in images), mode, desc=f"Checking images of {source}")
    good = [image for image in images if str(data_dir / image["image_id"]) not in bad]
    queries = [
        {
            "reference_image": str(data_dir / reference["image_id"]),
            "modification_text": replacement_text(reference["caption"], target["caption"]),
            "target_image": str(data_dir / target["image_id"]),
            "reference_id": reference["image_id"],
            "target_id": target["image_id"],
            "reference_caption": reference["caption"],
            "target_caption": target["caption"],
        }
        for reference, target in _fashion200k_training_pairs(good, pairs_per_image, seed)
    ]
    extras = {"reference_caption": Value("string"), "target_caption": Value("string")}
    return SplitRows(
        source, "fashion200k", queries, query_extra=extras, bad=bad, dropped={"images from training": len(images) - len(good)}
    )


# ----------------------------------------------------------------------------------------------------------------
# MIT-States (TIRG protocol)


def _read_mitstates(
    data_dir: Path,
    split: str,
    evaluation: bool,
    mode: str,
    pairs_per_image: int = 1,
    seed: int = 0,
    test_nouns: Sequence[str] = MITSTATES_TEST_NOUNS,
) -> SplitRows:
    """MIT-States (Isola et al., CVPR 2015) with the TIRG protocol (see ``MITSTATES_LAYOUT``).

    Folders ``images/<adj> <noun>/`` give each image its caption ``"adj noun"`` (the unlabeled ``adj <noun>``
    folders are ignored). The nouns in ``test_nouns`` (TIRG's 49) form the test split, the others train.
    Test queries are every test image × every *other* adjective seen with its noun in the test split, text =
    the target adjective, ``target_caption`` ``"target_adj noun"`` (``target_id`` None); a hit is a retrieved image
    with that caption, query image removed; the gallery (every test image) carries ``caption``. Training pairs:
    ``pairs_per_image`` random images of the same noun with another adjective, from ``seed`` (rows carry
    ``reference_caption`` and ``target_caption``). Ids are paths relative to ``images/``.
    """
    split = _normalize_split(split, {}, ("train", "test"), "MIT-States")
    if pairs_per_image < 1:
        raise ValueError(f"`pairs_per_image` must be a positive integer, got {pairs_per_image}")
    image_dir = data_dir / "images"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Missing folder {image_dir}: {MITSTATES_LAYOUT.format(data_dir=data_dir)}")
    held_out = set(test_nouns)
    images = []
    for folder in sorted(path for path in image_dir.iterdir() if path.is_dir()):
        words = folder.name.split()
        if len(words) != 2 or words[0] == "adj":
            continue
        adjective, noun = words
        if (noun in held_out) != (split == "test"):
            continue
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                images.append({"image_id": f"{folder.name}/{file.name}", "path": str(file), "adj": adjective, "noun": noun})
    if not images:
        raise FileNotFoundError(f"No MIT-States {split} images under {image_dir}: {MITSTATES_LAYOUT.format(data_dir=data_dir)}")
    source = f"MIT-States {split}"
    # Queries are built from the usable images only, so the images are checked here.
    bad = find_bad_images((image["path"] for image in images), mode, desc=f"Checking images of {source}")
    good = [image for image in images if image["path"] not in bad]
    by_noun: dict[str, list[dict]] = {}
    for image in good:
        by_noun.setdefault(image["noun"], []).append(image)

    if evaluation:
        queries = []
        for image in good:
            adjectives = list(dict.fromkeys(other["adj"] for other in by_noun[image["noun"]]))
            for adjective in adjectives:
                if adjective != image["adj"]:
                    queries.append(
                        {
                            "query_id": str(len(queries)),
                            "reference_image": image["path"],
                            "modification_text": adjective,
                            "reference_id": image["image_id"],
                            "target_id": None,
                            "target_caption": f"{adjective} {image['noun']}",
                        }
                    )
        gallery = [{"image_id": i["image_id"], "image": i["path"], "caption": f"{i['adj']} {i['noun']}"} for i in good]
        return SplitRows(
            source,
            "mitstates",
            queries,
            gallery,
            query_extra={"target_caption": Value("string")},
            gallery_extra={"caption": Value("string")},
            bad=bad,
            dropped={"images (with their queries)": len(images) - len(good)},
        )

    rng = random.Random(f"mqirtn-mitstates/{seed}")
    pairs = []
    for image in good:
        candidates = [other for other in by_noun[image["noun"]] if other["adj"] != image["adj"]]
        for _ in range(pairs_per_image if candidates else 0):
            pairs.append((image, rng.choice(candidates)))
    if not pairs:
        raise ValueError(f"No MIT-States {split} pairs: no noun has images with two different adjectives")
    queries = [
        {
            "reference_image": reference["path"],
            "modification_text": target["adj"],
            "target_image": target["path"],
            "reference_id": reference["image_id"],
            "target_id": target["image_id"],
            "reference_caption": f"{reference['adj']} {reference['noun']}",
            "target_caption": f"{target['adj']} {target['noun']}",
        }
        for reference, target in pairs
    ]
    extras = {"reference_caption": Value("string"), "target_caption": Value("string")}
    return SplitRows(
        source, "mitstates", queries, query_extra=extras, bad=bad, dropped={"images from training": len(images) - len(good)}
    )


# ----------------------------------------------------------------------------------------------------------------
# A user's own files

def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not a JSON object ({error})") from error
        return rows
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(f"Expected a .jsonl, .json, .csv or .tsv file, got {path}")


def _find_table(folder: Path, stem: str) -> Path | None:
    for suffix in (".jsonl", ".json", ".csv", ".tsv"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


FILES_LAYOUT = """expected a JSONL/JSON/CSV/TSV file with columns `{reference}`, `{text}`, `{target}` (image paths relative
to the file), or a folder holding `<split>.jsonl|.csv` and optionally `gallery.jsonl|.csv` / `<split>_gallery.jsonl|.csv`
(column `image`, optional `id`)"""



def _read_files(
    data_file: Path,
    split: str,
    evaluation: bool,
    mode: str,
    gallery_file: str | os.PathLike | None = None,
    remove_reference: bool = False,
    reference_column: str = "reference",
    text_column: str = "text",
    target_column: str = "target",
) -> SplitRows:
    """A user's own composed-retrieval data from a JSONL/JSON/CSV/TSV file (see ``FILES_LAYOUT``).

    ``data_file`` is the query file, or a folder holding ``{split}.jsonl`` (or .json/.csv/.tsv) and optionally
    ``{split}_gallery.*`` / ``gallery.*``. Image paths are relative to the file they appear in (absolute paths work
    too). An image's id is its path relative to the query file's folder, unless the gallery file gives an ``id``
    column. Without a gallery file the gallery is every distinct reference and target image. ``remove_reference``
    (evaluation) removes each query's reference image from its own ranking (protocol ``"exact"``).
    """
    layout = FILES_LAYOUT.format(reference=reference_column, text=text_column, target=target_column)
    if data_file.is_dir():
        folder = data_file
        found = _find_table(folder, split)
        if found is None:
            raise FileNotFoundError(f"No {split}.jsonl/.json/.csv/.tsv in {folder}: {layout}")
        data_file = found
        if gallery_file is None:
            gallery_file = _find_table(folder, f"{split}_gallery") or _find_table(folder, "gallery")
    elif not data_file.is_file():
        raise FileNotFoundError(f"Missing {data_file}: {layout}")
    base = data_file.parent.resolve()

    def resolve(folder: Path, value: str) -> Path:
        path = Path(value)
        return (path if path.is_absolute() else folder / path).resolve()

    def image_id(path: Path) -> str:
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            return path.as_posix()

    table = _read_table(data_file)
    required = [reference_column, text_column] + ([] if evaluation else [target_column])
    for row_number, row in enumerate(table, start=1):
        missing = [name for name in required if row.get(name) in (None, "")]
        if missing:
            raise ValueError(f"{data_file} row {row_number}: expected columns {required}, missing {missing}; got {sorted(row)}")

    gallery: list[dict] = []
    if gallery_file is not None:
        gallery_file = Path(gallery_file)
        if not gallery_file.is_file():
            raise FileNotFoundError(f"Missing gallery file {gallery_file}: {layout}")
        for row_number, row in enumerate(_read_table(gallery_file), start=1):
            if row.get("image") in (None, ""):
                raise ValueError(f"{gallery_file} row {row_number}: expected an `image` column, got {sorted(row)}")
            path = resolve(gallery_file.parent.resolve(), row["image"])
            identifier = str(row["id"]) if row.get("id") not in (None, "") else image_id(path)
            gallery.append({"image_id": identifier, "image": str(path)})
    id_of_path = {row["image"]: row["image_id"] for row in gallery}

    queries = []
    for row_number, row in enumerate(table):
        reference = resolve(base, row[reference_column])
        target = resolve(base, row[target_column]) if row.get(target_column) not in (None, "") else None
        queries.append(
            {
                "query_id": str(row.get("id", row_number)),
                "reference_image": str(reference),
                "modification_text": str(row[text_column]),
                "target_image": str(target) if target is not None else None,
                "reference_id": id_of_path.get(str(reference), image_id(reference)),
                "target_id": id_of_path.get(str(target), image_id(target)) if target is not None else None,
            }
        )
    if evaluation and not gallery:
        seen: dict[str, str] = {}
        for row in queries:
            for path, identifier in ((row["reference_image"], row["reference_id"]), (row["target_image"], row["target_id"])):
                if path is not None:
                    seen.setdefault(identifier, path)
        gallery = [{"image_id": identifier, "image": path} for identifier, path in seen.items()]
    return SplitRows(str(data_file), "exact", queries, gallery if evaluation else [], remove_reference=remove_reference)


# ----------------------------------------------------------------------------------------------------------------
# `datasets` datasets (local or on the Hub)


def _hf_columns(
    dataset: Dataset,
    reference_image_column: str,
    text_column: str,
    target_image_column: str,
    reference_id_column: str | None,
    target_id_column: str | None,
) -> Dataset:
    columns = {reference_image_column: "reference_image", text_column: "modification_text", target_image_column: "target_image"}
    if reference_id_column is not None:
        columns[reference_id_column] = "reference_id"
    if target_id_column is not None:
        columns[target_id_column] = "target_id"
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
    for name in ("reference_id", "target_id"):
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
) -> Dataset:
    """Training queries in the unified schema from any `datasets.Dataset`, by naming its columns (like
    ``run_clip.py``'s ``--image_column`` / ``--caption_column``). String image columns are read as image paths."""
    return _hf_columns(dataset, reference_image_column, text_column, target_image_column, reference_id_column, target_id_column)


def evaluation_data_from_hf(
    dataset: Dataset,
    reference_image_column: str = "reference_image",
    text_column: str = "modification_text",
    target_image_column: str = "target_image",
    reference_id_column: str | None = None,
    target_id_column: str | None = None,
    remove_reference: bool = False,
) -> CIREvaluationData:
    """:class:`CIREvaluationData` (protocol ``"exact"``) from any `datasets.Dataset`: the gallery is every distinct
    target and reference image by id, so ``reference_id_column`` and ``target_id_column`` are required."""
    if reference_id_column is None or target_id_column is None:
        raise ValueError("Evaluation on a `datasets` dataset needs `reference_id_column` and `target_id_column`")
    dataset = _hf_columns(dataset, reference_image_column, text_column, target_image_column, reference_id_column, target_id_column)
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
)


def _load_hub_training(
    dataset_name: str, split: str = "train", dataset_config_name: str | None = None, cache_dir: str | None = None, **columns
) -> Dataset:
    """`datasets.load_dataset(dataset_name, dataset_config_name, split=split)`, then :func:`from_hf_dataset`."""
    return from_hf_dataset(load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir), **columns)


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
# The registry entries and the two entry points

register_dataset(
    DatasetSpec(
        "shapes", "shapes (built-in CSS-style benchmark)", "shapes", "test", _load_shapes_training,
        _load_shapes_evaluation, validation_split="validation", data_dir="none", options=SHAPES_OPTIONS,
    )
)  # fmt: skip
register_dataset(
    DatasetSpec(
        "fashioniq", "FashionIQ", "fashioniq", "val", *_folder_loaders(_read_fashioniq), headline_metric="average",
        options=("check_images", "both_caption_orders"),
    )
)  # fmt: skip
register_dataset(
    DatasetSpec("cirr", "CIRR", "cirr", "val", *_folder_loaders(_read_cirr), predict_split="test1", headline_metric="average")
)
register_dataset(DatasetSpec("fashion200k", "Fashion200k", "fashion200k", "test", *_folder_loaders(_read_fashion200k)))
register_dataset(DatasetSpec("mitstates", "MIT-States", "mitstates", "test", *_folder_loaders(_read_mitstates)))
register_dataset(DatasetSpec("files", "custom files", "exact", "test", *_folder_loaders(_read_files)))
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


def load_training_queries(name: str, data_dir: str | os.PathLike | None = None, split: str = "train", **options: Any) -> Dataset:
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
        str(data_dir) if spec.data_dir == "dataset" else data_dir, spec.eval_split if split is None else split, **options
    )


__all__ = [
    "CIREvaluationData",
    "SplitRows",
    "evaluation_data_from_hf",
    "fashioniq_caption",
    "find_bad_images",
    "from_hf_dataset",
    "load_evaluation_data",
    "load_training_queries",
    "replacement_text",
]
