"""The folder datasets: FashionIQ, CIRR, Fashion200k, MIT-States and a user's own files, each a reader of the layout
it is distributed in plus its registry entry (`processing.data.registry`). A reader turns the annotation files into
rows of image paths (`SplitRows`); the scaffold in `processing.data.loaders` checks the images and builds the tables.

Adding a folder dataset is one more reader and one `register_dataset` call in this file (which is why the five
readers share one file of ~600 lines):

>>> from processing.data.loaders import load_evaluation_data
>>> data = load_evaluation_data("fashion200k", "data/fashion200k", "test")  # doctest: +SKIP
>>> data.protocol, data.gallery.column_names                                # doctest: +SKIP
('fashion200k', ['image_id', 'image', 'caption'])
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Sequence as SequenceFeature
from datasets import Value

from ..processing_mqirtn import IMAGE_EXTENSIONS
from .loaders import SplitRows, find_bad_images, folder_loaders
from .metrics import FASHIONIQ_CATEGORIES
from .registry import DatasetSpec, register_dataset


# The 49 held-out MIT-States test nouns of TIRG (Vo et al., CVPR 2019), as used by its released code.
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
        raise FileNotFoundError(
            f"FashionIQ folder {data_dir} does not exist: {FASHIONIQ_LAYOUT.format(data_dir=data_dir)}"
        )

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
            names = _read_json(
                data_dir / "image_splits" / f"split.{category}.{split}.json", FASHIONIQ_LAYOUT, data_dir
            )
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
    split = _normalize_split(
        split, {"validation": "val", "dev": "val", "test": "test1"}, ("train", "val", "test1"), "CIRR"
    )
    if not data_dir.is_dir():
        raise FileNotFoundError(f"CIRR folder {data_dir} does not exist: {CIRR_LAYOUT.format(data_dir=data_dir)}")
    annotations = _cirr_annotation_dir(data_dir)
    split_map: dict[str, str] = _read_json(
        annotations / "image_splits" / f"split.rc2.{split}.json", CIRR_LAYOUT, data_dir
    )
    entries = _read_json(annotations / "captions" / f"cap.rc2.{split}.json", CIRR_LAYOUT, data_dir)
    image_root = _cirr_image_root(annotations, list(split_map.values()), mode)

    def image_path(name: str) -> str:
        try:
            return str(image_root / split_map[name])
        except KeyError:
            raise ValueError(
                f"CIRR image {name!r} is in cap.rc2.{split}.json but not in split.rc2.{split}.json"
            ) from None

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
        raise FileNotFoundError(
            f"Fashion200k folder {data_dir} does not exist: {FASHION200K_LAYOUT.format(data_dir=data_dir)}"
        )
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
        gallery = [
            {"image_id": i["image_id"], "image": str(data_dir / i["image_id"]), "caption": i["caption"]}
            for i in images
        ]
        return SplitRows(
            source,
            "fashion200k",
            queries,
            gallery,
            query_extra={"target_caption": Value("string")},
            gallery_extra=caption,
        )

    bad = find_bad_images(
        (str(data_dir / image["image_id"]) for image in images), mode, desc=f"Checking images of {source}"
    )
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
        source,
        "fashion200k",
        queries,
        query_extra=extras,
        bad=bad,
        dropped={"images from training": len(images) - len(good)},
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
                images.append(
                    {"image_id": f"{folder.name}/{file.name}", "path": str(file), "adj": adjective, "noun": noun}
                )
    if not images:
        raise FileNotFoundError(
            f"No MIT-States {split} images under {image_dir}: {MITSTATES_LAYOUT.format(data_dir=data_dir)}"
        )
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
        source,
        "mitstates",
        queries,
        query_extra=extras,
        bad=bad,
        dropped={"images from training": len(images) - len(good)},
    )


# ----------------------------------------------------------------------------------------------------------------
# A user's own files


def _read_utf8(path: Path) -> str:
    """The text of `path` as UTF-8 (a byte-order mark is dropped); `ValueError` naming the first bad byte otherwise."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start} is {data[error.start : error.start + 1]!r}); save it as UTF-8"
        ) from error


