"""Request bodies of the OpenAI-compatible API, as Pydantic models: FastAPI validates
types with them and they make /openapi.json. Ranges (temperature in [0, 2], n in [1, 8]...)
are not repeated here: `SamplingParams.validate` owns every limit, for gRPC and HTTP alike,
and the service calls it once per request. Here only the wire types are bounded, as the
proto bounds them (int32, int64), so both protocols reach the same checks with the same
values.

Each body maps onto the engine's `SamplingParams` by `sampling()`; vLLM's extension fields
(top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids) are accepted
under vLLM's names.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpt.chat import Message
from gpt.quoting import quote
from server.engine.api import JsonSchema, ResponseFormat, SamplingParams
from server.errors import invalid

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


class ChatMessage(_Body):
    role: str = Field(description="system, user or assistant (developer = system)")
    content: str | list[TextPart] | None = Field(
        default=None, description="the text, or a list of text parts (joined); other modalities are not served")
    name: str | None = Field(default=None, description="accepted and ignored")

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
        return Message(ROLE_ALIASES.get(self.role, self.role), content)


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
                raise invalid("response_format.json_schema is required with type json_schema")
            return ResponseFormat("json_schema", JsonSchema(self.json_schema.name, self.json_schema.schema_ or {},
                                                            self.json_schema.strict))
        return ResponseFormat(self.type, regex=self.regex or "", grammar=self.grammar or "")


class StreamOptions(_Body):
    include_usage: bool = Field(default=False, description="end the stream with a chunk that carries usage (and "
                                                           "sol's cost) and an empty choices list")


class _Sampling(_Body):
    """The sampling fields both endpoints share (OpenAI's names, then vLLM's extensions)."""

    model: str = Field(description="NAME (= NAME:latest), NAME:ALIAS or NAME@VERSION; GET /v1/models lists them")
    max_tokens: Int32 | None = Field(default=None, description="tokens to generate at most; default: the server's, "
                                                               "capped by the context")
    temperature: float | None = Field(default=None, description="[0, 2]; 0 = greedy; default 1")
    top_p: float | None = Field(default=None, description="(0, 1]; default 1")
    n: Int32 | None = Field(default=None, description="choices to generate, 1-8; they share the prompt's KV blocks")
    stream: bool = Field(default=False, description="answer as server-sent events ending with `data: [DONE]`")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None, description="up to 8 strings of 1-64 characters; not output")
    seed: Int64 | None = Field(default=None, description="the same seed gives the same output, whatever the batch")
    presence_penalty: float | None = Field(default=None, description="[-2, 2]")
    frequency_penalty: float | None = Field(default=None, description="[-2, 2]")
    logit_bias: dict[str, float] | None = Field(
        default=None, description="token id (as a string key) -> bias in [-100, 100] added to its logit; up to 300")
    user: str | None = Field(default=None, description="your end user's id, for your records; not used by sol")
    response_format: ResponseFormatBody | None = Field(
        default=None, description="constrain the output: json_object, json_schema, or (sol) regex / grammar")
    # vLLM's extensions.
    top_k: Int32 | None = Field(default=None, description="vLLM extension: sample from the k likeliest; 0 = off")
    min_p: float | None = Field(default=None, description="vLLM extension: [0, 1)")
    repetition_penalty: float | None = Field(default=None, description="vLLM extension: (0, 2]; default 1")
    ignore_eos: bool | None = Field(default=None, description="vLLM extension: keep generating past end of turn")
    min_tokens: Int32 | None = Field(default=None, description="vLLM extension: no stop before this many tokens")
    stop_token_ids: list[Int32] | None = Field(default=None, description="vLLM extension: token ids that end a "
                                                                         "choice; up to 16")
    return_token_ids: bool = Field(default=False, description="vLLM extension: each stream chunk's choices carry "
                                                              "`token_ids`, the ids of the tokens they add")

    @field_validator("stop")
    @classmethod
    def _stop_utf8(cls, v):
        for s in [v] if isinstance(v, str) else v or ():
            _utf8(s, "stop")
        return v

    def sampling(self, logprobs: int) -> tuple[SamplingParams, bool]:
        """The engine's parameters (unset fields keep the dataclass defaults) and whether
        max_tokens was given (the service resolves it against the context otherwise)."""
        values: dict[str, Any] = {name: getattr(self, name) for name in (
            "temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
            "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids")}
        values = {k: v for k, v in values.items() if v is not None}
        if self.stop is not None:
            values["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.logit_bias:
            values["logit_bias"] = token_bias(self.logit_bias)
        if self.response_format is not None:
            values["response_format"] = self.response_format.engine_format()
        if logprobs:
            values["logprobs"] = logprobs
        max_tokens = self.output_limit()
        if max_tokens is not None:
            values["max_tokens"] = max_tokens
        return SamplingParams(**values), max_tokens is not None

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
                          f"(got {quote(key)})")
        out[int(key)] = value
    return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(description="the conversation, rendered with the model's chat template")
    max_completion_tokens: Int32 | None = Field(default=None, description="OpenAI's newer name for max_tokens; "
                                                                          "wins when both are given")
    logprobs: bool = Field(default=False, description="return each output token's log-probability")
    top_logprobs: Int32 | None = Field(default=None, description="0-20 likeliest alternatives per token; needs "
                                                                 "logprobs: true")

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_n(self) -> tuple[int, int]:
        """(logprobs to ask of the engine, alternatives to return). The engine counts the
        chosen token's log-prob under top-N >= 1, so 'logprobs, no alternatives' asks for 1."""
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: true")
        if not self.logprobs:
            return 0, 0
        top = self.top_logprobs or 0
        return max(1, top), top


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="the text to continue (one prompt per request)")
    logprobs: Int32 | None = Field(default=None, description="0-20: return each token's log-probability and this "
                                                             "many likeliest alternatives")
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
            raise invalid("echo is not supported; send echo: false")
        if self.suffix:
            raise invalid("suffix (insertion) is not supported; leave it empty")
        if self.best_of not in (None, 1):
            raise invalid("best_of is not supported; use n for several choices")
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise invalid(f"send one prompt per request (got {len(self.prompt)})")
        return self.prompt[0]

    def top_n(self) -> tuple[int, int]:
        if self.logprobs is None:
            return 0, 0
        if self.logprobs < 0:
            raise invalid(f"logprobs must be in [0, 20] (got {self.logprobs})")
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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str = Field(description="stop, length, or abort (cancelled or cut short)")


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
    sol: dict[str, Any] = Field(description="name, version, stage, aliases, max_context, price")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthBody(BaseModel):
    status: str = Field(description="ok (alive); serving or not_serving (ready)")
    reason: str | None = None
