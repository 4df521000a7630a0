"""The correctness anchor: sol's model is Llama, so `transformers` gives the same logits
on the same weights, and its tokenizer and chat template give the same ids."""

import json

import pytest
import torch
import transformers

from gpt.chat import render_chat
from gpt.hf import export_hf, import_hf
from gpt.tokenizer import SPECIAL_TOKENS
from tests.conftest import make_tiny_model

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Add 12 and 30."},
            {"role": "assistant", "content": "42"}, {"role": "user", "content": "Reverse 'abc'."}]


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def exported(request, tmp_path, tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=3, tie_embeddings=request.param)
    return model, export_hf(model, tiny_tokenizer, tmp_path / "hf")


def test_logits_equal_llama_for_causal_lm(exported):
    model, path = exported
    assert model.config.n_kv_heads < model.config.n_heads  # grouped-query attention is exercised
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, model.config.vocab_size, (3, 41))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_tokenizer_ids_equal(exported, tiny_tokenizer, corpus):
    _, path = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = [t[:2000] for t in corpus.heldout if not any(s in t for s in SPECIAL_TOKENS)][:20]
    for text in texts:
        assert hf_tok.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)
        assert hf_tok.decode(tiny_tokenizer.encode(text)) == text


def test_chat_template_ids_equal(exported, tiny_tokenizer):
    _, path = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    for add in (True, False):
        ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=add, tokenize=True, return_dict=True)
        assert list(ids["input_ids"]) == render_chat(tiny_tokenizer, MESSAGES, add_generation_prompt=add).ids


def test_import_of_export_gives_identical_tensors(exported, tiny_tokenizer):
    model, path = exported
    again, tok = import_hf(path)
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tok.json == tiny_tokenizer.json


def test_import_refuses_unsupported_llama_variants(exported):
    _, path = exported
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"rope_scaling\.rope_type = 'yarn'"):
        import_hf(path)


def test_import_refuses_pickled_weights(exported):
    _, path = exported
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickled weights"):
        import_hf(path)
