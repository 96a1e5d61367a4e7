"""The dataset registry: one `DatasetSpec` per dataset, the only place a dataset's facts live.

The training code (choices, default splits, the model-selection metric, which options a loader takes), the loaders'
entry points (`load_training_queries`, `load_evaluation_data`), the metrics (a spec's Recall Ks are its protocol's)
and the model card (display name) all read it. A dataset registers itself with `register_dataset` next to its loader
(`processing.data.folder_datasets` and `processing.data.loaders` hold the built-in ones), so adding a dataset touches one file.

>>> from processing.data.registry import get_dataset_spec
>>> spec = get_dataset_spec("cirr")
>>> spec.protocol, spec.default_splits, spec.headline_metric, spec.recall_ks
('cirr', ('val', None, 'test1'), 'average', (1, 5, 10, 50))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


# The ranks each evaluation protocol reports Recall at (`processing.data.metrics` computes them); a dataset's Recall Ks
# are its protocol's.
PROTOCOL_KS: dict[str, tuple[int, ...]] = {
    "shapes": (1, 5, 10, 50),
    "fashioniq": (10, 50),
    "cirr": (1, 5, 10, 50),
    "fashion200k": (1, 10, 50),
    "mitstates": (1, 5, 10),
    "exact": (1, 5, 10, 50),
}


# How a dataset's `data_dir` is read: not at all (generated), a folder/file in the dataset's own layout, or the name
# (or local path) of a `datasets` dataset.
DATA_DIR_KINDS: tuple[str, ...] = ("none", "folder", "dataset")
# Options every folder dataset's loader takes from the command line.
FOLDER_OPTIONS: tuple[str, ...] = ("check_images",)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the rest of the package knows about one dataset.

    Attributes:
        name: the registry key (`--dataset NAME`).
        display_name: the name in tables and the model card.
        protocol: the evaluation protocol (`processing.data.metrics.PROTOCOLS`); it fixes the Recall Ks.
        eval_split: split evaluated by default (`--do_eval`).
        validation_split: split for model selection during training, or `None` (then none by default).
        predict_split: split of `--do_predict` (test-server files), or `None` (not supported).
        headline_metric: the metric that selects the best model (`"recall@1"`, or e.g. `"average"`).
        data_dir: one of `DATA_DIR_KINDS`.
        options: keyword options of the loaders that a training script may fill from its command line
            (`check_images`, `both_caption_orders`, `num_queries`, ...).
        load_training: `(data_dir, split, **options) -> datasets.Dataset` of training queries.
        load_evaluation: `(data_dir, split, **options) -> CIREvaluationData`.
    """

    name: str
    display_name: str
    protocol: str
    eval_split: str
    load_training: Callable[..., Any]
    load_evaluation: Callable[..., Any]
    validation_split: str | None = None
    predict_split: str | None = None
    headline_metric: str = "recall@1"
    data_dir: str = "folder"
    options: tuple[str, ...] = FOLDER_OPTIONS

    def __post_init__(self):
        if self.protocol not in PROTOCOL_KS:
            raise ValueError(
                f"`protocol` of dataset {self.name!r} must be one of {tuple(PROTOCOL_KS)}, got {self.protocol!r}"
            )
        if self.data_dir not in DATA_DIR_KINDS:
            raise ValueError(
                f"`data_dir` of dataset {self.name!r} must be one of {DATA_DIR_KINDS}, got {self.data_dir!r}"
            )

    @property
    def recall_ks(self) -> tuple[int, ...]:
        """The ranks its protocol reports Recall at."""
        return PROTOCOL_KS[self.protocol]

    @property
    def default_splits(self) -> tuple[str, str | None, str | None]:
        """(evaluation split, model-selection split, prediction split)."""
        return self.eval_split, self.validation_split, self.predict_split


DATASETS: dict[str, DatasetSpec] = {}
# Modules that register datasets when imported; `get_dataset_spec` / `dataset_names` import them first.
_PROVIDERS: tuple[str, ...] = ("processing.data.loaders", "processing.data.folder_datasets")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Adds `spec` to `DATASETS` (a second spec with the same name is an error); returns it."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"`spec` must be a DatasetSpec, got {type(spec).__name__}")
    if spec.name in DATASETS and DATASETS[spec.name] != spec:
        raise ValueError(f"a dataset named {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


def _load_providers() -> None:
    for module in _PROVIDERS:
        importlib.import_module(module)


def dataset_names() -> tuple[str, ...]:
    """Names of every registered dataset, in registration order."""
    _load_providers()
    return tuple(DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec of dataset `name`; a `ValueError` lists the known names."""
    _load_providers()
    if name not in DATASETS:
        raise ValueError(f"`name` must be one of {tuple(DATASETS)}, got {name!r}")
    return DATASETS[name]


__all__ = ["DATASETS", "DatasetSpec", "dataset_names", "get_dataset_spec", "register_dataset"]
