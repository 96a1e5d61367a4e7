"""A user's own files (`--dataset files`) that are not what the loader expects give a `ValueError` naming the file and
row, never an AttributeError/TypeError or a silent conversion: a byte-order mark is accepted, latin-1 is named, rows
that are not objects, paths or texts that are not strings, an empty file; a symlink loop is a missing image. Also the
item-10 leftovers of the index and the decoder: ids leading out of a folder index's root, 16-bit numpy arrays."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mqirtn_app.index import GalleryIndex
from processing.data.loaders import load_evaluation_data, load_training_queries
from processing.processing_mqirtn import to_rgb_image


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture
def images(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / name)
    return tmp_path


def test_a_byte_order_mark_is_accepted(images):
    (images / "train.csv").write_bytes("\ufeffreference,text,target\na.png,make it red,b.png\n".encode("utf-8"))
    assert list(load_training_queries("files", images, "train")["modification_text"]) == ["make it red"]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        (
            "train.csv",
            "reference,text,target\na.png,caf\xe9,b.png\n".encode("latin-1"),
            r"is not UTF-8 text \(byte \d+ is b'\\xe9'\)",
        ),
        ("train.jsonl", b'["a.png", "x", "b.png"]\n', r"train.jsonl row 1: expected an object of columns"),
        (
            "train.jsonl",
            b'{"reference": "a.png", "text": 5, "target": "b.png"}\n',
            r"row 1: `text` must be a string, got 5",
        ),
        (
            "train.jsonl",
            b'{"reference": ["a.png"], "text": "x", "target": "b.png"}\n',
            r"row 1: `reference` must be a string",
        ),
        ("train.jsonl", b"\n\n", r"train.jsonl holds no rows"),
        ("train.csv", b"reference,text,target\n", r"train.csv holds no rows"),
        ("train.csv", b"reference,text,target\na.png,x,b.png,extra\n", r"row 1: more fields than the header"),
        ("train.json", b'[{"reference": "a.png", "text": "x", "target": "b.png"}, 3]', r"row 2: expected an object"),
    ],
)
def test_malformed_own_files_name_the_file_and_row(images, name, content, expected):
    (images / name).write_bytes(content)
    with pytest.raises(ValueError, match=expected):
        load_training_queries("files", images, "train")


def test_a_symlink_loop_is_a_missing_image(images, caplog):
    os.symlink(images / "loop", images / "loop")
    (images / "test.jsonl").write_text(
        json.dumps({"reference": "a.png", "text": "x", "target": "b.png", "id": 1})
        + "\n"
        + json.dumps({"reference": "loop", "text": "y", "target": "b.png", "id": 2})
    )
    data = load_evaluation_data("files", images, "test")
    assert data.unusable_query_ids == {"2"} and len(data.queries) == 2


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.dictionaries(st.sampled_from(["reference", "text", "target", "id", "other"]),
                                     st.none() | st.booleans() | st.integers() | st.text(max_size=6)
                                     | st.lists(st.integers(), max_size=2), max_size=5), max_size=4))  # fmt: skip
def test_any_jsonl_loads_or_is_one_value_error(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("prop")
    (folder / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    try:
        load_training_queries("files", folder, "train", check_images="none")
    except (ValueError, FileNotFoundError) as error:
        assert str(error).strip()


def test_grid_paths_never_leave_a_folder_index_root(tmp_path):
    (tmp_path / "gallery").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "gallery" / "in.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    index = GalleryIndex(
        torch.eye(3), ["in.png", "../secret.png", str(tmp_path / "secret.png")], root=tmp_path / "gallery"
    )
    assert index.image_path(0) == tmp_path / "gallery" / "in.png"
    assert index.image_path(1) is None and index.image_path(2) is None


def test_16_bit_arrays_are_scaled_by_their_peak_not_clipped():
    array = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    assert np.asarray(to_rgb_image(array))[..., 0].tolist() == [[0, 63], [127, 255]]
    small = np.array([[0, 128], [255, 10]], dtype=np.int64)  # integers within 0..255 are pixel values as they are
    assert np.asarray(to_rgb_image(small))[..., 0].tolist() == [[0, 128], [255, 10]]
