"""Watch the registry for moved aliases and new versions.

Filesystem events (watchdog: inotify on Linux) wake the watcher at once; a periodic
rescan is the fallback for filesystems that deliver no events (NFS, some RWX volumes
on Kubernetes). Either way the watcher compares full snapshots of every model's alias
table, so a missed or duplicated event cannot make it miss or repeat a change.
Publishing renames whole directories and replaces alias files atomically, so a scan
never sees half a checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from gpt.registry import Registry

log = logging.getLogger(__name__)

Snapshot = dict[str, dict[str, int]]

# watchdog event types that mean the registry changed: publishing renames a directory
# into place and aliases are replaced by rename, so "moved" and "created" carry every
# real change; "closed" is a close after writing.
CHANGE_EVENTS = frozenset({"created", "deleted", "moved", "closed"})


@dataclass(frozen=True)
class AliasChange:
    model: str
    alias: str
    old_version: int | None      # None: the alias is new
    new_version: int | None      # None: the alias was removed


def snapshot(registry: Registry) -> Snapshot:
    out: Snapshot = {}
    for name in registry.models():
        try:
            out[name] = registry.aliases(name)
        except OSError as err:  # a model directory vanishing mid-scan is not fatal
            log.warning("registry scan of %s failed: %s", name, err)
    return out


def diff(old: Snapshot, new: Snapshot) -> list[AliasChange]:
    changes = []
    for model in sorted(set(old) | set(new)):
        before, after = old.get(model, {}), new.get(model, {})
        for alias in sorted(set(before) | set(after)):
            if before.get(alias) != after.get(alias):
                changes.append(AliasChange(model, alias, before.get(alias), after.get(alias)))
    return changes


class RegistryWatcher:
    """Calls `on_change(changes)` from its own thread whenever aliases move."""

    def __init__(self, registry: Registry, on_change: Callable[[list[AliasChange]], None],
                 poll_interval: float = 2.0, use_events: bool = True) -> None:
        self.registry = registry
        self.on_change = on_change
        self.poll_interval = poll_interval
        self.use_events = use_events
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer = None
        self.current: Snapshot = {}
        self.events_active = False
        self.scans = 0

    def start(self) -> None:
        self.current = snapshot(self.registry)
        if self.use_events:
            self._start_observer()
        self._thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)
        self._thread.start()

    def _start_observer(self) -> None:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            log.info("watchdog not installed; polling the registry every %.1fs", self.poll_interval)
            return
        wake = self._wake

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                # Only changes wake the scan: reads (our own rescans open every alias
                # file) would otherwise wake it again, a busy loop.
                if event.event_type in CHANGE_EVENTS:
                    wake.set()

        try:
            # A registry that does not exist yet (a fresh volume) is watched once created;
            # on a read-only mount mkdir fails and polling covers it.
            self.registry.root.mkdir(parents=True, exist_ok=True)
            observer = Observer()
            observer.schedule(_Wake(), str(self.registry.root), recursive=True)
            observer.start()
        except OSError as err:  # e.g. inotify watch limit reached
            log.warning("filesystem events unavailable (%s); polling every %.1fs", err, self.poll_interval)
            return
        self._observer = observer
        self.events_active = True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_interval)
            if self._stop.is_set():
                break
            self._wake.clear()
            self.check()

    def check(self) -> list[AliasChange]:
        """Rescan now; report and return the changes since the last scan."""
        new = snapshot(self.registry)
        self.scans += 1
        changes = diff(self.current, new)
        self.current = new
        if changes:
            try:
                self.on_change(changes)
            except Exception:  # the watcher must outlive a failing callback
                log.exception("registry change handler failed")
        return changes

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
