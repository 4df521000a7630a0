"""Many LoRA adapters in one forward pass: the rows of a step may each use a different
adapter, or none.

`LoraStack` holds the weights of up to `slots` adapters, stacked per (layer, target) with
their ranks padded to the stack's rank by zeros (a zero row of A and column of B add
nothing, so a rank-4 adapter in a rank-16 stack computes exactly its own delta).
`LoraBatch` is one step's use of it: the packed tokens grouped by slot once per step (a
sort, no Python loop over rows), then for every adapted projection the deltas of all
groups in two batched matmuls over the groups padded to the longest (the gather-then-bmm
form of Punica's and S-LoRA's kernels), added into the projection's output in place.
The same code runs on the CPU and on CUDA, and under autograd (training one adapter is a
batch with one group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt.config import ModelConfig
from gpt.lora import TARGETS, LoraAdapter, target_shape


class LoraStack:
    def __init__(self, config: ModelConfig, slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", targets: tuple[str, ...] = tuple(TARGETS)) -> None:
        self.config = config
        self.slots = slots
        self.max_rank = max_rank
        self.targets = targets
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        for layer in range(config.n_layers):
            for target in targets:
                out, inp = target_shape(config, target)
                self.a[(layer, target)] = torch.zeros(slots, max_rank, inp, dtype=dtype, device=device)
                self.b[(layer, target)] = torch.zeros(slots, out, max_rank, dtype=dtype, device=device)
        self.scale = torch.zeros(slots, dtype=dtype, device=device)

    @classmethod
    def one(cls, config: ModelConfig, adapter: LoraAdapter) -> LoraStack:
        """A one-slot stack over `adapter`'s own tensors (views, not copies): training one
        adapter, the deltas' gradients flow back into its A and B."""
        stack = cls.__new__(cls)
        stack.config, stack.slots, stack.max_rank = config, 1, adapter.spec.rank
        stack.targets = adapter.spec.targets
        stack.a = {key: a.unsqueeze(0) for key, (a, _) in adapter.weights.items()}
        stack.b = {key: b.unsqueeze(0) for key, (_, b) in adapter.weights.items()}
        some = next(iter(adapter.weights.values()))[0]
        stack.scale = torch.full((1,), adapter.spec.scale, dtype=some.dtype, device=some.device)
        return stack

    @property
    def nbytes_per_slot(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    @torch.no_grad()
    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Put `adapter` in `slot` (whatever was there is overwritten)."""
        rank = adapter.spec.rank
        if rank > self.max_rank:
            raise ValueError(f"adapter rank {rank} is above the stack's {self.max_rank}")
        missing = [t for t in adapter.spec.targets if t not in self.targets]
        if missing:
            raise ValueError(f"the stack holds no {', '.join(missing)} projections")
        for key, a in self.a.items():
            a[slot].zero_()
            self.b[key][slot].zero_()
            weights = adapter.weights.get(key)
            if weights is not None:
                a[slot, :rank].copy_(weights[0])
                self.b[key][slot, :, :rank].copy_(weights[1])
        self.scale[slot] = adapter.spec.scale

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        for key, a in self.a.items():
            a[slot].zero_()
            self.b[key][slot].zero_()
        self.scale[slot] = 0


@dataclass
class LoraBatch:
    """One step's adapter use over `num_tokens` packed tokens: G groups of tokens, each on
    one slot.

    Per adapted projection the work is a few large ops, never one per row or per group:
    on the CPU each op costs microseconds of dispatch whatever its size, and a step runs
    7 projections per layer. So the common shapes get their own short paths: one adapter
    over every token (a matmul and an addmm into the output, no gather), and one adapter
    over some of the tokens (one index_select and one index_add)."""

    stack: LoraStack
    num_tokens: int
    slots: torch.Tensor          # (G,) the slot of each group
    gather: torch.Tensor         # (G, L) token index per group position; padding repeats index 0
    targets: torch.Tensor        # (N,) token indices of the real (unpadded) positions, group-major
    picked: torch.Tensor         # (N,) where those positions sit in the flattened (G * L)
    scale: torch.Tensor          # (G, 1, 1)
    single_slot: int | None      # the slot when there is one group, else None
    covers_all: bool             # one group over every token, in order
    dropout: float = 0.0         # training only: LoRA dropout on the adapter's input (PEFT's lora_dropout)

    @classmethod
    def build(cls, stack: LoraStack, token_slots: torch.Tensor, dropout: float = 0.0) -> LoraBatch | None:
        """`token_slots` (T,): each packed token's slot, -1 for the base model alone. None
        when no token uses an adapter (the step then pays nothing)."""
        token_slots = token_slots.to(device=stack.scale.device, dtype=torch.int64)
        used = torch.nonzero(token_slots >= 0).flatten()
        if used.numel() == 0:
            return None
        slot_of = token_slots[used]
        order = torch.argsort(slot_of, stable=True)
        used, slot_of = used[order], slot_of[order]
        slots, counts = torch.unique_consecutive(slot_of, return_counts=True)
        groups, longest = len(slots), int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        group_of = torch.repeat_interleave(torch.arange(groups, device=used.device), counts)
        position = torch.arange(len(used), device=used.device) - starts[group_of]
        num_tokens = len(token_slots)
        # Padded positions gather token 0: their deltas are computed and never added
        # (only `picked` positions are), which is cheaper than appending a zero row to x.
        gather = torch.zeros((groups, longest), dtype=torch.int64, device=used.device)
        gather[group_of, position] = used
        picked = group_of * longest + position
        single = int(slots[0]) if groups == 1 else None
        return cls(stack, num_tokens, slots, gather, used, picked,
                   stack.scale.index_select(0, slots)[:, None, None], single,
                   single is not None and len(used) == num_tokens, dropout)

    def apply(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y (T, out) += each token's scale * B (A x) for its slot; x (T, in). A target the
        stack does not hold adds nothing."""
        key = (layer, target)
        a = self.stack.a.get(key)
        if a is None:
            return
        b = self.stack.b[key]
        if self.dropout > 0:
            x = torch.nn.functional.dropout(x, self.dropout)
        if self.single_slot is not None:
            a1, b1, scale = a[self.single_slot], b[self.single_slot], self.scale[0, 0]
            if self.covers_all:
                y.addmm_(((x @ a1.t()) * scale).to(y.dtype), b1.t().to(y.dtype))
                return
            h = (x.index_select(0, self.targets) @ a1.t()) * scale                        # (N, r)
            y.index_add_(0, self.targets, (h @ b1.t()).to(y.dtype))
            return
        h = torch.bmm(x[self.gather], a.index_select(0, self.slots).transpose(1, 2)) * self.scale   # (G, L, r)
        delta = torch.bmm(h, b.index_select(0, self.slots).transpose(1, 2))                          # (G, L, out)
        y.index_add_(0, self.targets, delta.flatten(0, 1).index_select(0, self.picked).to(y.dtype))
