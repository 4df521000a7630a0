"""`sol models`, `sol export-hf` and `sol import-hf` through the real CLI entry point."""

import json

from client.cli import main


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_models_list_and_show(tiny_checkpoint, capsys):
    registry, resolved = tiny_checkpoint
    data = run_json(capsys, "models", "list", "--registry", str(registry.root))
    assert [m["name"] for m in data["models"]] == ["tiny"]
    shown = run_json(capsys, "models", "show", "tiny:base", "--registry", str(registry.root), "--verify")
    assert shown["ref"] == "tiny@1" and shown["verified"] and shown["meta"]["stage"] == "base"
    assert main(["models", "show", "tiny:base", "--registry", str(registry.root)]) == 0
    assert "tiny@1" in capsys.readouterr().out


def test_bad_reference_is_a_clean_error(tiny_checkpoint, capsys):
    registry, _ = tiny_checkpoint
    assert main(["models", "show", "../evil", "--registry", str(registry.root)]) == 2
    assert "invalid model name '../evil'" in capsys.readouterr().err


def test_export_then_import_publishes_a_new_version(tiny_checkpoint, tmp_path, capsys):
    registry, _ = tiny_checkpoint
    assert main(["export-hf", "tiny", str(tmp_path / "hf"), "--registry", str(registry.root)]) == 0
    capsys.readouterr()
    data = run_json(capsys, "import-hf", str(tmp_path / "hf"), "--name", "imported", "--alias", "sft",
                    "--registry", str(registry.root))
    assert data["ref"] == "imported@1"
    assert registry.resolve("imported:sft").version == 1


def test_alias_moves_and_refuses_missing_versions(tiny_checkpoint, capsys):
    registry, _ = tiny_checkpoint
    data = run_json(capsys, "models", "alias", "tiny", "prod", "1", "--registry", str(registry.root))
    assert data == {"model": "tiny", "alias": "prod", "version": 1, "previous": None}
    assert registry.resolve("tiny:prod").version == 1
    assert main(["models", "alias", "tiny", "prod", "7", "--registry", str(registry.root)]) == 2
    assert "version 7" in capsys.readouterr().err


def test_tokenizer_stats_reports_compression_and_agreement(tiny_checkpoint, capsys):
    registry, _ = tiny_checkpoint
    data = run_json(capsys, "tokenizer", "stats", "tiny", "--registry", str(registry.root))
    assert data["vocab_size"] == 512 and data["bytes_per_token"] > 1.5
    done, total = map(int, data["tiktoken_matches_trainer"].split("/"))
    assert done == total > 10
