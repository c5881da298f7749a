"""OpenAI's HTTP API as SAGE serves it: request and response models, and their decoding.

One set of msgspec Structs is the contract for the edge (strict: a wrong type is a 400),
our engines (the simulator reads bodies as vLLM's lax pydantic models do) and the OpenAPI
document, which is generated from these classes (`json_schemas`). msgspec won the edge's
CPU-per-request A/B against pydantic v2 (bench/protocol_ab.py, bench/RESULTS.md).

Fields the gateway does not act on are typed where OpenAI or vLLM define them, so a bad
value fails at the edge with the field named, and unknown fields are allowed: engines take
extensions we do not list, and the edge forwards the raw body, never a re-encoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import orjson

from sage.common.exceptions import InvalidRequestError

__all__ = [
    "INT32_MAX",
    "MAX_EMBEDDING_INPUTS",
    "NOT_BLANK",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Completion",
    "CompletionRequest",
    "ContentPart",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "Embedding",
    "EmbeddingList",
    "EmbeddingRequest",
    "EngineChatCompletionRequest",
    "EngineChatMessage",
    "EngineCompletionRequest",
    "EngineResponsesRequest",
    "EngineTokenizeRequest",
    "ErrorResponse",
    "Model",
    "ModelList",
    "Problem",
    "ProtocolError",
    "RerankRequest",
    "RerankResponse",
    "ResponsesRequest",
    "ScoreRequest",
    "ScoreResponse",
    "StreamOptions",
    "TokenizeRequest",
    "TokenizeResponse",
    "Usage",
    "convert",
    "decode",
    "json_schemas",
]

# OpenAI's own per-request cap on embedding inputs.
MAX_EMBEDDING_INPUTS = 2048
# Integer fields end up in int32 protobuf fields or engine limits; larger is never valid.
INT32_MAX = 2**31 - 1

# Some character that str.strip() keeps, spelled out: `\S` reads differently in ECMA (the
# schema's readers), Python and Python's ASCII mode; msgspec applies it with re.search.
NOT_BLANK = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"

ModelName = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        pattern=NOT_BLANK,
        description="Model (or alias) to route to.",
        examples=["sim"],
    ),
]
PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
NonEmptyText = Annotated[str, msgspec.Meta(min_length=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]  # as vLLM: 0 would sample nothing
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
Role = Literal["system", "user", "assistant", "tool", "function", "developer"]


class _Model(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base of every model: keyword-only fields, defaults left out when encoding."""


class StreamOptions(_Model):
    """Options of a streamed reply (passed to the engine)."""

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM


class ContentPart(_Model):
    """One part of a message's content. Engines take several part types (image_url,
    input_audio, ...); only a text part's payload matters to the control plane."""

    type: str
    text: str | None = None

    def __post_init__(self) -> None:
        if self.type == "text" and self.text is None:
            raise ValueError("`text` is required in a text part")


_TEXT_PART_NEEDS_TEXT = {
    "if": {"properties": {"type": {"const": "text"}}},
    "then": {"required": ["text"], "properties": {"text": {"type": "string"}}},
}
_CONTENT_NEEDED_UNLESS_ASSISTANT = {
    "if": {"properties": {"role": {"const": "assistant"}}},
    "then": {},
    "else": {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}},
}
Content = (
    str | list[Annotated[ContentPart, msgspec.Meta(extra_json_schema=_TEXT_PART_NEEDS_TEXT)]] | None
)


class ChatMessage(_Model):
    """One turn; `content` may be null or absent only for an assistant message (one that
    carried only tool calls)."""

    role: Role
    content: Annotated[
        Content,
        msgspec.Meta(description="Text, or an array of content parts (passed to the engine)."),
    ] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        if self.content is None and self.role != "assistant":
            raise ValueError("`content` is required (only an assistant message may omit it)")

    def text(self) -> str:
        """The content as plain text: text parts joined by newlines, others left out."""
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        return "\n".join(p.text for p in self.content if p.type == "text" and p.text is not None)


