"""MQIRTN model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.utils import logging


try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError as error:  # older transformers 5.x
    import transformers

    raise ImportError(
        f"MQIRTN needs transformers>=5.24 (composite configs with `SubConfigSpec`), found {transformers.__version__}; "
        "upgrade with `pip install -U 'transformers>=5.24,<6'`"
    ) from error


logger = logging.get_logger(__name__)

# What each composition variant is made of. `fusion`: runs the cross-modal attention fusion;
# `complex`: ComposeAE's rotation in complex space (so the symmetric constraint exists);
# `reconstruction`: has the image/text decoders and their losses;
# `image_residual`: whether the gated residual of the reference is on by default (None: the variant has none).
COMPOSITIONS = {
    "mqirtn": {"fusion": True, "complex": True, "reconstruction": True, "image_residual": True},
    "mqirtn_paper": {"fusion": True, "complex": True, "reconstruction": True, "image_residual": False},
    "composeae": {"fusion": False, "complex": True, "reconstruction": True, "image_residual": None},
    "tirg": {"fusion": False, "complex": False, "reconstruction": False, "image_residual": None},
    "realspace_concat": {"fusion": False, "complex": False, "reconstruction": True, "image_residual": None},
    "image_only": {"fusion": False, "complex": False, "reconstruction": False, "image_residual": None},
    "text_only": {"fusion": False, "complex": False, "reconstruction": False, "image_residual": None},
}
# How the default `mqirtn` composition departs from ComposeAE's published modules (`mqirtn_paper` takes any subset in
# `composition_deviations`); the same names and meanings as `composition_mqirtn.MQIRTN_DEVIATIONS`.
COMPOSITION_DEVIATIONS = ("angle_layernorm", "normal_init", "plain_mlps", "shared_projection", "small_conv")
LOSS_TYPES = ("batch_based_classification", "soft_triplet")


def tower_width(config) -> int | None:
    """Width of a tower's output token states: `hidden_size`, or the last of `hidden_sizes` (ConvNeXt-like towers)."""
    width = getattr(config, "hidden_size", None)
    if width is None and getattr(config, "hidden_sizes", None):
        width = config.hidden_sizes[-1]
    return width


FUSION_POOLINGS = ("cls", "mean")


