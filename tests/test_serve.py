"""`specmoe serve` against the reference model on 127.0.0.1: plain HTTP and the `openai` client, streamed and not,
bad requests, a client that leaves mid-stream, a prompt larger than the context, and SIGINT.

One server process for the module (started and stopped here); each test sends a few requests of a few tokens.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from specmoe.serve.protocol import BadRequest, parse_request, transcript

ROOT = Path(__file__).resolve().parents[1]
NEW = 8


@pytest.fixture(scope="module")
def server():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "specmoe.cli", "serve", "--port", "0", "--capacity", "0.25"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # "specmoe serve: NAME on http://HOST:PORT/v1 ..."
    if "http://" not in line:
        proc.kill()
        pytest.fail(f"the server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    host, port = line.split("http://")[1].split("/")[0].split(":")
    yield proc, host, int(port)
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


def _request(server, method, path, body=None, raw: bytes | None = None, headers=None):
    _, host, port = server
    conn = http.client.HTTPConnection(host, port, timeout=120)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text


def _events(text: str) -> list:
    data = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]", text[-500:]
    return [json.loads(d) for d in data[:-1]]


@pytest.fixture(scope="module")
def expected():
    """The unwrapped reference model's greedy continuation of a prompt (what the server must answer)."""
    from specmoe.reference.model import load_reference_model, load_reference_tokenizer

    model, tok = load_reference_model(device="cpu"), load_reference_tokenizer()

    def greedy(text: str, new: int = NEW) -> str:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return greedy


def test_health_models_stats(server):
    status, body = _request(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = _request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["specmoe-reference"]
    status, body = _request(server, "GET", "/stats")
    stats = json.loads(body)
    assert status == 200 and stats["context"] == 512 and stats["memory"]["num_slots"] == 360
    assert {"hits", "misses", "bytes_moved", "stall_s", "hit_rate"} <= set(stats["runtime"])
    status, body = _request(server, "GET", "/metrics")
    assert status == 200 and 'specmoe_requests_total{status="completed"}' in body


def test_completion_streamed_and_not_equal_the_unwrapped_model(server, expected):
    prompt = "def fibonacci(n):"
    want = expected(prompt)
    status, body = _request(server, "POST", "/v1/completions",
                            {"model": "specmoe-reference", "prompt": prompt, "max_tokens": NEW, "temperature": 0})
    answer = json.loads(body)
    assert status == 200, body
    assert answer["choices"][0]["text"] == want and answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == NEW
    status, body = _request(server, "POST", "/v1/completions",
                            {"prompt": prompt, "max_tokens": NEW, "temperature": 0, "stream": True,
                             "stream_options": {"include_usage": True}})
    events = _events(body)
    assert status == 200
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == want
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == NEW


def test_chat_streamed_and_not(server, expected):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text",
                                                                                         "text": "import os"}]}]
    want = expected(transcript([("system", "be brief"), ("user", "import os")]))
    status, body = _request(server, "POST", "/v1/chat/completions",
                            {"messages": messages, "max_tokens": NEW, "temperature": 0})
    assert status == 200, body
    message = json.loads(body)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": want}
    status, body = _request(server, "POST", "/v1/chat/completions",
                            {"messages": messages, "max_tokens": NEW, "temperature": 0, "stream": True})
    events = _events(body)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == want


def test_a_stop_string_ends_the_text_before_it(server, expected):
    prompt = "def fibonacci(n):"
    full = expected(prompt, 16)
    stop = full.strip()[3:6]  # a piece from inside the continuation
    status, body = _request(server, "POST", "/v1/completions",
                            {"prompt": prompt, "max_tokens": 16, "temperature": 0, "stop": stop})
    choice = json.loads(body)["choices"][0]
    assert status == 200 and choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v1/completions", {"max_tokens": 4}, 400, "'prompt'"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n=1"),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "not served here"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 600}, 400, "maximum context length is 512"),
    ("/v1/completions", {"prompt": "word " * 700, "max_tokens": 4}, 400, "maximum context length is 512"),
    ("/v1/chat/completions", {"messages": []}, 400, "'messages'"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("/v1/embeddings", {"input": "x"}, 404, "no route"),
])
def test_bad_requests_get_a_4xx_with_a_message(server, path, body, status, needle):
    got, text = _request(server, "POST", path, body)
    assert got == status, text
    error = json.loads(text)["error"]
    assert needle in error["message"], error
    if "context length" in needle:
        assert error["code"] == "context_length_exceeded"


