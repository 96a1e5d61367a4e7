"""The Hub model card of a trained MQIRTN model (filled from `model_card.md`) and the upload of its folder.

The dataset's display name comes from the dataset registry (`processing.data.registry`); the results become
`model-index` entries of the card's YAML metadata.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from processing.data.registry import get_dataset_spec


TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"
# What a model folder written by train.py holds that does not belong on the Hub (TensorBoard logs in `runs/` do: the
# Hub shows them as the model's training metrics).
UPLOAD_IGNORE_PATTERNS: tuple[str, ...] = ("checkpoints/**", "best_model/**", "results_grids/**", ".*/**")
# setup.cfg's `license = Apache-2.0` as a Hub license id (a test keeps the two equal).
LICENSE = "apache-2.0"
# The Hub task of the model-index: the pipeline tag (the model embeds queries and gallery images; the Hub has no
# composed-retrieval task), so card and results name the same task.
TASK_TYPE = "image-feature-extraction"
METRIC_DIGITS = 4


def rounded(value, digits: int = METRIC_DIGITS):
    """`value` with every float in it (nested dicts and lists too) rounded to `digits` decimals: for metrics in
    percent, where float32 noise such as 5.000000074505806 means nothing (not for small diagnostics).

    >>> rounded({"test": {"recall@1": 5.000000074505806, "recall@5": 33.33333333}})
    {'test': {'recall@1': 5.0, 'recall@5': 33.3333}}
    """
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def is_hub_id(name: str) -> bool:
    """Whether `name` is a Hub repository id (`NAME` or `ORG/NAME`), not a local path: only those go into a card.

    >>> is_hub_id("google/vit-base-patch16-224-in21k"), is_hub_id("/data/my_cir"), is_hub_id("./data")
    (True, False, False)
    """
    return (
        bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name))
        and ".." not in name
        and not Path(name).exists()
    )


def metric_type(metric: str) -> str:
    """The model-index metric type of a metric name, one per metric: `recall@1` -> `recall_at_1`,
    `recall_subset@2` -> `recall_subset_at_2`, `dress_recall@10` -> `dress_recall_at_10`.

    >>> [metric_type(name) for name in ("recall@1", "recall@5", "recall_subset@2")]
    ['recall_at_1', 'recall_at_5', 'recall_subset_at_2']
    """
    return re.sub(r"[^a-z0-9]+", "_", metric.lower().replace("@", "_at_")).strip("_")


def _results_table(results: dict[str, dict[str, float]]) -> str:
    rows = [
        f"| split | {' | '.join(metrics)} |\n|---|{'---|' * len(metrics)}\n| {split} | "
        + " | ".join(f"{value:.2f}" for value in metrics.values())
        + " |"
        for split, metrics in results.items()
    ]
    return "\n".join(rows) or "Not evaluated."


def write_model_card(
    folder: str | os.PathLike,
    results: dict[str, dict[str, float]],
    training_summary: dict,
    dataset: str,
    composition: str,
    hub_dataset_name: str | None = None,
    base_models: Sequence[str] = (),
    hub_model_id: str | None = None,
    template_path: str | os.PathLike = TEMPLATE,
    path: str | os.PathLike | None = None,
) -> Path:
    """Writes `folder/README.md`: YAML metadata (model-index from `results`) + the filled template; returns its path.

    Args:
        folder: the saved model folder.
        results: `{split: {metric: percent}}`.
        training_summary: `{what: value}` rows of the training table.
        dataset: the registry name of the training dataset (`"hub"` with `hub_dataset_name` for a `datasets` one).
        composition: the model's `config.composition`.
        hub_dataset_name: the `datasets` dataset (Hub id or local path; a local path never appears in the card, only
            its folder name).
        base_models: Hub ids of the pretrained towers (or of the fine-tuned model).
        hub_model_id: `ORG/NAME` the model is pushed to, if any.
        path: where to write the card (default `folder/README.md`; a staged copy of the folder when the card is
            swapped in with the model).
    """
    folder = Path(folder)
    spec = get_dataset_spec(dataset)
    if spec.data_dir == "dataset" and not hub_dataset_name:
        raise ValueError(f"`hub_dataset_name` must name the `datasets` dataset for dataset={dataset!r}")
    hub_dataset = hub_dataset_name if spec.data_dir == "dataset" and is_hub_id(hub_dataset_name) else None
    if spec.data_dir != "dataset":
        dataset_type, dataset_name = dataset, spec.display_name
    else:
        dataset_type = hub_dataset or Path(hub_dataset_name).name
        dataset_name = dataset_type
    eval_results = [
        EvalResult(
            task_type=TASK_TYPE,
            task_name="Composed image retrieval",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=metric_type(metric),
            metric_name=metric,
            metric_value=rounded(float(value)),
        )
        for split, metrics in results.items()
        for metric, value in metrics.items()
    ]
    model_name = hub_model_id.split("/")[-1] if hub_model_id else folder.name
    card_data = ModelCardData(
        library_name="transformers",
        license=LICENSE,
        pipeline_tag=TASK_TYPE,
        tags=["composed-image-retrieval", "image-retrieval", "mqirtn", composition, "custom_code"],
        base_model=[name for name in base_models if is_hub_id(name)] or None,
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        repo_id=hub_model_id or str(folder),
        dataset_name=dataset_name,
        composition=composition,
        results_table=_results_table(results),
        training_summary="\n".join(f"| {key} | {value} |" for key, value in training_summary.items()),
    )
    path = Path(path) if path is not None else folder / "README.md"
    card.save(path)
    return path


class HubError(RuntimeError):
    """A Hub call failed (token, network, offline mode, permissions): the message is one line naming the cause."""


def _hub_call(what: str, call):
    """`call()`, with any failure turned into a one-line `HubError` saying `what` failed and why."""
    try:
        return call()
    except Exception as error:  # huggingface_hub raises HTTP, token and offline errors, httpx its own network errors
        text = str(error).strip()
        reason = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
        raise HubError(f"{what} failed ({reason})") from error


def create_hub_repository(repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Checks the token (`whoami`) and creates the model repository `repo_id` if it does not exist: train.py calls
    this before training, so a bad token, no network or offline mode stop the run before any work. Returns the full
    repository id (`ORG/NAME`); raises `HubError`."""
    api = HfApi(token=token)
    _hub_call("checking the Hub token", api.whoami)
    repo = _hub_call(
        f"creating the Hub repository {repo_id!r}", lambda: api.create_repo(repo_id, exist_ok=True, private=private)
    )
    return repo.repo_id


def upload_model_folder(folder: str | os.PathLike, repo_id: str, token: str | None = None) -> None:
    """Uploads `folder` (model, processor, code, card, results, TensorBoard logs under `runs/`) to the existing
    repository `repo_id`, without checkpoints and figures (`UPLOAD_IGNORE_PATTERNS`); raises `HubError`."""
    api = HfApi(token=token)
    _hub_call(
        f"uploading {folder} to {repo_id!r}",
        lambda: api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message="Upload MQIRTN model trained with train.py",
            ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
        ),
    )


__all__ = ["HubError", "create_hub_repository", "upload_model_folder", "write_model_card"]
