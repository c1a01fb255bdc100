"""The OpenAI-compatible request and response shapes of `specmoe serve`: parse and check a request body, build the
JSON a client expects. Pure functions over dicts (no HTTP, no model), so every rule is testable on its own.

A request is checked before it is queued: a wrong type, an unsupported option (n > 1, tools, logprobs) or a
prompt that does not fit the context is a `BadRequest` (HTTP 400, OpenAI's error body), never a crash. Unknown
fields are ignored, as OpenAI's clients send some (user, metadata, ...).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

MAX_STOP = 4  # OpenAI's limit on stop sequences


class BadRequest(Exception):
    """A request the server will not run: `status` (4xx), a message that says what to change, and the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Request:
    """One checked generation request.

    Args:
        kind: "chat" (/v1/chat/completions) or "completion" (/v1/completions).
        prompt: the completion prompt, or None for chat.
        messages: the chat messages as (role, text), or None.
        max_tokens: tokens to generate at most (None: up to the context, capped by the server).
        temperature: 0 is greedy (the runtime's tokens equal the unwrapped model's); > 0 samples.
        top_p: nucleus sampling (with temperature > 0).
        seed: seeds sampling.
        stop: strings that end the generation (not included in the text).
        stream: answer with server-sent events.
        include_usage: with `stream`, a last chunk carries the token counts.
    """

    kind: str
    prompt: str | None = None
    messages: list[tuple[str, str]] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    model: str = ""


def _number(body: dict, name: str, default, low: float, high: float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{name}' must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be in [{low}, {high}], got {value}", name)
    return value


def _int(body: dict, *names: str, low: int = 1, high: int = 2**31 - 1):
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"'{name}' must be an integer, got {value!r}", name)
        if not low <= value <= high:
            raise BadRequest(f"'{name}' must be in [{low}, {high}], got {value}", name)
        return value
    return None


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (other parts, e.g. images, are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}: only text content parts are supported ({{'type': 'text', 'text': ...}})",
                                 "messages")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise BadRequest(f"{where}: 'content' must be a string or a list of text parts", "messages")


def parse_request(kind: str, body) -> Request:
    """Check a request body. Raises `BadRequest` with what to change."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unsupported = [name for name in ("tools", "functions", "logprobs", "top_logprobs", "response_format", "suffix")
                   if body.get(name) not in (None, False, [], {"type": "text"})]
    if unsupported:
        raise BadRequest(f"not supported by specmoe serve: {', '.join(unsupported)}", unsupported[0])
    if body.get("echo"):
        raise BadRequest("'echo' is not supported", "echo")
    n = _int(body, "n")
    if n not in (None, 1):
        raise BadRequest("only n=1 is supported (one model, requests run one at a time)", "n")
    for name in ("best_of",):
        if _int(body, name) not in (None, 1):
            raise BadRequest(f"only {name}=1 is supported", name)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    request = Request(
        kind=kind, max_tokens=_int(body, "max_completion_tokens", "max_tokens"),
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)), top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)),
        seed=_int(body, "seed", low=0, high=2**63 - 1), stop=stop, stream=stream, include_usage=bool(options.get("include_usage")),
        model=str(body.get("model") or ""))
    if request.top_p == 0.0:
        raise BadRequest("'top_p' must be > 0", "top_p")
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string (or a list of one string)", "prompt")
        request.prompt = prompt
        return request
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'", "messages")
        if m["role"] not in ("system", "developer", "user", "assistant"):
            raise BadRequest(f"messages[{i}]: role {m['role']!r} is not supported (system, user, assistant)",
                             "messages")
        out.append(("system" if m["role"] == "developer" else m["role"], _text(m.get("content"), f"messages[{i}]")))
    request.messages = out
    return request


def transcript(messages: list[tuple[str, str]]) -> str:
    """A chat as plain text, for a tokenizer without a chat template (the reference model's): one
    'role: text' line per message, then 'assistant:'."""
    return "".join(f"{role}: {text}\n" for role, text in messages) + "assistant:"


class Response:
    """The JSON bodies and stream chunks of one answered request."""

    def __init__(self, request: Request, model: str):
        self.request, self.model = request, model
        prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.object = "chat.completion" if request.kind == "chat" else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        """The non-streamed answer."""
        if self.request.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head(self.object), "choices": [choice], "usage": self.usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        """One streamed chunk: a piece of text, or (text None) the last one with its finish reason."""
        if self.request.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.request.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(prompt_tokens, completion_tokens)}
