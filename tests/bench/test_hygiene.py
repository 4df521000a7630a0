"""`sol bench hygiene` against a real server on loopback: a random-weight chat model
sampled at temperature 1 emits special tokens (role starts, the end of turn) often, and
none of them may reach a reply's text."""

from __future__ import annotations

import asyncio

from bench.hygiene import held_out_prompts, sample, shown_specials, special_texts
from client.client import Client
from tests.service.harness import ADMIN_KEY, RunningServer, publish_tiny


def test_special_token_search_reports_the_longest_match_first(tiny_tokenizer):
    specials = special_texts(tiny_tokenizer)
    assert specials and all(len(a) >= len(b) for a, b in zip(specials, specials[1:], strict=False))
    token = specials[0]
    assert shown_specials(f"4{token}5", specials)[0] == token
    assert shown_specials("plain text", specials) == []


def test_sampled_chat_completions_show_no_special_token_text(tiny_tokenizer, tmp_path):
    server = RunningServer(publish_tiny(tmp_path, tiny_tokenizer), tmp_path / "home").start()
    try:
        with Client(server.target, admin_key=ADMIN_KEY, retries=0) as admin:
            key, _ = admin.create_key("hygiene")
        report = asyncio.run(sample(server.target, key, "tiny", held_out_prompts(64, seed=3), concurrency=8,
                                    max_tokens=24, temperature=1.0, seed=3, specials=special_texts(tiny_tokenizer)))
    finally:
        server.stop()
    assert report.completions == 64 and sum(report.finish_reasons.values()) == 64
    # Some replies were ended by a special token (the chat stops), so the check saw them come.
    assert report.finish_reasons.get("stop", 0) > 0, report.finish_reasons
    assert report.with_special_text == 0, (report.found, report.examples)
