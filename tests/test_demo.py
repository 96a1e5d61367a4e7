"""The web demo (`demo/app.py`): its query function (one forward pass per batch, the pipeline's ranking, errors as
messages), the gallery cache, the shapes default, the command line, and, marked slow, the served page in headless
Chromium (Playwright) and its API through `gradio_client`.

The browser test needs Playwright (the `dev` extra) and the system Chromium (`apt-get install -y chromium`, which
`scripts/test.sh` runs as root): without them it fails, it does not skip.
"""

import importlib.util
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from utils import REPO_ROOT, shape_image, tiny_model, tiny_processor


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


app = _load_module("mqirtn_demo_app", REPO_ROOT / "demo" / "app.py")
browser = _load_module("mqirtn_demo_browser", REPO_ROOT / "demo" / "browser.py")

GALLERY_SIZE = 12
TEXTS = ["make it red", "add a small blue circle to the left", "remove the square"]


def write_gallery(folder: Path, count: int = GALLERY_SIZE) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"g{i:02d}.png"
        shape_image(i).save(path)
        paths.append(path)
    return paths


def pipeline_ids(pipe, index, image, text: str, top_k: int) -> list[str]:
    """The reference ranking: `pipeline("composed-image-retrieval")` over the index, one query."""
    return [hit["id"] for hit in pipe(image=str(image), text=text, gallery=index, top_k=top_k)]


@pytest.fixture
def setup(tmp_path):
    """A tiny model, its processor, a 12-image gallery folder and its index."""
    from transformers import pipeline

    from mqirtn_app.index import GalleryIndex

    model, processor = tiny_model().eval(), tiny_processor(tmp_path)
    paths = write_gallery(tmp_path / "gallery")
    index = GalleryIndex.from_folder(model, processor, tmp_path / "gallery", progress=False)
    pipe = pipeline("composed-image-retrieval", model=model, processor=processor)
    return model, processor, index, pipe, paths


# ------------------------------------------------------------------------------------------------ the query function
def test_batch_is_one_forward_pass_with_the_pipelines_ranking(setup):
    model, processor, index, pipe, paths = setup
    search = app.CompositionalSearch(model, processor, index)
    calls = []
    original = model.get_query_features

    def counting(**inputs):
        calls.append(inputs["pixel_values"].shape[0])
        return original(**inputs)

    model.get_query_features = counting
    references = [{"path": str(paths[i]), "name": paths[i].name} for i in (1, 4, 7)]
    galleries, statuses = search(references, TEXTS, [3, 5, 2])
    assert calls == [3]  # three queries, one forward pass of batch 3
    model.get_query_features = original
    for reference, text, k, gallery, status in zip(references, TEXTS, [3, 5, 2], galleries, statuses):
        parsed = [app.parse_caption(caption) for _, caption in gallery]
        assert [rank for rank, _, _ in parsed] == list(range(1, k + 1))
        assert [id_ for _, _, id_ in parsed] == pipeline_ids(pipe, index, reference["path"], text, k)
        expected = pipe(image=reference["path"], text=text, gallery=index, top_k=k)
        assert [score for _, score, _ in parsed] == pytest.approx([hit["score"] for hit in expected], abs=1e-3)
        # The images shown: copies of the indexed files.
        assert [Path(image).read_bytes() for image, _ in gallery] == [
            (Path(index.root) / id_).read_bytes() for _, _, id_ in parsed
        ]
        attention = search.attention(reference, text)  # the page's follow-up event
        assert isinstance(attention, Image.Image) and attention.width > 300
        assert f"Top {k} of {GALLERY_SIZE} images in" in status and "shared by 3 queries" in status


