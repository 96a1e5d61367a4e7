"""`GalleryIndex`: embeds a gallery with an MQIRTN model, stores it (safetensors + JSON) and searches it.

Not Hub code (the model never imports it): it may use tqdm, safetensors and, lazily, `datasets`, `accelerate` and
`faiss`. The pipeline only duck-types it (`search`, `ids`, `check_model`). `save` writes the embeddings and ids
(safetensors + JSON) and, for the faiss-* backends, the built FAISS index (`faiss.index`), which `load` reads back.
The index, its FAISS backends and their persistence (atomic, hash-verified saves) stay in one module (~950 lines):
they share the index record and its validation. Images are decoded and preprocessed batch by batch, in this process or
in DataLoader workers that prefetch while the model embeds (`num_workers`), with the same result.

>>> index = GalleryIndex.from_folder(model, processor, "catalogue/")              # doctest: +SKIP
>>> index.save("catalogue.index")                                                 # doctest: +SKIP
>>> index = GalleryIndex.load("catalogue.index", model=model, processor=processor)  # doctest: +SKIP
>>> pipe(image="dress.jpg", text="make it red", gallery=index, top_k=5)           # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
import os
import shutil
import stat
import time
import weakref
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers.utils import logging

from modeling_mqirtn.search_mqirtn import exact_search
from processing import processing_mqirtn
from processing.processing_mqirtn import IMAGE_EXTENSIONS, to_rgb_image

from . import BACKENDS, MAX_BACKEND_OPTION
from .atomic import recover_folder, sha256_file, staging_folder, swap_in_folder


logger = logging.get_logger(__name__)

INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
# FAISS's own serialisation (`faiss.write_index`), written by `save` for the faiss-* backends; `index.json` records
# what it was built from (its "faiss" entry) so `load` can tell a stale file.
FAISS_FILE = "faiss.index"
# The SHA-256 (hex) of index.json's bytes, written beside it: `load` refuses an index.json edited after its save (its
# `root` and `ids` name the files a server may show).
INDEX_HASH_FILE = "index.json.sha256"
FORMAT_VERSION = 1
# What an index folder may hold; `save` replaces such a folder as a whole and refuses one holding anything else.
_INDEX_FILES = (INDEX_FILE, INDEX_HASH_FILE, EMBEDDINGS_FILE, FAISS_FILE, f"{FAISS_FILE}.partial")
# How often `load` starts again when a save swapped the folder while it opened the files.
_READ_ATTEMPTS = 20


class ModelMismatchError(ValueError):
    """The model given to an index is not the one that built it (other projection_dim or other weights)."""


# ---------------------------------------------------------------------------------------------------- fingerprint
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and bytes), as hex.

    Cached per model object and recomputed only when a parameter or buffer was modified in place since (tracked with
    the tensors' version counters, which optimizer steps and `load_state_dict` bump), so calling it per search is cheap.
    The same weights in another dtype give another fingerprint.
    """
    state = model.state_dict()
    versions = tuple(tensor._version for tensor in state.values())
    cached = _FINGERPRINTS.get(model)
    if cached is not None and cached[0] == versions:
        return cached[1]
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    fingerprint = digest.hexdigest()
    _FINGERPRINTS[model] = (versions, fingerprint)
    return fingerprint


# Files of a model folder that decide what code `trust_remote_code` runs: the Python files and the JSON files that
# name them (`auto_map`, `custom_pipelines`).
_CODE_SUFFIXES = (".py", ".json")


def model_code_digest(folder: str | os.PathLike) -> dict[str, str]:
    """SHA-256 (hex) of each `*.py` / `*.json` file directly in the model folder `folder`, by file name."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(Path(folder).iterdir())
        if path.is_file() and path.suffix in _CODE_SUFFIXES
    }


# ---------------------------------------------------------------------------------------------------- images
def _describe(item, position: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, dict) and item.get("path"):
        return str(item["path"])
    return f"#{position}"


def _warn_skipped(skipped: list[str], total: int) -> None:
    if not skipped:
        return
    shown = ", ".join(skipped[:20]) + (f", ... and {len(skipped) - 20} more" if len(skipped) > 20 else "")
    logger.warning(f"Skipped {len(skipped)} unreadable image(s) of {total}: {shown}")


def _is_file(entry: os.DirEntry) -> bool:
    """`entry.is_file()`, False for a link loop or an entry gone meanwhile (as `Path.is_file`)."""
    try:
        return entry.is_file()
    except OSError:
        return False


def _image_entries(root: Path) -> list[tuple[tuple[str, ...], str]]:
    """`(relative path parts, path)` of the image files under `root`, sorted by parts: files and links to files,
    folders entered but not links to folders (as `Path.rglob`), unreadable folders passed over. `os.scandir` knows
    each entry's kind without a `stat` (one per link only): 4,096 files and their ids in ~28 ms here, against ~105 ms
    with `rglob` + `is_file` + `relative_to` (4 % of indexing a folder of 48 px images with one worker)."""
    found, folders = [], [((), str(root))]
    while folders:
        parts, folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                entries = list(entries)
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(((*parts, entry.name), entry.path))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and _is_file(entry):
                found.append(((*parts, entry.name), entry.path))
    found.sort()
    return found


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files (by extension, case-insensitive: `IMAGE_EXTENSIONS`) under `folder`, recursively, sorted by their
    relative path's parts (links to files included, links to folders not followed)."""
    return _image_files_and_ids(folder)[0]


