"""`sol bench vs-vllm --model smollm2` without vLLM, at tiny dimensions: the checkpoint
transformers saves (bench/hf_checkpoint.py) is imported into sol with the shape asked
for, and sol's offline worker (the process the bench measures) generates on it exactly
the greedy tokens transformers' own `generate` gives on the same directory, and so does
CTranslate2's worker where its venv is made."""

from __future__ import annotations

import argparse

import pytest
import torch

from bench.hf_checkpoint import LlamaShape, weight_bytes
from bench.vs_vllm import (
    DEFAULT_CT2_VENV,
    Request,
    ct2_offline_worker,
    ct2_python,
    prepare_imported,
    sol_offline_worker,
)

transformers = pytest.importorskip("transformers")

TINY = LlamaShape(num_hidden_layers=2, hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                  intermediate_size=96, vocab_size=700, max_position_embeddings=128, rope_theta=100000.0)


def test_imported_model_runs_in_the_bench_as_transformers_does(tmp_path, corpus):
    m, tokenizer = prepare_imported("tinyllama", tmp_path, corpus.train[:200], seed=0, shape=TINY)
    config = transformers.AutoConfig.from_pretrained(m.hf_dir)
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads, config.vocab_size,
            config.tie_word_embeddings) == (2, 48, 1, 700, True)
    assert m.context == 128 and tokenizer.vocab_size <= 700
    # Tied: the embedding is counted once, in the file and in sol's model.
    assert weight_bytes(m.hf_dir) == 4 * m.parameters

    hf = transformers.AutoModelForCausalLM.from_pretrained(m.hf_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    prompts = [tokenizer.encode("The quick brown fox jumps over"), tokenizer.encode("Once upon a time, in a")]
    expected = [hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                            pad_token_id=0)[0, len(ids):].tolist() for ids in prompts]
    assert len({tuple(e) for e in expected}) == 2, "random weights too flat: greedy ignores the prompt"

    args = argparse.Namespace(threads=1, max_num_seqs=8, max_num_batched_tokens=256, vllm_timeout_s=300,
                              ct2_venv=str(DEFAULT_CT2_VENV))
    warmup = [Request(prompts[0], 2)]
    with sol_offline_worker(args, m, "fp32", warmup) as worker:
        got = worker.run([Request(ids, 8) for ids in prompts])
        assert worker.peak_rss_mib() > 0
    assert [r["token_ids"] for r in got["requests"]] == expected
    assert worker.facts["load_s"] > 0 and worker.facts["peak_rss_mib"] > 0

    # CTranslate2, the second anchor, where its venv is made (scripts/setup-ct2.sh).
    if ct2_python(args) is None:
        pytest.skip(f"no CTranslate2 venv at {DEFAULT_CT2_VENV}")
    with ct2_offline_worker(args, m, "fp32", warmup, tmp_path) as ct2:
        got = ct2.run([Request(ids, 8) for ids in prompts])
        assert ct2.peak_rss_mib() > 0
    assert [r["token_ids"] for r in got["requests"]] == expected
