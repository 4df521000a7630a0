import queue

import pytest

from gpt.registry import publish_checkpoint
from server.models.registry_watcher import AliasChange, RegistryWatcher
from tests.service.harness import wait_for


@pytest.mark.parametrize("use_events", [True, False], ids=["inotify", "polling"])
def test_watcher_reports_new_versions_and_moved_aliases(registry, tiny_model, tiny_tokenizer, use_events):
    publish_checkpoint(registry, "m", tiny_model, tiny_tokenizer, {}, aliases=("base",))
    seen: queue.Queue = queue.Queue()
    watcher = RegistryWatcher(registry, lambda changes: [seen.put(c) for c in changes],
                              poll_interval=0.2 if not use_events else 30.0, use_events=use_events)
    watcher.start()
    try:
        assert watcher.events_active == use_events
        publish_checkpoint(registry, "m", tiny_model, tiny_tokenizer, {}, aliases=("sft",))
        got = {seen.get(timeout=10), seen.get(timeout=10)}
        assert got == {AliasChange("m", "sft", None, 2), AliasChange("m", "latest", 1, 2)}
        registry.set_alias("m", "latest", 1)
        assert seen.get(timeout=10) == AliasChange("m", "latest", 2, 1)
    finally:
        watcher.stop()


def test_failing_handler_does_not_kill_the_watcher(registry, tiny_model, tiny_tokenizer):
    calls = []

    def handler(changes):
        calls.append(changes)
        raise RuntimeError("boom")

    watcher = RegistryWatcher(registry, handler, use_events=False)
    watcher.current = {}
    publish_checkpoint(registry, "m", tiny_model, tiny_tokenizer, {})
    assert watcher.check() == [AliasChange("m", "latest", None, 1)]
    registry.set_alias("m", "x", 1)
    assert watcher.check() == [AliasChange("m", "x", None, 1)]
    assert len(calls) == 2


def test_an_idle_registry_is_not_rescanned_in_a_loop(registry, tiny_model, tiny_tokenizer):
    """Rescans read the alias files; those reads must not wake the watcher again."""
    import time

    publish_checkpoint(registry, "m", tiny_model, tiny_tokenizer, {}, aliases=("base", "sft"))
    watcher = RegistryWatcher(registry, lambda changes: None, poll_interval=30.0, use_events=True)
    watcher.start()
    try:
        assert watcher.events_active
        watcher._wake.set()          # one scan, whose reads must not trigger the next
        time.sleep(1.0)              # an observation window: nothing is supposed to happen in it
        assert watcher.scans <= 2, f"{watcher.scans} scans of an idle registry in 1 s"
        before = watcher.scans
        registry.set_alias("m", "base", 1)   # rewritten by rename: a real change event
        wait_for(lambda: watcher.scans > before, timeout=5, message="a change in the registry waking the watcher")
    finally:
        watcher.stop()
