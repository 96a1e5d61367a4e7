"""Training-side data plumbing for `train.py`: lazy transforms, collators and stable image ids.

Datasets come from the loaders (`processing.data.loaders`) with image columns (`datasets.Image`). Here they are
turned into model batches, every image through the `MQIRTNProcessor` itself (its decoder `to_rgb_image`, then its
image processor), so training and evaluation see exactly the pixels the pipeline and the index see:

- :func:`set_training_transform` / :func:`set_query_transform` / :func:`set_gallery_transform` return a copy of
  the dataset with a lazy transform (`with_transform`, i.e. `set_transform` on a copy) that decodes images
  **without raising on a corrupt or missing file** (the row is marked unreadable instead) and runs the
  `MQIRTNProcessor` on them;
- :class:`CIRTrainingCollator` tokenises the modification texts of a batch (padding to the batch's longest), stacks
  the pixels and replaces unreadable rows by copies of readable ones, so every process keeps the same batch size
  (the differentiable all-gather of the loss needs it) and the copies are masked out of each other's negatives
  through equal ``target_ids``;
- :func:`stable_id` maps an image id (scene key, file name) to an int64 that is equal on every process, which the
  model uses to mask duplicates of a query's target out of its negatives.

>>> stable_id("0:small:red:circle") == stable_id("0:small:red:circle"), stable_id("a") != stable_id("b")
(True, True)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import torch
from datasets import Dataset, Image
from PIL import Image as PILImage
from transformers.utils import logging

from ..processing_mqirtn import to_rgb_image_or_none


logger = logging.get_logger(__name__)


def stable_id(value: str | bytes) -> int:
    """A signed int64 hash of ``value`` that is the same in every process and Python session."""
    data = value if isinstance(value, bytes) else str(value).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)


def decode_image(value) -> PILImage.Image | None:
    """The processor's decoder (:func:`processing.processing_mqirtn.to_rgb_image`) on an image cell (``{"bytes",
    "path"}`` dict of an undecoded `datasets.Image` column, a path or a PIL image); ``None`` (and a warning naming the
    file) when it is missing or corrupt."""
    image = to_rgb_image_or_none(value)
    if image is None and value is not None:
        logger.warning(f"Skipping unreadable image {_describe(value)!r}")
    return image


def _describe(value) -> str:
    if isinstance(value, dict):
        return str(value.get("path") or "<bytes>")
    return str(value)


def _undecoded(dataset: Dataset, columns: Sequence[str]) -> Dataset:
    """Switch image columns to ``decode=False`` so decoding happens (and may fail softly) inside our transform."""
    for column in columns:
        if column not in dataset.column_names:
            raise ValueError(f"Expected a column {column!r} in the dataset, got columns {dataset.column_names}")
        feature = dataset.features[column]
        if isinstance(feature, Image) and feature.decode:
            dataset = dataset.cast_column(column, Image(decode=False))
    return dataset


def _image_key(value, fallback: str) -> str:
    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        if value.get("bytes") is not None:
            return hashlib.blake2b(value["bytes"], digest_size=16).hexdigest()
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return fallback


def _pixels(processor, images: list) -> list[torch.Tensor | None]:
    """The processor's ``pixel_values`` (3, H, W) of the readable images of a list, in one call; unreadable ones stay
    ``None``."""
    readable = [i for i, image in enumerate(images) if image is not None]
    result: list[torch.Tensor | None] = [None] * len(images)
    if readable:
        pixel_values = processor(images=[images[i] for i in readable], return_tensors="pt")["pixel_values"]
        for row, i in enumerate(readable):
            result[i] = pixel_values[row]
    return result


def set_training_transform(
    dataset: Dataset,
    processor,
    reference_column: str = "reference_image",
    text_column: str = "modification_text",
    target_column: str = "target_image",
    reference_id_column: str | None = "reference_id",
    target_id_column: str | None = "target_id",
) -> Dataset:
    """A copy of ``dataset`` with the lazy training transform; rows become ``pixel_values`` (3, H, W) or ``None``,
    ``target_pixel_values``, ``modification_text`` (str), ``reference_ids`` and ``target_ids`` (int64).

    Ids come from ``*_id_column`` when the dataset has it, else from the image path or bytes.
    """
    for column in (text_column,):
        if column not in dataset.column_names:
            raise ValueError(f"Expected a text column {column!r} in the dataset, got columns {dataset.column_names}")
    dataset = _undecoded(dataset, (reference_column, target_column))
    has_reference_id = reference_id_column is not None and reference_id_column in dataset.column_names
    has_target_id = target_id_column is not None and target_id_column in dataset.column_names

    def transform(batch: dict) -> dict:
        references = [decode_image(value) for value in batch[reference_column]]
        targets = [decode_image(value) for value in batch[target_column]]
        reference_keys = (
            batch[reference_id_column]
            if has_reference_id
            else [_image_key(v, f"ref{i}") for i, v in enumerate(batch[reference_column])]
        )
        target_keys = (
            batch[target_id_column]
            if has_target_id
            else [_image_key(v, f"tgt{i}") for i, v in enumerate(batch[target_column])]
        )
        return {
            "pixel_values": _pixels(processor, references),
            "target_pixel_values": _pixels(processor, targets),
            "modification_text": [str(text) for text in batch[text_column]],
            "reference_ids": [stable_id(key) for key in reference_keys],
            "target_ids": [stable_id(key) for key in target_keys],
        }

    # `with_transform` is `set_transform` on a copy: the caller's dataset keeps its plain rows.
    return dataset.with_transform(transform)


def set_query_transform(
    dataset: Dataset, processor, reference_column: str = "reference_image", text_column: str = "modification_text"
) -> Dataset:
    """A copy of ``dataset`` with the lazy evaluation-query transform: ``pixel_values`` (3, H, W) and ``modification_text``.

    An unreadable reference becomes a black image (the query keeps its place, so metadata rows stay aligned) and its
    row says so (``reference_usable`` False): the evaluation counts such a query as a miss.
    """
    dataset = _undecoded(dataset, (reference_column,))

    def transform(batch: dict) -> dict:
        images = [decode_image(value) for value in batch[reference_column]]
        return {
            "pixel_values": _blank_filled(processor, images),
            "modification_text": [str(text) for text in batch[text_column]],
            "reference_usable": [image is not None for image in images],
        }

    return dataset.with_transform(transform)


def set_gallery_transform(dataset: Dataset, processor, image_column: str = "image") -> Dataset:
    """A copy of ``dataset`` with the lazy gallery transform: ``pixel_values`` (3, H, W); unreadable images become black."""
    dataset = _undecoded(dataset, (image_column,))

    def transform(batch: dict) -> dict:
        return {"pixel_values": _blank_filled(processor, [decode_image(value) for value in batch[image_column]])}

    return dataset.with_transform(transform)


def _blank_filled(processor, images: list) -> list[torch.Tensor]:
    pixels = _pixels(processor, images)
    if any(p is None for p in pixels):
        template = next((p for p in pixels if p is not None), None)
        if template is None:
            template = _pixels(processor, [PILImage.new("RGB", (32, 32))])[0]
        pixels = [p if p is not None else torch.full_like(template, template.min().item()) for p in pixels]
    return pixels


class CIRTrainingCollator:
    """Collates rows of :func:`set_training_transform` into a model batch.

    Returns ``pixel_values`` (B, 3, H, W), ``input_ids`` / ``attention_mask`` (B, L), ``target_pixel_values``
    (B, 3, H, W), ``reference_ids`` and ``target_ids`` (B,) int64. Rows with an unreadable image are replaced by
    copies of readable rows of the same batch (counted in a warning), so the batch size never changes.
    """

    def __init__(self, tokenizer, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_replaced = 0

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        good = [row for row in rows if row["pixel_values"] is not None and row["target_pixel_values"] is not None]
        if not good:
            raise ValueError(f"Every example of a batch of {len(rows)} has an unreadable reference or target image")
        if len(good) < len(rows):
            self.num_replaced += len(rows) - len(good)
            logger.warning(
                f"Replaced {len(rows) - len(good)} example(s) with unreadable images by copies of readable ones "
                f"({self.num_replaced} so far in this worker)"
            )
            rows = good + [good[i % len(good)] for i in range(len(rows) - len(good))]
        return {
            **collate_queries(self.tokenizer, rows, self.max_length),
            "target_pixel_values": torch.stack([row["target_pixel_values"] for row in rows]),
            "reference_ids": torch.tensor([row["reference_ids"] for row in rows], dtype=torch.long),
            "target_ids": torch.tensor([row["target_ids"] for row in rows], dtype=torch.long),
        }


class CIRQueryCollator:
    """Collates rows of :func:`set_query_transform`: ``pixel_values`` (B, 3, H, W), ``input_ids``, ``attention_mask``."""

    def __init__(self, tokenizer, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_queries(self.tokenizer, rows, self.max_length)
        # (B,) bool: False where the reference could not be decoded (a blank image stands in for it).
        batch["reference_usable"] = torch.tensor([bool(row.get("reference_usable", True)) for row in rows])
        return batch


def collate_queries(tokenizer, rows: list[dict], max_length: int | None) -> dict[str, torch.Tensor]:
    """The query part of a batch: reference ``pixel_values`` (B, 3, H, W), padded ``input_ids``/``attention_mask``."""
    text = tokenizer(
        [row["modification_text"] for row in rows],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return {
        "pixel_values": torch.stack([row["pixel_values"] for row in rows]),
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
    }


def collate_gallery(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Collates rows of :func:`set_gallery_transform`: ``pixel_values`` (B, 3, H, W)."""
    return {"pixel_values": torch.stack([row["pixel_values"] for row in rows])}


def select_first(dataset: Dataset, max_samples: int | None) -> Dataset:
    """The first ``max_samples`` rows (all when ``None``)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.select(range(max_samples))


__all__ = [
    "CIRQueryCollator",
    "CIRTrainingCollator",
    "collate_gallery",
    "decode_image",
    "select_first",
    "set_gallery_transform",
    "set_query_transform",
    "set_training_transform",
    "stable_id",
]
