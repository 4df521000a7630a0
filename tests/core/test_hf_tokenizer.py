"""A model's own tokenizer (gpt/tokenizers/hf.py) gives transformers' ids and text, takes
bos/eos from the settings files, and a broken tokenizer.json is refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt.tokenizer import SolTokenizer, load_tokenizer
from gpt.tokenizers.base import Tokenizer, TokenizerError
from gpt.tokenizers.hf import HFTokenizer
from tests.hf_tokenizers import SAMPLES

KINDS = ("qwen", "llama3", "llama2", "mistral")
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)


@pytest.fixture(scope="module")
def pairs(hf_tokenizer_dirs):
    from transformers import AutoTokenizer

    return {k: (load_tokenizer(d), AutoTokenizer.from_pretrained(str(d))) for k, d in hf_tokenizer_dirs.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_ids_and_text_equal_transformers(pairs, kind):
    ours, hf = pairs[kind]
    assert isinstance(ours, HFTokenizer) and isinstance(ours, Tokenizer)
    for text in [*SAMPLES, "<s>[INST] hi [/INST] <|im_start|>user\n<think>x</think>", ""]:
        ids = hf(text)["input_ids"]
        assert ours.encode_prompt(text) == ids, text
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False, split_special_tokens=True), text
        assert ours.decode(ids) == hf.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, kind=st.sampled_from(KINDS))
def test_any_text_encodes_as_transformers_and_round_trips(pairs, text, kind):
    ours, hf = pairs[kind]
    ids = ours.encode_prompt(text)
    assert ids == hf(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False,
                                                                 split_special_tokens=True))


def test_bos_and_eos_come_from_the_settings_files(pairs):
    qwen, llama3, llama2 = pairs["qwen"][0], pairs["llama3"][0], pairs["llama2"][0]
    # generation_config.json's list first, then tokenizer_config.json's eos_token.
    assert qwen.eos_ids == [qwen.special("<|im_end|>"), qwen.special("<|endoftext|>")]
    assert qwen.bos_id is None and qwen.pad_id == qwen.special("<|endoftext|>")
    assert llama3.eos_ids == [llama3.special("<|end_of_text|>"), llama3.special("<|eot_id|>")]
    assert llama3.bos_id == llama3.special("<|begin_of_text|>")
    assert llama3.encode_prompt("hi")[0] == llama3.bos_id and llama3.encode("hi")[0] != llama3.bos_id
    assert llama2.eos_ids == [2] and llama2.bos_id == 1 and llama2.pad_id == 2


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_bos_token": True, "add_eos_token": True},
                                   {"add_eos_token": True}])
def test_add_bos_token_flags_behave_as_transformers(hf_tokenizer_dirs, tmp_path, flags):
    """tokenizer.json's post-processor wins over the flags (transformers 5); without one,
    the flags decide, as a transformers tokenizer built with them does."""
    from transformers import AutoTokenizer

    directory = shutil.copytree(hf_tokenizer_dirs["llama2"], tmp_path / "t")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, **flags}))
    ours, hf = load_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    for text in SAMPLES[:3]:
        assert ours.encode_prompt(text) == hf(text)["input_ids"]
    assert ours.encode_prompt("x")[0] == 1

    spec = json.loads((directory / "tokenizer.json").read_text())
    (directory / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
    ours, hf = load_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory), **flags)
    for text in SAMPLES[:3]:
        assert ours.encode_prompt(text) == hf(text)["input_ids"]
    assert (ours.encode_prompt("x")[0] == 1) == flags.get("add_bos_token", False)
    assert (ours.encode_prompt("x")[-1] == 2) == flags.get("add_eos_token", False)


def test_named_templates_take_the_default(hf_tokenizer_dirs, tmp_path):
    directory = shutil.copytree(hf_tokenizer_dirs["qwen"], tmp_path / "t")
    (directory / "chat_template.jinja").unlink()
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"},
                               {"name": "default", "template": "{{ 'plain' }}"}]
    config_path.write_text(json.dumps(config))
    assert load_tokenizer(directory).chat_template == "{{ 'plain' }}"
    config["chat_template"] = [{"name": "tool_use", "template": "x"}]
    config_path.write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="tokenizer_config.json.*none named 'default'"):
        load_tokenizer(directory)


@pytest.mark.parametrize(("content", "problem"), [
    ("5", "must hold a JSON object"),
    ('{"model": {"type": "BPE"', "is not valid JSON"),
    ('{"version": "1.0"}', "no tokenizer model"),
    ('{"model": {"type": "BPE", "vocab": {}, "merges": []}}', "no vocabulary"),
    ('{"model": {"type": "Nope", "vocab": {"a": 0}}}', "not a tokenizer the `tokenizers` library reads"),
])
def test_a_broken_tokenizer_json_is_refused_naming_the_file(tmp_path, content, problem):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value) and problem in str(err.value)


def test_a_broken_settings_file_is_refused_naming_it(hf_tokenizer_dirs, tmp_path):
    directory = shutil.copytree(hf_tokenizer_dirs["qwen"], tmp_path / "t")
    (directory / "generation_config.json").write_text('{"eos_token_id": "end"}')
    with pytest.raises(TokenizerError, match="generation_config.json: eos_token_id must be a token id"):
        load_tokenizer(directory)


def test_sol_checkpoints_keep_sol_tokenizer(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), SolTokenizer)
    from gpt.chat import JINJA_TEMPLATE

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": JINJA_TEMPLATE}))
    assert isinstance(load_tokenizer(tmp_path), SolTokenizer)       # sol's export, read back
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'x' }}",
                                                                "eos_token": "<|end|>"}))
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)        # a template of the user's own


def test_save_writes_the_settings_back(pairs, tmp_path):
    ours = pairs["llama3"][0]
    ours.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.eos_ids == ours.eos_ids and again.chat_template == ours.chat_template
    assert again.encode_prompt("hello") == ours.encode_prompt("hello")
