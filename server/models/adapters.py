"""Adapters served over loaded base models: a request's `model` that names a LoRA adapter
entry (NAME, NAME:ALIAS or NAME@VERSION) runs on its base's engine with the adapter.

References resolve through the registry at request time, so publishing a new version
(or moving an alias) is picked up without reloading anything; loaded weights are cached
by (name, version), at most `max_loaded` of them in memory, least recently used out.
A corrupt adapter, or one made for other weights, is refused for its own requests only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from gpt.adapter_store import adapter_base, is_adapter, load_published_adapter
from gpt.config import ModelConfig
from gpt.registry import Registry, RegistryError
from server.engine.adapter_slots import AdapterRef


class AdapterNotServed(LookupError):
    """The reference names no adapter (the caller then reports the model as not found)."""


class AdapterCache:
    def __init__(self, registry: Registry, max_loaded: int = 8) -> None:
        self.registry = registry
        self.max_loaded = max(1, max_loaded)
        self._lock = threading.Lock()
        self._loaded: OrderedDict[tuple[str, int], tuple[AdapterRef, str]] = OrderedDict()

    def lookup(self, ref: str, base_config: Callable[[str], ModelConfig],
               max_rank: int | None = None) -> tuple[AdapterRef, str]:
        """(the adapter `ref` names, its base's NAME@VERSION). `base_config(base_ref)` gives
        the loaded base's config (raising when the base is not served). AdapterNotServed
        when `ref` is no adapter in the registry; AdapterError when it cannot be served."""
        try:
            resolved = self.registry.resolve(ref)
        except RegistryError:
            raise AdapterNotServed(ref) from None
        if not is_adapter(resolved.path):
            raise AdapterNotServed(ref)
        key = (resolved.name, resolved.version)
        with self._lock:
            hit = self._loaded.get(key)
            if hit is not None:
                self._loaded.move_to_end(key)
                return hit
        base_ref = adapter_base(resolved.path)
        config = base_config(base_ref)
        weights, base = load_published_adapter(resolved.path, self.registry, config, max_rank)
        entry = (AdapterRef(resolved.name, resolved.version, weights), base.ref)
        with self._lock:
            self._loaded[key] = entry
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
        return entry

    def loaded(self) -> list[tuple[AdapterRef, str]]:
        """The adapters in memory with their bases (for listings), by name."""
        with self._lock:
            return sorted(self._loaded.values(), key=lambda e: e[0].key)
