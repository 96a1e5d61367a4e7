"""The Milvus side of `GalleryIndex(backend="milvus")`: one collection of a Milvus database, through
`pymilvus.MilvusClient`.

One code path for both kinds of database: a `uri` that is a local file path (`gallery.db`) opens Milvus Lite, embedded
in this process (one process per file); `http://host:19530` reaches a Milvus server or cluster. A token, when the
database needs one, is read from the environment variable named by `token_env` (default `MILVUS_TOKEN`) at connection
time and never stored.

A collection holds one row per gallery image: `id` (the gallery id, primary key), `embedding` (L2-normalised,
inner-product metric), `folder`, `file_size`, `file_mtime_ns` (what `update` compares) and, as dynamic fields, any
metadata column of the gallery. A collection property records the model that wrote it (`projection_dim`, fingerprint,
name), so a collection written by another model is refused (`ModelMismatchError`).

Not Hub code, and imported only when the milvus backend is used: `pip install "mqirtn[milvus]"`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from transformers.utils import logging as hf_logging


logger = hf_logging.get_logger(__name__)

# Options of the milvus backend that are strings (the others, index knobs, are positive integers).
STRING_OPTIONS = ("uri", "collection", "token_env", "index_type")
INDEX_TYPES = ("HNSW", "IVF_FLAT", "FLAT")
DEFAULT_COLLECTION = "mqirtn_gallery"
DEFAULT_TOKEN_ENV = "MILVUS_TOKEN"
# Declared scalar fields of every row; other metadata columns travel as dynamic fields.
FIXED_FIELDS = {"folder": "", "file_size": -1, "file_mtime_ns": -1}
RESERVED_FIELDS = ("id", "embedding")
_MAX_ID_LENGTH = 4096
# A gRPC message to Milvus is limited (64 MB by default, less in Lite: about 5,000 rows of 256 floats failed there):
# rows go in batches of at most this many bytes of vectors.
_UPSERT_BYTES = 2 * 1024 * 1024
# Searches see every write of this client (and of others up to the engine's last time tick): "Strong" would also wait
# for other writers, at the cost of a time tick (~200 ms on a 2.3 server) per search. Counting and listing the rows,
# rare and after other processes wrote (several ranks, another machine), are "Strong".
_CONSISTENCY = "Session"
# The collection property that records the model which wrote the collection.
_IDENTITY_PROPERTY = "mqirtn.model"
# Milvus answers at most this many results per query.
MAX_TOP_K = 16384


# Open MilvusClients per Milvus Lite file in this process: the last `close` releases the file (Lite serves it from
# this process and holds its lock until released; one process per file).
_LITE_CLIENTS: dict[str, int] = {}


def _lite_file_is_locked(uri: str) -> bool:
    """Whether another process holds the lock of the Milvus Lite database `uri` (milvus-lite 3.2 locks the file
    `LOCK` in its folder); False when that cannot be told."""
    try:
        import fcntl
    except ImportError:  # Windows
        return False
    path = os.path.join(uri, "LOCK")
    if not os.path.isfile(path):
        return False
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


class MilvusBackendError(RuntimeError):
    """The Milvus database failed or refused an operation (one line naming the database and the cause)."""


def import_pymilvus():
    try:
        import pymilvus
    except ImportError as error:
        raise ImportError(
            "The 'milvus' backend needs pymilvus (and milvus-lite for a local .db file), which are not installed: "
            '`pip install "mqirtn[milvus]"`'
        ) from error
    return pymilvus


def is_local_uri(uri: str) -> bool:
    """Whether `uri` names a Milvus Lite file (anything that is not a network address)."""
    return "://" not in uri


def normalise_uri(uri: str) -> str:
    """A Lite file as an absolute path (an index folder reconnects from any working folder); a server URI as given."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"`uri` must be a Milvus Lite file path (e.g. gallery.db) or http://host:port, got {uri!r}")
    if is_local_uri(uri):
        if not uri.endswith(".db"):
            raise ValueError(f"a Milvus Lite `uri` must be a file name ending in .db, got {uri!r}")
        return str(Path(uri).expanduser().resolve())
    if not uri.startswith(("http://", "https://", "tcp://", "unix://")):
        raise ValueError(f"`uri` must be a .db file path or http(s)://host:port, got {uri!r}")
    return uri


