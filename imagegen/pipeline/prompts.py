"""Prompt → conditioning bundle, through an LRU cache keyed by (model, text).

Product tools send the same prompts and, above all, the same empty negative prompt again and again; the cache
saves the text encoders' passes (all of a family's encoders: the whole bundle is cached) for each of those.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from imagegen.pipeline.families import Conditioning, ModelFamily

Key = tuple[str, str | None]  # (model, text); None: an absent negative prompt


class PromptCache:
    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Key, Conditioning] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, model: str, family: ModelFamily, texts: list[str | None]) -> list[Conditioning]:
        """One-row conditioning for each text; only the misses go through the encoders, in one batch."""
        found: dict[str | None, Conditioning] = {}
        with self._lock:
            for text in texts:
                entry = self._entries.get((model, text))
                if entry is not None:
                    self._entries.move_to_end((model, text))
                    found[text] = entry
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            bundles = family.encode(missing).split()
            with self._lock:
                for text, bundle in zip(missing, bundles, strict=True):
                    found[text] = bundle
                    self._entries[(model, text)] = bundle
                    while len(self._entries) > self.max_entries:
                        self._entries.popitem(last=False)
        with self._lock:
            self.hits += len(texts) - len(missing)
            self.misses += len(missing)
        return [found[t] for t in texts]
