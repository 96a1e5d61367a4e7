"""A web demo of composed image retrieval: a Gradio app (Hugging Face Space layout) over an MQIRTN model and a gallery.

    python demo/app.py                                   # the main job's model over the shapes test gallery
    python demo/app.py --model DIR_OR_HUB_ID --gallery INDEX_DIR_OR_IMAGE_FOLDER [--port 7860] [--host 127.0.0.1]

The page takes a reference image (upload, or click an example) and a modification text, and shows the top-k gallery
images (rank, score, id), the text->image attention of the query and the retrieval time. Queries go through
`pipeline("composed-image-retrieval")` and `GalleryIndex.search`, so the page ranks exactly as the pipeline does; the
queries waiting in Gradio's queue are embedded together in one forward pass (`--max-batch-size`).

`--gallery` is an index folder written by `mqirtn index` / `GalleryIndex.save`, or a folder of images, which is indexed
on first start (with a progress bar) and cached under `--cache-dir` (default `~/.cache/mqirtn/demo`), keyed by the
model's weights and the folder's files. A cached index is read as JSON + safetensors: loading it runs no code. Without
`--gallery`, the shapes test gallery (the built-in benchmark's, as `train.py` evaluates on it) is exported there once
and served with clickable example queries from the test split.

The server binds to 127.0.0.1 (`--host`, or Gradio's `GRADIO_SERVER_NAME` as on a Space) and never opens a share
tunnel. On a Space, where no arguments can be given, `MQIRTN_DEMO_MODEL` and `MQIRTN_DEMO_GALLERY` set the defaults.
Errors in the arguments are one line on stderr (exit status 1, 2 for bad usage); errors of a query are one line on the
page, and the server keeps serving.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path


DEMO_DIR = Path(__file__).resolve().parent
REPO_ROOT = DEMO_DIR.parent
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the demo works offline

DEFAULT_MODEL = REPO_ROOT / "outputs" / "mqirtn-shapes"  # what `bash scripts/main.sh` writes
DEFAULT_TOP_K = 10
MAX_TOP_K = 50
MAX_TEXT_LENGTH = 300  # characters; the processor truncates tokens to the model's maximum anyway
MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # an uploaded or pasted (data: URL) reference image
# Pixels (width x height) of one reference image, read from its header before decoding: far below the library's cap,
# so one request cannot hold a gigabyte of decoded pixels (a 16-bit 8000 x 8000 PNG: ~1 GB) while others wait.
DEFAULT_MAX_PIXELS = 16_000_000
NUM_EXAMPLES = 10  # example queries from the shapes test split
CAPTION = "#{rank} · {score:.3f} · {id}"  # results gallery captions; `parse_caption` reads them back
_CAPTION_PATTERN = re.compile(r"^#(\d+) · (-?[\d.]+|nan|inf) · (.*)$", re.DOTALL)

logger = logging.getLogger("mqirtn.demo")


class DemoError(Exception):
    """A bad argument or an unusable model/gallery at start-up: reported as one line, without a traceback."""


def parse_caption(caption: str) -> tuple[int, float, str]:
    """`(rank, score, id)` of a results-gallery caption (the inverse of `CAPTION`)."""
    match = _CAPTION_PATTERN.match(caption.strip())
    if match is None:
        raise ValueError(f"not a results caption: {caption!r}")
    return int(match.group(1)), float(match.group(2)), match.group(3)


# ---------------------------------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")  # one line instead of the usage block


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="demo/app.py", description="Web demo of composed image retrieval with an MQIRTN model.")
    parser.add_argument(
        "--model",
        default=os.environ.get("MQIRTN_DEMO_MODEL"),
        help="saved model folder or Hub id (default: the main job's outputs/mqirtn-shapes, or $MQIRTN_DEMO_MODEL)",
    )
    parser.add_argument(
        "--gallery",
        default=os.environ.get("MQIRTN_DEMO_GALLERY"),
        help="index folder (mqirtn index) or folder of images, indexed on first start and cached (default: the shapes "
        "test gallery, with example queries; or $MQIRTN_DEMO_GALLERY)",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to bind (default 127.0.0.1: this machine only)",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), help="port (default 7860)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="queries embedded together in one forward pass when several wait (default 8)",
    )
    parser.add_argument(
        "--cache-dir",
        help="where indexed image folders and the shapes gallery are cached "
        "(default $MQIRTN_CACHE/demo or ~/.cache/mqirtn/demo)",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model folder's own Python files instead of the installed MQIRTN classes",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="the most pixels (width x height) of one reference image, read from its header before "
        f"decoding (default {DEFAULT_MAX_PIXELS:,}; 0: only the library's cap)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while indexing")
    return parser


def default_cache_dir() -> Path:
    if os.environ.get("MQIRTN_CACHE"):
        return Path(os.environ["MQIRTN_CACHE"]) / "demo"
    return Path.home() / ".cache" / "mqirtn" / "demo"


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None and not name.endswith(
        (".", "-")
    )


def _shown(path: Path) -> str:
    """`path` relative to the working folder when it is inside it (as a user would type it), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_arguments(args) -> None:
    """Cheap checks before torch is imported, each a one-line `DemoError`."""
    if args.model is None:
        if not DEFAULT_MODEL.is_dir():
            raise DemoError(
                f"the main job's model {_shown(DEFAULT_MODEL)} is not there: run bash scripts/main.sh first, or pass "
                "--model"
            )
        args.model = str(DEFAULT_MODEL)
    elif not os.path.isdir(args.model) and (os.path.exists(args.model) or not _looks_like_hub_id(args.model)):
        raise DemoError(f"--model {args.model!r} is not a model folder (and not a Hub id)")
    if args.gallery is not None:
        gallery = Path(args.gallery)
        if not gallery.exists():
            raise DemoError(f"--gallery {args.gallery!r} does not exist (give an index folder or a folder of images)")
        if not gallery.is_dir():
            raise DemoError(f"--gallery {args.gallery!r} is a file; give an index folder or a folder of images")
    if args.cache_dir is not None and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise DemoError(f"--cache-dir {args.cache_dir!r} is a file; give a folder (it is created if missing)")
    if not 1 <= args.max_batch_size <= 256:
        raise DemoError(f"--max-batch-size must be between 1 and 256, got {args.max_batch_size}")
    if args.max_pixels < 0:
        raise DemoError(f"--max-pixels must be a positive number of pixels (0: no demo cap), got {args.max_pixels}")
    if not 0 <= args.port <= 65535:
        raise DemoError(f"--port must be between 0 and 65535, got {args.port}")


