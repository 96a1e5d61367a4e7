"""`mqirtn`: index a folder of images with an MQIRTN model, and search it with (reference image, modification text).

    mqirtn index --model DIR_OR_ID --images FOLDER_OR_JSONL_OR_CSV --out INDEX_DIR [--batch-size N] [--num-workers N]
                 [--backend exact|faiss-flat|faiss-ivf|faiss-hnsw|milvus] [--update]
                 [--uri gallery.db|http://host:19530] [--collection NAME] [--token-env NAME]
                 [--index-type HNSW|IVF_FLAT|FLAT] [--hnsw-m N] [--ef-construction N] [--ef-search N] [--nlist N]
                 [--nprobe N] [--device auto|cpu|cuda|cuda:N|mps] [--dtype float32|bfloat16|float16]
    mqirtn search --index INDEX_DIR --image query.jpg --text "make it red" [--top-k 10] [--filter EXPR] [--json]
                  [--grid results.png] [--attention attention.png] [--target ID] [--model DIR_OR_ID]
                  [--device ...] [--dtype ...]
    mqirtn --version

The index remembers its model, so `search` needs no `--model` (give one to search with another copy of the same
checkpoint; a different checkpoint is refused). With a faiss-* backend, `index` builds the FAISS index and saves
it in the index folder, so each `search` reads it instead of re-training/rebuilding it. Under `accelerate launch` /
`torchrun` with several processes, `index` embeds one shard of the folder per process and the main process writes
the merged index. `index` decodes and preprocesses the images in `--num-workers` DataLoader worker processes (per
process) while the model embeds, overlapping the two; `--num-workers 0` decodes in the main process. The index
is the same either way.
`--backend milvus --uri gallery.db` writes the gallery into a Milvus Lite file, `--uri http://host:19530` into a
Milvus server or cluster (token from the environment variable `--token-env`, default MILVUS_TOKEN; never written
to disk); the index folder then records the database and collection, and `search` reconnects to it. `--update`
embeds only the new and changed files of the folder and deletes the rows of removed ones. `search --filter` keeps the
rows whose metadata match (`folder == "shoes"`; `folder` is the image's folder relative to the indexed one).
No Python file of a model folder runs unless `--trust-remote-code` is given (the installed MQIRTN classes load its
safetensors); a model path read from an index then runs only if its code files match the digest the index recorded.
Errors are one line on stderr and exit status 1 (2 for bad command-line usage); no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Only the standard library and this constant at import time: `mqirtn --help` must not wait for torch.
from . import BACKENDS, MAX_BACKEND_OPTION


class CLIError(Exception):
    """An error reported as one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of argparse's usage block + message.
        self.exit(2, f"{self.prog}: error: {message}\n")


_DTYPES = ("float32", "bfloat16", "float16")
_DEVICE_HELP = (
    "where the model runs: auto (default: the first GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps; under "
    "accelerate launch / torchrun each process uses its own device (auto) or the CPU (cpu)"
)
_DTYPE_HELP = (
    "dtype of the model's weights and computations (default float32); bfloat16/float16 halve the memory. An index "
    "remembers its model's weights in this dtype: search it with the dtype it was built with"
)


