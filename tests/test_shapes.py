"""The built-in shapes benchmark: semantics of the texts, determinism, disjoint splits, gallery, rendering, cache."""

import re
import time

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from processing.data.loaders import CIREvaluationData, load_evaluation_data, load_training_queries
from processing.data.metrics import evaluate_protocol
from processing.data.shapes import (
    BACKGROUND,
    CELL_NAMES,
    CELL_PHRASES,
    COLOR_NAMES,
    COLORS,
    SHAPE_NAMES,
    SIZE_NAMES,
    ShapeObject,
    generate_shapes_queries,
    load_shapes,
    load_shapes_gallery,
    make_scene,
    parse_scene_key,
    render_scene,
    scene_key,
    scene_split,
)


def find(scene, description):
    """Objects of `scene` matching a text description, written independently of the generator."""
    location = re.fullmatch(r"object (.+)", description)
    if location:
        return [obj for obj in scene if CELL_PHRASES[obj.cell] == location.group(1)]
    *adjectives, shape = description.split()
    return [
        obj
        for obj in scene
        if SHAPE_NAMES[obj.shape] == shape
        and all(word in (SIZE_NAMES[obj.size], COLOR_NAMES[obj.color]) for word in adjectives)
    ]


def apply_text(reference, text):
    """Interpret a modification text on a scene; asserts the referred object is unambiguous."""
    added = re.fullmatch(r"add a (small|large) (\w+) (\w+) to the (.+)", text)
    if added:
        size, color, shape, cell = added.groups()
        cell_index = CELL_NAMES.index(cell)
        assert cell_index not in {obj.cell for obj in reference}, text
        new = ShapeObject(cell_index, COLOR_NAMES.index(color), SHAPE_NAMES.index(shape), SIZE_NAMES.index(size))
        return make_scene(list(reference) + [new])
    removed = re.fullmatch(r"remove the (.+)", text)
    if removed:
        (obj,) = find(reference, removed.group(1))  # exactly one match
        return make_scene([o for o in reference if o != obj])
    changed = re.fullmatch(r"make the (.+?) (?:a (circle|square|triangle)|(small|large)|(\w+))", text)
    assert changed, text
    description, shape, size, color = changed.groups()
    (obj,) = find(reference, description)
    if shape:
        new = obj._replace(shape=SHAPE_NAMES.index(shape))
    elif size:
        new = obj._replace(size=SIZE_NAMES.index(size))
    else:
        new = obj._replace(color=COLOR_NAMES.index(color))
    return make_scene([o for o in reference if o != obj] + [new])


@pytest.fixture(scope="module")
def generated():
    return {split: generate_shapes_queries(split, 1500, seed=0) for split in ("train", "validation", "test")}


def test_texts_describe_the_modification_exactly(generated):
    kinds = set()
    for query in generated["train"]:
        assert apply_text(query.reference, query.text) == query.target, query.text
        assert query.target != query.reference
        kinds.add(query.modification_type)
    assert kinds == {"add", "remove", "change_color", "change_size", "change_shape"}


def test_remove_and_change_descriptions_are_unambiguous(generated):
    seen_descriptions = set()
    for query in generated["train"]:
        if query.modification_type == "add":
            continue
        match = re.fullmatch(r"remove the (.+)", query.text) or re.fullmatch(
            r"make the (.+?) (?:a \w+|\w+)", query.text
        )
        description = match.group(1)
        assert len(find(query.reference, description)) == 1, query.text
        seen_descriptions.add(len(description.split()))
    # full, colour+shape and location descriptions all occur
    assert {2, 3} <= seen_descriptions


def test_scene_counts_and_cells(generated):
    sizes = set()
    for query in generated["test"]:
        for scene in (query.reference, query.target):
            assert 1 <= len(scene) <= 5
            assert len({obj.cell for obj in scene}) == len(scene)
            assert parse_scene_key(scene_key(scene)) == scene
            sizes.add(len(scene))
    assert sizes == {1, 2, 3, 4, 5}


def test_determinism_and_prefix():
    first = generate_shapes_queries("train", 300, seed=7)
    assert first == generate_shapes_queries("train", 300, seed=7)
    assert first[:100] == generate_shapes_queries("train", 100, seed=7)
    assert first != generate_shapes_queries("train", 300, seed=8)


def test_splits_share_no_scene(generated):
    scenes = {
        split: {scene_key(s) for q in queries for s in (q.reference, q.target)} for split, queries in generated.items()
    }
    assert not scenes["train"] & scenes["test"]
    assert not scenes["train"] & scenes["validation"]
    assert not scenes["validation"] & scenes["test"]
    for split, queries in generated.items():
        assert all(scene_split(q.reference) == split and scene_split(q.target) == split for q in queries)


def test_rendering_is_legible():
    scene = make_scene([ShapeObject(0, 0, 1, 1), ShapeObject(4, 5, 0, 0), ShapeObject(8, 3, 2, 1)])
    image = render_scene(scene, 64)
    assert image.size == (64, 64) and image.mode == "RGB"
    # centres of large square (red, top left) and small circle (blue, middle) carry their colours
    assert image.getpixel((10, 10)) == COLORS["red"]
    assert image.getpixel((32, 32)) == COLORS["blue"]
    assert image.getpixel((53, 10)) == BACKGROUND  # empty top right
    # a small and a large object of the same kind differ in area
    small = render_scene(make_scene([ShapeObject(4, 3, 1, 0)]), 64)
    large = render_scene(make_scene([ShapeObject(4, 3, 1, 1)]), 64)

    def count(img):
        return int((np.asarray(img) != np.array(BACKGROUND)).any(axis=-1).sum())

    assert count(large) > 2.5 * count(small)