def load_model(name_or_path: str, trust_remote_code: bool = False, device: str = "auto"):
    """Model and processor with the `mqirtn` CLI's loader (installed classes unless `trust_remote_code`; missing
    weights refused), in eval mode."""
    from mqirtn_app import cli

    try:
        return cli.load_model(name_or_path, trust_remote_code, cli.resolve_device(device))
    except cli.CLIError as error:
        raise DemoError(str(error)) from None


# ---------------------------------------------------------------------------------------------------- galleries
def folder_digest(folder: str | os.PathLike) -> str:
    """SHA-256 (hex) of an image folder's listing: each image file's relative path, size and modification time."""
    from mqirtn_app.index import image_files

    root = Path(folder).resolve()
    digest = hashlib.sha256(str(root).encode())
    for path in image_files(root):
        stat = path.stat()
        digest.update(f"\n{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def cached_folder_index(model, processor, folder, cache_dir, progress: bool = True):
    """`GalleryIndex` of the images under `folder`, built once and cached in `cache_dir/<model>-<folder>/index`.

    The cache key is the model's fingerprint (its weights) and `folder_digest` (the folder's files), so another
    checkpoint or an added, removed or modified image builds a new index. Returns `(index, from_cache)`.
    """
    from mqirtn_app.index import IMAGE_EXTENSIONS, GalleryIndex, ModelMismatchError, image_files, model_fingerprint

    if not image_files(folder):
        raise DemoError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under --gallery {str(folder)!r}")
    key = f"{model_fingerprint(model)[:16]}-{folder_digest(folder)[:16]}"
    path = Path(cache_dir) / key / "index"
    if (path / "index.json").is_file():
        try:
            # JSON + safetensors, hash-verified: no code runs.
            return GalleryIndex.load(path, model=model, processor=processor), True
        except (ValueError, OSError, ModelMismatchError) as error:
            logger.warning(f"the cached index {path} is unusable ({error}); indexing {folder} again")
    print(f"Indexing {folder} (cached in {path.parent} for the next start)...", file=sys.stderr, flush=True)
    index = GalleryIndex.from_folder(model, processor, folder, progress=progress)
    index.save(path)
    return index, False


def shapes_test_gallery(
    cache_dir, image_size: int, num_queries: int | None = None, seed: int = 0, num_examples: int = NUM_EXAMPLES
):
    """The shapes test gallery as a folder of PNGs (`images/00000.png`, ... in the gallery's row order), and example
    queries from the test split: `(folder, [(reference_path, modification_text, target_id), ...])`.

    The split is `train.py`'s evaluation split (`load_shapes("test")`, cached in `~/.cache/mqirtn/shapes`); the
    folder is written once per split configuration (atomically), with the PNG bytes as stored. Examples take the
    test queries in order, one of each modification type per round, so every kind of edit is shown.
    """
    from datasets import Image as ImageFeature

    from processing.data.shapes import MODIFICATION_TYPES, SHAPES_VERSION, load_shapes, load_shapes_gallery

    params = {"version": SHAPES_VERSION, "num_queries": num_queries, "image_size": image_size, "seed": seed}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) / f"shapes-test-{digest}"
    gallery = load_shapes_gallery("test", num_queries, image_size, seed)
    names = {key: f"{row:05d}.png" for row, key in enumerate(gallery["image_id"])}
    if not (root / "images.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            (staging / "images").mkdir()
            cells = gallery.cast_column("image", ImageFeature(decode=False))["image"]
            for key, cell in zip(gallery["image_id"], cells):
                (staging / "images" / names[key]).write_bytes(cell["bytes"])
            (staging / "images.json").write_text(json.dumps({"params": params, "scene_keys": names}, indent=0))
            if root.exists():
                shutil.rmtree(root)  # an interrupted export (no images.json)
            staging.rename(root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    queries = load_shapes("test", num_queries, image_size, seed)
    rows = queries.remove_columns(["reference_image", "target_image"])
    by_type: dict[str, list[dict]] = {kind: [] for kind in MODIFICATION_TYPES}
    for row in rows:
        if len(by_type[row["modification_type"]]) < num_examples:
            by_type[row["modification_type"]].append(row)
    examples = []
    while len(examples) < num_examples and any(by_type.values()):
        for kind in MODIFICATION_TYPES:
            if by_type[kind] and len(examples) < num_examples:
                row = by_type[kind].pop(0)
                reference = str(root / "images" / names[row["reference_id"]])
                examples.append((reference, row["modification_text"], names[row["target_id"]]))
    return root / "images", examples


def open_gallery(args, model, processor):
    """`(index, examples, description)` for the parsed arguments (see the module docstring)."""
    from mqirtn_app.index import GalleryIndex, ModelMismatchError

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    examples = []
    if args.gallery is None:
        image_size = getattr(model.config.vision_config, "image_size", 48)
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else int(image_size)
        folder, examples = shapes_test_gallery(cache_dir, image_size)
        description = "the shapes test gallery"
    elif (Path(args.gallery) / "index.json").is_file():
        try:
            index = GalleryIndex.load(args.gallery, model=model, processor=processor)
        except ModelMismatchError as error:
            raise DemoError(f"--gallery {args.gallery!r} does not fit --model {args.model!r}: {error}") from None
        except (ValueError, OSError) as error:
            raise DemoError(f"--gallery {args.gallery!r} is not a readable gallery index: {error}") from None
        return index, examples, f"the index {args.gallery}"
    else:
        folder, description = Path(args.gallery), f"the images in {args.gallery}"
    index, from_cache = cached_folder_index(model, processor, folder, cache_dir, progress=not args.no_progress)
    if from_cache:
        print(f"Read the cached index of {folder} ({len(index)} images)", file=sys.stderr, flush=True)
    return index, examples, description


# ---------------------------------------------------------------------------------------------------- queries
def _placeholder(size: int = 96):
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (size, size), (215, 215, 215))
    ImageDraw.Draw(tile).text((size // 2, size // 2), "missing", fill=(110, 110, 110), anchor="mm")
    return tile


def _top_k(value) -> int:
    """A query's k: a whole number, clamped to [1, MAX_TOP_K]; None gives DEFAULT_TOP_K. `ValueError` otherwise."""
    if value is None:
        return DEFAULT_TOP_K
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise ValueError(f"Top k must be a whole number from 1 to {MAX_TOP_K}, got {str(value)[:40]!r}.")
    return max(1, min(int(value), MAX_TOP_K))


def _modification_text(value) -> str:
    """A query's text, stripped and cut to MAX_TEXT_LENGTH characters; `ValueError` for what is not text."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"The modification text must be text, got {type(value).__name__}.")
    return value.strip()[:MAX_TEXT_LENGTH]


def _header_pixels(cell: dict) -> tuple[int, int] | None:
    """`(width, height)` from an image's header (nothing decoded); None when PIL cannot read one (the decoder then
    says why)."""
    import io

    from PIL import Image

    try:
        source = io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


class CompositionalSearch:
    r"""
    The page's query function: a batch of (reference, modification text, top-k) queries in, per query a results
    gallery and a status line out; `attention(reference, text)` draws the attention picture of one query.

    Valid queries are embedded together in one forward pass of `pipeline("composed-image-retrieval")` over the
    `GalleryIndex` (`batch_size` = the number of valid queries), so the ranking is the pipeline's; the invalid ones
    get a one-line message and do not spoil the others. The attention picture is `mqirtn_app.visualization`'s
    text->image attention of the query: a forward pass with attention weights, which the page runs after the results
    are shown (its own event), so that it delays neither them nor the other queries of the batch.

    known_targets (`dict`, *optional*): `{(reference file name, modification text): target id}` of the example
        queries; when a query is one of them, its status line says where the known target ranked.
    max_pixels (`int`, *optional*): the most pixels (width x height, read from the header before decoding) of one
        reference image; None leaves only the library's cap (`MQIRTN_MAX_IMAGE_PIXELS`).
    served_dir (`str` or `os.PathLike`, *optional*): where copies of the result images are put for the page (see
        `gallery_image`); default a new folder under the system's temporary folder, removed at exit.
    """

    def __init__(
        self,
        model,
        processor,
        index,
        device=None,
        known_targets: dict | None = None,
        served_dir: str | os.PathLike | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        from modeling_mqirtn import ComposedImageRetrievalPipeline

        self.model, self.processor, self.index = model, processor, index
        self.max_pixels = max_pixels
        if served_dir is None:
            # Under the system's temporary folder: Gradio takes result files from there into its cache, while its file
            # route serves only `allowed_paths` and its cache.
            served_dir = tempfile.mkdtemp(prefix="mqirtn-demo-results-")
            atexit.register(shutil.rmtree, served_dir, ignore_errors=True)
        self.served_dir = Path(served_dir)
        self.served_dir.mkdir(parents=True, exist_ok=True)
        self.known_targets = dict(known_targets or {})
        self.pipe = ComposedImageRetrievalPipeline(model=model, processor=processor, device=device or model.device)
        self.has_attention = model.config.composition == "mqirtn" and model.config.num_fusion_layers > 0
        self.last_batch_size = 0

    def servable_file(self, position: int) -> Path | None:
        """The file of gallery row `position` when the page may show it, else None.

        Only an indexed image is served: the id joined to the index's root and resolved (links followed) must stay
        under the resolved root and be a regular file with an image suffix whose header PIL reads as an image. An
        edited `index.json` (`../` ids, absolute ids), a link that leads out of the folder, or a non-image file with an
        image name are refused here; nothing else of the server is reachable, since the root itself is never given to
        the web server (see `allowed_paths`).
        """
        from PIL import Image, UnidentifiedImageError

        from processing.processing_mqirtn import IMAGE_EXTENSIONS

        if not self.index.root:
            return None
        try:
            root = Path(self.index.root).resolve(strict=True)
            path = (root / self.index.ids[position]).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a link loop
            return None
        if not path.is_relative_to(root) or path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            return None
        try:
            with Image.open(path):  # the header only
                pass
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError):
            return None
        return path

    def gallery_image(self, position: int):
        """What the results gallery shows for a gallery row: a copy of the image file of a folder index (only
        `servable_file`s, copied into this demo's own folder, from which Gradio takes it into its cache), else the
        decoded image of a path-built index, else a grey 'missing' tile."""
        from processing.processing_mqirtn import to_rgb_image_or_none

        if self.index.root:
            path = self.servable_file(position)
            return str(self._served_copy(path)) if path is not None else _placeholder()
        path = self.index.image_path(position)
        image = to_rgb_image_or_none(str(path)) if path is not None else None
        return image if image is not None else _placeholder()

    def _served_copy(self, path: Path) -> Path:
        """A copy of `path` in `served_dir`, named by the file's identity (path, size, modification time), made once."""
        stat = path.stat()
        key = hashlib.sha256(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}".encode()).hexdigest()[:32]
        copy = self.served_dir / f"{key}{path.suffix.lower()}"
        if not copy.is_file():
            partial = copy.with_name(f".{copy.name}.{os.getpid()}.partial")
            shutil.copyfile(path, partial)
            os.replace(partial, copy)
        return copy

    def _reference(self, reference):
        """`(image, name, error)`: the decoded reference (the processor's decoder) and its file name, or a one-line
        error message."""
        from processing.processing_mqirtn import to_rgb_image

        if reference is None:
            return None, None, "Upload a reference image (or click an example) first."
        if isinstance(reference, (str, os.PathLike)):
            reference = {"path": str(reference), "name": Path(reference).name}
        if not isinstance(reference, dict):
            return None, None, f"The reference must be an uploaded image, got {type(reference).__name__}."
        name = str(reference.get("name") or "the upload")[:100]
        if reference.get("error"):
            return None, name, reference["error"]
        try:
            data = reference.get("bytes")
            cell = {"bytes": data, "path": None if data is not None else reference["path"]}
            pixels = _header_pixels(cell)
            if pixels is not None and self.max_pixels is not None and pixels[0] * pixels[1] > self.max_pixels:
                return (
                    None,
                    name,
                    (
                        f"“{name}” is {pixels[0]} x {pixels[1]} pixels; this demo takes at most {self.max_pixels:,} "
                        "pixels per image. Upload a smaller image."
                    ),
                )
            return to_rgb_image(cell, "reference"), name, None
        except ValueError as error:
            logger.info(f"unreadable reference {name!r}: {error}")
            too_large = "pixels" in str(error) and "exceed" in str(error)
            reason = "it is too large" if too_large else "it is not an image file this demo can read"
            return (
                None,
                name,
                (f"Could not read “{name}” as an image: {reason}. Upload a PNG, JPEG, WebP, BMP or GIF."),
            )

    def __call__(self, reference: list, text: list, top_k: list) -> tuple[list, list, list]:
        """One list entry per query (Gradio's batch form; the parameter names are the API's): `reference` the
        uploads (`{"path" | "bytes", "name"}`, a path, or None), `text` the modification texts, `top_k` the k's.
        Returns the results galleries (`[(image, caption), ...]` or None) and the status lines."""
        references, texts, top_ks = reference, text, top_k
        count = len(references)
        galleries, statuses = [None] * count, [""] * count
        valid = []
        for i, (reference, text, top_k) in enumerate(zip(references, texts, top_ks)):
            # Each query is checked on its own: a bad one gets its message and never reaches the shared forward pass.
            try:
                k = _top_k(top_k)
                text = _modification_text(text)
            except ValueError as error:
                statuses[i] = f"**Error:** {error}"
                continue
            image, name, error = self._reference(reference)
            if error is None and not text:
                error = "Type a modification text, e.g. “make the circle red”."
            if error is None and not len(self.index):
                error = "The gallery is empty: there is nothing to search."
            if error is not None:
                statuses[i] = f"**Error:** {error}"
                continue
            target = self.known_targets.get((name, text))
            valid.append((i, image, text, min(k, len(self.index)), target))
        if not valid:
            return galleries, statuses
        self.last_batch_size = len(valid)
        start = time.perf_counter()
        try:
            # One forward pass for every waiting query: the pipeline collates them into one batch.
            results = self.pipe(
                [{"image": image, "text": text} for _, image, text, _, _ in valid],
                gallery=self.index,
                top_k=max(k for *_, k, _ in valid),
                batch_size=len(valid),
            )
        except (
            Exception
        ) as error:  # a model/index mismatch, or anything else: a line on the page, the server serves on
            logger.exception("query batch failed")
            message = " ".join(str(error).split())[:500] or type(error).__name__
            for i, *_ in valid:
                statuses[i] = f"**Error:** {type(error).__name__}: {message}"
            return galleries, statuses
        elapsed = time.perf_counter() - start
        shared = f", one forward pass shared by {len(valid)} queries" if len(valid) > 1 else ""
        for (i, image, text, k, target), hits in zip(valid, results):
            hits = hits[:k]
            galleries[i] = [
                (self.gallery_image(hit["index"]), CAPTION.format(rank=rank, score=hit["score"], id=hit["id"]))
                for rank, hit in enumerate(hits, start=1)
            ]
            statuses[i] = (
                f"Top {len(hits)} of {len(self.index):,} images in **{elapsed * 1000:.0f} ms** "
                f"(query embedding + search{shared})."
            )
            if target is not None:
                ranks = [rank for rank, hit in enumerate(hits, start=1) if hit["id"] == target]
                statuses[i] += (
                    f" The example's known target {target} is **#{ranks[0]}**."
                    if ranks
                    else f" The example's known target {target} is not in the top {len(hits)}."
                )
        return galleries, statuses

    def attention(self, reference, text: str):
        """The text->image attention picture (PIL) of one query; None for an invalid query (its status line says
        why) or a model without fusion layers."""
        from mqirtn_app.visualization import attention_figure

        image, _, error = self._reference(reference)
        try:
            text = _modification_text(text)
        except ValueError:
            return None
        if error is not None or not text or not self.has_attention:
            return None
        try:
            return attention_figure(self.model, self.processor, image, text, panel_size=128, max_columns=5)
        except Exception:  # the picture is an extra: its failure must not hide the results
            logger.exception("attention picture failed")
            return None


# ---------------------------------------------------------------------------------------------------- page
_REFERENCE_IMAGE = None


def decode_data_url(url: str) -> dict:
    """A pasted image's `data:` URL as the query function's `{"bytes", "name"}`, or `{"error", "name"}` when it is
    over `MAX_UPLOAD_BYTES` (the upload route's cap; checked before decoding) or not base64."""
    name = "the pasted image"
    encoded = url.partition(",")[2]
    if len(encoded) > (MAX_UPLOAD_BYTES + 2) // 3 * 4:
        return {"error": f"The pasted image is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB.", "name": name}
    try:
        return {"bytes": base64.b64decode(encoded, validate=True), "name": name}
    except ValueError:
        return {"bytes": b"", "name": name}


def reference_image_class():
    """`gr.Image` whose upload reaches the query function undecoded, as `{"path" | "bytes", "name"}`: the query
    function reads it with the processor's decoder, and an unreadable file becomes a message for that query. (Gradio's
    own decoding would raise in preprocessing, which fails every query of the batch.)"""
    global _REFERENCE_IMAGE
    if _REFERENCE_IMAGE is not None:
        return _REFERENCE_IMAGE
    import gradio as gr
    from gradio import component_meta

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):  # pasted images may arrive as data URLs
            return decode_data_url(payload.url)
        return {"path": payload.path, "name": payload.orig_name or Path(payload.path).name}

    # Gradio writes a `.pyi` stub beside the file that defines a component class (for IDEs): not into demo/.
    write_stub = component_meta.create_or_modify_pyi
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        # `is_template`: the front end draws it as the `image` component it derives from.
        _REFERENCE_IMAGE = type(
            "ReferenceImage", (gr.Image,), {"is_template": True, "preprocess": preprocess, "__module__": __name__}
        )
    finally:
        component_meta.create_or_modify_pyi = write_stub
    return _REFERENCE_IMAGE


CSS = """
#status { min-height: 2.5em; }
#results .caption-label { max-width: 100%; left: var(--block-label-margin); font-size: var(--text-xs); opacity: 0.9; }
#results .grid-wrap { min-height: 0; max-height: none; }
"""  # captions ("#1 · 0.884 · 01908.png") in full across the thumbnail; the results box as tall as its rows


def build_demo(
    search: CompositionalSearch,
    examples=(),
    model_name: str = "",
    gallery_description: str = "",
    max_batch_size: int = 8,
):
    """The Gradio page (a `gr.Blocks`, queue configured) around `search`."""
    import gradio as gr

    size = len(search.index)
    top_k = min(DEFAULT_TOP_K, max(size, 1))
    # Gradio copies every result image into its cache folder: files older than two hours go, checked hourly.
    with gr.Blocks(
        title="MQIRTN composed image retrieval", analytics_enabled=False, delete_cache=(3600, 7200)
    ) as demo:
        gr.Markdown(
            "# Composed image retrieval with MQIRTN\n"
            "Give a **reference image** and a **modification text** (what to change); the model ranks the gallery "
            f"images that show the reference as modified. Model: `{model_name}`; gallery: {gallery_description} "
            f"({size:,} images)." + ("\n\n**The gallery is empty: there is nothing to search.**" if not size else "")
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                reference = reference_image_class()(
                    label="Reference image", sources=["upload", "clipboard"], height=260, elem_id="reference"
                )
                text = gr.Textbox(
                    label="Modification text",
                    placeholder="e.g. make the object in the middle red",
                    max_length=MAX_TEXT_LENGTH,
                    elem_id="query-text",
                )
                k = gr.Slider(1, max(1, min(MAX_TOP_K, size)), value=top_k, step=1, label="Top k", elem_id="top-k")
                button = gr.Button("Search", variant="primary", elem_id="search")
                if examples:
                    gr.Examples(
                        [[path, text_] for path, text_, _ in examples],
                        inputs=[reference, text],
                        label="Example queries from the shapes test split (click one, then Search)",
                        example_labels=[f"{text_} (target {target})" for _, text_, target in examples],
                    )
            with gr.Column(scale=2):
                status = gr.Markdown(label="Status", elem_id="status")
                results = gr.Gallery(
                    label="Results (rank · score · id)",
                    show_label=False,
                    columns=5,
                    height="auto",
                    object_fit="contain",
                    elem_id="results",
                    allow_preview=True,
                )
                attention = gr.Image(
                    label="Where the text looked: text→image attention of the query",
                    type="pil",
                    show_label=False,
                    interactive=False,
                    elem_id="attention",
                )
        # One concurrency group of one for both events: the model runs one batch or one picture at a time.
        searched = gr.on(
            [button.click, text.submit],
            search,
            inputs=[reference, text, k],
            outputs=[results, status],
            batch=True,
            max_batch_size=max_batch_size,
            api_name="search",
            concurrency_limit=1,
            concurrency_id="model",
        )
        searched.then(
            search.attention,
            inputs=[reference, text],
            outputs=attention,
            api_name="attention",
            concurrency_limit=1,
            concurrency_id="model",
        )
    demo.queue(max_size=256, default_concurrency_limit=1)
    return demo


def allowed_paths(examples) -> list[str]:
    """Folders the server may send files from: the example references' (this demo's own export of the shapes
    gallery). Never the gallery's root: result images reach the page as copies of checked files
    (`CompositionalSearch.gallery_image`), so a file of the gallery folder that is not an indexed image, or a root
    edited into `index.json`, is not reachable through the server."""
    return sorted({str(Path(path).parent) for path, _, _ in examples})


def launch_options(host: str, port: int, examples=()) -> dict:
    """`gr.Blocks.launch` keyword arguments: bound to `host` only, no share tunnel, no MCP server, uploads capped at
    `MAX_UPLOAD_BYTES`, files served from `allowed_paths(examples)` and Gradio's cache only."""
    return dict(
        server_name=host,
        server_port=port,
        share=False,
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        allowed_paths=allowed_paths(examples),
        max_file_size=MAX_UPLOAD_BYTES,
        quiet=True,
        theme=None,
        css=CSS,
        prevent_thread_lock=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_arguments(args)
        model, processor = load_model(args.model, args.trust_remote_code, args.device)
        index, examples, description = open_gallery(args, model, processor)
        known_targets = {(Path(path).name, text): target for path, text, target in examples}
        search = CompositionalSearch(
            model, processor, index, known_targets=known_targets, max_pixels=args.max_pixels or None
        )
        model_name = _shown(Path(args.model)) if os.path.isdir(args.model) else args.model
        demo = build_demo(search, examples, model_name, description, args.max_batch_size)
        try:
            demo.launch(**launch_options(args.host, args.port, examples))
        except OSError as error:
            if "empty port" in str(error):
                raise DemoError(f"port {args.port} on {args.host} is in use: pass another --port") from None
            raise DemoError(" ".join(str(error).split())) from None
        print(f"Serving on http://{args.host}:{args.port} (Ctrl+C stops)", file=sys.stderr, flush=True)
        demo.block_thread()
    except DemoError as error:
        print(f"demo/app.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
