"""A Hugging Face checkpoint's tokenizer settings, from the files transformers saves
beside tokenizer.json: tokenizer_config.json, special_tokens_map.json,
generation_config.json and chat_template.jinja.

Read as transformers reads them: a token is a string or an AddedToken-shaped dict
(`{"content": ...}`); `generation_config.json`'s `eos_token_id` may be a list of stop ids;
`chat_template` is a string or a list of named templates (the one named "default" is
used); `chat_template.jinja`, where present, is the template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.tokenizers.base import TokenizerError

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
HF_TOKENIZER_FILES = (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, GENERATION_CONFIG_FILE, CHAT_TEMPLATE_FILE)


@dataclass(frozen=True)
class HFTokenizerSettings:
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    # add_bos_token / add_eos_token when tokenizer_config.json sets either; they are used
    # only where tokenizer.json has no post-processor (gpt/tokenizers/hf.py encode_prompt).
    add_bos_eos: tuple[bool, bool] | None = None
    generation_eos_ids: list[int] = field(default_factory=list)
    generation_bos_id: int | None = None
    chat_template: str | None = None
    chat_template_origin: str = ""           # the file it came from, for error messages

    def template_tokens(self) -> dict[str, str]:
        """The special tokens a chat template reads by name (bos_token, eos_token, ...)."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                 "unk_token": self.unk_token}
        return {k: v for k, v in names.items() if v is not None}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise TokenizerError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _token(value: Any, path: Path, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: {name} must be a string or {{\"content\": ...}}, not {value!r:.60}")


def _ids(value: Any, path: Path, name: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{path}: {name} must be a token id or a list of token ids, not {value!r:.60}")
    return list(values)


def _template(directory: Path, config: dict[str, Any]) -> tuple[str | None, str]:
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    origin = str(directory / TOKENIZER_CONFIG_FILE)
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template, origin
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"], origin + " (chat_template 'default')"
        raise TokenizerError(f"{origin}: chat_template lists templates {sorted(map(str, named))} but none named "
                             "'default'")
    raise TokenizerError(f"{origin}: chat_template must be a string or a list of named templates")


def read_settings(directory: Path) -> HFTokenizerSettings:
    """The settings files in `directory` (each optional); TokenizerError names a bad one."""
    directory = Path(directory)
    config_path = directory / TOKENIZER_CONFIG_FILE
    config = _read_json(config_path)
    special_path = directory / SPECIAL_TOKENS_MAP_FILE
    special_map = _read_json(special_path)
    generation_path = directory / GENERATION_CONFIG_FILE
    generation = _read_json(generation_path)

    def token(name: str) -> str | None:
        # tokenizer_config.json wins (transformers lets its kwargs override the map).
        if name in config:
            return _token(config[name], config_path, name)
        return _token(special_map.get(name), special_path, name)

    flags = None
    if "add_bos_token" in config or "add_eos_token" in config:
        flags = (bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False)))
    template, origin = _template(directory, config)
    bos_ids = _ids(generation.get("bos_token_id"), generation_path, "bos_token_id")
    return HFTokenizerSettings(
        bos_token=token("bos_token"), eos_token=token("eos_token"), pad_token=token("pad_token"),
        unk_token=token("unk_token"), add_bos_eos=flags,
        generation_eos_ids=_ids(generation.get("eos_token_id"), generation_path, "eos_token_id"),
        generation_bos_id=bos_ids[0] if bos_ids else None,
        chat_template=template, chat_template_origin=origin)
