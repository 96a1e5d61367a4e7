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
from conftest import tiny_model, tiny_processor
from retrieval_utils import shape_image, write_image_folder
from transformers.testing_utils import CaptureLogger

from modeling_mqirtn import save_for_hub
from modeling_mqirtn import index_mqirtn
from modeling_mqirtn.index_mqirtn import GalleryIndex, ModelMismatchError, model_fingerprint


REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return tiny_processor(tmp_path_factory.mktemp("processor"))


def image_features(model, processor, images):
    with torch.no_grad():
        return model.get_image_features(pixel_values=processor(images=images)["pixel_values"])


def random_gallery(count=2000, dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Clustered like real embeddings (uniform random points make every neighbour equally far).
    centers = torch.randn(40, dim, generator=generator)
    points = centers[torch.randint(0, 40, (count,), generator=generator)] + 0.3 * torch.randn(count, dim, generator=generator)
    return torch.nn.functional.normalize(points, dim=-1)


def test_from_images_skips_unreadable_and_matches_direct_embeddings(model, processor, tmp_path):
    paths = write_image_folder(tmp_path / "images", 7, nested=False)
    corrupt = tmp_path / "images" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    missing = tmp_path / "images" / "missing.png"
    items = [paths[0], corrupt, *paths[1:4], missing, *paths[4:]]
    with CaptureLogger(index_mqirtn.logger) as captured:
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
    assert index.ids == sorted(["img_000.jpg", "img_002.png", "img_004.png", "sub/img_001.png", "sub/img_003.jpg",
                                "sub/img_005.png", "sub/UPPER.PNG"])
    assert index.image_path(index.ids.index("sub/img_003.jpg")) == (tmp_path / "gallery" / "sub" / "img_003.jpg").resolve()
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
    assert sorted(os.listdir(tmp_path / "index")) == ["embeddings.safetensors", "index.json"]  # no pickle
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
    monkeypatch.setattr(faiss.IndexIVFFlat, "train", lambda self, x: trained_on.append(len(x)) or original_train(self, x))
    gallery = random_gallery(4000)
    queries = random_gallery(50, seed=2)
    _, exact = GalleryIndex(gallery, range(len(gallery))).search(queries, 10)
    sampled = GalleryIndex(gallery, range(len(gallery)), backend="faiss-ivf", backend_options={"train_size": 2000})
    _, approximate = sampled.search(queries, 10)
    nlist = min(int(4 * 4000**0.5), 4000 // 39)
    assert trained_on == [max(2000, 39 * nlist)] and sampled._faiss_index.ntotal == 4000  # trained on a sample, holds all
    recall = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approximate, exact)) / exact.numel()
    assert recall > 0.5


def test_missing_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    index = GalleryIndex(random_gallery(50), range(50), backend="faiss-hnsw")
    with pytest.raises(ImportError, match="'faiss-hnsw' backend needs FAISS.*pip install faiss-cpu"):
        index.search(random_gallery(2, seed=3), 5)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        GalleryIndex(random_gallery(5), range(5), backend="annoy")


def test_two_rank_sharded_embedding_equals_single_process(model, processor, tmp_path):
    """`mqirtn index` under torchrun with 2 gloo CPU ranks: each rank embeds a shard, rank 0 writes the merged index."""
    folder = save_for_hub(model, processor, tmp_path / "model")
    images = tmp_path / "images"
    write_image_folder(images, 9)  # odd: uneven shards
    (images / "broken.png").write_bytes(b"not a png")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "modeling_mqirtn.cli_mqirtn", "index", "--model", str(folder), "--images", str(images),
        "--out", str(tmp_path / "sharded"), "--batch-size", "2", "--no-progress",
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("Indexed 9 images") == 1 and "embedded by 2 processes" in completed.stdout

    sharded = GalleryIndex.load(tmp_path / "sharded")
    single = GalleryIndex.from_folder(model, processor, images, batch_size=4, progress=False)
    assert sharded.ids == single.ids and len(sharded.skipped) == 1
    torch.testing.assert_close(sharded.embeddings, single.embeddings, atol=1e-5, rtol=0)