_WORKERS_HELP = (
    "DataLoader worker processes (per process) decoding and preprocessing images while the model embeds; 0 decodes in "
    "the main process; the index is the same. Default: min(4, CPUs per process) with the model on a GPU, min(4, a "
    "quarter of them) on the CPU (none below 4 CPUs: there the workers take cores from the model's threads; with few "
    "cores, OMP_NUM_THREADS=1 and --num-workers 1 or 2 can be faster)"
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mqirtn")
    except PackageNotFoundError:
        return "(not installed; running from a checkout)"


_TRUST_HELP = (
    "run the Python files of the model folder (its own architecture) instead of this package's installed classes; "
    "off by default. A model path read from an index runs code only if its code files match the index's digest"
)


# Index knobs: flag -> help; the backend option is the flag with underscores. Each acts on the backends named.
_INDEX_KNOBS = {
    "hnsw-m": "faiss-hnsw / milvus HNSW: links per node (M, default 32)",
    "ef-construction": "faiss-hnsw / milvus HNSW: build-time candidate list (efConstruction, default 80)",
    "ef-search": "faiss-hnsw / milvus HNSW: search-time candidate list (ef, default 64)",
    "nlist": "faiss-ivf / milvus IVF_FLAT: number of lists",
    "nprobe": "faiss-ivf / milvus IVF_FLAT: lists searched (default 16)",
}
_KNOB_BACKENDS = {
    "hnsw-m": ("faiss-hnsw", "milvus"),
    "ef-construction": ("faiss-hnsw", "milvus"),
    "ef-search": ("faiss-hnsw", "milvus"),
    "nlist": ("faiss-ivf", "milvus"),
    "nprobe": ("faiss-ivf", "milvus"),
}


def _backend_options(args) -> dict:
    """The `backend_options` the index flags ask for; a flag that does not act on `--backend` is refused."""
    options = {}
    for flag in _INDEX_KNOBS:
        value = getattr(args, flag.replace("-", "_"))
        if value is None:
            continue
        if args.backend not in _KNOB_BACKENDS[flag]:
            raise CLIError(f"--{flag} applies to --backend {' or '.join(_KNOB_BACKENDS[flag])}, not {args.backend}")
        if not 1 <= value <= MAX_BACKEND_OPTION:
            raise CLIError(f"--{flag} must be a positive integer up to {MAX_BACKEND_OPTION}, got {value}")
        options[flag.replace("-", "_")] = value
    milvus = {
        "uri": args.uri,
        "collection": args.collection,
        "token_env": args.token_env,
        "index_type": args.index_type,
    }
    given = {key: value for key, value in milvus.items() if value is not None}
    if args.backend == "milvus":
        if args.uri is None:
            raise CLIError("--backend milvus needs --uri: a Milvus Lite file (gallery.db) or http://host:19530")
        options.update(given)
    elif given:
        flag = "--" + next(iter(given)).replace("_", "-")
        raise CLIError(f"{flag} applies to --backend milvus only")
    return options


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mqirtn", description="Composed image retrieval with an MQIRTN model.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    index = commands.add_parser("index", help="embed a folder of images into a gallery index")
    index.add_argument("--model", required=True, help="saved model folder or Hub id (with its processor)")
    index.add_argument(
        "--images",
        required=True,
        help="folder of images, searched recursively, or a .jsonl/.csv file listing them (column `image`: a path "
        "relative to the file; the other columns become filterable metadata)",
    )
    index.add_argument("--out", required=True, help="folder to write the index into")
    index.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    index.add_argument("--num-workers", type=int, default=None, help=_WORKERS_HELP)
    index.add_argument("--backend", default="exact", choices=BACKENDS, help="search backend (default exact)")
    index.add_argument(
        "--update",
        action="store_true",
        help="update the index at --out: embed only new or changed files (size, mtime), delete rows of removed ones",
    )
    index.add_argument("--uri", help="milvus: a Milvus Lite file (gallery.db) or a server, http://host:19530")
    index.add_argument("--collection", help="milvus: collection name (default mqirtn_gallery)")
    index.add_argument("--token-env", help="milvus: environment variable holding the token (default MILVUS_TOKEN)")
    index.add_argument(
        "--index-wait",
        type=int,
        default=600,
        help="milvus: seconds to wait for the vector index to cover every row after writing (default 600; 0: none)",
    )
    index.add_argument(
        "--index-type", choices=("HNSW", "IVF_FLAT", "FLAT"), help="milvus: vector index (default HNSW)"
    )
    for flag, what in _INDEX_KNOBS.items():
        index.add_argument(f"--{flag}", type=int, help=what)
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    index.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    index.add_argument("--device", default="auto", help=_DEVICE_HELP)
    index.add_argument("--dtype", default="float32", choices=_DTYPES, help=_DTYPE_HELP)

    search = commands.add_parser("search", help="search an index with a reference image and a modification text")
    search.add_argument("--index", required=True, help="folder written by `mqirtn index`")
    search.add_argument("--image", required=True, help="reference image (path or URL)")
    search.add_argument("--text", required=True, help="modification text, e.g. 'make it red'")
    search.add_argument("--top-k", type=int, default=10, help="number of results (default 10)")
    search.add_argument(
        "--filter", help="keep rows whose metadata match, e.g. 'folder == \"shoes\"' (==, !=, in, not in, and)"
    )
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    search.add_argument("--grid", help="write a results-grid PNG here")
    search.add_argument("--attention", help="write a text->image attention PNG here")
    search.add_argument("--target", help="id of the known target image, outlined in the grid")
    search.add_argument("--model", help="model to search with (default: the one recorded in the index)")
    search.add_argument("--backend", choices=BACKENDS, help="override the index's search backend")
    search.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    search.add_argument("--device", default="auto", help=_DEVICE_HELP)
    search.add_argument("--dtype", default="float32", choices=_DTYPES, help=_DTYPE_HELP)
    return parser


def resolve_device(name: str):
    """The `torch.device` that `--device NAME` means in a single process; one-line errors for what is not there."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return device


def _accelerator(device_name: str):
    """Under accelerate launch / torchrun (several processes): the Accelerator, on the CPU with `--device cpu`."""
    if device_name not in ("auto", "cpu"):
        raise CLIError(
            f"--device {device_name}: under accelerate launch / torchrun each process uses its own device; "
            "give --device auto (or cpu)"
        )
    from accelerate import Accelerator

    return Accelerator(cpu=device_name == "cpu")


def _hub_kernels(config) -> list[str]:
    """The attention implementations of a config dict (and its sub-configs) that name a Hub repository ("org/repo",
    optionally with ":function" or "@revision"): transformers downloads and runs such a kernel."""
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            if key in ("attn_implementation", "_attn_implementation") and isinstance(value, str) and "/" in value:
                found.append(value)
            elif isinstance(value, (dict, list)):
                found.extend(_hub_kernels(value))
    elif isinstance(config, list):
        for item in config:
            found.extend(_hub_kernels(item))
    return found


def _refuse_hub_kernels(name_or_path: str) -> None:
    """`CLIError` when the model's config.json asks for an attention kernel from the Hub (code that would run)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(name_or_path)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"could not load the model {name_or_path!r}: {first_line}") from error
    kernels = _hub_kernels(config)
    if kernels:
        raise CLIError(
            f"the config of {name_or_path!r} asks for the attention kernel {kernels[0]!r} from the Hub, which would "
            "download and run its code; pass --trust-remote-code to allow it (only for a model you trust)"
        )


def load_model(name_or_path: str, trust_remote_code: bool = False, device=None, dtype: str = "float32"):
    """Model and processor of `name_or_path`: with this package's installed classes unless `trust_remote_code`; the
    model in `dtype` (a `--dtype` name) on `device` (a `torch.device`, default the CPU), in eval mode.

    Without consent no Python file of the folder runs: an MQIRTN folder loads with the installed classes (its weights
    are safetensors), any other architecture is refused.
    """
    if (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))) and not os.path.isdir(
        os.path.expanduser(name_or_path)
    ):
        raise CLIError(f"the model folder {name_or_path!r} does not exist")
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoProcessor

    import modeling_mqirtn  # noqa: F401  (registers the MQIRTN Auto classes, the AutoProcessor and the pipeline task)

    if not trust_remote_code:
        _refuse_hub_kernels(name_or_path)
    try:
        model, loading = AutoModel.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype), output_loading_info=True
        )
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        if not trust_remote_code and "custom code" in str(error):
            raise CLIError(
                f"the model {name_or_path!r} is not an architecture this package installs and needs its own code to "
                "load; pass --trust-remote-code to run it (only for a folder you trust)"
            ) from error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"could not load the model {name_or_path!r}: {first_line}") from error
    if not hasattr(model, "get_query_features"):
        raise CLIError(f"{name_or_path!r} is a {model.config.model_type!r} model, not an MQIRTN model")
    missing = sorted(loading.get("missing_keys") or ())
    if missing:
        # transformers would initialise them at random: an index or a search with random layers is silently wrong.
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CLIError(f"the weights of {name_or_path!r} lack {len(missing)} tensor(s) of the model ({shown})")
    return model.to(device or "cpu").eval(), processor


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _index(args) -> int:
    from .index import IMAGE_EXTENSIONS, GalleryIndex, image_files

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.num_workers is not None and args.num_workers < 0:
        raise CLIError(
            f"--num-workers must be a non-negative integer (0: decode in the main process), got {args.num_workers}"
        )
    table = Path(args.images).suffix.lower() in (".jsonl", ".csv") and Path(args.images).is_file()
    if table and args.update:
        raise CLIError("--update compares the files of a folder; for a .jsonl/.csv gallery, index it again")
    if not table and not Path(args.images).is_dir():
        raise CLIError(f"--images {args.images!r} does not exist or is not a folder (or a .jsonl/.csv gallery file)")
    if not table and not image_files(args.images):
        raise CLIError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under --images {args.images!r}")
    options = _backend_options(args)
    accelerator = _accelerator(args.device) if _distributed() else None
    device = accelerator.device if accelerator is not None else resolve_device(args.device)
    model, processor = load_model(args.model, args.trust_remote_code, device, args.dtype)
    if args.update and Path(args.out, "index.json").is_file():
        return _update(args, model, processor, accelerator)
    build = GalleryIndex.from_table if table else GalleryIndex.from_folder
    index = build(
        model,
        processor,
        args.images,
        batch_size=args.batch_size,
        backend=args.backend,
        backend_options=options,
        accelerator=accelerator,
        progress=not args.no_progress,
        num_workers=args.num_workers,
    )
    is_main_process, processes = True, ""
    if accelerator is not None:
        # Every process holds the merged index now. Release the others before the main process builds the FAISS index
        # and writes: a long IVF/HNSW build (minutes at millions of images) must not keep them in a barrier that can
        # time out, and a failed write must not leave them waiting.
        is_main_process, processes = (
            accelerator.is_main_process,
            f", embedded by {accelerator.num_processes} processes",
        )
        accelerator.wait_for_everyone()
        accelerator.end_training()
    if is_main_process:
        if index.backend != "exact" and not args.no_progress:
            print(f"Building the {index.backend} index over {len(index)} images...", file=sys.stderr, flush=True)
        index.save(args.out)  # with a faiss-* backend, builds the FAISS index and saves it with the embeddings
        _wait_for_index(index, args)
        skipped = f", skipped {len(index.skipped)} unreadable file(s)" if index.skipped else ""
        where = f", {index._store.describe()}" if index.backend == "milvus" else ""
        print(
            f"Indexed {len(index)} images from {args.images} into {args.out} (backend {index.backend}{where}{skipped}"
            f"{processes})"
        )
    index.close()
    return 0