def test_load_shapes_schema_cache_and_gallery(tmp_path, monkeypatch):
    monkeypatch.setenv("MQIRTN_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    queries = load_shapes("test", num_queries=200, image_size=32, seed=1)
    build = time.perf_counter() - start
    assert list((tmp_path / "cache" / "shapes").iterdir()), "cache written under $MQIRTN_CACHE/shapes"
    start = time.perf_counter()
    again = load_shapes("test", num_queries=200, image_size=32, seed=1)
    assert time.perf_counter() - start < max(build, 0.5)
    assert list(again["target_id"]) == list(queries["target_id"])

    assert queries.column_names == [
        "query_id", "reference_image", "modification_text", "target_image", "reference_id", "target_id", "modification_type",
    ]  # fmt: skip
    row = queries[0]
    assert isinstance(row["reference_image"], PILImage.Image) and row["reference_image"].size == (32, 32)
    assert (
        row["target_image"].convert("RGB").tobytes() == render_scene(parse_scene_key(row["target_id"]), 32).tobytes()
    )

    gallery = load_shapes_gallery("test", num_queries=200, image_size=32, seed=1)
    gallery_ids = list(gallery["image_id"])
    assert len(gallery_ids) == len(set(gallery_ids))
    assert set(gallery_ids) == set(queries["reference_id"]) | set(queries["target_id"])

    # explicit cache_dir wins over the environment
    load_shapes("validation", num_queries=20, image_size=32, cache_dir=tmp_path / "explicit")
    assert list((tmp_path / "explicit").iterdir())


def test_shapes_through_the_entry_point_and_protocol(tmp_path):
    data = load_evaluation_data("shapes", split="test", num_queries=150, image_size=32, cache_dir=tmp_path)
    assert isinstance(data, CIREvaluationData) and data.protocol == "shapes"
    assert "target_image" not in data.queries.column_names
    gallery_ids = list(data.gallery["image_id"])
    index = {key: i for i, key in enumerate(gallery_ids)}
    gallery_embeds = torch.eye(len(gallery_ids))
    # an oracle (query = its target's embedding) scores 100; the reference itself is never the answer
    oracle = gallery_embeds[[index[t] for t in data.queries["target_id"]]]
    assert evaluate_protocol("shapes", oracle, gallery_embeds, data.queries, data.gallery) == {
        "recall@1": 100.0, "recall@5": 100.0, "recall@10": 100.0, "recall@50": 100.0,
    }  # fmt: skip
    reference_only = gallery_embeds[[index[r] for r in data.queries["reference_id"]]]
    assert evaluate_protocol("shapes", reference_only, gallery_embeds, data.queries, data.gallery, ks=(1,)) == {
        "recall@1": 0.0
    }
    train = load_training_queries("shapes", split="train", num_queries=50, image_size=32, cache_dir=tmp_path)
    assert train.column_names[1:4] == ["reference_image", "modification_text", "target_image"]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="split"):
        load_shapes("dev", num_queries=10)
    with pytest.raises(ValueError, match="num_queries"):
        generate_shapes_queries("train", 0)
    with pytest.raises(ValueError, match="image_size"):
        load_shapes("train", num_queries=10, image_size=4)
    with pytest.raises(ValueError, match="one object per cell"):
        make_scene([ShapeObject(0, 0, 0, 0), ShapeObject(0, 1, 1, 1)])


def test_sample_grid_png(tmp_path):
    """A reference | target grid of 12 queries, written under tmp_path (open it for a visual check): every tile is a
    rendered scene on the background with at least one object, and each target differs from its reference."""
    queries = generate_shapes_queries("test", 12, seed=0)
    separator = (128, 128, 128)
    grid = PILImage.new("RGB", (6 * 68, 4 * 68), separator)
    for i, query in enumerate(queries):
        row, column = divmod(i, 3)
        grid.paste(render_scene(query.reference, 64), (column * 136, row * 68))
        grid.paste(render_scene(query.target, 64), (column * 136 + 66, row * 68))
    path = tmp_path / "shapes_grid.png"
    grid.save(path)
    pixels = np.asarray(PILImage.open(path).convert("RGB"))
    assert (pixels == np.asarray(grid)).all(), "the PNG round trip is lossless"
    assert tuple(pixels[0, 64]) == separator and tuple(pixels[66, 0]) == separator
    for i in range(len(queries)):
        row, column = divmod(i, 3)
        reference = pixels[row * 68 : row * 68 + 64, column * 136 : column * 136 + 64]
        target = pixels[row * 68 : row * 68 + 64, column * 136 + 66 : column * 136 + 130]
        for tile in (reference, target):
            assert tuple(tile[0, 0]) == BACKGROUND
            assert (tile != BACKGROUND).any(axis=-1).mean() > 0.01, "at least one object is drawn"
        assert (reference != target).any(), f"query {i}: the modification changed nothing"
