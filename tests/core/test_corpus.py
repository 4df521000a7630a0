from training.data.corpus import build_corpus


def test_corpus_is_local_deterministic_and_split(corpus):
    again = build_corpus(max_bytes=1 << 20)
    assert again.fingerprint == corpus.fingerprint
    assert again.train == corpus.train
    assert corpus.train_bytes >= 1 << 20
    assert corpus.heldout and not set(corpus.heldout) & set(corpus.train)