class _Sampling(_Model):
    """Fields chat and completion requests share: OpenAI's, then vLLM's extensions."""

    model: ModelName
    stream: Annotated[
        bool | None, msgspec.Meta(description="Stream chunks as server-sent events.")
    ] = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[
        PositiveInt | None, msgspec.Meta(description="Most tokens to generate.")
    ] = None
    n: Annotated[PositiveInt | None, msgspec.Meta(description="Choices to generate.")] = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: Annotated[
        str | list[str] | None,
        msgspec.Meta(description="Strings at which generation stops (the engine caps how many)."),
    ] = None
    seed: int | None = None
    user: str | None = None
    # vLLM's sampling extensions
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=INT32_MAX)] | None = None
    min_tokens: NonNegativeInt | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[NonNegativeInt] | None = None

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple, whether one string or a list was sent."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatCompletionRequest(_Sampling, kw_only=True):
    """POST /v1/chat/completions. The edge forwards the body byte for byte; fields not
    listed here are the engine's to judge."""

    messages: Annotated[
        list[
            Annotated[ChatMessage, msgspec.Meta(extra_json_schema=_CONTENT_NEEDED_UNLESS_ASSISTANT)]
        ],
        msgspec.Meta(min_length=1),
    ]
    max_completion_tokens: Annotated[
        PositiveInt | None, msgspec.Meta(description="Most tokens to generate.")
    ] = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def token_limit(self) -> tuple[int | None, str]:
        """The most tokens to generate and the field that set it (for error messages)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_Sampling, kw_only=True):
    """POST /v1/completions (legacy): a prompt as text, texts or token ids."""

    prompt: Annotated[
        str | list[Any],
        msgspec.Meta(description="A string, or an array (of strings or token ids)."),
    ]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: PositiveInt | None = None

    @property
    def token_limit(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"


class ResponsesRequest(_Model):
    """POST /v1/responses (OpenAI's Responses API), scheduled as a chat. The edge reads only
    what it routes, limits and validates by; the body goes to the engine byte for byte."""

    model: ModelName
    input: Annotated[
        NonEmptyText | Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1)],
        msgspec.Meta(description="Text, or an array of input items (messages, tool output)."),
    ]
    instructions: str | None = None
    stream: Annotated[
        bool | None, msgspec.Meta(description="Stream the Responses API's events as SSE.")
    ] = False
    max_output_tokens: Annotated[
        PositiveInt | None, msgspec.Meta(description="Most tokens to generate.")
    ] = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    previous_response_id: Annotated[
        str | None,
        msgspec.Meta(description="Not supported: engines behind the gateway keep no responses."),
    ] = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        # Each request may go to another engine, and engines keep no response store (vLLM's
        # is off by default), so a follow-up could never find the response it names.
        if self.previous_response_id is not None:
            raise ValueError(
                "`previous_response_id` is not supported: engines behind the gateway keep no "
                "responses; send the conversation in `input` instead"
            )

    @property
    def streaming(self) -> bool:
        return bool(self.stream)


# Engines read requests as vLLM does, which is looser than OpenAI's API in a few places.
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class EngineChatMessage(ChatMessage, kw_only=True):
    """A turn as an engine reads it: any role its chat template knows."""

    role: NonEmptyText  # type: ignore[assignment]


class EngineChatCompletionRequest(ChatCompletionRequest, kw_only=True):
    """A chat request as an engine reads it (as vLLM): without `model` it serves its own,
    any role, no upper bound on temperature, and vLLM's return_token_ids."""

    model: str | None = None  # type: ignore[assignment]
    messages: Annotated[list[EngineChatMessage], msgspec.Meta(min_length=1)]  # type: ignore[assignment]
    temperature: NonNegativeFloat | None = None
    return_token_ids: bool | None = None


class EngineCompletionRequest(CompletionRequest, kw_only=True):
    """A completion request as an engine reads it (as vLLM): `model` and `prompt` may be
    left out (the engine says which it needs), no upper bound on temperature."""

    model: str | None = None  # type: ignore[assignment]
    prompt: str | list[Any] | None = None  # type: ignore[assignment]
    temperature: NonNegativeFloat | None = None
    return_token_ids: bool | None = None


class EngineResponsesRequest(ResponsesRequest, kw_only=True):
    """A Responses request as an engine reads it (as vLLM): without `model` it serves its
    own, and a previous_response_id is looked up (in a store the engine may not keep)."""

    model: str | None = None  # type: ignore[assignment]
    temperature: NonNegativeFloat | None = None

    def __post_init__(self) -> None:
        pass


class EngineTokenizeRequest(_Model):
    """POST /tokenize as vLLM reads it: a completion prompt or a chat, and the flags that
    change which ids come out (kv_events routing hashes exactly these)."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[EngineChatMessage], msgspec.Meta(min_length=1)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None


# TokenizeRequest takes exactly one of `prompt` and `messages`, as its schema says too.
_PROMPT_OR_MESSAGES = {"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}


class TokenizeRequest(_Model):
    """POST /tokenize at the edge (vLLM's route): a prompt or a chat (rendered by the
    engine's chat template) as the engine's token ids. The body goes to the engine as is."""

    model: ModelName
    # UNSET, not None: a null would satisfy the schema's `required` yet name neither input.
    prompt: str | msgspec.UnsetType = msgspec.UNSET
    messages: (
        Annotated[
            list[
                Annotated[
                    ChatMessage, msgspec.Meta(extra_json_schema=_CONTENT_NEEDED_UNLESS_ASSISTANT)
                ]
            ],
            msgspec.Meta(min_length=1),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    return_token_strs: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        # vLLM picks its request model by which of the two is present; both is ambiguous.
        if (self.prompt is msgspec.UNSET) == (self.messages is msgspec.UNSET):
            raise ValueError("`prompt` or messages is required (exactly one of the two)")


class DetokenizeRequest(_Model):
    """POST /detokenize at the edge (vLLM's route): token ids back to text."""

    model: ModelName
    tokens: list[Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]]


class EmbeddingRequest(_Model):
    """POST /v1/embeddings: text inputs only (token arrays are not supported)."""

    model: ModelName
    input: (
        NonEmptyText
        | Annotated[list[NonEmptyText], msgspec.Meta(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    )
    dimensions: Annotated[
        NonNegativeInt | None, msgspec.Meta(description="0 or null: the model's own size.")
    ] = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class RerankRequest(_Model):
    """POST /v1/rerank (and /rerank) at the edge (vLLM's Jina/Cohere-style route): documents
    ordered by a cross-encoder's relevance to the query. The body goes to the engine as is."""

    model: ModelName
    query: NonEmptyText
    documents: Annotated[
        list[NonEmptyText], msgspec.Meta(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
    ]
    top_n: Annotated[NonNegativeInt, msgspec.Meta(description="0: every document.")] = 0
    truncate_prompt_tokens: int | None = None
    user: str | None = None


class ScoreRequest(_Model):
    """POST /score (and /v1/score) at the edge (vLLM's route): a cross-encoder's score of
    each text_1/text_2 pair (one text_1 against many text_2 too). Relayed as is."""

    model: ModelName
    text_1: NonEmptyText | Annotated[list[NonEmptyText], msgspec.Meta(min_length=1)]
    text_2: (
        NonEmptyText
        | Annotated[list[NonEmptyText], msgspec.Meta(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    )
    truncate_prompt_tokens: int | None = None
    user: str | None = None


# Responses. Engines' replies are relayed unchanged; these describe them for clients and
# let our engines build them.


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatChoice(_Model):
    index: int
    message: dict[str, Any]
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(_Model):
    """The engine's reply, relayed unchanged."""

    id: str
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    created: int | None = None
    model: str | None = None
    usage: Usage | None = None


class ChatCompletionChunk(_Model):
    """One SSE `data:` payload; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class CompletionChoice(_Model):
    index: int
    text: str
    finish_reason: str | None = None


class Completion(_Model):
    """The engine's reply, relayed unchanged."""

    id: str
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    created: int | None = None
    model: str | None = None
    usage: Usage | None = None


class Embedding(_Model):
    object: Literal["embedding"]
    index: int
    embedding: Annotated[
        list[float] | str,
        msgspec.Meta(description="Floats, or base64 of little-endian float32."),
    ]


class EmbeddingList(_Model):
    object: Literal["list"]
    model: str
    data: list[Embedding]
    usage: Usage


class Model(_Model):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: Literal["llm", "embedding"] | None = None
    ready_engines: int | None = None
    root: Annotated[
        str | None, msgspec.Meta(description="Set on aliases: the model they name.")
    ] = None
    parent: Annotated[
        str | None, msgspec.Meta(description="Set on LoRA adapters: their base model.")
    ] = None


class ModelList(_Model):
    object: Literal["list"]
    data: list[Model]


class TokenizeResponse(_Model):
    """The engine's /tokenize reply, relayed unchanged (vLLM's shape)."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Model):
    """The engine's /detokenize reply, relayed unchanged (vLLM's shape)."""

    prompt: str


class RerankDocument(_Model):
    text: str | None = None


class RerankResult(_Model):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(_Model):
    prompt_tokens: int = 0
    total_tokens: int = 0


class RerankResponse(_Model):
    """The engine's /rerank reply, relayed unchanged (vLLM's shape): most relevant first."""

    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage


class ScoreData(_Model):
    index: int
    score: float
    object: str = "score"


class ScoreResponse(_Model):
    """The engine's /score reply, relayed unchanged (vLLM's shape): one score a pair."""

    id: str
    model: str
    data: list[ScoreData]
    usage: Usage
    object: str = "list"
    created: int = 0


class ErrorDetail(_Model):
    message: str
    type: Annotated[
        str, msgspec.Meta(examples=["invalid_request_error", "rate_limit_error", "upstream_error"])
    ]
    param: str | None
    code: Annotated[
        str | int | None,
        msgspec.Meta(examples=["invalid_api_key", "model_not_found", "rate_limit_exceeded"]),
    ]


class ErrorResponse(_Model):
    """OpenAI's error shape; `param` names the offending field."""

    error: ErrorDetail


SCHEMA_MODELS: tuple[type[_Model], ...] = (
    ChatCompletionRequest,
    CompletionRequest,
    ResponsesRequest,
    EmbeddingRequest,
    TokenizeRequest,
    DetokenizeRequest,
    RerankRequest,
    ScoreRequest,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    EmbeddingList,
    ModelList,
    TokenizeResponse,
    DetokenizeResponse,
    RerankResponse,
    ScoreResponse,
    ErrorResponse,
)
_SCHEMA_NAMES = {ErrorResponse: "Error"}
# Whole-object rules the field types cannot say, added to the model's schema.
_SCHEMA_EXTRAS: dict[type[_Model], dict[str, Any]] = {
    TokenizeRequest: _PROMPT_OR_MESSAGES,
    # refused (see ResponsesRequest): only null or absent is valid
    ResponsesRequest: {
        "not": {
            "required": ["previous_response_id"],
            "properties": {"previous_response_id": {"type": "string"}},
        }
    },
}


def json_schemas(ref_prefix: str = "#/components/schemas/") -> dict[str, Any]:
    """JSON Schemas of every model, by name, with refs under `ref_prefix` (OpenAPI's)."""
    _, schemas = msgspec.json.schema_components(SCHEMA_MODELS, ref_template=ref_prefix + "{name}")
    for cls, extra in _SCHEMA_EXTRAS.items():
        schemas[cls.__name__].update(extra)
    for cls, name in _SCHEMA_NAMES.items():
        schemas[name] = schemas.pop(cls.__name__)
    text = orjson.dumps(schemas).decode()
    for cls, name in _SCHEMA_NAMES.items():
        text = text.replace(f'"{ref_prefix}{cls.__name__}"', f'"{ref_prefix}{name}"')
    result: dict[str, Any] = orjson.loads(text)
    for schema in result.values():
        schema.pop("title", None)
    return result


# Decoding, with errors a person can act on.

T = TypeVar("T", bound=msgspec.Struct)

_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`")
_FIELD_NOTE = re.compile(r"^`(?P<field>[^`]+)` (?P<rest>.*)$")


def decode(body: bytes, cls: type[T]) -> T:
    """`body` as a `cls`, strictly, or an InvalidRequestError naming the bad field."""
    decoder = _DECODERS.get(cls)
    if decoder is None:
        decoder = _DECODERS[cls] = msgspec.json.Decoder(cls)
    if not body:
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        result: T = decoder.decode(body)
        return result
    except msgspec.ValidationError as exc:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as bad:
            # msgspec stops at the first type error, which may come before the syntax error
            raise ProtocolError(
                f"request body is not valid JSON: {bad}", Problem("", "body", "object", "")
            ) from None
        raise _invalid(exc, cls, doc) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(
            f"request body is not valid JSON: {exc}", Problem("", "body", "object", "")
        ) from None


def convert(doc: Any, cls: type[T], *, lax: bool = False) -> T:
    """An already parsed body as a `cls`. `lax` reads numbers and booleans given as strings
    ("5", "true", "1"), as the pydantic models of vLLM do."""
    try:
        result: T = msgspec.convert(doc, cls, strict=not lax)
        return result
    except msgspec.ValidationError as exc:
        raise _invalid(exc, cls, doc) from None


@dataclass(frozen=True)
class Problem:
    """What was wrong with a body, for callers that answer in another API's words (the
    simulator answers as vLLM's pydantic models and serving code do)."""

    param: str  # "messages[0].role"; "" for the body itself
    kind: Literal["missing", "type", "value", "body"]  # body: not a JSON object
    expected: str  # msgspec's words for the type wanted ("int | null"), or ""
    got: str  # the type given, in msgspec's words ("str", "float", ...), or ""
    value: Any = None


class ProtocolError(InvalidRequestError):
    """A body that does not fit the model; `problem` says how, in structured form."""

    def __init__(self, message: str, problem: Problem) -> None:
        super().__init__(message, param=problem.param or None)
        self.problem = problem


_EXPECTED = re.compile(r"^Expected `(?P<expected>[^`]+)`(?:, got `(?P<got>[^`]+)`)?")


def _invalid(exc: msgspec.ValidationError, cls: type[Any], doc: Any) -> ProtocolError:
    message = str(exc)
    match = _AT.search(message)
    # msgspec does not say which key of a map held a bad value: name the map
    path = (match.group("path") if match else "").split("[...]")[0]
    text = message[: match.start()] if match else message
    if not path and text.startswith("Expected `object`"):
        got = _json_type(doc)
        return ProtocolError(
            f"request body must be a JSON object, got {got}", Problem("", "body", "object", got)
        )
    missing = _MISSING.match(text)
    if missing:
        param = _join(path, missing.group("field"))
        return ProtocolError(f"{param} is required", Problem(param, "missing", "", ""))
    unknown = _UNKNOWN.match(text)
    if unknown:  # a closed model (forbid_unknown_fields)
        param = _join(path, unknown.group("field"))
        return ProtocolError(f"unknown field {param}", Problem(param, "value", "", ""))
    note = _FIELD_NOTE.match(text)
    if note:  # a model's own check (__post_init__), naming its field in backticks
        param = _join(path, note.group("field"))
        found, value = _lookup(doc, param)
        return ProtocolError(
            f"{param} {note.group('rest')}", Problem(param, "value", "", "", value)
        )
    param = path.lstrip(".")
    found, value = _lookup(doc, param)
    expected = _EXPECTED.match(text)
    if expected or text.startswith("Invalid enum value"):
        # "Expected `int`, got `str`" is a wrong type; "Expected `int` >= 1" a bad value
        got_type = expected.group("got") if expected else None
        problem = Problem(
            param,
            "type" if got_type else "value",
            expected.group("expected") if expected else "",
            got_type or "",
            value,
        )
        words = _describe(_type_at(msgspec.inspect.type_info(cls), param))
        got = f", got {_shown(value)}" if found else ""
        return ProtocolError(f"{param} must be {words}{got}", problem)
    return ProtocolError(f"{param}: {text}" if param else text, Problem(param, "value", "", ""))


def _join(path: str, field: str) -> str:
    path = path.lstrip(".")
    return f"{path}.{field}" if path else field


_STEP = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")


def _steps(param: str) -> list[str | int]:
    return [int(i) if i else name for name, i in _STEP.findall(param)]


def _lookup(doc: Any, param: str) -> tuple[bool, Any]:
    node = doc
    for step in _steps(param):
        if isinstance(step, int) and isinstance(node, list) and step < len(node):
            node = node[step]
            continue
        if isinstance(step, str) and isinstance(node, dict) and step in node:
            node = node[step]
            continue
        return False, None
    return True, node


def _shown(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int | float):
        return "number"
    return "null"


_Info = msgspec.inspect.Type


def _type_at(info: _Info, param: str) -> _Info:
    for step in _steps(param):
        info = _step(info, step)
    return info


def _step(info: _Info, step: str | int) -> _Info:
    for member in _members(info):
        if isinstance(step, str) and isinstance(member, msgspec.inspect.StructType):
            for f in member.fields:
                if f.encode_name == step:
                    return f.type
        if isinstance(step, int) and isinstance(member, msgspec.inspect.ListType):
            return member.item_type
    return info


def _members(info: _Info) -> list[_Info]:
    if isinstance(info, msgspec.inspect.Metadata):
        return _members(info.type)
    if isinstance(info, msgspec.inspect.UnionType):
        return [m for t in info.types for m in _members(t)]
    return [info]


def _describe(info: _Info) -> str:
    """What a value of this type must be, in words ("a positive integer (at most N)")."""
    words = [_word(t) for t in _members(info) if not isinstance(t, msgspec.inspect.NoneType)]
    words = list(dict.fromkeys(w for w in words if w))
    if not words:
        return "null"
    return " or ".join(words)


def _bounds(low: float | None, high: float | None, what: str) -> str:
    if low is not None and high is not None:
        return f"{what} between {low} and {high}"
    if low is not None:
        return f"{what} >= {low}"
    if high is not None:
        return f"{what} <= {high}"
    return what


def _word(t: _Info) -> str:
    i = msgspec.inspect
    if isinstance(t, i.BoolType):
        return "a boolean"
    if isinstance(t, i.IntType):
        low = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else None)
        if low == 1:
            return "a positive integer" + (f" (at most {t.le})" if t.le is not None else "")
        if low == 0:
            return "a non-negative integer" + (f" (at most {t.le})" if t.le is not None else "")
        return _bounds(low, t.le, "an integer")
    if isinstance(t, i.FloatType):
        if t.gt is not None and t.le is not None:
            return f"a number in ({t.gt}, {t.le}]"
        return _bounds(t.ge, t.le, "a number")
    if isinstance(t, i.StrType):
        if t.min_length:
            return "a non-empty string"
        return f"a string matching {t.pattern}" if t.pattern else "a string"
    if isinstance(t, i.LiteralType):
        return "one of " + ", ".join(repr(v) for v in t.values)
    if isinstance(t, i.ListType):
        item = _describe(t.item_type).removeprefix("a ").removeprefix("an ")
        items = f" {item}s" if re.fullmatch(r"[a-z -]+", item) else ""
        if t.min_length and t.max_length is not None:
            return f"a non-empty array of at most {t.max_length}{items or ' items'}"
        if t.min_length:
            return f"a non-empty array{' of' + items if items else ''}"
        return f"an array{' of' + items if items else ''}"
    if isinstance(t, i.StructType | i.DictType):
        return "an object"
    if isinstance(t, i.AnyType):
        return ""
    return "valid"
