"""The model manager: which model versions this server has loaded, one Engine each, and
how a request's model reference (`name`, `name:alias`, `name@version`) maps to one.

References are resolved against the manager's own alias table, a snapshot of the
registry's aliases taken when versions load, so a request never reads the filesystem
and never lands on a version that is not loaded and warmed. Hot-load extends this by
loading new versions, moving aliases (`set_alias`) and retiring old versions once their
last request ends (`LoadedModel.in_flight`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt.adapter_store import adapter_base, is_adapter
from gpt.chat import chat_stop_ids
from gpt.checkpoint import HEADS_FILE, Checkpoint, CheckpointError, load_checkpoint, read_config
from gpt.config import ModelConfig
from gpt.quoting import quote
from gpt.registry import LATEST, ModelNotFound, ModelRef, Registry
from gpt.tokenizers.base import Tokenizer
from server.engine.adapter_slots import AdapterRef
from server.engine.api import EngineRequest, EngineStats, RequestFinished, ResponseFormat, SamplingParams
from server.engine.config import EngineConfig, kv_pool_blocks, resolve_device_dtype
from server.engine.engine import Engine
from server.engine.grammar import CompiledGrammar, GrammarCompiler
from server.engine.kv_cache import kv_bytes_per_block
from server.engine.offline import build_engine
from server.engine.output import TokenTexts
from server.models.adapters import AdapterCache, AdapterNotServed
from server.models.kv_budget import KVBudget
from server.models.sanity import LoadPlan, SanityLimits, check_config, check_forward, check_weights

log = logging.getLogger("sol.models")

EngineFactory = Callable[[Checkpoint], Engine]


@dataclass
class LoadedModel:
    name: str
    version: int
    path: Path
    tokenizer: Tokenizer
    engine: Engine
    meta: dict[str, Any]
    max_context: int
    vocab_size: int
    num_parameters: int
    loaded_at: str
    stop_ids: list[int]
    texts: TokenTexts                        # token text cache for the output processors
    in_flight: int = 0
    kv_reserved: int = 0                     # bytes held in the server's KV budget
    budget: KVBudget | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _grammars: GrammarCompiler | None = field(default=None, repr=False)
    # Its own lock: building the compiler takes a while, and _lock is taken on the event loop.
    _grammars_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def stage(self) -> str:
        return str(self.meta.get("stage", ""))

    @property
    def parent(self) -> str:
        return str(self.meta.get("parent", "") or "")

    def grammars(self) -> GrammarCompiler:
        """The structured-output compiler for this version's vocabulary (with its cache),
        made on first need: call it off the event loop, like its compile()."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler.for_tokenizer(self.tokenizer, self.vocab_size)
            return self._grammars

    def cached_grammar(self, fmt: ResponseFormat) -> CompiledGrammar | None:
        """`fmt` compiled, if this version's cache has it (cheap: fine on the event loop)."""
        compiler = self._grammars
        return compiler.cached(fmt) if compiler is not None else None

    def acquire(self) -> None:
        with self._lock:
            self.in_flight += 1

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the engine and give its KV pool back to the budget (once)."""
        self.engine.shutdown(timeout_s)
        with self._lock:
            reserved, self.kv_reserved = self.kv_reserved, 0
        if self.budget is not None and reserved:
            self.budget.release(reserved)


class EngineBuilder:
    """Makes one Engine per model version, and says beforehand how much KV memory it
    will allocate, so the manager can reserve it in the server's budget first."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()

    def pool_bytes(self, model_config: ModelConfig) -> int:
        _, dtype = resolve_device_dtype(self.config)
        per_block = kv_bytes_per_block(model_config, self.config.block_size, dtype)
        return kv_pool_blocks(model_config, self.config, dtype) * per_block

    @property
    def load_dtype(self) -> torch.dtype | None:
        """The dtype a checkpoint is read in: --dtype where given (converted tensor by
        tensor on the way in, never a full copy in another dtype), else the one it is
        stored in (None)."""
        return self.config.dtype

    def serving_config(self, ckpt: Checkpoint) -> EngineConfig:
        """The engine's config for this checkpoint: without --dtype a bf16 checkpoint
        serves in bf16 as it is stored (no fp32 copy of it); any other one in the device's
        default (fp32 on the CPU, bf16 on CUDA)."""
        if self.config.dtype is not None:
            return self.config
        stored = next(ckpt.model.parameters()).dtype
        _, default = resolve_device_dtype(self.config)
        return dataclasses.replace(self.config, dtype=torch.bfloat16 if stored == torch.bfloat16 else default)

    def __call__(self, ckpt: Checkpoint, kv_cache_bytes: int | None = None) -> Engine:
        config = self.serving_config(ckpt)
        if kv_cache_bytes is not None:
            # The pool is exactly what the budget reserved for this version.
            config = dataclasses.replace(config, kv_cache_bytes=kv_cache_bytes, num_blocks=None)
        return build_engine(ckpt.model, config)


