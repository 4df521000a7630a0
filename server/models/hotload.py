"""Hot-load: follow the registry and swap model versions in without dropping a request.

The watcher reports moved aliases; a single worker thread loads each new version in the
background (the manager verifies every sha256, the config, the shapes and the tokenizer,
then warms the engine with a forward pass), and only then points the alias at it, so new
requests move over atomically while running requests finish on the version they
started on. A version that no followed alias points to any more is retired: it leaves
the routing table at once, and its engine (weights and KV blocks) is shut down when its
last request ends. A broken checkpoint is refused with a log line and a metric, and the
old version keeps serving.

Which aliases are followed: those named with `--model NAME[:ALIAS]`, or, by default,
the serving aliases (`latest`, `base`, `sft`, `rlhf`) of every model in the registry,
including models that appear after the server started. `NAME@VERSION` pins a version.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from gpt.adapter_store import is_adapter
from gpt.checkpoint import read_meta
from gpt.registry import LATEST, REWARD_STAGE, ModelRef, Registry
from server.models.manager import LoadedModel, ModelManager
from server.models.registry_watcher import AliasChange, RegistryWatcher

log = logging.getLogger("sol.hotload")

SERVING_ALIASES = (LATEST, "base", "sft", "rlhf")


@dataclass
class HotLoadConfig:
    follow: list[str] = field(default_factory=list)   # refs from --model; empty = follow the registry
    follow_aliases: tuple[str, ...] = SERVING_ALIASES
    poll_interval_s: float = 2.0
    use_events: bool = True
    retire_timeout_s: float = 600.0   # a retired version's requests get this long to finish


@dataclass
class LoadOutcome:
    model: str
    version: int
    ok: bool
    seconds: float
    error: str = ""

    @property
    def ref(self) -> str:
        return f"{self.model}@{self.version}"


class HotLoader:
    def __init__(self, manager: ModelManager, registry: Registry, config: HotLoadConfig | None = None,
                 on_outcome: Callable[[LoadOutcome], None] | None = None) -> None:
        self.manager = manager
        self.registry = registry
        self.config = config or HotLoadConfig()
        self.on_outcome = on_outcome
        self._jobs: queue.Queue[tuple[Callable[[], object], Future] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        # Versions unloaded but not yet closed (their engine stopped, weights and KV pool
        # released); one stays listed until its close has returned.
        self._retiring: list[tuple[LoadedModel, float]] = []
        self._switching = 0          # switches under way (they may add to _retiring)
        self._retire_lock = threading.Lock()
        self._retired = threading.Condition(self._retire_lock)
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self.watcher = RegistryWatcher(registry, self._on_changes, self.config.poll_interval_s,
                                       self.config.use_events)
        self._pinned = {(r.name, r.version) for r in map(ModelRef.parse, self.config.follow)
                        if r.version is not None}
        self._followed = {(r.name, r.alias) for r in map(ModelRef.parse, self.config.follow) if r.alias}

    # --- what is followed ---------------------------------------------------------------------
    def follows(self, name: str, alias: str) -> bool:
        if self.config.follow:
            return (name, alias) in self._followed
        return alias in self.config.follow_aliases

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="sol-hotload", daemon=True)
        self._worker.start()
        self._reaper = threading.Thread(target=self._reap, name="sol-retire", daemon=True)
        self._reaper.start()
        self.watcher.start()
        # Catch up with whatever moved between the initial load and the watcher's first
        # snapshot, by reconciling every followed alias once.
        self.submit(self.reconcile)

    def stop(self) -> None:
        self.watcher.stop()
        self._stop.set()
        self._jobs.put(None)
        with self._retired:
            self._retired.notify_all()
        for t in (self._worker, self._reaper):
            if t is not None:
                t.join(timeout=10)

    def submit(self, job: Callable[[], object]) -> Future:
        """Run `job` on the hot-load worker (loads are serialised: one at a time)."""
        future: Future = Future()
        self._jobs.put((job, future))
        return future

    # The worker and reaper loops hand each turn to a method, so nothing a turn touched
    # (a loaded or retired version, its weights and KV pool) outlives the turn in a frame.
    def _work(self) -> None:
        while self._run_next_job():
            pass

    def _run_next_job(self) -> bool:
        item = self._jobs.get()
        if item is None:
            return False
        job, future = item
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(job())
            except BaseException as err:  # reported through the future and the log
                future.set_exception(err)
        return True

    # --- reacting to the registry -----------------------------------------------------------
    def _on_changes(self, changes: list[AliasChange]) -> None:
        for change in changes:
            if change.new_version is not None and self.follows(change.model, change.alias):
                log.info("registry: %s:%s moved %s -> %s", change.model, change.alias,
                         change.old_version, change.new_version)
                self.submit(lambda c=change: self.switch(c.model, c.alias, c.new_version))

    def reconcile(self) -> None:
        for name in self.registry.models():
            for alias, version in self.registry.aliases(name).items():
                if self.follows(name, alias):
                    self.switch(name, alias, version)

    def switch(self, name: str, alias: str, version: int) -> LoadOutcome:
        """Make `name:alias` serve `version`: load (verify + warm) if needed, move the
        alias, retire what nothing points to any more. Runs on the worker thread."""
        with self._retired:
            self._switching += 1
        try:
            return self._switch(name, alias, version)
        finally:
            with self._retired:
                self._switching -= 1
                self._retired.notify_all()

    def _switch(self, name: str, alias: str, version: int) -> LoadOutcome:
        ref = f"{name}@{version}"
        if self._is_reward_model(name, version):
            return LoadOutcome(name, version, ok=False, seconds=0.0, error="reward models are not served")
        if is_adapter(self.registry.version_dir(name, version)):
            # An adapter is served over its base model's engine, not as a model of its own.
            return LoadOutcome(name, version, ok=False, seconds=0.0, error="adapters are not loaded as models")
        started = time.monotonic()
        try:
            if not self.manager.is_loaded(name, version):
                # At most two versions of a model in memory: the one serving and the one
                # loading. Older ones still finishing their requests go first.
                self._wait_until(lambda: not self._retiring_of(name), self.config.retire_timeout_s)
                self.manager.load(ref)
            self.manager.set_alias(name, alias, version)
        except Exception as err:  # a broken checkpoint must never take serving down
            outcome = LoadOutcome(name, version, ok=False, seconds=time.monotonic() - started, error=str(err))
            log.error("refused %s for %s:%s, old version keeps serving: %s", ref, name, alias, err)
        else:
            outcome = LoadOutcome(name, version, ok=True, seconds=time.monotonic() - started)
            log.info("%s:%s now serves %s (%.2fs)", name, alias, ref, outcome.seconds)
        self.retire_unreferenced(name)
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    def _is_reward_model(self, name: str, version: int) -> bool:
        try:
            return read_meta(self.registry.version_dir(name, version)).get("stage") == REWARD_STAGE
        except ValueError:
            return False  # unreadable meta: let the verified load refuse it with its own message

    # --- retiring old versions --------------------------------------------------------------
    def retire_unreferenced(self, name: str) -> list[LoadedModel]:
        retired = []
        for model in self.manager.models():
            if model.name != name or (name, model.version) in self._pinned:
                continue
            if not self.manager.aliases_of(model) and self._has_other_version(model):
                unloaded = self.manager.unload(name, model.version)
                if unloaded is not None:
                    retired.append(unloaded)
        self.retire(retired)
        return retired

    def retire(self, models: list[LoadedModel]) -> None:
        """Close these (already unloaded) versions once their running requests end."""
        if not models:
            return
        for model in models:
            log.info("retiring %s once its %d running request(s) end", model.ref, model.in_flight)
        with self._retired:
            self._retiring.extend((m, time.monotonic()) for m in models)
            self._retired.notify_all()

    def _has_other_version(self, model: LoadedModel) -> bool:
        return any(m.name == model.name and m.version != model.version for m in self.manager.models())

    def _reap(self) -> None:
        """Shut engines down once their last request has ended (or after the timeout)."""
        while not self._stop.is_set():
            self._close_drained()

    def _close_drained(self) -> None:
        with self._retired:
            # Poll in-flight counts briskly only while something is retiring.
            self._retired.wait(timeout=0.05 if self._retiring else 1.0)
            now = time.monotonic()
            done = [(m, t) for m, t in self._retiring
                    if m.in_flight == 0 or now - t > self.config.retire_timeout_s]
        if not done:
            return
        for model, _ in done:
            try:
                model.close()
            except Exception:  # the reaper must outlive one bad shutdown, and the list must drain
                log.exception("closing retired %s failed", model.ref)
            else:
                log.info("retired %s: engine stopped, weights and KV blocks released", model.ref)
        # Only now, with the pools given back to the KV budget, do they stop counting as
        # retiring: a waiter may load the next version into the room they held.
        with self._retired:
            self._retiring = [item for item in self._retiring if item not in done]
            self._retired.notify_all()

    def _retiring_of(self, name: str | None) -> bool:
        return any(name is None or m.name == name for m, _ in self._retiring)

    def _wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        with self._retired:
            return self._retired.wait_for(done, timeout=timeout_s)

    def wait_retired(self, timeout_s: float = 30.0, name: str | None = None) -> bool:
        """Wait until no switch is under way and no version (of `name`, or of any model)
        is still retiring: every retired engine has stopped and released its weights and
        KV pool."""
        return self._wait_until(lambda: self._switching == 0 and not self._retiring_of(name), timeout_s)
