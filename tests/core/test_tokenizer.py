from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt.tokenizer import END_OF_TURN, ENDOFTEXT, SPECIAL_TOKENS, SolTokenizer


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_decode_encode_roundtrips_any_unicode(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_trainer_and_tiktoken_give_identical_ids_on_heldout_text(tiny_tokenizer, corpus):
    hf = tiny_tokenizer.hf_tokenizer()
    texts = [t for t in corpus.heldout if not any(s in t for s in SPECIAL_TOKENS)]
    assert len(texts) >= 10
    for text in texts:
        assert tiny_tokenizer.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_special_tokens_have_fixed_ids_and_are_not_forgeable(tiny_tokenizer):
    assert [tiny_tokenizer.special(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tiny_tokenizer.encode(f"hi {END_OF_TURN}{ENDOFTEXT}")
    assert not any(tiny_tokenizer.is_special(i) for i in ids)


def test_digits_are_single_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode("12345")
    assert len(ids) == 5


def test_save_load_roundtrip(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    again = SolTokenizer.load(tmp_path)
    text = "def f(x):\n    return x * 2  # ünïcode"
    assert again.encode(text) == tiny_tokenizer.encode(text)
    assert again.vocab_size == tiny_tokenizer.vocab_size


def test_compression_is_reasonable(tiny_tokenizer, corpus):
    text = "\n".join(corpus.heldout)
    assert len(text.encode()) / len(tiny_tokenizer.encode(text)) > 1.5
