"""OpenAI request and response shapes (as vLLM serves them): parsing JSON bodies into checked values,
and building response bodies and stream chunks. No HTTP and no tensors here: dicts in, dicts out."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .sampling import SamplingParams


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 429: "RateLimitError",
             500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "Error"),
                          "param": self.param, "code": self.status}}


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or 400."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object.") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}.")
    return body


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}.", name)
    return value


@dataclass
class GenerationBody:
    """A parsed /v1/completions or /v1/chat/completions body."""

    model: str
    prompt: str | list[int] | None  # completions
    messages: list[dict[str, str]] | None  # chat
    params: SamplingParams
    max_tokens_given: bool
    stream: bool
    include_usage: bool


def parse_generation(body: dict[str, Any], chat: bool) -> GenerationBody:
    """Check every field this server reads; 400 naming the first bad one."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the base model's name or an adapter's, as GET /v1/models lists.",
                       "model")
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    if chat:
        messages = _parse_messages(body.get("messages"))
    else:
        prompt = _parse_prompt(body.get("prompt"))
    n = _field(body, "n", (int,), 1, "an integer")
    if n != 1:
        raise ApiError(400, f"'n'={n} is not supported: this server returns one choice per request (n=1); send "
                       "n parallel requests instead.", "n")
    for unsupported in ("logprobs", "echo", "best_of", "suffix", "tools", "functions", "response_format"):
        value = body.get(unsupported)
        if value is not None and value is not False and not (unsupported == "best_of" and value == 1):
            raise ApiError(400, f"'{unsupported}' is not supported by lorakit serve; leave it out.", unsupported)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens_given = body.get(key) is not None
    max_tokens = _field(body, key, (int,), 16, "a positive integer")
    temperature = _field(body, "temperature", (int, float), 1.0, "a number in [0, 2]")
    top_p = _field(body, "top_p", (int, float), 1.0, "a number in (0, 1]")
    seed = _field(body, "seed", (int,), None, "an integer")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or any(not isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings.", "stop")
    stream = _field(body, "stream", (bool,), False, "true or false")
    options = _field(body, "stream_options", (dict,), {}, "an object")
    params: SamplingParams | None = None
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed,
                                stop=stop)
    except ValueError as exc:
        name = str(exc).split("=", 1)[0]
        raise ApiError(400, f"'{name}': {exc}", name) from None
    return GenerationBody(model, prompt, messages, params, max_tokens_given, stream,
                          bool(options.get("include_usage")))


def _parse_prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "'prompt' is empty; give some text.", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise ApiError(400, "'prompt' must be a non-empty string (or one list of token ids); batches of prompts are "
                   "not supported: send one request per prompt.", "prompt")


def _parse_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", "messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"'messages[{i}]' needs a role of 'system', 'user' or 'assistant'.", "messages")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"'messages[{i}].content' may hold only text parts.", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"'messages[{i}].content' must be a string.", "messages")
        parsed.append({"role": message["role"], "content": content})
    return parsed


def parse_load(body: dict[str, Any]) -> tuple[str, str]:
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'lora_name' is required: the name requests will use in 'model'.", "lora_name")
    if not isinstance(path, str) or not path:
        raise ApiError(400, "'lora_path' is required: the adapter's directory on the server.", "lora_path")
    return name, path


def parse_unload(body: dict[str, Any]) -> str:
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'lora_name' is required: the adapter to unload.", "lora_name")
    return name


# ---------------------------------------------------------------------------------------------- responses
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(chat: bool, rid: str, model: str, text: str, finish_reason: str | None,
             counts: dict[str, int]) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": counts}


def chunk(chat: bool, rid: str, model: str, text: str | None, finish_reason: str | None,
          first: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(chat: bool, rid: str, model: str, counts: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": counts}


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