@strict
class MQIRTNConfig(PreTrainedConfig):
    r"""
    Configuration of an [`MQIRTNModel`]: a vision tower and a text tower (any AutoConfig model types, ViT and BERT by
    default), cross-modal attention fusion, ComposeAE's complex-space composition and the deep-metric-learning loss.

    vision_config (`dict` or `PreTrainedConfig`, *optional*):
        Configuration of the vision tower; a dict may name any `model_type` (default `"vit"`).
    text_config (`dict` or `PreTrainedConfig`, *optional*):
        Configuration of the text tower; a dict may name any `model_type` (default `"bert"`).
    projection_dim (`int`, *optional*, defaults to 512):
        Width `d` of the shared embedding space (queries and gallery images).
    num_fusion_layers (`int`, *optional*, defaults to 2):
        Cross-attention layers between image and text tokens (`composition="mqirtn"` only; 0 disables fusion).
    fusion_num_heads (`int`, *optional*, defaults to 8):
        Attention heads in each fusion layer; must divide `projection_dim`.
    fusion_intermediate_size (`int`, *optional*):
        Width of the fusion feed-forward blocks; defaults to `4 * projection_dim`.
    fusion_dropout (`float`, *optional*, defaults to 0.0):
        Dropout inside the fusion layers.
    fusion_pooling (`str`, *optional*, defaults to `"cls"`):
        How the fused image tokens become one vector: `"cls"` (the CLS slot) or `"mean"` (mean over all image tokens).
    composition (`str`, *optional*, defaults to `"mqirtn"`):
        One of `"mqirtn"`, `"mqirtn_paper"`, `"composeae"`, `"tirg"`, `"realspace_concat"`, `"image_only"`,
        `"text_only"`. `"mqirtn_paper"` is MQIRTN as published: the fusion, then ComposeAE's composition modules as
        in its code (the `"composeae"` baseline's: two complex projections, BatchNorm / Dropout, ComposeAE's
        `rho_conv`, PyTorch's default init) and no image residual. `"mqirtn"` (the default) is that plus this
        package's additions: the image residual and the five `composition_deviations`; what each adds is measured by
        `benchmarks/quality_shapes.py` (paired by seed, see docs/results.md).
    composition_deviations (`list[str]`, *optional*):
        `"mqirtn_paper"` only: which of the default composition's departures from ComposeAE's modules to apply, to
        measure them one at a time: `"shared_projection"` (one complex projection for both mappings),
        `"plain_mlps"` (Linear-GELU-Linear maps and decoders, no BatchNorm / Dropout), `"small_conv"` (`rho_conv` with
        2 convolutions of 16 channels and average pooling), `"normal_init"` (0.02-std normal init), `"angle_layernorm"`
        (a LayerNorm on the angles). All five plus `image_residual=True` build the modules of `"mqirtn"`.
    image_residual (`bool`, *optional*):
        Add a learnable, text-gated residual of the reference's gallery embedding to the query (the fusion
        compositions only). Unset means the composition's default: on for `"mqirtn"`, off for `"mqirtn_paper"`.
    rotation (`bool`, *optional*, defaults to `True`):
        Rotate by the text's angles (`mqirtn`, `mqirtn_paper`, `composeae`). `False` is the `no_rotation` ablation:
        the same parameters, the rotation is the identity (its conjugate does nothing), and the angles still feed the
        convolutional mapping as a channel.
    angle_channel (`bool`, *optional*, defaults to `True`):
        Feed the angles to the convolutional mapping as a channel (the rotating compositions). With `rotation=False`
        too, the text has no angle path at all (the `no_angle_path` ablation).
    conv_channels (`int`, *optional*):
        Channels of the convolutional mapping `rho_conv`; unset means the composition's published default (MQIRTN 16,
        ComposeAE and its real-space ablation 64). Only for compositions that have a convolutional mapping.
    composition_weights_init (`list[float]`, *optional*):
        Initial values of the two learnable mapping weights; unset means the published defaults: `[10.0, 1.0]` for the
        (linear, convolutional) mappings of MQIRTN / ComposeAE / real-space (ComposeAE's `a`), `[1.0, 10.0]` for
        TIRG's (gate, residual) terms. Not for `image_only` / `text_only`.
    loss_type (`str`, *optional*, defaults to `"batch_based_classification"`):
        Deep-metric-learning loss: `"batch_based_classification"` or `"soft_triplet"`.
    logit_scale_init_value (`float`, *optional*, defaults to 20.0):
        Initial value of the learnable scale `s` of the logits `s * cos(query, target)`. TIRG and ComposeAE multiply
        *both* query and target by their normalisation scale (init 4.0), so their logits are `s_tirg**2 * cos`
        (16 at init) and their soft-triplet multiplier is `2 * s_tirg**2` (32): this `s` plays the role of
        `s_tirg**2`, and the soft-triplet loss uses `2 * s`. 20 was measured best on shapes (a scale starting at 4
        stayed there and capped Recall@1 at 11%).
    logit_scale_bounds (`list[float]`, *optional*, defaults to `[1.0, 100.0]`):
        Range of the scale, applied to the parameter after each optimiser step (`MQIRTNModel.clamp_logit_scale_`,
        as CLIP does); the forward pass never clamps, so the scale keeps its gradient at the bounds.
    base_loss_weight, reconstruction_image_loss_weight, reconstruction_text_loss_weight, symmetric_loss_weight (`float`):
        Weights of the four loss terms (ComposeAE: 1.0, 0.1, 0.1, 0.01).
    initializer_range (`float`, *optional*, defaults to 0.02):
        Standard deviation of the normal initialiser of the new layers.

    Example:

    ```python
    >>> from transformers import BertConfig, ViTConfig
    >>> from modeling_mqirtn import MQIRTNConfig, MQIRTNModel

    >>> vision = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    >>> text = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    >>> config = MQIRTNConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=32, fusion_num_heads=4)
    >>> model = MQIRTNModel(config)
    >>> config.composition
    'mqirtn'
    ```"""

    model_type = "mqirtn"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    projection_dim: int = 512
    num_fusion_layers: int = 2
    fusion_num_heads: int = 8
    fusion_intermediate_size: int | None = None
    fusion_dropout: float | int = 0.0
    fusion_pooling: str = "cls"
    composition: str = "mqirtn"
    composition_deviations: list[str] | tuple[str, ...] | None = None
    image_residual: bool | None = None
    rotation: bool = True
    angle_channel: bool = True
    conv_channels: int | None = None
    composition_weights_init: list[float | int] | tuple[float | int, ...] | None = None
    loss_type: str = "batch_based_classification"
    logit_scale_init_value: float | int = 20.0
    logit_scale_bounds: list[float | int] | tuple[float | int, ...] = (1.0, 100.0)
    base_loss_weight: float | int = 1.0
    reconstruction_image_loss_weight: float | int = 0.1
    reconstruction_text_loss_weight: float | int = 0.1
    symmetric_loss_weight: float | int = 0.01
    initializer_range: float | int = 0.02

    def validate_architecture(self):
        """Validates every MQIRTN field; raises `ValueError` naming the field, the value and what is allowed."""
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"`composition` must be one of {sorted(COMPOSITIONS)}, got {self.composition!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"`loss_type` must be one of {list(LOSS_TYPES)}, got {self.loss_type!r}")
        for name in ("projection_dim", "fusion_num_heads"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}")
        if self.conv_channels is not None:
            if self.composition not in ("mqirtn", "mqirtn_paper", "composeae", "realspace_concat"):
                raise ValueError(
                    f"`conv_channels` applies to the compositions with a convolutional mapping (mqirtn, mqirtn_paper, "
                    f"composeae, realspace_concat), not {self.composition!r}; leave it unset"
                )
            if self.conv_channels < 1:
                raise ValueError(f"`conv_channels` must be a positive integer, got {self.conv_channels}")
        rotating = sorted(name for name, spec in COMPOSITIONS.items() if spec["complex"])
        for name in ("rotation", "angle_channel"):
            if not getattr(self, name) and not self.composition_spec["complex"]:
                raise ValueError(
                    f"`{name}=False` applies to the rotating compositions {rotating}, not {self.composition!r}"
                )
        if self.image_residual and self.composition_spec["image_residual"] is None:
            with_residual = sorted(name for name, spec in COMPOSITIONS.items() if spec["image_residual"] is not None)
            raise ValueError(
                f"`image_residual=True` applies to the compositions {with_residual}, not {self.composition!r}; leave it unset"
            )
        if self.composition_deviations is not None:
            if self.composition != "mqirtn_paper":
                raise ValueError(
                    f"`composition_deviations` applies to composition 'mqirtn_paper' (the default 'mqirtn' has them all), "
                    f"not {self.composition!r}; leave it unset"
                )
            unknown = sorted(set(self.composition_deviations) - set(COMPOSITION_DEVIATIONS))
            if unknown:
                raise ValueError(
                    f"`composition_deviations` must name some of {list(COMPOSITION_DEVIATIONS)}, got {unknown}"
                )
        if self.num_fusion_layers < 0:
            raise ValueError(f"`num_fusion_layers` must be >= 0, got {self.num_fusion_layers}")
        if self.projection_dim % self.fusion_num_heads != 0:
            raise ValueError(
                f"`projection_dim` ({self.projection_dim}) must be divisible by `fusion_num_heads` "
                f"({self.fusion_num_heads})"
            )
        if self.projection_dim < 4:
            raise ValueError(
                f"`projection_dim` must be at least 4 (the convolutional mapping pools to d/4), got {self.projection_dim}"
            )
        if self.fusion_intermediate_size is not None and self.fusion_intermediate_size < 1:
            raise ValueError(
                f"`fusion_intermediate_size` must be a positive integer or None, got {self.fusion_intermediate_size}"
            )
        if self.fusion_pooling not in FUSION_POOLINGS:
            raise ValueError(f"`fusion_pooling` must be one of {list(FUSION_POOLINGS)}, got {self.fusion_pooling!r}")
        if not 0.0 <= self.fusion_dropout < 1.0:
            raise ValueError(f"`fusion_dropout` must be in [0, 1), got {self.fusion_dropout}")
        for name in (
            "base_loss_weight",
            "reconstruction_image_loss_weight",
            "reconstruction_text_loss_weight",
            "symmetric_loss_weight",
        ):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}")
        if self.composition_weights_init is not None:
            if self.composition in ("image_only", "text_only"):
                raise ValueError(
                    f"`composition_weights_init` does not apply to {self.composition!r} (it has no mapping weights); leave it unset"
                )
            if len(self.composition_weights_init) != 2:
                raise ValueError(
                    "`composition_weights_init` must hold two values (the two mapping weights), "
                    f"got {list(self.composition_weights_init)}"
                )
        bounds = list(self.logit_scale_bounds)
        if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
            raise ValueError(f"`logit_scale_bounds` must be two numbers 0 < low <= high, got {bounds}")
        if not bounds[0] <= self.logit_scale_init_value <= bounds[1]:
            raise ValueError(
                f"`logit_scale_init_value` must lie within `logit_scale_bounds` {list(self.logit_scale_bounds)}, "
                f"got {self.logit_scale_init_value}"
            )
        for key in ("vision_config", "text_config"):
            sub = getattr(self, key)
            if tower_width(sub) is None:
                raise ValueError(
                    f"`{key}` ({sub.model_type!r}) must define `hidden_size` (or `hidden_sizes`), the width of its token states"
                )

    @property
    def composition_spec(self) -> dict:
        """What the chosen composition variant is made of (see `COMPOSITIONS`)."""
        return COMPOSITIONS[self.composition]

    @property
    def uses_fusion(self) -> bool:
        return self.composition_spec["fusion"] and self.num_fusion_layers > 0

    @property
    def uses_image_residual(self) -> bool:
        """Whether the query has the gated image residual: `image_residual`, or unset, the composition's default."""
        default = self.composition_spec["image_residual"]
        return bool(default if self.image_residual is None else self.image_residual) and default is not None

    @classmethod
    def from_vision_text_configs(cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs):
        """Builds an `MQIRTNConfig` from two tower configurations; `kwargs` set the MQIRTN fields."""
        return cls(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), **kwargs)


__all__ = ["MQIRTNConfig", "COMPOSITIONS", "COMPOSITION_DEVIATIONS", "LOSS_TYPES", "tower_width"]
