"""The HTTP side of `specmoe serve`: the standard library's ThreadingHTTPServer, one thread per connection, in
front of the one `worker.Worker` that owns the model.

Routes: POST /v1/chat/completions and /v1/completions (JSON, or server-sent events with "stream": true),
GET /v1/models, /health, /stats (JSON: requests, queue, the runtime's hit rate / bytes / stalls and memory) and
/metrics (the same numbers as Prometheus text). A bad request is a 4xx with OpenAI's error body; an error
inside a handler is a 500 with a message; neither stops the server. A client that disconnects mid-stream
cancels its generation at the next token.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .protocol import BadRequest, Request, Response, error_body, parse_request, transcript
from .worker import END, Busy, Job, Worker

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 2**20
POSTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


class App:
    """What the handlers share: the worker, the tokenizer (behind a lock: one user at a time), the model's name
    and context length, and the server's cap on new tokens.

    Args:
        worker: the model's worker.
        tokenizer: the model's tokenizer.
        name: the model id clients send and /v1/models lists.
        context: the model's context length in tokens.
        max_tokens: new tokens per request at most, where a request gives no max_tokens.
    """

    def __init__(self, worker: Worker, tokenizer, name: str, context: int, max_tokens: int = 512):
        self.worker, self.tokenizer, self.name, self.context = worker, tokenizer, name, context
        self.max_tokens = max_tokens
        self.tokenizer_lock = threading.Lock()
        self.chat_template = bool(getattr(tokenizer, "chat_template", None))

    def encode(self, request: Request) -> torch.Tensor:
        """The request's prompt as ids [1, T]."""
        with self.tokenizer_lock:
            if request.kind == "completion":
                ids = self.tokenizer(request.prompt, return_tensors="pt")["input_ids"]
            elif self.chat_template:
                messages = [{"role": r, "content": t} for r, t in request.messages]
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True)["input_ids"]
            else:  # no chat template (the reference model): a plain transcript
                ids = self.tokenizer(transcript(request.messages), return_tensors="pt")["input_ids"]
        if ids.numel() == 0:
            raise BadRequest("the prompt is empty after tokenization", "prompt" if request.kind == "completion"
                             else "messages")
        return ids

    def budget(self, request: Request, prompt_tokens: int) -> int:
        """New tokens to generate; a prompt (plus max_tokens) longer than the context is a 400."""
        room = self.context - prompt_tokens
        if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
            asked = f" and {request.max_tokens} completion tokens" if request.max_tokens is not None else ""
            raise BadRequest(f"this model's maximum context length is {self.context} tokens; the request has "
                             f"{prompt_tokens} prompt tokens{asked}: shorten the prompt or lower max_tokens",
                             "messages" if request.kind == "chat" else "prompt", code="context_length_exceeded")
        return request.max_tokens if request.max_tokens is not None else min(room, self.max_tokens)

    def decode(self, tokens: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)