def test_malformed_bodies(server):
    status, text = _request(server, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "not JSON" in json.loads(text)["error"]["message"]
    status, text = _request(server, "POST", "/v1/completions", raw=b"[1, 2]")
    assert status == 400 and "JSON object" in json.loads(text)["error"]["message"]
    _, host, port = server
    with socket.create_connection((host, port), timeout=30) as s:  # claims 1 GB: refused before reading it
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n{}")
        assert s.recv(4096).split(b"\r\n")[0].endswith(b"413 Request Entity Too Large")
    status, _ = _request(server, "GET", "/health")  # and it still serves
    assert status == 200


def test_a_client_that_leaves_mid_stream_cancels_its_generation(server, expected):
    _, host, port = server
    before = json.loads(_request(server, "GET", "/stats")[1])["cancelled"]
    body = json.dumps({"prompt": "def main():", "max_tokens": 400, "temperature": 0, "stream": True}).encode()
    s = socket.create_connection((host, port), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 3:  # a few tokens have come
        got += s.recv(4096)
    s.close()
    t0 = time.perf_counter()
    prompt = "import numpy as np"
    status, text = _request(server, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert status == 200 and json.loads(text)["choices"][0]["text"] == expected(prompt, 4)
    assert time.perf_counter() - t0 < 60  # not behind 400 tokens of a client who left
    stats = json.loads(_request(server, "GET", "/stats")[1])
    assert stats["cancelled"] == before + 1 and stats["failed"] == 0


def test_the_openai_client(server, expected):
    openai = pytest.importorskip("openai")
    _, host, port = server
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["specmoe-reference"]
    prompt = "class Stack:"
    want = expected(prompt)
    done = client.completions.create(model="specmoe-reference", prompt=prompt, max_tokens=NEW, temperature=0)
    assert done.choices[0].text == want and done.usage.completion_tokens == NEW
    chat = client.chat.completions.create(model="specmoe-reference", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=NEW, temperature=0)
    want_chat = expected(transcript([("user", prompt)]))
    assert chat.choices[0].message.content == want_chat
    stream = client.chat.completions.create(model="specmoe-reference", max_tokens=NEW, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": prompt}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want_chat
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="specmoe-reference", prompt="word " * 700, max_tokens=4)


def test_sigint_mid_stream_stops_the_server_cleanly(server):
    proc, host, port = server
    body = json.dumps({"prompt": "def main():", "max_tokens": 400, "temperature": 0, "stream": True}).encode()
    s = socket.create_connection((host, port), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() +
              b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 2:
        got += s.recv(4096)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    s.close()
    assert proc.returncode == 0, err[-2000:]
    assert "specmoe serve: stopped" in out and "Traceback" not in err, err[-2000:]


def test_requests_are_checked_before_they_are_queued():
    assert parse_request("completion", {"prompt": ["one"]}).prompt == "one"
    request = parse_request("chat", {"messages": [{"role": "developer", "content": "x"}], "stop": "\n",
                                     "max_completion_tokens": 3})
    assert request.messages == [("system", "x")] and request.stop == ["\n"] and request.max_tokens == 3
    for body in ({"prompt": "x", "stop": ["a"] * 5}, {"prompt": "x", "stream": "yes"}, {"prompt": "x", "top_p": 0},
                 {"prompt": "x", "tools": [{"type": "function"}]}, {"prompt": "x", "max_tokens": 0}, "text",
                 {"prompt": "x", "seed": 2**70}, {"prompt": "x", "max_tokens": 2**40}):
        with pytest.raises(BadRequest):
            parse_request("completion", body)


def test_the_queue_is_bounded_and_shutdown_drains_it():
    """The worker without a model: a fake whose generate streams until it is cancelled."""
    import threading

    from specmoe.serve.worker import END, Busy, Job, Worker

    class Stats:
        def to_dict(self):
            return {"hits": 0}

    class Fake:
        stats, started = Stats(), threading.Event()

        def memory(self):
            return {"num_slots": 1}

        def generate(self, input_ids, streamer, stopping_criteria, max_new_tokens, **kwargs):
            streamer.put(input_ids)
            self.started.set()
            for t in range(max_new_tokens):
                streamer.put(torch.tensor([t]))
                if stopping_criteria[0](input_ids, None).all():
                    break
                time.sleep(0.01)

    fake = Fake()
    worker = Worker(fake, pad_token_id=0, queue_size=2)
    worker.start()
    running = Job(torch.tensor([[1, 2]]), max_new_tokens=10_000)
    worker.submit(running)
    assert fake.started.wait(10)
    waiting = [Job(torch.tensor([[1]]), 4) for _ in range(2)]
    for job in waiting:
        worker.submit(job)
    with pytest.raises(Busy, match="already waiting"):
        worker.submit(Job(torch.tensor([[1]]), 4))
    assert worker.stats()["rejected_busy"] == 1 and worker.stats()["queued"] == 2
    worker.stop(timeout=10)
    assert not worker.thread.is_alive()
    items = []
    while (item := running.tokens.get(timeout=5)) is not END:
        items.append(item)
    assert 0 < len(items) < 10_000  # cancelled mid-generation
    assert all(isinstance(j.tokens.get(timeout=5), Busy) for j in waiting)  # told, not left hanging
    assert worker.stats()["cancelled"] == 1
    with pytest.raises(Busy, match="shutting down"):
        worker.submit(Job(torch.tensor([[1]]), 4))
