"""Composition of an image embedding and a text embedding into a query embedding (MQIRTN section 1.4, 1.7).

Every composition module maps an image embedding (B, d) and a text embedding (B, d) to a query embedding (B, d)
and, for the rotations in complex space, the angles delta (B, d): `forward(image, text, sign) -> (query, angles)`.

The baselines (`composeae`, `realspace_concat`, `tirg`) and `mqirtn_paper` (MQIRTN as published: the fusion, then
ComposeAE's modules) follow their published code: BatchNorm, Dropout, ReLU and PyTorch's default initialisation
(modules built by `torch_default_init`, which `MQIRTNPreTrainedModel._init_weights` leaves at PyTorch's defaults
instead of the 0.02-std normal of new transformers layers). The default `mqirtn` composition departs from ComposeAE's
modules in the five ways of `MQIRTN_DEVIATIONS` (its layers keep the transformers initialisation, except its angle map,
see `MQIRTNAngleMap`) and adds the image residual (`MQIRTNImageResidual`); `mqirtn_paper` takes each deviation alone.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


def torch_default_init(module: nn.Module) -> nn.Module:
    """Marks every Linear/Conv1d inside `module` to keep PyTorch's default initialisation (returns `module`)."""
    for child in module.modules():
        if isinstance(child, (nn.Linear, nn.Conv1d)):
            child._mqirtn_torch_default_init = True
    return module


def reset_torch_default(module: nn.Module, init) -> None:
    """PyTorch's own `reset_parameters` of a Linear/Conv1d, through transformers' guarded `init` functions (so
    weights loaded from a checkpoint are never overwritten)."""
    init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if module.bias is not None:
        fan_in = module.weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        init.uniform_(module.bias, -bound, bound)


class MQIRTNMLP(nn.Module):
    """Linear -> GELU -> Linear (-> Dropout): MQIRTN's mappings, decoders and the fusion feed-forward blocks."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


def batchnorm_mlp(
    in_features: int, hidden_features: int, out_features: int, relu_first: bool = True, dropout: float = 0.0
) -> nn.Sequential:
    """ComposeAE/TIRG's mapping blocks, with PyTorch's default initialisation.

    `relu_first=True`: BatchNorm1d -> ReLU -> Linear -> ReLU -> Linear (ComposeAE's rho mappings and decoders, TIRG's
    residual composer). `relu_first=False`: BatchNorm1d -> Linear -> Dropout -> ReLU -> Linear (ComposeAE's complex
    projection of the image and the text).
    """
    if relu_first:
        layers = [nn.BatchNorm1d(in_features), nn.ReLU(), nn.Linear(in_features, hidden_features), nn.ReLU()]
    else:
        layers = [nn.BatchNorm1d(in_features), nn.Linear(in_features, hidden_features), nn.Dropout(dropout), nn.ReLU()]
    return torch_default_init(nn.Sequential(*layers, nn.Linear(hidden_features, out_features)))


def rotate(eta: torch.Tensor, delta: torch.Tensor, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`eta * exp(i * sign * delta)` as (real, imaginary) parts; `sign=-1` is the conjugate rotation."""
    return eta * torch.cos(delta), sign * eta * torch.sin(delta)


# Controls of the symmetric constraint (`angle_control`): the angles a rotation uses instead of the text's own.
ANGLE_CONTROLS = ("zero", "shuffled")


def controlled_angles(delta: torch.Tensor, angle_control: str | None) -> torch.Tensor:
    """The angles (B, d) a rotation uses: the text's own (`None`), none (`"zero"`: the identity rotation) or another
    query's (`"shuffled"`: the batch rolled by one row, so each query is rotated by its neighbour's text)."""
    if angle_control is None:
        return delta
    if angle_control == "zero":
        return torch.zeros_like(delta)
    if angle_control == "shuffled":
        return delta.roll(1, dims=0)
    raise ValueError(f"`angle_control` must be one of {list(ANGLE_CONTROLS)} or None, got {angle_control!r}")


def rotation_inputs(delta: torch.Tensor, rotation: bool, angle_channel: bool, angle_control: str | None):
    """(angles the rotation uses, angles fed to the convolutional mapping as a channel).

    `rotation=False`: the rotation is the identity (angles 0) while the angles still feed `rho_conv`;
    `angle_channel=False`: `rho_conv` sees zeros in the angle channel. Both off: the text has no angle path at all.
    """
    rotated = controlled_angles(delta, angle_control) if rotation else torch.zeros_like(delta)
    return rotated, (delta if angle_channel else torch.zeros_like(delta))


