"""Search backends side by side: exact torch, FAISS IVF / HNSW, Milvus Lite and a Milvus server, through `GalleryIndex`.

    nice -n 19 python benchmarks/search_backends.py [--gallery-size 100000] [--dim 256]
        [--backends exact faiss-ivf faiss-hnsw milvus-lite milvus-server]

Per backend, in one process and one run (ratios against exact search in the same run):

- insert_s: from embeddings in memory to a searchable, fully indexed gallery: `add_embeddings`, then the FAISS build
  (first search) or, for Milvus, the writes in batches plus `wait_for_index` (the engine's vector index covering every
  row); rows_per_s = gallery size / insert_s;
- single query latency p50 / p99 over `--single` queries, one at a time; batch latency p50 / p99 over `--batches`
  batches of `--batch` queries (top-10);
- recall@10 = share of the exact top-10 that the backend returns, over every measured query;
- RSS: growth of this process's resident memory while the backend was built (in-process backends and Milvus Lite,
  which runs in this process), or the server process's resident memory (milvus-server).

Settings: FAISS IVF nlist 4 sqrt(N), nprobe 16; HNSW M 32, efConstruction 80, ef 64 on FAISS and on Milvus. The
Milvus server is Milvus 2.3.5 standalone from the PyPI `milvus` package (tests/milvus_server.py), started here on
127.0.0.1 ports and stopped at the end. Writes `--output` (JSON, default results/search_backends_<N>.json).
"""

import argparse
import datetime
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modeling_mqirtn.search_mqirtn import exact_search
from mqirtn_app.index import GalleryIndex

from machine_info import clustered_embeddings, machine, write_json


ROOT = Path(__file__).resolve().parent.parent


BACKENDS = ("exact", "faiss-ivf", "faiss-hnsw", "milvus-lite", "milvus-server")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery-size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="single queries timed one by one")
    parser.add_argument("--batch", type=int, default=100, help="queries per batch")
    parser.add_argument("--batches", type=int, default=10, help="batches timed")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--index-wait", type=float, default=1800, help="seconds Milvus may take to index every row")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("gallery_size", "dim", "clusters", "single", "batch", "batches", "top_k", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.output is None:
        args.output = Path(__file__).resolve().parent / "results" / f"search_backends_{args.gallery_size}.json"
    return args


def make_data(args):
    return clustered_embeddings(
        args.gallery_size, args.dim, args.clusters, args.single + args.batch * args.batches, args.seed
    )


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentiles(times):
    times = np.asarray(times) * 1000
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3)}


def build(name, gallery, ids, workdir, server, index_wait):
    """The backend's index over `gallery`, built and indexed; returns (index, insert seconds)."""
    hnsw = {"hnsw_m": 32, "ef_construction": 80, "ef_search": 64}
    if name == "exact":
        backend, options = "exact", {}
    elif name == "faiss-ivf":
        backend, options = "faiss-ivf", {"nprobe": 16}
    elif name == "faiss-hnsw":
        backend, options = "faiss-hnsw", hnsw
    else:
        uri = str(workdir / "gallery.db") if name == "milvus-lite" else server.uri
        backend, options = "milvus", {"uri": uri, "collection": "bench", **hnsw}
    index = GalleryIndex(
        torch.empty((0, gallery.shape[1])), [], backend=backend, backend_options=options, fingerprint="b"
    )
    start = time.perf_counter()
    index.add_embeddings(gallery, ids)
    if backend.startswith("faiss"):
        index._get_faiss_index()
    elif backend == "milvus":
        if index.wait_for_index(timeout=index_wait) is not True:
            raise RuntimeError(f"{name}: the vector index did not cover every row in time")
    return index, time.perf_counter() - start


