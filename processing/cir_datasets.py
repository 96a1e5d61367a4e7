"""Composed-image-retrieval dataset loaders with one schema for training and evaluation.

One loader per source, each reading the layout the dataset is distributed in, and one entry point,
:func:`load_cir_dataset`, dispatching by name. Images are stored as paths in `datasets.Image` columns,
so they are decoded only when a row is read (or never, with ``decode_images=False``).

**Training** loaders return a `datasets.Dataset` with at least

- ``reference_image`` (Image), ``modification_text`` (str), ``target_image`` (Image),
- ``reference_id``, ``target_id`` (str; ids in the dataset's own naming).

**Evaluation** loaders return a :class:`CIREvaluationData` with

- ``queries``: ``query_id`` (str), ``reference_image`` (Image), ``modification_text`` (str), ``reference_id`` (str),
  ``target_id`` (str or None where unknown) and the protocol's extras: ``category`` (FashionIQ),
  ``pair_id`` + ``subset_ids`` (CIRR), ``target_caption`` (Fashion200k, MIT-States);
- ``gallery``: ``image_id`` (str), ``image`` (Image), and ``category`` (FashionIQ) or ``caption`` (caption match);
- ``protocol``: the name :func:`processing.retrieval_metrics.evaluate_protocol` takes.

Missing and corrupt images are found at load time (``check_images``: ``"verify"`` opens and verifies every
image, ``"exists"`` only checks the file, ``"none"`` trusts the annotations, for counting without images),
their rows are dropped, and one warning says how many. :class:`SafeImageCollator` does the same at decode
time for data that was not checked.

>>> from processing.cir_datasets import load_cir_dataset
>>> train = load_cir_dataset("fashioniq", "data/fashioniq", "train", both_caption_orders=True)   # doctest: +SKIP
>>> val = load_cir_dataset("cirr", "data/cirr", "val")                                          # doctest: +SKIP
>>> val.protocol, val.queries.column_names                                                      # doctest: +SKIP
('cirr', ['query_id', 'reference_image', 'modification_text', 'reference_id', 'target_id', 'pair_id', 'subset_ids'])
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Image, Value, concatenate_datasets, load_dataset
from datasets import Sequence as SequenceFeature
from PIL import Image as PILImage
from tqdm.auto import tqdm
from transformers.utils import logging

from .shapes import load_shapes, load_shapes_gallery


logger = logging.get_logger(__name__)

DATASET_NAMES: tuple[str, ...] = ("shapes", "fashioniq", "cirr", "fashion200k", "mitstates", "files", "hub")
FASHIONIQ_CATEGORIES: tuple[str, ...] = ("dress", "shirt", "toptee")
CHECK_MODES: tuple[str, ...] = ("verify", "exists", "none")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
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
        protocol: one of `processing.retrieval_metrics.PROTOCOLS`.
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


def _resolve_evaluation(split: str, evaluation: bool | None) -> bool:
    return split != "train" if evaluation is None else evaluation


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


def _image_feature(decode_images: bool) -> Image:
    return Image(decode=decode_images)


def _training_dataset(
    rows: dict[str, list], decode_images: bool, extra_features: dict[str, Any] | None = None
) -> Dataset:
    features = {
        "reference_image": _image_feature(decode_images),
        "modification_text": Value("string"),
        "target_image": _image_feature(decode_images),
        "reference_id": Value("string"),
        "target_id": Value("string"),
    }
    features.update(extra_features or {})
    return Dataset.from_dict({name: rows[name] for name in features}, features=Features(features))


def _query_dataset(rows: dict[str, list], decode_images: bool, extra_features: dict[str, Any] | None = None) -> Dataset:
    features = {
        "query_id": Value("string"),
        "reference_image": _image_feature(decode_images),
        "modification_text": Value("string"),
        "reference_id": Value("string"),
        "target_id": Value("string"),
    }
    features.update(extra_features or {})
    return Dataset.from_dict({name: rows[name] for name in features}, features=Features(features))


def _gallery_dataset(rows: dict[str, list], decode_images: bool, extra_features: dict[str, Any] | None = None) -> Dataset:
    features = {"image_id": Value("string"), "image": _image_feature(decode_images)}
    features.update(extra_features or {})
    return Dataset.from_dict({name: rows[name] for name in features}, features=Features(features))


def _filter_rows(rows: list[dict], path_keys: Sequence[str], bad: dict[str, str]) -> tuple[list[dict], int]:
    """Drop rows any of whose ``path_keys`` (that are not None) is a bad image."""
    kept = [row for row in rows if not any(row[key] is not None and row[key] in bad for key in path_keys)]
    return kept, len(rows) - len(kept)


def _to_columns(rows: list[dict], names: Iterable[str]) -> dict[str, list]:
    return {name: [row[name] for row in rows] for name in names}


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


def load_fashioniq(
    data_dir: str | os.PathLike,
    split: str = "val",
    categories: Sequence[str] = FASHIONIQ_CATEGORIES,
    both_caption_orders: bool = False,
    evaluation: bool | None = None,
    check_images: bool | str = "verify",
    decode_images: bool = True,
) -> Dataset | CIREvaluationData:
    """FashionIQ (Wu et al., CVPR 2021) in its distributed layout (see ``FASHIONIQ_LAYOUT``).

    Args:
        data_dir: the FashionIQ root.
        split: ``"train"``, ``"val"`` (alias ``"validation"``) or ``"test"`` (no targets).
        categories: subset of ``("dress", "shirt", "toptee")``.
        both_caption_orders: training only: add each pair a second time with its captions swapped.
        evaluation: build queries + per-category gallery (default: every split but ``train``).
        check_images: ``"verify"``, ``"exists"`` or ``"none"`` (annotation-only, e.g. to count queries).
        decode_images: ``False`` leaves images as ``{"path", "bytes"}`` dicts (see :class:`SafeImageCollator`).

    Returns:
        training: `datasets.Dataset` (+ ``category``); evaluation: :class:`CIREvaluationData` with protocol
        ``"fashioniq"``, queries with ``category``, gallery with ``category`` (the category's split images).
    """
    data_dir = Path(data_dir)
    split = _normalize_split(split, {"validation": "val", "dev": "val"}, ("train", "val", "test"), "FashionIQ")
    unknown = sorted(set(categories) - set(FASHIONIQ_CATEGORIES))
    if unknown or not categories:
        raise ValueError(f"`categories` must be a non-empty subset of {FASHIONIQ_CATEGORIES}, got {tuple(categories)}")
    mode = _check_mode(check_images)
    evaluation = _resolve_evaluation(split, evaluation)
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

    if not evaluation and any(row["target_id"] is None for row in queries):
        raise ValueError(f"FashionIQ split {split!r} has no targets and cannot be used for training")
    bad = find_bad_images(
        [row["reference_image"] for row in queries]
        + [row["target_image"] for row in queries if row["target_image"]]
        + [row["image"] for row in gallery],
        mode,
        desc="Checking FashionIQ images",
    )
    queries, dropped_queries = _filter_rows(queries, ("reference_image", "target_image"), bad)
    gallery, dropped_gallery = _filter_rows(gallery, ("image",), bad)
    _warn_skipped(f"FashionIQ {split}", bad, {"queries": dropped_queries, "gallery images": dropped_gallery})

    category_feature = {"category": Value("string")}
    if not evaluation:
        return _training_dataset(
            _to_columns(queries, ["reference_image", "modification_text", "target_image", "reference_id", "target_id", "category"]),
            decode_images,
            category_feature,
        )
    query_columns = _to_columns(queries, ["query_id", "reference_image", "modification_text", "reference_id", "target_id", "category"])
    return CIREvaluationData(
        queries=_query_dataset(query_columns, decode_images, category_feature),
        gallery=_gallery_dataset(_to_columns(gallery, ["image_id", "image", "category"]), decode_images, category_feature),
        protocol="fashioniq",
    )


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


def load_cirr(
    data_dir: str | os.PathLike,
    split: str = "val",
    evaluation: bool | None = None,
    check_images: bool | str = "verify",
    decode_images: bool = True,
) -> Dataset | CIREvaluationData:
    """CIRR (Liu et al., ICCV 2021) in its distributed layout (see ``CIRR_LAYOUT``); images come from NLVR2.

    Args:
        data_dir: the CIRR annotation folder (``cirr/``, holding ``captions/`` and ``image_splits/``).
        split: ``"train"``, ``"val"`` (aliases ``"validation"``, ``"dev"``) or ``"test1"`` (alias ``"test"``,
            no targets).
        evaluation, check_images, decode_images: as in :func:`load_fashioniq`.

    Returns:
        training: `datasets.Dataset`; evaluation: :class:`CIREvaluationData` with protocol ``"cirr"``, queries with
        ``pair_id`` (int) and ``subset_ids`` (the names of ``img_set.members``), gallery = every image of the split.
    """
    data_dir = Path(data_dir)
    split = _normalize_split(split, {"validation": "val", "dev": "val", "test": "test1"}, ("train", "val", "test1"), "CIRR")
    mode = _check_mode(check_images)
    evaluation = _resolve_evaluation(split, evaluation)
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
    if not evaluation and any(row["target_id"] is None for row in queries):
        raise ValueError(f"CIRR split {split!r} has no targets and cannot be used for training")
    gallery = [{"image_id": name, "image": image_path(name)} for name in split_map] if evaluation else []
    bad = find_bad_images(
        [row["reference_image"] for row in queries]
        + [row["target_image"] for row in queries if row["target_image"]]
        + [row["image"] for row in gallery],
        mode,
        desc="Checking CIRR images",
    )
    queries, dropped_queries = _filter_rows(queries, ("reference_image", "target_image"), bad)
    gallery, dropped_gallery = _filter_rows(gallery, ("image",), bad)
    _warn_skipped(f"CIRR {split}", bad, {"queries": dropped_queries, "gallery images": dropped_gallery})

    if not evaluation:
        return _training_dataset(
            _to_columns(queries, ["reference_image", "modification_text", "target_image", "reference_id", "target_id"]),
            decode_images,
        )
    extras = {"pair_id": Value("int64"), "subset_ids": SequenceFeature(Value("string"))}
    query_columns = _to_columns(
        queries, ["query_id", "reference_image", "modification_text", "reference_id", "target_id", "pair_id", "subset_ids"]
    )
    return CIREvaluationData(
        queries=_query_dataset(query_columns, decode_images, extras),
        gallery=_gallery_dataset(_to_columns(gallery, ["image_id", "image"]), decode_images),
        protocol="cirr",
    )


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


def load_fashion200k(
    data_dir: str | os.PathLike,
    split: str = "test",
    evaluation: bool | None = None,
    pairs_per_image: int = 1,
    seed: int = 0,
    check_images: bool | str = "verify",
    decode_images: bool = True,
) -> Dataset | CIREvaluationData:
    """Fashion200k (Han et al., ICCV 2017) with the TIRG protocol (see ``FASHION200K_LAYOUT``).

    Training pairs are images whose captions differ by one word (they share a *parent* caption, the caption
    minus one word), text ``"replace X with Y"``; TIRG samples them on the fly, here ``pairs_per_image``
    pairs per modifiable image are drawn once, deterministically from ``seed``. Evaluation uses the fixed
    ``test_queries.txt`` pairs; a hit is any retrieved image with the target caption, and the query image is
    removed from its own ranking.

    Returns:
        training: `datasets.Dataset` (+ ``reference_caption``, ``target_caption``); evaluation:
        :class:`CIREvaluationData` with protocol ``"fashion200k"``, queries with ``target_caption``, gallery
        (every test image) with ``caption``. Ids are image paths relative to ``data_dir``.
    """
    data_dir = Path(data_dir)
    split = _normalize_split(split, {}, ("train", "test"), "Fashion200k")
    mode = _check_mode(check_images)
    evaluation = _resolve_evaluation(split, evaluation)
    if pairs_per_image < 1:
        raise ValueError(f"`pairs_per_image` must be a positive integer, got {pairs_per_image}")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Fashion200k folder {data_dir} does not exist: {FASHION200K_LAYOUT.format(data_dir=data_dir)}")
    images = _read_fashion200k_labels(data_dir, split)
    bad = find_bad_images((str(data_dir / image["image_id"]) for image in images), mode, desc="Checking Fashion200k images")
    bad_ids = {image["image_id"] for image in images if str(data_dir / image["image_id"]) in bad}
    good = [image for image in images if image["image_id"] not in bad_ids]
    caption_of = {image["image_id"]: image["caption"] for image in images}

    if evaluation:
        queries_file = _require_file(data_dir / "test_queries.txt", FASHION200K_LAYOUT, data_dir)
        queries = []
        for line_number, line in enumerate(queries_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"{queries_file}:{line_number}: expected `source_path target_path`, got {line!r}")
            source, target = fields
            for path in (source, target):
                if path not in caption_of:
                    raise ValueError(f"{queries_file}:{line_number}: {path!r} is not in the {split} label files")
            queries.append(
                {
                    "query_id": str(len(queries)),
                    "reference_image": str(data_dir / source),
                    "modification_text": replacement_text(caption_of[source], caption_of[target]),
                    "reference_id": source,
                    "target_id": target,
                    "target_caption": caption_of[target],
                }
            )
        # Only the reference image is needed: hits are decided by caption, not by the target image.
        kept = [row for row in queries if row["reference_id"] not in bad_ids]
        _warn_skipped(f"Fashion200k {split}", bad, {"queries": len(queries) - len(kept), "gallery images": len(images) - len(good)})
        gallery_columns = {
            "image_id": [image["image_id"] for image in good],
            "image": [str(data_dir / image["image_id"]) for image in good],
            "caption": [image["caption"] for image in good],
        }
        return CIREvaluationData(
            queries=_query_dataset(
                _to_columns(kept, ["query_id", "reference_image", "modification_text", "reference_id", "target_id", "target_caption"]),
                decode_images,
                {"target_caption": Value("string")},
            ),
            gallery=_gallery_dataset(gallery_columns, decode_images, {"caption": Value("string")}),
            protocol="fashion200k",
        )

    pairs = _fashion200k_training_pairs(good, pairs_per_image, seed)
    _warn_skipped(f"Fashion200k {split}", bad, {"images from training": len(images) - len(good)})
    rows = {
        "reference_image": [str(data_dir / source["image_id"]) for source, _ in pairs],
        "modification_text": [replacement_text(source["caption"], target["caption"]) for source, target in pairs],
        "target_image": [str(data_dir / target["image_id"]) for _, target in pairs],
        "reference_id": [source["image_id"] for source, _ in pairs],
        "target_id": [target["image_id"] for _, target in pairs],
        "reference_caption": [source["caption"] for source, _ in pairs],
        "target_caption": [target["caption"] for _, target in pairs],
    }
    return _training_dataset(rows, decode_images, {"reference_caption": Value("string"), "target_caption": Value("string")})


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


# ----------------------------------------------------------------------------------------------------------------
# MIT-States (TIRG protocol)


def load_mitstates(
    data_dir: str | os.PathLike,
    split: str = "test",
    evaluation: bool | None = None,
    pairs_per_image: int = 1,
    seed: int = 0,
    test_nouns: Sequence[str] = MITSTATES_TEST_NOUNS,
    check_images: bool | str = "verify",
    decode_images: bool = True,
) -> Dataset | CIREvaluationData:
    """MIT-States (Isola et al., CVPR 2015) with the TIRG protocol (see ``MITSTATES_LAYOUT``).

    Folders ``images/<adj> <noun>/`` give each image its caption ``"adj noun"`` (the unlabeled ``adj <noun>``
    folders are ignored). The nouns in ``test_nouns`` (TIRG's 49) form the test split, the others train.
    Test queries are every test image × every *other* adjective seen with its noun in the test split, text =
    the target adjective; a hit is a retrieved image with caption ``"target_adj noun"``, query image removed.
    Training pairs: ``pairs_per_image`` random images of the same noun with another adjective, from ``seed``.

    Returns:
        training: `datasets.Dataset` (+ ``reference_caption``, ``target_caption``); evaluation:
        :class:`CIREvaluationData` with protocol ``"mitstates"``, queries with ``target_caption`` (``target_id`` None),
        gallery (every test image) with ``caption``. Ids are paths relative to ``images/``.
    """
    data_dir = Path(data_dir)
    split = _normalize_split(split, {}, ("train", "test"), "MIT-States")
    mode = _check_mode(check_images)
    evaluation = _resolve_evaluation(split, evaluation)
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
    bad = find_bad_images((image["path"] for image in images), mode, desc="Checking MIT-States images")
    good = [image for image in images if image["path"] not in bad]
    noun_to_adjectives: dict[str, list[str]] = {}
    for image in good:
        adjectives = noun_to_adjectives.setdefault(image["noun"], [])
        if image["adj"] not in adjectives:
            adjectives.append(image["adj"])

    if evaluation:
        queries = []
        for image in good:
            for adjective in noun_to_adjectives[image["noun"]]:
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
        _warn_skipped(f"MIT-States {split}", bad, {"images (with their queries)": len(images) - len(good)})
        gallery_columns = {
            "image_id": [image["image_id"] for image in good],
            "image": [image["path"] for image in good],
            "caption": [f"{image['adj']} {image['noun']}" for image in good],
        }
        return CIREvaluationData(
            queries=_query_dataset(
                _to_columns(queries, ["query_id", "reference_image", "modification_text", "reference_id", "target_id", "target_caption"]),
                decode_images,
                {"target_caption": Value("string")},
            ),
            gallery=_gallery_dataset(gallery_columns, decode_images, {"caption": Value("string")}),
            protocol="mitstates",
        )

    by_noun: dict[str, list[dict]] = {}
    for image in good:
        by_noun.setdefault(image["noun"], []).append(image)
    rng = random.Random(f"mqirtn-mitstates/{seed}")
    pairs = []
    for image in good:
        candidates = [other for other in by_noun[image["noun"]] if other["adj"] != image["adj"]]
        for _ in range(pairs_per_image if candidates else 0):
            pairs.append((image, rng.choice(candidates)))
    _warn_skipped(f"MIT-States {split}", bad, {"images from training": len(images) - len(good)})
    if not pairs:
        raise ValueError(f"No MIT-States {split} pairs: no noun has images with two different adjectives")
    rows = {
        "reference_image": [source["path"] for source, _ in pairs],
        "modification_text": [target["adj"] for _, target in pairs],
        "target_image": [target["path"] for _, target in pairs],
        "reference_id": [source["image_id"] for source, _ in pairs],
        "target_id": [target["image_id"] for _, target in pairs],
        "reference_caption": [f"{source['adj']} {source['noun']}" for source, _ in pairs],
        "target_caption": [f"{target['adj']} {target['noun']}" for _, target in pairs],
    }
    return _training_dataset(rows, decode_images, {"reference_caption": Value("string"), "target_caption": Value("string")})


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


def load_files(
    data_file: str | os.PathLike,
    split: str = "train",
    gallery_file: str | os.PathLike | None = None,
    evaluation: bool | None = None,
    remove_reference: bool = False,
    reference_column: str = "reference",
    text_column: str = "text",
    target_column: str = "target",
    check_images: bool | str = "verify",
    decode_images: bool = True,
) -> Dataset | CIREvaluationData:
    """A user's own composed-retrieval data from a JSONL/JSON/CSV/TSV file (see ``FILES_LAYOUT``).

    Image paths are relative to the file they appear in (absolute paths work too). An image's id is its path
    relative to the query file's folder, unless the gallery file gives an ``id`` column. Without a gallery file the
    gallery is every distinct reference and target image.

    Args:
        data_file: the query file, or a folder holding ``{split}.jsonl`` (or .json/.csv/.tsv).
        split: the split name (a folder's file stem); ``"train"`` builds a training set by default.
        gallery_file: optional gallery table (column ``image``, optional ``id``).
        evaluation: build queries + gallery (default: every split but ``train``).
        remove_reference: evaluation: remove each query's reference image from its own ranking.
        reference_column, text_column, target_column: column names in the query file.

    Returns:
        training: `datasets.Dataset`; evaluation: :class:`CIREvaluationData` with protocol ``"exact"``.
    """
    data_file = Path(data_file)
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
    mode = _check_mode(check_images)
    evaluation = _resolve_evaluation(split, evaluation)
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

    gallery_rows: list[dict] = []
    if gallery_file is not None:
        gallery_file = Path(gallery_file)
        if not gallery_file.is_file():
            raise FileNotFoundError(f"Missing gallery file {gallery_file}: {layout}")
        for row_number, row in enumerate(_read_table(gallery_file), start=1):
            if row.get("image") in (None, ""):
                raise ValueError(f"{gallery_file} row {row_number}: expected an `image` column, got {sorted(row)}")
            path = resolve(gallery_file.parent.resolve(), row["image"])
            identifier = str(row["id"]) if row.get("id") not in (None, "") else image_id(path)
            gallery_rows.append({"image_id": identifier, "image": str(path)})
    id_of_path = {row["image"]: row["image_id"] for row in gallery_rows}

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
    if evaluation and not gallery_rows:
        seen: dict[str, str] = {}
        for row in queries:
            for path, identifier in ((row["reference_image"], row["reference_id"]), (row["target_image"], row["target_id"])):
                if path is not None:
                    seen.setdefault(identifier, path)
        gallery_rows = [{"image_id": identifier, "image": path} for identifier, path in seen.items()]

    check_queries = ("reference_image", "target_image")
    bad = find_bad_images(
        [row[key] for row in queries for key in check_queries if row[key]] + [row["image"] for row in gallery_rows],
        mode,
        desc=f"Checking images of {data_file.name}",
    )
    queries, dropped_queries = _filter_rows(queries, check_queries, bad)
    gallery_rows, dropped_gallery = _filter_rows(gallery_rows, ("image",), bad)
    _warn_skipped(str(data_file), bad, {"queries": dropped_queries, "gallery images": dropped_gallery})
    if not evaluation:
        return _training_dataset(
            _to_columns(queries, ["reference_image", "modification_text", "target_image", "reference_id", "target_id"]),
            decode_images,
        )
    gallery_ids = {row["image_id"] for row in gallery_rows}
    outside = sum(row["target_id"] is not None and row["target_id"] not in gallery_ids for row in queries)
    if outside:
        logger.warning(f"{data_file}: {outside} query targets are not in the gallery and can never be retrieved")
    return CIREvaluationData(
        queries=_query_dataset(
            _to_columns(queries, ["query_id", "reference_image", "modification_text", "reference_id", "target_id"]),
            decode_images,
        ),
        gallery=_gallery_dataset(_to_columns(gallery_rows, ["image_id", "image"]), decode_images),
        protocol="exact",
        remove_reference=remove_reference,
    )


def from_hf_dataset(
    dataset: Dataset,
    reference_image_column: str = "reference_image",
    text_column: str = "modification_text",
    target_image_column: str = "target_image",
    reference_id_column: str | None = None,
    target_id_column: str | None = None,
    evaluation: bool = False,
    remove_reference: bool = False,
) -> Dataset | CIREvaluationData:
    """Bring any `datasets.Dataset` to the unified schema by naming its columns (like ``run_clip.py``'s
    ``--image_column`` / ``--caption_column``). String image columns are read as image paths.

    Evaluation needs ``target_id_column`` and ``reference_id_column``: the gallery is every distinct target and
    reference image by id (protocol ``"exact"``).
    """
    columns = {
        reference_image_column: "reference_image",
        text_column: "modification_text",
        target_image_column: "target_image",
    }
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
    if not evaluation:
        return dataset
    if reference_id_column is None or target_id_column is None:
        raise ValueError("Evaluation on a `datasets` dataset needs `reference_id_column` and `target_id_column`")
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


def load_hub_dataset(
    dataset_name: str,
    split: str = "train",
    dataset_config_name: str | None = None,
    reference_image_column: str = "reference_image",
    text_column: str = "modification_text",
    target_image_column: str = "target_image",
    reference_id_column: str | None = None,
    target_id_column: str | None = None,
    evaluation: bool | None = None,
    remove_reference: bool = False,
    cache_dir: str | None = None,
) -> Dataset | CIREvaluationData:
    """`datasets.load_dataset(dataset_name, dataset_config_name, split=split)` then :func:`from_hf_dataset`."""
    dataset = load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
    return from_hf_dataset(
        dataset,
        reference_image_column,
        text_column,
        target_image_column,
        reference_id_column,
        target_id_column,
        _resolve_evaluation(split, evaluation),
        remove_reference,
    )


# ----------------------------------------------------------------------------------------------------------------
# shapes and the entry point


def load_shapes_dataset(
    split: str = "train",
    num_queries: int | None = None,
    image_size: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    evaluation: bool | None = None,
) -> Dataset | CIREvaluationData:
    """The built-in shapes benchmark in the unified schema (see `processing.shapes`); evaluation protocol ``"shapes"``."""
    queries = load_shapes(split, num_queries, image_size=image_size, seed=seed, cache_dir=cache_dir)
    if not _resolve_evaluation(split, evaluation):
        return queries
    gallery = load_shapes_gallery(split, num_queries, image_size=image_size, seed=seed, cache_dir=cache_dir)
    return CIREvaluationData(queries=queries.remove_columns(["target_image"]), gallery=gallery, protocol="shapes")


_LOADERS: dict[str, Callable[..., Dataset | CIREvaluationData]] = {
    "fashioniq": load_fashioniq,
    "cirr": load_cirr,
    "fashion200k": load_fashion200k,
    "mitstates": load_mitstates,
    "files": load_files,
}


def load_cir_dataset(
    name: str, data_dir: str | os.PathLike | None = None, split: str = "train", **options: Any
) -> Dataset | CIREvaluationData:
    """Load a composed-image-retrieval dataset by name.

    Args:
        name: one of ``DATASET_NAMES``: ``"shapes"`` (built in, no ``data_dir``), ``"fashioniq"``, ``"cirr"``,
            ``"fashion200k"``, ``"mitstates"``, ``"files"`` (``data_dir`` = the query file or its folder) or
            ``"hub"`` (``data_dir`` = a `datasets` dataset name or local path, column names as options).
        data_dir: the dataset's root folder, in the layout it is distributed in.
        split: the split; ``"train"`` gives a training `datasets.Dataset`, other splits a
            :class:`CIREvaluationData` (override with ``evaluation=``).
        **options: the chosen loader's keyword arguments (an unknown one is a `TypeError`).

    Returns:
        training `datasets.Dataset` or :class:`CIREvaluationData` (see the module docstring).
    """
    if name == "shapes":
        if data_dir is not None:
            options.setdefault("cache_dir", data_dir)
        return load_shapes_dataset(split, **options)
    if name == "hub":
        if data_dir is None:
            raise ValueError("`data_dir` must name the `datasets` dataset for name='hub'")
        return load_hub_dataset(str(data_dir), split, **options)
    if name not in _LOADERS:
        raise ValueError(f"`name` must be one of {DATASET_NAMES}, got {name!r}")
    if data_dir is None:
        raise ValueError(f"`data_dir` is required for the {name} dataset")
    return _LOADERS[name](data_dir, split, **options)


# ----------------------------------------------------------------------------------------------------------------
# Decoding that survives bad images


def decode_image_safely(value: Any) -> PILImage.Image | None:
    """Decode an image column value (PIL image, path string, or ``{"path", "bytes"}`` dict) to RGB; ``None`` on failure."""
    try:
        if isinstance(value, PILImage.Image):
            image = value
        elif isinstance(value, (str, os.PathLike)):
            image = PILImage.open(value)
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            image = PILImage.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        else:
            return None
        image.load()
        return image.convert("RGB")
    # Any decoder failure means "unusable image"; the caller counts it.
    except Exception:
        return None


class SafeImageCollator:
    """Collate function that decodes image columns itself and drops the rows whose images fail to decode.

    Use it with datasets loaded with ``decode_images=False`` (or ``cast_column(name, Image(decode=False))``),
    so that a bad file cannot raise inside ``Dataset.__getitem__``. The first failure is logged once; the
    running count is :attr:`num_skipped`.

    Args:
        collate_fn: receives the surviving examples (list of dicts with decoded RGB `PIL.Image.Image`s) and
            builds the batch, e.g. by calling the processor; ``None`` returns the list.
        image_columns: columns to decode when present in an example.

    >>> collator = SafeImageCollator(lambda examples: [e["modification_text"] for e in examples])
    >>> collator([{"reference_image": {"bytes": b"not an image", "path": None}, "modification_text": "x"}])
    []
    >>> collator.num_skipped
    1
    """

    def __init__(
        self,
        collate_fn: Callable[[list[dict]], Any] | None = None,
        image_columns: Sequence[str] = ("reference_image", "target_image", "image"),
    ) -> None:
        self.collate_fn = collate_fn
        self.image_columns = tuple(image_columns)
        self.num_skipped = 0

    def __call__(self, examples: list[dict]) -> Any:
        kept = []
        for example in examples:
            decoded = dict(example)
            ok = True
            for column in self.image_columns:
                if column in example and example[column] is not None:
                    image = decode_image_safely(example[column])
                    if image is None:
                        ok = False
                        break
                    decoded[column] = image
            if ok:
                kept.append(decoded)
            else:
                if self.num_skipped == 0:
                    logger.warning("Skipping rows whose images fail to decode; `SafeImageCollator.num_skipped` counts them")
                self.num_skipped += 1
        return self.collate_fn(kept) if self.collate_fn is not None else kept


def drop_undecodable_rows(dataset: Dataset, image_columns: Sequence[str] = ("reference_image", "target_image", "image")) -> Dataset:
    """Return ``dataset`` without the rows whose images (in ``image_columns``) fail to decode, with one warning.

    Decodes every image once; for data already in a `datasets` dataset (e.g. from the Hub) where files cannot be
    checked before loading.
    """
    columns = [name for name in image_columns if name in dataset.column_names]
    undecoded = dataset
    for name in columns:
        undecoded = undecoded.cast_column(name, Image(decode=False))
    undecoded = undecoded.select_columns(columns)
    keep = []
    for row in tqdm(undecoded, desc="Decoding images", disable=len(undecoded) < 1000, leave=False):
        keep.append(all(row[name] is None or decode_image_safely(row[name]) is not None for name in columns))
    dropped = len(keep) - sum(keep)
    if dropped:
        logger.warning(f"Dropped {dropped} of {len(keep)} rows whose images fail to decode")
        return dataset.select([i for i, ok in enumerate(keep) if ok])
    return dataset
