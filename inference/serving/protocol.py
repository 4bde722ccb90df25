"""The body of `POST /v1/completions` as a pydantic model, and the error messages a bad one gets.

FastAPI validates every request against `CompletionRequest` before the server sees it, and /openapi.json
describes exactly this model: OpenAI's fields, the decoding knobs as extra fields, and the OpenAI fields this
server accepts only at the value that changes nothing. Each field's `description` is what it accepts, in the
words every error about it uses ("temperature must be >= 0 and <= 2 ..., got -1"); `error_message` turns
pydantic's errors into those sentences. What needs the model (the context, the strategies it can use, n x
prompts against --max_n) is checked afterwards, by `inference.serving.app.parse_completion_request`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inference.api import BLOCK_RULES, STRATEGIES

INT64_MAX = 2 ** 63 - 1  # every integer must fit a tensor
MAX_STEPS = 65536  # ancestral sampling walks every time step (the other rules gain nothing past L): a bound on its work
MAX_STOP = 4  # OpenAI: up to 4 stop sequences
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# OpenAI fields this server has no use for, accepted only at a value that changes nothing
NO_OP_VALUES = {"logprobs": (None,), "echo": (False, None), "best_of": (1, None), "suffix": (None,),
                "frequency_penalty": (0, None), "presence_penalty": (0, None), "logit_bias": (None, {})}


NonEmptyStr = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: Optional[bool] = Field(None, description="true or false: a last event carries usage")


def _positive(description: str = ">= 1 and < 2**63, an integer", **kw):
    return Field(None, ge=1, le=INT64_MAX, description=description, **kw)


class CompletionRequest(BaseModel):
    """OpenAI's completion request (https://platform.openai.com/docs/api-reference/completions) with the
    diffusion decoding knobs beside it. strict: "3" is not a number and 1.0 is not an integer."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # OpenAI's fields
    model: Optional[str] = Field(None, description="the id GET /v1/models lists (optional: one model is served)")
    prompt: Union[str, Annotated[list[str], Field(min_length=1)]] = Field(
        description="a string or a non-empty list of strings")
    max_tokens: Optional[int] = _positive(f">= 1, an integer (the tokens to generate; default {DEFAULT_MAX_TOKENS})")
    temperature: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False,
                                         description=">= 0 and <= 2 (0 = greedy)")
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False,
                                   description="in (0, 1] (nucleus sampling)")
    n: Optional[int] = _positive(">= 1, an integer (completions per prompt)")
    stop: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)], None] = Field(
        None, description=f"a non-empty string or a list of at most {MAX_STOP} of them")
    seed: Optional[int] = Field(None, ge=-2 ** 63, le=INT64_MAX,
                                description="a 64-bit signed integer (choice i draws from seed + i)")
    stream: Optional[bool] = Field(None, description="true or false (server-sent events)")
    stream_options: Optional[StreamOptions] = Field(
        None, description="an object with at most the field include_usage")
    user: Optional[str] = Field(None, description="a string (unused)")

    # the diffusion decoding knobs (inference.api.DecodeOptions; omitted: its defaults)
    strategy: Optional[Literal[STRATEGIES]] = Field(None, description=f"one of {', '.join(STRATEGIES)}")
    steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS, description=f"between 1 and {MAX_STEPS}, an integer")
    tokens_per_step: Optional[int] = _positive("between 1 and 2**63 - 1, an integer")
    threshold: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False,
                                       description="in [0, 1] (the threshold rule's confidence)")
    block_length: Optional[int] = _positive("between 1 and 2**63 - 1, an integer")
    block_rule: Optional[Literal[BLOCK_RULES]] = Field(None, description=f"one of {', '.join(BLOCK_RULES)}")
    top_k: Optional[int] = _positive("between 1 and 2**63 - 1, an integer")
    kv_cache: Optional[bool] = Field(None, description="true or false")

    # OpenAI's fields this server does not support (accepted at their no-op values only)
    logprobs: Any = Field(None, description="null (not supported)")
    echo: Any = Field(None, description="false (not supported)")
    best_of: Any = Field(None, description="1 (not supported)")
    suffix: Any = Field(None, description="null (not supported)")
    frequency_penalty: Any = Field(None, description="0 (not supported)")
    presence_penalty: Any = Field(None, description="0 (not supported)")
    logit_bias: Any = Field(None, description="null or {} (not supported)")

    @field_validator(*NO_OP_VALUES)
    @classmethod
    def _no_op(cls, value, info):
        if value not in NO_OP_VALUES[info.field_name]:
            raise ValueError(f"{info.field_name} is not supported by this server; leave it out")
        return value


OPENAI_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
                 "stream_options", "user")
DECODING_FIELDS = ("strategy", "steps", "tokens_per_step", "threshold", "block_length", "block_rule", "top_k",
                   "kv_cache")


def error_message(errors: list[dict], body: Any) -> tuple[str, Optional[str]]:
    """pydantic's errors about a request body (FastAPI's RequestValidationError.errors(): loc = ("body", field,
    ...)) -> one message naming every bad field and what it accepts, and the first such field."""
    unknown = [e["loc"][1] for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 2]
    if unknown:
        return (f"unknown field(s) {', '.join(map(repr, unknown))}; this server accepts {', '.join(OPENAI_FIELDS)} "
                f"and the decoding fields {', '.join(DECODING_FIELDS)}", unknown[0])
    messages, params = [], []
    for e in errors:
        loc = e["loc"]
        if e["type"] == "json_invalid":
            return (f"the request body is not valid JSON ({e['ctx']['error']} at character {loc[1]}); send a JSON "
                    f"object such as {{\"prompt\": \"ROMEO:\", \"max_tokens\": 32}}", None)
        if isinstance(body, (bytes, bytearray)):  # FastAPI parses JSON only when the Content-Type says so
            return ("send the request body as JSON with the header Content-Type: application/json (curl: --json "
                    "BODY, or -H 'Content-Type: application/json')", None)
        if len(loc) < 2:  # the body itself
            got = "no body" if body is None else f"a JSON {_json_type(body)}"
            return f"the request body must be a JSON object of field: value, got {got}", None
        name = loc[1]
        if name in params:
            continue  # one message per field (a union reports each of its alternatives)
        params.append(name)
        messages.append(_field_message(name, e, body))
    return "; ".join(messages), params[0] if params else None


def _field_message(name: str, error: dict, body: Any) -> str:
    field = CompletionRequest.model_fields.get(name)
    accepts = field.description if field is not None else "a known field"
    value = body.get(name) if isinstance(body, dict) else None
    if error["type"] == "missing":
        return f"{name} is required: {accepts}"
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    if error["type"] == "literal_error":
        return f"unknown {name} {value!r}; expected {accepts}"
    if error["type"] == "finite_number":  # NaN and Infinity: Python's JSON and curl send them
        return f"{name} must be a finite number {accepts}, got {value!r}"
    if name == "prompt" and isinstance(value, list) and value and all(isinstance(p, int) for p in value):
        return "prompts as token ids are not supported; send the prompt as text"
    return f"{name} must be {accepts}, got {value!r}"


def _json_type(value) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")
