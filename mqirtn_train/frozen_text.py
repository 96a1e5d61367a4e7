"""A frozen text tower's token states computed once per distinct text and reused (`--frozen_text_cache`)."""

from __future__ import annotations

import copy

import torch
from transformers.modeling_outputs import BaseModelOutput


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
        # A copy of the model (composition_diagnostics) shares the entries: its frozen tower gives the same states.
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.tower = copy.deepcopy(self.tower, memo)
        clone.uncached_forward = copy.deepcopy(self.uncached_forward, memo)
        clone.entries, clone.max_entries, clone.hits, clone.misses = self.entries, self.max_entries, 0, 0
        return clone

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
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


__all__ = ["FrozenTowerCache"]
