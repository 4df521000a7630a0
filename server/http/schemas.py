"""Request bodies of the OpenAI-compatible API, as Pydantic models: FastAPI validates
types with them and they make /openapi.json.

The sampling fields are not written here: `SamplingFields` is generated from the engine's
`SamplingParams` (its names, types, documentation and ranges), with the wire widths of
the API's `sol.v1.SamplingParams` message (int32 or int64), so both protocols reach the
same checks with the same values and a parameter added to the dataclass and the proto is
on the HTTP API too. Limits are enforced once, by `SamplingParams.validate`; the ranges
only appear in the field descriptions. Written by hand are OpenAI's own shapes where they
differ from the engine's (`stop` as a string or a list, `logit_bias` with string keys,
`response_format`, and `logprobs`, which each endpoint spells its own way) and the
fields that are not sampling (`model`, `stream`, `user`...).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Annotated, Any, Literal

from google.protobuf.descriptor import FieldDescriptor
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from gpt.chat import Message
from gpt.quoting import quote
from proto.sol.v1 import sol_pb2 as pb
from server.engine.api import MAX_LOGPROBS, JsonSchema, ResponseFormat, SamplingParams
from server.errors import invalid
from server.tools import Tool, ToolRequest, tool_request

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]

# OpenAI's newer "developer" role is what older models call "system".
ROLE_ALIASES = {"developer": "system"}


def _utf8(value: str, what: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that are no Unicode text; protobuf cannot,
    so refuse them here rather than let the tokenizer fail on them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None
    return value


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send fields of
    # newer API versions); NaN and Infinity are not numbers a sampler can use.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


class TextPart(_Body):
    type: Literal["text"] = "text"
    text: str


class FunctionCallBody(_Body):
    name: str
    arguments: str = Field(default="{}", description="the arguments object as JSON text")


class ToolCallBody(_Body):
    id: str = Field(default="", description="the call's id, which the tool message answering it names")
    type: Literal["function"] = "function"
    function: FunctionCallBody


class FunctionBody(_Body):
    name: str = Field(description="A-Z, a-z, 0-9, '_' and '-', up to 64")
    description: str = Field(default="", description="what the function does, for the model")
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON Schema of the arguments object")
    strict: bool | None = Field(default=None, description="accepted; a forced call (tool_choice required or "
                                                          "named) always follows the schema")


class ToolBody(_Body):
    type: Literal["function"] = "function"
    function: FunctionBody


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatMessage(_Body):
    role: str = Field(description="system, user, assistant or tool (developer = system)")
    content: str | list[TextPart] | None = Field(
        default=None, description="the text, or a list of text parts (joined); other modalities are not served")
    name: str | None = Field(default=None, description="accepted and ignored")
    tool_calls: list[ToolCallBody] | None = Field(default=None, description="an assistant message's tool calls")
    tool_call_id: str | None = Field(default=None, description="a tool message: the id of the call it answers")

    @field_validator("content")
    @classmethod
    def _content_utf8(cls, v):
        if isinstance(v, str):
            return _utf8(v, "content")
        for part in v or ():
            _utf8(part.text, "content")
        return v

    def message(self) -> Message:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        calls = tuple({"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                      for c in self.tool_calls or ())
        return Message(ROLE_ALIASES.get(self.role, self.role), content, calls, self.tool_call_id or "")


class JsonSchemaFormat(_Body):
    name: str = Field(default="", description="a name for the schema; letters, digits, '_' and '-'")
    schema_: dict[str, Any] | None = Field(default=None, alias="schema", description="the JSON Schema")
    strict: bool = Field(default=False, description="objects take no properties beyond those the schema names")


class ResponseFormatBody(_Body):
    """OpenAI's response_format, plus sol's (and vLLM-style) regex and grammar extensions."""

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"] = "text"
    json_schema: JsonSchemaFormat | None = Field(default=None, description="with type json_schema")
    regex: str | None = Field(default=None, description="sol extension, with type regex: the whole output matches")
    grammar: str | None = Field(default=None, description="sol extension, with type grammar: a Lark grammar")

    def engine_format(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_schema":
            if self.json_schema is None:
                raise invalid("response_format.json_schema is required with type json_schema",
                              "response_format.json_schema")
            return ResponseFormat("json_schema", JsonSchema(self.json_schema.name, self.json_schema.schema_ or {},
                                                            self.json_schema.strict))
        return ResponseFormat(self.type, regex=self.regex or "", grammar=self.grammar or "")


class StreamOptions(_Body):
    include_usage: bool = Field(default=False, description="end the stream with a chunk that carries usage (and "
                                                           "sol's cost) and an empty choices list")


# SamplingParams fields that OpenAI's body spells its own way (hand-written in _Sampling
# and the endpoints); every other field is generated under its own name.
OPENAI_SHAPED = frozenset({"stop", "logit_bias", "response_format", "logprobs"})
# OpenAI's own sampling names; the other generated fields are extensions (vLLM's names
# where vLLM has the parameter), said so in their descriptions.
OPENAI_NAMES = frozenset({"max_tokens", "temperature", "top_p", "n", "seed", "presence_penalty",
                          "frequency_penalty"})
_WIRE_INT = {FieldDescriptor.TYPE_INT32: Int32, FieldDescriptor.TYPE_INT64: Int64}


def _wire_type(name: str, hint: Any) -> Any:
    """The body's type for a SamplingParams field: its dataclass type, with integers as
    wide as the proto's field, and always optional (unset keeps the dataclass default)."""
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if isinstance(hint, types.UnionType) \
        else hint
    wire = pb.SamplingParams.DESCRIPTOR.fields_by_name[name]
    integer = _WIRE_INT.get(wire.type)
    if typing.get_origin(base) is list:
        base = list[integer] if integer is not None else base
    elif integer is not None:
        base = integer
    return base | None


