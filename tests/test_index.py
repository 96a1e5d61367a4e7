"""GalleryIndex: building (list, folder, dataset), unreadable files, add, save/load, model checks, exact vs FAISS,
and the 2-rank sharded embedding."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.testing_utils import CaptureLogger

from modeling_mqirtn import save_for_hub
from mqirtn_app import index as gallery_index
from mqirtn_app.index import GalleryIndex, ModelMismatchError, model_fingerprint

from utils import shape_image, tiny_model, write_image_folder, write_index_json


REPO_ROOT = Path(__file__).resolve().parent.parent


def image_features(model, processor, images):
    with torch.no_grad():
        return model.get_image_features(pixel_values=processor(images=images)["pixel_values"]).pooler_output


def random_gallery(count=2000, dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Clustered like real embeddings (uniform random points make every neighbour equally far).
    centers = torch.randn(40, dim, generator=generator)
    points = centers[torch.randint(0, 40, (count,), generator=generator)] + 0.3 * torch.randn(
        count, dim, generator=generator
    )
    return torch.nn.functional.normalize(points, dim=-1)


def test_from_images_skips_unreadable_and_matches_direct_embeddings(model, processor, tmp_path):
    paths = write_image_folder(tmp_path / "images", 7, nested=False)
    corrupt = tmp_path / "images" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    missing = tmp_path / "images" / "missing.png"
    items = [paths[0], corrupt, *paths[1:4], missing, *paths[4:]]
    with CaptureLogger(gallery_index.logger) as captured:
        index = GalleryIndex.from_images(model, processor, items, batch_size=3, progress=False)
    assert "Skipped 2 unreadable image(s) of 9" in captured.out
    assert "corrupt.jpg" in captured.out and "missing.png" in captured.out
    assert len(index.skipped) == 2 and len(index) == 7
    assert index.ids == [str(p) for p in paths]
    expected = image_features(model, processor, [Image.open(p) for p in paths])  # JPEG is lossy: the decoded files
    torch.testing.assert_close(index.embeddings, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(index.embeddings.norm(dim=-1), torch.ones(7))


def test_from_folder_is_recursive_with_relative_ids(model, processor, tmp_path):
    write_image_folder(tmp_path / "gallery", 6)
    (tmp_path / "gallery" / "notes.txt").write_text("not an image")
    (tmp_path / "gallery" / "sub" / "UPPER.PNG").write_bytes((tmp_path / "gallery" / "img_000.jpg").read_bytes())
    index = GalleryIndex.from_folder(model, processor, tmp_path / "gallery", progress=False)
    assert index.ids == sorted(
        [
            "img_000.jpg",
            "img_002.png",
            "img_004.png",
            "sub/img_001.png",
            "sub/img_003.jpg",
            "sub/img_005.png",
            "sub/UPPER.PNG",
        ]
    )
    assert (
        index.image_path(index.ids.index("sub/img_003.jpg"))
        == (tmp_path / "gallery" / "sub" / "img_003.jpg").resolve()
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GalleryIndex.from_folder(model, processor, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        GalleryIndex.from_folder(model, processor, tmp_path / "empty")


def test_from_dataset_decodes_per_row_and_skips_corrupt_rows(model, processor):
    import io

    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    def png(i):
        buffer = io.BytesIO()
        shape_image(i).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    rows = {"image": [png(0), png(1), {"bytes": b"broken", "path": None}, png(3)], "name": ["a", "b", "c", "d"]}
    dataset = Dataset.from_dict(rows, features=Features({"image": ImageFeature(), "name": Value("string")}))
    index = GalleryIndex.from_dataset(model, processor, dataset, id_column="name", batch_size=2, progress=False)
    assert index.ids == ["a", "b", "d"] and len(index.skipped) == 1
    expected = image_features(model, processor, [shape_image(i) for i in (0, 1, 3)])
    torch.testing.assert_close(index.embeddings, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="`id_column` 'nope'"):
        GalleryIndex.from_dataset(model, processor, dataset, id_column="nope")


def test_add_save_load_round_trip(model, processor, tmp_path):
    images = [shape_image(i) for i in range(10)]
    index = GalleryIndex.from_images(model, processor, images[:6], [f"g{i}" for i in range(6)], progress=False)
    assert index.add(images[6:], [f"g{i}" for i in range(6, 10)], progress=False) == 4
    assert len(index) == 10 and index.ids[-1] == "g9"
    torch.testing.assert_close(index.embeddings, image_features(model, processor, images), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="duplicate gallery id 'g3'"):
        index.add([images[0]], ["g3"], progress=False)

    index.save(tmp_path / "index")
    assert sorted(os.listdir(tmp_path / "index")) == ["embeddings.safetensors", "index.json", "index.json.sha256"]
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["fingerprint"] == model_fingerprint(model) and meta["projection_dim"] == 32

    loaded = GalleryIndex.load(tmp_path / "index", model=model, processor=processor)
    assert loaded.ids == index.ids and loaded.fingerprint == index.fingerprint
    assert torch.equal(loaded.embeddings, index.embeddings)
    queries = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    for a, b in zip(loaded.search(queries, 4), index.search(queries, 4)):
        assert torch.equal(a, b)
    loaded.add([shape_image(99)], ["new"], progress=False)  # a loaded index with its model attached can grow
    assert loaded.ids[-1] == "new" and len(loaded) == 11
    with pytest.raises(FileNotFoundError, match="is not a gallery index"):
        GalleryIndex.load(tmp_path)


def test_refuses_another_model(model, processor, tmp_path):
    index = GalleryIndex.from_images(model, processor, [shape_image(i) for i in range(4)], progress=False)
    index.save(tmp_path / "index")
    with pytest.raises(ModelMismatchError, match="another checkpoint"):
        GalleryIndex.load(tmp_path / "index", model=tiny_model(seed=1))
    with pytest.raises(ModelMismatchError, match="projection_dim 32.*projection_dim 16"):
        index.check_model(tiny_model(projection_dim=16, fusion_num_heads=4))
    # The fingerprint follows in-place weight updates (an optimizer step) and ignores nothing else.
    trained = tiny_model()
    assert model_fingerprint(trained) == index.fingerprint
    with torch.no_grad():
        trained.image_projection.bias.add_(1e-3)
    assert model_fingerprint(trained) != index.fingerprint
    with pytest.raises(ModelMismatchError):
        index.check_model(trained)


def test_exact_search_is_blocked_and_matches_faiss_flat():
    gallery = random_gallery()
    queries = random_gallery(50, seed=1)
    index = GalleryIndex(gallery, [f"id{i}" for i in range(len(gallery))])
    expected_scores, expected_indices = (queries @ gallery.T).topk(10, dim=1)
    scores, indices = index.search(queries, 10, block_size=128)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores)

    flat = GalleryIndex(gallery, index.ids, backend="faiss-flat")
    flat_scores, flat_indices = flat.search(queries, 10)
    assert (flat_indices == expected_indices).float().mean() > 0.99  # equal up to float ties
    torch.testing.assert_close(flat_scores, expected_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_backends_recall_against_exact(backend, capsys):
    gallery = random_gallery()
    queries = random_gallery(100, seed=2)
    _, exact = GalleryIndex(gallery, range(len(gallery))).search(queries, 10)
    _, approximate = GalleryIndex(gallery, range(len(gallery)), backend=backend).search(queries, 10)
    recall = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approximate, exact)) / exact.numel()
    with capsys.disabled():
        print(f"\n{backend}: recall@10 vs exact = {recall:.3f} (2000 x 32 clustered random gallery, 100 queries)")
    assert recall > 0.5  # reported, not asserted equal: approximate by design


def test_ivf_trains_on_a_sample_of_a_large_gallery(monkeypatch):
    faiss = pytest.importorskip("faiss")
    trained_on = []
    original_train = faiss.IndexIVFFlat.train
    monkeypatch.setattr(
        faiss.IndexIVFFlat, "train", lambda self, x: trained_on.append(len(x)) or original_train(self, x)
    )
    gallery = random_gallery(4000)
    queries = random_gallery(50, seed=2)
    _, exact = GalleryIndex(gallery, range(len(gallery))).search(queries, 10)
    sampled = GalleryIndex(gallery, range(len(gallery)), backend="faiss-ivf", backend_options={"train_size": 2000})
    _, approximate = sampled.search(queries, 10)
    nlist = min(int(4 * 4000**0.5), 4000 // 39)
    assert (
        trained_on == [max(2000, 39 * nlist)] and sampled._faiss_index.ntotal == 4000
    )  # trained on a sample, holds all
    recall = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approximate, exact)) / exact.numel()
    assert recall > 0.5


def test_missing_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    index = GalleryIndex(random_gallery(50), range(50), backend="faiss-hnsw")
    with pytest.raises(ImportError, match="'faiss-hnsw' backend needs FAISS.*pip install faiss-cpu"):
        index.search(random_gallery(2, seed=3), 5)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        GalleryIndex(random_gallery(5), range(5), backend="annoy")


@pytest.mark.slow
def test_two_rank_sharded_embedding_equals_single_process(model, processor, tmp_path):
    """`mqirtn index` under torchrun with 2 gloo CPU ranks: each rank embeds a shard, rank 0 writes the merged index
    (and builds + saves its FAISS index)."""
    folder = save_for_hub(model, processor, tmp_path / "model")
    images = tmp_path / "images"
    write_image_folder(images, 9)  # odd: uneven shards
    (images / "broken.png").write_bytes(b"not a png")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "mqirtn_app.cli", "index", "--model", str(folder), "--images", str(images),
        "--out", str(tmp_path / "sharded"), "--batch-size", "2", "--no-progress", "--backend", "faiss-flat",
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("Indexed 9 images") == 1 and "embedded by 2 processes" in completed.stdout

    sharded = GalleryIndex.load(tmp_path / "sharded")
    single = GalleryIndex.from_folder(model, processor, images, batch_size=4, progress=False)
    assert sharded.ids == single.ids and len(sharded.skipped) == 1
    assert sharded._faiss_index is not None and sharded._faiss_index.ntotal == 9  # the saved FAISS index, read back
    assert not (tmp_path / "sharded" / "faiss.index.partial").exists()
    torch.testing.assert_close(sharded.embeddings, single.embeddings, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- saved FAISS
def record_builds(monkeypatch):
    """Records the backend of every FAISS build (`_build_faiss` call) and the size of every IVF k-means training."""
    faiss = pytest.importorskip("faiss")
    builds, trainings = [], []
    original_build, original_train = gallery_index._build_faiss, faiss.IndexIVFFlat.train
    monkeypatch.setattr(
        gallery_index, "_build_faiss", lambda backend, *a: builds.append(backend) or original_build(backend, *a)
    )
    monkeypatch.setattr(
        faiss.IndexIVFFlat, "train", lambda self, x: trainings.append(len(x)) or original_train(self, x)
    )
    return builds, trainings


@pytest.mark.parametrize(
    "backend, options, knob",
    [("faiss-ivf", {"nprobe": 3}, lambda i: i.nprobe == 3), ("faiss-hnsw", {"ef_search": 20}, lambda i: i.hnsw.efSearch == 20),
     ("faiss-flat", {}, lambda i: True)],
    ids=["faiss-ivf", "faiss-hnsw", "faiss-flat"],
)  # fmt: skip
def test_faiss_index_is_saved_and_loaded_without_rebuilding(backend, options, knob, monkeypatch, tmp_path):
    builds, trainings = record_builds(monkeypatch)
    gallery, queries = random_gallery(), random_gallery(50, seed=4)
    index = GalleryIndex(gallery, [f"id{i}" for i in range(len(gallery))], backend=backend, backend_options=options)
    index.save(tmp_path / "index")  # builds the FAISS index: no search has yet
    assert builds == [backend] and len(trainings) == (backend == "faiss-ivf")
    assert sorted(os.listdir(tmp_path / "index")) == [
        "embeddings.safetensors",
        "faiss.index",
        "index.json",
        "index.json.sha256",
    ]
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["faiss"] == {"file": "faiss.index", "backend": backend, "backend_options": options, "ntotal": 2000, "dim": 32,
                             "embeddings_sha256": meta["files"]["embeddings.safetensors"]}  # fmt: skip
    expected = index.search(queries, 10)
    assert builds == [backend]  # the save's build serves the search

    with CaptureLogger(gallery_index.logger) as captured:
        loaded = GalleryIndex.load(tmp_path / "index")
    assert captured.out == "" and loaded._faiss_index is not None and knob(loaded._faiss_index)
    assert loaded._faiss_index.ntotal == 2000
    for a, b in zip(loaded.search(queries, 10), expected):
        assert torch.equal(a, b)
    assert builds == [backend] and len(trainings) == (backend == "faiss-ivf")  # nothing re-trained or rebuilt
    loaded.save(tmp_path / "copy")  # saving a loaded index writes the read FAISS index as it is
    assert builds == [backend]
    for a, b in zip(GalleryIndex.load(tmp_path / "copy").search(queries, 10), expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["count", "options", "no_record", "missing", "garbage", "other_vectors"])
def test_stale_or_corrupt_faiss_file_is_rebuilt_with_a_warning(damage, monkeypatch, tmp_path):
    builds, _ = record_builds(monkeypatch)
    gallery, queries = random_gallery(), random_gallery(50, seed=4)
    index = GalleryIndex(gallery, range(len(gallery)), backend="faiss-ivf")
    index.save(tmp_path / "index")
    expected = index.search(queries, 10)
    meta_path, faiss_path = tmp_path / "index" / "index.json", tmp_path / "index" / "faiss.index"
    meta = json.loads(meta_path.read_text())
    if damage == "count":
        meta["faiss"]["ntotal"] = 1999
    elif damage == "options":
        meta["backend_options"] = {"nprobe": 2}  # edited by hand after the save: the file was built for {}
    elif damage == "no_record":
        del meta["faiss"]  # as written before FAISS indexes were saved
    elif damage == "missing":
        faiss_path.unlink()
    elif damage == "garbage":
        faiss_path.write_bytes(b"this is not a FAISS index" * 10)
    elif damage == "other_vectors":  # a valid FAISS file of another gallery, the JSON untouched
        GalleryIndex(gallery[:500], range(500), backend="faiss-ivf").save(tmp_path / "small")
        faiss_path.write_bytes((tmp_path / "small" / "faiss.index").read_bytes())
    write_index_json(meta_path.parent, meta)
    builds.clear()

    with CaptureLogger(gallery_index.logger) as captured:
        loaded = GalleryIndex.load(tmp_path / "index")  # never fatal
    assert (
        "it will be rebuilt at the first search" in captured.out
        or "it will be built at the first search" in captured.out
    )
    assert {"count": "ntotal=1999, expected 2000", "options": "backend_options", "no_record": "holds no saved faiss-ivf index",
            "missing": "is missing", "garbage": "is not the file index.json lists",
            "other_vectors": "is not the file index.json lists"}[damage] in captured.out  # fmt: skip
    assert loaded._faiss_index is None and builds == []
    scores, indices = loaded.search(queries, 10)
    assert builds == ["faiss-ivf"]  # rebuilt lazily, as for an index that was never saved
    if damage == "options":
        assert loaded._faiss_index.nprobe == 2
    else:
        assert torch.equal(indices, expected[1])
        torch.testing.assert_close(scores, expected[0])
    loaded.save(tmp_path / "index")  # saving again repairs the folder
    with CaptureLogger(gallery_index.logger) as captured:
        assert GalleryIndex.load(tmp_path / "index")._faiss_index is not None and captured.out == ""


def test_exact_save_writes_no_faiss_file_and_drops_a_stale_one(tmp_path):
    gallery = random_gallery(300)
    GalleryIndex(gallery, range(300), backend="faiss-hnsw").save(tmp_path / "index")
    assert (tmp_path / "index" / "faiss.index").is_file()
    GalleryIndex(gallery, range(300)).save(tmp_path / "index")  # exact, into the same folder
    assert sorted(os.listdir(tmp_path / "index")) == ["embeddings.safetensors", "index.json", "index.json.sha256"]
    assert json.loads((tmp_path / "index" / "index.json").read_text())["faiss"] is None
    with CaptureLogger(gallery_index.logger) as captured:
        loaded = GalleryIndex.load(tmp_path / "index")
    assert captured.out == "" and loaded._faiss_index is None and loaded.backend == "exact"


def test_add_then_save_persists_the_new_vectors(monkeypatch, tmp_path):
    builds, _ = record_builds(monkeypatch)
    gallery, extra = random_gallery(1000), random_gallery(200, seed=5)
    GalleryIndex(gallery, range(1000), backend="faiss-ivf").save(tmp_path / "index")
    loaded = GalleryIndex.load(tmp_path / "index")
    loaded.add_embeddings(extra, [f"new{i}" for i in range(200)])  # what `add` calls after embedding
    assert loaded._faiss_index is None  # invalidated: the read index lacks the new vectors
    loaded.save(tmp_path / "index")
    assert builds == ["faiss-ivf", "faiss-ivf"]
    assert json.loads((tmp_path / "index" / "index.json").read_text())["faiss"]["ntotal"] == 1200
    reloaded = GalleryIndex.load(tmp_path / "index")
    assert reloaded._faiss_index.ntotal == 1200 and len(builds) == 2
    _, indices = reloaded.search(extra, 1)
    assert indices[:, 0].tolist() == list(range(1000, 1200))  # each new vector finds itself
    assert len(builds) == 2


def test_saved_faiss_index_loads_without_faiss_installed(monkeypatch, tmp_path):
    GalleryIndex(random_gallery(300), range(300), backend="faiss-hnsw").save(tmp_path / "index")
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    queries = random_gallery(3, seed=6)
    exact = GalleryIndex.load(tmp_path / "index", backend="exact")
    assert exact.search(queries, 5)[1].shape == (3, 5)
    loaded = GalleryIndex.load(tmp_path / "index")  # loads; only a FAISS search needs FAISS
    with pytest.raises(ImportError, match="'faiss-hnsw' backend needs FAISS"):
        loaded.search(queries, 5)
