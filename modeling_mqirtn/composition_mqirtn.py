"""Composition of an image embedding and a text embedding into a query embedding (MQIRTN section 1.4, 1.7).

Every module here maps an image embedding (B, d) and a text embedding (B, d) to a query embedding (B, d).
"""

import torch
from torch import nn
from torch.nn import functional as F


class MQIRTNMLP(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class MQIRTNConvMapping(nn.Module):
    """ComposeAE's convolutional mapping: channels (B, C, d) -> Conv1d x2 -> adaptive pooling to d/4 -> MLP -> (B, d)."""

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


class MQIRTNComplexComposition(nn.Module):
    """ComposeAE's rotation in complex space.

    `eta = f_img(image)`, `delta = f_txt(text)`, `z = eta * exp(i * sign * delta)`; the query is
    `a_lin * rho_lin([Re z, Im z]) + a_conv * rho_conv([Re z, Im z, eta, delta, image])`. `sign=-1` rotates by the
    conjugate, which the symmetric constraint uses to go from the target back to the reference.
    """

    def __init__(self, hidden_size: int, conv_channels: int, weights_init):
        super().__init__()
        self.image_map = MQIRTNMLP(hidden_size, hidden_size, hidden_size)
        self.text_map = MQIRTNMLP(hidden_size, hidden_size, hidden_size)
        self.linear_mapping = MQIRTNMLP(2 * hidden_size, hidden_size, hidden_size)
        self.conv_mapping = MQIRTNConvMapping(5, conv_channels, hidden_size)
        self.weights_init = tuple(float(w) for w in weights_init)
        self.mapping_weights = nn.Parameter(torch.tensor(self.weights_init))

    def forward(self, image: torch.Tensor, text: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        eta = self.image_map(image)
        delta = self.text_map(text)
        real, imag = eta * torch.cos(delta), sign * eta * torch.sin(delta)
        linear = self.linear_mapping(torch.cat([real, imag], dim=-1))
        conv = self.conv_mapping(torch.stack([real, imag, eta, delta, image], dim=1))
        return self.mapping_weights[0] * linear + self.mapping_weights[1] * conv


class MQIRTNRealSpaceComposition(nn.Module):
    """ComposeAE's real-space ablation: the same linear + convolutional mappings on `[image, text]`, no rotation."""

    def __init__(self, hidden_size: int, conv_channels: int, weights_init):
        super().__init__()
        self.linear_mapping = MQIRTNMLP(2 * hidden_size, hidden_size, hidden_size)
        self.conv_mapping = MQIRTNConvMapping(2, conv_channels, hidden_size)
        self.weights_init = tuple(float(w) for w in weights_init)
        self.mapping_weights = nn.Parameter(torch.tensor(self.weights_init))

    def forward(self, image: torch.Tensor, text: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        linear = self.linear_mapping(torch.cat([image, text], dim=-1))
        conv = self.conv_mapping(torch.stack([image, text], dim=1))
        return self.mapping_weights[0] * linear + self.mapping_weights[1] * conv


class MQIRTNGatedResidualComposition(nn.Module):
    """TIRG: `w_gate * sigmoid(gate([image, text])) * image + w_res * res([image, text])` (TIRG initialises w to 1, 10)."""

    def __init__(self, hidden_size: int, conv_channels: int = 0, weights_init=(1.0, 10.0)):
        super().__init__()
        self.gate = MQIRTNMLP(2 * hidden_size, hidden_size, hidden_size)
        self.residual = MQIRTNMLP(2 * hidden_size, hidden_size, hidden_size)
        self.weights_init = tuple(float(w) for w in weights_init)
        self.mapping_weights = nn.Parameter(torch.tensor(self.weights_init))

    def forward(self, image: torch.Tensor, text: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        both = torch.cat([image, text], dim=-1)
        return self.mapping_weights[0] * torch.sigmoid(self.gate(both)) * image + self.mapping_weights[1] * self.residual(both)


class MQIRTNImageOnly(nn.Module):
    """Baseline: the query is the reference image's embedding."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        return image


class MQIRTNTextOnly(nn.Module):
    """Baseline: the query is the modification text's embedding."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        return text


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


def build_composition(composition: str, hidden_size: int, conv_channels: int, weights_init) -> nn.Module:
    """The composition module of the variant named `composition`."""
    if composition in ("mqirtn", "composeae"):
        return MQIRTNComplexComposition(hidden_size, conv_channels, weights_init)
    if composition == "realspace_concat":
        return MQIRTNRealSpaceComposition(hidden_size, conv_channels, weights_init)
    if composition == "tirg":
        return MQIRTNGatedResidualComposition(hidden_size)
    if composition == "image_only":
        return MQIRTNImageOnly()
    if composition == "text_only":
        return MQIRTNTextOnly()
    raise ValueError(
        "`composition` must be one of ['composeae', 'image_only', 'mqirtn', 'realspace_concat', 'text_only', 'tirg'], "
        f"got {composition!r}"
    )
