"""Request parameters, derived from the proto: the library's keyword arguments and the
CLI's flags both come from the fields of `sol.v1.SamplingParams`, so a field added to
the .proto (and its regenerated stubs) needs no change here or in the CLI.

Field shapes map to flags as follows: a scalar `top_p` -> `--top-p VALUE`; a bool
`ignore_eos` -> `--ignore-eos` / `--no-ignore-eos`; a repeated `stop` -> `--stop VALUE`
(repeatable); a map `logit_bias` -> `--logit-bias KEY=VALUE` (repeatable); an enum takes
its value names. Message-typed fields have no flag (the library takes them as dicts).

One convenience sits on top, for structured outputs (`response_format`, a message): the
library takes `json_schema=` (a dict or JSON text), `regex=`, `grammar=` or
`json_object=True` (with `strict=`), and the CLI `--json-schema FILE`, `--regex`,
`--grammar FILE`, `--json-object`, `--strict`."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from proto.sol.v1 import sol_pb2 as pb

SCALAR, REPEATED, MAP = "scalar", "repeated", "map"

# Python types of protobuf's C++ value kinds; enum values are given by name.
_PY_TYPES: dict[int, type] = {
    FieldDescriptor.CPPTYPE_INT32: int, FieldDescriptor.CPPTYPE_INT64: int,
    FieldDescriptor.CPPTYPE_UINT32: int, FieldDescriptor.CPPTYPE_UINT64: int,
    FieldDescriptor.CPPTYPE_DOUBLE: float, FieldDescriptor.CPPTYPE_FLOAT: float,
    FieldDescriptor.CPPTYPE_BOOL: bool, FieldDescriptor.CPPTYPE_STRING: str,
    FieldDescriptor.CPPTYPE_ENUM: str,
}


@dataclass(frozen=True)
class Param:
    """One field of a parameters message, as the client and CLI see it."""

    name: str
    shape: str                          # SCALAR, REPEATED or MAP
    value_type: type | None             # None: a message, which has no flag
    key_type: type | None = None        # map fields only
    choices: tuple[str, ...] = ()       # enum value names

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        # A namespace of its own, so a future field named like another CLI option
        # (model, timeout...) cannot silently overwrite it.
        return "param_" + self.name


def _value_type(field: FieldDescriptor) -> tuple[type | None, tuple[str, ...]]:
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        return str, tuple(v.name for v in field.enum_type.values)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return bytes, ()
    return _PY_TYPES.get(field.cpp_type), ()


@functools.cache     # per message type; build_message runs on every request
def describe(message: Descriptor) -> tuple[Param, ...]:
    """The parameters of a message type, in field order."""
    out = []
    for field in message.fields:
        entry = field.message_type
        if field.is_repeated and entry is not None and entry.GetOptions().map_entry:
            key_type, _ = _value_type(entry.fields_by_name["key"])
            value_type, choices = _value_type(entry.fields_by_name["value"])
            out.append(Param(field.name, MAP, value_type, key_type, choices))
            continue
        value_type, choices = _value_type(field)
        out.append(Param(field.name, REPEATED if field.is_repeated else SCALAR, value_type, None, choices))
    return tuple(out)


SAMPLING_PARAMS = describe(pb.SamplingParams.DESCRIPTOR)
SAMPLING_FIELDS = tuple(p.name for p in SAMPLING_PARAMS)


def build_message(cls: type[Message], params: Mapping[str, Any]) -> Message:
    """`cls(**params)` with None meaning "not set", and a clear error naming the valid
    parameters when one is unknown (protobuf's own message does not list them)."""
    known = {p.name: p for p in describe(cls.DESCRIPTOR)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise TypeError(f"unknown {cls.DESCRIPTOR.name} parameters {unknown}; use {sorted(known)}")
    values = {}
    for name, value in params.items():
        if value is None:
            continue
        if known[name].shape == REPEATED and isinstance(value, str | bytes):
            value = [value]          # stop="\n" means one stop string, not a list of characters
        values[name] = value
    return cls(**values)


# --- structured outputs ----------------------------------------------------------------------

FORMAT_OPTIONS = ("json_schema", "regex", "grammar", "json_object", "strict")


def response_format(json_schema: Mapping[str, Any] | str | None = None, regex: str | None = None,
                    grammar: str | None = None, json_object: bool = False, strict: bool | None = None,
                    name: str = "") -> dict[str, Any] | None:
    """The `response_format` of one of the shortcuts (at most one), as the message's dict;
    None when none is given."""
    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                            ("json_object", json_object or None)) if v is not None]
    if len(given) > 1:
        raise TypeError(f"give one response format, not {' and '.join(given)}")
    if strict is not None and json_schema is None:
        raise TypeError("strict applies to json_schema only")
    if json_schema is not None:
        schema = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        inner: dict[str, Any] = {"schema": schema, "name": name} if name else {"schema": schema}
        if strict is not None:
            inner["strict"] = strict
        return {"type": "json_schema", "json_schema": inner}
    if regex is not None:
        return {"type": "regex", "regex": regex}
    if grammar is not None:
        return {"type": "grammar", "grammar": grammar}
    return {"type": "json_object"} if json_object else None


