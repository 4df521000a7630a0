"""The model runner: turns one scheduled step into a single forward pass.

The step's sequences (prefill chunks and decodes alike) are packed into one row of
input ids with their true positions; the paged cache's hook does the per-sequence
attention. Only the rows that will sample a token go through the LM head, so a long
prefill chunk does not pay for vocabulary-sized logits it would throw away.
"""

from __future__ import annotations

import torch

from gpt.lora_batch import LoraBatch, LoraStack
from gpt.model import GPT
from server.engine.decode_plan import DecodePlanner
from server.engine.kv_cache import AttentionPlan, PagedKVCache, RowSpec, plan_attention
from server.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: GPT, cache: PagedKVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = cache.device
        # Decode steps of the in-place kernel keep their plan from step to step.
        self.decode_planner = DecodePlanner(cache.block_size) if cache.in_place else None
        # The engine's LoRA adapters (set on its first adapter request; None until then).
        self.lora_stack: LoraStack | None = None

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]], decode_only: bool = False) -> tuple[torch.Tensor, list[int]]:
        """Compute `n` new tokens for each (sequence, n). Returns float32 logits (S, V) for
        the S sequences whose computed tokens reach their end (they sample next), and
        their indices in `batch`. `decode_only`: the scheduler's word that every n is 1
        and every sequence has cached context (the kept decode plan then serves)."""
        if self.decode_planner is not None and decode_only:
            return self._decode([seq for seq, _ in batch])
        ids: list[int] = []
        rows: list[RowSpec] = []
        last: list[int] = []
        sampling: list[int] = []
        for i, (seq, n) in enumerate(batch):
            start = seq.num_computed
            ids.extend(seq.token_ids[start:start + n])
            rows.append(RowSpec(start=start, q_len=n, block_table=seq.block_table))
            if start + n == seq.num_tokens:
                sampling.append(i)
                last.append(len(ids) - 1)
        plan = plan_attention(rows, self.cache.block_size, self.device, self.cache.dtype, self.cache.in_place)
        return self._forward(ids, plan, last, sampling, self._lora([seq for seq, _ in batch], [n for _, n in batch]))

    def _decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]]:
        """One token for each sequence, each with cached context: the kept decode plan."""
        assert self.decode_planner is not None
        ids = [seq.token_ids[seq.num_computed] for seq in seqs]
        # A row whose token is not its last (a prompt's chunk cut to one token) does not sample.
        sampling = [i for i, seq in enumerate(seqs) if seq.num_computed + 1 == len(seq.token_ids)]
        return self._forward(ids, self.decode_planner.plan(seqs), sampling, sampling, self._lora(seqs, None))

    def _lora(self, seqs: list[Sequence], counts: list[int] | None) -> LoraBatch | None:
        """The step's adapter use: each packed token's slot (-1 = the base model), grouped
        once for every layer; None, at the cost of one pass over the rows, when no row is
        on an adapter. `counts`: tokens per row (None = one each)."""
        if self.lora_stack is None or all(seq.lora_slot is None for seq in seqs):
            return None
        slots = [-1 if seq.lora_slot is None else seq.lora_slot for seq in seqs]
        token_slots = torch.tensor(slots, dtype=torch.int64)
        if counts is not None:
            token_slots = torch.repeat_interleave(token_slots, torch.tensor(counts, dtype=torch.int64))
        return LoraBatch.build(self.lora_stack, token_slots)

    def _forward(self, ids: list[int], plan: AttentionPlan, last: list[int], sampling: list[int],
                 lora: LoraBatch | None = None) -> tuple[torch.Tensor, list[int]]:
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)[None]
        hidden = self.model.hidden_states(input_ids, plan.positions[None], self.cache.hook(plan), lora)
        if not last:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32), []
        # Every packed token samples (a decode batch): the LM head takes them all, unindexed.
        picked = hidden[0] if len(last) == len(ids) else hidden[0, torch.tensor(last, dtype=torch.int64,
                                                                                 device=self.device)]
        return self.model.lm_head(picked).float(), sampling
