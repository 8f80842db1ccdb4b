"""OpenAI-compatible request and response models (plus vLLM's sampling extras). Only shapes and ranges here.

Unknown request fields are ignored, as vLLM does, so newer clients keep working (not by the Messages and Responses
APIs, which refuse them as Anthropic's and OpenAI's do: MessagesRequest, ResponsesRequest); fields whose meaning we
cannot honour (suffix, tool_choice "auto", ...) are refused by the serving layer with a 400 naming the field.

Requests are validated strictly: JSON types are not coerced (`"max_tokens": "10"`, `"stream": "yes"` and
`"prompt": [[false]]` are 400s, as OpenAI answers them), and text must be valid Unicode (a lone UTF-16
surrogate such as `"\ud800"` parses as JSON but can be neither tokenized nor written back as UTF-8).
"""

from __future__ import annotations

import functools
import time
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_N = 16
MAX_STOP = 8
MAX_LOGIT_BIAS = 1024  # entries of logit_bias a request may carry (OpenAI sets no number; this bounds the work)


def lone_surrogate_path(v: Any, path: tuple = ()) -> tuple | None:
    """Where in a parsed JSON value a string holds a lone UTF-16 surrogate, or None (one C-speed encode each)."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(v, dict):
        for k, x in v.items():
            found = lone_surrogate_path(k, (*path, "<key>")) or lone_surrogate_path(x, (*path, k))
            if found is not None:
                return found
    elif isinstance(v, list) and v and not isinstance(v[0], int):  # token-id lists hold no text
        for i, x in enumerate(v):
            found = lone_surrogate_path(x, (*path, i))
            if found is not None:
                return found
    return None


def _nullable(ann: Any) -> bool:
    """Whether a field's type takes null."""
    if ann is None or ann is type(None) or ann is Any:
        return True
    origin = get_origin(ann)
    if origin is Annotated:
        return _nullable(get_args(ann)[0])
    return origin in (Union, types.UnionType) and any(_nullable(a) for a in get_args(ann))


@functools.cache
def _defaulted(cls: type[BaseModel]) -> frozenset[str]:
    """The fields of `cls` with a default that is no null, whose type takes no null."""
    return frozenset(name for name, f in cls.model_fields.items() if not f.is_required() and not _nullable(f.annotation))


def null_is_default(cls: type[BaseModel], data: Any) -> Any:
    """`data` without the fields sent as null that take no null: they get their default, as OpenAI (and vLLM, and
    Ollama) read `"n": null`, `"stream": null`, `"echo": null` (OpenAI's spec types them "X or null"). A field whose
    type takes null keeps it (a completion's null max_tokens: no cap)."""
    if isinstance(data, dict) and None in data.values():
        drop = _defaulted(cls)
        return {k: v for k, v in data.items() if v is not None or k not in drop}
    return data


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return null_is_default(cls, data)