def test_query_errors_are_one_line_messages_and_spare_the_other_queries(setup, tmp_path):
    model, processor, index, pipe, paths = setup
    search = app.CompositionalSearch(model, processor, index)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is not an image")
    references = [
        None,
        {"path": str(not_an_image), "name": "notes.png"},
        {"path": str(paths[0]), "name": "g00.png"},
        {"path": str(paths[2]), "name": "g02.png"},
        {"bytes": b"\x89PNG broken", "name": "the pasted image"},
    ]
    texts = ["make it red", "make it red", "   ", "make it red", "make it red"]
    galleries, statuses = search(references, texts, [4] * 5)
    assert statuses[0] == "**Error:** Upload a reference image (or click an example) first."
    assert statuses[1].startswith("**Error:** Could not read “notes.png” as an image")
    assert str(tmp_path) not in statuses[1]  # no server paths on the page
    assert statuses[2].startswith("**Error:** Type a modification text")
    assert statuses[4].startswith("**Error:** Could not read “the pasted image” as an image")
    assert all("\n" not in status for status in statuses)
    assert [galleries[i] for i in (0, 1, 2, 4)] == [None] * 4
    assert [search.attention(reference, text) for reference, text in zip(references, texts)][:3] == [None] * 3
    assert [app.parse_caption(c)[2] for _, c in galleries[3]] == pipeline_ids(pipe, index, paths[2], "make it red", 4)
    assert search.last_batch_size == 1  # only the valid query reached the model


def test_empty_gallery_and_model_mismatch_are_messages(setup, tmp_path):
    from mqirtn_app.index import GalleryIndex

    model, processor, index, pipe, paths = setup
    reference = {"path": str(paths[0]), "name": "g00.png"}
    empty = GalleryIndex(torch.empty((0, model.config.projection_dim)), [], fingerprint=index.fingerprint)
    galleries, statuses = app.CompositionalSearch(model, processor, empty)([reference], ["make it red"], [5])
    assert galleries == [None] and statuses == ["**Error:** The gallery is empty: there is nothing to search."]

    other = tiny_model(seed=1).eval()  # same architecture, other weights
    galleries, statuses = app.CompositionalSearch(other, processor, index)(
        [reference] * 2, ["make it red"] * 2, [5, 3]
    )
    assert galleries == [None, None]
    assert all(
        s.startswith("**Error:** ModelMismatchError: this gallery index was built with another checkpoint")
        for s in statuses
    )


def test_example_queries_say_where_their_known_target_ranked(setup):
    model, processor, index, pipe, paths = setup
    expected = pipeline_ids(pipe, index, paths[1], "make it red", 4)
    known = {("g01.png", "make it red"): expected[2], ("g02.png", "make it red"): "g99.png"}
    search = app.CompositionalSearch(model, processor, index, known_targets=known)
    _, statuses = search([str(paths[1]), str(paths[2]), str(paths[3])], ["make it red"] * 3, [4] * 3)
    assert statuses[0].endswith(f"The example's known target {expected[2]} is **#3**.")
    assert statuses[1].endswith("The example's known target g99.png is not in the top 4.")
    assert "known target" not in statuses[2]


def test_results_of_an_index_without_a_folder_are_decoded_images(setup, tmp_path):
    """An index built from paths (no folder root): the page gets the images themselves, or a 'missing' tile."""
    from mqirtn_app.index import GalleryIndex

    model, processor, _, _, _ = setup
    files = write_gallery(tmp_path / "loose", 3)
    index = GalleryIndex.from_images(model, processor, [str(f) for f in files], progress=False)
    files[1].unlink()
    (gallery,), _ = app.CompositionalSearch(model, processor, index)([str(files[0])], ["make it red"], [3])
    images = {app.parse_caption(caption)[2]: image for image, caption in gallery}
    assert all(isinstance(image, Image.Image) for image in images.values())
    assert images[str(files[0])].tobytes() == Image.open(files[0]).convert("RGB").tobytes()
    assert images[str(files[1])].size == (96, 96)  # the placeholder


def test_top_k_is_clamped_to_the_gallery(setup):
    model, processor, index, pipe, paths = setup
    galleries, statuses = app.CompositionalSearch(model, processor, index)([str(paths[3])], ["make it red"], [500.0])
    assert len(galleries[0]) == GALLERY_SIZE and f"Top {GALLERY_SIZE} of {GALLERY_SIZE}" in statuses[0]


