"""`specmoe serve`: one model with its experts offloaded, behind an OpenAI-compatible HTTP API.

    specmoe serve                                                    # the packaged reference model, port 8000
    specmoe serve --model Qwen/Qwen1.5-MoE-A2.7B --capacity 0.25 --port 8000

The model loads as for `specmoe generate` (same options); requests queue and run one at a time. SIGINT or
SIGTERM stops it: no new requests, the running one is cancelled, exit status 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from ..generate import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed)")
    p.add_argument("--served-name", default=None,
                   help="the model id clients send and /v1/models lists (default: --model, or specmoe-reference)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="new tokens per request where the request gives no max_tokens (default 512)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests waiting at most; more are answered 503 (default 16)")


def run_serve(args: argparse.Namespace) -> int:
    from ..generate import REFERENCE, load_model, pad_token_id
    from .server import App, make_server
    from .worker import Worker

    for name in ("max_tokens", "queue_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port < 2**16:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    smoe, tokenizer = load_model(args)
    name = args.served_name or ("specmoe-reference" if args.model == REFERENCE else args.model)
    config = smoe.model.config.get_text_config()
    context = int(getattr(config, "max_position_embeddings", 0) or getattr(tokenizer, "model_max_length", 2048))
    worker = Worker(smoe, pad_token_id(smoe, tokenizer), queue_size=args.queue_size)
    app = App(worker, tokenizer, name, context, max_tokens=args.max_tokens)
    try:
        server = make_server(app, args.host, args.port)
    except OSError as err:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="specmoe-serve-http",
                              daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    print(f"specmoe serve: {name} on http://{host}:{port}/v1 (context {context} tokens, "
          f"{smoe.num_slots} expert slots); Ctrl-C stops", flush=True)
    while not stop.wait(0.5):
        if not worker.thread.is_alive():
            print("specmoe serve: the worker stopped; shutting down", file=sys.stderr)
            break
    server.shutdown()  # no new connections; the running request is cancelled at its next token
    worker.stop()
    server.server_close()
    thread.join(5)
    print("specmoe serve: stopped", flush=True)
    return 0