def _wait_for_index(index, args) -> None:
    """milvus: waits (bounded by --index-wait) for the engine to index every row, saying so on stderr."""
    if index.backend != "milvus" or args.index_wait == 0:
        return
    if not args.no_progress:
        print(f"Waiting up to {args.index_wait} s for Milvus to index every row...", file=sys.stderr, flush=True)
    done = index.wait_for_index(args.index_wait)
    if done is False:
        print(
            f"The Milvus vector index is still being built after {args.index_wait} s; searches until it is done are "
            "exact over the rows not yet indexed (correct, slower)",
            file=sys.stderr,
        )


def _update(args, model, processor, accelerator) -> int:
    """`index --update` of an existing index folder: the folder's new and changed files embedded, removed ones
    deleted, the rest kept."""
    from .index import GalleryIndex

    if accelerator is not None and accelerator.num_processes > 1:
        raise CLIError("--update runs in one process (it embeds only what changed); run it without accelerate launch")
    index = GalleryIndex.load(args.out, model=model, processor=processor)
    if args.backend != index.backend:
        raise CLIError(
            f"--update: the index at {args.out} uses backend {index.backend!r}, not --backend {args.backend}"
        )
    if index.root is None or Path(args.images).resolve() != Path(index.root):
        raise CLIError(
            f"--update: the index at {args.out} was built from {index.root!r}, not --images {args.images!r}"
        )
    workers = 0 if args.num_workers is None else args.num_workers
    counts = index.update_folder(batch_size=args.batch_size, progress=not args.no_progress, num_workers=workers)
    index.save(args.out)
    _wait_for_index(index, args)
    index.close()
    print(
        f"Updated {args.out} from {args.images}: {counts['added']} added, {counts['changed']} changed, "
        f"{counts['removed']} removed, {counts['unchanged']} unchanged"
        + (f", skipped {counts['skipped']} unreadable file(s)" if counts["skipped"] else "")
        + f" ({len(index)} images, backend {index.backend})"
    )
    return 0


