"""Decompression bombs (a few KB of PNG that decode to gigabytes) are unreadable images everywhere: the one decoder
checks the pixel count from the header before decoding (`MAX_IMAGE_PIXELS`), so training, evaluation, the index and
the pipeline skip and count them, or raise `ImageDecodeError`; `DecompressionBombError` never escapes."""

import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib

import pytest
from PIL import Image

from processing import processing_mqirtn
from processing.data.transforms import decode_image
from processing.processing_mqirtn import ImageDecodeError, to_rgb_image, to_rgb_image_or_none

from utils import REPO_ROOT, tiny_model, tiny_processor, write_image_folder


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width x height, all black: ~12 KB at 10000 x 10000 (+300 MB as RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bombs")
    paths = {"10k": folder / "bomb_10k.png", "30k": folder / "bomb_30k.png"}
    paths["10k"].write_bytes(bomb_png(10000, 10000))  # under PIL's own error limit: PIL alone decodes it fully
    paths["30k"].write_bytes(bomb_png(30000, 30000))  # over it: PIL alone raises DecompressionBombError
    return paths


@pytest.mark.parametrize("size", ["10k", "30k"])
def test_the_decoder_refuses_a_bomb_from_its_header(bombs, size):
    path = bombs[size]
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageDecodeError, match="pixels|exceeds limit") as error:
        to_rgb_image(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert to_rgb_image_or_none({"bytes": path.read_bytes(), "path": None}) is None
    assert decode_image({"bytes": None, "path": str(path)}) is None  # the training/evaluation transforms' decoder
    if size == "10k":  # PIL itself refuses to open the 30k one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            lazy = Image.open(path)  # a lazily opened PIL image (a decoded `datasets` cell) is checked before it loads
        with lazy:
            assert to_rgb_image_or_none(lazy) is None


def test_the_cap_is_configurable_and_a_large_jpeg_is_decoded_reduced(monkeypatch, tmp_path):
    Image.new("RGB", (200, 160), (10, 20, 30)).save(tmp_path / "big.jpg")
    Image.new("RGB", (200, 160), (10, 20, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(processing_mqirtn, "MAX_IMAGE_PIXELS", 100 * 80)
    assert to_rgb_image(str(tmp_path / "big.jpg")).size == (100, 80)  # decoded at 1/2 scale by PIL's draft
    with pytest.raises(ImageDecodeError, match="more than the cap of 8000"):
        to_rgb_image(str(tmp_path / "big.png"))
    monkeypatch.setattr(processing_mqirtn, "MAX_IMAGE_PIXELS", None)
    assert to_rgb_image(str(tmp_path / "big.png")).size == (200, 160)


def test_the_index_and_the_pipeline_treat_a_bomb_as_unreadable(bombs, tmp_path):
    from transformers import pipeline

    from mqirtn_app.index import GalleryIndex

    write_image_folder(tmp_path / "images", 3, nested=False)
    (tmp_path / "images" / "bomb.png").write_bytes(bombs["10k"].read_bytes())
    model, processor = tiny_model().eval(), tiny_processor(tmp_path)
    index = GalleryIndex.from_folder(model, processor, tmp_path / "images", progress=False)
    assert len(index) == 3 and len(index.skipped) == 1 and "bomb.png" in index.skipped[0]
    pipe = pipeline("composed-image-retrieval", model=model, processor=processor)
    with pytest.raises(ImageDecodeError, match="more than the cap"):
        pipe(image=str(bombs["10k"]), text="make it red", gallery=index, top_k=2)


RSS_CHILD = textwrap.dedent(
    """
    import resource, sys
    from processing.processing_mqirtn import to_rgb_image_or_none
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = [to_rgb_image_or_none(path) for path in sys.argv[1:]]
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(sum(r is None for r in results), grown_mb)
    """
)


@pytest.mark.slow
def test_decoding_bombs_keeps_memory_bounded(bombs):
    """Four bombs (48 KB of files): before, +1.2 GB peak as RGB; now they are refused from their headers."""
    paths = [str(bombs["10k"])] * 3 + [str(bombs["30k"])]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, *paths], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    skipped, grown_mb = completed.stdout.split()
    assert int(skipped) == 4 and float(grown_mb) < 20, completed.stdout
