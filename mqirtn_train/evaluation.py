"""Evaluation: embeddings of a split, its protocol metrics (Recall@K), the results table and figures, and the CIRR
test-server files."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mqirtn_app.visualization import save_evaluation_grids
from processing.data.loaders import CIREvaluationData
from processing.data.metrics import cirr_submission, evaluate_protocol, retrieval_diagnostics
from processing.data.registry import get_dataset_spec
from processing.data.transforms import (
    CIRQueryCollator,
    collate_gallery,
    select_first,
    set_gallery_transform,
    set_query_transform,
)

from .checkpoints import check_finite_model


logger = get_logger(__name__)

# eval_results.json's entry for what the headline Recall hides: Recall per modification type, own reference ranked first.
RETRIEVAL_DIAGNOSTICS_KEY = "retrieval_diagnostics"


@torch.no_grad()
def compute_embeddings(
    accelerator, model, dataloader, kind: str, desc: str, usable: list | None = None
) -> torch.Tensor:
    """Embeddings (N, d) of a prepared evaluation dataloader, gathered across processes (padding removed).

    usable: a list that receives, per query batch, the gathered ``reference_usable`` flags (False: the reference image
    could not be decoded and a blank image was embedded instead).
    """
    model.eval()
    chunks = []
    for batch in tqdm(dataloader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        if kind == "query":
            embeds = model.get_query_features(
                batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
            ).pooler_output
            if usable is not None and "reference_usable" in batch:
                usable.append(accelerator.gather_for_metrics(batch["reference_usable"].to(torch.uint8)).cpu().bool())
        else:
            embeds = model.get_image_features(batch["pixel_values"]).pooler_output
        chunks.append(accelerator.gather_for_metrics(embeds.float().contiguous()).cpu())
    return torch.cat(chunks)


def embed_evaluation_data(
    accelerator, model, processor, data: CIREvaluationData, args, desc: str, usable: list | None = None
):
    """(query_embeds, gallery_embeds) of an evaluation split; `usable` as in `compute_embeddings`."""
    queries = set_query_transform(data.queries, processor)
    gallery = set_gallery_transform(data.gallery, processor)
    query_loader = DataLoader(
        queries,
        batch_size=args.per_device_eval_batch_size,
        collate_fn=CIRQueryCollator(processor.tokenizer, args.max_text_length),
        num_workers=args.dataloader_num_workers,
    )
    gallery_loader = DataLoader(
        gallery,
        batch_size=args.per_device_eval_batch_size,
        collate_fn=collate_gallery,
        num_workers=args.dataloader_num_workers,
    )
    query_loader, gallery_loader = accelerator.prepare(query_loader, gallery_loader)
    unwrapped = accelerator.unwrap_model(model)
    query_embeds = compute_embeddings(accelerator, unwrapped, query_loader, "query", f"{desc}: queries", usable)
    gallery_embeds = compute_embeddings(accelerator, unwrapped, gallery_loader, "gallery", f"{desc}: gallery")
    return query_embeds, gallery_embeds


def evaluate_split(accelerator, model, processor, data: CIREvaluationData, args, desc: str):
    """Protocol metrics (percent) of one split, identical on every process; plus the embeddings."""
    if args.max_eval_samples is not None:
        queries = select_first(data.queries, args.max_eval_samples)
        kept = set(queries["query_id"]) if data.unusable_query_ids else set()
        data = CIREvaluationData(
            queries, data.gallery, data.protocol, data.remove_reference, data.unusable_query_ids & kept
        )
    usable: list[torch.Tensor] = []
    query_embeds, gallery_embeds = embed_evaluation_data(accelerator, model, processor, data, args, desc, usable)
    # Queries whose reference image is unusable (found by the loader's check, or only now, when it failed to decode)
    # were embedded from a blank image; they count as misses.
    unusable = set(data.unusable_query_ids)
    if usable and not torch.cat(usable).all():
        query_ids = list(data.queries["query_id"])
        unusable |= {query_ids[i] for i in (~torch.cat(usable)).nonzero().flatten().tolist()}
    metrics = evaluate_protocol(
        data.protocol,
        query_embeds,
        gallery_embeds,
        data.queries,
        data.gallery,
        remove_reference=data.remove_reference,
        unusable_query_ids=unusable,
    )
    dropped = dropped_queries(data)
    if dropped:
        metrics["dropped_queries"] = dropped
    return metrics, query_embeds, gallery_embeds


# Protocols whose hits are target ids: a query without one is left out of their recalls.
_TARGET_ID_PROTOCOLS = ("shapes", "exact", "fashioniq", "cirr")
# Counts that evaluation results may carry beside the percentages (shown in the table's title, not as columns).
COUNT_KEYS = ("dropped_queries", "unusable_queries")


def dropped_queries(data: CIREvaluationData) -> int:
    """How many queries of a split with ground truth have no target (a misspelled target column, a broken row):
    the recalls leave them out, so they are counted and reported wherever the recalls go."""
    if data.protocol not in _TARGET_ID_PROTOCOLS or not data.has_targets:
        return 0
    return sum(target is None for target in data.queries["target_id"])


def check_dropped_queries(data: CIREvaluationData, max_fraction: float, split: str) -> None:
    """`ValueError` when more than `max_fraction` of the queries would be left out of the recalls (before any
    embedding is computed)."""
    dropped, total = dropped_queries(data), len(data.queries)
    if dropped and dropped / total > max_fraction:
        raise ValueError(
            f"{dropped} of the {total} {split} queries ({100 * dropped / total:.1f} %) have no target and would be "
            f"left out of Recall, more than --max_dropped_queries {max_fraction:g} allows; fix those rows (a "
            "misspelled target column? an unterminated quote?) or raise --max_dropped_queries"
        )


def format_table(title: str, metrics: dict[str, float]) -> str:
    names = [name for name in metrics if name not in COUNT_KEYS]
    width = max(8, *(len(name) for name in names))
    lines = [
        title,
        "  ".join(f"{name:>{width}}" for name in names),
        "  ".join(f"{metrics[name]:>{width}.2f}" for name in names),
    ]
    return "\n".join(lines)


def format_retrieval_diagnostics(retrieval: dict) -> str:
    """The per-modification-type table and the own-reference-first share (`retrieval_diagnostics`), for the log."""
    lines = []
    by_type = retrieval.get("by_modification_type") or {}
    if by_type:
        metric_names = [name for name in next(iter(by_type.values())) if name != "queries"]
        width = max(8, *(len(name) for name in metric_names), *(len(kind) for kind in by_type))
        lines.append("By modification type, %")
        lines.append(f"{'type':<{width}}  {'queries':>8}  " + "  ".join(f"{name:>{width}}" for name in metric_names))
        for kind, values in by_type.items():
            cells = "  ".join(f"{values[name]:>{width}.2f}" for name in metric_names)
            lines.append(f"{kind:<{width}}  {values['queries']:>8}  {cells}")
    if retrieval.get("reference_ranked_first") is not None:
        lines.append(f"Queries whose own reference image is ranked first: {retrieval['reference_ranked_first']:.2f} %")
    return "\n".join(lines)


def evaluate_and_predict(args, accelerator, model, processor, data: dict, training_state: dict, step: int) -> dict:
    """Recall@K on the evaluation split (table, figures) and the CIRR test-server files with --do_predict."""
    results = {}
    eval_data, output_dir = data["eval"], Path(args.output_dir)
    if eval_data is not None or data["predict"] is not None:
        check_finite_model(accelerator.unwrap_model(model), processor, output_dir, "it was not evaluated")
    if eval_data is not None:
        check_dropped_queries(eval_data, args.max_dropped_queries, args.eval_split)
        metrics, query_embeds, gallery_embeds = evaluate_split(
            accelerator, model, processor, eval_data, args, f"Evaluating {args.eval_split}"
        )
        results[args.eval_split] = metrics
        if accelerator.is_main_process:
            source = (
                Path(args.dataset_name).name if args.source == "hub" else get_dataset_spec(args.source).display_name
            )
            counts = "".join(
                f", {metrics[key]} {key.replace('_', ' ')}" for key in COUNT_KEYS if metrics.get(key)
            )  # "6 queries, 2 dropped queries": the recalls' denominator is the queries less the dropped ones
            title = (
                f"\n{source} {args.eval_split} ({len(eval_data.queries)} queries{counts}, {len(eval_data.gallery)} "
                "gallery images), %"
            )
            if training_state.get("time_limit_reached"):
                title += (
                    f"  [CUT SHORT by --max_train_minutes {args.max_train_minutes}: trained {training_state['completed_steps']} of "
                    f"{training_state['max_train_steps']} steps]"
                )
            print(format_table(title, metrics))
            retrieval = retrieval_diagnostics(
                eval_data.protocol,
                query_embeds,
                gallery_embeds,
                eval_data.queries,
                eval_data.gallery,
                remove_reference=eval_data.remove_reference,
                unusable_query_ids=eval_data.unusable_query_ids,
            )
            if retrieval:
                results[RETRIEVAL_DIAGNOSTICS_KEY] = {args.eval_split: retrieval}
                print(format_retrieval_diagnostics(retrieval))
            save_evaluation_grids(
                output_dir / "results_grids",
                eval_data,
                query_embeds,
                gallery_embeds,
                args.num_results_grids,
                accelerator.unwrap_model(model),
                processor,
            )
        accelerator.log({f"{args.eval_split}/{k}": v for k, v in metrics.items()}, step=step)
    predict_data = data["predict"]
    if predict_data is not None:
        query_embeds, gallery_embeds = embed_evaluation_data(
            accelerator, model, processor, predict_data, args, "Predicting"
        )
        if accelerator.is_main_process:
            # Whole columns as lists: indexing `datasets` columns item by item is 50x slower.
            queries = predict_data.queries.select_columns(["pair_id", "reference_id", "subset_ids"]).to_dict()
            paths = cirr_submission(
                queries["pair_id"],
                query_embeds,
                gallery_embeds,
                queries["reference_id"],
                queries["subset_ids"],
                list(predict_data.gallery["image_id"]),
                output_dir,
            )
            logger.info(f"CIRR submission files: {[str(p) for p in paths]}")
    return results