def _check_model_code(index, model_name: str) -> None:
    """Raises unless the code files of the model folder named by the index are those it recorded when built."""
    from .index import model_code_digest

    if not index.model_code:
        raise CLIError(
            "the index records no digest of its model's code files, so --trust-remote-code would run whatever "
            f"{model_name!r} holds now; name the model with --model to run its code"
        )
    if not os.path.isdir(model_name):
        raise CLIError(f"the model folder {model_name!r} recorded in the index does not exist")
    current = model_code_digest(model_name)
    differing = sorted(
        name for name in set(current) | set(index.model_code) if current.get(name) != index.model_code.get(name)
    )
    if differing:
        raise CLIError(
            f"the code files of {model_name!r} changed since the index was built ({', '.join(differing)}); refusing to "
            "run them: name the model with --model to run its code"
        )


def _search(args) -> int:
    from modeling_mqirtn import ComposedImageRetrievalPipeline

    from .index import GalleryIndex

    if args.top_k < 1:
        raise CLIError(f"--top-k must be a positive integer, got {args.top_k}")
    device = resolve_device(args.device)
    is_url = args.image.startswith(("http://", "https://"))
    if not is_url and not Path(args.image).is_file():
        raise CLIError(f"--image {args.image!r} does not exist")
    index = GalleryIndex.load(args.index, backend=args.backend)
    model_name = args.model or index.model_name_or_path
    if not model_name:
        raise CLIError(f"the index {args.index!r} does not record its model; pass --model")
    if index.fingerprint is None:
        raise CLIError(
            f"the index {args.index!r} records no model fingerprint, so no model can be checked against it; rebuild it"
        )
    if args.trust_remote_code and not args.model:
        # Consent was given for the code of the model the index was built with, not for whatever the path now holds.
        _check_model_code(index, model_name)
    model, processor = load_model(model_name, args.trust_remote_code, device, args.dtype)
    from .index import ModelMismatchError

    try:
        index.check_model(model)
    except ModelMismatchError as error:
        if model.config.projection_dim != index.projection_dim:
            raise
        # The fingerprint covers the weights in the dtype the index was built with: the same checkpoint in another
        # dtype differs too.
        raise CLIError(
            f"{error}; if the index was built from this model with another --dtype, search it with that --dtype "
            f"(this search loaded it in {args.dtype})"
        ) from error
    index.model, index.processor = model, processor
    if args.target is not None and args.target not in index.ids:
        raise CLIError(f"--target {args.target!r} is not an id of the index")

    pipe = ComposedImageRetrievalPipeline(model=model, processor=processor, device=device)
    if args.filter is not None and index.backend != "milvus":
        from .filters import parse_filter

        parse_filter(args.filter)  # a malformed filter fails before the model runs
    results = pipe(image=args.image, text=args.text, gallery=index, top_k=args.top_k, filter=args.filter)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"{'rank':>4}  {'score':>7}  id")
        for rank, result in enumerate(results, start=1):
            print(f"{rank:>4}  {result['score']:7.4f}  {result['id']}")

    if args.grid:
        from .visualization import save_results_grid

        ids = [result["id"] for result in results]
        save_results_grid(
            args.grid,
            args.image,
            args.text,
            [index.image_path(result["index"]) for result in results],
            [result["score"] for result in results],
            target_index=ids.index(args.target) if args.target in ids else None,
            ids=ids,
        )
        print(f"Wrote the results grid to {args.grid}", file=sys.stderr)
    if args.attention:
        from .visualization import save_attention_map

        save_attention_map(args.attention, model, processor, args.image, args.text)
        print(f"Wrote the attention map to {args.attention}", file=sys.stderr)
    index.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mqirtn` console script; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    from .index import DecodeWorkerError, ModelMismatchError

    try:
        return _index(args) if args.command == "index" else _search(args)
    except (
        CLIError,
        ModelMismatchError,
        DecodeWorkerError,
        ValueError,
        FileNotFoundError,
        ImportError,
        OSError,
    ) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"mqirtn {args.command}: error: {message}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        from .milvus_store import MilvusBackendError

        if not isinstance(error, MilvusBackendError):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"mqirtn {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