def _image_files_and_ids(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """`image_files` and their ids, the relative POSIX paths."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"`folder` {str(folder)!r} does not exist or is not a directory")
    entries = _image_entries(root)
    return [Path(path) for _, path in entries], ["/".join(parts) for parts, _ in entries]


# ---------------------------------------------------------------------------------------------------- metadata
# Row metadata names the index itself fills or the milvus schema uses.
_RESERVED_METADATA = ("id", "embedding")


def check_metadata_row(row) -> dict:
    """A row's metadata: a dict of field name -> string, number or boolean (`ValueError` naming what is not)."""
    if not isinstance(row, dict):
        raise ValueError(f"a metadata row must be a dict of column -> value, got {type(row).__name__}")
    for key, value in row.items():
        if not isinstance(key, str) or not key.isidentifier() or key in _RESERVED_METADATA:
            raise ValueError(
                f"metadata column {key!r} must be a name of letters, digits and underscores, not "
                f"{list(_RESERVED_METADATA)}"
            )
        if not isinstance(value, (str, int, float, bool)):
            raise ValueError(
                f"metadata column {key!r} must hold strings, numbers or booleans, got {type(value).__name__}"
            )
    return dict(row)


def file_signature(path: str | os.PathLike) -> dict:
    """What `update` compares to tell a changed file: its size and modification time (ns)."""
    stat = os.stat(path)
    return {"file_size": int(stat.st_size), "file_mtime_ns": int(stat.st_mtime_ns)}


def folder_metadata(files: Sequence[str | os.PathLike], ids: Sequence[str]) -> list[dict]:
    """Per file of a folder gallery: `folder` (the id's folder relative to the root, "" at the root) and its
    `file_signature`."""
    rows = []
    for path, item in zip(files, ids):
        try:
            signature = file_signature(path)
        except OSError:  # gone meanwhile: embedding skips it
            signature = {"file_size": -1, "file_mtime_ns": -1}
        rows.append({"folder": item.rpartition("/")[0], **signature})
    return rows


def _default_workers_for(model, count: int, kwargs: dict) -> int:
    """`default_num_workers` for `count` files embedded with `from_images(**kwargs)` (its accelerator, batch size)."""
    accelerator = kwargs.get("accelerator")
    processes = 1 if accelerator is None else int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    shard = math.ceil(count / (1 if accelerator is None else accelerator.num_processes))
    device = next(model.parameters()).device
    return default_num_workers(shard, kwargs.get("batch_size", 32), processes, device)


def read_table(path: str | os.PathLike) -> list[dict]:
    """The rows of a `.jsonl` (one JSON object per line) or `.csv` (header row) gallery file."""
    import csv

    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"a gallery table must be a .jsonl or .csv file, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"the gallery table {str(path)!r} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{str(path)!r} line {number} is not JSON ({error})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{str(path)!r} line {number} must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise ValueError(f"the gallery table {str(path)!r} lists no images")
    return rows


def dataset_metadata(dataset, exclude: Sequence[str] = ()) -> list[dict] | None:
    """The string, integer, float and boolean columns of a `datasets.Dataset` (not `exclude`), one dict per row;
    None when it has none."""
    from datasets import Value

    kinds = ("string", "large_string", "bool")
    kinds += tuple(f"{kind}{bits}" for kind in ("int", "uint", "float") for bits in (8, 16, 32, 64))
    columns = [
        name
        for name, feature in dataset.features.items()
        if name not in (*exclude, *_RESERVED_METADATA) and isinstance(feature, Value) and feature.dtype in kinds
    ]
    if not columns:
        return None
    values = {name: dataset[name] for name in columns}
    return [
        {name: values[name][row] for name in columns if values[name][row] is not None} for row in range(len(dataset))
    ]


class DecodeWorkerError(RuntimeError):
    """A DataLoader worker decoding gallery images failed (for another reason than an unreadable image, which is
    skipped): one line naming the images and the error; `num_workers=0` decodes in this process with a traceback."""


def check_num_workers(num_workers) -> int:
    """`num_workers` as an int, or `ValueError` unless it is a non-negative integer."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(
            f"`num_workers` must be a non-negative integer (0: decode in this process), got {num_workers!r}"
        )
    return num_workers


def default_num_workers(count: int, batch_size: int, processes: int = 1, device=None) -> int:
    """Decoding workers for `count` images embedded by one of `processes` processes on this machine, with the model
    on `device` (a `torch.device`; None: the CPU).

    With the model on a GPU (or MPS) the process only launches kernels: min(4, its share of the usable CPUs). With the
    model on the CPU the workers take cores from the model's threads: min(4, a quarter of the share), so none below 4
    CPUs (on 2 cores with 2 torch threads, 2 workers were 15-20 % slower than none on 48 px images: benchmarks/README.md,
    "Indexing from a folder"). 0 also when the images fit in one batch (nothing to overlap) or with one CPU.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    share = cpus // max(1, processes)
    if count <= batch_size or share < 2:
        return 0
    on_cpu = device is None or torch.device(device).type == "cpu"
    return min(4, share // 4 if on_cpu else share)


def _decode_batch(images: Sequence, processor, start: int, stop: int) -> dict:
    """Decodes `images[start:stop]` with the processor's decoder and preprocesses the readable ones: the one batch of
    `embed_images`, in this process or in a DataLoader worker (it touches no model).

    Returns {"pixel_values": tensor or None, "positions": readable positions, "skipped": descriptions, "size"}.
    """
    decoded, positions, skipped = [], [], []
    for position in range(start, stop):
        item = images[position]
        # A process's shard names its images by their position in the whole list, as a single process does.
        named = images.positions[position] if isinstance(images, _SubsetView) else position
        try:
            # The processor's decoder: the index sees the pixels training and the pipeline see.
            decoded.append(to_rgb_image(item, "images", named))
            positions.append(position)
        except ValueError as error:  # ImageDecodeError for unreadable files, ValueError for other things
            skipped.append(f"{_describe(item, named)} ({type(error).__name__}: {error})")
    pixel_values = processor(images=decoded, return_tensors="pt")["pixel_values"] if decoded else None
    return {"pixel_values": pixel_values, "positions": positions, "skipped": skipped, "size": stop - start}


# Bytes of pixel values a decoding worker hands to this process at once (at least one model batch). Each hand-off has
# a fixed cost (the DataLoader's queues and the shared-memory tensor's file descriptor: 0.5-1.4 ms here), 5-9 % of
# the model's time on a 32-image batch of 48 px images, so small images travel several model batches at a time;
# 224 px images (19 MB a batch of 32) one batch at a time. benchmarks/README.md, "Indexing from a folder".
_HANDOFF_BYTES = 8 * 1024 * 1024


def _handoff_ranges(count: int, batch_size: int, pixel_bytes: int | None, num_workers: int) -> list[tuple[int, int]]:
    """The image ranges `[start, stop)` decoded as one unit, each made of whole model batches of `batch_size`.

    Without workers each unit is one batch. With workers the first units are one batch each (the first is decoded in
    this process while the workers start, the model's first batches should not wait for a large unit), then they
    double up to `_HANDOFF_BYTES` (`pixel_bytes` per image; unknown: one batch). Decoding is several times faster than
    the tower where large units pay off, so a worker doubling its unit stays ahead of the model.
    """
    per_unit = 1
    if num_workers > 0 and pixel_bytes:
        per_unit = max(1, _HANDOFF_BYTES // (batch_size * pixel_bytes))
    ranges, batch, size = [], 0, 1
    batches = math.ceil(count / batch_size)
    while batch < batches:
        take = min(size, batches - batch)
        ranges.append((batch * batch_size, min((batch + take) * batch_size, count)))
        batch += take
        if len(ranges) > 1:  # units 0 and 1 are single batches, then 2, 4, ... up to per_unit
            size = min(2 * size, per_unit)
    return ranges


def _pixel_bytes(processor) -> int | None:
    """Bytes of one image's float32 pixel values when the image processor gives every image one height x width."""
    size = getattr(getattr(processor, "image_processor", None), "size", None)
    try:
        height, width = size["height"], size["width"]
    except (TypeError, KeyError):
        return None
    return 3 * int(height) * int(width) * 4 if height and width else None


class _BatchDecoder(torch.utils.data.Dataset):
    """Unit `u` of `images` (the range `ranges[u]`, whole model batches), decoded and preprocessed: `_decode_batch`.
    Holds the images and the processor only, never the model, so a DataLoader worker (fork or spawn) gets nothing
    else. In a worker an unexpected error comes back as a one-line record (raised as `DecodeWorkerError`), not a
    worker traceback."""

    def __init__(self, images: Sequence, processor, ranges: list[tuple[int, int]]):
        self.images, self.processor, self.ranges = images, processor, ranges

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, unit: int) -> dict:
        start, stop = self.ranges[unit]
        if torch.utils.data.get_worker_info() is None:
            return _decode_batch(self.images, self.processor, start, stop)
        try:
            return _decode_batch(self.images, self.processor, start, stop)
        except Exception as error:  # noqa: BLE001 (reported in the main process, one line)
            message = " ".join(str(error).split())[:500] or "(no message)"
            return {
                "error": f"a DataLoader worker failed on images {start}-{stop - 1} of {len(self.images)} "
                f"({type(error).__name__}: {message}); num_workers=0 decodes in this process and shows the traceback"
            }


def _keep_batch(batch: dict) -> dict:
    """The DataLoader's collate function: a `_BatchDecoder` item is already a batch."""
    return batch


def _init_decode_worker(max_image_pixels: int | None, worker_id: int) -> None:
    """A worker decodes under the pixel cap of the process that started it (set at run time, or from the environment
    in a spawned worker)."""
    processing_mqirtn.MAX_IMAGE_PIXELS = max_image_pixels


# Units each decoding worker may hold ready ahead of the model (DataLoader's `prefetch_factor`).
_PREFETCH_BATCHES = 2


def _decoded_units(decoder: _BatchDecoder, num_workers: int, pin_memory: bool):
    """`decoder`'s units in order: decoded here (`num_workers=0`) or by DataLoader workers that prefetch while the
    caller runs the model (2 units ahead per worker), into pinned memory when `pin_memory`. With workers, the first
    unit is still decoded here while the workers start (tens of milliseconds with fork, seconds with spawn)."""
    num_workers = min(num_workers, len(decoder) - 1)
    if num_workers <= 0:
        for unit in range(len(decoder)):
            yield decoder[unit]
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(decoder, range(1, len(decoder))),
        batch_size=None,  # each item is a unit
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_keep_batch,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_init_decode_worker, processing_mqirtn.MAX_IMAGE_PIXELS),
        prefetch_factor=_PREFETCH_BATCHES,
    )
    iterator = iter(loader)  # starts the workers, which start on units 1, 2, ...
    try:
        yield decoder[0]
        while True:
            try:
                unit = next(iterator)
            except StopIteration:
                return
            except (RuntimeError, OSError, EOFError) as error:
                # A worker died (killed, out of memory): DataLoader's own RuntimeError, or, when it died while this
                # process was fetching a unit's shared memory from it, a refused or reset connection.
                first_line = (str(error).strip().splitlines() or [""])[0]
                if not isinstance(error, RuntimeError) or not first_line:
                    first_line = f"{type(error).__name__}: {first_line}".rstrip(": ")
                raise DecodeWorkerError(
                    f"decoding the gallery images in {num_workers} DataLoader worker(s) failed: {first_line}; "
                    "num_workers=0 decodes in this process"
                ) from None
            if "error" in unit:
                raise DecodeWorkerError(unit["error"])
            yield unit
    finally:
        del iterator  # shuts the workers down now, also when the caller stops early


def _model_batches(unit: dict, start: int, batch_size: int):
    """The model batches of a decoded unit covering images `[start, start + unit["size"])`: dicts like the unit's,
    for the images of `[start, start + batch_size)`, `[start + batch_size, ...)`, ... (the same forward passes
    whatever the unit's size); the unit's skipped files go with its first batch."""
    positions, pixel_values, row = unit["positions"], unit["pixel_values"], 0
    stop = start + unit["size"]
    for first in range(start, stop, batch_size):
        last = min(first + batch_size, stop)
        rows = bisect.bisect_left(positions, last, lo=row)  # positions are ascending
        yield {
            "pixel_values": pixel_values[row:rows] if rows > row else None,
            "positions": positions[row:rows],
            "skipped": unit["skipped"] if first == start else [],
            "size": last - first,
        }
        row = rows