class _Top(_Req):
    """A request body: its text must be encodable as UTF-8."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        where = lone_surrogate_path(data)
        if where is not None:
            loc = ".".join(str(x) for x in where) or "body"
            raise PydanticCustomError("unicode", f"{loc}: text is not valid Unicode (lone UTF-16 surrogate)")
        return data


class StreamOptions(_Req):
    include_usage: bool = False
    continuous_usage_stats: bool = False


StopStr = Annotated[str, StringConstraints(min_length=1, max_length=256)]


ModelName = Annotated[str, Field(min_length=1, max_length=256)]  # a model (or alias) as a request names it


class _Sampling(_Top):
    """Fields shared by both endpoints."""

    model: ModelName
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # token id (a string of digits, as JSON keys are) -> bias, OpenAI's range; the vocabulary is checked per model
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}} (OpenAI's; vLLM
    # takes it on completions too): checked and compiled by the serving layer
    response_format: dict[str, Any] | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM's structured outputs: {"json" | "regex" | "choice" | "grammar" (Lark) | "json_object": ...}, and the
    # older guided_* fields of the same meanings (checked and compiled by the serving layer)
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, max_length=4096)
    guided_choice: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=1024)]],
                             Field(min_length=1, max_length=1024)] | None = None
    guided_grammar: str | None = Field(None, max_length=65536)
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, le=1 << 20)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int = Field(0, ge=0, le=1 << 20)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=1 << 31)]] | None = Field(None, max_length=64)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    bad_words: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=256)]],
                         Field(max_length=256)] | None = None
    allowed_token_ids: Annotated[list[Annotated[int, Field(ge=0, lt=1 << 31)]],
                                 Field(min_length=1, max_length=1 << 18)] | None = None
    # (vLLM's) prefix caching shares KV only among requests of the same salt (on a multi-tenant server each tenant's
    # requests are salted with the tenant as well)
    cache_salt: str | None = Field(None, min_length=1, max_length=256)
    # (vLLM's) a prompt longer keeps its last this many tokens (-1: as many as the model's context takes)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    # (vLLM's) logprobs' tokens written as "token_id:N"
    return_tokens_as_token_ids: bool = False
    # (vLLM's) refused by the serving layer when asked: no prompt logprobs field in replies, no beam search
    prompt_logprobs: int | None = None
    use_beam_search: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k in v or ():
            if not (k.isascii() and k.isdigit() and len(k) <= 10):
                raise PydanticCustomError("logit_bias_key", "keys are token ids (non-negative integers, "
                                          "written as strings); got {key}", {"key": repr(k[:40])})
        return v


TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=1 << 31)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=64)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=64)]]
    max_tokens: int | None = Field(16, ge=0, le=1 << 20)  # (0: with echo only, the prompt scored; serving.py)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None
    add_special_tokens: bool = True  # (vLLM's) a text prompt inside the special tokens its tokenizer adds (a BOS)


MAX_EMBED_INPUTS = 2048  # inputs one embeddings request may carry (OpenAI's limit)


class EmbeddingRequest(_Top):
    """OpenAI's /v1/embeddings (vLLM's truncate_prompt_tokens too)."""

    model: ModelName
    input: Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_EMBED_INPUTS)], TokenIds,
                 Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    # vLLM's: an input longer than this keeps its last this many tokens (-1: as many as the model's context takes)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


class RerankRequest(_Top):
    """vLLM's /rerank, /v1/rerank, /v2/rerank (the Jina and Cohere shape; llama-swap routes the same paths)."""

    model: ModelName
    query: Annotated[str, StringConstraints(min_length=1)]
    documents: Annotated[list[Union[str, dict[str, Any]]], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


class ScoreRequest(_Top):
    """vLLM's /score and /v1/score: text_1 against each text_2 (one of either side may be a single string)."""

    model: ModelName
    text_1: Union[Annotated[str, StringConstraints(min_length=1)], Annotated[list[str], Field(min_length=1,
                                                                                            max_length=MAX_EMBED_INPUTS)]]
    text_2: Union[Annotated[str, StringConstraints(min_length=1)], Annotated[list[str], Field(min_length=1,
                                                                                            max_length=MAX_EMBED_INPUTS)]]
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


class AnthropicMessage(_Req):
    role: Literal["user", "assistant"]
    content: Union[str, Annotated[list[dict[str, Any]], Field(max_length=4096)]]


# The top-level fields of Anthropic's Messages API (its create, beta create and count_tokens; Vertex's
# anthropic_version) that this server takes and does not use: Claude Code and the `anthropic` client send them. Any
# other field is a 400, as Anthropic's API answers one ("seed: Extra inputs are not permitted").
ANTHROPIC_UNUSED = frozenset({
    "anthropic_version", "betas", "billing_policy", "cache_control", "compaction", "container", "context_management",
    "diagnostics", "fallback_credit_token", "fallbacks", "inference_geo", "mcp_servers", "thread", "user_profile_id",
    "workspace_id"})


class MessagesRequest(_Top):
    """Anthropic's /v1/messages (and /v1/messages/count_tokens, whose max_tokens is not sent). A field Anthropic's
    API does not know is refused, as Anthropic's API refuses it (a client's `seed`, OpenAI's `response_format`, was
    ignored unsaid); those it knows that are not used here (ANTHROPIC_UNUSED) are taken."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _anthropic_unused(cls, data: Any) -> Any:
        if isinstance(data, dict) and not ANTHROPIC_UNUSED.isdisjoint(data):
            data = {k: v for k, v in data.items() if k not in ANTHROPIC_UNUSED}
        return data

    model: ModelName
    messages: Annotated[list[AnthropicMessage], Field(min_length=1, max_length=4096)]
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    system: str | Annotated[list[dict[str, Any]], Field(max_length=4096)] | None = None
    stop_sequences: Annotated[list[StopStr], Field(max_length=MAX_STOP)] | None = None
    temperature: float | None = Field(None, ge=0, le=1)  # (Anthropic's range, not OpenAI's 0-2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1 << 20)  # (Anthropic's range: no -1, which the chat path reads as off)
    stream: bool = False
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # (its `format`: structured outputs, a JSON schema the text is held to)
    output_format: dict[str, Any] | None = None  # (the beta's name of output_config.format, still taken by Anthropic)
    # (taken, not used; held to Anthropic's values, the `anthropic` client's, as its API holds them)
    service_tier: Literal["auto", "standard_only"] | None = None
    speed: Literal["standard", "fast"] | None = None


class TextPart(_Req):
    type: Literal["text"]
    text: str


# A message's text parts are one text with a line between each, as vLLM reads them for a template that takes a string
# (chat_utils: "\n".join of the parts): two parts glued together ("see the table:" "Name,Age") read as one line.
PARTS_SEP = "\n"


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None  # an assistant's, as returned
    tool_call_id: str | None = Field(None, max_length=256)  # a tool message's: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        """Parts other than text (image_url, input_audio, file) named in the error, not a union's first mismatch."""
        if isinstance(v, list):
            for p in v:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                if kind != "text":
                    raise PydanticCustomError("content_part", "content parts of type '{kind}' are not supported: the "
                                              "served models take text ('text' parts)", {"kind": str(kind)})
        return v

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return PARTS_SEP.join(p.text for p in self.content)


class FunctionDef(_Req):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Req):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Req):
    name: str = Field(max_length=64)


