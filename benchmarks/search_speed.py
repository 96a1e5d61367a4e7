"""Gallery search throughput: exact torch search vs FAISS flat / IVF / HNSW, with recall@10 against exact.

    nice -n 10 python benchmarks/search_speed.py [--gallery-size 100000] [--dim 512] [--queries 1000] [--threads 2]

What is measured, in one process and one run (so the ratios are meaningful on a shared machine):

- gallery: `--gallery-size` x `--dim` float32 L2-normalised vectors drawn around `--clusters` random centres (real
  embeddings are clustered; on uniform random vectors every neighbour is almost equally far and approximate
  indexes look worse than they are); queries: noisy copies of random gallery vectors.
- exact: `GalleryIndex.search` with backend "exact" (blocked `queries @ gallery.T` + top-k in torch).
- faiss-flat / faiss-ivf / faiss-hnsw: the same `GalleryIndex` with those backends (index built once, build time
  reported separately; IVF: nlist = 4 sqrt(N), nprobe 16; HNSW: M 32, efConstruction 80, efSearch 64; `--ivf-nprobe` and
  `--hnsw-ef-search` take several values and add one row each, searched on the same built index).
- queries/s = queries / best wall time of `--repeats` searches of all queries at once (top-10), after one warm-up;
  recall@10 = share of the exact top-10 each backend returns. Every figure is also given as a ratio vs exact.
- IVF trains its k-means on a random sample of 64 vectors per list (`GalleryIndex` default `train_size`).

Writes the table and the machine to `--output` (JSON; default benchmarks/results/search_speed_<N>.json).
"""

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from mqirtn_app.index import GalleryIndex  # noqa: E402

from machine_info import clustered_embeddings, machine, write_json  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery-size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--backends", nargs="+", default=["exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ivf-nprobe", type=int, nargs="+", default=[16], help="IVF lists searched (one row each)")
    parser.add_argument("--hnsw-ef-search", type=int, nargs="+", default=[64], help="HNSW efSearch (one row each)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: results/search_speed_<N>.json)")
    args = parser.parse_args(argv)
    for name in (
        "gallery_size",
        "dim",
        "queries",
        "clusters",
        "top_k",
        "repeats",
        "threads",
        "ivf_nprobe",
        "hnsw_ef_search",
    ):
        if min(getattr(args, name) if isinstance(getattr(args, name), list) else [getattr(args, name)]) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.output is None:
        args.output = Path(__file__).resolve().parent / "results" / f"search_speed_{args.gallery_size}.json"
    return args


def make_data(args):
    return clustered_embeddings(args.gallery_size, args.dim, args.clusters, args.queries, args.seed)


def best_time(function, repeats):
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss_version = None
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        faiss_version = faiss.__version__
    except ImportError:
        args.backends = [b for b in args.backends if not b.startswith("faiss")]
        print("FAISS is not installed: measuring exact search only")
    gallery, queries = make_data(args)
    ids = [str(i) for i in range(args.gallery_size)]
    print(
        f"Gallery {args.gallery_size} x {args.dim} (float32, {args.clusters} clusters), {args.queries} queries, "
        f"top-{args.top_k}, {args.threads} threads, best of {args.repeats} after a warm-up; torch {torch.__version__}"
    )
    started = time.perf_counter()
    rows = []
    exact_indices = None
    for backend in args.backends:
        index = GalleryIndex(gallery, ids, backend=backend)
        start = time.perf_counter()
        if backend != "exact":
            index.search(queries[:1], 1)  # builds the FAISS index
        build = time.perf_counter() - start
        print(f"  {backend}: built in {build:.1f} s", flush=True)
        # Search-time knobs, swept over the one built index: IVF's nprobe, HNSW's efSearch.
        sweep = {"faiss-ivf": args.ivf_nprobe, "faiss-hnsw": args.hnsw_ef_search}.get(backend, [None])
        for value in sweep:
            settings = {}
            if backend == "faiss-ivf":
                index._faiss_index.nprobe = value
                settings = {"nlist": index._faiss_index.nlist, "nprobe": value}
            elif backend == "faiss-hnsw":
                hnsw = index._faiss_index.hnsw
                hnsw.efSearch = value
                settings = {
                    "M": index.backend_options.get("hnsw_m", 32),
                    "efConstruction": hnsw.efConstruction,
                    "efSearch": value,
                }
            seconds, (_, indices) = best_time(lambda index=index: index.search(queries, args.top_k), args.repeats)
            if backend == "exact":
                exact_indices = indices
            recall = None
            if exact_indices is not None:
                hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(indices, exact_indices))
                recall = hits / exact_indices.numel()
            rows.append((backend, build, args.queries / seconds, recall, settings))
        del index

    exact_qps = next((qps for backend, _, qps, _, _ in rows if backend == "exact"), None)
    print(
        f"{'backend':<11} {'build s':>8} {'queries/s':>11} {'vs exact':>9} {'recall@' + str(args.top_k):>10}  settings"
    )
    for backend, build, qps, recall, settings in rows:
        ratio = f"{qps / exact_qps:8.2f}x" if exact_qps else "      n/a"
        recall_text = f"{recall:10.3f}" if recall is not None else "       n/a"
        print(f"{backend:<11} {build:8.2f} {qps:11.0f} {ratio} {recall_text}  {settings or ''}")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/search_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {**machine(), "threads": args.threads, "faiss": faiss_version},
        "gallery_size": args.gallery_size, "dim": args.dim, "queries": args.queries, "clusters": args.clusters,
        "top_k": args.top_k, "repeats": args.repeats, "seconds": round(time.perf_counter() - started, 1),
        "rows": [
            {"backend": backend, "build_s": round(build, 3), "queries_per_s": round(qps, 1),
             "ratio_vs_exact": round(qps / exact_qps, 3) if exact_qps else None, "recall_at_k": recall, "settings": settings}
            for backend, build, qps, recall, settings in rows
        ],
    }  # fmt: skip
    write_json(args.output, result)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