# ---------------------------------------------------------------------------------------------------- galleries
def test_folder_index_is_cached_by_model_and_folder_content(setup, tmp_path, caplog):
    model, processor, index, pipe, paths = setup
    folder, cache = tmp_path / "gallery", tmp_path / "cache"
    first, from_cache = app.cached_folder_index(model, processor, folder, cache, progress=False)
    assert not from_cache and first.ids == index.ids
    second, from_cache = app.cached_folder_index(model, processor, folder, cache, progress=False)
    assert from_cache and second.ids == index.ids and torch.equal(second.embeddings, first.embeddings)
    assert second.image_path(0) == paths[0]

    shape_image(99).save(folder / "new.png")  # the folder changed: indexed again, under another key
    third, from_cache = app.cached_folder_index(model, processor, folder, cache, progress=False)
    assert not from_cache and "new.png" in third.ids and len(list(cache.iterdir())) == 2

    other = tiny_model(seed=1).eval()  # another checkpoint: another key
    _, from_cache = app.cached_folder_index(other, processor, folder, cache, progress=False)
    assert not from_cache and len(list(cache.iterdir())) == 3

    # A damaged cached index is rebuilt, with a warning.
    key_dir = next(
        d
        for d in cache.iterdir()
        if (d / "index" / "index.json").is_file()
        and "new.png" in (d / "index" / "index.json").read_text()
        and d.name.startswith(third.fingerprint[:16])
    )
    (key_dir / "index" / "embeddings.safetensors").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="mqirtn.demo"):
        rebuilt, from_cache = app.cached_folder_index(model, processor, folder, cache, progress=False)
    assert not from_cache and rebuilt.ids == third.ids and "is unusable" in caplog.text


def test_shapes_default_gallery_and_examples(tmp_path, monkeypatch):
    from processing.data.shapes import MODIFICATION_TYPES, load_shapes, load_shapes_gallery

    monkeypatch.setenv("MQIRTN_CACHE", str(tmp_path / "cache"))
    folder, examples = app.shapes_test_gallery(tmp_path / "demo", image_size=32, num_queries=40, num_examples=7)
    gallery = load_shapes_gallery("test", 40, 32)
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{i:05d}.png" for i in range(len(gallery))]
    assert Image.open(folder / "00003.png").tobytes() == gallery[3]["image"].tobytes()
    assert len(examples) == 7
    queries = load_shapes("test", 40, 32)
    texts = set(queries["modification_text"])
    kinds = {queries[queries["modification_text"].index(text)]["modification_type"] for _, text, _ in examples}
    assert len(kinds) == min(7, len({*queries["modification_type"]})) and kinds <= set(MODIFICATION_TYPES)
    for reference, text, target in examples:
        assert Path(reference).is_file() and text in texts and (folder / target).is_file()
    # Written once: a second call reuses the folder.
    stamp = (folder / "00000.png").stat().st_mtime_ns
    assert app.shapes_test_gallery(tmp_path / "demo", 32, 40, num_examples=7) == (folder, examples)
    assert (folder / "00000.png").stat().st_mtime_ns == stamp


