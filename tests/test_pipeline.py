"""ComposedImageRetrievalPipeline: call forms, equality with direct model calls, remote-code loading in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import pipeline

from modeling_mqirtn import ComposedImageRetrievalPipeline, save_for_hub
from modeling_mqirtn.search_mqirtn import exact_search
from mqirtn_app.index import GalleryIndex, ModelMismatchError

from utils import BLOCK_OUR_PACKAGES, shape_image, tiny_model, tiny_processor


TEXTS = ["make it red", "add a small blue circle", "remove the large square", "it", "make the circle green"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    model, processor = tiny_model(), tiny_processor(folder)
    gallery_images = [shape_image(i) for i in range(20)]
    with torch.no_grad():
        gallery = model.get_image_features(pixel_values=processor(images=gallery_images)["pixel_values"]).pooler_output
    pipe = pipeline("composed-image-retrieval", model=model, processor=processor)
    return {"folder": folder, "model": model, "processor": processor, "gallery": gallery, "pipe": pipe}


def direct_queries(model, processor, images, texts):
    with torch.no_grad():
        return model.get_query_features(**processor(images=images, text=texts)).pooler_output


def direct_topk(model, processor, images, texts, gallery, k):
    scores, indices = (direct_queries(model, processor, images, texts) @ gallery.T).topk(k, dim=1)
    return scores, indices


def test_task_is_registered_on_import(setup):
    assert isinstance(setup["pipe"], ComposedImageRetrievalPipeline)


def test_single_call_equals_direct_model_calls(setup):
    model, processor, gallery, pipe = setup["model"], setup["processor"], setup["gallery"], setup["pipe"]
    image = shape_image(100)
    results = pipe(image=image, text="make it red", gallery=gallery, top_k=5)
    scores, indices = direct_topk(model, processor, [image], ["make it red"], gallery, 5)
    assert [r["index"] for r in results] == indices[0].tolist()
    assert [r["id"] for r in results] == [str(i) for i in indices[0].tolist()]
    torch.testing.assert_close(torch.tensor([r["score"] for r in results]), scores[0], atol=1e-5, rtol=0)
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:]))  # best first


def test_without_gallery_returns_normalised_query_embedding(setup):
    model, processor, pipe = setup["model"], setup["processor"], setup["pipe"]
    image = shape_image(7)
    as_list = pipe(image=image, text="add a small blue circle")
    assert isinstance(as_list, list) and len(as_list) == model.config.projection_dim and isinstance(as_list[0], float)
    embedding = pipe(image=image, text="add a small blue circle", return_tensors=True)
    assert embedding.shape == (model.config.projection_dim,) and embedding.tolist() == as_list
    torch.testing.assert_close(embedding.norm(), torch.tensor(1.0))
    torch.testing.assert_close(embedding, direct_queries(model, processor, [image], ["add a small blue circle"])[0])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_batched_list_input_equals_direct_batch(setup, batch_size):
    model, processor, gallery, pipe = setup["model"], setup["processor"], setup["gallery"], setup["pipe"]
    images = [shape_image(50 + i) for i in range(len(TEXTS))]
    # Texts of different lengths: the pipeline pads per batch, the direct call pads to the longest overall.
    results = pipe(
        [{"image": i, "text": t} for i, t in zip(images, TEXTS)], gallery=gallery, top_k=3, batch_size=batch_size
    )
    scores, indices = direct_topk(model, processor, images, TEXTS, gallery, 3)
    assert len(results) == len(TEXTS)
    for row, result in enumerate(results):
        assert [r["index"] for r in result] == indices[row].tolist()
        torch.testing.assert_close(torch.tensor([r["score"] for r in result]), scores[row], atol=1e-5, rtol=0)
    # The keyword list form gives the same answers; without a gallery, one embedding per query.
    assert pipe(image=images, text=TEXTS, gallery=gallery, top_k=3, batch_size=batch_size) == results
    embeddings = torch.stack(pipe(image=images, text=TEXTS, batch_size=batch_size, return_tensors=True))
    assert torch.tensor(pipe(image=images, text=TEXTS, batch_size=batch_size)).tolist() == embeddings.tolist()
    torch.testing.assert_close(embeddings, direct_queries(model, processor, images, TEXTS), atol=1e-5, rtol=0)


def test_gallery_index_and_path_inputs(setup, tmp_path):
    model, processor, pipe = setup["model"], setup["processor"], setup["pipe"]
    images = [shape_image(i) for i in range(8)]
    index = GalleryIndex.from_images(model, processor, images, [f"item-{i}" for i in range(8)], progress=False)
    path = tmp_path / "query.png"
    shape_image(3).save(path)
    results = pipe(image=str(path), text="make it red", gallery=index, top_k=4)
    scores, indices = direct_topk(model, processor, [shape_image(3)], ["make it red"], index.embeddings, 4)
    assert [r["id"] for r in results] == [f"item-{i}" for i in indices[0].tolist()]
    torch.testing.assert_close(torch.tensor([r["score"] for r in results]), scores[0], atol=1e-5, rtol=0)
    # top_k larger than the gallery: every image once.
    assert sorted(r["index"] for r in pipe(image=images[0], text="it", gallery=index, top_k=50)) == list(range(8))
    # An index built with another checkpoint is refused.
    other = GalleryIndex.from_images(tiny_model(seed=5), processor, images, progress=False)
    with pytest.raises(ModelMismatchError, match="another checkpoint"):
        pipe(image=images[0], text="it", gallery=other)


def test_invalid_arguments(setup):
    pipe, gallery = setup["pipe"], setup["gallery"]
    image = shape_image(1)
    with pytest.raises(ValueError, match="top_k"):
        pipe(image=image, text="it", gallery=gallery, top_k=0)
    with pytest.raises(ValueError, match="'image' and 'text'"):
        pipe({"img": image, "text": "it"})
    with pytest.raises(ValueError, match=r"\(gallery_size, 32\)"):
        pipe(image=image, text="it", gallery=torch.randn(5, 7))
    with pytest.raises(ValueError, match="same length"):
        pipe(image=[image, image], text=["it"])
    with pytest.raises(ValueError, match="image=. and .text="):
        pipe(image=image)


def test_exact_search_in_blocks_equals_full_topk():
    torch.manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(1000, 16), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(23, 16), dim=-1)
    scores, indices = exact_search(queries, gallery, 10, block_size=37, query_batch_size=7)
    expected_scores, expected_indices = (queries @ gallery.T).topk(10, dim=1)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores)


def test_embed_gallery_equals_image_features_in_any_batch_size(setup):
    model, processor, gallery, pipe = setup["model"], setup["processor"], setup["gallery"], setup["pipe"]
    images = [shape_image(i) for i in range(20)]
    for batch_size in (1, 7, 32):
        embeds = pipe.embed_gallery(images, batch_size=batch_size)
        assert embeds.shape == (20, model.config.projection_dim) and embeds.dtype == torch.float32
        torch.testing.assert_close(embeds, gallery, atol=1e-5, rtol=0)
    image = shape_image(100)
    hits = pipe(image=image, text="make it red", gallery=pipe.embed_gallery(images), top_k=4)
    assert [r["index"] for r in hits] == direct_topk(model, processor, [image], ["make it red"], gallery, 4)[1][
        0
    ].tolist()


@pytest.mark.parametrize(
    "images, batch_size, error, match",
    [
        ("a.png", 8, TypeError, "must be a list of images"),
        ([], 8, ValueError, "is empty"),
        ([None], 8, ValueError, "images"),
        (["missing.png"], 0, ValueError, "`batch_size` must be a positive integer"),
    ],
)
def test_embed_gallery_refuses_bad_input(setup, images, batch_size, error, match):
    with pytest.raises(error, match=match):
        setup["pipe"].embed_gallery(images, batch_size=batch_size)


def test_pipeline_save_pretrained_writes_the_processor_too(setup, tmp_path):
    setup["pipe"].save_pretrained(tmp_path / "saved")
    files = {path.name for path in (tmp_path / "saved").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "pipeline_mqirtn.py",
        "processor_config.json",
        "processing_mqirtn.py",
    } <= files
    reloaded = pipeline("composed-image-retrieval", model=str(tmp_path / "saved"), trust_remote_code=True)
    image = shape_image(3)
    torch.testing.assert_close(
        reloaded(image=image, text="make it red", return_tensors=True),
        setup["pipe"](image=image, text="make it red", return_tensors=True),
    )


def test_return_tensors_is_checked(setup):
    with pytest.raises(TypeError, match="`return_tensors` must be True or False"):
        setup["pipe"](image=shape_image(1), text="it", return_tensors="pt")
    with pytest.raises(ValueError, match="applies to query embeddings"):
        setup["pipe"](image=shape_image(1), text="it", gallery=setup["gallery"], return_tensors=True)


FRESH_PROCESS_SCRIPT = BLOCK_OUR_PACKAGES + textwrap.dedent(
    """
    import importlib, json, sys
    from pathlib import Path
    import torch
    from PIL import Image
    from transformers import pipeline

    for name in ("modeling_mqirtn", "processing"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        raise AssertionError(f"{name} is importable in the Hub-user process")
    folder, images_folder, texts, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    pipe = pipeline("composed-image-retrieval", model=folder, trust_remote_code=True)
    images = [Image.open(f"{images_folder}/query_{i}.png") for i in range(len(texts))]
    gallery = torch.load(f"{images_folder}/gallery.pt", weights_only=True)
    # The gallery built the Hub user's way: file paths through the pipeline's own embedding path.
    gallery_files = sorted(Path(images_folder).glob("gallery_*.png"))
    own_gallery = pipe.embed_gallery([str(path) for path in gallery_files], batch_size=3)
    own_hits = pipe(image=images[0], text=texts[0], gallery=own_gallery, top_k=3)
    single = pipe(image=images[0], text=texts[0], gallery=gallery, top_k=3)
    batched = pipe([{"image": i, "text": t} for i, t in zip(images, texts)], gallery=gallery, top_k=3, batch_size=2)
    embedding = pipe(image=images[0], text=texts[0])
    json.dump({"single": single, "batched": batched, "embedding": embedding,
               "own_gallery": own_gallery.tolist(), "own_hits": own_hits,
               "class": type(pipe).__module__, "model_class": type(pipe.model).__module__}, open(out, "w"))
    """
)


@pytest.mark.slow
def test_fresh_process_trust_remote_code_equals_direct(setup, tmp_path):
    model, processor, gallery = setup["model"], setup["processor"], setup["gallery"]
    folder = save_for_hub(model, processor, tmp_path / "saved")
    assert (folder / "pipeline_mqirtn.py").is_file()
    assert "composed-image-retrieval" in json.loads((folder / "config.json").read_text())["custom_pipelines"]
    images = [shape_image(200 + i) for i in range(3)]
    for i, image in enumerate(images):
        image.save(tmp_path / f"query_{i}.png")
    torch.save(gallery, tmp_path / "gallery.pt")
    for i in range(8):
        shape_image(i).save(tmp_path / f"gallery_{i}.png")
    script, out, elsewhere = tmp_path / "run.py", tmp_path / "out.json", tmp_path / "cwd"
    script.write_text(FRESH_PROCESS_SCRIPT)
    elsewhere.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    texts = TEXTS[:3]
    completed = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path), json.dumps(texts), str(out)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["class"].startswith("transformers_modules") and result["model_class"].startswith(
        "transformers_modules"
    )

    # Direct calls on the PNG round trip of the same images (what the subprocess read).
    from PIL import Image

    reloaded = [Image.open(tmp_path / f"query_{i}.png") for i in range(3)]
    scores, indices = direct_topk(model, processor, reloaded, texts, gallery, 3)
    assert [r["index"] for r in result["single"]] == indices[0].tolist()
    for row, hits in enumerate(result["batched"]):
        assert [r["index"] for r in hits] == indices[row].tolist()
        torch.testing.assert_close(torch.tensor([r["score"] for r in hits]), scores[row], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.tensor(result["embedding"]),
        direct_queries(model, processor, reloaded[:1], texts[:1])[0],
        atol=1e-5,
        rtol=0,
    )
    # The gallery the child embedded from files equals the direct gallery embeddings of the same files, and searching
    # it gives the direct ranking.
    gallery_images = [Image.open(tmp_path / f"gallery_{i}.png") for i in range(8)]
    with torch.no_grad():
        own_pixels = processor(images=gallery_images)["pixel_values"]
        own_gallery = model.get_image_features(pixel_values=own_pixels).pooler_output
    torch.testing.assert_close(torch.tensor(result["own_gallery"]), own_gallery, atol=1e-5, rtol=0)
    _, own_indices = direct_topk(model, processor, reloaded[:1], texts[:1], own_gallery, 3)
    assert [r["index"] for r in result["own_hits"]] == own_indices[0].tolist()


def test_image_feature_extraction_pipeline_gives_the_gallery_embeddings(setup):
    """The model card's tag: `get_image_features(...).pooler_output` per image (batched or not), its token states with
    `pool=False`; a saved folder serves it through `trust_remote_code` (tests/test_remote_code.py)."""
    from modeling_mqirtn import MQIRTNImageFeatureExtractionPipeline

    model, processor, gallery = setup["model"], setup["processor"], setup["gallery"]
    extractor = pipeline(
        "image-feature-extraction",
        model=model,
        processor=processor,
        pipeline_class=MQIRTNImageFeatureExtractionPipeline,
    )
    images = [shape_image(i) for i in range(3)]
    as_list = extractor(images[0])
    assert len(as_list) == 1 and len(as_list[0]) == model.config.projection_dim
    torch.testing.assert_close(torch.tensor(as_list), gallery[:1], atol=1e-5, rtol=0)
    batched = extractor(images, batch_size=2, return_tensors=True)
    torch.testing.assert_close(torch.cat(batched), gallery[:3], atol=1e-5, rtol=0)
    tokens = extractor(images[0], pool=False, return_tensors=True)
    assert tokens.shape == (1, 1 + (32 // 8) ** 2, model.config.vision_config.hidden_size)
    with pytest.raises(TypeError, match="unexpected arguments"):
        extractor(images[0], top_k=3)