def warmup_ids(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode_prompt("Hello") or tokenizer.eos_ids[:1]


def warm_up(engine: Engine, tokenizer: Tokenizer, timeout_s: float = 120.0) -> None:
    """One short generation through the whole engine path, so the first real request
    does not pay for lazy initialisation (and a broken model is caught before serving)."""
    stream = engine.submit(EngineRequest(request_id=f"warmup-{time.monotonic_ns()}",
                                         prompt_ids=warmup_ids(tokenizer),
                                         params=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            event = stream.get(timeout=1.0)
        except StopIteration:
            return
        if isinstance(event, RequestFinished):
            return
    stream.abort()
    raise RuntimeError("warm-up generation did not finish in time")


class ModelManager:
    def __init__(self, registry: Registry, engine_factory: EngineFactory, warmup: bool = True,
                 kv_budget: KVBudget | None = None, kv_wait_s: float = 120.0,
                 limits: SanityLimits | None = None, max_cpu_loras: int = 8) -> None:
        self.registry = registry
        self.limits = limits or SanityLimits()
        self.adapters = AdapterCache(registry, max_cpu_loras)
        self.engine_factory = engine_factory
        self.warmup = warmup
        self.kv_budget = kv_budget
        self.kv_wait_s = kv_wait_s
        self._lock = threading.RLock()
        self._loaded: dict[tuple[str, int], LoadedModel] = {}
        self._aliases: dict[str, dict[str, int]] = {}     # name -> alias -> version
        self.on_change: list[Callable[[], None]] = []      # metrics, readiness

    # --- loading (blocking; call from a worker thread) ------------------------------------
    def load(self, ref: str) -> LoadedModel:
        """Resolve `ref` in the registry, verify, load, warm, and make it servable. The
        registry's aliases for that model that point at loaded versions become ours."""
        resolved = self.registry.resolve(ref)
        with self._lock:
            existing = self._loaded.get((resolved.name, resolved.version))
        if existing is None:
            # config.json's sizes are checked before anything is allocated for them (a
            # config that cannot be read is left to load_checkpoint to report, after its
            # checksums).
            try:
                model_config = read_config(resolved.path)
            except (CheckpointError, OSError):
                model_config = None
            if model_config is not None:
                check_config(model_config, resolved.path, self._plan(model_config), self.limits)
            # Loaded on the CPU in the dtype it will serve in where the factory says so
            # (an EngineBuilder: --dtype, else as stored), else in fp32; the engine moves
            # it to its device (and dtype, where they still differ).
            ckpt = load_checkpoint(resolved.path, device="cpu",
                                   dtype=getattr(self.engine_factory, "load_dtype", torch.float32))
            check_weights(ckpt.model.state_dict(), resolved.path)
            check_weights(ckpt.heads, resolved.path, HEADS_FILE)
            # Reserve the KV pool before allocating it: a load waits for retiring versions
            # to give theirs back rather than over-commit memory.
            reserved = 0
            if self.kv_budget is not None:
                sizing = getattr(self.engine_factory, "pool_bytes", None)
                wanted = sizing(ckpt.config) if sizing else self.kv_budget.per_model_bytes
                reserved = self.kv_budget.reserve(wanted, self.kv_wait_s)
            engine = None
            try:
                engine = self.engine_factory(ckpt, reserved) if reserved else self.engine_factory(ckpt)
                # The model as it serves (device, dtype): bf16 overflow shows here.
                check_forward(engine.model, warmup_ids(ckpt.tokenizer), resolved.path)
                if self.warmup:
                    warm_up(engine, ckpt.tokenizer)
            except BaseException:
                if engine is not None:
                    engine.shutdown()
                if reserved:
                    self.kv_budget.release(reserved)
                raise
            existing = LoadedModel(
                name=resolved.name, version=resolved.version, path=resolved.path, tokenizer=ckpt.tokenizer,
                engine=engine, meta=ckpt.meta, max_context=ckpt.config.max_seq_len,
                vocab_size=ckpt.config.vocab_size,
                num_parameters=ckpt.config.num_parameters(),
                loaded_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                stop_ids=chat_stop_ids(ckpt.tokenizer),
                texts=TokenTexts.for_tokenizer(ckpt.tokenizer), kv_reserved=reserved, budget=self.kv_budget)
            with self._lock:
                self._loaded[(resolved.name, resolved.version)] = existing
            log.info("loaded %s from %s", existing.ref, resolved.path)
        self.sync_aliases(resolved.name)
        with self._lock:
            # The reference asked for serves this version even if the registry moved on.
            parsed = ModelRef.parse(ref)
            if parsed.alias is not None:
                self._aliases.setdefault(resolved.name, {})[parsed.alias] = resolved.version
        self._changed()
        return existing

    def _plan(self, model_config: ModelConfig) -> LoadPlan | None:
        """Where the engine factory will put a version and the KV pool it will reserve,
        for the sanity check of its config; None for a factory that does not say."""
        engine_config = getattr(self.engine_factory, "config", None)
        sizing = getattr(self.engine_factory, "pool_bytes", None)
        if not isinstance(engine_config, EngineConfig) or sizing is None:
            return None
        device, dtype = resolve_device_dtype(engine_config)
        pool = sizing(model_config)
        limit = None
        if self.kv_budget is not None:
            limit = self.kv_budget.per_model_bytes
            pool = min(pool, limit)
        return LoadPlan(device, dtype, pool, limit)

    def load_default(self, refs: list[str]) -> list[LoadedModel]:
        """`refs`, or every model's latest in the registry when none are given."""
        refs = refs or [f"{name}:{LATEST}" for name in self.registry.models()
                        if LATEST in (aliases := self.registry.aliases(name))
                        and not is_adapter(self.registry.version_dir(name, aliases[LATEST]))]
        return [self.load(r) for r in refs]

    def sync_aliases(self, name: str) -> None:
        """Adopt the registry's aliases of `name` that point at loaded versions."""
        registry_aliases = self.registry.aliases(name)
        with self._lock:
            table = self._aliases.setdefault(name, {})
            for alias, version in registry_aliases.items():
                if (name, version) in self._loaded:
                    table[alias] = version

    def set_alias(self, name: str, alias: str, version: int) -> None:
        with self._lock:
            if (name, version) not in self._loaded:
                raise ModelNotFound(f"{name}@{version} is not loaded on this server")
            self._aliases.setdefault(name, {})[alias] = version
        self._changed()

    def unload(self, name: str, version: int) -> LoadedModel | None:
        """Stop routing to a version; its engine shuts down once its requests end."""
        with self._lock:
            model = self._loaded.pop((name, version), None)
            table = self._aliases.get(name, {})
            for alias in [a for a, v in table.items() if v == version]:
                del table[alias]
        if model is not None:
            self._changed()
        return model

    # --- serving (any thread, cheap) --------------------------------------------------------
    def resolve(self, ref: str) -> LoadedModel:
        """The loaded version a reference names. Raises ModelNotFound (or RegistryError
        for a malformed reference) with the loaded choices in the message."""
        parsed = ModelRef.parse(ref)
        with self._lock:
            if parsed.version is not None:
                model = self._loaded.get((parsed.name, parsed.version))
            else:
                version = self._aliases.get(parsed.name, {}).get(parsed.alias or LATEST)
                if version is None and parsed.alias == LATEST:
                    # A model loaded by version only: its newest loaded version is its latest here.
                    versions = [v for (n, v) in self._loaded if n == parsed.name]
                    version = max(versions) if versions else None
                model = self._loaded.get((parsed.name, version)) if version is not None else None
            if model is None:
                raise ModelNotFound(f"model {quote(ref)} is not served here; available: {self._available()}")
            return model

    def _available(self) -> str:
        names = []
        for (name, version) in sorted(self._loaded):
            aliases = sorted(a for a, v in self._aliases.get(name, {}).items() if v == version)
            names.append(f"{name}@{version}" + (f" ({', '.join(name + ':' + a for a in aliases)})" if aliases else ""))
        return ", ".join(names) or "none (no model is loaded yet)"

    def checkout(self, ref: str) -> LoadedModel:
        """Resolve `ref` and count a request in flight on it, atomically: a version that
        hot-load retires can never be handed out after its last request was counted.
        The caller must `release()` it when the request ends."""
        with self._lock:
            model = self.resolve(ref)
            model.acquire()
            return model

    def checkout_served(self, ref: str) -> tuple[LoadedModel, AdapterRef | None]:
        """`checkout`, or for a reference that names a LoRA adapter entry: its loaded base,
        checked out, with the adapter. ModelNotFound when neither is served; AdapterError
        when the adapter cannot be served (corrupt, made for other weights, rank too high)."""
        try:
            return self.checkout(ref), None
        except ModelNotFound as not_served:
            missing = not_served

        def base_config(base_ref: str) -> ModelConfig:
            try:
                return self.resolve(base_ref).engine.model.config
            except ModelNotFound:
                raise ModelNotFound(f"adapter {quote(ref)} runs on {base_ref}, which is not served here; "
                                    f"available: {self._available()}") from None

        try:
            adapter, base_ref = self.adapters.lookup(ref, base_config, self._max_lora_rank())
        except AdapterNotServed:
            raise missing from None
        return self.checkout(base_ref), adapter

    def served_adapters(self) -> list[tuple[str, int, LoadedModel]]:
        """(name, latest version, loaded base) of every adapter entry in the registry whose
        base version is served here (for ListModels and /v1/models)."""
        out = []
        for name in self.registry.models():
            version = self.registry.aliases(name).get(LATEST)
            if version is None:
                continue
            directory = self.registry.version_dir(name, version)
            if not is_adapter(directory):
                continue
            try:
                out.append((name, version, self.resolve(adapter_base(directory))))
            except (ModelNotFound, ValueError):
                continue          # its base is not served here (or its meta is unreadable)
        return out

    def _max_lora_rank(self) -> int | None:
        config = getattr(self.engine_factory, "config", None)
        return getattr(config, "max_lora_rank", None)

    def is_loaded(self, name: str, version: int) -> bool:
        with self._lock:
            return (name, version) in self._loaded

    def models(self) -> list[LoadedModel]:
        with self._lock:
            return [self._loaded[k] for k in sorted(self._loaded)]

    def aliases_of(self, model: LoadedModel) -> list[str]:
        with self._lock:
            return sorted(a for a, v in self._aliases.get(model.name, {}).items() if v == model.version)

    def stats(self, top_tenants: int = 0) -> list[tuple[str, int, EngineStats]]:
        """Each loaded version's engine counts, with its `top_tenants` busiest tenants."""
        return [(m.name, m.version, m.engine.stats(top_tenants)) for m in self.models()]

    @property
    def ready(self) -> bool:
        with self._lock:
            return bool(self._loaded)

    def _changed(self) -> None:
        for callback in list(self.on_change):
            try:
                callback()
            except Exception:  # noqa: BLE001 - a metrics hook must not break loading
                log.exception("model change callback failed")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            models = list(self._loaded.values())
            self._loaded.clear()
            self._aliases.clear()
        for m in models:
            m.close(timeout_s)
