"""Property tests (hypothesis) of the `index.json` reader: whatever JSON the file holds (arbitrary documents, a valid
record with one field replaced or removed), `GalleryIndex.load` loads it or raises `ValueError` with one line, never
another exception type (`KeyError`, `TypeError`, `AttributeError` reached users as tracebacks before)."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from mqirtn_app.index import GalleryIndex

from utils import write_index_json


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("props") / "index"
    embeddings = torch.nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    GalleryIndex(embeddings, ["a", "b", "c"], fingerprint="f" * 64).save(folder)
    return folder


def load_with_meta(saved: Path, meta: str | bytes) -> None:
    """Loads a copy of `saved` whose index.json is `meta`: it loads, or fails with a one-line ValueError."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "index"
        shutil.copytree(saved, folder)
        write_index_json(folder, meta)
        try:
            GalleryIndex.load(folder)
        except ValueError as error:
            assert str(error).strip() and "\n" not in str(error), repr(error)


@settings(max_examples=80, deadline=None)
@given(document=JSON)
def test_arbitrary_json_documents(saved, document):
    load_with_meta(saved, json.dumps(document))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_a_valid_record_with_one_field_replaced_or_removed(saved, data):
    meta = json.loads((saved / "index.json").read_text())
    field = data.draw(st.sampled_from(sorted(meta)))
    if data.draw(st.booleans()):
        del meta[field]
    else:
        meta[field] = data.draw(JSON)
    load_with_meta(saved, json.dumps(meta))


@settings(max_examples=40, deadline=None)
@given(raw=st.binary(max_size=64))
def test_arbitrary_bytes(saved, raw):
    load_with_meta(saved, raw)