def measure(name, index, queries, args, exact_top):
    single = args.single
    single_times, found = [], []
    index.search(queries[:1], args.top_k)  # warm-up
    for position in range(single):
        start = time.perf_counter()
        _, indices = index.search(queries[position : position + 1], args.top_k)
        single_times.append(time.perf_counter() - start)
        found.append(indices)
    batch_times = []
    for number in range(args.batches):
        batch = queries[single + number * args.batch : single + (number + 1) * args.batch]
        start = time.perf_counter()
        _, indices = index.search(batch, args.top_k)
        batch_times.append(time.perf_counter() - start)
        found.append(indices)
    found = torch.cat(found)
    # Ids, not positions: the milvus backend numbers its rows in the order it read them.
    ids = np.asarray(index.ids, dtype=object)
    hits = sum(
        len(set(ids[row[row >= 0]].tolist()) & set(expected)) for row, expected in zip(found.numpy(), exact_top)
    )
    return {
        "single": percentiles(single_times),
        f"batch_{args.batch}": percentiles(batch_times),
        "recall_at_10": round(hits / (len(exact_top) * args.top_k), 4),
    }


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        args.backends = [b for b in args.backends if not b.startswith("faiss")]
    gallery, queries = make_data(args)
    ids = [str(i) for i in range(args.gallery_size)]
    _, exact_indices = exact_search(queries, gallery, args.top_k)
    exact_top = [[ids[i] for i in row] for row in exact_indices.tolist()]
    print(
        f"Gallery {args.gallery_size} x {args.dim}, {len(queries)} queries, top-{args.top_k}, {args.threads} threads"
    )
    workdir = Path(tempfile.mkdtemp(prefix="search_backends_"))
    server = None
    rows = []
    try:
        if "milvus-server" in args.backends:
            # The tests' server helper, loaded from its file (tests/ is not a package).
            import importlib.util

            spec = importlib.util.spec_from_file_location("milvus_server", ROOT / "tests" / "milvus_server.py")
            milvus_server = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(milvus_server)
            if not milvus_server.loopback_only():
                raise SystemExit(f"error: {milvus_server.ISOLATION_HINT}")
            server = milvus_server.MilvusServer(workdir / "server")
            started = time.perf_counter()
            server.start()
            print(f"Milvus server up in {time.perf_counter() - started:.1f} s at {server.uri}")
        for name in args.backends:
            gc.collect()
            before = rss_bytes()
            index, insert_s = build(name, gallery, ids, workdir, server, args.index_wait)
            rss = server.rss_bytes() if name == "milvus-server" else rss_bytes() - before
            row = {
                "backend": name,
                "insert_s": round(insert_s, 4),
                "rows_per_s": round(args.gallery_size / insert_s),
                "rss_mb": round(rss / 2**20, 1),
                **measure(name, index, queries, args, exact_top),
            }
            rows.append(row)
            print(
                f"{name:>13}: insert {row['insert_s']:8.2f} s ({row['rows_per_s']:>8} rows/s)  single p50 "
                f"{row['single']['p50_ms']:8.3f} p99 {row['single']['p99_ms']:8.3f} ms  batch p50 "
                f"{row[f'batch_{args.batch}']['p50_ms']:9.3f} p99 {row[f'batch_{args.batch}']['p99_ms']:9.3f} ms  "
                f"recall@10 {row['recall_at_10']:.4f}  RSS {row['rss_mb']} MB",
                flush=True,
            )
            index.close()
            del index
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    exact = next((row for row in rows if row["backend"] == "exact"), None)
    if exact is not None:
        for row in rows:
            row["single_p50_vs_exact"] = round(row["single"]["p50_ms"] / exact["single"]["p50_ms"], 3)
            row["batch_p50_vs_exact"] = round(
                row[f"batch_{args.batch}"]["p50_ms"] / exact[f"batch_{args.batch}"]["p50_ms"], 3
            )
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/search_backends.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "gallery_size": args.gallery_size,
        "dim": args.dim,
        "queries_single": args.single,
        "batch": args.batch,
        "batches": args.batches,
        "rows": rows,
    }
    write_json(args.output, report)
    print(f"Wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
