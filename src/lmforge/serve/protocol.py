"""The OpenAI request bodies the server accepts, and its errors in OpenAI's shape.

The models are strict (a string is not a number, 1 is not true) and closed: a parameter
we do not implement is refused with a 400 that names it, never silently ignored. A few
OpenAI parameters are accepted only at their neutral value, where ignoring them changes
nothing (`presence_penalty: 0`, `logit_bias: {}`, ...); any other value is refused the
same way. FastAPI publishes these models in `/openapi.json`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _integral(x: Any) -> Any:
    """5.0 is the whole number 5 (JSON Schema's "integer" admits it); 5.5, "5" and true stay
    what they are, and the strict int check refuses them."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def whole(**bounds: int) -> Any:
    """A whole number within `bounds` (ge, le, lt), 5.0 included; the bounds come before the
    validator so that the published schema states them (as minimum, maximum)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


TokenId = whole(ge=0)
MAX_CHOICES = 16  # n
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Closed):
    include_usage: bool = False


class TextPart(Closed):
    type: Literal["text"]
    text: str


class ChatMessage(Closed):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ResponseFormat(Closed):
    type: Literal["text"]


class Sampling(Closed):
    """What completions and chat share."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: whole(ge=1) | None = Field(None, description="lmforge's extension: sample from the k most likely tokens")
    n: whole(ge=1, le=MAX_CHOICES) = 1
    max_tokens: whole(ge=0) | None = None
    stop: str | list[str] | None = None
    seed: whole(ge=0, lt=2**64) | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own logs; it changes no output
    # accepted only at their neutral value (see `neutral_values`)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    logprobs: whole(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    best_of: whole(ge=1) | None = None
    suffix: str | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: whole(ge=0) | None = None
    logprobs: bool = False
    top_logprobs: whole(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    response_format: ResponseFormat | None = None


def neutral_values(req: Sampling) -> None:
    """Refuse the OpenAI parameters we accept only where they change nothing."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0):
            raise ApiError(400, f"{name} is not supported by lmforge (only 0, which changes nothing); remove it", name, "unsupported_parameter")
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported by lmforge (only {}); remove it", "logit_bias", "unsupported_parameter")
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, req.n):
            raise ApiError(400, "best_of is not supported by lmforge (only equal to n); remove it", "best_of", "unsupported_parameter")
        if req.suffix:
            raise ApiError(400, "suffix (insertion) is not supported by lmforge; remove it", "suffix", "unsupported_parameter")
    if isinstance(req, ChatRequest) and req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")


# --- a validation failure as one sentence ---------------------------------------------------
_UNION_HINTS = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids (whole numbers >= 0) or a list of such lists",
    "stop": "stop must be a string or a list of strings",
    "content": "a message's content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts",
}


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """The first of pydantic's errors, said the way a client can act on."""
    e = errors[0]
    kind, loc = e.get("type", ""), [str(p) for p in e.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        reason = (e.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({reason}); send one JSON object", None, "invalid_json")
    if not loc:
        got = type(e.get("input")).__name__
        return ApiError(400, f"the request body must be a JSON object, got {got}", None, "invalid_body")
    fields = [p for p in loc if not p.startswith(("list[", "str", "int", "constrained")) and p not in ("TextPart", "ChatMessage")]
    param = ".".join(fields) or loc[0]
    name = fields[0] if fields else loc[0]
    if kind == "missing":
        return ApiError(400, f"missing required parameter '{param}'", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return ApiError(400, f"unsupported parameter '{param}': lmforge does not implement it; remove it", param, "unsupported_parameter")
    leaf = fields[-1] if fields else name
    if leaf in _UNION_HINTS and kind in ("string_type", "list_type", "int_type", "greater_than_equal", "model_type", "dict_type"):
        if leaf == "prompt" and any(x.get("type") == "greater_than_equal" for x in errors):
            return ApiError(400, "prompt token ids must be whole numbers >= 0 (ids inside the vocabulary)", param, "invalid_value")
        return ApiError(400, _UNION_HINTS[leaf], param, "invalid_type")
    msg = e.get("msg", "invalid value")
    return ApiError(400, f"invalid value for '{param}': {msg} (got {e.get('input')!r:.80})", param, "invalid_value")