def _description(f: dataclasses.Field) -> str:
    limits = f.metadata.get("range")
    text = f"{limits.text()}; {f.metadata['doc']}" if limits is not None else f.metadata["doc"]
    return text if f.name in OPENAI_NAMES else f"extension: {text}"


def _sampling_fields() -> type[_Body]:
    hints = typing.get_type_hints(SamplingParams)
    fields = {f.name: (_wire_type(f.name, hints[f.name]), Field(default=None, description=_description(f)))
              for f in dataclasses.fields(SamplingParams) if f.name not in OPENAI_SHAPED}
    return create_model("SamplingFields", __base__=_Body, **fields)


SamplingFields = _sampling_fields()
GENERATED = tuple(name for name in SamplingFields.model_fields)


class _Sampling(SamplingFields):
    """The sampling fields both endpoints share: the generated ones, then OpenAI's shapes."""

    model: str = Field(description="NAME (= NAME:latest), NAME:ALIAS or NAME@VERSION; GET /v1/models lists them")
    stream: bool = Field(default=False, description="answer as server-sent events ending with `data: [DONE]`")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None, description=_description(
        SamplingParams.__dataclass_fields__["stop"]).removeprefix("extension: "))
    logit_bias: dict[str, float] | None = Field(default=None, description="token id (as a string key) -> " + (
        SamplingParams.__dataclass_fields__["logit_bias"].metadata["doc"].removeprefix("token id -> ")))
    user: str | None = Field(default=None, description="your end user's id, for your records; not used by sol")
    response_format: ResponseFormatBody | None = Field(
        default=None, description="constrain the output: json_object, json_schema, or (sol) regex / grammar")
    priority: Int32 | None = Field(default=None, description="vLLM extension: order among your own requests when "
                                                             "the server is busy, lower first; default 0 (your "
                                                             "key's share against other keys is unchanged)")
    return_token_ids: bool = Field(default=False, description="vLLM extension: each stream chunk's choices carry "
                                                              "`token_ids`, the ids of the tokens they add")

    @field_validator("stop")
    @classmethod
    def _stop_utf8(cls, v):
        for s in [v] if isinstance(v, str) else v or ():
            _utf8(s, "stop")
        return v

    def sampling(self, logprobs: int) -> SamplingParams:
        """The engine's parameters; unset fields keep the dataclass defaults (an unset
        max_tokens stays None: the service resolves it against the context)."""
        values: dict[str, Any] = {name: getattr(self, name) for name in GENERATED if getattr(self, name) is not None}
        max_tokens = self.output_limit()
        if max_tokens is not None:
            values["max_tokens"] = max_tokens
        if self.stop is not None:
            values["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.logit_bias:
            values["logit_bias"] = token_bias(self.logit_bias)
        if self.response_format is not None:
            values["response_format"] = self.response_format.engine_format()
        if logprobs:
            values["logprobs"] = logprobs
        return SamplingParams(**values)

    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# A token id as a JSON object key: ASCII digits only (int() would also take '١', ' 7 ',
# '1_0' or 5,000 digits), a sign for the range check to refuse.
TOKEN_ID_KEY_RE = re.compile(r"-?[0-9]{1,10}")


def token_bias(bias: dict[str, float]) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        if not TOKEN_ID_KEY_RE.fullmatch(key):
            raise invalid(f"logit_bias keys must be token ids in ASCII digits, e.g. {{\"50256\": -100}} "
                          f"(got {quote(key)})", "logit_bias")
        out[int(key)] = value
    return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(description="the conversation, rendered with the model's chat template")
    max_completion_tokens: Int32 | None = Field(default=None, description="OpenAI's newer name for max_tokens; "
                                                                          "wins when both are given")
    logprobs: bool = Field(default=False, description="return each output token's log-probability")
    top_logprobs: Int32 | None = Field(default=None, description=f"0-{MAX_LOGPROBS} likeliest alternatives per "
                                                                 "token; needs logprobs: true")

    tools: list[ToolBody] | None = Field(default=None, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="none, auto (the default with tools), required (at least one call) or "
                                  "{\"type\": \"function\", \"function\": {\"name\": ...}}; required and a named "
                                  "function are enforced by a grammar over the tools' parameter schemas")
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one call; default true")

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tool_request(self) -> ToolRequest | None:
        tools = [Tool(t.function.name, t.function.description, t.function.parameters or {})
                 for t in self.tools or ()]
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return tool_request(tools, "function", choice.function.name, self.parallel_tool_calls)
        return tool_request(tools, choice, "", self.parallel_tool_calls)

    def top_n(self) -> tuple[int, int]:
        """(logprobs to ask of the engine, alternatives to return). The engine counts the
        chosen token's log-prob under top-N >= 1, so 'logprobs, no alternatives' asks for 1."""
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        if not self.logprobs:
            return 0, 0
        top = self.top_logprobs or 0
        return max(1, top), top


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="the text to continue (one prompt per request)")
    logprobs: Int32 | None = Field(default=None, description=f"0-{MAX_LOGPROBS}: return each token's log-probability "
                                                             "and this many likeliest alternatives")
    echo: bool = Field(default=False, description="not supported: must be false")
    suffix: str | None = Field(default=None, description="not supported: must be empty")
    best_of: Int32 | None = Field(default=None, description="not supported: must be 1 or unset")

    @field_validator("prompt")
    @classmethod
    def _prompt_utf8(cls, v):
        for s in [v] if isinstance(v, str) else v:
            _utf8(s, "prompt")
        return v

    def text(self) -> str:
        if self.echo:
            raise invalid("echo is not supported; send echo: false", "echo")
        if self.suffix:
            raise invalid("suffix (insertion) is not supported; leave it empty", "suffix")
        if self.best_of not in (None, 1):
            raise invalid("best_of is not supported; use n for several choices", "best_of")
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise invalid(f"send one prompt per request (got {len(self.prompt)})", "prompt")
        return self.prompt[0]

    def top_n(self) -> tuple[int, int]:
        if self.logprobs is None:
            return 0, 0
        if self.logprobs < 0:
            raise invalid(f"logprobs must be in [0, {MAX_LOGPROBS}] (got {self.logprobs})", "logprobs")
        return max(1, self.logprobs), self.logprobs


