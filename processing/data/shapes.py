"""The built-in **shapes** composed-image-retrieval benchmark.

A CSS-style benchmark (after the CSS dataset of TIRG, Vo et al. 2019) drawn with PIL. A *scene* is
a 3×3 grid holding 1–5 objects, at most one per cell; an object has a colour (8), a shape (circle,
square, triangle) and a size (small, large). A query is a reference scene plus a modification text,
and its answer is the target scene:

- *add*: ``"add a small red circle to the top left"``
- *remove*: ``"remove the large blue square"`` (the description matches exactly one object of the
  reference; ``"remove the object in the middle"`` is always unambiguous)
- *change*: ``"make the green triangle yellow"``, ``"make the object on the left large"``,
  ``"make the small red circle a square"``

Everything is deterministic from ``seed``. Scenes are assigned to the ``train`` / ``validation`` /
``test`` partitions by a stable hash of their canonical key (70% / 10% / 20%), and a query is kept
only when its reference *and* target belong to the requested partition, so the three splits share
no scene whatever their sizes. The evaluation gallery of a split is every distinct scene of its
queries (references and targets); a retrieved image is a hit when it shows the same scene, so ids
are canonical scene keys (:func:`scene_key`).

>>> from processing.data.shapes import load_shapes, load_shapes_gallery
>>> queries = load_shapes("test", num_queries=100)          # doctest: +SKIP
>>> queries[0]["modification_text"], queries[0]["target_id"]  # doctest: +SKIP
('make the object at the top red', '1:large:red:square|4:small:blue:circle')
>>> gallery = load_shapes_gallery("test", num_queries=100)   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from datasets import Dataset, Features, Image, Value, load_from_disk
from PIL import Image as PILImage
from PIL import ImageDraw
from tqdm.auto import tqdm
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Bump when generation or rendering changes, so stale caches are not reused.
SHAPES_VERSION = 1

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 0),
    "green": (30, 170, 50),
    "cyan": (0, 210, 220),
    "blue": (40, 70, 240),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle")
SIZE_NAMES: tuple[str, ...] = ("small", "large")
# Row-major, index = 3 * row + column.
CELL_NAMES: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "middle",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# How an object is located in text: "the object in the top left", "the object on the left".
CELL_PHRASES: tuple[str, ...] = (
    "in the top left",
    "at the top",
    "in the top right",
    "on the left",
    "in the middle",
    "on the right",
    "in the bottom left",
    "at the bottom",
    "in the bottom right",
)
BACKGROUND = (20, 20, 20)
MIN_OBJECTS, MAX_OBJECTS = 1, 5
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Fractions of the scene space per split; validation is carved out of what would be train.
SPLIT_FRACTIONS: dict[str, tuple[float, float]] = {"test": (0.0, 0.2), "validation": (0.2, 0.3), "train": (0.3, 1.0)}
DEFAULT_NUM_QUERIES: dict[str, int] = {"train": 20_000, "validation": 2_000, "test": 5_000}
MODIFICATION_TYPES: tuple[str, ...] = ("add", "remove", "change_color", "change_size", "change_shape")

QUERY_FEATURES = Features(
    {
        "query_id": Value("string"),
        "reference_image": Image(),
        "modification_text": Value("string"),
        "target_image": Image(),
        "reference_id": Value("string"),
        "target_id": Value("string"),
        "modification_type": Value("string"),
    }
)
GALLERY_FEATURES = Features({"image_id": Value("string"), "image": Image()})


class ShapeObject(NamedTuple):
    """One object of a scene; every field is an index into the matching ``*_NAMES`` tuple."""

    cell: int
    color: int
    shape: int
    size: int

    def describe(self) -> str:
        """``"small red circle"``."""
        return f"{SIZE_NAMES[self.size]} {COLOR_NAMES[self.color]} {SHAPE_NAMES[self.shape]}"


# A scene is its objects sorted by cell: at most one object per cell makes this canonical.
Scene = tuple[ShapeObject, ...]


@dataclass(frozen=True)
class ShapesQuery:
    """A generated query: ``reference`` + ``text`` → ``target`` (scenes, not images yet)."""

    reference: Scene
    text: str
    target: Scene
    modification_type: str


def make_scene(objects: Sequence[ShapeObject]) -> Scene:
    """Canonical scene from objects in any order; raises `ValueError` if two share a cell or counts are off."""
    cells = [obj.cell for obj in objects]
    if len(set(cells)) != len(cells):
        raise ValueError(f"At most one object per cell is allowed, got cells {sorted(cells)}")
    if not MIN_OBJECTS <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"A scene has {MIN_OBJECTS} to {MAX_OBJECTS} objects, got {len(objects)}")
    return tuple(sorted(objects))


def scene_key(scene: Scene) -> str:
    """Canonical string id of a scene, e.g. ``"0:small:red:circle|4:large:blue:square"``.

    Two images are the same retrieval item exactly when their keys are equal.
    """
    return "|".join(
        f"{obj.cell}:{SIZE_NAMES[obj.size]}:{COLOR_NAMES[obj.color]}:{SHAPE_NAMES[obj.shape]}" for obj in scene
    )


def parse_scene_key(key: str) -> Scene:
    """Inverse of :func:`scene_key`."""
    objects = []
    for part in key.split("|"):
        try:
            cell, size, color, shape = part.split(":")
            objects.append(
                ShapeObject(int(cell), COLOR_NAMES.index(color), SHAPE_NAMES.index(shape), SIZE_NAMES.index(size))
            )
        except ValueError as error:
            raise ValueError(
                f"Expected a scene key like '0:small:red:circle|4:large:blue:square', got {key!r}"
            ) from error
    return make_scene(objects)


def scene_split(scene: Scene, seed: int = 0) -> str:
    """The partition (``"train"``, ``"validation"`` or ``"test"``) a scene belongs to, from a stable hash."""
    digest = hashlib.blake2b(f"{seed}/{scene_key(scene)}".encode(), digest_size=8).digest()
    unit = int.from_bytes(digest, "big") / 2**64
    for split, (low, high) in SPLIT_FRACTIONS.items():
        if low <= unit < high:
            return split
    return "train"


def _matches(obj: ShapeObject, description: dict[str, int]) -> bool:
    return all(getattr(obj, field) == value for field, value in description.items())


def _description_text(obj: ShapeObject, fields: tuple[str, ...]) -> str:
    if fields == ("cell",):
        return f"object {CELL_PHRASES[obj.cell]}"
    words = []
    if "size" in fields:
        words.append(SIZE_NAMES[obj.size])
    if "color" in fields:
        words.append(COLOR_NAMES[obj.color])
    words.append(SHAPE_NAMES[obj.shape])
    return " ".join(words)


# Ways to refer to an object; a way is usable only when it matches exactly one object of the scene.
_DESCRIPTION_FIELDS: tuple[tuple[str, ...], ...] = (("size", "color", "shape"), ("color", "shape"), ("cell",))


def unambiguous_descriptions(scene: Scene, obj: ShapeObject) -> list[str]:
    """The descriptions (``"large blue square"``, ``"blue square"``, ``"object on the left"``) that pick ``obj``
    and no other object of ``scene``."""
    result = []
    for fields in _DESCRIPTION_FIELDS:
        description = {field: getattr(obj, field) for field in fields}
        if sum(_matches(other, description) for other in scene) == 1:
            result.append(_description_text(obj, fields))
    return result


def objects_matching(scene: Scene, description: str) -> list[ShapeObject]:
    """Objects of ``scene`` that a description produced by :func:`unambiguous_descriptions` refers to."""
    if description.startswith("object "):
        cell = CELL_PHRASES.index(description[len("object ") :])
        return [obj for obj in scene if obj.cell == cell]
    words = description.split()
    wanted: dict[str, int] = {"shape": SHAPE_NAMES.index(words[-1])}
    for word in words[:-1]:
        if word in SIZE_NAMES:
            wanted["size"] = SIZE_NAMES.index(word)
        elif word in COLOR_NAMES:
            wanted["color"] = COLOR_NAMES.index(word)
        else:
            raise ValueError(f"Unknown word {word!r} in object description {description!r}")
    return [obj for obj in scene if _matches(obj, wanted)]


def random_scene(rng: random.Random) -> Scene:
    """A uniformly random scene: number of objects, cells, then attributes."""
    num_objects = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    cells = rng.sample(range(9), num_objects)
    return make_scene(
        [
            ShapeObject(cell, rng.randrange(len(COLOR_NAMES)), rng.randrange(len(SHAPE_NAMES)), rng.randrange(2))
            for cell in cells
        ]
    )


def _replace(scene: Scene, old: ShapeObject, new: ShapeObject | None) -> Scene:
    objects = [obj for obj in scene if obj != old]
    if new is not None:
        objects.append(new)
    return make_scene(objects)


def random_modification(rng: random.Random, reference: Scene) -> ShapesQuery:
    """Draw one valid modification of ``reference``; the target always differs from the reference."""
    kinds = [
        kind
        for kind in MODIFICATION_TYPES
        if (kind != "add" or len(reference) < MAX_OBJECTS) and (kind != "remove" or len(reference) > MIN_OBJECTS)
    ]
    kind = rng.choice(kinds)
    if kind == "add":
        free_cells = sorted(set(range(9)) - {obj.cell for obj in reference})
        new = ShapeObject(rng.choice(free_cells), rng.randrange(len(COLOR_NAMES)), rng.randrange(3), rng.randrange(2))
        text = f"add a {new.describe()} to the {CELL_NAMES[new.cell]}"
        return ShapesQuery(reference, text, _replace(reference, new, new), kind)

    obj = rng.choice(reference)
    description = rng.choice(unambiguous_descriptions(reference, obj))
    if kind == "remove":
        return ShapesQuery(reference, f"remove the {description}", _replace(reference, obj, None), kind)
    if kind == "change_color":
        color = rng.choice([c for c in range(len(COLOR_NAMES)) if c != obj.color])
        text = f"make the {description} {COLOR_NAMES[color]}"
        return ShapesQuery(reference, text, _replace(reference, obj, obj._replace(color=color)), kind)
    if kind == "change_size":
        size = 1 - obj.size
        text = f"make the {description} {SIZE_NAMES[size]}"
        return ShapesQuery(reference, text, _replace(reference, obj, obj._replace(size=size)), kind)
    shape = rng.choice([s for s in range(len(SHAPE_NAMES)) if s != obj.shape])
    text = f"make the {description} a {SHAPE_NAMES[shape]}"
    return ShapesQuery(reference, text, _replace(reference, obj, obj._replace(shape=shape)), kind)


def _check_split(split: str) -> str:
    if split == "val":
        split = "validation"
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    return split


def generate_shapes_queries(split: str, num_queries: int, seed: int = 0) -> list[ShapesQuery]:
    """Generate ``num_queries`` queries whose reference and target scenes both lie in ``split``.

    Deterministic in (split, seed); a smaller ``num_queries`` gives a prefix of a larger one.
    """
    split = _check_split(split)
    if num_queries < 1:
        raise ValueError(f"`num_queries` must be a positive integer, got {num_queries}")
    rng = random.Random(f"mqirtn-shapes/{seed}/{split}")
    queries: list[ShapesQuery] = []
    while len(queries) < num_queries:
        reference = random_scene(rng)
        if scene_split(reference, seed) != split:
            continue
        # A few modifications per reference before drawing a new one keeps rejection cheap.
        for _ in range(8):
            query = random_modification(rng, reference)
            if scene_split(query.target, seed) == split:
                queries.append(query)
                break
    return queries


def render_scene(scene: Scene, image_size: int = 64, supersample: int = 4) -> PILImage.Image:
    """Draw a scene as an RGB image of shape (image_size, image_size).

    Drawn ``supersample`` times larger and box-reduced, so small objects keep legible edges at 64 px.
    """
    canvas = image_size * supersample
    image = PILImage.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = canvas / 3
    for obj in scene:
        row, column = divmod(obj.cell, 3)
        cx, cy = (column + 0.5) * cell, (row + 0.5) * cell
        radius = cell * (0.42 if obj.size == 1 else 0.22)
        fill = COLORS[COLOR_NAMES[obj.color]]
        shape = SHAPE_NAMES[obj.shape]
        if shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        elif shape == "square":
            half = radius * 0.88  # same visual area class as the circle
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        else:
            draw.polygon(
                [(cx, cy - radius), (cx + radius * 0.95, cy + radius * 0.8), (cx - radius * 0.95, cy + radius * 0.8)],
                fill=fill,
            )
    return image.reduce(supersample) if supersample > 1 else image


def _png_bytes(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    # Fast compression: these images are tiny and generation time matters more than disk.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("MQIRTN_CACHE"):
        return Path(os.environ["MQIRTN_CACHE"]) / "shapes"
    return Path.home() / ".cache" / "mqirtn" / "shapes"


def _build_split(split: str, num_queries: int, image_size: int, seed: int) -> tuple[Dataset, Dataset]:
    """Generate and render the queries and the gallery of one split."""
    queries = generate_shapes_queries(split, num_queries, seed)
    rendered: dict[str, bytes] = {}
    gallery_keys: list[str] = []  # first-seen order, deterministic
    columns: dict[str, list] = {name: [] for name in QUERY_FEATURES}
    for index, query in enumerate(
        tqdm(queries, desc=f"Rendering shapes/{split}", disable=num_queries < 2000, leave=False)
    ):
        keys = []
        for scene in (query.reference, query.target):
            key = scene_key(scene)
            if key not in rendered:
                rendered[key] = _png_bytes(render_scene(scene, image_size))
                gallery_keys.append(key)
            keys.append(key)
        columns["query_id"].append(f"{split}-{index}")
        columns["reference_image"].append({"bytes": rendered[keys[0]], "path": None})
        columns["modification_text"].append(query.text)
        columns["target_image"].append({"bytes": rendered[keys[1]], "path": None})
        columns["reference_id"].append(keys[0])
        columns["target_id"].append(keys[1])
        columns["modification_type"].append(query.modification_type)
    query_dataset = Dataset.from_dict(columns, features=QUERY_FEATURES)
    gallery = Dataset.from_dict(
        {"image_id": gallery_keys, "image": [{"bytes": rendered[key], "path": None} for key in gallery_keys]},
        features=GALLERY_FEATURES,
    )
    return query_dataset, gallery


def _load_or_build(
    split: str, num_queries: int | None, image_size: int, seed: int, cache_dir: str | os.PathLike | None
) -> tuple[Dataset, Dataset]:
    split = _check_split(split)
    num_queries = DEFAULT_NUM_QUERIES[split] if num_queries is None else num_queries
    if not isinstance(image_size, int) or image_size < 12:
        raise ValueError(f"`image_size` must be an integer >= 12, got {image_size!r}")
    params = {
        "version": SHAPES_VERSION,
        "split": split,
        "num_queries": num_queries,
        "image_size": image_size,
        "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    root = _cache_root(cache_dir)
    path = root / f"{split}-{digest}"
    if (path / "params.json").is_file():
        return load_from_disk(str(path / "queries")), load_from_disk(str(path / "gallery"))

    logger.info(f"Generating shapes/{split} ({num_queries} queries, {image_size}px, seed {seed}) into {path}")
    queries, gallery = _build_split(split, num_queries, image_size, seed)
    root.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder and rename, so concurrent processes (several ranks) never read half a cache.
    staging = Path(tempfile.mkdtemp(prefix=f".{split}-{digest}-", dir=root))
    try:
        queries.save_to_disk(str(staging / "queries"))
        gallery.save_to_disk(str(staging / "gallery"))
        (staging / "params.json").write_text(json.dumps(params, indent=2))
        try:
            staging.rename(path)
        except OSError:
            if not (path / "params.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return load_from_disk(str(path / "queries")), load_from_disk(str(path / "gallery"))


def load_shapes(
    split: str = "train",
    num_queries: int | None = None,
    image_size: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Load (generating and caching on first use) the queries of one shapes split.

    Args:
        split: ``"train"``, ``"validation"`` (alias ``"val"``) or ``"test"``.
        num_queries: number of queries; defaults to 20,000 / 2,000 / 5,000 for train / validation / test.
        image_size: side of the square RGB images in pixels.
        seed: generation seed; also decides which scenes belong to which split.
        cache_dir: folder of the cache; defaults to ``$MQIRTN_CACHE/shapes`` or ``~/.cache/mqirtn/shapes``.

    Returns:
        `datasets.Dataset` with one row per query and columns ``query_id`` (str), ``reference_image`` (Image,
        (image_size, image_size) RGB), ``modification_text`` (str), ``target_image`` (Image), ``reference_id`` and
        ``target_id`` (canonical scene keys, str) and ``modification_type`` (one of ``MODIFICATION_TYPES``).
    """
    return _load_or_build(split, num_queries, image_size, seed, cache_dir)[0]


def load_shapes_gallery(
    split: str = "test",
    num_queries: int | None = None,
    image_size: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """The evaluation gallery of a shapes split: every distinct scene among its queries' references and targets.

    Same arguments as :func:`load_shapes`. Returns a `datasets.Dataset` with columns ``image_id`` (canonical
    scene key, unique) and ``image`` (Image).
    """
    return _load_or_build(split, num_queries, image_size, seed, cache_dir)[1]
