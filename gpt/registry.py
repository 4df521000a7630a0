"""The model registry: `<root>/<model>/<version>/` checkpoints plus alias pointers.

Publishing writes a checkpoint into a hidden temporary directory beside its final place
and renames it in, so a reader (the server's watcher) never sees half a checkpoint.
Aliases (`base`, `sft`, `rm`, `rlhf`, `latest`, ...) are small files replaced atomically.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.checkpoint import fsync_dir, read_meta
from gpt.quoting import quote

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# Versions are ASCII digits (str.isdigit and int() also take '²' or '١', and int() of
# 5,000 digits raises), within the API's int32 version fields.
VERSION_RE = re.compile(r"[0-9]{1,10}")
MAX_VERSION = 2**31 - 1
ALIASES_DIR = "aliases"
LATEST = "latest"
REWARD_STAGE = "rm"


class RegistryError(ValueError):
    """Bad model reference or registry operation."""


class ModelNotFound(RegistryError, LookupError):
    """The model, alias or version does not exist."""


def default_home() -> Path:
    return Path(os.environ.get("SOL_HOME") or Path.home() / ".sol")


def default_registry_root() -> Path:
    return default_home() / "registry"


def parse_version(text: str) -> int | None:
    """`text` as a version number (1..MAX_VERSION, ASCII digits only), or None."""
    if not VERSION_RE.fullmatch(text):
        return None
    version = int(text)
    return version if 1 <= version <= MAX_VERSION else None


def validate_name(name: str, what: str = "model name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise RegistryError(f"invalid {what} {quote(name)}: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
                            "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class ModelRef:
    """`name` (= name:latest), `name:alias` or `name@version`."""

    name: str
    alias: str | None = None
    version: int | None = None

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        if not isinstance(ref, str) or not ref:
            raise RegistryError("empty model reference: use NAME, NAME:ALIAS or NAME@VERSION")
        if "@" in ref:
            name, _, text = ref.partition("@")
            version = parse_version(text)
            if version is None:
                raise RegistryError(f"invalid version in {quote(ref)}: use NAME@VERSION with a version number "
                                    f"of ASCII digits, 1 to {MAX_VERSION}")
            return cls(validate_name(name), version=version)
        name, sep, alias = ref.partition(":")
        return cls(validate_name(name), alias=validate_name(alias, "alias") if sep else LATEST)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version is not None else f"{self.name}:{self.alias}"


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    version: int
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class Registry:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root else default_registry_root()

    # --- paths ------------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(int(version))

    def _alias_file(self, name: str, alias: str) -> Path:
        return self.model_dir(name) / ALIASES_DIR / validate_name(alias, "alias")

    # --- reading ----------------------------------------------------------------------------
    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))

    def versions(self, name: str) -> list[int]:
        d = self.model_dir(name)
        if not d.is_dir():
            return []
        return sorted(v for p in d.iterdir() if p.is_dir() and (v := parse_version(p.name)) is not None)

    def aliases(self, name: str) -> dict[str, int]:
        d = self.model_dir(name) / ALIASES_DIR
        if not d.is_dir():
            return {}
        out = {}
        for p in sorted(d.iterdir()):
            if NAME_RE.fullmatch(p.name):
                version = parse_version(p.read_text(encoding="utf-8").strip())
                if version is not None:
                    out[p.name] = version
        return out

    def resolve(self, ref: str | ModelRef) -> ResolvedModel:
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        if not self.model_dir(ref.name).is_dir():
            known = ", ".join(self.models()) or "none"
            raise ModelNotFound(f"model {quote(ref.name)} not found in {self.root} (known models: {known})")
        version = ref.version
        if version is None:
            aliases = self.aliases(ref.name)
            if ref.alias not in aliases:
                raise ModelNotFound(f"alias {quote(ref.alias)} of model {quote(ref.name)} not found "
                                    f"(known aliases: {', '.join(sorted(aliases)) or 'none'})")
            version = aliases[ref.alias]
        path = self.version_dir(ref.name, version)
        if not path.is_dir():
            raise ModelNotFound(f"version {version} of model {quote(ref.name)} not found "
                                f"(versions: {self.versions(ref.name) or 'none'})")
        return ResolvedModel(ref.name, version, path)

    def describe(self, name: str) -> dict[str, Any]:
        aliases = self.aliases(name)
        versions = []
        for v in self.versions(name):
            try:
                meta = read_meta(self.version_dir(name, v))
            except ValueError as err:
                meta = {"error": str(err)}
            meta.pop("files", None)
            versions.append({"version": v, "aliases": sorted(a for a, av in aliases.items() if av == v), **meta})
        return {"name": name, "aliases": aliases, "versions": versions}

    # --- writing ----------------------------------------------------------------------------
    def publish(self, name: str, write: Callable[[Path], Any], aliases: tuple[str, ...] = (),
                move_latest: bool = True) -> ResolvedModel:
        """`write(tmp_dir)` fills a fresh directory; it is renamed into the next version
        and `aliases` (plus `latest`, unless `move_latest` is off) are pointed at it."""
        model_dir = self.model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        for alias in aliases:
            validate_name(alias, "alias")
        tmp = model_dir / f".tmp-{uuid.uuid4().hex}"
        try:
            write(tmp)
            fsync_dir(tmp)
            version = max(self.versions(name), default=0) + 1
            while True:
                try:
                    # Renaming onto an existing (non-empty) version fails: a concurrent
                    # publisher took that number, so take the next one.
                    os.rename(tmp, model_dir / str(version))
                    break
                except OSError:
                    if not (model_dir / str(version)).exists():
                        raise
                    version += 1
            fsync_dir(model_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        for alias in (*aliases, LATEST) if move_latest else aliases:
            self.set_alias(name, alias, version)
        return ResolvedModel(name, version, model_dir / str(version))

    def set_alias(self, name: str, alias: str, version: int) -> None:
        if not self.version_dir(name, version).is_dir():
            raise ModelNotFound(f"version {version} of model {quote(name)} not found")
        target = self._alias_file(name, alias)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{alias}.{uuid.uuid4().hex}"
        tmp.write_text(f"{int(version)}\n", encoding="utf-8")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def gc(self, name: str, keep_last: int = 3) -> list[int]:
        """Delete versions that no alias points to, keeping the `keep_last` newest."""
        pinned = set(self.aliases(name).values())
        versions = self.versions(name)
        recent = set(versions[-keep_last:]) if keep_last > 0 else set()
        removed = [v for v in versions if v not in pinned and v not in recent]
        for v in removed:
            shutil.rmtree(self.version_dir(name, v))
        return removed


def publish_checkpoint(registry: Registry, name: str, model, tokenizer, meta: dict[str, Any],
                       aliases: tuple[str, ...] = (), heads=None) -> ResolvedModel:
    """Write a verified checkpoint of `model` as the next version of `name`. `latest`
    names the newest servable model, so a reward model (stage "rm", a scoring head
    rather than a chat model) keeps its own aliases and does not move it."""
    from gpt.checkpoint import write_checkpoint

    meta = {"name": name, **meta}
    return registry.publish(name, lambda tmp: write_checkpoint(tmp, model, tokenizer, meta, heads), aliases,
                            move_latest=meta.get("stage") != REWARD_STAGE)
