"""MQIRTN: composed image retrieval with a vision tower, a text tower, cross-modal attention fusion, ComposeAE's
complex-space composition, deep metric learning and the rotational symmetric constraint."""

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging

from .composition_mqirtn import MQIRTNImageResidual, build_composition, build_decoder, reset_torch_default
from .configuration_mqirtn import MQIRTNConfig, tower_width
from .fusion_mqirtn import MQIRTNFusion, masked_mean
from .losses_mqirtn import build_metric_loss, image_fingerprints

# Imported so that `save_pretrained` copies the pipeline file with the model's code (it copies what this file imports).
from .pipeline_mqirtn import CUSTOM_PIPELINES


logger = logging.get_logger(__name__)


@dataclass
class MQIRTNOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
        Weighted sum of the terms in `loss_terms`.
    loss_terms (`dict[str, torch.FloatTensor]`, *optional*, returned when `return_loss=True`):
        Each unweighted loss term: `base` (deep metric learning), and where the composition has them `symmetric`
        (symmetric constraint), `reconstruction_image`, `reconstruction_text`.
    query_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised composed query (reference image + modification text).
    target_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
        L2-normalised gallery embeddings of the target images, when `target_pixel_values` is given.
    reference_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
        L2-normalised gallery embeddings of the reference images.
    text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
        L2-normalised embeddings of the modification texts.
    logits_per_query (`torch.FloatTensor` of shape `(batch_size, batch_size)`, *optional*):
        Scaled cosine similarities between every query and every target of the batch.
    logit_scale (`torch.FloatTensor` of shape `()`):
        The scale `s` of the logits `s * cos` (kept in `config.logit_scale_bounds` by `clamp_logit_scale_`).
    image_attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
        Per fusion layer, image tokens attending to text tokens: `(batch_size, heads, 1 + num_patches, text_length)`.
    text_attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
        Per fusion layer, text tokens attending to image tokens: `(batch_size, heads, text_length, 1 + num_patches)`.
    vision_tower_attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
        The vision tower's attention weights for the reference images, one per layer, as the tower returns them
        (`(batch_size, heads, 1 + num_patches, 1 + num_patches)` for ViT; `None` entries or no tuple for towers without
        attention, and under SDPA, which computes no weights: use `attn_implementation="eager"`).
    text_tower_attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
        The text tower's attention weights, one per layer: `(batch_size, heads, text_length, text_length)` (eager
        attention, as for `vision_tower_attentions`).
    composition_angles (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*, returned when
    `output_composition=True` for the rotating compositions `mqirtn` / `composeae`):
        The rotation angles delta (radians) read from each modification text.
    composition_norms (`torch.FloatTensor` of shape `(batch_size,)`, *optional*, returned when `output_composition=True`):
        L2 norm of the composition module's term of the (unnormalised) query.
    image_residual_norms (`torch.FloatTensor` of shape `(batch_size,)`, *optional*, returned when
    `output_composition=True` and the model has the image residual):
        L2 norm of the gated image-residual term of the (unnormalised) query.
    vision_hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The vision tower's hidden states for the reference images (embeddings + one per layer), as the tower returns
        them, e.g. `(batch_size, 1 + num_patches, vision_hidden_size)` for ViT.
    text_hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The text tower's hidden states (embeddings + one per layer), each `(batch_size, sequence_length,
        text_hidden_size)`.
    symmetric_diagnostics (`dict[str, torch.FloatTensor]`, *optional*, returned when `output_composition=True`,
    `return_loss=True` and the composition rotates):
        What the conjugate does in the symmetric constraint, against controls on the same targets and texts: the
        symmetric loss when the target is rotated by +delta instead of the conjugate -delta (`loss_same_rotation`),
        not rotated (`loss_zero_rotation`) and rotated by the conjugate of another query's angles
        (`loss_shuffled_rotation`, the batch rolled by one); `back_query_cosine` (per query, cosine between the
        back-queries with the conjugate and with the same rotation; 1 means the conjugate changes nothing).
    """

    loss: torch.FloatTensor | None = None
    loss_terms: dict[str, torch.FloatTensor] | None = None
    query_embeds: torch.FloatTensor | None = None
    target_embeds: torch.FloatTensor | None = None
    reference_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    logits_per_query: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    image_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None
    composition_angles: torch.FloatTensor | None = None
    composition_norms: torch.FloatTensor | None = None
    image_residual_norms: torch.FloatTensor | None = None
    symmetric_diagnostics: dict[str, torch.FloatTensor] | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    vision_tower_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_tower_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MQIRTNQueryOutput(ModelOutput):
    r"""
    What `MQIRTNModel.get_query_features` returns: the composed query embedding and, when asked, what the towers and
    the fusion computed for it (the same fields as `MQIRTNOutput`).

    pooler_output (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        The composed query embedding theta, L2-normalised (`MQIRTNOutput.query_embeds`).
    vision_hidden_states, text_hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when
    `output_hidden_states=True`):
        The towers' hidden states for the reference images and the modification texts.
    image_attentions, text_attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
        The fusion layers' cross-attention weights (image->text, text->image; see `MQIRTNOutput`).
    vision_tower_attentions, text_tower_attentions (`tuple(torch.FloatTensor)`, *optional*, returned when
    `output_attentions=True`):
        The towers' own attention weights.
    """

    pooler_output: torch.FloatTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None
    vision_tower_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_tower_attentions: tuple[torch.FloatTensor, ...] | None = None


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalises the last dimension in float32: under fp16 autocast the norm of a small vector underflows."""
    return F.normalize(x.float(), dim=-1)


def has_cls_token(model: nn.Module) -> bool:
    """Whether a vision tower prepends a CLS token to its patch tokens (ViT, DeiT, BEiT, DINOv2, CLIP vision)."""
    return any(name.split(".")[-1] in ("cls_token", "class_embedding") for name, _ in model.named_parameters())


def _build_tower(config, build, kwargs: dict) -> PreTrainedModel:
    """Builds a tower with `build(**kwargs)` without the pooler MQIRTN never uses (it would receive no gradient),
    except for vision towers without a CLS token, whose pooled output is their image embedding."""
    model_class = AutoModel._model_mapping[type(config)]
    if "add_pooling_layer" not in inspect.signature(model_class.__init__).parameters or "add_pooling_layer" in kwargs:
        return build(**kwargs)
    model = build(**kwargs, add_pooling_layer=False)
    if getattr(model, "main_input_name", None) == "pixel_values" and not has_cls_token(model):
        model = build(**kwargs, add_pooling_layer=True)
    return model


def tower_from_config(config) -> PreTrainedModel:
    """A tower built from any AutoConfig (see `_build_tower` for its pooler)."""
    return _build_tower(config, lambda **kw: AutoModel.from_config(config, **kw), {})


@functools.cache
def _ignoring_pooler_weights(model_class: type) -> type:
    """`model_class` that loads a checkpoint holding pooler weights without the pooler quietly: the weights are ignored
    as transformers' heads ignore them (`_keys_to_ignore_on_load_unexpected`), instead of a report table of them."""
    patterns = {*(model_class._keys_to_ignore_on_load_unexpected or ()), r"(^|\.)pooler\."}
    attributes = {"__module__": model_class.__module__, "__qualname__": model_class.__qualname__}
    return type(model_class.__name__, (model_class,), {**attributes, "_keys_to_ignore_on_load_unexpected": patterns})


def tower_from_pretrained(name_or_path: str, **kwargs) -> PreTrainedModel:
    """A pretrained tower (any AutoModel checkpoint; see `_build_tower` for its pooler)."""
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(name_or_path)
    model_class = _ignoring_pooler_weights(AutoModel._model_mapping[type(config)])
    return _build_tower(config, lambda **kw: model_class.from_pretrained(name_or_path, config=config, **kw), kwargs)


class MQIRTNPreTrainedModel(PreTrainedModel):
    config: MQIRTNConfig
    config_class = MQIRTNConfig
    base_model_prefix = "mqirtn"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # SDPA and eager (the fusion follows `config._attn_implementation` like the towers); flash-attention is not claimed:
    # no test runs it.
    _supports_sdpa = True
    _no_split_modules = ["MQIRTNFusionLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        if getattr(module, "_mqirtn_torch_default_init", False):
            # The baselines' layers (and MQIRTN's angle map) keep PyTorch's default initialisation, as in their code.
            reset_torch_default(module, init)
            return
        super()._init_weights(module)
        if isinstance(module, MQIRTNModel):
            init.constant_(module.logit_scale, float(self.config.logit_scale_init_value))
        if hasattr(module, "mapping_weights"):
            init.copy_(module.mapping_weights, torch.tensor(module.weights_init, dtype=module.mapping_weights.dtype))
        if isinstance(module, MQIRTNImageResidual):
            init.constant_(module.weight, 1.0)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # Weights whose shape does not fit are described in one sentence by `from_pretrained` (naming the config field
        # that differs) instead of a report table with a row per tensor.
        super()._adjust_missing_and_unexpected_keys(loading_info)
        if loading_info.mismatched_keys:
            self._size_mismatches = sorted(loading_info.mismatched_keys)
            loading_info.mismatched_keys = set()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""
        `PreTrainedModel.from_pretrained`; a checkpoint whose weights do not fit the configuration (e.g. loaded with
        another `projection_dim`) raises one `ValueError` that names the configuration fields that differ, or with
        `ignore_mismatched_sizes=True` logs that sentence and keeps the re-initialised layers.
        """
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        mismatches = model.__dict__.pop("_size_mismatches", None)
        if not mismatches:
            return loaded
        hub_kwargs = {
            k: kwargs[k] for k in ("cache_dir", "local_files_only", "token", "revision", "subfolder") if k in kwargs
        }
        message = _size_mismatch_message(cls, pretrained_model_name_or_path, model.config, mismatches, hub_kwargs)
        if not kwargs.get("ignore_mismatched_sizes", False):
            raise ValueError(
                f"{message} Load it with the configuration it was saved with, or pass "
                "`ignore_mismatched_sizes=True` to re-initialise the layers that do not fit."
            )
        logger.warning(
            f"{message} Re-initialised the {len(mismatches)} weights that do not fit (`ignore_mismatched_sizes=True`)."
        )
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        r"""
        `PreTrainedModel.save_pretrained`, plus `custom_pipelines` in `config.json`: with the pipeline file, which is
        copied with the model's code, the folder (or a repository made by `push_to_hub`, which calls this) then serves
        `pipeline("composed-image-retrieval", model=folder, trust_remote_code=True)` where this package is not
        installed (save the processor into the same folder).
        """
        self.config.custom_pipelines = {task: dict(info) for task, info in CUSTOM_PIPELINES.items()}
        return super().save_pretrained(save_directory, *args, **kwargs)


def _differing_sizes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """`field (checkpoint: a, this model: b)` for every integer field (sizes; nested configs as `text_config.x`) that
    differs between two config dicts."""
    found = []
    for key, value in current.items():
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            found += _differing_sizes(old, value, f"{prefix}{key}.")
        elif isinstance(value, int) and not isinstance(value, bool) and isinstance(old, int) and old != value:
            found.append(f"`{prefix}{key}` (checkpoint: {old}, this model: {value})")
    return found


def _size_mismatch_message(cls, name_or_path, config, mismatches, hub_kwargs) -> str:
    """One sentence on weights whose checkpoint shape does not fit the model, naming the config fields that differ."""
    key, checkpoint_shape, model_shape = mismatches[0]
    where = (
        f"{len(mismatches)} weights, e.g. `{key}`: checkpoint {tuple(checkpoint_shape)}, model {tuple(model_shape)}"
    )
    try:
        saved, _ = cls.config_class.get_config_dict(name_or_path, **hub_kwargs)
    except (OSError, ValueError):
        saved = {}
    fields = _differing_sizes(saved, config.to_dict())
    if not fields:
        return f"The checkpoint {str(name_or_path)!r} does not fit this model ({where})."
    return f"The checkpoint {str(name_or_path)!r} was saved with another {', '.join(fields)}, so its weights do not fit ({where})."


class MQIRTNModel(MQIRTNPreTrainedModel):
    r"""
    MQIRTN composed-image-retrieval model. A query (reference image + modification text) and a gallery image are
    embedded in the same `projection_dim`-dimensional space; retrieval ranks gallery images by cosine similarity.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, ViTConfig
    >>> from modeling_mqirtn import MQIRTNConfig, MQIRTNModel

    >>> vision = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    >>> text = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    >>> model = MQIRTNModel(MQIRTNConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=32, fusion_num_heads=4))
    >>> pixel_values, targets = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    >>> input_ids, attention_mask = torch.randint(0, 100, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    >>> out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, target_pixel_values=targets, return_loss=True)
    >>> out.query_embeds.shape, sorted(out.loss_terms)
    (torch.Size([4, 32]), ['base', 'reconstruction_image', 'reconstruction_text', 'symmetric'])
    ```
    """

    def __init__(
        self,
        config: MQIRTNConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else tower_from_config(config.vision_config)
        self.text_model = text_model if text_model is not None else tower_from_config(config.text_config)
        # One config object per tower, shared by the tower and the composite config (as VisionTextDualEncoder does).
        self.config.vision_config._attn_implementation = self.vision_model.config._attn_implementation
        self.config.text_config._attn_implementation = self.text_model.config._attn_implementation
        self.vision_model.config = self.config.vision_config
        self.text_model.config = self.config.text_config

        dim = config.projection_dim
        vision_width, text_width = tower_width(config.vision_config), tower_width(config.text_config)
        # Towers without a CLS token (SigLIP, Swin, ConvNeXt) get their pooled output as token 0 instead: it is their
        # gallery embedding and the fusion's image slot (patch 0 would be one corner of the image).
        self.vision_has_cls_token = has_cls_token(self.vision_model)
        spec = config.composition_spec
        self.image_projection = nn.Linear(vision_width, dim)
        self.text_projection = nn.Linear(text_width, dim)
        self.fusion = None
        if config.uses_fusion:
            self.fusion = MQIRTNFusion(
                vision_width,
                text_width,
                dim,
                config.num_fusion_layers,
                config.fusion_num_heads,
                config.fusion_intermediate_size or 4 * dim,
                config.fusion_dropout,
                config.fusion_pooling,
                config=self.config,  # its `_attn_implementation` chooses SDPA or eager at every call
            )
        self.composition = build_composition(config)
        self.image_residual = MQIRTNImageResidual(dim) if config.uses_image_residual else None
        self.image_decoder = build_decoder(config, dim) if spec["reconstruction"] else None
        self.text_decoder = build_decoder(config, dim) if spec["reconstruction"] else None
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.metric_loss = build_metric_loss(config.loss_type)
        self.post_init()
        if self.fusion is not None:
            # With fusion, psi(t) feeds nothing but the text-reconstruction target, whose gradient is stopped: it is a
            # fixed projection of the text tower's features (ComposeAE's text features are fixed too).
            self.text_projection.requires_grad_(False)

    # ----------------------------------------------------------------------------------------------- towers
    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embeddings (so `resize_token_embeddings` resizes the text tower's vocabulary)."""
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def _run_vision(
        self, pixel_values: torch.Tensor, output_attentions: bool = False, output_hidden_states: bool = False
    ):
        """The vision tower on `pixel_values`: `(tokens, outputs)`, `tokens` (B, 1+P, dv) with token 0 the CLS token,
        or the pooled output for towers without one; `outputs` what the tower returned (hidden states and attentions
        when asked: the flags are passed only when set, as convolutional towers take no `output_attentions`)."""
        if pixel_values.dim() != 4:
            raise ValueError(
                f"`pixel_values` must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}"
            )
        flags = {
            name: True
            for name, value in (
                ("output_attentions", output_attentions),
                ("output_hidden_states", output_hidden_states),
            )
            if value
        }
        outputs = self.vision_model(pixel_values=pixel_values, **flags)
        tokens = outputs.last_hidden_state
        if tokens.dim() == 4:  # convolutional towers: (B, C, H, W) feature maps
            tokens = tokens.flatten(2).transpose(1, 2)
        if self.vision_has_cls_token:
            return tokens, outputs
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            raise ValueError(
                f"The vision tower ({self.config.vision_config.model_type!r}) has no CLS token and returned no "
                "`pooler_output`: MQIRTN needs one of them as the image embedding"
            )
        return torch.cat([pooled.reshape(pooled.shape[0], 1, -1).to(tokens.dtype), tokens], dim=1), outputs

    def _image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower token states (B, 1+P, dv) (see `_run_vision`)."""
        return self._run_vision(pixel_values)[0]

    def _run_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ):
        """The text tower: `(tokens, outputs)`, `tokens` (B, L, dt), `outputs` what the tower returned."""
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, sequence_length), got {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        flags = {
            name: True
            for name, value in (
                ("output_attentions", output_attentions),
                ("output_hidden_states", output_hidden_states),
            )
            if value
        }
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, **flags)
        return outputs.last_hidden_state, outputs

    def _text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Text tower token states (B, L, dt)."""
        return self._run_text(input_ids, attention_mask)[0]

    def _flags(self, output_attentions, output_hidden_states, return_dict) -> tuple[bool, bool, bool]:
        """The three output flags, each defaulting to the config's (as transformers' models do)."""
        config = self.config
        return (
            config.output_attentions if output_attentions is None else output_attentions,
            config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            config.return_dict if return_dict is None else return_dict,
        )

    def _compose(
        self,
        image_tokens,
        text_tokens,
        attention_mask,
        image_embeds,
        text_embeds,
        sign=1.0,
        output_attentions=False,
        angle_control=None,
    ):
        """Composed query theta (B, d), unnormalised, and a dict with the angles (or None), the composition term, the
        image-residual term (or None) and the fusion attentions. `angle_control` ("zero", "shuffled"): the rotation
        uses no angles or another query's instead of the text's own (the symmetric constraint's controls)."""
        image_attentions = text_attentions = None
        if self.fusion is not None:
            fused_image, fused_text, image_attentions, text_attentions = self.fusion(
                image_tokens, text_tokens, attention_mask, output_attentions
            )
        else:
            fused_image, fused_text = image_embeds, text_embeds
        composed, angles = self.composition(fused_image, fused_text, sign, angle_control)
        residual = None
        if self.image_residual is not None:
            residual = self.image_residual(image_embeds, fused_image, fused_text)
        query = composed if residual is None else composed + residual
        parts = {"angles": angles, "composed": composed, "residual": residual}
        return query, parts, image_attentions, text_attentions

    # ----------------------------------------------------------------------------------------------- features
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Gallery embedding `phi(x)` of images: the only function used to embed gallery and target images.

        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`)
        output_attentions, output_hidden_states (`bool`, *optional*, default to the config's): also return the vision
            tower's attention weights / hidden states.
        return_dict (`bool`, *optional*, defaults to `config.return_dict`): with `False`, the output's `to_tuple()`.

        Returns a `BaseModelOutputWithPooling`:
        - `pooler_output` (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): the gallery embedding,
          **L2-normalised** (cosine similarity is a dot product);
        - `last_hidden_state` (`(batch_size, 1 + num_patches, vision_hidden_size)`): the vision tower's token states as
          MQIRTN reads them (token 0 is the CLS token, or the tower's pooled output for towers without one);
        - `hidden_states`, `attentions`: the vision tower's, when asked.

        The embedding alone: `model.get_image_features(pixel_values=pixel_values).pooler_output`.
        """
        output_attentions, output_hidden_states, return_dict = self._flags(
            output_attentions, output_hidden_states, return_dict
        )
        tokens, outputs = self._run_vision(pixel_values, output_attentions, output_hidden_states)
        output = BaseModelOutputWithPooling(
            last_hidden_state=tokens,
            pooler_output=normalize(self.image_projection(tokens[:, 0])),
            hidden_states=getattr(outputs, "hidden_states", None) if output_hidden_states else None,
            attentions=getattr(outputs, "attentions", None) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Text embedding `psi(t)`: projection of the masked mean of the text tower's token states.

        input_ids, attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`)
        output_attentions, output_hidden_states, return_dict: as for `get_image_features` (the text tower's).

        Returns a `BaseModelOutputWithPooling`: `pooler_output` (`(batch_size, projection_dim)`) the text embedding,
        **L2-normalised**; `last_hidden_state` (`(batch_size, sequence_length, text_hidden_size)`) the text tower's
        token states; `hidden_states`, `attentions` the text tower's, when asked.

        The embedding alone: `model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output`.
        """
        output_attentions, output_hidden_states, return_dict = self._flags(
            output_attentions, output_hidden_states, return_dict
        )
        tokens, outputs = self._run_text(input_ids, attention_mask, output_attentions, output_hidden_states)
        output = BaseModelOutputWithPooling(
            last_hidden_state=tokens,
            pooler_output=normalize(self.text_projection(masked_mean(tokens, attention_mask))),
            hidden_states=getattr(outputs, "hidden_states", None) if output_hidden_states else None,
            attentions=getattr(outputs, "attentions", None) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    def get_query_features(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MQIRTNQueryOutput | tuple:
        r"""
        Composed query embedding `theta` of (reference image, modification text) pairs.

        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): reference images.
        input_ids, attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`): modification texts.
        output_attentions, output_hidden_states, return_dict: as for `forward`.

        Returns an `MQIRTNQueryOutput` whose `pooler_output` (`(batch_size, projection_dim)`) is the query embedding,
        **L2-normalised**, with the towers' hidden states and the towers' and fusion's attentions when asked.

        The embedding alone: `model.get_query_features(**batch).pooler_output`.
        """
        output_attentions, output_hidden_states, return_dict = self._flags(
            output_attentions, output_hidden_states, return_dict
        )
        out = self(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        output = MQIRTNQueryOutput(
            pooler_output=out.query_embeds,
            vision_hidden_states=out.vision_hidden_states,
            text_hidden_states=out.text_hidden_states,
            image_attentions=out.image_attentions,
            text_attentions=out.text_attentions,
            vision_tower_attentions=out.vision_tower_attentions,
            text_tower_attentions=out.text_tower_attentions,
        )
        return output if return_dict else output.to_tuple()

    # ----------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        target_pixel_values: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        target_ids: torch.Tensor | None = None,
        reference_ids: torch.Tensor | None = None,
        output_composition: bool = False,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MQIRTNOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Reference images.
        input_ids, attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Modification texts (an empty text makes a pure image query).
        target_pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`, *optional*):
            Target images; needed for the loss.
        return_loss (`bool`, *optional*):
            Compute the loss and its terms.
        output_attentions (`bool`, *optional*, defaults to `config.output_attentions`):
            Return the fusion layers' attention weights (`image_attentions`, `text_attentions`; for visualisation) and
            the towers' (`vision_tower_attentions`, `text_tower_attentions`; weights exist under eager attention).
        target_ids, reference_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Identify equal images so that copies of a query's own target are not used as its negatives; by default
            images are compared by a hash of their pixels.
        output_composition (`bool`, *optional*, defaults to `False`):
            Return what the composition does: the angles, the norms of the composition and image-residual terms and,
            with `return_loss=True`, what the conjugate changes in the symmetric constraint (see `MQIRTNOutput`).
        output_hidden_states (`bool`, *optional*, defaults to `config.output_hidden_states`):
            Return the towers' hidden states for the reference images and the texts (`vision_hidden_states`,
            `text_hidden_states`).
        return_dict (`bool`, *optional*, defaults to `config.return_dict`):
            Return an `MQIRTNOutput`; with `False`, its `to_tuple()` (the fields that are not `None`, in order).
        """
        if pixel_values is None or input_ids is None:
            raise ValueError(
                "MQIRTNModel needs both `pixel_values` (reference images) and `input_ids` (modification texts)"
            )
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"`pixel_values` and `input_ids` must have the same batch size, got {pixel_values.shape[0]} and {input_ids.shape[0]}"
            )
        if target_pixel_values is not None and target_pixel_values.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                "`target_pixel_values` and `pixel_values` must have the same batch size, got "
                f"{target_pixel_values.shape[0]} and {pixel_values.shape[0]}"
            )
        if return_loss and target_pixel_values is None:
            raise ValueError("`return_loss=True` needs `target_pixel_values` (the target images)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        output_attentions, output_hidden_states, return_dict = self._flags(
            output_attentions, output_hidden_states, return_dict
        )

        image_tokens, vision_outputs = self._run_vision(pixel_values, output_attentions, output_hidden_states)
        text_tokens, text_outputs = self._run_text(input_ids, attention_mask, output_attentions, output_hidden_states)
        image_embeds = self.image_projection(image_tokens[:, 0])
        text_embeds = self.text_projection(masked_mean(text_tokens, attention_mask))
        query, parts, image_attentions, text_attentions = self._compose(
            image_tokens, text_tokens, attention_mask, image_embeds, text_embeds, 1.0, output_attentions
        )
        query_embeds = normalize(query)
        scale = self.logit_scale.float()

        target_embeds = logits = loss = loss_terms = symmetric_diagnostics = None
        if target_pixel_values is not None:
            target_tokens = self._image_tokens(target_pixel_values)
            target_raw = self.image_projection(target_tokens[:, 0])
            target_embeds = normalize(target_raw)
            logits = scale * query_embeds @ target_embeds.T
            if return_loss:
                loss, loss_terms, symmetric_diagnostics = self._loss(
                    query=query,
                    query_embeds=query_embeds,
                    target_embeds=target_embeds,
                    scale=scale,
                    image_embeds=image_embeds,
                    text_embeds=text_embeds,
                    target_tokens=target_tokens,
                    target_raw=target_raw,
                    text_tokens=text_tokens,
                    attention_mask=attention_mask,
                    pixel_values=pixel_values,
                    target_pixel_values=target_pixel_values,
                    target_ids=target_ids,
                    reference_ids=reference_ids,
                    output_composition=output_composition,
                )

        composition_outputs = {}
        if output_composition:
            composition_outputs = dict(
                composition_angles=parts["angles"],
                composition_norms=parts["composed"].float().norm(dim=-1),
                image_residual_norms=None if parts["residual"] is None else parts["residual"].float().norm(dim=-1),
                symmetric_diagnostics=symmetric_diagnostics,
            )
        output = MQIRTNOutput(
            loss=loss,
            loss_terms=loss_terms,
            query_embeds=query_embeds,
            target_embeds=target_embeds,
            reference_embeds=normalize(image_embeds),
            text_embeds=normalize(text_embeds),
            logits_per_query=logits,
            logit_scale=scale,
            image_attentions=image_attentions,
            text_attentions=text_attentions,
            vision_hidden_states=vision_outputs.hidden_states if output_hidden_states else None,
            text_hidden_states=text_outputs.hidden_states if output_hidden_states else None,
            vision_tower_attentions=getattr(vision_outputs, "attentions", None) if output_attentions else None,
            text_tower_attentions=getattr(text_outputs, "attentions", None) if output_attentions else None,
            **composition_outputs,
        )
        return output if return_dict else output.to_tuple()

    def _loss(
        self,
        *,
        query,
        query_embeds,
        target_embeds,
        scale,
        image_embeds,
        text_embeds,
        target_tokens,
        target_raw,
        text_tokens,
        attention_mask,
        pixel_values,
        target_pixel_values,
        target_ids,
        reference_ids,
        output_composition,
    ):
        config = self.config
        spec = config.composition_spec
        if target_ids is None:
            target_ids = image_fingerprints(target_pixel_values)
        terms = {"base": self.metric_loss(query_embeds, target_embeds, scale, target_ids)}
        total = config.base_loss_weight * terms["base"]
        diagnostics = None
        if spec["complex"]:
            # Symmetric constraint: the target rotated back by the conjugate of the same text must retrieve the
            # reference. The target's tower outputs are reused; only fusion and composition run again.
            if reference_ids is None:
                reference_ids = image_fingerprints(pixel_values)
            reference_embeds = normalize(image_embeds)
            back, _, _, _ = self._compose(target_tokens, text_tokens, attention_mask, target_raw, text_embeds, -1.0)
            back_embeds = normalize(back)
            terms["symmetric"] = self.metric_loss(back_embeds, reference_embeds, scale, reference_ids)
            total = total + config.symmetric_loss_weight * terms["symmetric"]
            if output_composition:
                with torch.no_grad():
                    # Controls on the same targets and texts: the same rotation again (+delta), no rotation and the
                    # conjugate of another query's angles; what the conjugate achieves is read against them.
                    controls = {
                        "same_rotation": (1.0, None),
                        "zero_rotation": (-1.0, "zero"),
                        "shuffled_rotation": (-1.0, "shuffled"),
                    }
                    diagnostics = {}
                    for name, (control_sign, control) in controls.items():
                        other, _, _, _ = self._compose(
                            target_tokens,
                            text_tokens,
                            attention_mask,
                            target_raw,
                            text_embeds,
                            control_sign,
                            angle_control=control,
                        )
                        other_embeds = normalize(other)
                        diagnostics[f"loss_{name}"] = self.metric_loss(
                            other_embeds, reference_embeds, scale, reference_ids
                        )
                        if name == "same_rotation":
                            diagnostics["back_query_cosine"] = (other_embeds * back_embeds).sum(dim=-1)
        if spec["reconstruction"]:
            # Squared distance between unit vectors (0..4), summed over dimensions: a mean over dimensions (MSE) would
            # be <= 4/d, ~1000x weaker than the base loss at d=512. The targets are fixed features (gradient stopped):
            # otherwise the cheapest way to reconstruct a text embedding is to collapse it to a constant.
            terms["reconstruction_image"] = reconstruction_loss(self.image_decoder(query), image_embeds)
            terms["reconstruction_text"] = reconstruction_loss(self.text_decoder(query), text_embeds)
            total = (
                total
                + config.reconstruction_image_loss_weight * terms["reconstruction_image"]
                + config.reconstruction_text_loss_weight * terms["reconstruction_text"]
            )
        return total, terms, diagnostics

    def compile_regions(self, towers: bool = False, **compile_kwargs) -> "MQIRTNModel":
        r"""
        `torch.compile` what MQIRTN adds to the towers, in place: the fusion, the composition, the image residual and the
        decoders (`nn.Module.compile`, so `state_dict` keys and `save_pretrained` are unchanged: no `_orig_mod.`).
        With `towers=True` the towers' layers are compiled one by one too (transformers' regional compilation: one
        graph serves every layer of a tower). Returns the model.

        compile_kwargs: passed to `torch.compile` (`backend`, `mode`, ...). The forward's own Python (tower calls, loss
        terms, optional outputs) stays eager, so every option of `forward` keeps working. `dynamic` defaults to `True`:
        train/eval mode, grad mode and the symmetric pass's conjugate sign each need a graph of their own, and with
        static shapes every text length and batch size would add more, past the 8 graphs dynamo keeps per region (it
        then runs the region eagerly). Pass `dynamic=False` when every call has the same shapes (e.g. for CUDA graphs,
        `mode="reduce-overhead"`; a training loader then drops its last partial batch).
        """
        compile_kwargs.setdefault("dynamic", True)
        # The fusion as one region (both layers in one graph): compiled layer by layer, each layer's call would need a
        # graph of its own for every mode, twice the graphs per region.
        regions = [
            m
            for m in (self.fusion, self.composition, self.image_residual, self.image_decoder, self.text_decoder)
            if m is not None
        ]
        if towers:
            from transformers.modeling_layers import GradientCheckpointingLayer

            for tower in (self.vision_model, self.text_model):
                regions += [m for m in tower.modules() if isinstance(m, GradientCheckpointingLayer)]
        for module in regions:
            module.compile(**compile_kwargs)
        return self

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamps the logit scale into `config.logit_scale_bounds`; call it after each optimiser step (train.py does)."""
        low, high = (float(b) for b in self.config.logit_scale_bounds)
        self.logit_scale.clamp_(low, high)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_vision_text_pretrained(
        cls, vision_model_name_or_path: str, text_model_name_or_path: str, **kwargs
    ) -> "MQIRTNModel":
        r"""
        Composes an MQIRTN model from a pretrained vision checkpoint and a pretrained text checkpoint.

        The tower weights are kept; the projections, fusion, composition, decoders and scale are newly initialised
        (a log line names them). Keyword arguments starting with `vision_` / `text_` go to the respective tower's
        `from_pretrained` (e.g. `vision_attn_implementation="sdpa"`); the others set `MQIRTNConfig` fields.

        Example:

        ```python
        >>> model = MQIRTNModel.from_vision_text_pretrained(
        ...     "google/vit-base-patch16-224-in21k", "bert-base-uncased", projection_dim=512
        ... )  # doctest: +SKIP
        ```
        """
        vision_kwargs = {k[len("vision_") :]: kwargs.pop(k) for k in list(kwargs) if k.startswith("vision_")}
        text_kwargs = {k[len("text_") :]: kwargs.pop(k) for k in list(kwargs) if k.startswith("text_")}
        vision_model = tower_from_pretrained(vision_model_name_or_path, **vision_kwargs)
        text_model = tower_from_pretrained(text_model_name_or_path, **text_kwargs)
        config = MQIRTNConfig.from_vision_text_configs(vision_model.config, text_model.config, **kwargs)
        model = cls(config, vision_model=vision_model, text_model=text_model)
        new_layers = sorted(
            {name.split(".")[0] for name, _ in model.named_parameters()} - {"vision_model", "text_model"}
        )
        logger.warning(
            f"Kept the pretrained towers {vision_model_name_or_path!r} (vision) and {text_model_name_or_path!r} (text); "
            f"newly initialised: {new_layers}. Train the model before using it for retrieval."
        )
        return model


def reconstruction_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of `||normalize(decoded) - normalize(target)||^2` (in [0, 4]), no gradient into `target`."""
    return (normalize(decoded) - normalize(target.detach())).pow(2).sum(dim=-1).mean()


__all__ = [
    "MQIRTNModel",
    "MQIRTNPreTrainedModel",
    "MQIRTNOutput",
    "MQIRTNQueryOutput",
    "tower_from_config",
    "tower_from_pretrained",
]