@torch.inference_mode()
def embed_images(
    model,
    processor,
    images: Sequence,
    batch_size: int = 32,
    progress: bool = True,
    description: str = "Embedding gallery",
    num_workers: int = 0,
) -> tuple[torch.Tensor, list[int], list[str]]:
    r"""
    Gallery embeddings `get_image_features` of `images`, decoded lazily batch by batch; unreadable items are skipped.

    num_workers (`int`, *optional*, defaults to 0): DataLoader worker processes that decode and preprocess the next
        batches (the processor's decoder `to_rgb_image`, then `processor`) while the model embeds this one; 0 decodes
        in this process. The embeddings, `kept` and `skipped` are the same either way. On CUDA the batches come in
        pinned memory and are copied without blocking.

    Returns `(embeddings, kept, skipped)`: `embeddings` (`torch.FloatTensor` of shape `(len(kept), projection_dim)`,
    L2-normalised, on CPU), `kept` the positions in `images` that were embedded, `skipped` descriptions of the others.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}")
    num_workers = check_num_workers(num_workers)
    parameter = next(model.parameters())
    ranges = _handoff_ranges(len(images), batch_size, _pixel_bytes(processor), num_workers)
    decoder = _BatchDecoder(images, processor, ranges)
    chunks, kept, skipped = [], [], []
    pending = None  # the last batch's embeddings, left on the device until the next batch is queued
    units = _decoded_units(decoder, num_workers, pin_memory=parameter.device.type == "cuda")
    batches = (batch for (start, _), unit in zip(ranges, units) for batch in _model_batches(unit, start, batch_size))
    # `closing`: the workers stop as soon as this returns or raises (not when the traceback is freed).
    with closing(units), tqdm(total=len(images), desc=description, unit="img", disable=not progress) as bar:
        for batch in batches:
            if batch["pixel_values"] is not None:
                pixel_values = batch["pixel_values"].to(parameter.device, parameter.dtype, non_blocking=True)
                embeds = model.get_image_features(pixel_values=pixel_values).pooler_output
                if pending is not None:
                    chunks.append(pending.float().cpu())
                pending = embeds
                kept.extend(batch["positions"])
            skipped.extend(batch["skipped"])
            bar.update(batch["size"])
    if pending is not None:
        chunks.append(pending.float().cpu())
    dim = model.config.projection_dim
    embeddings = torch.cat(chunks) if chunks else torch.empty((0, dim))
    return embeddings, kept, skipped


def _embed_sharded(model, processor, images, batch_size, progress, accelerator, num_workers=0):
    """`embed_images` over this process's contiguous shard of `images`, then merged in order on every process."""
    from accelerate.utils import gather_object

    model = accelerator.unwrap_model(model)
    with accelerator.split_between_processes(list(range(len(images)))) as shard:
        local_images = _SubsetView(images, shard)
        embeddings, kept, skipped = embed_images(
            model,
            processor,
            local_images,
            batch_size,
            progress and accelerator.is_local_main_process,
            f"Embedding gallery (rank {accelerator.process_index}, {len(local_images)} images)",
            num_workers,
        )
        kept = [shard[i] for i in kept] if shard else []
    # Shards are contiguous and in rank order, so concatenating in rank order restores the input order.
    counts = gather_object([len(kept)])
    padded = accelerator.pad_across_processes(embeddings.to(accelerator.device), dim=0)
    gathered = accelerator.gather(padded).cpu()
    rows_per_rank = gathered.shape[0] // accelerator.num_processes
    embeddings = torch.cat([gathered[r * rows_per_rank : r * rows_per_rank + n] for r, n in enumerate(counts)])
    return embeddings, gather_object(kept), gather_object(skipped)


# ---------------------------------------------------------------------------------------------------- FAISS
def _import_faiss(backend: str):
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            f"The {backend!r} backend needs FAISS, which is not installed: `pip install faiss-cpu` (or the `faiss` "
            "extra of this package), or use backend='exact'"
        ) from error
    return faiss


def _apply_search_options(index, backend: str, options: dict) -> None:
    """Sets the search-time knobs (`nprobe`, `ef_search`) from `options`, on a built or a read FAISS index."""
    if backend == "faiss-ivf":
        index.nprobe = int(options.get("nprobe") or min(index.nlist, 16))
    elif backend == "faiss-hnsw":
        index.hnsw.efSearch = int(options.get("ef_search") or 64)