class _Text:
    """New tokens -> text pieces, holding back what may be the start of a stop string or a partial character."""

    def __init__(self, app: App, stop: list[str]):
        self.app, self.stop, self.tokens, self.sent = app, stop, [], 0
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped = False

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.app.decode(self.tokens)
        cut = min((i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text[:cut])
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        return self._take(text[: len(text) - self.hold] if self.hold else text)

    def flush(self) -> str:
        return "" if self.stopped else self._take(self.app.decode(self.tokens))

    def _take(self, text: str) -> str:
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return piece


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "specmoe-serve"
    app: App  # set on the class made by `make_server`

    # ---- plumbing ------------------------------------------------------------------------------------
    def log_message(self, fmt, *args):
        logger.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: dict | str, content_type: str = "application/json") -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, error_body(message, kind, param, code))

    def _body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("a JSON body with a Content-Length header is required", status=411)
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest(f"the body is {length} bytes, more than the {MAX_BODY_BYTES} this server reads",
                             status=413)
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(f"the body is not JSON ({err})") from None

    def _guarded(self, route) -> None:
        try:
            route()
        except BadRequest as err:
            self._error(err.status, err.message, err.param, err.code)
        except (BrokenPipeError, ConnectionResetError):
            logger.info("client %s went away", self.address_string())
        except Exception as err:  # a bug, not the client's: a 500 with its message, the server goes on
            logger.exception("error handling %s", self.path)
            try:
                self._error(500, f"internal error: {type(err).__name__}: {err}")
            except OSError:
                pass

    # ---- routes --------------------------------------------------------------------------------------
    def do_GET(self):
        self._guarded(self._get)

    def do_POST(self):
        self._guarded(self._post)

    def _get(self):
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        app = self.app
        model = {"id": app.name, "object": "model", "created": int(app.worker.started), "owned_by": "specmoe"}
        if path == "/health":
            alive = app.worker.thread.is_alive()
            self._send(200 if alive else 503, {"status": "ok" if alive else "worker stopped", "model": app.name})
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [model]})
        elif path == f"/v1/models/{app.name}":
            self._send(200, model)
        elif path.startswith("/v1/models/"):
            raise BadRequest(f"model {path[len('/v1/models/'):]!r} is not served here; this server has "
                             f"{app.name!r}", "model", status=404, code="model_not_found")
        elif path in ("/stats", "/v1/stats"):
            self._send(200, {"model": app.name, "context": app.context, **app.worker.stats()})
        elif path == "/metrics":
            self._send(200, prometheus(app.worker.stats()), "text/plain; version=0.0.4")
        else:
            raise BadRequest(f"no route GET {path}; this server has /v1/models, /v1/chat/completions, "
                             "/v1/completions, /health, /stats and /metrics", status=404)

    def _post(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in POSTS:
            raise BadRequest(f"no route POST {path}; POST /v1/chat/completions or /v1/completions", status=404)
        app = self.app
        request = parse_request(POSTS[path], self._body())
        if request.model and request.model != app.name:
            raise BadRequest(f"model {request.model!r} is not served here; this server has {app.name!r}", "model",
                             status=404, code="model_not_found")
        ids = app.encode(request)
        job = Job(ids, app.budget(request, ids.shape[1]), request.temperature, request.top_p, request.seed)
        try:
            app.worker.submit(job)
        except Busy as err:
            raise BadRequest(str(err), status=503) from None
        response = Response(request, app.name)
        try:
            (self._stream if request.stream else self._whole)(job, request, response)
        except (BrokenPipeError, ConnectionResetError):
            job.cancel("client")
            raise
        finally:
            job.cancel("done")  # answered or failed: the worker stops at its next token, if it has not

    def _tokens(self, job: Job):
        """The job's new tokens as they come; its error, if it failed, raised here."""
        while True:
            item = job.tokens.get()
            if item is END:
                return
            if isinstance(item, Busy):
                raise BadRequest(str(item), status=503)
            if isinstance(item, Exception):
                raise item
            yield item

    def _whole(self, job: Job, request: Request, response: Response) -> None:
        text, count = _Text(self.app, request.stop), 0
        pieces = []
        for token in self._tokens(job):
            count += 1
            pieces.append(text.add(token))
            if text.stopped:
                job.cancel("stop")
                break
        pieces.append(text.flush())
        finish = "stop" if text.stopped or count < job.max_new_tokens else "length"
        self._send(200, response.whole("".join(pieces), finish, int(job.ids.shape[1]), count))

    def _stream(self, job: Job, request: Request, response: Response) -> None:
        text, count = _Text(self.app, request.stop), 0
        tokens = self._tokens(job)
        first = next(tokens, None)  # an error before the first token is still an HTTP error
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if request.kind == "chat":
            self._event(response.chunk("", first=True))
        try:
            for token in itertools.chain([first] if first is not None else [], tokens):
                count += 1
                piece = text.add(token)
                if piece:
                    self._event(response.chunk(piece))
                if text.stopped:
                    break
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as err:  # after the headers: the error goes into the stream
            logger.exception("generation failed mid-stream")
            self._event(error_body(f"internal error: {type(err).__name__}: {err}", "server_error"))
            self.wfile.write(b"data: [DONE]\n\n")
            return
        job.cancel("stop" if text.stopped else "done")
        rest = text.flush()
        if rest:
            self._event(response.chunk(rest))
        finish = "stop" if text.stopped or count < job.max_new_tokens else "length"
        self._event(response.chunk(None, finish))
        if request.include_usage:
            self._event(response.usage_chunk(int(job.ids.shape[1]), count))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, data: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()


def prometheus(stats: dict) -> str:
    """The worker's stats as Prometheus text: request and token counters, the queue, the runtime's totals."""
    lines = []

    def metric(name: str, value, kind: str = "counter", labels: str = "") -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"# TYPE specmoe_{name} {kind}")
            lines.append(f"specmoe_{name}{labels} {value}")

    for key in ("completed", "cancelled", "failed", "rejected_busy"):
        metric("requests_total", stats[key], labels=f'{{status="{key}"}}')
    for key in ("prompt_tokens", "completion_tokens"):
        metric(f"{key}_total", stats[key])
    metric("busy_seconds_total", stats["busy_s"])
    metric("queued_requests", stats["queued"], "gauge")
    metric("running_requests", stats["running"], "gauge")
    runtime = stats["runtime"]
    for key in ("hits", "misses", "host_computed", "prefetch_issued", "prefetch_used", "prefetch_wasted",
                "bytes_moved", "stall_s", "layer_calls"):
        if key in runtime:
            metric(f"expert_{key}_total", runtime[key])
    metric("expert_hit_rate", runtime.get("hit_rate"), "gauge")
    for key, value in stats["memory"].items():
        metric(key, value, "gauge")
    return "\n".join(dict.fromkeys(lines)) + "\n"


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server for `app` (not yet serving: call `serve_forever`); port 0 picks a free one."""
    handler = type("SpecmoeHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
