"""Streamed text equals the full decode, token by token, for every tokenizer kind: sol's
BPE and byte-level BPE by bytes, metaspace with byte fallback through a decode window
(multi-byte characters split over tokens and byte pieces, the first token's leading
space). Special tokens are hidden unless asked for."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt.tokenizer import load_tokenizer
from server.engine.api import Delta as EngineDelta
from server.engine.api import EngineRequest, SamplingParams, TextDelta
from server.engine.output import OutputProcessor, TokenTexts
from tests.hf_tokenizers import SAMPLES

KINDS = ("sol", "qwen", "llama3", "llama2", "mistral")


@pytest.fixture(scope="module")
def tokenizers(hf_tokenizer_dirs, tiny_tokenizer):
    return {"sol": tiny_tokenizer, **{k: load_tokenizer(d) for k, d in hf_tokenizer_dirs.items()}}


def streamed(tok, ids: list[int], hide: frozenset[int] = frozenset()) -> tuple[str, list[str]]:
    detok = TokenTexts.for_tokenizer(tok).detokenizer(None)
    deltas = [detok.add(i, hide=i in hide) for i in ids]
    deltas.append(detok.flush())
    return "".join(deltas), deltas


def test_the_kinds_stream_as_expected(tokenizers):
    assert TokenTexts.for_tokenizer(tokenizers["sol"])._decode is None          # bytes
    assert TokenTexts.for_tokenizer(tokenizers["qwen"])._decode is None
    assert TokenTexts.for_tokenizer(tokenizers["llama2"])._decode is not None   # decode window


@pytest.mark.parametrize("kind", KINDS)
def test_encoded_text_streams_to_its_decode(tokenizers, kind):
    tok = tokenizers[kind]
    for text in SAMPLES:
        ids = tok.encode(text)
        full, deltas = streamed(tok, ids)
        assert full == tok.decode(ids)
        assert all("\ufffd" not in d for d in deltas), (kind, text)    # no half characters on the way


def ids_strategy(tok) -> st.SearchStrategy[list[int]]:
    special = sorted(tok.special_ids.values())
    # Byte pieces, the first ids (single bytes / <0xNN>), any id, and the specials.
    return st.lists(st.one_of(st.integers(0, 300), st.integers(0, tok.vocab_size - 1), st.sampled_from(special)),
                    max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), kind=st.sampled_from(KINDS))
def test_random_ids_stream_to_their_decode(tokenizers, data, kind):
    tok = tokenizers[kind]
    ids = data.draw(ids_strategy(tok))
    assert streamed(tok, ids)[0] == tok.decode(ids)
    specials = frozenset(tok.special_ids.values())
    assert streamed(tok, ids, hide=specials)[0] == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens_hides_specials_from_the_text(tokenizers, kind, skip):
    tok = tokenizers[kind]
    special = sorted(tok.special_ids.values())[1]
    ids = tok.encode("Hello") + [special] + tok.encode(" world")
    request = EngineRequest("r", [0], SamplingParams(skip_special_tokens=skip))
    out = OutputProcessor(request, TokenTexts.for_tokenizer(tok), lambda i: None).process(
        [EngineDelta("r", 0, [i]) for i in ids])
    text = "".join(e.text for e in out if isinstance(e, TextDelta))
    assert text == tok.decode(ids, skip_special_tokens=skip)
    assert (tok.decode([special]) in text) != skip
