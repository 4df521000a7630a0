import threading

import pytest

from gpt.checkpoint import load_checkpoint
from gpt.registry import ModelNotFound, ModelRef, RegistryError, publish_checkpoint


@pytest.mark.parametrize("bad", ["../evil", "/etc", "Evil", "a/b", "", ".hidden", "a" * 65, "x:y:z", "m@v1"])
def test_bad_names_are_refused(bad):
    with pytest.raises(RegistryError):
        ModelRef.parse(bad)


def test_reference_forms():
    assert ModelRef.parse("sol-small") == ModelRef("sol-small", alias="latest")
    assert ModelRef.parse("sol-small:sft") == ModelRef("sol-small", alias="sft")
    assert ModelRef.parse("sol-small@3") == ModelRef("sol-small", version=3)


def test_publish_moves_latest_and_aliases(registry, tiny_model, tiny_tokenizer):
    a = publish_checkpoint(registry, "m", tiny_model, tiny_tokenizer, {"stage": "base"}, aliases=("base",))
    b = publish_checkpoint(registry, "m", tiny_model, tiny_tokenizer, {"stage": "sft", "parent": a.ref},
                           aliases=("sft",))
    assert (a.version, b.version) == (1, 2)
    assert registry.resolve("m").version == 2
    assert registry.resolve("m:base").version == 1
    assert registry.resolve("m@1").path == a.path
    assert registry.aliases("m") == {"base": 1, "latest": 2, "sft": 2}
    assert load_checkpoint(registry.resolve("m:sft").path).meta["parent"] == "m@1"
    registry.set_alias("m", "latest", 1)  # rollback
    assert registry.resolve("m").version == 1


def test_missing_things_raise_not_found_with_what_exists(registry, tiny_model, tiny_tokenizer):
    publish_checkpoint(registry, "m", tiny_model, tiny_tokenizer, {})
    with pytest.raises(ModelNotFound, match="known models: m"):
        registry.resolve("other")
    with pytest.raises(ModelNotFound, match="known aliases: latest"):
        registry.resolve("m:rlhf")
    with pytest.raises(ModelNotFound, match="versions"):
        registry.resolve("m@9")


def test_concurrent_publishers_get_distinct_versions_and_leave_no_temp_dirs(registry, tiny_model, tiny_tokenizer):
    results, errors = [], []

    def publish():
        try:
            results.append(publish_checkpoint(registry, "m", tiny_model, tiny_tokenizer, {}).version)
        except Exception as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [1, 2, 3, 4]
    assert not [p for p in registry.model_dir("m").iterdir() if p.name.startswith(".tmp")]
    for v in results:
        load_checkpoint(registry.version_dir("m", v))


def test_gc_keeps_aliased_and_recent_versions(registry, tiny_model, tiny_tokenizer):
    for alias in ("base", None, None, None, None):
        publish_checkpoint(registry, "m", tiny_model, tiny_tokenizer, {}, aliases=(alias,) if alias else ())
    assert registry.gc("m", keep_last=2) == [2, 3]
    assert registry.versions("m") == [1, 4, 5]


def test_describe_lists_versions_with_meta(registry, tiny_model, tiny_tokenizer):
    publish_checkpoint(registry, "m", tiny_model, tiny_tokenizer, {"stage": "base", "metrics": {"ppl": 3.0}},
                       aliases=("base",))
    info = registry.describe("m")
    assert info["versions"][0]["stage"] == "base"
    assert info["versions"][0]["aliases"] == ["base", "latest"]
    assert "files" not in info["versions"][0]


def test_reward_models_do_not_move_latest(registry, tiny_model, tiny_tokenizer):
    publish_checkpoint(registry, "m", tiny_model, tiny_tokenizer, {"stage": "sft"}, aliases=("sft",))
    publish_checkpoint(registry, "m", tiny_model, tiny_tokenizer, {"stage": "rm"}, aliases=("rm",))
    assert registry.aliases("m") == {"latest": 1, "rm": 2, "sft": 1}