def check_options(options: dict) -> dict:
    """The milvus backend options, checked, with their defaults filled in."""
    known = {*STRING_OPTIONS, "hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown milvus backend option(s) {unknown}; known: {sorted(known)}")
    if "uri" not in options:
        raise ValueError(
            "the 'milvus' backend needs a `uri` option: a Milvus Lite file (gallery.db) or http://host:19530"
        )
    options = dict(options)
    options["uri"] = normalise_uri(options["uri"])
    options.setdefault("collection", DEFAULT_COLLECTION)
    options.setdefault("token_env", DEFAULT_TOKEN_ENV)
    options.setdefault("index_type", "HNSW")
    name = options["collection"]
    if (
        not isinstance(name, str)
        or not name
        or not (name[0].isalpha() or name[0] == "_")
        or not all(c.isalnum() or c == "_" for c in name)
    ):
        raise ValueError(f"`collection` must be letters, digits and underscores, starting with a letter, got {name!r}")
    if options["index_type"] not in INDEX_TYPES:
        raise ValueError(f"`index_type` must be one of {list(INDEX_TYPES)}, got {options['index_type']!r}")
    for key, value in options.items():
        if key in STRING_OPTIONS:
            if not isinstance(value, str):
                raise ValueError(f"milvus option {key!r} must be a string, got {value!r}")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"milvus option {key!r} must be a positive integer, got {value!r}")
    return options


def _one_line(error: BaseException) -> str:
    message = getattr(error, "message", None) or str(error)
    return " ".join(str(message).split())[:300] or type(error).__name__


