"""What the running demo serves over HTTP: only indexed images (checked files under the index's folder), never a file
of the server named by an edited index, a `../` id, a link leading out of the folder or a non-image file; and an
edited `index.json` (its `root`) is refused at start."""

import importlib.util
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from utils import REPO_ROOT, shape_image, tiny_model, tiny_processor


def _load_module(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


app = _load_module("mqirtn_demo_app", REPO_ROOT / "demo" / "app.py")
browser = _load_module("mqirtn_demo_browser", REPO_ROOT / "demo" / "browser.py")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def crafted(tmp_path):
    """A gallery folder with a secret text file, a text file named like an image and a link to an image outside it;
    an image outside the folder; an index whose ids name the outside image in three ways."""
    from mqirtn_app.index import GalleryIndex

    model, processor = tiny_model().eval(), tiny_processor(tmp_path)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for i in range(6):
        shape_image(i).save(gallery / f"g{i:02d}.png")
    outside = tmp_path / "outside.png"
    shape_image(40).save(outside)
    (gallery / "secret.txt").write_text("api-token-123")
    (gallery / "fake.png").write_text("api-token-456, named like an image")
    (gallery / "link.png").symlink_to(outside)
    built = GalleryIndex.from_folder(model, processor, gallery, progress=False)
    rows = {id_: row for row, id_ in enumerate(built.ids)}
    ids = ["g00.png", "g01.png", "../outside.png", str(outside), "link.png", "fake.png", "secret.txt"]
    embeddings = built.embeddings[
        [rows[name] for name in ("g00.png", "g01.png", "g02.png", "g03.png", "g04.png", "g05.png", "link.png")]
    ]
    index = GalleryIndex(
        embeddings, ids, fingerprint=built.fingerprint, root=gallery, model=model, processor=processor
    )
    return model, processor, index, gallery, outside


def test_only_checked_images_are_served(crafted, tmp_path):
    """The page's result images: the indexed files under the folder, copied; everything else a placeholder tile."""
    model, processor, index, gallery, outside = crafted
    search = app.CompositionalSearch(model, processor, index, served_dir=tmp_path / "served")
    served = {index.ids[row]: search.servable_file(row) for row in range(len(index))}
    assert served == {
        "g00.png": gallery.resolve() / "g00.png",
        "g01.png": gallery.resolve() / "g01.png",
        "../outside.png": None,
        str(outside): None,
        "link.png": None,
        "fake.png": None,
        "secret.txt": None,
    }
    copy = Path(search.gallery_image(0))
    assert copy.parent == tmp_path / "served" and copy.read_bytes() == (gallery / "g00.png").read_bytes()
    assert all(not isinstance(search.gallery_image(row), str) for row in range(2, len(index)))  # the placeholder
    assert app.allowed_paths([]) == []  # the gallery folder is never given to the web server


@pytest.mark.slow
def test_running_demo_serves_no_file_outside_the_indexed_images(crafted, tmp_path):
    """A real server and real HTTP requests: the file route refuses the folder's files and the outside image; a search
    through the API returns the indexed images' bytes and placeholders for the crafted ids."""
    from gradio_client import Client, handle_file
    from PIL import Image

    model, processor, index, gallery, outside = crafted
    search = app.CompositionalSearch(model, processor, index, served_dir=tmp_path / "served")
    demo = app.build_demo(search, model_name="tiny", gallery_description="crafted")
    port = browser.free_port()
    demo.launch(**app.launch_options("127.0.0.1", port, []))
    try:
        base = f"http://127.0.0.1:{port}"
        for target in (
            gallery / "secret.txt",
            gallery / "fake.png",
            gallery / "g00.png",
            outside,
            gallery / "link.png",
            Path("/etc/passwd"),
            gallery / ".." / "outside.png",
        ):
            status, body = _get(f"{base}/gradio_api/file={urllib.parse.quote(str(target))}")
            assert status == 403 and b"api-token" not in body, (target, status)

        client = Client(base, verbose=False, download_files=str(tmp_path / "downloads"), httpx_kwargs={"timeout": 60})
        try:
            results, status = client.predict(
                handle_file(str(gallery / "g03.png")), "make it red", len(index), api_name="/search"
            )
        finally:
            client.close()
        assert status.startswith(f"Top {len(index)} of {len(index)} images"), status
        shown = {app.parse_caption(item["caption"])[2]: Path(item["image"]) for item in results}
        assert set(shown) == set(index.ids)
        for id_ in ("g00.png", "g01.png"):
            assert shown[id_].read_bytes() == (gallery / id_).read_bytes()
        outside_pixels = Image.open(outside).convert("RGB").tobytes()
        for id_ in ("../outside.png", str(outside), "link.png", "fake.png", "secret.txt"):
            picture = Image.open(shown[id_]).convert("RGB")
            assert picture.size == (96, 96) and picture.tobytes() != outside_pixels  # the 'missing' tile
            assert b"api-token" not in shown[id_].read_bytes()
    finally:
        demo.close()


def test_edited_root_in_index_json_is_refused_at_start(tmp_path, capsys):
    """`root` edited to "/" after the save: the demo refuses the index (one line) instead of serving from there."""
    from modeling_mqirtn.pipeline_mqirtn import save_for_hub
    from mqirtn_app.index import GalleryIndex

    model = tiny_model().eval()
    model_dir = save_for_hub(model, tiny_processor(tmp_path), tmp_path / "model")
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for i in range(3):
        shape_image(i).save(gallery / f"g{i}.png")
    GalleryIndex.from_folder(model, tiny_processor(tmp_path), gallery, progress=False).save(tmp_path / "index")
    meta_path = tmp_path / "index" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["root"] = "/"
    meta_path.write_text(json.dumps(meta))
    assert app.main(["--model", str(model_dir), "--gallery", str(tmp_path / "index")]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("demo/app.py: error:")]
    assert len(lines) == 1 and "the index was edited" in lines[0], lines
    with pytest.raises(ValueError, match="the index was edited"):
        GalleryIndex.load(tmp_path / "index")


# ---------------------------------------------------------------------------------------------------- queries
@pytest.fixture
def small(tmp_path):
    from mqirtn_app.index import GalleryIndex

    model, processor = tiny_model().eval(), tiny_processor(tmp_path)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for i in range(6):
        shape_image(i).save(gallery / f"g{i:02d}.png")
    index = GalleryIndex.from_folder(model, processor, gallery, progress=False)
    return model, processor, index, gallery


def test_each_bad_query_gets_its_own_line_and_spares_the_good_ones(small, tmp_path):
    """One batch mixing bad top_k, bad text types, an over-budget image, an oversized data: URL and a long text with
    good queries: every bad one gets its own line, the good ones their results, in one forward pass."""
    import base64
    import io

    from PIL import Image

    model, processor, index, gallery = small
    big = tmp_path / "big.png"
    Image.new("I;16", (3000, 3000)).save(big)  # 9 M pixels, 30 KB of file
    search = app.CompositionalSearch(model, processor, index, served_dir=tmp_path / "served", max_pixels=4_000_000)
    good = {"path": str(gallery / "g01.png"), "name": "g01.png"}
    buffer = io.BytesIO()
    shape_image(2).save(buffer, format="PNG")
    pasted = app.decode_data_url("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    oversized = app.decode_data_url("data:image/png;base64," + "A" * (app.MAX_UPLOAD_BYTES // 3 * 4 + 8))
    long_text = " ".join(["make it much redder than before"] * 40)  # 200 words: more than the tower's positions
    queries = [
        (good, "make it red", "abc"),
        (good, "make it red", [3]),
        (good, "make it red", 1e308),
        (good, ["make", "it"], 3),
        (good, 12, 3),
        ({"path": str(big), "name": "big.png"}, "make it red", 3),
        (oversized, "make it red", 3),
        (pasted, "make it red", 2),
        (good, long_text, 4),
        (good, "make it red", 3.0),
        (good, "make it red", float("inf")),
        (good, "make it red", True),
    ]
    calls = []
    original = model.get_query_features

    def counting(**inputs):
        calls.append(inputs["pixel_values"].shape[0])
        return original(**inputs)

    model.get_query_features = counting
    galleries, statuses = search(*map(list, zip(*queries)))
    model.get_query_features = original
    assert calls == [4]  # the four good queries, together
    assert statuses[0] == f"**Error:** Top k must be a whole number from 1 to {app.MAX_TOP_K}, got 'abc'."
    assert statuses[1].startswith("**Error:** Top k must be a whole number") and galleries[1] is None
    assert len(galleries[2]) == len(index)  # 1e308: a number, clamped
    assert statuses[3] == "**Error:** The modification text must be text, got list."
    assert statuses[4] == "**Error:** The modification text must be text, got int."
    assert statuses[5] == (
        "**Error:** “big.png” is 3000 x 3000 pixels; this demo takes at most 4,000,000 pixels "
        "per image. Upload a smaller image."
    )
    assert statuses[6] == "**Error:** The pasted image is larger than 50 MB."
    assert len(galleries[7]) == 2 and statuses[7].startswith("Top 2 of")
    assert len(galleries[8]) == 4 and statuses[8].startswith("Top 4 of")  # the long text, truncated
    assert len(galleries[9]) == 3
    assert statuses[10].startswith("**Error:** Top k") and statuses[11].startswith("**Error:** Top k")
    assert all("\n" not in status for status in statuses)


def test_long_text_is_truncated_with_a_warning_in_the_pipeline(small, caplog):
    """A text longer than the text tower's positions (a tokenizer without a length cap): truncated, with a warning,
    and ranked like its first tokens."""
    import logging

    from transformers import pipeline

    model, processor, index, gallery = small
    limit = model.config.text_config.max_position_embeddings
    assert processor.tokenizer.model_max_length > 10**6  # no cap of its own
    pipe = pipeline("composed-image-retrieval", model=model, processor=processor)
    words = " ".join(["red"] * (limit + 30))
    with caplog.at_level(logging.WARNING):
        hits = pipe(image=str(gallery / "g00.png"), text=words, gallery=index, top_k=3)
    assert f"more than the model's {limit}: it was truncated" in caplog.text
    cut = processor.tokenizer.decode(processor.tokenizer(words)["input_ids"][1 : limit - 1])
    assert [h["id"] for h in hits] == [
        h["id"] for h in pipe(image=str(gallery / "g00.png"), text=cut, gallery=index, top_k=3)
    ]


def test_cache_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    from modeling_mqirtn.pipeline_mqirtn import save_for_hub

    model_dir = save_for_hub(tiny_model().eval(), tiny_processor(tmp_path), tmp_path / "model")
    (tmp_path / "gallery").mkdir()
    shape_image(0).save(tmp_path / "gallery" / "g.png")
    (tmp_path / "cache").write_text("a file")
    argv = ["--model", str(model_dir), "--gallery", str(tmp_path / "gallery"), "--cache-dir", str(tmp_path / "cache")]
    assert app.main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("demo/app.py: error:")]
    assert len(lines) == 1 and "--cache-dir" in lines[0] and "is a file" in lines[0], lines
