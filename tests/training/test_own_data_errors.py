"""Bad training files stop a stage before any training: the error names FILE:LINE, the
field and what was expected, the command exits non-zero, and the registry is unchanged.
`sol data check` gives the same error for the data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt.registry import Registry
from tests.training.own_data_helpers import publish_tiny, registry_snapshot, run_cli, write_jsonl

USER = {"role": "user", "content": "What is 2 + 3?"}
ASSISTANT = {"role": "assistant", "content": "5"}
GOOD_SFT = {"messages": [USER, ASSISTANT]}
GOOD_PAIR = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}
GOOD_PROMPT = {"messages": [USER], "bonus": 1}
LONG = "many words " * 80          # far more than the 64-token context of the test model
REWARDS = "python:tests.training.own_data_rewards"

# (case id, stage, data rows (str rows are written as they are), extra flags, expected text)
# Expected text with {file} is the data file's path.
CASES = [
    ("malformed-json", "sft", [GOOD_SFT, '{"messages": ['], [], "{file}:2: line: expected one JSON object per line"),
    ("not-an-object", "sft", ["[1, 2]"], [], "{file}:1: line: expected a JSON object, got an array"),
    ("missing-role", "sft", [GOOD_SFT, {"messages": [{"content": "hi"}, ASSISTANT]}], [],
     "{file}:2: messages[0].role: expected one of system, user, assistant, tool, got no role"),
    ("unknown-role", "sft", [{"messages": [USER, {"role": "bot", "content": "5"}]}], [],
     "{file}:1: messages[1].role: expected one of"),
    ("content-not-string", "sft", [{"messages": [USER, {"role": "assistant", "content": 5}]}], [],
     "{file}:1: messages[1].content: expected a string, got a number 5"),
    ("tool-calls-without-content", "sft",
     [{"messages": [USER, {"role": "assistant", "content": None, "tool_calls": []}]}], [],
     "{file}:1: messages[1].content: expected a string (tool_calls"),
    ("no-assistant-turn", "sft", [{"messages": [USER]}], [],
     "{file}:1: messages: expected an assistant message to learn, got no assistant message"),
    ("all-weights-zero", "sft", [{"messages": [USER, {**ASSISTANT, "weight": 0}]}], [],
     "{file}:1: messages: expected an assistant message to learn, got every assistant message has weight 0"),
    ("weight-not-0-or-1", "sft", [{"messages": [USER, {**ASSISTANT, "weight": 2}]}], [],
     "{file}:1: messages[1].weight: expected 0 or 1, got a number 2"),
    ("weight-on-user", "sft", [{"messages": [{**USER, "weight": 1}, ASSISTANT]}], [],
     "{file}:1: messages[0].weight: expected no weight"),
    ("empty-messages", "sft", [{"messages": []}], [], "{file}:1: messages: expected a non-empty array of messages"),
    ("prompt-without-completion", "sft", [{"prompt": "hi"}], [], "{file}:1: completion: expected a string"),
    ("tools-not-array", "sft", [{**GOOD_SFT, "tools": "search"}], [], "{file}:1: tools: expected an array"),
    ("empty-file", "sft", [], [], "{file}:1: file: expected at least one row, got an empty file"),
    ("prompt-longer-than-context", "sft", [GOOD_SFT, {"messages": [{"role": "user", "content": LONG}, ASSISTANT]}],
     [], "{file}:2: messages: expected a prompt shorter than the model's context of 64 tokens"),
    ("eval-file-bad", "sft", [GOOD_SFT, GOOD_SFT], ["--eval-data", "{other}"], "{other}:1: line: expected"),
    ("empty-chosen", "reward", [GOOD_PAIR, {**GOOD_PAIR, "chosen": "  "}], [],
     "{file}:2: chosen: expected a non-empty assistant reply"),
    ("chosen-equals-rejected", "dpo", [{**GOOD_PAIR, "rejected": "5"}], [],
     "{file}:1: rejected: expected a reply different from chosen"),
    ("prefs-missing-prompt", "dpo", [{"chosen": "5", "rejected": "6"}], [], "{file}:1: prompt: expected a prompt"),
    ("prefs-missing-rejected", "reward", [{"prompt": "hi", "chosen": "5"}], [],
     "{file}:1: rejected: expected a string or an array of messages, got nothing"),
    ("prefs-chosen-not-text", "dpo", [{**GOOD_PAIR, "chosen": 5}], [],
     "{file}:1: chosen: expected a string or an array of messages, got a number 5"),
    ("prefs-prompt-too-long", "dpo", [GOOD_PAIR, {**GOOD_PAIR, "prompt": LONG}], [],
     "{file}:2: chosen: expected a prompt shorter than the model's context"),
    ("one-row-and-no-eval-file", "dpo", [GOOD_PAIR], [],
     "{file}:1: file: expected at least 2 rows to hold one out for evaluation (or --eval-data), got 1 row"),
    ("prompt-ends-with-assistant", "rlhf", [GOOD_PROMPT, {"messages": [USER, ASSISTANT]}], ["--reward", f"{REWARDS}:uses_row"],
     "{file}:2: messages[1].role: expected a prompt that ends before the assistant's turn"),
    ("prompt-leaves-no-room", "rlhf", [GOOD_PROMPT, {"prompt": LONG}], ["--reward", f"{REWARDS}:uses_row"],
     "{file}:2: messages: expected a prompt of at most 52 tokens"),
    ("reward-does-not-import", "rlhf", [GOOD_PROMPT, GOOD_PROMPT],
     ["--reward", "python:tests.training.broken_reward_module:fn"],
     "module 'tests.training.broken_reward_module' does not import: ImportError"),
    ("reward-missing-function", "rlhf", [GOOD_PROMPT, GOOD_PROMPT], ["--reward", f"{REWARDS}:nowhere"],
     "has no attribute 'nowhere'"),
    ("reward-not-callable", "rlhf", [GOOD_PROMPT, GOOD_PROMPT], ["--reward", f"{REWARDS}:NOT_CALLABLE"],
     "'NOT_CALLABLE' is a int, expected a function"),
    ("reward-raises", "rlhf", [GOOD_PROMPT, GOOD_PROMPT], ["--reward", f"{REWARDS}:raises"],
     ":1: reward python:tests.training.own_data_rewards:raises raised RuntimeError: reward backend unavailable"),
    ("reward-not-finite", "rlhf", [GOOD_PROMPT, GOOD_PROMPT], ["--reward", f"{REWARDS}:returns_nan"],
     "returned nan, expected a finite number"),
    ("reward-not-a-number", "rlhf", [GOOD_PROMPT, GOOD_PROMPT], ["--reward", f"{REWARDS}:returns_text"],
     "returned 'good' (str), expected a float"),
    ("reward-times-out", "rlhf", [GOOD_PROMPT, GOOD_PROMPT],
     ["--reward", f"{REWARDS}:slow", "--reward-timeout", "0.2"], "took longer than 0.2 s"),
    ("reward-bad-spec", "rlhf", [GOOD_PROMPT, GOOD_PROMPT], ["--reward", "python:justamodule"],
     "expected python:MODULE:FUNCTION"),
    ("text-empty", "pretrain", [{"text": "hello world"}, {"text": ""}], [], "{file}:2: text: expected a non-empty string"),
    ("text-not-string", "pretrain", [{"text": ["a"]}], [], "{file}:1: text: expected a non-empty string, got an array"),
]

KIND = {"sft": "sft", "reward": "prefs", "dpo": "prefs", "rlhf": "prompts", "pretrain": "text"}


@pytest.fixture(scope="module")
def error_registry(tmp_path_factory, tiny_tokenizer):
    registry = Registry(tmp_path_factory.mktemp("errors") / "registry")
    publish_tiny(registry, tiny_tokenizer, max_seq_len=64)
    return registry


def test_the_table_has_twenty_kinds():
    assert len({case[0] for case in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize(("stage", "rows", "flags", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_stops_the_stage_naming_file_and_line(stage, rows, flags, expected, error_registry, tmp_path,
                                                        monkeypatch, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    other = write_jsonl(tmp_path / "eval.jsonl", ["not json"])
    flags = [f.replace("{other}", str(other)) for f in flags]
    before = registry_snapshot(error_registry)
    data_flag = "--prompts" if stage == "rlhf" else "--data"
    argv = ["train", stage, "--preset", "tiny", "--name", "own", "--registry", str(error_registry.root),
            data_flag, str(data), "--steps", "2", "--quiet", "--run-dir", str(tmp_path / "runs"), *flags]
    if stage == "pretrain":
        argv += ["--from", "own:base"]
    assert run_cli(argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert expected.format(file=data, other=other) in err, err
    assert registry_snapshot(error_registry) == before
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("state"))

    # The same file through `sol data check` (reward functions, evaluation files and the
    # held-out split are the stage's).
    if "{other}" not in expected and "--reward" not in flags and "hold one out" not in expected:
        check = ["data", "check", str(data), "--kind", KIND[stage], "--from", "own:base", "--registry",
                 str(error_registry.root), "--max-new-tokens", "12"]
        assert run_cli(check, monkeypatch) == 2
        assert expected.format(file=data) in capsys.readouterr().err


def test_data_check_runs_the_reward_function_on_the_first_row(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "prompts.jsonl", [GOOD_PROMPT])
    assert run_cli(["data", "check", str(data), "--kind", "prompts", "--reward", f"{REWARDS}:raises"],
                   monkeypatch) == 2
    assert f"{data}:1: reward {REWARDS}:raises raised RuntimeError" in capsys.readouterr().err
    assert run_cli(["data", "check", str(data), "--kind", "prompts", "--reward", f"{REWARDS}:uses_row", "--json"],
                   monkeypatch) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reward_on_first_row"] == 2.0 and out["counts"]["rows"] == 1


def test_missing_file_is_an_error(tmp_path, monkeypatch, capsys):
    missing = Path(tmp_path) / "nope.jsonl"
    assert run_cli(["data", "check", str(missing), "--kind", "sft"], monkeypatch) == 2
    assert f"{missing}:0: file: expected a readable JSON Lines file, got no such file" in capsys.readouterr().err
