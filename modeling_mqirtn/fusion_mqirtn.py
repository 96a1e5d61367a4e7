"""Cross-modal attention fusion between image tokens and text tokens (MQIRTN section 1.3)."""

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from .composition_mqirtn import MQIRTNMLP


class MQIRTNCrossAttention(nn.Module):
    """Multi-head attention of `queries` over `context`: SDPA, or the explicit softmax when weights are asked for or
    `config._attn_implementation` is `"eager"` (read at every call, so `model.set_attn_implementation` applies).

    Inputs: `queries` (B, Nq, d), `context` (B, Nk, d), `context_mask` (B, Nk) with 1 for real tokens.
    Returns the attended values (B, Nq, d) and, with `output_attentions`, weights (B, heads, Nq, Nk).
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0, config=None):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries, context, context_mask=None, output_attentions: bool = False):
        q, k, v = (
            self._heads(self.q_proj(queries)),
            self._heads(self.k_proj(context)),
            self._heads(self.v_proj(context)),
        )
        # Boolean mask broadcast over heads and query positions: True = may attend.
        mask = None if context_mask is None else context_mask.bool()[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        if output_attentions or getattr(self.config, "_attn_implementation", None) == "eager":
            scores = (q @ k.transpose(-1, -2)) / self.head_dim**0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            weights = scores.softmax(dim=-1)
            attended = F.dropout(weights, p=dropout, training=self.training) @ v
            weights = weights if output_attentions else None
        else:
            weights = None
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        attended = attended.transpose(1, 2).reshape(queries.shape)
        return self.out_proj(attended), weights


class MQIRTNFusionLayer(GradientCheckpointingLayer):
    """One fusion layer: image tokens attend to text tokens, then text tokens attend to the updated image tokens.

    Every sub-block is pre-norm with a residual connection, so a layer starts close to the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float = 0.0, config=None):
        super().__init__()
        self.image_norm = nn.LayerNorm(hidden_size)
        self.image_context_norm = nn.LayerNorm(hidden_size)
        self.image_attention = MQIRTNCrossAttention(hidden_size, num_heads, dropout, config)
        self.image_ffn_norm = nn.LayerNorm(hidden_size)
        self.image_ffn = MQIRTNMLP(hidden_size, intermediate_size, hidden_size, dropout)
        self.text_norm = nn.LayerNorm(hidden_size)
        self.text_context_norm = nn.LayerNorm(hidden_size)
        self.text_attention = MQIRTNCrossAttention(hidden_size, num_heads, dropout, config)
        self.text_ffn_norm = nn.LayerNorm(hidden_size)
        self.text_ffn = MQIRTNMLP(hidden_size, intermediate_size, hidden_size, dropout)

    def forward(self, image_tokens, text_tokens, text_mask, output_attentions: bool = False):
        attended, text_to_image = self.image_attention(
            self.image_norm(image_tokens), self.image_context_norm(text_tokens), text_mask, output_attentions
        )
        image_tokens = image_tokens + attended
        image_tokens = image_tokens + self.image_ffn(self.image_ffn_norm(image_tokens))
        attended, image_to_text = self.text_attention(
            self.text_norm(text_tokens), self.text_context_norm(image_tokens), None, output_attentions
        )
        text_tokens = text_tokens + attended
        text_tokens = text_tokens + self.text_ffn(self.text_ffn_norm(text_tokens))
        return image_tokens, text_tokens, text_to_image, image_to_text


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `tokens` (B, L, d) over positions where `mask` (B, L) is 1; plain mean without a mask."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class MQIRTNFusion(nn.Module):
    """Projects image tokens (B, 1+P, dv) and text tokens (B, L, dt) to width d and fuses them.

    Returns the pooled fused image embedding (image CLS slot, or the mean of all image tokens with `pooling="mean"`;
    (B, d)), the pooled fused text embedding (masked mean, (B, d)) and, when asked, per layer the image-queries-text attention weights (B, heads, 1+P, L) and the
    text-queries-image weights (B, heads, L, 1+P). `config` (the model's) chooses the attention implementation.
    """

    def __init__(
        self,
        vision_width,
        text_width,
        hidden_size,
        num_layers,
        num_heads,
        intermediate_size,
        dropout=0.0,
        pooling="cls",
        config=None,
    ):
        super().__init__()
        self.pooling = pooling
        self.image_input = nn.Linear(vision_width, hidden_size)
        self.text_input = nn.Linear(text_width, hidden_size)
        self.layers = nn.ModuleList(
            MQIRTNFusionLayer(hidden_size, num_heads, intermediate_size, dropout, config) for _ in range(num_layers)
        )
        self.image_output_norm = nn.LayerNorm(hidden_size)
        self.text_output_norm = nn.LayerNorm(hidden_size)

    def forward(self, image_states, text_states, text_mask, output_attentions: bool = False):
        image_tokens = self.image_input(image_states)
        text_tokens = self.text_input(text_states)
        image_attentions, text_attentions = [], []
        for layer in self.layers:
            image_tokens, text_tokens, text_to_image, image_to_text = layer(
                image_tokens, text_tokens, text_mask, output_attentions
            )
            image_attentions.append(text_to_image)
            text_attentions.append(image_to_text)
        pooled_image = image_tokens[:, 0] if self.pooling == "cls" else image_tokens.mean(dim=1)
        fused_image = self.image_output_norm(pooled_image)
        fused_text = self.text_output_norm(masked_mean(text_tokens, text_mask))
        if not output_attentions:
            return fused_image, fused_text, None, None
        return fused_image, fused_text, tuple(image_attentions), tuple(text_attentions)