def _build_faiss(backend: str, embeddings: torch.Tensor, options: dict):
    faiss = _import_faiss(backend)
    vectors = np.ascontiguousarray(embeddings.float().numpy())
    count, dim = vectors.shape
    logger.info(f"Building the {backend} index over {count} vectors")
    if backend == "faiss-flat":
        index = faiss.IndexFlatIP(dim)
    elif backend == "faiss-ivf":
        # FAISS wants >= 39 training points per list; 4 * sqrt(N) lists is its usual rule of thumb.
        nlist = int(options.get("nlist") or max(1, min(int(4 * math.sqrt(count)), count // 39)))
        if nlist > count:
            raise ValueError(
                f"`nlist` ({nlist}) is more than the gallery's {count} vectors: IVF needs a training vector per list; "
                "give a smaller nlist (or none: 4 sqrt(N))"
            )
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on every vector of a large gallery costs O(N * nlist) per iteration for no better lists: train on a
        # fixed random sample of `train_size` vectors (default 64 per list, within FAISS's advised 39-256).
        train_size = int(options.get("train_size") or 64 * nlist)
        if train_size < count:
            size = min(count, max(train_size, 39 * nlist))
            sample = np.random.default_rng(0).choice(count, size=size, replace=False)
            index.train(vectors[np.sort(sample)])
        else:
            index.train(vectors)
    elif backend == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(dim, int(options.get("hnsw_m") or 32), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(options.get("ef_construction") or 80)
    else:
        raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}")
    _apply_search_options(index, backend, options)
    index.add(vectors)
    return index


def _faiss_record(backend: str, options: dict, count: int, dim: int, embeddings_sha256: str | None) -> dict:
    """What a saved FAISS file was built from (down to the embeddings file's hash); `load` reads the file only when
    this matches the index it loads."""
    return {
        "file": FAISS_FILE,
        "backend": backend,
        "backend_options": options,
        "ntotal": count,
        "dim": dim,
        "embeddings_sha256": embeddings_sha256,
    }


def _read_faiss(
    directory: Path, meta: dict, backend: str, options: dict, count: int, dim: int, embeddings_sha256: str
):
    """The FAISS index saved in `directory`, or None (with a warning) when it is missing, unreadable or stale.

    Returns None silently when FAISS is not installed: `search` then raises the usual "needs FAISS" ImportError.
    """
    record = meta.get("faiss")
    if not isinstance(record, dict):
        logger.warning(
            f"{str(directory)!r} holds no saved {backend} index (saved without one, or by an older version); it will "
            "be built at the first search: save the index again to keep it"
        )
        return None
    expected = _faiss_record(backend, options, count, dim, embeddings_sha256)
    differing = sorted(key for key in expected if record.get(key) != expected[key])
    if differing:
        logger.warning(
            f"The saved FAISS index in {str(directory)!r} is stale (recorded "
            f"{', '.join(f'{k}={record.get(k)!r}, expected {expected[k]!r}' for k in differing)}); it will be rebuilt "
            "at the first search"
        )
        return None
    path = directory / FAISS_FILE
    if not path.is_file():
        logger.warning(f"The saved FAISS index {str(path)!r} is missing; it will be rebuilt at the first search")
        return None
    if sha256_file(path) != (meta.get("files") or {}).get(FAISS_FILE):
        logger.warning(
            f"The saved FAISS index {str(path)!r} is not the file index.json lists (other bytes); it will be rebuilt "
            "at the first search"
        )
        return None
    try:
        import faiss
    except ImportError:
        return None
    kinds = {"faiss-flat": faiss.IndexFlat, "faiss-ivf": faiss.IndexIVFFlat, "faiss-hnsw": faiss.IndexHNSWFlat}
    try:
        index = faiss.read_index(str(path))
    except (RuntimeError, MemoryError, OSError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        logger.warning(
            f"Could not read the saved FAISS index {str(path)!r} ({first_line}); it will be rebuilt at the first search"
        )
        return None
    if (
        not isinstance(index, kinds[backend])
        or index.metric_type != faiss.METRIC_INNER_PRODUCT
        or index.ntotal != count
        or index.d != dim
    ):
        logger.warning(
            f"The saved FAISS index {str(path)!r} does not match the gallery (a {type(index).__name__} of "
            f"{index.ntotal} x {index.d}, expected a {backend} index of {count} x {dim}); it will be rebuilt at the "
            "first search"
        )
        return None
    _apply_search_options(index, backend, options)
    return index


# ---------------------------------------------------------------------------------------------------- index.json
# The fields of index.json and the types `load` accepts (anything else is a one-line ValueError, not a KeyError).
_META_FIELDS = {
    "format_version": (int,),
    "size": (int,),
    "projection_dim": (int,),
    "ids": (list,),
    "model_name_or_path": (str, type(None)),
    "fingerprint": (str, type(None)),
    "backend": (str,),
    "backend_options": (dict,),
    "root": (str, type(None)),
}
_OPTIONAL_META_FIELDS = {
    "model_code": (dict, type(None)),
    "skipped": (list,),
    "faiss": (dict, type(None)),
    "files": (dict, type(None)),
    "metadata": (list, type(None)),
}


def check_finite_weights(model) -> None:
    """Raises `ValueError` when a parameter of `model` holds NaN/inf: its embeddings would rank arbitrarily."""
    bad = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if bad:
        raise ValueError(
            f"the model's weights are not finite (NaN/inf in {len(bad)} tensor(s): {', '.join(bad[:3])}); a gallery "
            "embedded with it would rank arbitrarily"
        )


def _check_rows(embeddings: torch.Tensor, what: str, advice: str) -> None:
    """Raises `ValueError` for rows holding NaN/inf or only zeros (no direction: every cosine score would be 0)."""
    finite = torch.isfinite(embeddings).all(dim=-1)
    if not finite.all():
        raise ValueError(f"{what} holds {int((~finite).sum())} row(s) of non-finite (NaN/inf) embeddings; {advice}")
    zero = (embeddings == 0).all(dim=-1)
    if zero.any():
        raise ValueError(
            f"{what} holds {int(zero.sum())} all-zero row(s) (first: row {int(zero.nonzero()[0, 0])}), which no "
            f"query can be compared with; {advice}"
        )


def _write_meta(folder: Path, meta: dict) -> None:
    """Writes index.json and the hash of its bytes (`INDEX_HASH_FILE`) into `folder`."""
    data = json.dumps(meta, indent=1).encode()
    (folder / INDEX_FILE).write_bytes(data)
    (folder / INDEX_HASH_FILE).write_text(hashlib.sha256(data).hexdigest() + "\n")


def _read_saved_files(directory: Path) -> tuple[Path, bytes, bytes | None, bytes | None]:
    """`(folder, index.json bytes, its hash file's bytes or None, embeddings bytes or None)` of one save of `directory`
    (a milvus index has no embeddings file).

    The files are opened through one handle on the folder, so a save that swaps a new folder in meanwhile cannot mix
    two saves; when it removed the old folder's files before they were all opened, the read starts again. Reads the
    previous version when a save was interrupted between its renames (with a warning).
    """
    for attempt in range(_READ_ATTEMPTS):
        if attempt:
            time.sleep(0.001 * attempt)  # a save is swapping folders: let it finish its renames
        folder = recover_folder(directory) or directory
        try:
            folder_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            meta, recorded_hash, embeddings = (
                _read_file_at(folder_fd, name) for name in (INDEX_FILE, INDEX_HASH_FILE, EMBEDDINGS_FILE)
            )
            # The folder read is no longer the index (a save renamed it aside and is removing it) while a file was
            # missing: read again, from the new folder.
            moved = folder != directory or os.stat(directory).st_ino != os.fstat(folder_fd).st_ino
        except FileNotFoundError:  # `directory` itself is gone this instant
            continue
        finally:
            os.close(folder_fd)
        if (meta is None or embeddings is None) and moved:
            continue
        if meta is None:
            break
        if folder != directory and not directory.exists():
            logger.warning(
                f"A save of {str(directory)!r} was interrupted after it moved the previous index aside: loading the "
                f"previous index from {str(folder)!r} (save again to finish)"
            )
        return folder, meta, recorded_hash, embeddings
    raise FileNotFoundError(
        f"{str(directory)!r} is not a gallery index (expected {INDEX_FILE} and {EMBEDDINGS_FILE} in it)"
    )


def _read_file_at(folder_fd: int, name: str) -> bytes | None:
    """The bytes of the regular file `name` of the open folder `folder_fd`; None when there is none."""
    try:
        descriptor = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0), dir_fd=folder_fd)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        return handle.read()


def _read_meta(path: Path, data: bytes | None = None) -> dict:
    """index.json (its bytes `data`, else read from `path`), checked field by field: `ValueError` naming the field,
    what was expected and what came."""
    try:
        meta = json.loads((path.read_bytes() if data is None else data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}); rebuild the index") from error
    except RecursionError:
        raise ValueError(f"{str(path)!r} nests its JSON too deeply to be an index; rebuild the index") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got a {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path.parent)!r} has index format version {meta.get('format_version')!r}; this code reads "
            f"version {FORMAT_VERSION}"
        )
    for fields, required in ((_META_FIELDS, True), (_OPTIONAL_META_FIELDS, False)):
        for name, types in fields.items():
            if name not in meta:
                if required:
                    raise ValueError(f"{str(path)!r} lacks the field {name!r}; rebuild the index")
                continue
            value = meta[name]
            if not isinstance(value, types) or isinstance(value, bool):
                expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ValueError(f"{str(path)!r}: {name!r} must be {expected}, got {json.dumps(value)[:80]}")
    if not all(isinstance(item, str) for item in meta["ids"]):
        raise ValueError(f"{str(path)!r}: 'ids' must be a list of strings")
    # A milvus index keeps its ids in the collection, not in index.json.
    if (meta.get("backend") != "milvus" and meta["size"] != len(meta["ids"])) or meta["projection_dim"] < 1:
        raise ValueError(
            f"{str(path)!r}: 'size' {meta['size']} and 'projection_dim' {meta['projection_dim']} do not describe "
            f"its {len(meta['ids'])} ids"
        )
    if meta["backend"] not in BACKENDS:
        raise ValueError(f"{str(path)!r}: 'backend' must be one of {list(BACKENDS)}, got {meta['backend']!r}")
    if meta.get("metadata") is not None and (
        len(meta["metadata"]) != meta["size"] or not all(isinstance(row, dict) for row in meta["metadata"])
    ):
        raise ValueError(f"{str(path)!r}: 'metadata' must be one JSON object per id")
    for name, value in meta["backend_options"].items():
        if meta["backend"] == "milvus" and name in ("uri", "collection", "token_env", "index_type"):
            if not isinstance(value, str):
                raise ValueError(f"{str(path)!r}: backend option {name!r} must be a string, got {value!r}")
            continue
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BACKEND_OPTION
        ):
            raise ValueError(
                f"{str(path)!r}: backend option {name!r} must be a positive integer up to {MAX_BACKEND_OPTION}, got "
                f"{value!r}"
            )
    return meta


