"""The MQIRTN application (never shipped to the Hub; no Hub file imports it): what is built on the model.

- `cli`: the `mqirtn` console script (`mqirtn index`, `mqirtn search`);
- `index`: `GalleryIndex`, embeddings of an image collection saved to disk and searched (exact or FAISS);
- `visualization`: results grids and cross-attention maps drawn with PIL;
- `model_card`: the Hub model card `train.py` writes, and the upload of a trained model;
- `atomic`: atomic file and folder writes (the index, checkpoints and saved models).

Modules are imported on their own; this package imports nothing, so `mqirtn --help` starts without torch.
"""

# The search backends of `GalleryIndex`, here so that the command-line parser can list them without importing torch.
# "milvus": a collection in a Milvus database (Lite file or server), `mqirtn_app.milvus_store`.
BACKENDS: tuple[str, ...] = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw", "milvus")
# The largest integer knob (nlist, nprobe, ef_search, ...) a backend takes: FAISS and Milvus read them as C ints.
MAX_BACKEND_OPTION = 2**31 - 1