def test_space_layout_matches_the_package():
    """demo/ is a Space: its README's metadata names app.py and the gradio of the `demo` extra; its requirements are
    the package's own."""
    from setuptools.config.setupcfg import read_configuration

    options = read_configuration(str(REPO_ROOT / "setup.cfg"))["options"]
    readme = (REPO_ROOT / "demo" / "README.md").read_text()
    front = readme.split("---\n")[1]
    metadata = dict(line.split(": ", 1) for line in front.strip().splitlines())
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py"
    (demo_extra,) = options["extras_require"]["demo"]
    assert demo_extra.startswith(f"gradio>={metadata['sdk_version'].rsplit('.', 1)[0]}")
    assert set(options["extras_require"]["demo"]) <= set(options["extras_require"]["dev"])
    assert {"gradio_client>=2.7", "playwright>=1.50"} <= set(options["extras_require"]["dev"])
    requirements = [
        line
        for line in (REPO_ROOT / "demo" / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert requirements == options["install_requires"]


# ---------------------------------------------------------------------------------------------------- command line
@pytest.fixture
def saved_model(tmp_path):
    from modeling_mqirtn.pipeline_mqirtn import save_for_hub

    return save_for_hub(tiny_model().eval(), tiny_processor(tmp_path), tmp_path / "model")


def _run_main(argv, capsys):
    status = app.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("demo/app.py: error:")]
    return status, lines


def test_command_line_errors_are_one_line(saved_model, tmp_path, capsys, monkeypatch):
    from mqirtn_app.index import GalleryIndex

    gallery = tmp_path / "gallery"
    write_gallery(gallery, 3)
    monkeypatch.setattr(app, "DEFAULT_MODEL", tmp_path / "outputs" / "mqirtn-shapes")
    monkeypatch.delenv("MQIRTN_DEMO_MODEL", raising=False)
    cases = [
        ([], "is not there: run bash scripts/main.sh first, or pass --model"),
        (["--model", str(tmp_path / "nope")], f"--model '{tmp_path / 'nope'}' is not a model folder"),
        (["--model", str(saved_model), "--gallery", str(tmp_path / "missing")], "does not exist"),
        (["--model", str(saved_model), "--gallery", str(gallery / "g00.png")], "is a file"),
        (["--model", str(saved_model), "--gallery", str(tmp_path / "model")], "no image files"),
        (["--model", str(saved_model), "--max-batch-size", "0"], "--max-batch-size must be between 1 and 256"),
    ]
    for argv, expected in cases:
        status, lines = _run_main(argv, capsys)
        assert status == 1 and len(lines) == 1 and expected in lines[0], (argv, lines)

    # An index of another checkpoint: refused at start, naming both.
    other = tiny_model(seed=1).eval()
    index = GalleryIndex.from_folder(other, tiny_processor(tmp_path), gallery, progress=False)
    index.save(tmp_path / "other.index")
    status, lines = _run_main(["--model", str(saved_model), "--gallery", str(tmp_path / "other.index")], capsys)
    assert status == 1 and len(lines) == 1
    assert "does not fit --model" in lines[0] and "built with another checkpoint" in lines[0]


def test_main_serves_on_loopback_without_share(saved_model, tmp_path, monkeypatch):
    """`main` up to `launch`: loopback, no share tunnel, the batched queue, the gallery folder not served as such."""
    import gradio as gr

    gallery = tmp_path / "gallery"
    write_gallery(gallery, 4)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    launched = {}

    def fake_launch(self, **kwargs):
        launched.update(kwargs, blocks=self)

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: launched.update(blocked=True))
    status = app.main(
        [
            "--model",
            str(saved_model),
            "--gallery",
            str(gallery),
            "--cache-dir",
            str(tmp_path / "c"),
            "--no-progress",
            "--max-batch-size",
            "6",
        ]
    )
    assert status == 0 and launched["blocked"] and launched["prevent_thread_lock"]
    assert launched["server_name"] == "127.0.0.1" and launched["share"] is False and launched["server_port"] == 7860
    assert launched["allowed_paths"] == []  # result images reach the page as copies of checked files
    blocks = launched["blocks"]
    (search,) = [fn for fn in blocks.fns.values() if fn.api_name == "search"]
    assert search.batch and search.max_batch_size == 6 and search.concurrency_limit == 1
    (attention,) = [fn for fn in blocks.fns.values() if fn.api_name == "attention"]
    assert not attention.batch and attention.concurrency_id == search.concurrency_id  # the model: one at a time
    assert blocks._queue is not None
    assert not (REPO_ROOT / "demo" / "app.pyi").exists()  # Gradio writes stubs beside files defining components