class MQIRTNAngleMap(nn.Module):
    """The text's rotation angles delta (B, d), in radians, spread over radians from the first step.

    Linear -> ReLU -> Linear with PyTorch's default initialisation (ComposeAE's text mapping, whose input here is
    already LayerNorm'd by the fusion), then a LayerNorm whose gain is the per-dimension angle scale: at
    initialisation every text's angles have rms 1 rad whatever `d` (a 0.02-std init gave 0.007-0.1 rad, so the
    rotation was the identity and its conjugate did nothing).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = torch_default_init(
            nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size))
        )
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.norm(self.mlp(text))


class MQIRTNConvMapping(nn.Module):
    """MQIRTN's convolutional mapping: channels (B, C, d) -> Conv1d x2 -> adaptive average pooling to d/4 -> MLP."""

    def __init__(self, in_channels: int, conv_channels: int, hidden_size: int):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, conv_channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(conv_channels, conv_channels, kernel_size=3, padding=1)
        self.pool = nn.AdaptiveAvgPool1d(hidden_size // 4)
        self.mlp = MQIRTNMLP(conv_channels * (hidden_size // 4), hidden_size, hidden_size)

    def forward(self, channels: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(channels))
        x = F.gelu(self.conv2(x))
        return self.mlp(self.pool(x).flatten(1))


class ComposeAEConvMapping(nn.Module):
    """ComposeAE's convolutional mapping: Conv1d(C -> conv_channels, k=3) -> AdaptiveMaxPool1d(pool_size) ->
    flatten -> BatchNorm1d -> ReLU -> Linear -> ReLU -> Linear (PyTorch default init)."""

    def __init__(self, in_channels: int, conv_channels: int, pool_size: int, hidden_size: int):
        super().__init__()
        self.conv = torch_default_init(nn.Conv1d(in_channels, conv_channels, kernel_size=3, padding=1))
        self.pool = nn.AdaptiveMaxPool1d(pool_size)
        self.mapping = batchnorm_mlp(conv_channels * pool_size, hidden_size, hidden_size)

    def forward(self, channels: torch.Tensor) -> torch.Tensor:
        return self.mapping(self.pool(self.conv(channels)).flatten(1))


class MQIRTNComplexComposition(nn.Module):
    """MQIRTN's rotation in complex space (the `mqirtn` composition: ComposeAE's with every deviation of
    `MQIRTN_DEVIATIONS`).

    `eta = f_img(image)`, `delta = f_txt(text)` (`MQIRTNAngleMap`), `z = eta * exp(i * sign * delta)`; the query is
    `a_lin * rho_lin([Re z, Im z]) + a_conv * rho_conv([Re z, Im z, eta, delta, image])`. `sign=-1` rotates by the
    conjugate, which the symmetric constraint uses to go from the target back to the reference. `rotation=False`
    makes the rotation the identity (the angles still feed `rho_conv`); `angle_channel=False` takes them out of
    `rho_conv`; `angle_control` replaces the rotation's angles by a control (`controlled_angles`). The angles returned
    are always the text's own.
    """

    def __init__(
        self, hidden_size: int, conv_channels: int, weights_init, rotation: bool = True, angle_channel: bool = True
    ):
        super().__init__()
        self.image_map = MQIRTNMLP(hidden_size, hidden_size, hidden_size)
        self.text_map = MQIRTNAngleMap(hidden_size)
        self.linear_mapping = MQIRTNMLP(2 * hidden_size, hidden_size, hidden_size)
        self.conv_mapping = MQIRTNConvMapping(5, conv_channels, hidden_size)
        self.weights_init = tuple(float(w) for w in weights_init)
        self.mapping_weights = nn.Parameter(torch.tensor(self.weights_init))
        self.rotation, self.angle_channel = rotation, angle_channel

    def forward(self, image: torch.Tensor, text: torch.Tensor, sign: float = 1.0, angle_control: str | None = None):
        eta = self.image_map(image)
        delta = self.text_map(text)
        rotated, channel = rotation_inputs(delta, self.rotation, self.angle_channel, angle_control)
        real, imag = rotate(eta, rotated, sign)
        linear = self.linear_mapping(torch.cat([real, imag], dim=-1))
        conv = self.conv_mapping(torch.stack([real, imag, eta, channel, image], dim=1))
        return self.mapping_weights[0] * linear + self.mapping_weights[1] * conv, delta


# How MQIRTN's own composition (`composition="mqirtn"`) departs from ComposeAE's published modules, one switch each.
# `composition="mqirtn_paper"` (MQIRTN as published: the fusion + ComposeAE's modules) takes any subset of them in
# `composition_deviations`, so each one can be measured alone; all five together build the same modules as `mqirtn`.
MQIRTN_DEVIATIONS = {
    "shared_projection": "one complex projection feeds both mappings (ComposeAE: one projection per mapping)",
    "plain_mlps": "Linear-GELU-Linear image map, rho_lin and decoders and a Linear-ReLU-Linear angle map, without "
    "BatchNorm or Dropout (ComposeAE: BatchNorm first, Dropout 0.5 in the image map)",
    "small_conv": "rho_conv = 2 convolutions of 16 channels, average pooling to d/4, MLP (ComposeAE: 1 convolution of "
    "64 channels, max pooling to 16, BatchNorm MLP)",
    "normal_init": "the image map and both mappings start from transformers' 0.02-std normal initialisation "
    "(ComposeAE: PyTorch's default; the angle map keeps it in both)",
    "angle_layernorm": "a LayerNorm on the angles, so they have rms 1 rad per text from the first step",
}


def set_torch_default_init(module: nn.Module, torch_default: bool) -> nn.Module:
    """Marks (True) or unmarks (False) every Linear/Conv1d inside `module` for PyTorch's default initialisation."""
    for child in module.modules():
        if isinstance(child, (nn.Linear, nn.Conv1d)):
            child._mqirtn_torch_default_init = torch_default
    return module


class ComposeAEComplexProjection(nn.Module):
    """ComposeAE's `ComplexProjectionModule`: eta = image MLP (dropout 0.5), delta = text MLP, then the rotation.

    `plain_mlps` / `angle_layernorm`: MQIRTN's image map (`MQIRTNMLP`) and angle map (Linear-ReLU-Linear, then a
    LayerNorm with `angle_layernorm`) instead (see `MQIRTN_DEVIATIONS`)."""

    def __init__(
        self,
        hidden_size: int,
        rotation: bool = True,
        angle_channel: bool = True,
        plain_mlps: bool = False,
        angle_layernorm: bool = False,
    ):
        super().__init__()
        if plain_mlps:
            self.image_features = MQIRTNMLP(hidden_size, hidden_size, hidden_size)
            text_layers = [nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size)]
            self.text_features = torch_default_init(nn.Sequential(*text_layers))
        else:
            self.image_features = batchnorm_mlp(hidden_size, hidden_size, hidden_size, relu_first=False, dropout=0.5)
            self.text_features = batchnorm_mlp(hidden_size, hidden_size, hidden_size, relu_first=False)
        self.angle_norm = nn.LayerNorm(hidden_size) if angle_layernorm else None
        self.rotation, self.angle_channel = rotation, angle_channel

    def forward(self, image: torch.Tensor, text: torch.Tensor, sign: float, angle_control: str | None = None):
        """(eta, angles for rho_conv's channel, Re z, Im z, the text's own angles)."""
        eta = self.image_features(image)
        delta = self.text_features(text)
        if self.angle_norm is not None:
            delta = self.angle_norm(delta)
        rotated, channel = rotation_inputs(delta, self.rotation, self.angle_channel, angle_control)
        real, imag = rotate(eta, rotated, sign)
        return eta, channel, real, imag, delta


class ComposeAEComposition(nn.Module):
    """ComposeAE (Anwaar et al., WACV 2021) as in its published code: two complex projections (one feeding the
    linear mapping, one the convolutional mapping), `theta = a_lin * rho_lin([Re z, Im z]) + a_conv *
    rho_conv([eta, delta, image, Re z, Im z])` with a = (10, 1); the angles returned are the linear branch's.

    The `composeae` baseline and `mqirtn_paper` (after the fusion) use it as published; `deviations` (names of
    `MQIRTN_DEVIATIONS`) switch single modules to MQIRTN's own. `rotation`, `angle_channel` and `angle_control` as in
    `MQIRTNComplexComposition`.
    """

    def __init__(
        self,
        hidden_size: int,
        conv_channels: int,
        weights_init,
        rotation: bool = True,
        angle_channel: bool = True,
        deviations=(),
    ):
        super().__init__()
        unknown = sorted(set(deviations) - set(MQIRTN_DEVIATIONS))
        if unknown:
            raise ValueError(f"`deviations` must be names of {sorted(MQIRTN_DEVIATIONS)}, got {unknown}")
        self.deviations = tuple(sorted(deviations))
        plain = "plain_mlps" in deviations
        projection = dict(
            rotation=rotation,
            angle_channel=angle_channel,
            plain_mlps=plain,
            angle_layernorm="angle_layernorm" in deviations,
        )
        self.linear_projection = ComposeAEComplexProjection(hidden_size, **projection)
        shared = "shared_projection" in deviations
        self.conv_projection = None if shared else ComposeAEComplexProjection(hidden_size, **projection)
        if plain:
            self.linear_mapping = MQIRTNMLP(2 * hidden_size, hidden_size, hidden_size)
        else:
            self.linear_mapping = batchnorm_mlp(2 * hidden_size, hidden_size, hidden_size)
        if "small_conv" in deviations:
            self.conv_mapping = MQIRTNConvMapping(5, conv_channels, hidden_size)
        else:
            self.conv_mapping = ComposeAEConvMapping(5, conv_channels, 16, hidden_size)
        # Every layer but the angle map: PyTorch's default init (ComposeAE) or transformers' normal init (MQIRTN's).
        torch_default = "normal_init" not in deviations
        for module in (self.linear_mapping, self.conv_mapping) + tuple(
            p.image_features for p in (self.linear_projection, self.conv_projection) if p is not None
        ):
            set_torch_default_init(module, torch_default)
        self.weights_init = tuple(float(w) for w in weights_init)
        self.mapping_weights = nn.Parameter(torch.tensor(self.weights_init))

    def forward(self, image: torch.Tensor, text: torch.Tensor, sign: float = 1.0, angle_control: str | None = None):
        eta, channel, real, imag, delta = self.linear_projection(image, text, sign, angle_control)
        linear = self.linear_mapping(torch.cat([real, imag], dim=-1))
        if self.conv_projection is not None:
            eta, channel, real, imag, _ = self.conv_projection(image, text, sign, angle_control)
        if isinstance(self.conv_mapping, MQIRTNConvMapping):
            conv = self.conv_mapping(torch.stack([real, imag, eta, channel, image], dim=1))
        else:
            conv = self.conv_mapping(torch.stack([eta, channel, image, real, imag], dim=1))
        return self.mapping_weights[0] * linear + self.mapping_weights[1] * conv, delta


class RealSpaceConcatComposition(nn.Module):
    """ComposeAE's real-space ablation (`RealSpaceConcatAE`): the linear and convolutional mappings applied to the
    concatenation `[image, text]` (Conv1d over it as one channel, AdaptiveMaxPool1d(20)), no rotation."""

    def __init__(self, hidden_size: int, conv_channels: int, weights_init):
        super().__init__()
        self.linear_mapping = batchnorm_mlp(2 * hidden_size, hidden_size, hidden_size)
        self.conv_mapping = ComposeAEConvMapping(1, conv_channels, 20, hidden_size)
        self.weights_init = tuple(float(w) for w in weights_init)
        self.mapping_weights = nn.Parameter(torch.tensor(self.weights_init))

    def forward(self, image: torch.Tensor, text: torch.Tensor, sign: float = 1.0, angle_control: str | None = None):
        both = torch.cat([image, text], dim=-1)
        linear = self.linear_mapping(both)
        conv = self.conv_mapping(both[:, None, :])
        return self.mapping_weights[0] * linear + self.mapping_weights[1] * conv, None


class TIRGComposition(nn.Module):
    """TIRG (Vo et al., CVPR 2019) as in its published code: `a_gate * sigmoid(gate([image, text])) * image + a_res *
    res([image, text])`, gate = BatchNorm1d -> ReLU -> Linear, res = BatchNorm1d -> ReLU -> Linear -> ReLU -> Linear
    (width 2d), a = (1, 10), PyTorch default init."""

    def __init__(self, hidden_size: int, weights_init):
        super().__init__()
        self.gate = torch_default_init(
            nn.Sequential(nn.BatchNorm1d(2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, hidden_size))
        )
        self.residual = batchnorm_mlp(2 * hidden_size, 2 * hidden_size, hidden_size)
        self.weights_init = tuple(float(w) for w in weights_init)
        self.mapping_weights = nn.Parameter(torch.tensor(self.weights_init))

    def forward(self, image: torch.Tensor, text: torch.Tensor, sign: float = 1.0, angle_control: str | None = None):
        both = torch.cat([image, text], dim=-1)
        gated = torch.sigmoid(self.gate(both)) * image
        return self.mapping_weights[0] * gated + self.mapping_weights[1] * self.residual(both), None


class MQIRTNImageOnly(nn.Module):
    """Baseline: the query is the reference image's embedding."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, sign: float = 1.0, angle_control: str | None = None):
        return image, None


class MQIRTNTextOnly(nn.Module):
    """Baseline: the query is the modification text's embedding."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, sign: float = 1.0, angle_control: str | None = None):
        return text, None


class MQIRTNImageResidual(nn.Module):
    """Text-gated residual of the reference's gallery embedding: `w * sigmoid(gate([fused_image, fused_text])) * phi(x)`.

    It gives the composed query an identity path to the reference, so training starts from "the reference image"
    and learns the modification on top of it.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.gate = nn.Linear(2 * hidden_size, hidden_size)
        self.weight = nn.Parameter(torch.tensor(1.0))

    def forward(self, reference_embeds, image, text):
        return self.weight * torch.sigmoid(self.gate(torch.cat([image, text], dim=-1))) * reference_embeds


# Published defaults of each composition: (mapping weights, convolution channels). ComposeAE: a = (10, 1) for the
# (linear, convolutional) mapping, 64 channels; TIRG: a = (1, 10) for the (gate, residual) terms.
COMPOSITION_DEFAULTS = {
    "mqirtn": ((10.0, 1.0), 16),
    "mqirtn_paper": ((10.0, 1.0), 64),
    "composeae": ((10.0, 1.0), 64),
    "realspace_concat": ((10.0, 1.0), 64),
    "tirg": ((1.0, 10.0), None),
    "image_only": (None, None),
    "text_only": (None, None),
}


def build_composition(config) -> nn.Module:
    """The composition module of the variant named `config.composition`, with its published defaults where the
    config leaves `composition_weights_init` / `conv_channels` unset."""
    composition, dim = config.composition, config.projection_dim
    if composition not in COMPOSITION_DEFAULTS:
        raise ValueError(f"`composition` must be one of {sorted(COMPOSITION_DEFAULTS)}, got {composition!r}")
    default_weights, default_channels = COMPOSITION_DEFAULTS[composition]
    weights = config.composition_weights_init if config.composition_weights_init is not None else default_weights
    deviations = tuple(config.composition_deviations or ())
    if composition == "mqirtn_paper" and "small_conv" in deviations:
        default_channels = COMPOSITION_DEFAULTS["mqirtn"][1]
    channels = config.conv_channels if config.conv_channels is not None else default_channels
    if composition == "mqirtn":
        return MQIRTNComplexComposition(dim, channels, weights, config.rotation, config.angle_channel)
    if composition in ("composeae", "mqirtn_paper"):
        return ComposeAEComposition(dim, channels, weights, config.rotation, config.angle_channel, deviations)
    if composition == "realspace_concat":
        return RealSpaceConcatComposition(dim, channels, weights)
    if composition == "tirg":
        return TIRGComposition(dim, weights)
    if composition == "image_only":
        return MQIRTNImageOnly()
    return MQIRTNTextOnly()


def build_decoder(config, out_features: int) -> nn.Module:
    """Reconstruction decoder from the query (B, d) to (B, out_features): ComposeAE's for its own variants and
    `mqirtn_paper`, MQIRTN's MLP otherwise (and with the `plain_mlps` deviation)."""
    dim = config.projection_dim
    published = config.composition in ("composeae", "realspace_concat") or (
        config.composition == "mqirtn_paper" and "plain_mlps" not in (config.composition_deviations or ())
    )
    if published:
        return batchnorm_mlp(dim, out_features, out_features)
    decoder = MQIRTNMLP(dim, dim, out_features)
    if config.composition == "mqirtn_paper" and "normal_init" not in (config.composition_deviations or ()):
        set_torch_default_init(decoder, True)  # the published (default) init unless that deviation is chosen too
    return decoder
