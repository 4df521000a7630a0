"""Which LoRA adapters sit in the engine's stack, and for whom.

The engine's `LoraStack` (gpt/lora_batch.py) has `max_loras` slots: the adapters one step
may use. A running sequence pins its adapter's slot; a slot whose pins drop to zero stays
loaded (a later request for the same adapter and version finds it there) until another
adapter needs the room, least recently used first. A request whose adapter is not in a
slot while every slot is pinned waits in the queue: it never fails for want of a slot.

Adapters are told apart by (name, version): publishing a new version of an adapter makes
a new key, so a request for the new version never runs on the old weights, and the
prefix cache salts its block hashes with the same key (`cache_salt`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from gpt.lora import LoraAdapter
from gpt.lora_batch import LoraStack


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as a request names it: registry name and version, with its weights."""

    name: str
    version: int
    weights: LoraAdapter

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    @property
    def cache_salt(self) -> int:
        # The root of this adapter's prefix-cache chain: blocks computed under one adapter
        # version never match a prompt under another (or under the base model, root None).
        return hash(("lora", self.name, self.version))


class AdapterSlots:
    def __init__(self, stack: LoraStack) -> None:
        self.stack = stack
        self._slot_of: dict[tuple[str, int], int] = {}
        self._pins = [0] * stack.slots
        self._idle: OrderedDict[int, None] = OrderedDict()        # loaded, unpinned; LRU first
        self._free = list(range(stack.slots - 1, -1, -1))
        self.loads = 0                                             # adapters copied into a slot

    def slot(self, ref: AdapterRef) -> int | None:
        """The slot `ref` is in, loading it there if needed (evicting the least recently
        used unpinned adapter), and pinned once more; None when every slot is pinned."""
        slot = self._slot_of.get(ref.key)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            elif self._idle:
                slot, _ = self._idle.popitem(last=False)
                evicted = next(k for k, s in self._slot_of.items() if s == slot)
                del self._slot_of[evicted]
            else:
                return None
            self.stack.load(slot, ref.weights)
            self._slot_of[ref.key] = slot
            self.loads += 1
        self._idle.pop(slot, None)
        self._pins[slot] += 1
        return slot

    def can_take(self, ref: AdapterRef) -> bool:
        """Whether `slot(ref)` would succeed now."""
        return ref.key in self._slot_of or bool(self._free) or bool(self._idle)

    def release(self, slot: int) -> None:
        """One pin of `slot` given back (a sequence finished, was aborted or preempted)."""
        assert self._pins[slot] > 0, f"slot {slot} is not pinned"
        self._pins[slot] -= 1
        if self._pins[slot] == 0:
            self._idle[slot] = None

    def running(self) -> list[str]:
        """Names of the adapters pinned by running sequences (for metrics)."""
        # A copy first: the stepping thread may load an adapter while a scrape reads this.
        return sorted({name for (name, _), slot in list(self._slot_of.items()) if self._pins[slot]})

    def loaded(self) -> list[tuple[str, int]]:
        return sorted(self._slot_of)
