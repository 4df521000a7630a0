"""The Llama-style decoder used by training and serving alike, and by every imported
Hugging Face family (Llama, Mistral, Qwen2, Qwen3): what a family adds is configuration
(gpt/config.py), switched on here per layer.

The serving engine drives a paged KV cache through `AttentionHook` instead of a second
model definition: each layer hands the hook its rotated queries, keys and values and
the hook decides where keys and values are stored and which of them each query sees.
Without a hook the layer runs plain causal attention (training, evaluation, tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gpt import fused_ops
from gpt.config import ModelConfig, RopeScaling
from gpt.linear import Linear, fused_projection
from gpt.rope import inverse_frequencies

if TYPE_CHECKING:
    from gpt.lora_batch import LoraBatch


class AttentionHook(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, H, T, D); k, v: (B, KVH, T, D), RoPE applied. Returns (B, H, T, D).
        D is the config's head_dim, which need not be d_model / H (Qwen3)."""


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops.applies(x) and self.weight.dtype == x.dtype:
            return fused_ops.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 as Llama does, so bf16 activations keep their scale.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the half-split layout that Hugging Face Llama uses.

    cos and sin of every position up to `max_positions` are computed once, in float32,
    and looked up: computed per call they were ~0.1 ms of a 64-sequence decode step
    (`small`, bf16, 2 cores), as long as a layer's attention. The tables are buffers, so
    they follow the model's device and dtype (a bf16 model rounds the float32 values
    once)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_positions, self.scaling = head_dim, theta, max_positions, scaling
        cos, sin = self._tables()
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling)
        freqs = torch.arange(self.max_positions, dtype=torch.int64).float()[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def rebuild(self) -> None:
        """Recompute the tables in place (in float32, then rounded to the buffers' dtype):
        for a model whose storage was allocated empty rather than initialised."""
        cos, sin = self._tables()
        self.cos_table.copy_(cos)
        self.sin_table.copy_(sin)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, 1, T, head_dim) for positions (B, T), each < max_positions."""
        return self.cos_table[positions].to(dtype)[:, None], self.sin_table[positions].to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _add_lora(lora: LoraBatch, layer: int, x: torch.Tensor, out: torch.Tensor,
              targets: tuple[tuple[str, int, int], ...]) -> None:
    """Add each (target, start, end)'s LoRA delta of input x (..., in) into columns
    start:end of the projection output `out` (..., out), in place: the packed rows of a
    step flattened to 2-D, each token with its own adapter (gpt/lora_batch.py)."""
    x2d, out2d = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
    for target, start, end in targets:
        lora.apply(layer, target, x2d, out2d[:, start:end])


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = Linear(config.d_model, config.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = Linear(config.n_heads * self.head_dim, config.d_model, bias=config.o_bias)
        # Qwen3: each query and key head RMS-normalised (one weight over head_dim, shared by
        # the heads) before rotary.
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                hook: AttentionHook | None, lora: LoraBatch | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = fused_projection((self.q_proj, self.k_proj, self.v_proj), x)
        if qkv is not None and lora is not None:
            # Before the q/k norms and rotary, which the fused paths apply to this buffer.
            q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            _add_lora(lora, self.layer, x, qkv, (("q", 0, q_dim), ("k", q_dim, q_dim + kv_dim),
                                                 ("v", q_dim + kv_dim, q_dim + 2 * kv_dim)))
        if qkv is not None and self.q_norm is not None:
            q, k, v = self._normed_fused(qkv, cos, sin)
        elif qkv is not None:
            # One call for the three projections; queries and keys rotated together.
            heads = self.n_heads + self.n_kv_heads
            if fused_ops.applies(qkv):
                # In place in the projection's output, by one kernel.
                fused_ops.rope_(qkv.view(b * t, -1), cos.reshape(b * t, -1), sin.reshape(b * t, -1), heads,
                                self.head_dim)
                qk = qkv[..., :heads * self.head_dim].view(b, t, heads, self.head_dim).transpose(1, 2)
            else:
                qk = apply_rope(qkv[..., :heads * self.head_dim].view(b, t, heads, self.head_dim).transpose(1, 2),
                                cos, sin)
            q, k = qk[:, :self.n_heads], qk[:, self.n_heads:]
            v = qkv[..., heads * self.head_dim:].view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            if lora is not None:
                for target, y in (("q", q), ("k", k), ("v", v)):
                    _add_lora(lora, self.layer, x, y, ((target, 0, y.shape[-1]),))
            q = q.view(b, t, self.n_heads, self.head_dim)
            k = k.view(b, t, self.n_kv_heads, self.head_dim)
            v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        out = causal_attention(q, k, v) if hook is None else hook(self.layer, q, k, v)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        y = self.o_proj(out)
        if lora is not None:
            _add_lora(lora, self.layer, out, y, (("o", 0, y.shape[-1]),))
        return y

    def _normed_fused(self, qkv: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys of the packed projection normalised per head, then rotated: the
        norm must come first, so rotary cannot run in place in the projection's output as
        it does without the norms. Each step is one fused kernel where they apply."""
        b, t, _ = qkv.shape
        hq, hk = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q = self.q_norm(qkv[..., :hq].view(b, t, self.n_heads, self.head_dim))
        k = self.k_norm(qkv[..., hq:hq + hk].view(b, t, self.n_kv_heads, self.head_dim))
        v = qkv[..., hq + hk:].view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if fused_ops.applies(q) and q.is_contiguous() and k.is_contiguous():
            cos2, sin2 = cos.reshape(b * t, -1), sin.reshape(b * t, -1)
            fused_ops.rope_(q.view(b * t, -1), cos2, sin2, self.n_heads, self.head_dim)
            fused_ops.rope_(k.view(b * t, -1), cos2, sin2, self.n_kv_heads, self.head_dim)
            return q.transpose(1, 2), k.transpose(1, 2), v
        return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.gate_proj = Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        gate_up = fused_projection((self.gate_proj, self.up_proj), x)
        if lora is not None:
            return self._forward_lora(x, gate_up, lora)
        if gate_up is not None and fused_ops.applies(gate_up):
            return self.down_proj(fused_ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1) if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)

    def _forward_lora(self, x: torch.Tensor, gate_up: torch.Tensor | None, lora: LoraBatch) -> torch.Tensor:
        """forward with each token's adapter deltas on gate and up (before the SiLU) and down."""
        if gate_up is None:
            gate_up = torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)
        d_ff = gate_up.shape[-1] // 2
        _add_lora(lora, self.layer, x, gate_up, (("gate", 0, d_ff), ("up", d_ff, 2 * d_ff)))
        if fused_ops.applies(gate_up):
            h = fused_ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = F.silu(gate) * up
        y = self.down_proj(h)
        _add_lora(lora, self.layer, h, y, (("down", 0, y.shape[-1]),))
        return y


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config, layer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                hook: AttentionHook | None, lora: LoraBatch | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, hook, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class GPT(nn.Module):
    """Parameter names follow Hugging Face Llama (minus the `model.` prefix), so export
    and import are a rename."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_seq_len, config.rope_scaling)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Share the embedding with the LM head where the config ties them (again after
        tensors were assigned into the module)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      hook: AttentionHook | None = None, lora: LoraBatch | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d_model): the trunk shared by the LM head and
        the reward/value heads. `lora`: per-token adapter deltas over the B*T tokens in
        row-major order (None = the base model alone)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, hook, lora)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                hook: AttentionHook | None = None, lora: LoraBatch | None = None) -> torch.Tensor:
        """Logits (B, T, vocab). `positions` (B, T) default to 0..T-1 per row."""
        return self.lm_head(self.hidden_states(input_ids, positions, hook, lora))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