class MilvusStore:
    """One gallery collection in a Milvus database (Lite file or server). Every engine call goes through here."""

    def __init__(self, options: dict, projection_dim: int):
        self.options = check_options(options)
        self.uri, self.collection = self.options["uri"], self.options["collection"]
        self.projection_dim = int(projection_dim)
        self._client = None
        self.opened = False  # `open` checked (or created) the collection

    # ------------------------------------------------------------------------------------------- connection
    def describe(self) -> str:
        return f"collection {self.collection!r} at {self.uri}"

    @property
    def client(self):
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self):
        pymilvus = import_pymilvus()
        token = os.environ.get(self.options["token_env"], "")
        if is_local_uri(self.uri):
            try:
                import milvus_lite  # noqa: F401
            except ImportError as error:
                raise ImportError(
                    f'a local Milvus database ({self.uri}) needs milvus-lite: `pip install "mqirtn[milvus]"`, or '
                    "give a server's http://host:19530 as the uri"
                ) from error
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
            # Lite answers the iterator's timestamp request with "not implemented", logged as an error by its
            # in-process gRPC server.
            logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
        # pymilvus logs each failed call with its traceback; `_call` reports it as one line instead. Lite and Milvus
        # 2.3 servers lack the timestamp call `query_iterator` tries first (it then uses the client's clock, warning).
        logging.getLogger("pymilvus.decorators").setLevel(logging.CRITICAL)
        logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
        if is_local_uri(self.uri) and self.uri not in _LITE_CLIENTS and _lite_file_is_locked(self.uri):
            raise MilvusBackendError(
                f"the Milvus Lite database {self.uri} is open in another process (Milvus Lite allows one process per "
                ".db file): close it there, or put the gallery on a Milvus server (--uri http://host:19530)"
            )
        try:
            client = pymilvus.MilvusClient(uri=self.uri, token=token, timeout=30)
        except Exception as error:  # noqa: BLE001 (pymilvus raises MilvusException, gRPC errors, RuntimeError)
            raise MilvusBackendError(f"could not open the Milvus database {self.uri}: {_one_line(error)}") from None
        if is_local_uri(self.uri):
            _LITE_CLIENTS[self.uri] = _LITE_CLIENTS.get(self.uri, 0) + 1
        return client

    def _call(self, what: str, function, *args, **kwargs):
        """`function(*args, **kwargs)` with any engine failure turned into one `MilvusBackendError` line."""
        try:
            return function(*args, **kwargs)
        except (ValueError, TypeError, MilvusBackendError):
            raise
        except Exception as error:  # noqa: BLE001
            raise MilvusBackendError(f"Milvus {what} failed on {self.describe()}: {_one_line(error)}") from None

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client, self.opened = None, False
                if is_local_uri(self.uri):
                    _LITE_CLIENTS[self.uri] -= 1
                    if not _LITE_CLIENTS[self.uri]:
                        del _LITE_CLIENTS[self.uri]
                        from milvus_lite.server_manager import server_manager_instance

                        server_manager_instance.release_server(self.uri)

    # ------------------------------------------------------------------------------------------- collection
    def exists(self) -> bool:
        return bool(self._call("has_collection", self.client.has_collection, self.collection))

    def identity(self) -> dict | None:
        """The model record in the collection's properties, or None for a collection this package did not write."""
        described = self._call("describe_collection", self.client.describe_collection, self.collection)
        try:
            record = json.loads((described.get("properties") or {}).get(_IDENTITY_PROPERTY) or "")
        except json.JSONDecodeError:
            return None
        return record if isinstance(record, dict) else None

    def create(self, identity: dict) -> None:
        """Creates the collection (schema, vector index) recording `identity` (projection_dim, fingerprint, name)."""
        pymilvus = import_pymilvus()
        DataType = pymilvus.DataType
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=_MAX_ID_LENGTH)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.projection_dim)
        schema.add_field("folder", DataType.VARCHAR, max_length=_MAX_ID_LENGTH)
        schema.add_field("file_size", DataType.INT64)
        schema.add_field("file_mtime_ns", DataType.INT64)
        index_params = self.client.prepare_index_params()
        index_params.add_index(
            field_name="embedding",
            index_type=self.options["index_type"],
            metric_type="IP",
            params=self.build_params(),
        )
        self._call(
            "create_collection",
            self.client.create_collection,
            self.collection,
            schema=schema,
            index_params=index_params,
            consistency_level=_CONSISTENCY,
            properties={_IDENTITY_PROPERTY: json.dumps(identity, sort_keys=True)},
        )

    def build_params(self) -> dict:
        kind, options = self.options["index_type"], self.options
        if kind == "HNSW":
            return {"M": options.get("hnsw_m") or 32, "efConstruction": options.get("ef_construction") or 80}
        if kind == "IVF_FLAT":
            return {"nlist": options.get("nlist") or 1024}
        return {}

    def search_params(self, top_k: int) -> dict:
        kind, options = self.options["index_type"], self.options
        if kind == "HNSW":
            # HNSW needs ef >= the number of results.
            return {"metric_type": "IP", "params": {"ef": max(options.get("ef_search") or 64, top_k)}}
        if kind == "IVF_FLAT":
            return {"metric_type": "IP", "params": {"nprobe": options.get("nprobe") or 16}}
        return {"metric_type": "IP", "params": {}}

    def open(self, identity: dict, create: bool) -> None:
        """Checks (or, with `create`, makes) the collection; `ModelMismatchError` if another model wrote it."""
        from .index import ModelMismatchError

        if not self.exists():
            if not create:
                raise MilvusBackendError(
                    f"the {self.describe()} does not exist (dropped, or another database): rebuild the index"
                )
            self.create(identity)
            self.opened = True
            return
        found = self.identity()
        if found is None:
            raise ValueError(
                f"the {self.describe()} was not written by mqirtn (its properties record no model); choose another "
                "collection name"
            )
        if found.get("projection_dim") != identity.get("projection_dim") or (
            identity.get("fingerprint") and found.get("fingerprint") != identity.get("fingerprint")
        ):
            raise ModelMismatchError(
                f"the {self.describe()} was written by another model ({found.get('model_name_or_path') or 'unknown'}, "
                f"projection_dim {found.get('projection_dim')}, fingerprint {str(found.get('fingerprint'))[:12]}); "
                "index into another collection or with that model"
            )
        self._call("load_collection", self.client.load_collection, self.collection)
        self.opened = True

    def drop(self) -> None:
        if self.exists():
            self._call("drop_collection", self.client.drop_collection, self.collection)

    # ------------------------------------------------------------------------------------------- rows
    def upsert(self, ids: Sequence[str], embeddings: np.ndarray, metadata: Sequence[dict]) -> None:
        """Writes rows (replacing rows with the same id), in batches under the message size limit."""
        rows_per_batch = max(1, _UPSERT_BYTES // (4 * self.projection_dim + 256))
        for start in range(0, len(ids), rows_per_batch):
            rows = []
            for position in range(start, min(start + rows_per_batch, len(ids))):
                row = {**FIXED_FIELDS, **metadata[position]}
                row["id"], row["embedding"] = ids[position], embeddings[position].tolist()
                rows.append(row)
            self._call("upsert", self.client.upsert, self.collection, rows)

    def delete(self, ids: Sequence[str]) -> None:
        for start in range(0, len(ids), 1000):
            self._call("delete", self.client.delete, self.collection, ids=list(ids[start : start + 1000]))

    def count(self) -> int:
        result = self._call(
            "count",
            self.client.query,
            self.collection,
            filter="",
            output_fields=["count(*)"],
            consistency_level="Strong",
        )
        return int(result[0]["count(*)"])

    def rows(self, fields: Sequence[str], batch_size: int = 10000) -> Iterator[dict]:
        """Every row's `id` and `fields`, in batches (no row twice, in no particular order)."""
        iterator = self._call(
            "query_iterator",
            self.client.query_iterator,
            self.collection,
            batch_size=batch_size,
            filter="",
            output_fields=["id", *fields],
            consistency_level="Strong",
        )
        try:
            while True:
                batch = self._call("query_iterator", iterator.next)
                if not batch:
                    return
                yield from batch
        finally:
            iterator.close()

    def search(self, queries: np.ndarray, top_k: int, filter: str | None) -> list[list[tuple[str, float]]]:
        """For each query, up to `top_k` `(id, score)` pairs best first (inner product of unit vectors)."""
        if top_k > MAX_TOP_K:
            raise ValueError(f"the milvus backend returns at most {MAX_TOP_K} results per query, got top_k={top_k}")
        results = []
        # Milvus caps the queries of one request too (nq <= 16384).
        for start in range(0, len(queries), 1024):
            found = self._call(
                f"search with filter {filter!r}" if filter else "search",
                self.client.search,
                self.collection,
                data=queries[start : start + 1024].tolist(),
                limit=top_k,
                filter=filter or "",
                output_fields=["id"],
                search_params=self.search_params(top_k),
                consistency_level=_CONSISTENCY,
            )
            results.extend([(hit["id"], float(hit["distance"])) for hit in hits] for hits in found)
        return results

    def index_state(self) -> dict:
        """`describe_index` of the vector index: total_rows, indexed_rows, pending_index_rows, state."""
        return self._call("describe_index", self.client.describe_index, self.collection, "embedding")

    def wait_for_index(self, timeout: float) -> bool | None:
        """Waits up to `timeout` seconds until the vector index covers every row. True when it does, False when the
        time ran out (searches until then are exact, brute force, over the rows not yet indexed: right, slower),
        None when the engine cannot tell.

        A Milvus server reports its progress in `describe_index`. Milvus Lite reports "Finished" at once and builds
        in a background thread; its engine (milvus-lite 3.2) is asked directly to drain that thread's queue.
        """
        # Rows still in the engine's write buffer are never indexed: seal them into segments first.
        self._call("flush", self.client.flush, self.collection)
        if is_local_uri(self.uri):
            return self._wait_for_lite(timeout)
        deadline = time.monotonic() + timeout
        while True:
            state = self.index_state()
            pending = int(state.get("pending_index_rows") or 0)
            total, indexed = int(state.get("total_rows") or 0), int(state.get("indexed_rows") or 0)
            if pending == 0 and indexed >= total:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    def _wait_for_lite(self, timeout: float) -> bool | None:
        try:
            from milvus_lite.server_manager import server_manager_instance

            _, database, _ = server_manager_instance._servers[self.uri]
            collection = database.get_collection(self.collection)
            wait = collection._wait_for_bg
        except (ImportError, KeyError, AttributeError, TypeError, ValueError):
            return None  # another milvus-lite release: it cannot be asked
        try:
            wait(timeout=timeout)
        except TimeoutError:
            return False
        return True


__all__ = ["DEFAULT_COLLECTION", "INDEX_TYPES", "MilvusBackendError", "MilvusStore", "check_options"]
