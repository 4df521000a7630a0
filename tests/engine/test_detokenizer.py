"""Text deltas are valid UTF-8 and never leak a stop string, even one spread over tokens."""

from __future__ import annotations

from server.engine.detokenizer import IncrementalDetokenizer

# A toy vocabulary of byte strings: token i is PIECES[i].
PIECES = [b"Hel", b"lo", b" wo", b"rld", b"\xe2\x82", b"\xac", b"!", b"ST", b"OP", b" the end", b"S"]


def run(tokens, stop=None, min_check_at=0):
    d = IncrementalDetokenizer(lambda t: PIECES[t], stop)
    deltas = []
    for i, t in enumerate(tokens):
        deltas.append(d.add(t, check_stop=i + 1 >= min_check_at))
        if d.stopped:
            break
    deltas.append(d.flush())
    return deltas, d


def test_multibyte_character_split_across_tokens_is_held_back():
    deltas, _ = run([0, 1, 4, 5, 6])
    assert deltas[2] == ""                 # half of the euro sign
    assert deltas[3] == "€"
    assert "".join(deltas) == "Hello€!"


def test_stop_string_across_tokens_is_removed_and_never_emitted():
    deltas, d = run([0, 1, 7, 8, 9], stop=["STOP"])
    assert d.stopped
    assert "".join(deltas) == "Hello"
    assert all("ST" not in x for x in deltas)


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    deltas, d = run([0, 10, 6, 9], stop=["STOP"])
    assert not d.stopped
    assert "".join(deltas) == "HelS! the end"
    assert deltas[1] == ""                 # "S" might begin "STOP"
    assert deltas[2] == "S!"


def test_stop_string_inside_one_token_and_first_of_several():
    deltas, d = run([0, 1, 2, 3, 9], stop=["xyz", "o wo", "the"])
    assert "".join(deltas) == "Hell"


def test_stop_strings_ignored_before_min_tokens():
    deltas, d = run([7, 8, 0, 7, 8], stop=["STOP"], min_check_at=3)
    assert "".join(deltas) == "STOPHel"


def test_hidden_token_adds_no_text():
    d = IncrementalDetokenizer(lambda t: PIECES[t], None)
    assert d.add(0) == "Hel"
    assert d.add(9, hide=True) == ""
    assert d.flush() == ""