class NamedToolChoice(_Req):
    type: Literal["function"]
    function: FunctionName


class AllowedTools(_Req):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]] = Field(min_length=1, max_length=128)  # ({"type": "function", "function": {"name"}})


class AllowedToolChoice(_Req):
    """OpenAI's: the tools the model may call now (`structured.tool_plan`), all of them declared in the prompt."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class _ChatTemplate(_Req):
    """How the model's chat template renders the messages (chat completions and /tokenize alike)."""

    add_generation_prompt: bool = True
    # vLLM's: the last message is left open for the model to continue (a prefilled start of its answer)
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # (vLLM's) a Jinja template of the client's own: refused by the serving layer (the model's is used; vLLM refuses
    # one too unless started with --trust-request-chat-template), not ignored unsaid
    chat_template: str | None = None


# OpenAI's verbosities (chat completions' `verbosity`, Responses' `text.verbosity`; taken, not used) and chat
# completions' output modalities: another value is OpenAI's 400 (serving.py, responses.py)
VERBOSITIES = ("low", "medium", "high")
MODALITIES = ("text", "audio")


class ChatCompletionRequest(_Sampling, _ChatTemplate):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI's deprecated form of tools and tool_choice: refused by the serving layer, not ignored unsaid
    functions: list[Any] | None = None
    function_call: Any = None
    # OpenAI's: "none" turns a thinking template's switch off, the others on (thinking.effort_kwargs)
    reasoning_effort: str | None = None
    verbosity: str | None = None  # (OpenAI's: VERBOSITIES; taken, not used)
    modalities: list[str] | None = None  # (OpenAI's: MODALITIES; "audio" refused, the served models write text)
    # (vLLM's) each choice's content starts with the last message's text when it is of the reply's role (serving.py)
    echo: bool = False


