"""One search contract for every `GalleryIndex` backend, checked against exact search: scores and ids, ties, top_k
larger than the gallery, metadata filters, add/remove, updates of a folder, reload in a fresh process and refusal of
another model's gallery.

Runs on the in-process backends and on Milvus Lite (a local .db file) in the normal suite, and, marked `slow`, on a
real Milvus server (the PyPI `milvus` package: Milvus 2.3.5 standalone) started by the `milvus_server` fixture on
127.0.0.1 ports, stopped by PID and its data removed when the session ends, also when tests fail.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

# The milvus extra (pymilvus, milvus-lite) and the `milvus` server package come with the dev extra
# (scripts/install.sh): a missing one fails here rather than skipping the backend.
import pymilvus  # noqa: F401
import pytest
import torch

from modeling_mqirtn.search_mqirtn import exact_search
from mqirtn_app.index import GalleryIndex, ModelMismatchError

from milvus_server import ISOLATION_HINT, MilvusServer, loopback_only, network_interfaces
from utils import REPO_ROOT, shape_image, tiny_model, write_image_folder


KINDS = ["exact", "faiss-flat", "milvus-lite", pytest.param("milvus-server", marks=pytest.mark.slow)]
MILVUS_KINDS = ["milvus-lite", pytest.param("milvus-server", marks=pytest.mark.slow)]
DIM = 32
FINGERPRINT = "0" * 64


# ---------------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A Milvus server on 127.0.0.1 for the session; stopped by PID and its folder removed at the end."""
    import platform

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("the PyPI `milvus` server package ships Linux x86-64 binaries only")
    if not loopback_only():
        message = f"{ISOLATION_HINT}; this namespace has {network_interfaces()}"
        if os.environ.get("MQIRTN_REQUIRE_MILVUS_SERVER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    base = tmp_path_factory.mktemp("milvus-server")
    server = MilvusServer(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _drop(uri: str, collection: str) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri, timeout=10)
    try:
        if client.has_collection(collection):
            client.drop_collection(collection)
    finally:
        client.close()


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(params=MILVUS_KINDS)
def milvus_kind(request):
    return request.param


@pytest.fixture
def backend_for(request, tmp_path):
    """`backend_for(kind)` -> (backend, backend_options): a fresh collection per test (dropped afterwards) for the
    milvus kinds."""
    made = []

    def backend_for(kind, **options):
        if kind in ("exact", "faiss-flat"):
            return kind, options
        if kind == "milvus-lite":
            uri = str(tmp_path / "gallery.db")
        else:
            uri = request.getfixturevalue("milvus_server").uri
        options = {"uri": uri, "collection": f"gallery_{uuid.uuid4().hex[:12]}", **options}
        made.append(options)
        return "milvus", options

    yield backend_for
    for options in made:
        if options["uri"].startswith("http"):
            try:
                _drop(options["uri"], options["collection"])
            except Exception:  # noqa: BLE001 (a test that stopped the server)
                pass


@pytest.fixture
def make_index(kind, backend_for):
    """`make_index(embeddings, ids, metadata=None)` -> a `GalleryIndex` of the parametrised kind."""
    made = []

    def make(embeddings, ids, metadata=None, fingerprint=FINGERPRINT, **options):
        backend, options = backend_for(kind, **options)
        index = GalleryIndex(
            torch.empty((0, embeddings.shape[1])),
            [],
            backend=backend,
            backend_options=options,
            fingerprint=fingerprint,
        )
        index.add_embeddings(embeddings, ids, metadata)
        made.append(index)
        return index

    yield make
    for index in made:
        index.close()


def random_gallery(count, dim=DIM, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, dim, generator=generator)
    points = centers[torch.randint(0, 12, (count,), generator=generator)] + 0.4 * torch.randn(
        count, dim, generator=generator
    )
    return torch.nn.functional.normalize(points, dim=-1)


def queries(count, seed=1):
    return random_gallery(count, seed=seed)


def hits(index, scores, indices):
    """[[(id, score), ...] per query], the -1 places left out."""
    return [
        [(index.ids[i], s) for s, i in zip(row_scores, row_indices) if i >= 0]
        for row_scores, row_indices in zip(scores.tolist(), indices.tolist())
    ]


def assert_same_hits(got, expected, atol=1e-5):
    assert len(got) == len(expected)
    for got_row, expected_row in zip(got, expected):
        assert [item for item, _ in got_row] == [item for item, _ in expected_row]
        torch.testing.assert_close(
            torch.tensor([s for _, s in got_row]), torch.tensor([s for _, s in expected_row]), atol=atol, rtol=0
        )


# ---------------------------------------------------------------------------------------------------- the contract
def test_same_ids_and_scores_as_exact_search(make_index):
    gallery = random_gallery(300)
    ids = [f"img_{i:03d}" for i in range(300)]
    index = make_index(gallery, ids)
    assert len(index) == 300 and sorted(index.ids) == ids
    query = queries(25)
    scores, indices = index.search(query, top_k=10)
    assert scores.shape == indices.shape == (25, 10)
    expected_scores, expected_indices = exact_search(query, gallery, 10)
    expected = [
        [(ids[i], s) for s, i in zip(r, q)] for r, q in zip(expected_scores.tolist(), expected_indices.tolist())
    ]
    assert_same_hits(hits(index, scores, indices), expected)
    # One query as a 1-D tensor, and numpy input.
    one_scores, one_indices = index.search(query[3].numpy(), top_k=10)
    assert one_indices.tolist() == indices[3:4].tolist()


def test_top_k_larger_than_the_gallery_returns_every_row(make_index):
    gallery = random_gallery(7)
    index = make_index(gallery, [f"r{i}" for i in range(7)])
    scores, indices = index.search(queries(3), top_k=50)
    assert scores.shape == indices.shape == (3, 7)
    for row_scores, row_indices in zip(scores.tolist(), indices.tolist()):
        assert sorted(row_indices) == list(range(7))
        assert row_scores == sorted(row_scores, reverse=True)


def test_tied_scores_return_the_same_rows(make_index):
    gallery = random_gallery(40)
    gallery[[5, 17, 23, 31]] = gallery[9].clone()  # five identical rows
    ids = [f"t{i}" for i in range(40)]
    index = make_index(gallery, ids)
    scores, indices = index.search(gallery[9], top_k=5)
    assert {index.ids[i] for i in indices[0].tolist()} == {"t5", "t9", "t17", "t23", "t31"}
    torch.testing.assert_close(scores[0], torch.ones(5), atol=1e-5, rtol=0)


def test_filters_select_rows_by_metadata(make_index):
    gallery = random_gallery(120)
    ids = [f"f{i}" for i in range(120)]
    metadata = [
        {"folder": ["shoes", "bags", "hats"][i % 3], "year": 2020 + i % 4, "sale": i % 5 == 0} for i in range(120)
    ]
    index = make_index(gallery, ids, metadata)
    query = queries(6)
    for expression, keep in [
        ('folder == "shoes"', lambda m: m["folder"] == "shoes"),
        (
            'folder in ["bags", "hats"] and year == 2021',
            lambda m: m["folder"] in ("bags", "hats") and m["year"] == 2021,
        ),
        ("sale == true and year != 2020", lambda m: m["sale"] and m["year"] != 2020),
    ]:
        rows = [i for i, m in enumerate(metadata) if keep(m)]
        expected_scores, expected_indices = exact_search(query, gallery[rows], 5)
        expected = [
            [(ids[rows[i]], s) for s, i in zip(r, q)]
            for r, q in zip(expected_scores.tolist(), expected_indices.tolist())
        ]
        scores, indices = index.search(query, top_k=5, filter=expression)
        assert scores.shape == (6, 5)
        assert_same_hits(hits(index, scores, indices), expected)
    # Fewer matches than top_k: the rest is -1 / -inf; none at all: every place.
    rows = [i for i, m in enumerate(metadata) if m["folder"] == "hats" and m["year"] == 2020]
    scores, indices = index.search(query, top_k=30, filter='folder == "hats" and year == 2020')
    assert scores.shape == (6, 30)
    assert all(
        sorted(i for i in row if i >= 0) == sorted(index.ids.index(ids[r]) for r in rows) for row in indices.tolist()
    )
    assert (indices[:, len(rows) :] == -1).all() and torch.isinf(scores[:, len(rows) :]).all()
    scores, indices = index.search(query, top_k=4, filter='folder == "gloves"')
    assert (indices == -1).all() and (scores == float("-inf")).all()


def test_a_malformed_filter_is_one_line(make_index):
    index = make_index(random_gallery(10), [f"m{i}" for i in range(10)], [{"folder": "a"}] * 10)
    with pytest.raises((ValueError, RuntimeError)) as raised:
        index.search(queries(1), top_k=3, filter='folder === "a"')
    assert "\n" not in str(raised.value) and "folder" in str(raised.value)


def test_add_remove_and_duplicate_ids(make_index):
    gallery = random_gallery(60)
    ids = [f"a{i}" for i in range(60)]
    index = make_index(gallery[:50], ids[:50])
    with pytest.raises(ValueError, match="duplicate gallery id 'a3'"):
        index.add_embeddings(gallery[50:52], ["a50", "a3"])
    with pytest.raises(ValueError, match="duplicate gallery id 'a51'"):
        index.add_embeddings(gallery[50:52], ["a51", "a51"])
    index.add_embeddings(gallery[50:], ids[50:])
    assert index.remove(["a0", "a7", "a55"]) == 3
    with pytest.raises(ValueError, match="'nope'.*not an id"):
        index.remove(["a1", "nope"])
    kept = [i for i in range(60) if ids[i] not in ("a0", "a7", "a55")]
    assert sorted(index.ids) == sorted(ids[i] for i in kept) and len(index) == 57
    query = queries(8)
    expected_scores, expected_indices = exact_search(query, gallery[kept], 6)
    expected = [
        [(ids[kept[i]], s) for s, i in zip(r, q)] for r, q in zip(expected_scores.tolist(), expected_indices.tolist())
    ]
    assert_same_hits(hits(index, *index.search(query, top_k=6)), expected)
    index.add_embeddings(gallery[7:8], ["a7"])  # a removed id can come back
    assert "a7" in index.ids and len(index) == 58


def test_reload_in_a_fresh_process(make_index, tmp_path):
    gallery = random_gallery(80)
    index = make_index(gallery, [f"p{i}" for i in range(80)], [{"folder": "x" if i % 2 else "y"} for i in range(80)])
    query = queries(4)
    expected = hits(index, *index.search(query, top_k=5, filter='folder == "x"'))
    index.save(tmp_path / "saved")
    index.close()  # Milvus Lite: one process per database file
    torch.save(query, tmp_path / "query.pt")
    script = (
        "import json, sys, torch\n"
        "from mqirtn_app.index import GalleryIndex\n"
        f"index = GalleryIndex.load({str(tmp_path / 'saved')!r})\n"
        f"query = torch.load({str(tmp_path / 'query.pt')!r}, weights_only=True)\n"
        "scores, indices = index.search(query, top_k=5, filter='folder == \"x\"')\n"
        "print(json.dumps([[(index.ids[i], s) for s, i in zip(r, q)] for r, q in zip(scores.tolist(), indices.tolist())]))\n"
        "index.close()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    got = [[tuple(hit) for hit in row] for row in json.loads(result.stdout.strip().splitlines()[-1])]
    assert_same_hits(got, expected)


def test_refuses_another_models_gallery(kind, backend_for, model, processor, tmp_path):
    folder = tmp_path / "images"
    write_image_folder(folder, 6)
    backend, options = backend_for(kind)
    index = GalleryIndex.from_folder(
        model, processor, folder, backend=backend, backend_options=options, progress=False
    )
    index.save(tmp_path / "index")
    index.close()
    other = tiny_model(seed=1).eval()
    with pytest.raises(ModelMismatchError, match="another checkpoint"):
        GalleryIndex.load(tmp_path / "index", model=other)
    if backend == "milvus":  # writing into the collection with another model
        with pytest.raises(ModelMismatchError, match="written by another model"):
            GalleryIndex.from_folder(
                other, processor, folder, backend=backend, backend_options=options, progress=False
            )


def test_folder_metadata_and_update(kind, backend_for, model, processor, tmp_path):
    folder = tmp_path / "images"
    paths = write_image_folder(folder, 8)  # half of them in sub/
    backend, options = backend_for(kind)
    index = GalleryIndex.from_folder(
        model, processor, folder, backend=backend, backend_options=options, progress=False
    )
    query = torch.nn.functional.normalize(torch.randn(3, model.config.projection_dim), dim=-1)
    _, indices = index.search(query, top_k=8, filter='folder == "sub"')
    assert {index.ids[i] for i in indices.flatten().tolist() if i >= 0} == {
        p.relative_to(folder).as_posix() for p in paths if p.parent.name == "sub"
    }
    index.save(tmp_path / "index")
    index.close()

    # One file changed, one removed, one new; the rest untouched.
    changed, removed = paths[1], paths[2]
    shape_image(50).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    removed.unlink()
    shape_image(51).save(folder / "sub" / "new.png")
    index = GalleryIndex.load(tmp_path / "index", model=model, processor=processor)
    counts = index.update_folder(progress=False)
    assert counts == {"added": 1, "changed": 1, "removed": 1, "unchanged": 6, "skipped": 0}
    fresh = GalleryIndex.from_folder(model, processor, folder, progress=False)
    assert sorted(index.ids) == sorted(fresh.ids)
    assert_same_hits(hits(index, *index.search(query, top_k=8)), hits(fresh, *fresh.search(query, top_k=8)))
    assert index.update_folder(progress=False) == {
        "added": 0,
        "changed": 0,
        "removed": 0,
        "unchanged": 8,
        "skipped": 0,
    }
    index.close()


# ---------------------------------------------------------------------------------------------------- milvus only
def test_milvus_records_its_database_and_index_settings_but_no_token(milvus_kind, backend_for, tmp_path, monkeypatch):
    monkeypatch.setenv("MQIRTN_TEST_TOKEN", "secret-token-value")
    backend, options = backend_for(
        milvus_kind, hnsw_m=8, ef_construction=40, ef_search=32, token_env="MQIRTN_TEST_TOKEN"
    )
    if milvus_kind == "milvus-lite":
        monkeypatch.delenv("MQIRTN_TEST_TOKEN")  # Lite takes no token
    index = GalleryIndex(torch.empty((0, DIM)), [], backend=backend, backend_options=options, fingerprint=FINGERPRINT)
    index.add_embeddings(random_gallery(20), [f"s{i}" for i in range(20)])
    index.save(tmp_path / "saved")
    index.close()
    text = (tmp_path / "saved" / "index.json").read_text()
    assert "secret-token-value" not in text
    meta = json.loads(text)
    assert meta["backend"] == "milvus" and sorted(os.listdir(tmp_path / "saved")) == [
        "index.json",
        "index.json.sha256",
    ]
    assert meta["backend_options"] == {
        "uri": options["uri"] if milvus_kind == "milvus-server" else str(Path(options["uri"]).resolve()),
        "collection": options["collection"],
        "token_env": "MQIRTN_TEST_TOKEN",
        "index_type": "HNSW",
        "hnsw_m": 8,
        "ef_construction": 40,
        "ef_search": 32,
    }
    loaded = GalleryIndex.load(tmp_path / "saved")
    state = loaded._milvus().index_state()
    assert state["index_type"] == "HNSW" and loaded._store.build_params() == {"M": 8, "efConstruction": 40}
    assert loaded._store.search_params(10)["params"] == {"ef": 32}
    assert len(loaded) == 20
    loaded.close()


def test_milvus_from_images_replaces_a_collection_of_the_same_model(
    milvus_kind, backend_for, model, processor, tmp_path
):
    folder = tmp_path / "images"
    write_image_folder(folder, 6)
    backend, options = backend_for(milvus_kind)
    first = GalleryIndex.from_folder(
        model, processor, folder, backend=backend, backend_options=options, progress=False
    )
    first.close()
    (folder / "img_000.jpg").unlink()
    again = GalleryIndex.from_folder(
        model, processor, folder, backend=backend, backend_options=options, progress=False
    )
    assert len(again) == 5 and "img_000.jpg" not in again.ids
    assert again._milvus().count() == 5  # replaced rows are not duplicated, the file that is gone is deleted
    again.close()


def test_lite_database_inside_the_index_folder_is_refused(tmp_path):
    index = GalleryIndex(
        torch.empty((0, DIM)),
        [],
        backend="milvus",
        backend_options={"uri": str(tmp_path / "saved" / "g.db")},
        fingerprint=FINGERPRINT,
    )
    with pytest.raises(ValueError, match="inside the index folder"):
        index.save(tmp_path / "saved")


@pytest.mark.slow
def test_server_killed_during_an_upsert_is_one_line_and_a_rerun_completes(milvus_server, backend_for, tmp_path):
    from mqirtn_app.milvus_store import MilvusBackendError

    backend, options = backend_for("milvus-server")
    gallery = random_gallery(20000, dim=256)
    ids = [f"k{i}" for i in range(20000)]
    index = GalleryIndex(torch.empty((0, 256)), [], backend=backend, backend_options=options, fingerprint=FINGERPRINT)
    index.add_embeddings(gallery[:10], ids[:10])
    store = index._milvus()
    original = store.client.upsert
    calls = []

    def upsert_then_kill(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            milvus_server.kill()
        return original(*args, **kwargs)

    store.client.upsert = upsert_then_kill
    with pytest.raises(MilvusBackendError) as raised:
        index.add_embeddings(gallery[10:], ids[10:])
    assert "\n" not in str(raised.value) and "upsert" in str(raised.value)
    index.close()
    milvus_server.start()
    again = GalleryIndex(torch.empty((0, 256)), [], backend=backend, backend_options=options, fingerprint=FINGERPRINT)
    again._milvus()  # takes the rows that reached the collection before the kill
    present = set(again.ids)
    assert 10 <= len(present) < 20000
    missing = [i for i in range(20000) if ids[i] not in present]
    again.add_embeddings(gallery[missing], [ids[i] for i in missing])
    assert again._milvus().count() == 20000 and sorted(again.ids) == sorted(ids)
    again.close()


# ---------------------------------------------------------------------------------------------------- the CLI
def _cli(argv, capsys):
    from mqirtn_app.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_index_filter_search_and_update(kind, backend_for, model, processor, tmp_path, capsys):
    from modeling_mqirtn import save_for_hub

    save_for_hub(model, processor, tmp_path / "model")
    folder = tmp_path / "images"
    paths = write_image_folder(folder, 8)
    backend, options = backend_for(kind)
    extra = ["--uri", options["uri"], "--collection", options["collection"]] if backend == "milvus" else []
    index_args = [
        "index",
        "--model",
        tmp_path / "model",
        "--images",
        folder,
        "--out",
        tmp_path / "index",
        "--backend",
        backend,
        "--no-progress",
        "--num-workers",
        0,
        *extra,
    ]
    code, out, err = _cli(index_args, capsys)
    assert code == 0, err
    assert "Indexed 8 images" in out
    search = [
        "search",
        "--index",
        tmp_path / "index",
        "--image",
        paths[0],
        "--text",
        "make it red",
        "--json",
        "--top-k",
        8,
    ]
    code, out, err = _cli([*search, "--filter", 'folder == "sub"'], capsys)
    assert code == 0, err
    results = json.loads(out)
    assert results and {r["id"] for r in results} <= {
        p.relative_to(folder).as_posix() for p in paths if p.parent.name == "sub"
    }
    code, out, err = _cli([*search, "--filter", "folder > 1"], capsys)
    last = err.strip().splitlines()[-1]  # above it: transformers' weight-loading bar
    assert code == 1 and last.startswith("mqirtn search: error:") and "filter" in last and "Traceback" not in err

    (paths[5]).unlink()
    shape_image(60).save(folder / "extra.png")
    code, out, err = _cli([*index_args, "--update"], capsys)
    assert code == 0, err
    assert "1 added, 0 changed, 1 removed, 7 unchanged" in out and "(8 images" in out
    code, out, err = _cli([*search, "--top-k", 20], capsys)
    assert code == 0, err
    assert sorted(r["id"] for r in json.loads(out)) == sorted(
        p.relative_to(folder).as_posix() for p in [*paths[:5], *paths[6:], folder / "extra.png"]
    )


def test_cli_refuses_flags_of_another_backend(tmp_path, capsys):
    base = ["index", "--model", tmp_path, "--images", tmp_path, "--out", tmp_path / "out"]
    (tmp_path / "a.png").write_bytes(b"")
    for flags, message in [
        (["--uri", "g.db"], "--uri applies to --backend milvus only"),
        (["--backend", "milvus"], "--backend milvus needs --uri"),
        (["--backend", "faiss-ivf", "--hnsw-m", 8], "--hnsw-m applies to --backend faiss-hnsw or milvus"),
    ]:
        code, _, err = _cli([*base, *flags], capsys)
        assert code == 1 and message in err, err


def test_waiting_for_the_vector_index_is_bounded_and_reported(milvus_kind, backend_for):
    backend, options = backend_for(milvus_kind)
    index = GalleryIndex(torch.empty((0, DIM)), [], backend=backend, backend_options=options, fingerprint=FINGERPRINT)
    index.add_embeddings(random_gallery(3000), [f"w{i}" for i in range(3000)])
    assert index.wait_for_index(timeout=120) is True
    assert len(index) == 3000 == index._milvus().count()
    index.close()
    exact = GalleryIndex(random_gallery(5), [f"e{i}" for i in range(5)])
    assert exact.wait_for_index(timeout=0) is True


def test_search_backends_benchmark_runs_tiny(tmp_path):
    """benchmarks/search_backends.py at a tiny size: every in-process backend and Milvus Lite, one JSON row each."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("search_backends", REPO_ROOT / "benchmarks" / "search_backends.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "bench.json"
    module.main(
        ["--gallery-size", "2000", "--dim", "16", "--clusters", "20", "--single", "5", "--batch", "10", "--batches", "2",
         "--threads", "1", "--backends", "exact", "faiss-ivf", "milvus-lite", "--output", str(output)]
    )  # fmt: skip
    report = json.loads(output.read_text())
    rows = {row["backend"]: row for row in report["rows"]}
    assert set(rows) == {"exact", "faiss-ivf", "milvus-lite"}
    assert rows["exact"]["recall_at_10"] == 1.0 and rows["exact"]["single_p50_vs_exact"] == 1.0
    assert rows["milvus-lite"]["recall_at_10"] > 0.95  # HNSW at ef 64 on 2,000 rows
    assert all(
        row["insert_s"] > 0 and row["single"]["p50_ms"] > 0 and row["batch_10"]["p99_ms"] > 0 for row in rows.values()
    )


def test_demo_serves_a_milvus_gallery(milvus_kind, backend_for, model, processor, tmp_path):
    """demo/app.py opens a milvus index folder like any other and ranks as the pipeline over exact search."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("mqirtn_demo_app_milvus", REPO_ROOT / "demo" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    folder = tmp_path / "images"
    paths = write_image_folder(folder, 10)
    backend, options = backend_for(milvus_kind)
    built = GalleryIndex.from_folder(
        model, processor, folder, backend=backend, backend_options=options, progress=False
    )
    built.save(tmp_path / "index")
    built.close()
    args = argparse.Namespace(
        gallery=str(tmp_path / "index"), cache_dir=str(tmp_path / "cache"), model="m", no_progress=True
    )
    index, _, description = app.open_gallery(args, model, processor)
    assert index.backend == "milvus" and len(index) == 10 and str(tmp_path / "index") in description
    (gallery,), (status,) = app.CompositionalSearch(model, processor, index)([str(paths[2])], ["make it red"], [4])
    exact = GalleryIndex.from_folder(model, processor, folder, progress=False)
    expected = app.CompositionalSearch(model, processor, exact)([str(paths[2])], ["make it red"], [4])[0][0]
    assert [caption for _, caption in gallery] == [caption for _, caption in expected]
    assert [Path(image).name for image, _ in gallery] == [Path(image).name for image, _ in expected]
    index.close()


def test_two_ranks_index_into_milvus(milvus_kind, backend_for, model, processor, tmp_path):
    """`mqirtn index --backend milvus` under torchrun with 2 gloo CPU ranks: each rank embeds its shard; on a server
    each upserts it, with Lite rank 0 writes them; the collection then holds every readable image once, and a re-run
    (a killed run's re-run) leaves it so."""
    from modeling_mqirtn import save_for_hub

    save_for_hub(model, processor, tmp_path / "model")
    images = tmp_path / "images"
    write_image_folder(images, 9)
    (images / "broken.png").write_bytes(b"not a png")
    backend, options = backend_for(milvus_kind)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "mqirtn_app.cli", "index", "--model", str(tmp_path / "model"), "--images", str(images),
        "--out", str(tmp_path / "index"), "--batch-size", "2", "--no-progress", "--backend", "milvus",
        "--uri", options["uri"], "--collection", options["collection"],
    ]  # fmt: skip
    for _ in range(2):
        completed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert completed.stdout.count("Indexed 9 images") == 1 and "embedded by 2 processes" in completed.stdout
    index = GalleryIndex.load(tmp_path / "index", model=model)
    single = GalleryIndex.from_folder(model, processor, images, progress=False)
    assert sorted(index.ids) == sorted(single.ids) and index._milvus().count() == 9
    query = torch.nn.functional.normalize(torch.randn(2, model.config.projection_dim), dim=-1)
    assert_same_hits(hits(index, *index.search(query, top_k=9)), hits(single, *single.search(query, top_k=9)))
    index.close()


def test_pipeline_passes_the_filter_to_the_index(kind, backend_for, model, processor, tmp_path):
    from modeling_mqirtn import ComposedImageRetrievalPipeline

    folder = tmp_path / "images"
    paths = write_image_folder(folder, 8)
    backend, options = backend_for(kind)
    index = GalleryIndex.from_folder(
        model, processor, folder, backend=backend, backend_options=options, progress=False
    )
    pipe = ComposedImageRetrievalPipeline(model=model, processor=processor)
    found = pipe(image=str(paths[0]), text="make it red", gallery=index, top_k=8, filter='folder == "sub"')
    in_sub = sorted(p.relative_to(folder).as_posix() for p in paths if p.parent.name == "sub")
    assert sorted(hit["id"] for hit in found) == in_sub  # every row of the folder, none of the others
    unfiltered = pipe(image=str(paths[0]), text="make it red", gallery=index, top_k=8)
    expected = [hit for hit in unfiltered if hit["id"] in in_sub]  # the same order and scores as without the filter
    assert [hit["id"] for hit in found] == [hit["id"] for hit in expected]
    assert [hit["score"] for hit in found] == pytest.approx([hit["score"] for hit in expected], abs=1e-5)
    with pytest.raises(ValueError, match="`filter` needs a `gallery` index"):
        pipe(
            image=str(paths[0]),
            text="make it red",
            gallery=torch.zeros(3, model.config.projection_dim),
            filter="a == 1",
        )
    index.close()


def test_dataset_columns_become_filterable_metadata(kind, backend_for, model, processor):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    images = [shape_image(i) for i in range(6)]
    dataset = Dataset.from_dict(
        {"image": images, "name": [f"n{i}" for i in range(6)], "category": ["dress", "shirt", "toptee"] * 2,
         "price": [10, 20, 30, 40, 50, 60]},
        features=Features({"image": ImageFeature(), "name": Value("string"), "category": Value("string"),
                           "price": Value("int64")}),
    )  # fmt: skip
    backend, options = backend_for(kind)
    index = GalleryIndex.from_dataset(
        model, processor, dataset, id_column="name", backend=backend, backend_options=options, progress=False
    )
    query = torch.nn.functional.normalize(torch.randn(1, model.config.projection_dim), dim=-1)
    _, indices = index.search(query, top_k=6, filter='category == "dress" and price in [10, 40, 60]')
    assert sorted(index.ids[i] for i in indices[0].tolist() if i >= 0) == ["n0", "n3"]
    index.close()


def test_jsonl_and_csv_galleries_carry_their_columns(kind, backend_for, model, processor, tmp_path, capsys):
    from modeling_mqirtn import save_for_hub

    paths = write_image_folder(tmp_path / "images", 6, nested=False)
    rows = [
        {"image": f"images/{p.name}", "sku": f"sku{i}", "category": ["dress", "shirt"][i % 2], "price": 10 * i}
        for i, p in enumerate(paths)
    ]
    (tmp_path / "gallery.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "gallery.csv").write_text(
        "image,sku,category\n" + "".join(f"{r['image']},{r['sku']},{r['category']}\n" for r in rows)
    )
    backend, options = backend_for(kind)
    index = GalleryIndex.from_table(
        model,
        processor,
        tmp_path / "gallery.jsonl",
        id_column="sku",
        backend=backend,
        backend_options=options,
        progress=False,
    )
    query = torch.nn.functional.normalize(torch.randn(1, model.config.projection_dim), dim=-1)
    _, indices = index.search(query, top_k=6, filter='category == "dress" and price != 40')
    assert sorted(index.ids[i] for i in indices[0].tolist() if i >= 0) == ["sku0", "sku2"]
    index.close()
    if kind != "exact":
        return
    save_for_hub(model, processor, tmp_path / "model")
    code, out, err = _cli(
        ["index", "--model", tmp_path / "model", "--images", tmp_path / "gallery.csv", "--out", tmp_path / "index",
         "--no-progress"], capsys,
    )  # fmt: skip
    assert code == 0, err
    code, out, err = _cli(
        ["search", "--index", tmp_path / "index", "--image", paths[0], "--text", "make it red", "--json",
         "--filter", 'category in ["shirt"]'], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert sorted(hit["id"] for hit in json.loads(out)) == [f"images/{p.name}" for p in paths[1::2]]


def test_a_lite_file_open_in_another_process_is_one_line(tmp_path):
    index = GalleryIndex(
        torch.empty((0, DIM)), [], backend="milvus", backend_options={"uri": str(tmp_path / "g.db")},
        fingerprint=FINGERPRINT,
    )  # fmt: skip
    index.add_embeddings(random_gallery(5), [f"l{i}" for i in range(5)])
    index.save(tmp_path / "index")  # this process keeps the database open
    query = tmp_path / "q.png"
    shape_image(1).save(query)
    result = subprocess.run(
        [sys.executable, "-m", "mqirtn_app.cli", "search", "--index", str(tmp_path / "index"), "--image", str(query),
         "--text", "make it red"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "one process per .db file" in result.stderr, result.stderr
    index.close()