def _read_table(path: Path) -> list[dict]:
    """The rows of a JSONL/JSON/CSV/TSV file, each a dict; `ValueError` with the row number for anything else, and for
    a file without rows."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise ValueError(f"Expected a .jsonl, .json, .csv or .tsv file, got {path}")
    text = _read_utf8(path)
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            rows = list(reader)
        except csv.Error as error:  # e.g. a field over the csv module's limit (an unterminated quote swallows lines)
            kind = suffix[1:].upper()
            raise ValueError(f"{path} line {reader.line_num}: not readable as {kind} ({error})") from None
        for row_number, row in enumerate(rows, start=1):
            if None in row:
                raise ValueError(f"{path} row {row_number}: more fields than the header has columns")
    elif suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
    else:
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not a JSON object ({error})") from error
    for row_number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path} row {row_number}: expected an object of columns, got {json.dumps(row)[:60]}")
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def _text_cell(path: Path, row_number: int, row: dict, column: str, kind: str = "a string") -> str:
    """`row[column]` when it is a non-empty string (an id may also be an integer); `ValueError` naming the row."""
    value = row[column]
    if isinstance(value, bool) or not isinstance(value, (str, int) if kind == "an id" else str):
        raise ValueError(f"{path} row {row_number}: `{column}` must be {kind}, got {json.dumps(value)[:60]}")
    return str(value)


def _find_table(folder: Path, stem: str) -> Path | None:
    for suffix in (".jsonl", ".json", ".csv", ".tsv"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


FILES_LAYOUT = """expected a JSONL/JSON/CSV/TSV file with columns `{reference}`, `{text}`, `{target}` (image paths relative
to the file; optionally `modification_type`, for Recall per type), or a folder holding `<split>.jsonl|.csv` and optionally `gallery.jsonl|.csv` / `<split>_gallery.jsonl|.csv`
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
        path = path if path.is_absolute() else folder / path
        try:
            return path.resolve()
        except (RuntimeError, OSError):  # a symlink loop: kept as written, then reported as a missing image
            return Path(os.path.abspath(path))

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
            raise ValueError(
                f"{data_file} row {row_number}: expected columns {required}, missing {missing}; got {sorted(row)}"
            )
        for name in (reference_column, text_column, target_column):
            if row.get(name) not in (None, ""):
                _text_cell(data_file, row_number, row, name)
        if row.get("id") not in (None, ""):
            _text_cell(data_file, row_number, row, "id", "an id")

    gallery: list[dict] = []
    if gallery_file is not None:
        gallery_file = Path(gallery_file)
        if not gallery_file.is_file():
            raise FileNotFoundError(f"Missing gallery file {gallery_file}: {layout}")
        for row_number, row in enumerate(_read_table(gallery_file), start=1):
            if row.get("image") in (None, ""):
                raise ValueError(f"{gallery_file} row {row_number}: expected an `image` column, got {sorted(row)}")
            _text_cell(gallery_file, row_number, row, "image")
            if row.get("id") not in (None, ""):
                _text_cell(gallery_file, row_number, row, "id", "an id")
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
    # An optional `modification_type` column: evaluation reports Recall per type (`metrics.retrieval_diagnostics`).
    typed = any(row.get("modification_type") not in (None, "") for row in table)
    if typed:
        for query, row in zip(queries, table):
            query["modification_type"] = str(row.get("modification_type") or "unlabelled")
    if evaluation and not gallery:
        seen: dict[str, str] = {}
        for row in queries:
            for path, identifier in (
                (row["reference_image"], row["reference_id"]),
                (row["target_image"], row["target_id"]),
            ):
                if path is not None:
                    seen.setdefault(identifier, path)
        gallery = [{"image_id": identifier, "image": path} for identifier, path in seen.items()]
    extra = {"modification_type": Value("string")} if typed else {}
    return SplitRows(
        str(data_file),
        "exact",
        queries,
        gallery if evaluation else [],
        query_extra=extra,
        remove_reference=remove_reference,
    )


# ----------------------------------------------------------------------------------------------------------------
# Registry entries

register_dataset(
    DatasetSpec(
        "fashioniq", "FashionIQ", "fashioniq", "val", *folder_loaders(_read_fashioniq), headline_metric="average",
        options=("check_images", "both_caption_orders"),
    )
)  # fmt: skip
register_dataset(
    DatasetSpec(
        "cirr", "CIRR", "cirr", "val", *folder_loaders(_read_cirr), predict_split="test1", headline_metric="average"
    )
)
register_dataset(DatasetSpec("fashion200k", "Fashion200k", "fashion200k", "test", *folder_loaders(_read_fashion200k)))
register_dataset(DatasetSpec("mitstates", "MIT-States", "mitstates", "test", *folder_loaders(_read_mitstates)))
register_dataset(DatasetSpec("files", "custom files", "exact", "test", *folder_loaders(_read_files)))


__all__ = [
    "CIRR_LAYOUT",
    "FASHION200K_LAYOUT",
    "FASHIONIQ_LAYOUT",
    "FILES_LAYOUT",
    "MITSTATES_LAYOUT",
    "MITSTATES_TEST_NOUNS",
    "fashioniq_caption",
    "replacement_text",
]