# ---------------------------------------------------------------------------------------------------- index
class GalleryIndex:
    r"""
    L2-normalised gallery embeddings (`(len(index), projection_dim)`, float32, CPU) with one string id per image and
    the identity of the model that computed them (its `name_or_path`, `projection_dim` and `model_fingerprint`).

    Build with `from_images`, `from_folder` or `from_dataset`; grow with `add`; persist with `save`/`load`
    (safetensors + JSON, no pickle); search with `search(query_embeds, top_k)` (exact blocked matrix product by
    default, or FAISS: `backend="faiss-flat" | "faiss-ivf" | "faiss-hnsw"`). `check_model(model)` raises
    `ModelMismatchError` for a model with another `projection_dim` or other weights; the pipeline calls it.

    A FAISS index is built at the first search (or by `save`, whichever comes first) and rebuilt after `add`. `save`
    writes it too (`faiss.index`, FAISS's own format) and `load` reads it back, so a loaded IVF/HNSW index searches
    at once, without re-training or rebuilding; a saved FAISS file that is missing, unreadable or stale (built for
    other vectors or options) is ignored with a warning and rebuilt at the first search.

    `backend_options` tunes FAISS (saved with the index): `nlist` (IVF lists, default 4 sqrt(N)), `nprobe` (lists
    searched, default 16), `train_size` (vectors IVF's k-means trains on, default 64 per list), `hnsw_m` (32),
    `ef_construction` (80), `ef_search` (64).

    Items that cannot be read are skipped, listed in one warning and recorded in `skipped`.
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        ids: Sequence[str],
        *,
        model_name_or_path: str | None = None,
        fingerprint: str | None = None,
        model_code: dict[str, str] | None = None,
        backend: str = "exact",
        backend_options: dict | None = None,
        root: str | os.PathLike | None = None,
        model=None,
        processor=None,
        metadata: Sequence[dict] | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}")
        if embeddings.dim() != 2:
            raise ValueError(f"`embeddings` must have shape (gallery_size, dim), got {tuple(embeddings.shape)}")
        ids = [str(i) for i in ids]
        if len(ids) != embeddings.shape[0]:
            raise ValueError(f"`ids` has {len(ids)} entries but `embeddings` has {embeddings.shape[0]} rows")
        self._check_unique(ids)
        if metadata is not None and len(metadata) != len(ids):
            raise ValueError(f"`metadata` has {len(metadata)} entries but there are {len(ids)} ids")
        self.embeddings = embeddings.detach().float().cpu().contiguous()
        self.ids = ids
        # One dict per row (`folder`, file signature, a dataset's scalar columns): what `search(filter=...)` reads.
        # The milvus backend keeps them in its collection instead.
        self.metadata: list[dict] | None = (
            [dict(row) for row in metadata]
            if metadata is not None
            else ([{} for _ in ids] if backend != "milvus" else None)
        )
        self.projection_dim = int(embeddings.shape[1])
        self.model_name_or_path = model_name_or_path
        self.fingerprint = fingerprint
        # `model_code_digest` of the model folder at build time: what `mqirtn search --trust-remote-code` may run.
        self.model_code = dict(model_code or {})
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        for name, value in self.backend_options.items():
            if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= MAX_BACKEND_OPTION:
                raise ValueError(
                    f"backend option {name!r} must be a positive integer up to {MAX_BACKEND_OPTION}, got {value}"
                )
        self._store = None  # the milvus backend's `MilvusStore`
        self._positions: dict[str, int] | None = None  # id -> row, for the milvus backend's results
        if backend == "milvus":
            from .milvus_store import MilvusStore

            if ids:
                raise ValueError("a milvus index starts empty: its rows live in the collection (use `add_embeddings`)")
            self._store = MilvusStore(self.backend_options, int(embeddings.shape[1]))
            self.backend_options = self._store.options
        self._attached = False  # the milvus backend's `ids` are those of its collection
        self._shard_writes = False  # milvus server under several processes: each writes its own shard
        self._writes = True  # False on the processes of a multi-process build that leave the writing to the main one
        self.root = None if root is None else str(Path(root).resolve())
        self.skipped: list[str] = []
        self.model = model
        self.processor = processor
        self._faiss_index = None

    # ------------------------------------------------------------------------------------------- building
    @staticmethod
    def _check_unique(ids: Sequence[str], existing: Sequence[str] = ()) -> None:
        seen = set(existing)
        for item in ids:
            if item in seen:
                raise ValueError(f"duplicate gallery id {item!r}: ids must be unique")
            seen.add(item)

    @staticmethod
    def _model_identity(model) -> dict:
        name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or None
        code = None
        if name and Path(name).is_dir():
            name = str(Path(name).resolve())
            code = model_code_digest(name)
        return {"model_name_or_path": name, "fingerprint": model_fingerprint(model), "model_code": code}

    def _identity(self) -> dict:
        """What a milvus collection records about the model that wrote it."""
        return {
            "projection_dim": self.projection_dim,
            "fingerprint": self.fingerprint,
            "model_name_or_path": self.model_name_or_path,
        }

    @classmethod
    def from_images(
        cls,
        model,
        processor,
        images: Sequence,
        ids: Sequence[str] | None = None,
        *,
        batch_size: int = 32,
        backend: str = "exact",
        backend_options: dict | None = None,
        accelerator=None,
        progress: bool = True,
        root: str | os.PathLike | None = None,
        num_workers: int = 0,
        metadata: Sequence[dict] | None = None,
    ) -> "GalleryIndex":
        r"""
        Embeds `images` (PIL images, paths, numpy arrays or `datasets` {"bytes", "path"} dicts) in batches.

        ids (`list[str]`, *optional*): one per image; defaults to the path for paths and the position otherwise.
        accelerator (`accelerate.Accelerator`, *optional*): with several processes each embeds a contiguous shard
            (`split_between_processes`) and the shards are gathered, so every process returns the full index, equal
            to the single-process one. Put the model on `accelerator.device` first.
        num_workers (`int`, *optional*, defaults to 0): DataLoader worker processes (per process) that decode and
            preprocess the next batches while the model embeds one; 0 decodes in this process. Same index either way.
            Workers pay off for files (paths, `datasets` bytes); images already in memory are decoded.
        metadata (`list[dict]`, *optional*): one dict of scalar columns per image (strings, numbers, booleans), what
            `search(filter=...)` tests.

        With `backend="milvus"` (`backend_options={"uri": "gallery.db" or "http://host:19530", "collection": ...}`)
        the rows go to the collection, created if missing; an existing collection must have been written by this
        model (`ModelMismatchError` otherwise) and ends up holding exactly these images: rows with the same id are
        replaced (so a killed run, re-run, completes the collection without duplicates) and other rows deleted.
        """
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}")
        check_num_workers(num_workers)
        if not len(images):
            raise ValueError("`images` is empty: there is nothing to index")
        index = cls(
            torch.empty((0, model.config.projection_dim)),
            [],
            backend=backend,
            backend_options=backend_options,
            root=root,
            model=model,
            processor=processor,
            **cls._model_identity(model),
        )
        earlier = ()
        if index._store is not None:
            from .milvus_store import is_local_uri

            # With several processes the main one creates the collection and checks the result; each process writes
            # its own shard to a server, while with Milvus Lite (one process per file) the others hand their shards
            # to the main process (`add`).
            distributed = accelerator is not None and accelerator.num_processes > 1
            index._writes = not distributed or accelerator.is_main_process
            if index._writes:
                index._store.open(index._identity(), create=True)
                earlier = [row["id"] for row in index._store.rows([])]
            if distributed and not is_local_uri(index._store.uri):
                accelerator.wait_for_everyone()  # the collection exists
                if not accelerator.is_main_process:
                    index._store.open(index._identity(), create=False)
                index._shard_writes = True
            index._attached = True
        index.add(
            images,
            ids,
            batch_size=batch_size,
            accelerator=accelerator,
            progress=progress,
            num_workers=num_workers,
            metadata=metadata,
        )
        if not len(index):
            raise ValueError(f"none of the {len(images)} images could be read; see the warning above")
        kept = set(index.ids)
        stale = [item for item in earlier if item not in kept]
        if stale:
            logger.info(f"Deleting {len(stale)} row(s) of the {index._store.describe()} that are not in this gallery")
            index._store.delete(stale)
        if index._store is not None and index._writes:
            found = index._store.count()
            if found != len(index):
                from .milvus_store import MilvusBackendError

                raise MilvusBackendError(
                    f"the {index._store.describe()} holds {found} rows after indexing, expected {len(index)} (images "
                    "embedded minus skipped); another writer changed it meanwhile? Run the indexing again"
                )
        return index

    @classmethod
    def from_folder(
        cls, model, processor, folder: str | os.PathLike, *, num_workers: int | None = None, **kwargs
    ) -> "GalleryIndex":
        """Indexes every image file under `folder` (recursively, `IMAGE_EXTENSIONS`); ids are relative POSIX paths.

        num_workers (`int`, *optional*): DataLoader workers decoding the files while the model embeds (see
            `from_images`); default `default_num_workers`: with the model on a GPU min(4, this process's share of the
            CPUs), on the CPU min(4, a quarter of it) (the workers take cores from the model's threads); 0 for a
            folder that fits in one batch.

        The other keyword arguments are those of `from_images`.
        """
        files, ids = _image_files_and_ids(folder)
        if not files:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {str(folder)!r}")
        if num_workers is None:
            num_workers = _default_workers_for(model, len(files), kwargs)
        return cls.from_images(
            model,
            processor,
            files,
            ids,
            root=folder,
            num_workers=num_workers,
            metadata=folder_metadata(files, ids),
            **kwargs,
        )

    @classmethod
    def from_table(
        cls,
        model,
        processor,
        path: str | os.PathLike,
        image_column: str = "image",
        id_column: str | None = None,
        **kwargs,
    ) -> "GalleryIndex":
        """Indexes the images listed in a JSON Lines (`.jsonl`) or CSV (`.csv`) file, one row per image: its
        `image_column` holds a path (relative to the file's folder, or absolute), `id_column` the id (default: that
        path); every other column becomes filterable metadata (JSON values as they are; CSV values are strings).

        Keyword arguments are those of `from_images`.
        """
        num_workers = kwargs.pop("num_workers", None)
        rows = read_table(path)
        for name, column in (("image_column", image_column), ("id_column", id_column)):
            if column is not None and any(column not in row for row in rows):
                raise ValueError(f"`{name}` {column!r} is missing from some rows of {str(path)!r}")
        base = Path(path).resolve().parent
        images = [str(base / str(row[image_column])) for row in rows]
        ids = [str(row[id_column] if id_column else row[image_column]) for row in rows]
        metadata = [
            {key: value for key, value in row.items() if key not in (image_column, *_RESERVED_METADATA)
             and isinstance(value, (str, int, float, bool))}
            for row in rows
        ]  # fmt: skip
        if num_workers is None:
            num_workers = _default_workers_for(model, len(images), kwargs)
        return cls.from_images(model, processor, images, ids, metadata=metadata, num_workers=num_workers, **kwargs)

    @classmethod
    def from_dataset(
        cls, model, processor, dataset, image_column: str = "image", id_column: str | None = None, **kwargs
    ) -> "GalleryIndex":
        """Indexes a `datasets.Dataset` image column; ids from `id_column`, else the row numbers.

        Images are decoded here, one by one, so a corrupt entry is skipped instead of failing a whole batch.
        Keyword arguments are those of `from_images`.
        """
        from datasets import Image as ImageFeature

        for name, column in (("image_column", image_column), ("id_column", id_column)):
            if column is not None and column not in dataset.column_names:
                raise ValueError(
                    f"`{name}` {column!r} is not a column of the dataset; columns: {dataset.column_names}"
                )
        if isinstance(dataset.features[image_column], ImageFeature):
            dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        images = _ColumnView(dataset, image_column)
        ids = [str(i) for i in dataset[id_column]] if id_column else [str(i) for i in range(len(dataset))]
        if "metadata" not in kwargs:
            kwargs["metadata"] = dataset_metadata(dataset, exclude=(image_column,))
        return cls.from_images(model, processor, images, ids, **kwargs)

    def add(
        self,
        images: Sequence,
        ids: Sequence[str] | None = None,
        *,
        batch_size: int = 32,
        accelerator=None,
        progress: bool = True,
        num_workers: int = 0,
        metadata: Sequence[dict] | None = None,
    ) -> int:
        """Embeds `images` with the attached model and appends them; returns how many were added (readable).

        metadata (`list[dict]`, *optional*): one dict of scalar columns per image (see `from_images`).

        num_workers (`int`, *optional*, defaults to 0): DataLoader workers decoding while the model embeds (see
        `from_images`)."""
        check_num_workers(num_workers)
        if self.model is None or self.processor is None:
            raise ValueError(
                "this index has no model attached: pass `model=` and `processor=` to `GalleryIndex.load` (or build it "
                "with `from_images`) before `add`"
            )
        self.check_model(self.model)
        if ids is None:
            ids = [
                str(item) if isinstance(item, (str, os.PathLike)) else str(len(self) + i)
                for i, item in enumerate(images)
            ]
        else:
            ids = [str(i) for i in ids]
            if len(ids) != len(images):
                raise ValueError(f"`ids` has {len(ids)} entries but `images` has {len(images)}")
        if metadata is not None and len(metadata) != len(images):
            raise ValueError(f"`metadata` has {len(metadata)} entries but `images` has {len(images)}")
        self._check_unique(ids, self.ids)
        check_finite_weights(self.model)
        if accelerator is not None and accelerator.num_processes > 1 and self._shard_writes:
            return self._add_shards_to_server(images, ids, metadata, batch_size, progress, accelerator, num_workers)
        if accelerator is not None and accelerator.num_processes > 1:
            embeddings, kept, skipped = _embed_sharded(
                self.model, self.processor, images, batch_size, progress, accelerator, num_workers
            )
        else:
            embeddings, kept, skipped = embed_images(
                self.model, self.processor, images, batch_size, progress, num_workers=num_workers
            )
        _warn_skipped(skipped, len(images))
        kept_metadata = None if metadata is None else [metadata[i] for i in kept]
        self.add_embeddings(embeddings, [ids[i] for i in kept], kept_metadata)
        self.skipped.extend(skipped)
        return len(kept)

    def _add_shards_to_server(self, images, ids, metadata, batch_size, progress, accelerator, num_workers) -> int:
        """`add` under several processes writing to a Milvus server: each embeds its contiguous shard and upserts it
        (in bounded batches) itself; the ids are then gathered in order, so every process knows the whole gallery."""
        from accelerate.utils import gather_object

        model = accelerator.unwrap_model(self.model)
        with accelerator.split_between_processes(list(range(len(images)))) as shard:
            embeddings, kept, skipped = embed_images(
                model,
                self.processor,
                _SubsetView(images, shard),
                batch_size,
                progress and accelerator.is_local_main_process,
                f"Embedding gallery (rank {accelerator.process_index}, {len(shard)} images)",
                num_workers,
            )
            kept = [shard[i] for i in kept] if shard else []
        rows = [check_metadata_row(metadata[i]) if metadata is not None else {} for i in kept]
        if kept:
            embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1)
            self._store.upsert([ids[i] for i in kept], embeddings.numpy(), rows)
        kept, skipped = gather_object(kept), gather_object(skipped)
        accelerator.wait_for_everyone()  # every shard is written before the main process counts the rows
        _warn_skipped(skipped, len(images))
        self.ids.extend(ids[i] for i in kept)
        self._positions = None
        self.skipped.extend(skipped)
        return len(kept)

    def add_embeddings(
        self, embeddings: torch.Tensor, ids: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> None:
        """Appends precomputed gallery embeddings `(count, projection_dim)` (normalised here) with their ids (new
        ones: an id already in the index is a `ValueError`, `remove` it first) and, optionally, one metadata dict
        each."""
        ids = [str(i) for i in ids]
        if self._store is not None and self._writes:
            self._milvus()  # the collection's ids, before checking the new ones against them
        metadata = [{} for _ in ids] if metadata is None else [check_metadata_row(row) for row in metadata]
        if len(metadata) != len(ids):
            raise ValueError(f"`metadata` has {len(metadata)} entries but there are {len(ids)} ids")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.projection_dim:
            raise ValueError(
                f"`embeddings` must have shape (count, {self.projection_dim}), got {tuple(embeddings.shape)}"
            )
        if len(ids) != embeddings.shape[0]:
            raise ValueError(f"`ids` has {len(ids)} entries but `embeddings` has {embeddings.shape[0]} rows")
        self._check_unique(ids, self.ids)
        embeddings = embeddings.detach().float().cpu()
        _check_rows(embeddings, "`embeddings`", "the model or the given embeddings are not usable")
        embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
        if self._store is not None:
            if self._writes:
                self._milvus().upsert(ids, embeddings.numpy(), metadata)
            self.ids.extend(ids)
            self._positions = None
            return
        self.embeddings = torch.cat([self.embeddings, embeddings]).contiguous()
        self.ids.extend(ids)
        self.metadata.extend(metadata)
        self._faiss_index = None  # rebuilt on the next search

    def remove(self, ids: Sequence[str]) -> int:
        """Deletes the rows of `ids` (every one must be in the index); returns how many were removed. The positions
        of the remaining rows close up, in order."""
        ids = [str(i) for i in ([ids] if isinstance(ids, str) else ids)]
        if self._store is not None and self._writes:
            self._milvus()
        wanted = set(ids)
        missing = sorted(wanted - set(self.ids))
        if missing:
            shown = ", ".join(repr(i) for i in missing[:5])
            shown += f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"cannot remove {shown}: not an id of this index")
        if not wanted:
            return 0
        keep = [position for position, item in enumerate(self.ids) if item not in wanted]
        if self._store is not None:
            if self._writes:
                self._milvus().delete(sorted(wanted))
        else:
            self.embeddings = self.embeddings[keep].contiguous()
            self.metadata = [self.metadata[position] for position in keep]
            self._faiss_index = None  # rebuilt on the next search
        self.ids = [self.ids[position] for position in keep]
        self._positions = None
        return len(wanted)

    def update_folder(
        self,
        folder: str | os.PathLike | None = None,
        *,
        batch_size: int = 32,
        progress: bool = True,
        num_workers: int = 0,
        accelerator=None,
    ) -> dict[str, int]:
        """Brings a folder index up to date with its folder: embeds only files that are new or changed (other size or
        modification time than recorded), deletes the rows of files that are gone, keeps the rest.

        folder (*optional*): the folder the index was built from (its `root`, the default).

        Returns the counts `{"added", "changed", "removed", "unchanged", "skipped"}`.
        """
        if self.root is None:
            raise ValueError(
                "this index was not built from a folder (it records no root): there is nothing to update from"
            )
        if folder is not None and Path(folder).resolve() != Path(self.root):
            raise ValueError(
                f"this index was built from {self.root!r}, not {str(folder)!r}: its ids are relative to it"
            )
        files, ids = _image_files_and_ids(self.root)
        current = folder_metadata(files, ids)
        if self._store is not None:
            known = {
                row["id"]: (row.get("file_size"), row.get("file_mtime_ns"))
                for row in self._milvus().rows(["file_size", "file_mtime_ns"])
            }
            if set(known) != set(self.ids):
                # Rows written by another process since this index was loaded: go by the collection.
                self.ids, self._positions = sorted(known), None
        else:
            known = {
                item: (row.get("file_size"), row.get("file_mtime_ns")) for item, row in zip(self.ids, self.metadata)
            }
        signature = {item: (row["file_size"], row["file_mtime_ns"]) for item, row in zip(ids, current)}
        changed = [item for item in ids if item in known and known[item] != signature[item]]
        removed = [item for item in known if item not in signature]
        todo = [position for position, item in enumerate(ids) if item not in known or known[item] != signature[item]]
        self.remove(changed + removed)
        added = 0
        if todo:
            before = len(self.skipped)
            added = self.add(
                [files[p] for p in todo],
                [ids[p] for p in todo],
                metadata=[current[p] for p in todo],
                batch_size=batch_size,
                progress=progress,
                num_workers=num_workers,
                accelerator=accelerator,
            )
            skipped = len(self.skipped) - before
        else:
            skipped = 0
        present = set(self.ids)
        replaced = sum(1 for item in changed if item in present)
        return {
            "added": added - replaced,
            "changed": replaced,
            "removed": len(removed),
            "unchanged": len(ids) - len(todo),
            "skipped": skipped,
        }

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"GalleryIndex(size={len(self)}, projection_dim={self.projection_dim}, backend={self.backend!r}, "
            f"model={self.model_name_or_path!r})"
        )

    def image_path(self, position: int) -> Path | None:
        """Where the image of row `position` lives, when known (folder indices and path-built indices); None for an id
        of a folder index that leads outside its root (`../x`, an absolute path: an edited index.json)."""
        if self.root:
            # Lexically (`..` collapsed, links not followed): a gallery folder may hold links to images kept elsewhere.
            root = Path(os.path.normpath(self.root))
            item = Path(os.path.normpath(root / self.ids[position]))
            if not item.is_relative_to(root):
                return None
        else:
            item = Path(self.ids[position])
        return item if item.is_file() else None

    # ------------------------------------------------------------------------------------------- searching
    def check_model(self, model) -> None:
        """Raises `ModelMismatchError` unless `model` has this index's `projection_dim` and checkpoint fingerprint."""
        dim = model.config.projection_dim
        if dim != self.projection_dim:
            raise ModelMismatchError(
                f"this gallery index was built with a model of projection_dim {self.projection_dim} "
                f"({self.model_name_or_path or 'unknown model'}), but the given model has projection_dim {dim}; "
                "rebuild the index with this model"
            )
        if self.fingerprint is not None and model_fingerprint(model) != self.fingerprint:
            raise ModelMismatchError(
                f"this gallery index was built with another checkpoint ({self.model_name_or_path or 'unknown model'}, "
                f"fingerprint {self.fingerprint[:12]}); the given model's weights differ "
                f"(fingerprint {model_fingerprint(model)[:12]}); rebuild the index with this model"
            )

    def search(self, query_embeds: torch.Tensor, top_k: int = 10, block_size: int = 65536, filter: str | None = None):
        r"""
        The `top_k` gallery rows most similar to each query, best first.

        query_embeds (`torch.FloatTensor` of shape `(num_queries, projection_dim)` or `(projection_dim,)`)
        filter (`str`, *optional*): only rows whose metadata satisfy it, e.g. `'folder == "shoes"'`. The milvus
            backend passes it to the engine (Milvus's boolean expressions); the others evaluate `filters.SUPPORTED`
            (`==`, `!=`, `in`, `not in`, joined by `and`) and search the matching rows exactly.

        Returns `(scores, indices)`, `torch.Tensor`s of shape `(num_queries, min(top_k, len(self)))` on CPU; `indices`
        are positions in `ids`. Where fewer rows match (a filter, an approximate index) the missing places hold score
        `-inf` and index -1. Equal scores may come in any order among themselves.
        """
        if isinstance(query_embeds, np.ndarray):
            query_embeds = torch.from_numpy(query_embeds)
        if query_embeds.dim() == 1:
            query_embeds = query_embeds[None]
        if query_embeds.dim() != 2 or query_embeds.shape[1] != self.projection_dim:
            raise ValueError(
                f"`query_embeds` must have shape (num_queries, {self.projection_dim}), got {tuple(query_embeds.shape)}"
            )
        if self._store is not None and self._writes:
            self._milvus()
        if not len(self):
            raise ValueError("the gallery index is empty: there is nothing to search")
        query_embeds = query_embeds.detach().float().cpu()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}")
        if self._store is not None:
            return self._search_milvus(query_embeds, top_k, filter)
        if filter is not None:
            return self._search_filtered(query_embeds, top_k, filter, block_size)
        if self.backend == "exact":
            return exact_search(query_embeds, self.embeddings, top_k, block_size=block_size)
        faiss_index = self._get_faiss_index()
        scores, indices = faiss_index.search(np.ascontiguousarray(query_embeds.numpy()), min(top_k, len(self)))
        return torch.from_numpy(scores), torch.from_numpy(indices)

    def _milvus(self):
        """The milvus backend's store, its collection opened (created if missing) on first use; an index made
        directly (not by `from_*`/`load`) then takes the collection's rows as its own."""
        store = self._store
        if not store.opened:
            store.open(self._identity(), create=True)
        if not self._attached:
            self.ids, self._positions, self._attached = sorted(row["id"] for row in store.rows([])), None, True
        return store

    def wait_for_index(self, timeout: float = 600.0) -> bool | None:
        """The milvus backend: waits (up to `timeout` s, logging what it waits for) until the engine's vector index
        covers every row; True when it does, False when the time ran out (searches meanwhile are exact over the rows
        not yet indexed), None when the engine cannot tell. True at once for the in-process backends."""
        if self._store is None or not self._writes:
            return True
        store = self._milvus()
        logger.info(f"Waiting up to {timeout:.0f} s for the vector index of the {store.describe()} to cover every row")
        done = store.wait_for_index(timeout)
        if done is False:
            logger.warning(
                f"The vector index of the {store.describe()} is still being built after {timeout:.0f} s: searches "
                "until it is done are exact (brute force) over the rows not yet indexed, correct but slower"
            )
        return done

    def close(self) -> None:
        """Closes the connection of the milvus backend (Milvus Lite allows one process per file: close before another
        process opens it); the next operation reconnects. Nothing to do for the in-process backends."""
        if self._store is not None:
            self._store.close()

    def _search_filtered(self, query_embeds: torch.Tensor, top_k: int, filter: str, block_size: int):
        """Exact search over the rows whose metadata match `filter` (any in-process backend)."""
        from .filters import parse_filter

        matches = parse_filter(filter)
        if self.metadata is None or not any(self.metadata):
            logger.warning(
                "this index records no metadata for its rows (built without any), so no row matches a filter"
            )
        rows = [position for position, row in enumerate(self.metadata or ()) if matches(row)]
        width = min(top_k, len(self))
        scores = torch.full((query_embeds.shape[0], width), float("-inf"))
        indices = torch.full((query_embeds.shape[0], width), -1, dtype=torch.long)
        if rows:
            rows = torch.tensor(rows)
            found_scores, found = exact_search(query_embeds, self.embeddings[rows], top_k, block_size=block_size)
            scores[:, : found.shape[1]] = found_scores
            indices[:, : found.shape[1]] = rows[found]
        return scores, indices

    def _search_milvus(self, query_embeds: torch.Tensor, top_k: int, filter: str | None):
        """The milvus backend's `search`: the engine's results as positions in `ids`, ties ordered by position."""
        if not self._writes:
            raise ValueError("this process left the database to the main process: search the index there")
        if self._positions is None:
            self._positions = {item: position for position, item in enumerate(self.ids)}
        width = min(top_k, len(self))
        # Asked for exactly `width`, the engine can return fewer: deleted rows still in a segment are dropped after its
        # (approximate) candidates are chosen. A margin of candidates keeps `width` results; the best are kept.
        from .milvus_store import MAX_TOP_K

        fetch = min(width + max(width, 16), MAX_TOP_K)
        found = self._milvus().search(np.ascontiguousarray(query_embeds.numpy()), fetch, filter)
        scores = torch.full((query_embeds.shape[0], width), float("-inf"))
        indices = torch.full((query_embeds.shape[0], width), -1, dtype=torch.long)
        unknown = set()
        for query, hits in enumerate(found):
            ranked = []
            for item, score in hits:
                position = self._positions.get(item)
                if position is None:
                    unknown.add(item)
                else:
                    ranked.append((-score, position))
            ranked.sort()
            for place, (negative_score, position) in enumerate(ranked[:width]):
                scores[query, place], indices[query, place] = -negative_score, position
        if unknown:
            logger.warning(
                f"The {self._store.describe()} holds {len(unknown)} row(s) this index does not know (written by "
                "another process since it was loaded); load the index again to search them"
            )
        return scores, indices

    def _get_faiss_index(self):
        """The FAISS index of a faiss-* backend, built now if it was not yet (or was invalidated by `add`)."""
        if self._faiss_index is None:
            self._faiss_index = _build_faiss(self.backend, self.embeddings, self.backend_options)
        return self._faiss_index

    # ------------------------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes `embeddings.safetensors` and `index.json` (ids, model identity, backend, root) into `directory`.

        With a faiss-* backend, also `faiss.index` (`faiss.write_index`), building the FAISS index first if no search
        built it yet (raises `ImportError` without FAISS); `index.json` records what it was built from.

        Atomic: the files are written into a temporary sibling folder, flushed to disk and swapped in for `directory`,
        so a crash at any point leaves the previous index or the new one, never a mix. `index.json` lists the SHA-256
        of the other files (`files`), which `load` verifies; the FAISS record names the embeddings' hash it was built
        from. `directory` must be new, empty or an index folder (it is replaced as a whole).
        """
        given, directory = Path(directory), Path(os.path.abspath(directory))  # "." has no name to stage beside
        if directory.is_symlink() and directory.is_dir():
            directory = Path(os.path.realpath(directory))  # the linked folder is replaced; the link stays
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{str(directory)!r} is a file, not a folder to save a gallery index into")
        if directory == Path(os.getcwd()) or directory in Path(os.getcwd()).parents:
            raise ValueError(
                f"{str(given)!r} is the working folder (or holds it); the index folder is replaced as a whole"
            )
        if directory.is_dir():
            foreign = sorted(p.name for p in directory.iterdir() if p.name not in _INDEX_FILES)
            if foreign:
                raise ValueError(
                    f"{str(directory)!r} holds files that are not part of a gallery index ({', '.join(foreign[:5])}); "
                    "save the index into a new or empty folder (the folder is replaced as a whole)"
                )
        if self._store is not None:
            return self._save_milvus(given, directory)
        if self.backend != "exact" and len(self):
            self._get_faiss_index()  # built before anything is staged: a missing FAISS fails here
        directory.parent.mkdir(parents=True, exist_ok=True)
        staged = staging_folder(directory)
        try:
            self._write_files(staged)
            swap_in_folder(staged, directory)
        except BaseException as error:
            shutil.rmtree(staged, ignore_errors=True)  # a full disk, an interrupt: no partial folder stays behind
            if isinstance(error, (OSError, SafetensorError)):
                reason = " ".join(str(error).split()) or type(error).__name__
                raise OSError(
                    f"could not save the gallery index into {str(given)!r} ({reason}); the previous index there, if "
                    "any, is kept"
                ) from error
            raise
        return given

    def _write_files(self, staged: Path) -> None:
        """Writes the index's files into the empty folder `staged` (see `save`)."""
        faiss_index = self._get_faiss_index() if self.backend != "exact" and len(self) else None
        save_file({"embeddings": self.embeddings}, str(staged / EMBEDDINGS_FILE))
        files = {EMBEDDINGS_FILE: sha256_file(staged / EMBEDDINGS_FILE)}
        faiss_record = None
        if faiss_index is not None:
            _import_faiss(self.backend).write_index(faiss_index, str(staged / FAISS_FILE))
            files[FAISS_FILE] = sha256_file(staged / FAISS_FILE)
            faiss_record = _faiss_record(
                self.backend, self.backend_options, int(faiss_index.ntotal), int(faiss_index.d), files[EMBEDDINGS_FILE]
            )
        _write_meta(staged, self._index_record(faiss=faiss_record, files=files, ids=self.ids, metadata=self.metadata))

    def _index_record(self, **rows) -> dict:
        """index.json's content: what the index was built from and how it searches, plus `rows` (the FAISS record,
        the files' hashes, the ids and their metadata of an in-memory index; a milvus index keeps its rows in the
        collection and lists none)."""
        return {
            "format_version": FORMAT_VERSION,
            "size": len(self),
            "projection_dim": self.projection_dim,
            "model_name_or_path": self.model_name_or_path,
            "fingerprint": self.fingerprint,
            "model_code": self.model_code,
            "backend": self.backend,
            "backend_options": self.backend_options,
            "root": self.root,
            "skipped": self.skipped,
            "faiss": None,
            "files": {},
            "ids": [],
            **rows,
        }

    def _save_milvus(self, given: Path, directory: Path) -> Path:
        """`save` of the milvus backend: `index.json` only (the rows live in the collection), naming the database,
        the collection and its index settings; never a token."""
        from .milvus_store import is_local_uri

        uri = self.backend_options["uri"]
        if is_local_uri(uri) and Path(uri).is_relative_to(directory):
            raise ValueError(
                f"the Milvus Lite database {uri} lies inside the index folder {str(directory)!r}, which `save` "
                "replaces as a whole; keep the .db file outside it"
            )
        if self._writes:
            state = self._milvus().index_state()
            logger.info(
                f"{self._store.describe()}: {len(self)} rows, vector index {state.get('index_type')} "
                f"({state.get('indexed_rows')} indexed, state {state.get('state')})"
            )
        directory.parent.mkdir(parents=True, exist_ok=True)
        staged = staging_folder(directory)
        _write_meta(staged, self._index_record())
        swap_in_folder(staged, directory)
        return given

    @classmethod
    def _load_milvus(cls, directory: Path, meta: dict, model, processor, backend: str | None) -> "GalleryIndex":
        """`load` of a milvus index folder: reconnects to its collection and reads the ids of its rows."""
        if backend not in (None, "milvus"):
            raise ValueError(
                f"{str(directory)!r} is a milvus index (its vectors live in the database): it cannot be searched with "
                f"backend {backend!r}"
            )
        index = cls(
            torch.empty((0, meta["projection_dim"])),
            [],
            model_name_or_path=meta["model_name_or_path"],
            fingerprint=meta["fingerprint"],
            model_code=meta.get("model_code"),
            backend="milvus",
            backend_options=meta["backend_options"],
            root=meta["root"],
            processor=processor,
        )
        index.skipped = list(meta.get("skipped", []))
        index._store.open(index._identity(), create=False)
        index.ids, index._attached = sorted(row["id"] for row in index._store.rows([])), True
        if len(index) != meta["size"]:
            logger.info(
                f"The {index._store.describe()} holds {len(index)} rows ({meta['size']} when the index was saved)"
            )
        if model is not None:
            index.check_model(model)
            index.model = model
        return index

    @classmethod
    def load(
        cls, directory: str | os.PathLike, model=None, processor=None, backend: str | None = None
    ) -> "GalleryIndex":
        """Reads an index written by `save`. With `model`, checks it is the model the index was built with.

        backend (`str`, *optional*): override the stored search backend.

        The saved FAISS index (faiss-* backends) is read when it matches the gallery (same backend, options, vector
        count and dimension), so the first search neither re-trains nor rebuilds it; otherwise a warning says it will
        be rebuilt at the first search. FAISS is imported only then: without it, exact search still works.
        """
        directory, meta_bytes, recorded_hash, data = _read_saved_files(Path(directory))
        meta_path, embeddings_path = directory / INDEX_FILE, directory / EMBEDDINGS_FILE
        if recorded_hash is None:
            logger.warning(
                f"{str(directory)!r} has no {INDEX_HASH_FILE} (saved by an older version): index.json not verified"
            )
        elif recorded_hash.decode(errors="replace").strip() != hashlib.sha256(meta_bytes).hexdigest():
            raise ValueError(
                f"{str(meta_path)!r} is not the index.json its save wrote (its content hash differs from "
                f"{INDEX_HASH_FILE}): the index was edited; rebuild the index"
            )
        meta = _read_meta(meta_path, meta_bytes)
        if data is None:
            if meta["backend"] == "milvus":
                return cls._load_milvus(directory, meta, model, processor, backend)
            raise FileNotFoundError(
                f"{str(directory)!r} is not a gallery index (expected {INDEX_FILE} and {EMBEDDINGS_FILE} in it)"
            )
        embeddings_sha256 = hashlib.sha256(data).hexdigest()
        recorded = meta.get("files")
        if recorded is None:
            logger.warning(f"{str(meta_path)!r} lists no content hashes (saved by an older version): not verified")
        elif recorded.get(EMBEDDINGS_FILE) != embeddings_sha256:
            raise ValueError(
                f"{str(embeddings_path)!r} is not the embeddings file {INDEX_FILE} was saved with (other content "
                "hash): the index folder mixes two saves or was modified; rebuild the index"
            )
        try:
            embeddings = safetensors_load(data)["embeddings"]
        except Exception as error:  # safetensors raises its own SafetensorError (and KeyError) for damaged files
            raise ValueError(
                f"{str(embeddings_path)!r} is not a readable embeddings file ({type(error).__name__}: "
                f"{' '.join(str(error).split())[:200]}); rebuild the index"
            ) from error
        if embeddings.dim() != 2 or embeddings.shape != (meta["size"], meta["projection_dim"]):
            raise ValueError(
                f"{str(embeddings_path)!r} holds embeddings of shape {tuple(embeddings.shape)}, but {INDEX_FILE} "
                f"records ({meta['size']}, {meta['projection_dim']}); rebuild the index"
            )
        _check_rows(embeddings, repr(str(embeddings_path)), "rebuild the index")
        norms = embeddings.float().norm(dim=-1)
        off = int(((norms - 1).abs() > 1e-3).sum())
        if off:
            # Scores are cosine similarities only for unit rows: a longer row would outrank better matches.
            logger.warning(f"{str(embeddings_path)!r}: {off} row(s) are not unit length (edited?); normalised them")
            embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        if backend == "milvus":
            raise ValueError(
                f"{str(directory)!r} holds the embeddings of an in-process index; to search them with Milvus, build a "
                "milvus index from the images (--backend milvus --uri ...)"
            )
        index = cls(
            embeddings,
            meta["ids"],
            model_name_or_path=meta["model_name_or_path"],
            fingerprint=meta["fingerprint"],
            model_code=meta.get("model_code"),
            backend=backend or meta["backend"],
            backend_options=meta["backend_options"],
            root=meta["root"],
            processor=processor,
            metadata=meta.get("metadata"),
        )
        index.skipped = list(meta.get("skipped", []))
        if index.backend != "exact" and len(index):
            if index.backend == meta["backend"]:
                index._faiss_index = _read_faiss(
                    directory,
                    meta,
                    index.backend,
                    index.backend_options,
                    len(index),
                    index.projection_dim,
                    embeddings_sha256,
                )
            else:
                logger.info(
                    f"Searching with {index.backend!r} instead of the saved {meta['backend']!r}: its FAISS index is "
                    "built at the first search"
                )
        if model is not None:
            index.check_model(model)
            index.model = model
        return index


class _ColumnView(Sequence):
    """Lazy, indexable view of one column of a `datasets.Dataset` (rows are read when embedded)."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position):
        return self.dataset[int(position)][self.column]


class _SubsetView(Sequence):
    """Lazy view of the rows `positions` of a sequence (a process's shard)."""

    def __init__(self, items: Sequence, positions: Sequence[int]):
        self.items, self.positions = items, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, position):
        return self.items[self.positions[position]]


__all__ = [
    "BACKENDS",
    "IMAGE_EXTENSIONS",
    "DecodeWorkerError",
    "GalleryIndex",
    "ModelMismatchError",
    "check_finite_weights",
    "check_num_workers",
    "default_num_workers",
    "embed_images",
    "image_files",
    "model_code_digest",
    "model_fingerprint",
]
