"""The sampler's inputs for one batch of sequences, kept while the batch stays the same.

A decode batch is usually the last step's batch again. What its rows sample with does
not change from step to step (parameters, seeds, which rows carry a logit bias, a
min_tokens ban or a grammar, whether anyone wants log-probs), so it is gathered once per
batch instead of by a pass over the rows for each of them every step: those passes were
~0.15 ms of a 64-sequence decode step (`small`, bf16, 2 cores), run right after the
forward with cold caches. Per step only what moves is read: each row's output length
(for sampled rows and min_tokens), the histories where a penalty needs them, and the
grammar masks.
"""

from __future__ import annotations

import operator

import torch

from server.engine.grammar import token_bitmask
from server.engine.sampler import SampleOutput, SamplingTensors, sample
from server.engine.sequence import Sequence


class SamplingBatch:
    def __init__(self, seqs: list[Sequence], vocab_size: int, device: torch.device) -> None:
        self.seqs = list(seqs)
        self.vocab_size = vocab_size
        params = [s.params for s in seqs]
        self.tensors = SamplingTensors.from_params(params, device)
        self.seeds = [s.seed for s in seqs]
        self.num_logprobs = max(p.logprobs for p in params)
        # Rows with an additive mask: a logit bias, or stop tokens banned until min_tokens.
        self.bias_rows = [row for row, s in enumerate(seqs)
                          if s.params.logit_bias or (s.params.min_tokens and s.request.stop_ids)]
        self.constrained = [row for row, s in enumerate(seqs) if s.grammar is not None]

    @property
    def want_logprobs(self) -> bool:
        return self.num_logprobs > 0

    def matches(self, seqs: list[Sequence]) -> bool:
        """The same sequences in the same order (a sequence's parameters, seed and grammar
        are fixed for its life)."""
        return len(seqs) == len(self.seqs) and all(map(operator.is_, seqs, self.seqs))

    def sample(self, logits: torch.Tensor) -> SampleOutput:
        """One token per row of `logits`, row i for self.seqs[i] as it stands now."""
        seqs, t = self.seqs, self.tensors
        needs_history = t.any_output_penalty or t.any_repetition
        return sample(
            logits, t,
            seeds=self.seeds,
            steps=[s.num_output_tokens for s in seqs] if t.any_sampled else None,
            output_ids=[s.output_ids for s in seqs] if needs_history else None,
            prompt_ids=[s.token_ids[:s.num_prompt_tokens] for s in seqs] if t.any_repetition else None,
            bias=self._bias() if self.bias_rows else None,
            allowed=(torch.tensor(self.constrained, dtype=torch.int64),
                     token_bitmask([seqs[row].grammar for row in self.constrained], self.vocab_size))
            if self.constrained else None,
            num_logprobs=self.num_logprobs,
            chosen_logprobs=self.want_logprobs,
        )

    def _bias(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """One sparse additive mask: stop tokens banned (-inf) before min_tokens, and each
        row's logit_bias."""
        rows: list[int] = []
        ids: list[int] = []
        values: list[float] = []
        for row in self.bias_rows:
            s = self.seqs[row]
            if s.num_output_tokens < s.params.min_tokens and s.request.stop_ids:
                rows.extend([row] * len(s.request.stop_ids))
                ids.extend(s.request.stop_ids)
                values.extend([float("-inf")] * len(s.request.stop_ids))
            if s.params.logit_bias:
                rows.extend([row] * len(s.params.logit_bias))
                ids.extend(s.params.logit_bias)
                values.extend(s.params.logit_bias.values())
        if not rows:
            return None
        return (torch.tensor(rows, dtype=torch.int64), torch.tensor(ids, dtype=torch.int64),
                torch.tensor(values, dtype=torch.float32))
