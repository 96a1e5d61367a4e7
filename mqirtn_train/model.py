"""The model of a training run: a saved MQIRTN model or one built from towers, its frozen parts, its optimiser groups."""

from __future__ import annotations

from accelerate.logging import get_logger
from transformers import AutoTokenizer, BertConfig, ViTConfig, ViTImageProcessorPil

from modeling_mqirtn import MQIRTNConfig, MQIRTNModel
from modeling_mqirtn.modeling_mqirtn import tower_from_config, tower_from_pretrained
from processing import MQIRTNProcessor

from .frozen_text import CachedFrozenTextModel


logger = get_logger(__name__)


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
    pretrained = [
        prefix for prefix, used in (("text_model.", text_pretrained), ("vision_model.", vision_pretrained)) if used
    ]
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
        "towers": {
            "params": [],
            "lr": args.learning_rate * args.tower_lr_multiplier,
            "weight_decay": args.weight_decay,
        },
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


def prepare_model(args, accelerator):
    """The model and processor, frozen towers (a frozen text tower computed once per distinct text)."""
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
        model.text_model = CachedFrozenTextModel(model.text_model)
    return model, processor, pretrained_prefixes
