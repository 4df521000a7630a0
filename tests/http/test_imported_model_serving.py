"""A model users bring, end to end: a Qwen2-style and a Llama-2-style checkpoint saved by
transformers (random weights, their own tokenizer and chat template), imported with
`sol import-hf`, served, and asked through the `openai` SDK. Greedy text and usage token
counts equal transformers' own, and streamed text equals unary text."""

from __future__ import annotations

import shutil

import pytest
import torch

from client.cli import main
from tests.conftest import free_port
from tests.service.harness import ADMIN_KEY, RunningServer

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

NEW_TOKENS = 10


def _checkpoint(root, tokenizer_dir, family: str, max_positions: int = 256):
    """A transformers checkpoint of `family` whose vocabulary is the tokenizer's."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    if family == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    out = root / family
    model.eval().save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out, model, tok


@pytest.fixture(scope="module")
def served(tmp_path_factory, hf_tokenizer_dirs):
    root = tmp_path_factory.mktemp("byo")
    registry = root / "registry"
    models = {}
    for family, kind in (("qwen2", "qwen"), ("llama", "llama2")):
        directory, model, tok = _checkpoint(root, hf_tokenizer_dirs[kind], family)
        assert main(["import-hf", str(directory), "--name", family, "--registry", str(registry)]) == 0
        models[family] = (model, tok)
    server = RunningServer(registry, root / "home", http_port=free_port()).start()
    from client.client import Client

    with Client(server.target, admin_key=ADMIN_KEY) as admin:
        key = admin.create_key("byo")[0]
    client = openai.OpenAI(base_url=server.http_url, api_key=key)
    yield client, models
    server.stop()


def _greedy(model, ids: list[int]) -> list[int]:
    model.generation_config.eos_token_id = None        # exactly NEW_TOKENS, as ignore_eos
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_served_greedy_text_and_usage_equal_transformers(served, family):
    client, models = served
    model, tok = models[family]
    messages = [{"role": "user", "content": "Hello, how are you? café 😀"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    expected = tok.decode(_greedy(model, list(prompt)), skip_special_tokens=True)
    kwargs = dict(model=family, messages=messages, max_tokens=NEW_TOKENS, temperature=0,
                  extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == NEW_TOKENS
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(stream=True, **kwargs) if chunk.choices)
    assert streamed == expected


def test_an_imported_model_is_listed_with_its_name(served):
    client, _ = served
    ids = {m.id for m in client.models.list().data}
    assert {"qwen2", "llama"} <= ids


def test_tools_on_a_template_without_a_call_format_are_refused(served):
    """A template that shows no tool-call format (plain ChatML here) cannot have calls read
    from its answers: 400 naming tools, unless tool_choice is none."""
    client, _ = served
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="qwen2", messages=messages, tools=tools, max_tokens=2)
    assert err.value.body["param"] == "tools" and "tool-call format" in err.value.body["message"]
    r = client.chat.completions.create(model="qwen2", messages=messages, tools=tools, tool_choice="none",
                                       max_tokens=2)
    assert r.choices[0].message.tool_calls is None
