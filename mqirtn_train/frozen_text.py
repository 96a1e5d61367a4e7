"""`CachedFrozenTextModel`: a frozen text tower whose token states are computed once per distinct text and reused.

`--frozen_text_cache` (on with `--freeze_text`) puts it in place of the model's text tower:

    model.text_model = CachedFrozenTextModel(model.text_model)

The tower is the wrapper's `tower`; the wrapper's state dict holds the tower's own keys (no `tower.` prefix), so the
checkpoints and saved models of a run with the cache are those of the same run without it, and load either way.

A text's states depend, at float rounding, on the sub-batch it was computed in (its width and neighbours). So that a
resumed run continues bit for bit, every checkpoint also holds the cache's history (`save_history`: which texts were
computed together, in order; token ids only) and `load_history` recomputes exactly those sub-batches.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import BaseModelOutput


_TOWER = "tower."


def _state_dict_without_tower_prefix(module, state_dict, prefix, local_metadata) -> None:
    """The tower's entries under the wrapper's own prefix, in their order (they are the last ones added so far)."""
    inner = prefix + _TOWER
    for key in [key for key in state_dict if key.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _state_dict_with_tower_prefix(module, state_dict, prefix, *args) -> None:
    """A plain tower's entries (`prefix` + name) loaded into the wrapped tower (`prefix` + `tower.` + name)."""
    for key in [key for key in state_dict if key.startswith(prefix) and not key.startswith(prefix + _TOWER)]:
        state_dict[prefix + _TOWER + key[len(prefix) :]] = state_dict.pop(key)


class CachedFrozenTextModel(nn.Module):
    """A frozen text tower that computes each distinct text (its unpadded token ids) once and reuses its token states.

    Rows already seen are read from the cache; the others run through the tower as one sub-batch. Padding positions
    come back as zeros: every consumer (masked mean, the fusion's key-padding mask) ignores them, so queries equal the
    uncached ones up to float rounding. Calls that ask for hidden states or attentions go to the tower itself. At most
    `max_entries` texts are kept (oldest dropped). `hits` and `misses` count rows.

    Args:
        tower (`PreTrainedModel`): the text tower; all its parameters must be frozen (`requires_grad=False`).
        max_entries (`int`, *optional*, defaults to 500,000): the most texts kept.
    """

    def __init__(self, tower: nn.Module, max_entries: int = 500_000):
        super().__init__()
        if any(parameter.requires_grad for parameter in tower.parameters()):
            raise ValueError("CachedFrozenTextModel needs a frozen tower (its parameters must not require gradients)")
        self.tower, self.max_entries = tower, max_entries
        self.entries: dict[tuple[int, ...], torch.Tensor] = {}
        self.groups: list[list[tuple[int, ...]]] = []  # the texts of each tower call, in order (the history)
        self.hits = self.misses = 0
        self.register_state_dict_post_hook(_state_dict_without_tower_prefix)
        self.register_load_state_dict_pre_hook(_state_dict_with_tower_prefix)

    @property
    def config(self):
        return self.tower.config

    def get_input_embeddings(self) -> nn.Module:
        return self.tower.get_input_embeddings()

    def __deepcopy__(self, memo):
        # A copy of the model (the composition diagnostics) shares the entries and their history: its frozen tower
        # gives the same states, and what it computes is part of the history a resumed run replays.
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        for name, value in vars(self).items():
            clone.__dict__[name] = value if name in ("entries", "groups") else copy.deepcopy(value, memo)
        clone.hits = clone.misses = 0
        return clone

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if input_ids is None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return self.tower(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(dim=1).tolist()
        keys = [tuple(row[:length]) for row, length in zip(input_ids.tolist(), lengths)]
        missing = sorted({key for key in keys if key not in self.entries}, key=keys.index)
        if missing:
            self._compute(missing, input_ids.device)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        first = self.entries[keys[0]]
        out = first.new_zeros(input_ids.shape[0], input_ids.shape[1], first.shape[-1])
        for row, key in enumerate(keys):
            out[row, : len(key)] = self.entries[key]
        return BaseModelOutput(last_hidden_state=out)

    def _compute(self, texts: list[tuple[int, ...]], device) -> None:
        """Run `texts` (token-id tuples) through the tower as one padded sub-batch, keep their states, record it."""
        width = max(len(key) for key in texts)
        ids = torch.zeros(len(texts), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(texts), width, dtype=torch.long, device=device)
        for row, key in enumerate(texts):
            ids[row, : len(key)] = torch.tensor(key, dtype=torch.long)
            mask[row, : len(key)] = 1
        states = self.tower(input_ids=ids, attention_mask=mask).last_hidden_state
        for row, key in enumerate(texts):
            self.entries[key] = states[row, : len(key)]
        self.groups.append(list(texts))
        while len(self.entries) > self.max_entries:
            self.entries.pop(next(iter(self.entries)))

    def save_history(self, path: str | Path) -> None:
        """Write the history (the token ids of every sub-batch computed so far, in order) as safetensors."""
        texts = [key for group in self.groups for key in group]
        save_file(
            {
                "token_ids": torch.tensor([token for key in texts for token in key], dtype=torch.long),
                "lengths": torch.tensor([len(key) for key in texts], dtype=torch.long),
                "group_sizes": torch.tensor([len(group) for group in self.groups], dtype=torch.long),
            },
            str(path),
        )

    @torch.no_grad()
    def load_history(self, path: str | Path) -> int:
        """Empty the cache and recompute the sub-batches a `save_history` file lists, in its order: the entries are then
        those of the run that wrote it, bit for bit. Returns the number of texts computed; `ValueError` (naming the
        file) when the file is not such a history."""
        try:
            arrays = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
        token_ids, lengths, group_sizes = (arrays.get(name) for name in ("token_ids", "lengths", "group_sizes"))
        vocab_size = self.get_input_embeddings().num_embeddings
        if (
            any(
                array is None or array.dim() != 1 or array.dtype != torch.long
                for array in (token_ids, lengths, group_sizes)
            )
            or int(lengths.sum()) != token_ids.numel()
            or int(group_sizes.sum()) != lengths.numel()
            or bool((lengths < 1).any())
            or bool((group_sizes < 1).any())
            or (token_ids.numel() and not 0 <= int(token_ids.min()) <= int(token_ids.max()) < vocab_size)
        ):
            raise ValueError(
                f"{path} is not a frozen-text-cache history (token_ids / lengths / group_sizes that add up, "
                f"ids below the vocabulary size {vocab_size})"
            )
        texts = [tuple(chunk.tolist()) for chunk in token_ids.split(lengths.tolist())]
        self.entries.clear()
        self.groups.clear()
        device = self.get_input_embeddings().weight.device
        start = 0
        for size in group_sizes.tolist():
            self._compute(texts[start : start + size], device)
            start += size
        return len(texts)


__all__ = ["CachedFrozenTextModel"]
