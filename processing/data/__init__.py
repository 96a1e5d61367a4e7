"""Data code (never shipped to the Hub): the dataset registry, the loaders, the training/evaluation transforms,
the retrieval metrics and the built-in shapes benchmark.

- `registry`: one `DatasetSpec` per dataset (loader, protocol, splits, headline metric, display name, Recall Ks);
- `loaders`: the loaders of FashionIQ, CIRR, Fashion200k, MIT-States, your own files and `datasets` datasets;
- `shapes`: the built-in shapes benchmark (generated and cached);
- `transforms`: lazy `datasets` transforms and collators that turn rows into model batches through the processor;
- `metrics`: the evaluation protocols (Recall@K in percent) and the CIRR test-server files.

Modules are imported on their own (`from processing.data.metrics import recall_at_k`); this package imports nothing.
"""
