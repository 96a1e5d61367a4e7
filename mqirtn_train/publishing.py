"""The end of a run: eval_results.json, the model and its card, and the upload to the Hub."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.logging import get_logger

from mqirtn_app.atomic import write_bytes_atomic
from mqirtn_app.model_card import HubError, rounded, upload_model_folder, write_model_card

from .arguments import MINILM_HUB_ID, default_text_model
from .checkpoints import save_model
from .evaluation import RETRIEVAL_DIAGNOSTICS_KEY
from .run import TRAINING_STATE_FILE


logger = get_logger(__name__)


def card_base_models(args) -> list[str]:
    """Hub ids of the model this run fine-tunes or of the pretrained towers it started from (local folders have none)."""
    if args.model_name_or_path is not None:
        return [] if Path(args.model_name_or_path).exists() else [args.model_name_or_path]
    base_models = []
    text_path = args.text_model_name_or_path
    if args.model_name_or_path is None and not args.text_from_scratch and text_path:
        base_models.append(
            MINILM_HUB_ID if text_path == default_text_model() else (None if Path(text_path).exists() else text_path)
        )
    if args.vision_model_name_or_path and not Path(args.vision_model_name_or_path).exists():
        base_models.append(args.vision_model_name_or_path)
    return [name for name in base_models if name]


def save_and_publish(
    args, accelerator, model, processor, results: dict, training_state: dict, diagnostics: dict, card: dict
) -> None:
    """eval_results.json (with how training went and what the composition does), the model, its card, the Hub."""
    output_dir = Path(args.output_dir)
    accelerator.wait_for_everyone()
    files = {}
    if results:
        record = rounded(results)  # percents to 4 decimals, not float32 noise; the diagnostics keep their digits
        if training_state:
            record["training"] = training_state
        if diagnostics:
            record["composition"] = diagnostics
        files["eval_results.json"] = json.dumps(record, indent=2).encode()
    if args.eval_only:
        if accelerator.is_main_process and results:
            write_bytes_atomic(output_dir / "eval_results.json", files["eval_results.json"])
        return
    if training_state:
        files[TRAINING_STATE_FILE] = json.dumps(training_state, indent=2).encode()
    split_results = {key: value for key, value in results.items() if key != RETRIEVAL_DIAGNOSTICS_KEY}

    def complete(staged: Path) -> None:
        # The metrics, the training state and the card are swapped in with the model they describe: a refused model,
        # a kill or a full disk never leaves this run's numbers beside the previous model.
        for name, data in files.items():
            (staged / name).write_bytes(data)
        write_model_card(
            output_dir,
            split_results,
            card,
            args.source,
            args.composition,
            hub_dataset_name=args.dataset_name,
            base_models=card_base_models(args),
            hub_model_id=args.hub_model_id,
            path=staged / "README.md",
        )

    save_model(accelerator, model, processor, output_dir, complete=complete)
    if accelerator.is_main_process:
        if args.push_to_hub:
            for tracker in accelerator.trackers:  # the TensorBoard logs go up with the model: write them out first
                if callable(getattr(tracker.tracker, "flush", None)):
                    tracker.tracker.flush()
            try:
                upload_model_folder(output_dir, args.hub_model_id, token=args.hub_token)
            except HubError as error:
                raise SystemExit(
                    f"train.py: --push_to_hub: {error}. The model is safe in {output_dir}; upload it later with "
                    f"`hf upload {args.hub_model_id} {output_dir} --exclude 'checkpoints/*'`."
                ) from None
            logger.info(f"Pushed {output_dir} to https://huggingface.co/{args.hub_model_id}")
