"""The one thread that owns the model: requests wait in a bounded queue and run one at a time (batch 1).

A `Job` carries a request's token ids in and its new tokens out (a queue the HTTP thread reads as they come);
`job.cancel(reason)` (a stop string was reached, the answer is done, the client went away, the server is
shutting down) ends its generation at the next token; only "client" and "shutdown" count as cancelled. The worker never raises into the server: a failed generation is reported to its
job, and the next job runs. Counters and the runtime's figures are read from a snapshot the worker takes after
each job, so that a stats request never touches the model while it runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

logger = logging.getLogger(__name__)

END = object()  # the last item of a job's token queue


class Busy(Exception):
    """The queue is full (or the server is stopping); the request was not queued."""


class Job:
    """One generation: `ids` [1, T] in, new token ids out through `tokens` (ints, then END, or an Exception)."""

    def __init__(self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None):
        self.ids, self.max_new_tokens = ids, max_new_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.tokens: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.reason: str | None = None  # why it was cancelled (the first reason given)
        self.queued_at = time.perf_counter()
        self.started_at: float | None = None

    def cancel(self, reason: str) -> None:
        """End the generation at its next token: "stop" (a stop string), "done", "client" (it left),
        "shutdown"."""
        if self.reason is None:
            self.reason = reason
        self.cancelled.set()


class _Sink:
    """A transformers streamer: the prompt comes first (skipped), then each new token goes to the job's queue."""

    def __init__(self, job: Job):
        self.job, self.prompt_seen, self.count = job, False, 0
        self.first_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.count += 1
            if self.first_at is None:
                self.first_at = time.perf_counter()
            self.job.tokens.put(int(token))

    def end(self) -> None:
        pass


class _Cancel:
    """A stopping criterion: true once the job is cancelled (checked after every token)."""

    def __init__(self, job: Job):
        self.job = job

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.job.cancelled.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class Worker:
    """Run jobs on `smoe` one at a time, in the order they came.

    Args:
        smoe: the wrapped model (`SpeculativeMoE`).
        pad_token_id: what generate pads with.
        queue_size: jobs waiting at most (more are refused with `Busy`).
    """

    def __init__(self, smoe, pad_token_id: int | None, queue_size: int = 16):
        self.smoe, self.pad_token_id = smoe, pad_token_id
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._current: Job | None = None
        self._lock = threading.Lock()  # the counters and the snapshot
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "rejected_busy": 0, "prompt_tokens": 0,
                         "completion_tokens": 0, "busy_s": 0.0}
        self.last: dict = {}
        self._snapshot()
        self.thread = threading.Thread(target=self._run, name="specmoe-serve-worker", daemon=True)
        self.started = time.time()

    # ---- the server's side ---------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise Busy("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.counters["rejected_busy"] += 1
            raise Busy(f"{self._queue.maxsize} requests are already waiting; try again later") from None

    def stats(self) -> dict:
        """Counters, the queue, the last request's timings and the runtime's figures (as of the last job)."""
        with self._lock:
            return {"queued": self._queue.qsize(), "running": int(self._current is not None),
                    "uptime_s": round(time.time() - self.started, 3), **dict(self.counters),
                    "last_request": dict(self.last), "runtime": self._runtime, "memory": self._memory}

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, cancel the running one and those waiting, and end the thread."""
        self._stopping.set()
        current = self._current
        if current is not None:
            current.cancel("shutdown")
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.tokens.put(Busy("the server is shutting down"))
        self._queue.put(None)  # wakes the thread (room was just made)
        if self.thread.is_alive():
            self.thread.join(timeout)

    # ---- the worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._stopping.is_set():
                if job is not None:
                    job.tokens.put(Busy("the server is shutting down"))
                return
            if job.cancelled.is_set():  # the client left while it waited
                job.tokens.put(END)
                continue
            self._current = job
            try:
                self._generate(job)
            except Exception as err:  # never into the server: the job reports it, the next one runs
                logger.exception("generation failed")
                with self._lock:
                    self.counters["failed"] += 1
                job.tokens.put(err)
            finally:
                self._current = None

    def _generate(self, job: Job) -> None:
        from transformers import StoppingCriteriaList

        job.started_at = time.perf_counter()
        sink = _Sink(job)
        sampling = {"do_sample": False}
        if job.temperature > 0:
            if job.seed is not None:
                torch.manual_seed(job.seed)
            sampling = {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p}
        with torch.no_grad():
            self.smoe.generate(input_ids=job.ids, attention_mask=torch.ones_like(job.ids),
                               max_new_tokens=job.max_new_tokens, streamer=sink, pad_token_id=self.pad_token_id,
                               stopping_criteria=StoppingCriteriaList([_Cancel(job)]), **sampling)
        end = time.perf_counter()
        left = job.reason in ("client", "shutdown")  # read before END: after it the handler marks the job done
        job.tokens.put(END)
        first = sink.first_at or end
        with self._lock:
            self.counters["cancelled" if left else "completed"] += 1
            self.counters["prompt_tokens"] += int(job.ids.shape[1])
            self.counters["completion_tokens"] += sink.count
            self.counters["busy_s"] = round(self.counters["busy_s"] + end - job.started_at, 6)
            self.last = {"prompt_tokens": int(job.ids.shape[1]), "completion_tokens": sink.count,
                         "queued_s": round(job.started_at - job.queued_at, 6),
                         "ttft_s": round(first - job.started_at, 6),
                         "decode_tok_s": round((sink.count - 1) / (end - first), 3) if sink.count > 1 and end > first
                         else None}
        self._snapshot()

    def _snapshot(self) -> None:
        runtime, memory = self.smoe.stats.to_dict(), self.smoe.memory()
        with self._lock:
            self._runtime, self._memory = runtime, memory