def _format_message(fmt: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's response_format dict with its schema as an object is accepted too: the
    message holds the schema as JSON text."""
    fmt = dict(fmt)
    inner = fmt.get("json_schema")
    if isinstance(inner, Mapping) and not isinstance(inner.get("schema", ""), str):
        fmt["json_schema"] = {**inner, "schema": json.dumps(inner["schema"])}
    return fmt


def sampling_pb(params: Mapping[str, Any]) -> pb.SamplingParams:
    params = dict(params)
    shortcuts = {k: params.pop(k) for k in FORMAT_OPTIONS if k in params}
    shortcut = response_format(**shortcuts) if shortcuts else None
    if shortcut is not None:
        if params.get("response_format") is not None:
            raise TypeError("give response_format or one of json_schema/regex/grammar/json_object, not both")
        params["response_format"] = shortcut
    if isinstance(params.get("response_format"), Mapping):
        params["response_format"] = _format_message(params["response_format"])
    return build_message(pb.SamplingParams, params)


# --- the command line ----------------------------------------------------------------------

def _converter(t: type | None, choices: tuple[str, ...]) -> Callable[[str], Any]:
    if choices:
        def enum_value(text: str) -> str:
            if text not in choices:
                raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
            return text
        return enum_value
    if t is bytes:
        return str.encode
    return t or str


def _pair(param: Param) -> Callable[[str], tuple[Any, Any]]:
    to_key = _converter(param.key_type, ())
    to_value = _converter(param.value_type, param.choices)

    def parse(text: str) -> tuple[Any, Any]:
        key, sep, value = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
        try:
            return to_key(key.strip()), to_value(value.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return parse


def _type_name(t: type | None, choices: tuple[str, ...]) -> str:
    return "|".join(choices) if choices else getattr(t, "__name__", "value")


def add_flags(parser: argparse.ArgumentParser, params: Iterable[Param] = SAMPLING_PARAMS,
              title: str = "sampling parameters (sol.v1.SamplingParams)") -> None:
    """One flag per parameter; unset flags stay None so the server's defaults apply."""
    group = parser.add_argument_group(title, "unset parameters take the server's defaults")
    for p in params:
        if p.value_type is None:
            continue
        if p.shape == MAP:
            key, value = _type_name(p.key_type, ()), _type_name(p.value_type, p.choices)
            group.add_argument(p.flag, dest=p.dest, action="append", type=_pair(p), default=None,
                               metavar=f"{key.upper()}={value.upper()}",
                               help=f"{p.name}: one {key} -> {value} entry (repeatable)")
        elif p.shape == REPEATED:
            group.add_argument(p.flag, dest=p.dest, action="append", type=_converter(p.value_type, p.choices),
                               default=None, metavar=_type_name(p.value_type, p.choices).upper(),
                               help=f"{p.name}: one {_type_name(p.value_type, p.choices)} (repeatable)")
        elif p.value_type is bool:
            group.add_argument(p.flag, dest=p.dest, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{p.name} on or off")
        else:
            group.add_argument(p.flag, dest=p.dest, type=_converter(p.value_type, p.choices), default=None,
                               metavar=_type_name(p.value_type, p.choices).upper(), help=p.name)


def from_args(args: argparse.Namespace, params: Iterable[Param] = SAMPLING_PARAMS) -> dict[str, Any]:
    """The parameters given on the command line, as keyword arguments for the client."""
    out: dict[str, Any] = {}
    for p in params:
        value = getattr(args, p.dest, None)
        if value is None:
            continue
        out[p.name] = dict(value) if p.shape == MAP else value
    out.update(_format_from_args(args))
    return out


def add_format_flags(parser: argparse.ArgumentParser) -> None:
    """--json-schema FILE / --regex / --grammar FILE / --json-object: the output's shape."""
    group = parser.add_argument_group("structured output (response_format)",
                                      "the answer is made to match; an answer cut by --max-tokens is incomplete")
    one = group.add_mutually_exclusive_group()
    one.add_argument("--json-schema", dest="format_json_schema", metavar="FILE",
                     help="a JSON Schema file ('-' reads stdin) the answer must satisfy")
    one.add_argument("--regex", dest="format_regex", metavar="PATTERN", help="a regular expression the whole "
                     "answer must match")
    one.add_argument("--grammar", dest="format_grammar", metavar="FILE", help="a Lark grammar file the answer "
                     "must follow")
    one.add_argument("--json-object", dest="format_json_object", action="store_true", default=None,
                     help="any JSON object")
    group.add_argument("--strict", dest="format_strict", action="store_true", default=None,
                       help="with --json-schema: objects take no properties the schema does not name")


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _format_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if not hasattr(args, "format_json_schema"):
        return {}
    out: dict[str, Any] = {}
    if args.format_json_schema is not None:
        text = _read(args.format_json_schema)
        try:
            json.loads(text)
        except ValueError as err:
            raise ValueError(f"--json-schema {args.format_json_schema}: not JSON ({err})") from None
        out["json_schema"] = text
        if args.format_strict:
            out["strict"] = True
    elif args.format_strict:
        raise ValueError("--strict goes with --json-schema")
    if args.format_regex is not None:
        out["regex"] = args.format_regex
    if args.format_grammar is not None:
        out["grammar"] = _read(args.format_grammar)
    if args.format_json_object:
        out["json_object"] = True
    return out
