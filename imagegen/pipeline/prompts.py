"""Prompt → token states, through an LRU cache keyed by (model, text).

Product tools send the same prompts and, above all, the same empty negative prompt again and
again; the cache saves a text-encoder pass for each of those.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from imagegen.pipeline.components import TextEncoder


class PromptCache:
    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, model: str, encoder: TextEncoder, texts: list[str]) -> list[torch.Tensor]:
        """Token states (L, D) for each text; only the misses go through the encoder, in one batch."""
        found: dict[str, torch.Tensor] = {}
        with self._lock:
            for text in texts:
                entry = self._entries.get((model, text))
                if entry is not None:
                    self._entries.move_to_end((model, text))
                    found[text] = entry
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            states = encoder.encode(missing)
            with self._lock:
                for text, state in zip(missing, states, strict=True):
                    found[text] = state
                    self._entries[(model, text)] = state
                    while len(self._entries) > self.max_entries:
                        self._entries.popitem(last=False)
        with self._lock:
            self.hits += len(texts) - len(missing)
            self.misses += len(missing)
        return [found[t] for t in texts]