class ResponsesRequest(_Top):
    """OpenAI's /v1/responses: the fields a stateless text model can honour (controller/api/responses.py reads the
    input items; ones it cannot honour are refused there). Other fields are kept (`model_extra`): responses.py takes
    those OpenAI's API knows and refuses the rest with OpenAI's unknown_parameter 400 (`known`), not ignored as the
    chat route's are."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: ModelName
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1, max_length=4096)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None  # (vLLM's)
    stream: bool = False
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    store: bool = True
    previous_response_id: str | None = Field(None, max_length=128)
    metadata: Annotated[dict[str, str], Field(max_length=16)] | None = None
    background: bool = False
    user: str | None = None
    # "auto": the oldest turns of a conversation too long for the context are dropped until it fits
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None  # (echoed) its `effort`: the chat request's reasoning_effort
    # "message.output_text.logprobs": each output token's logprob (with top_logprobs alternatives); others accepted
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    conversation: Any = None  # refused: no Conversations API (previous_response_id chains)
    prompt: Any = None  # refused: no stored prompt templates


class TokenizeRequest(_Top, _ChatTemplate):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the model's template, as a request would feed them."""

    model: ModelName
    prompt: str | None = None
    # (validated when left out too: `_one_input` names it, where a check of the whole model named no field)
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)] | None = Field(
        None, validate_default=True)
    add_special_tokens: bool = True  # (vLLM's, for a prompt) inside the special tokens its tokenizer adds
    return_token_strs: bool = False  # (vLLM's) each token's piece too (`token_strs`), as the tokenizer writes it

    @field_validator("messages")
    @classmethod
    def _one_input(cls, v: Any, info: ValidationInfo) -> Any:
        """One of prompt and messages: the error names `messages` (its param, which was null), the field to drop
        where both came."""
        if (info.data.get("prompt") is None) == (v is None):
            raise PydanticCustomError("one_input", "send either prompt or messages" + (", not both" if v else ""))
        return v


class DetokenizeRequest(_Top):
    model: ModelName
    tokens: Annotated[list[Annotated[int, Field(ge=0, lt=1 << 31)]], Field(max_length=1 << 20)]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # (return_token_strs) each token's piece, vLLM's convert_ids_to_tokens


class DetokenizeResponse(BaseModel):
    prompt: str


# --- responses ---
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV was found in the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()  # (OpenAI's) the cached part of the prompt


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # (encoding_format "base64": the little-endian float32 bytes, base64)


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


def _choice(name: str, content: str, kind: Any, logprobs: type[BaseModel]) -> type[BaseModel]:
    """A choice of a reply or a streamed chunk, in OpenAI's order: `index`, its content (`text`, `message` or
    `delta`: required), `logprobs` and `finish_reason`; then vLLM's `stop_reason`, the stop string or stop token id
    that ended it (None: the end of text, the length; a stream's chunks carry it once, with the finish reason)."""
    return create_model(name, __module__=__name__, index=(int, ...), **{content: (kind, ...)},
                        logprobs=(logprobs | None, None), finish_reason=(str | None, None),
                        stop_reason=(int | str | None, None))


class _Reply(BaseModel):
    """What every completion reply and streamed chunk carries, in OpenAI's order (the SSE fast path in sse.py
    writes the same bytes). Each kind (`_reply`) narrows `object` and `choices`; pydantic keeps a field's place."""

    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list
    usage: Usage | None = None


def _reply(name: str, obj: str, choice: type[BaseModel]) -> type[_Reply]:
    """A kind of reply: its `object` is `obj`, its choices are `choice`s."""
    return create_model(name, __base__=_Reply, __module__=__name__, object=(Literal[obj], obj),
                        choices=(list[choice], ...))


CompletionChoice = _choice("CompletionChoice", "text", str, CompletionLogprobs)
CompletionResponse = _reply("CompletionResponse", "text_completion", CompletionChoice)
CompletionChunk = _reply("CompletionChunk", "text_completion", CompletionChoice)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


ChatChoice = _choice("ChatChoice", "message", AssistantMessage, ChoiceLogprobs)
ChatCompletionResponse = _reply("ChatCompletionResponse", "chat.completion", ChatChoice)
ChatChunkChoice = _choice("ChatChunkChoice", "delta", ChatDelta, ChoiceLogprobs)
ChatCompletionChunk = _reply("ChatCompletionChunk", "chat.completion.chunk", ChatChunkChoice)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenpool"
    # (vLLM's) the weights a name serves: a model's (every name of it, its aliases too: the model by the first name
    # the tenant may use it by) or a LoRA adapter's own name; a name, not vLLM's path (a tenant is not shown paths)
    root: str | None = None
    parent: str | None = None  # (vLLM's) a LoRA adapter's model
    max_model_len: int | None = None


class LoadLoraAdapterRequest(_Top):
    """vLLM's /v1/load_lora_adapter. base_model_name: the model it goes over (may be left out when one is served)."""

    lora_name: ModelName
    lora_path: str = Field(min_length=1, max_length=4096)
    base_model_name: str | None = None


class UnloadLoraAdapterRequest(_Top):
    lora_name: ModelName
    lora_int_id: int | None = None  # (vLLM's; ignored: adapters are named)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