# --- response shapes, for the OpenAPI document (the routes build them as plain dicts) -------
class ErrorDetail(BaseModel):
    message: str = Field(description="what went wrong and what to change; the same text gRPC callers get")
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, not_found_error, "
                                  "conflict_error, rate_limit_error, service_unavailable, server_error")
    param: str | None = Field(default=None, description="the request field at fault, where known")
    code: str | None = Field(default=None, description="the gRPC status name in lower case (invalid_argument, "
                                                       "not_found, resource_exhausted...)")


class ErrorBody(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens served from the prefix cache (billed at a discount)")


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="summed over the n choices")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class SolExtra(BaseModel):
    cost: float = Field(description="what this request was billed, in the price unit of `sol prices set`")
    version: int = Field(description="the model version that served the request")
    request_id: str = Field(description="the ledger's key for this request (Idempotency-Key when one was sent)")


class ToolCallOut(BaseModel):
    id: str = Field(description="call_..., what the tool message answering it names")
    type: Literal["function"] = "function"
    function: FunctionCallBody


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="the text; null when the answer is only tool calls")
    tool_calls: list[ToolCallOut] | None = Field(default=None, description="with tools: the calls the answer "
                                                                           "makes")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str = Field(description="stop, length, tool_calls, or abort (cancelled or cut short)")


class _Answer(BaseModel):
    id: str = Field(description="the request id: the ledger's key (the Idempotency-Key when one was sent)")
    created: int
    model: str = Field(description="the version that served: NAME@VERSION")
    usage: UsageBody
    sol: SolExtra


class ChatCompletionResponse(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str = Field(description="stop, length, or abort (cancelled or cut short)")


class CompletionResponse(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str = Field(description="a reference to send as `model`: NAME@VERSION, NAME:ALIAS or NAME")
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str = Field(description="the version it serves now: NAME@VERSION")
    sol: dict[str, Any] = Field(description="name, version, stage, aliases, max_context, scheduling (fair or "
                                            "fcfs), price")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthBody(BaseModel):
    status: str = Field(description="ok (alive); serving or not_serving (ready)")
    reason: str | None = None