# ---------------------------------------------------------------------------------------------------- served (slow)
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo served in a subprocess over a tiny saved model and a 12-PNG gallery; stopped at the end."""
    from modeling_mqirtn.pipeline_mqirtn import save_for_hub

    root = tmp_path_factory.mktemp("demo")
    model_dir = save_for_hub(tiny_model().eval(), tiny_processor(root), root / "model")
    paths = write_gallery(root / "gallery")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        MQIRTN_CACHE=str(root / "cache"),
        GRADIO_TEMP_DIR=str(root / "gradio"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO_ROOT),
    )
    server = browser.DemoServer(
        ["--model", str(model_dir), "--gallery", str(root / "gallery"), "--no-progress"],
        root / "server.log",
        env=env,
        timeout=240,
    )
    server.start()
    try:
        yield server, root, model_dir, paths
    finally:
        server.stop()
    assert server.process.poll() is not None


@pytest.fixture(scope="module")
def reference_pipeline(served):
    """The pipeline and index a user would build from the served model folder, for the expected rankings."""
    from transformers import AutoModel, AutoProcessor, pipeline

    import modeling_mqirtn  # noqa: F401  (registers the Auto classes and the task)
    from mqirtn_app.index import GalleryIndex

    _, root, model_dir, _ = served
    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    index = GalleryIndex.from_folder(model, processor, root / "gallery", progress=False)
    return pipeline("composed-image-retrieval", model=model, processor=processor), index


def _artefact(path: Path) -> None:
    if os.environ.get("MQIRTN_ARTIFACTS"):
        target = Path(os.environ["MQIRTN_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)


@pytest.mark.slow
def test_browser_query_shows_the_pipelines_ranking_and_errors(served, reference_pipeline, tmp_path):
    from playwright.sync_api import sync_playwright  # the dev extra: missing -> this test fails

    browser.chromium_executable()  # missing -> FileNotFoundError: the test fails, with how to install it
    server, root, _, paths = served
    pipe, index = reference_pipeline
    not_an_image = tmp_path / "holiday.png"
    not_an_image.write_text("this is not an image, whatever its name says")
    started = time.monotonic()
    with sync_playwright() as playwright:
        chromium = browser.launch_browser(playwright)
        try:
            page = browser.open_page(chromium, server.url, timeout_ms=60_000)
            k, text = 5, "make it red"
            browser.set_query(page, paths[3], text, k)
            seconds = browser.submit(page, expected=k)
            captions = browser.result_captions(page)
            assert [app.parse_caption(c)[2] for c in captions] == pipeline_ids(pipe, index, paths[3], text, k)
            assert [app.parse_caption(c)[0] for c in captions] == list(range(1, k + 1))
            assert f"Top {k} of {GALLERY_SIZE} images in" in browser.status_text(page)
            browser.wait_for_attention(page)  # the attention picture follows the results
            assert page.locator("#attention img").count() == 1
            screenshot = tmp_path / "demo_page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            _artefact(screenshot)
            assert seconds < 30

            # A file that is not an image: a message on the page, no results, and the server serves on.
            browser.set_query(page, not_an_image, text, k)
            browser.submit(page, expected=0)
            assert "Could not read “holiday.png” as an image" in browser.status_text(page)
            assert browser.result_captions(page) == []
            assert "Traceback" not in page.content()
            browser.set_query(page, paths[8], "add a small blue circle", 3)
            browser.submit(page, expected=3)
            assert [app.parse_caption(c)[2] for c in browser.result_captions(page)] == pipeline_ids(
                pipe, index, paths[8], "add a small blue circle", 3
            )
            assert server.answers()
        finally:
            chromium.close()
    assert time.monotonic() - started < 180
    assert server.process.poll() is None and "Traceback" not in server.log()


@pytest.mark.slow
def test_api_query_through_gradio_client(served, reference_pipeline):
    from gradio_client import Client, handle_file

    server, _, _, paths = served
    pipe, index = reference_pipeline
    client = Client(server.url, verbose=False, httpx_kwargs={"timeout": 60})
    job = client.submit(handle_file(str(paths[3])), "make it red", 5, api_name="/search")
    gallery, status = job.result(timeout=60)
    ids = [app.parse_caption(item["caption"])[2] for item in gallery]
    assert ids == pipeline_ids(pipe, index, paths[3], "make it red", 5)
    attention = client.predict(handle_file(str(paths[3])), "make it red", api_name="/attention")
    assert Path(attention).is_file() and Image.open(attention).width > 300
    assert status.startswith("Top 5 of 12 images in")
    # Several queries at once: answered in batches, each with its own ranking.
    jobs = [client.submit(handle_file(str(paths[i])), TEXTS[i % 3], 3, api_name="/search") for i in range(6)]
    for i, job in enumerate(jobs):
        gallery, _ = job.result(timeout=60)
        ids = [app.parse_caption(item["caption"])[2] for item in gallery]
        assert ids == pipeline_ids(pipe, index, paths[i], TEXTS[i % 3], 3)
