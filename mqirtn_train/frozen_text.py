"""`CachedFrozenTextModel`: a frozen text tower whose token states are computed once per distinct text and reused.

`--frozen_text_cache` (on with `--freeze_text`) puts it in place of the model's text tower:

    model.text_model = CachedFrozenTextModel(model.text_model)

The tower is the wrapper's `tower`; the wrapper's state dict holds the tower's own keys (no `tower.` prefix), so the
checkpoints and saved models of a run with the cache are those of the same run without it, and load either way.
"""

from __future__ import annotations

import copy

import torch
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
        self.hits = self.misses = 0
        self.register_state_dict_post_hook(_state_dict_without_tower_prefix)
        self.register_load_state_dict_pre_hook(_state_dict_with_tower_prefix)

    @property
    def config(self):
        return self.tower.config

    def get_input_embeddings(self) -> nn.Module:
        return self.tower.get_input_embeddings()

    def __deepcopy__(self, memo):
        # A copy of the model (the composition diagnostics) shares the entries: its frozen tower gives the same states.
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        for name, value in vars(self).items():
            clone.__dict__[name] = value if name == "entries" else copy.deepcopy(value, memo)
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
            width = max(len(key) for key in missing)
            ids = input_ids.new_zeros(len(missing), width)
            mask = attention_mask.new_zeros(len(missing), width)
            for row, key in enumerate(missing):
                ids[row, : len(key)] = torch.tensor(key, dtype=ids.dtype)
                mask[row, : len(key)] = 1
            states = self.tower(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
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


__all__ = ["CachedFrozenTextModel"]
