"""OpenAI-compatible HTTP server for DiffusionGemma (FastAPI + uvicorn).

``create_app(engine, model_name)`` builds the app; ``serve(checkpoint, host, port, **engine_kwargs)``
loads a checkpoint and runs it with uvicorn.

Endpoints:

- ``GET /health``: ``{"status": "ok", "model": ...}``; 503 while shutting down or when the engine does not answer.
- ``GET /v1/models``: the one model this server holds.
- ``GET /v1/models/{id}``: that model, or 404.
- ``POST /v1/completions``: ``prompt`` is a string (tokenized with BOS) or a list of token ids, or a
  list of either: a batch, answered with one choice per prompt (each its own engine request, as if
  sent alone; not streamed; at most ``max_running + max_queue`` prompts, and a queue that cannot take
  them all is a 429 for the whole request).
- ``POST /v1/chat/completions``: ``messages`` go through the checkpoint's chat template.
- ``GET /metrics``: Prometheus text format (queue depth, requests in flight, active rows, decoder
  passes, steps/s, tokens/s, completed requests, generated tokens, KV blocks in use, reserved for
  admitted requests, and in all). Its requests are the engine's: one per prompt of a list and per
  choice of ``n`` (each encodes its prompt, so the prompt tokens count once per choice there).

Requests are batched continuously by the engine's native scheduler: up to ``max_running``
requests (default: the engine's ``max_batch_size``) are handed to it at once, each from a worker
thread that waits for it, and they share every decoder pass; a request joins between two
denoising steps as soon as a row and its KV blocks are free and leaves as soon as it is done. The
event loop stays free, so health checks, metrics and streaming continue meanwhile. At most
``max_queue`` further requests may wait for a worker; beyond that the answer is 429 (with
``Retry-After: 1``). A request's output depends only on its own prompt, parameters and seed, not
on what else is running.

Request fields: ``model`` (must be the served model's name), ``max_tokens`` (default 256; also
``max_completion_tokens`` for chat), ``seed`` (int, default 0), ``stream`` (bool), and the
DiffusionGemma sampler fields ``max_denoising_steps``, ``entropy_bound``, ``t_min``, ``t_max``,
``stability_threshold``, ``confidence_threshold`` (passed to ``Engine.generate``; out-of-range
values are answered with 400). DiffusionGemma's sampler has its own temperature schedule (``t_min``
to ``t_max``): OpenAI's ``temperature`` (0 to 2) scales the checkpoint's schedule (1 keeps it, 0.5
halves both ends; 0 scales it by 1/100, which samples each step's argmax in practice), and cannot be
combined with ``t_min`` / ``t_max`` unless it is the neutral 1. ``stop`` (a string or up to 4) ends the text before the first
stop sequence, which is not returned (``finish_reason`` ``"stop"``); the request ends with the canvas
that completes it, and a stream's text never holds part of one (its drafts may). What OpenAI clients
send by default and asks for nothing is accepted (``top_p`` 1, ``presence_penalty`` / ``frequency_penalty`` 0,
``best_of`` 1, empty ``logit_bias``, ``response_format`` ``text``, ``tools`` with ``tool_choice``
``"none"``, ``modalities`` ``["text"]``); anything else of those, ``echo``, ``logprobs``, ``top_logprobs``,
``audio``, ``reasoning_effort``, ``verbosity``, ``web_search_options`` and a ``tool_choice`` /
``function_call`` without tools is a 400 (chat's ``logprobs: false`` is accepted, as it asks for nothing).
OpenAI fields that never change an answer are accepted and ignored (``user``,
``stream_options.include_obfuscation``; on chat also ``metadata``, ``store``, ``service_tier``,
``prediction``, ``prompt_cache_key``, ``safety_identifier``, ``parallel_tool_calls`` and a message's
``annotations``); any other field is a 400 "Unrecognized request argument
supplied" naming it (a misspelt field, or another server's extension such as ``top_k``), as OpenAI
answers. Chat messages take the roles ``system``, ``developer`` (as ``system``), ``user``,
``assistant``, ``tool`` and ``function``; ``content`` may be null only in an assistant or function turn; ``name``,
``tool_calls``, ``tool_call_id``, ``function_call`` and ``refusal`` go to the chat template with role and
content, which decides what they mean. Chat's ``max_completion_tokens`` wins over ``max_tokens`` when both are sent.

Per-request work is capped by the operator (``create_app``/``serve`` arguments, ``dgemma-rt serve``
flags): ``max_tokens`` at most ``max_request_tokens`` (default 8192), ``max_denoising_steps`` and
``stability_threshold`` at most ``max_request_steps`` (default 256); larger values get a 400 naming
the field and the limit. Text the tokenizer cannot take (a lone surrogate such as ``"\\ud800"``) is a 400.

Generation comes in whole canvases: the text is cut to ``max_tokens`` tokens. ``finish_reason`` is
``"stop"`` when an EOS or pad id or a stop sequence ended the text within ``max_tokens`` tokens, else
``"length"``. Without ``seed`` a request uses seed 0: the same request gives the same text (send a
seed per request for varied answers). ``n`` asks for several choices per prompt: choice
``j`` is what the prompt gets alone with seed ``seed + j`` (mod 2**64), and a prompt list's choice
``i * n + j`` belongs to prompt ``i``; ``usage`` counts each prompt once. ``usage``
holds ``prompt_tokens``, ``completion_tokens`` (tokens of the returned text, EOS not counted),
``total_tokens`` and ``denoising_steps`` (decoder passes spent on the request).

Streaming (``stream: true``) uses server-sent events in the OpenAI chunk format. Committed text
arrives as ordinary ``delta.content`` (chat) / ``text`` (completions) chunks, one per committed
canvas. In addition, every denoising step sends a chunk with an empty delta and the extension field
``"dgemma_draft": {"canvas": i, "step": s, "text": "..."}``: the decoded argmax draft of canvas ``i``
(0-based) after its step ``s`` (1-based), cut at the first EOS/pad, so clients can show text
settling. Clients that do not know the field ignore it. The last chunk carries ``finish_reason`` and
``usage``, or, with ``stream_options: {"include_usage": true}``, ``finish_reason`` only, followed by a
chunk with no choices that holds the ``usage``, as OpenAI sends it; then ``data: [DONE]``. With ``n``
every chunk holds one choice, named by its ``index``; each choice has its own finish chunk, and the
request's ``usage`` comes once: on the finish chunk of the choice that finishes last (or in the chunk
with no choices after it). The JSON
is ASCII (other characters escaped). An error after the stream started is sent as
``data: {"error": {...}}``.

Infilling: ``/v1/completions`` takes the OpenAI ``suffix`` field (text, or token ids with a token-id
prompt). The prompt is the prefix; the new canvases are a template whose locked positions hold the
suffix so that it ends the last canvas, and the free positions before it (at least ``max_tokens``)
are generated around it. The answer is that middle, cut at its first EOS and to ``max_tokens``
tokens; EOS stopping is off (every free position is denoised around the suffix). Streaming drafts
show the middle settling before the suffix: their ``text`` is the canvas's middle draft (cut at its
first EOS/pad) followed by the suffix text, so the committed text so far plus the latest draft reads
prefix, middle, suffix as it settles. Extension field ``canvas_template`` (both routes): token ids
over the new tokens, -1 where free, at most ``max_tokens`` long, as
``Engine.generate(canvas_template=...)``; not together with ``suffix``.

A client that disconnects cancels its request (``Request.cancel()``), streaming or not: it leaves
the batch at the next denoising step, or the queue at once, and its KV blocks return to the pool.

``serve`` shuts down on SIGINT/SIGTERM within seconds: new requests get 503, running ones are
cancelled (non-streaming clients get a 503, streams an error event) and the process exits.

Errors use the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed
JSON, wrong types, empty or too long prompts, bad sampler values, values over the server's caps; 404
for an unknown model; 413 for bodies over ``max_body_bytes``; 429 when the queue is full; 503 while
shutting down.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal, Optional, Union

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("dgemma_rt.server needs fastapi and uvicorn: pip install fastapi uvicorn") from e

from dgemma_rt.text import check_text

__all__ = ["create_app", "serve"]

_Number = Union[StrictInt, StrictFloat]
_SAMPLER_FIELDS = (
    "max_denoising_steps",
    "entropy_bound",
    "t_min",
    "t_max",
    "stability_threshold",
    "confidence_threshold",
)


# ---------------------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _refused_by_the_pool(e: BaseException) -> bool:
    """The engine's refusal of a request its KV pool cannot hold (at admission, nothing run)."""
    return isinstance(e, RuntimeError) and "KV cache pool too small" in str(e)


def _engine_error(e: BaseException) -> APIError:
    """Maps an exception from Engine.generate to an API error."""
    if isinstance(e, ValueError):
        msg = str(e)
        code = "context_length_exceeded" if "max_position_embeddings" in msg else None
        # The engine's argument errors begin with the argument's name: the request field of the same name.
        param = next((name for name in _SAMPLER_FIELDS if msg.startswith(name + " ")), None)
        return APIError(400, msg, param=param, code=code)
    if isinstance(e, _Cancelled):
        return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    if _refused_by_the_pool(e):
        # The engine refuses a request only when its pool could never hold it.
        return APIError(400, f"request does not fit the KV cache: {e}", code="kv_cache_exhausted")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


class _Cancelled(Exception):
    """Raised from the engine callbacks to abort a request whose client went away."""


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of ``stops`` begins in ``text`` (the earliest of them), or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


# ---------------------------------------------------------------------------------------- schema
class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: Optional[StrictBool] = None
    include_obfuscation: Optional[StrictBool] = None  # pads chunks against side channels: asks for nothing here


class _Request(BaseModel):
    # A field the schema does not name is a 400 ("Unrecognized request argument supplied", as OpenAI
    # answers), never ignored: a typo or another server's extension (top_k, min_p, ...) would otherwise
    # change nothing without a word. OpenAI fields that ask for nothing this server could change (user,
    # metadata, store, ...) are declared and ignored; those that ask for something it cannot do are
    # declared and refused unless neutral (common()).
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    user: Any = None
    max_tokens: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[_StreamOptions] = None
    temperature: Optional[_Number] = None
    top_p: Optional[_Number] = None
    n: Optional[StrictInt] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    logprobs: Any = None
    presence_penalty: Optional[_Number] = None
    frequency_penalty: Optional[_Number] = None
    logit_bias: Optional[dict[str, Any]] = None
    max_denoising_steps: Optional[StrictInt] = None
    entropy_bound: Optional[_Number] = None
    t_min: Optional[_Number] = None
    t_max: Optional[_Number] = None
    stability_threshold: Optional[StrictInt] = None
    confidence_threshold: Optional[_Number] = None
    canvas_template: Optional[list[StrictInt]] = None  # extension: see the module docstring


class CompletionRequest(_Request):
    # OpenAI's four forms: a string, token ids, and one-element lists of either (LangChain, lm-eval).
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]
    suffix: Optional[Union[StrictStr, list[StrictInt]]] = None
    echo: Optional[StrictBool] = None
    best_of: Optional[StrictInt] = None


class _ContentPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: StrictStr
    content: Union[StrictStr, list[_ContentPart], None] = None
    # Passed to the chat template with role and content, which decides what they mean (transformers'
    # convention; Gemma's template ignores name and refusal).
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[Any]] = None
    tool_call_id: Optional[StrictStr] = None
    function_call: Any = None
    refusal: Optional[StrictStr] = None  # an earlier assistant turn's refusal text
    audio: Any = None  # an earlier assistant turn's audio: refused (text only)
    annotations: Any = None  # an earlier reply's URL citations (the SDK's model_dump() sends null): history only


_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ChatRequest(_Request):
    messages: list[_Message]
    max_completion_tokens: Optional[StrictInt] = None
    top_logprobs: Any = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    functions: Optional[list[Any]] = None
    function_call: Any = None
    parallel_tool_calls: Optional[StrictBool] = None  # without tools it asks for nothing (tools are refused)
    # Asked of a model that has no such output or mode: refused unless absent (common()).
    modalities: Optional[list[StrictStr]] = None
    audio: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    # Ask for nothing this server could change: accepted and ignored.
    metadata: Any = None
    store: Optional[StrictBool] = None
    service_tier: Any = None
    prediction: Any = None  # predicted output speeds up OpenAI's decoding; it never changes the answer
    prompt_cache_key: Any = None
    safety_identifier: Any = None


# ---------------------------------------------------------------------------------------- state
class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting = 0  # accepted, not yet picked up by a worker (one may be free and about to)
        self.running = 0
        # invalid: refused by the engine as a bad request (a 4xx: sampler values it checks, a request its KV
        # pool could never hold); failed: anything else (a 5xx), which is what an alert should watch.
        self.outcomes = {"completed": 0, "cancelled": 0, "invalid": 0, "failed": 0}
        self.rejected = 0  # 429
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.denoising_steps = 0


class _Job:
    def __init__(self, prompt_ids: list[int], max_tokens: int, seed: int, gen_kwargs: dict[str, Any], stream: bool,
                 template: list[int] | None = None, middle: int | None = None, stop: list[str] | None = None,
                 include_usage: bool = False):
        self.prompt_ids = prompt_ids
        # Stop sequences: the text ends before the first one, which is not returned; the request ends with the
        # canvas that completes it.
        self.stop = stop or []
        self.include_usage = include_usage
        self.max_tokens = max_tokens
        # A canvas template over the new tokens; with a suffix (infilling) the answer is its first
        # `middle` positions (the free ones before the locked suffix), cut at the first EOS there.
        self.template = template
        self.middle = middle
        self.new_tokens = len(template) if middle is not None else max_tokens
        self.suffix_text = ""  # infilling: the fixed text after the middle, appended to every draft
        self.seed = seed
        self.invalid = False  # refused by the engine as a bad request (its arguments, or too big for the pool)
        self.gen_kwargs = gen_kwargs
        self.stream = stream
        self.cancel = threading.Event()
        self.native: Any = None  # the engine's Request, once submitted
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue | None = None  # a stream's, shared by its n choices
        self.choice = 0  # its index in the stream's choices: events go out as (choice, kind, ...)

    def abort(self) -> None:
        """Cancels the request wherever it is (any thread).

        Takes no lock, so that it is safe wherever it runs: the event is set before ``native`` is
        read, and ``_generate`` stores ``native`` before it reads the event, so one of the two cancels.
        """
        self.cancel.set()
        native = self.native
        if native is not None:
            native.cancel()

    def push(self, *event: Any) -> None:
        """Hands an event from the worker thread to the request's async generator."""
        if self.queue is None or self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.choice, *event))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.abort()


class _Backend:
    """The engine, the worker threads that wait for its requests, and the counters."""

    def __init__(self, engine: Any, max_queue: int, max_running: int):
        self.engine = engine
        self.shutting_down = False
        self.tok = engine.tokenizer
        self.max_queue = max_queue
        self.max_running = max_running
        self.stats = _Stats()
        self.executor = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="dgemma-worker")
        self.rate_lock = threading.Lock()
        st = engine.scheduler_stats()  # the first scrape's rates: since the server started
        self.last_sample: tuple[float, int, int] | None = (time.monotonic(), st["decoder_passes"],
                                                           st["committed_tokens"])  # (time, passes, tokens)
        self.last_progress: tuple[tuple[int, ...], float] | None = None  # (scheduler counters, when they last moved)
        self.jobs: set[_Job] = set()
        g = engine.generation_defaults
        eos = g.get("eos_token_id")
        self.eos = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
        self.pad = g.get("pad_token_id")
        self.stop_ids = set(self.eos) | ({int(self.pad)} if self.pad is not None else set())
        self.canvas = int(engine.config.get("canvas_length", 1))
        self.max_pos = int(engine.config.get("max_position_embeddings", 1 << 62))

    # -------------------------------------------------------------- admission (event loop)
    def submit_all(self, jobs: list[_Job]) -> list[Any]:
        """Hands all of ``jobs`` to the workers, or none of them (429 when the queue cannot take them all)."""
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        with self.stats.lock:
            # Requests that really wait for a worker: those beyond the max_running the workers hold.
            # A request an idle worker is about to pick up does not count.
            if self.stats.waiting + self.stats.running + len(jobs) > self.max_running + self.max_queue:
                self.stats.rejected += len(jobs)  # /metrics counts the engine's requests: a choice is one
                what = "full" if len(jobs) == 1 else f"too full for {len(jobs)} choices"
                # Retry-After: OpenAI's clients wait that long before their retry instead of backing off blind.
                raise APIError(429, f"the server queue is {what} ({self.max_queue} requests may wait); retry later",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            self.stats.waiting += len(jobs)
        futures = []
        for i, job in enumerate(jobs):
            self.jobs.add(job)
            try:
                futures.append(self._start(job))
            except RuntimeError:  # executor shut down: the jobs not handed over do not wait
                with self.stats.lock:
                    self.stats.waiting -= len(jobs) - i
                for j in jobs[i:]:
                    self.jobs.discard(j)
                for j, f in zip(jobs, futures):
                    j.abort()
                    f.cancel()
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        return futures

    def _start(self, job: _Job):
        future = self.executor.submit(self._run, job)

        def never_ran(f: Any) -> None:
            if f.cancelled():  # dropped from the executor's queue before _run started
                with self.stats.lock:
                    self.stats.waiting -= 1
                    self.stats.outcomes["cancelled"] += 1
                self.jobs.discard(job)
                job.push("cancelled")

        future.add_done_callback(never_ran)
        return future

    # -------------------------------------------------------------- worker thread
    def _run(self, job: _Job) -> dict[str, Any]:
        with self.stats.lock:
            self.stats.waiting -= 1
            self.stats.running += 1
        outcome = "failed"
        try:
            if job.cancel.is_set():
                raise _Cancelled()
            result = self._generate(job)
            outcome = "completed"
            with self.stats.lock:
                self.stats.prompt_tokens += result["prompt_tokens"]
                self.stats.generated_tokens += result["completion_tokens"]
                self.stats.denoising_steps += result["denoising_steps"]
            job.push("done", result)
            return result
        except _Cancelled:
            outcome = "cancelled"
            job.push("cancelled")
            raise
        except BaseException as e:
            if job.invalid:
                outcome = "invalid"
            job.push("error", e)
            raise
        finally:
            with self.stats.lock:
                self.stats.running -= 1
                self.stats.outcomes[outcome] += 1
            self.jobs.discard(job)

    def _cut(self, ids: Any) -> tuple[list[int], bool]:
        """Ids up to the first EOS/pad, and whether one was found."""
        out: list[int] = []
        for t in ids:
            t = int(t)
            if t in self.stop_ids:
                return out, True
            out.append(t)
        return out, False

    def _tokens_for(self, ids: list[int], text: str) -> int:
        """The fewest leading tokens of ``ids`` whose text begins with ``text`` (bisection): a character split
        over several tokens counts all of them (its first bytes alone decode to U+FFFD)."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.tok.decode(ids[:mid]).startswith(text):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _generate(self, job: _Job) -> dict[str, Any]:
        tok = self.tok
        canvas_i = 0
        step_i = 0
        steps = 0
        new_ids: list[int] = []
        done = False  # EOS or max_tokens reached in the streamed text
        emitted = ""

        from dgemma_rt.engine import RequestCancelled, StopGeneration

        # Raised from a callback, RequestCancelled ends the engine's request at once, as cancelled, and
        # StopGeneration after the canvas just committed, as done.
        def on_step(draft: Any) -> None:
            nonlocal step_i, steps
            if job.cancel.is_set():
                raise RequestCancelled("the client went away")
            steps += 1
            step_i += 1
            if job.stream and not done:
                row = draft[0]
                if job.middle is not None:  # only the middle's positions of this canvas, then the fixed suffix
                    row = row[: max(0, job.middle - canvas_i * self.canvas)]
                ids, _ = self._cut(row)
                job.push("draft", canvas_i, step_i, tok.decode(ids) + job.suffix_text)

        hold = max((len(s) for s in job.stop), default=1) - 1  # what a stop sequence may still complete

        def on_block(block: Any) -> None:
            nonlocal canvas_i, step_i, done, emitted
            if job.cancel.is_set():
                raise RequestCancelled("the client went away")
            canvas_i += 1
            step_i = 0
            if done or not (job.stream or job.stop):
                return
            row = block[0]
            if job.middle is not None:
                row = row[: max(0, job.middle - (canvas_i - 1) * self.canvas)]
            ids, hit = self._cut(row)
            new_ids.extend(ids)
            if hit or len(new_ids) >= job.max_tokens:
                done = True
                del new_ids[job.max_tokens :]
            text = tok.decode(new_ids)
            # Not over a character whose last bytes the next canvas may bring (decoded as U+FFFD for now).
            cut = _find_stop(text if done else text.rstrip("\ufffd"), job.stop)
            if cut is not None:
                text = text[:cut]
                done = True
            if not done:
                text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence may complete in the next canvas
                text = text[: max(0, len(text) - hold)]  # the start of a stop sequence the next canvas may complete
            if job.stream and text.startswith(emitted) and len(text) > len(emitted):
                job.push("delta", text[len(emitted) :])
                emitted = text
            if cut is not None:
                raise StopGeneration  # no canvas after this one is denoised

        extra: dict[str, Any] = {}
        if job.template is not None:
            extra["canvas_template"] = [job.template]
        if job.middle is not None:
            extra["eos_token_id"] = None  # denoise the whole middle, as Engine.infill does; it is cut below
        try:
            native = self._submit(job, extra, on_step, on_block)
        except ValueError:  # the engine's argument checks
            job.invalid = True
            raise
        with job.lock:
            job.native = native
            cancelled = job.cancel.is_set()
        if cancelled:
            native.cancel()
        try:
            out = native.result()
        except RequestCancelled:
            raise _Cancelled() from None
        except RuntimeError as e:
            job.invalid = _refused_by_the_pool(e)  # never fits (admission), not a failure mid-way
            raise
        return self._finish(job, out, steps, emitted)

    def _submit(self, job: _Job, extra: dict[str, Any], on_step: Any, on_block: Any) -> Any:
        return self.engine.submit(
            [job.prompt_ids],
            max_new_tokens=job.new_tokens,
            seed=job.seed,
            **extra,
            on_step=on_step,
            on_block=on_block,
            keep_cache=False,  # the blocks go back to the pool the moment the request ends
            events=False,  # its own callbacks stream; nothing iterates the request
            **job.gen_kwargs,
        )

    def _finish(self, job: _Job, out: Any, steps: int, emitted: str) -> dict[str, Any]:
        tok = self.tok
        new = out.sequences[0][len(job.prompt_ids) :]
        if job.middle is not None:
            new = new[: job.middle]
        steps_total = int(sum(out.steps_per_canvas[0])) if out.steps_per_canvas else steps
        ids, hit = self._cut(new)
        finish = "stop" if hit and len(ids) <= job.max_tokens else "length"
        ids = ids[: job.max_tokens]
        text = tok.decode(ids)
        cut = _find_stop(text, job.stop)
        if cut is not None:  # a stop sequence (which ended the request at its canvas: out.stopped)
            text, finish = text[:cut], "stop"
            ids = ids[: self._tokens_for(ids, text)]  # the tokens the text needs
        tail = text[len(emitted) :] if text.startswith(emitted) else ""
        return {
            "text": text,
            "tail": tail,  # streamed text not sent yet
            "finish_reason": finish,
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": len(ids),
            "denoising_steps": steps_total,
        }

    def rates(self) -> tuple[float, float]:
        """Decoder passes/s and committed tokens/s since the previous call (the first: since the backend began)."""
        st = self.engine.scheduler_stats()
        now = time.monotonic()
        with self.rate_lock:
            prev, self.last_sample = self.last_sample, (now, st["decoder_passes"], st["committed_tokens"])
        if prev is None or now - prev[0] <= 0:
            return 0.0, 0.0
        dt = now - prev[0]
        return (st["decoder_passes"] - prev[1]) / dt, (st["committed_tokens"] - prev[2]) / dt

    def snapshot(self) -> dict[str, Any]:
        """The counters and gauges behind ``/metrics`` (and Ray's metrics in dgemma_rt.ray_serve), at one moment."""
        s = self.stats
        with s.lock:
            out: dict[str, Any] = {
                "waiting": s.waiting, "running": s.running, "outcomes": dict(s.outcomes), "rejected": s.rejected,
                "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
                "denoising_steps": s.denoising_steps,
            }
        out["kv"] = self.engine.kv_pool_stats()
        out["scheduler"] = self.engine.scheduler_stats()
        return out

    def health_problem(self, stall_timeout_s: float | None = None) -> str | None:
        """Why this backend cannot serve (None when it can): shutting down, an engine that no longer answers,
        or, with ``stall_timeout_s``, one that has had work but made no progress (no encoder or decoder pass,
        no request ended) for that many seconds. Progress is measured between calls, so call it periodically."""
        if self.shutting_down:
            return "the server is shutting down"
        try:
            st = self.engine.scheduler_stats()
        except Exception as e:  # noqa: BLE001 - any failure to answer is the problem
            return f"the engine does not answer: {type(e).__name__}: {e}"
        if stall_timeout_s is None:
            return None
        with self.stats.lock:
            accepted = self.stats.waiting + self.stats.running
        busy = accepted > 0 or st["active_rows"] > 0 or st["queued_requests"] > 0
        progress = (st["decoder_passes"], st["encoder_passes"], st["completed"], st["failed"], st["cancelled"])
        now = time.monotonic()
        with self.rate_lock:
            if not busy or self.last_progress is None or progress != self.last_progress[0]:
                self.last_progress = (progress, now)
                return None
            since = self.last_progress[1]
        if now - since > stall_timeout_s:
            return (f"the engine has made no progress for {now - since:.0f} s with {accepted} requests accepted "
                    f"({st['active_rows']} rows active, {st['queued_requests']} queued in the engine)")
        return None

    def shutdown(self) -> None:
        """Refuses new requests and cancels every accepted one (idempotent; any thread)."""
        self.shutting_down = True
        for job in list(self.jobs):
            job.abort()
        self.executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------- app
def _usage(r: dict[str, Any]) -> dict[str, int]:
    return {
        "prompt_tokens": r["prompt_tokens"],
        "completion_tokens": r["completion_tokens"],
        "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
        "denoising_steps": r["denoising_steps"],
    }


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


_KINDS = {"int": "a number", "float": "a number", "str": "a string", "bool": "true or false",
          "list[int]": "a list of token ids", "list[str]": "a list of strings",
          "list[list[int]]": "a list of token-id lists", "list[_ContentPart]": "a list of text parts"}


def _validation_message(errors: list[dict[str, Any]]) -> str:
    """pydantic's first error as "field: reason". A field of several types fails once per type (its loc ends
    with the type): the message then names the types it takes, or, when one type got further (a list of
    content parts whose part is wrong), that type's own error, instead of the first type's."""
    def where(e: dict[str, Any]) -> list[str]:
        return [str(p) for p in e.get("loc", ()) if p != "body"]

    def is_type(k: str) -> bool:  # a union's branch tag, not a field name or an index
        return k in _KINDS or "[" in k

    first = errors[0] if errors else {}
    loc = where(first)
    if len(loc) >= 2 and is_type(loc[-1]):
        prefix = loc[:-1]
        branches = [e for e in errors if where(e)[: len(prefix)] == prefix and len(where(e)) > len(prefix)
                    and is_type(where(e)[len(prefix)])]
        kinds = list(dict.fromkeys(where(e)[len(prefix)] for e in branches))
        if len(kinds) > 1:
            depth = max(len(where(e)) for e in branches)
            deepest = [e for e in branches if len(where(e)) == depth]
            if depth > len(prefix) + 1 and len({where(e)[len(prefix)] for e in deepest}) == 1:
                # one type got further than the others (a list of text parts with a wrong part): its error,
                # on the path without the type's name
                e = deepest[0]
                return f"{'.'.join(prefix + where(e)[len(prefix) + 1:])}: {e.get('msg', 'invalid value')}"
            takes = " or ".join(dict.fromkeys(_KINDS.get(k, k) for k in kinds))
            return f"{'.'.join(prefix)}: must be {takes}"
    return f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"


def _sse(obj: Any) -> str:
    # ASCII JSON: U+2028, U+2029 and U+0085 in the text would otherwise split the data line for clients
    # that read lines by str.splitlines() (httpx's iter_lines).
    return f"data: {json.dumps(obj)}\n\n"


class _CancellingStreamingResponse(StreamingResponse):
    """Cancels the jobs however the response ends (finished, client gone, never started)."""

    def __init__(self, content: Any, jobs: list[_Job], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._jobs = jobs

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            for job in self._jobs:
                job.abort()


class _BodyLimit:
    """ASGI middleware: answers 413 to request bodies over ``limit`` bytes (declared or actual)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"request body exceeds {self.limit} bytes", code="request_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    return await too_big.response()(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnect before the body was read
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                return await too_big.response()(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(
    engine: Any,
    model_name: str,
    max_queue: int = 64,
    max_body_bytes: int = 1 << 20,
    max_running: int | None = None,
    max_request_tokens: int = 8192,
    max_request_steps: int = 256,
    max_prompts: int | None = None,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app serving ``engine`` under the name ``model_name``.

    ``max_running``: requests handed to the engine's batcher at once (default: its ``max_batch_size``).
    ``max_request_tokens`` caps ``max_tokens``; ``max_request_steps`` caps ``max_denoising_steps``
    and ``stability_threshold``: the work one client may ask for. ``max_prompts``: the most choices one
    request may ask for, prompts of a completions list times ``n`` (default ``max_running + max_queue``, all
    the queue can hold).
    """
    if engine.tokenizer is None:
        raise no_tokenizer(engine.path)
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if max_running is None:
        max_running = int(getattr(engine, "max_batch_size", 1))
    if isinstance(max_running, bool) or not isinstance(max_running, int) or max_running <= 0:
        raise ValueError(f"max_running must be a positive integer, got {max_running!r}")
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
    for name, value in (("max_request_tokens", max_request_tokens), ("max_request_steps", max_request_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
            raise ValueError(f"{name} must be an integer in [1, 2**31 - 1], got {value!r}")
    backend = _Backend(engine, max_queue, max_running)
    if max_prompts is None:
        max_prompts = max_running + max_queue  # a batch of prompts is that many requests in the queue
    if isinstance(max_prompts, bool) or not isinstance(max_prompts, int) or max_prompts < 1:
        raise ValueError(f"max_prompts must be a positive integer, got {max_prompts!r}")
    default_steps = engine.generation_defaults.get("max_denoising_steps") or 48
    from dgemma_rt.engine import _SAMPLER_DEFAULTS

    gd = engine.generation_defaults
    default_t_min = float(gd["t_min"] if gd.get("t_min") is not None else _SAMPLER_DEFAULTS["t_min"])
    default_t_max = float(gd["t_max"] if gd.get("t_max") is not None else _SAMPLER_DEFAULTS["t_max"])
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        backend.shutdown()

    app = FastAPI(title="dgemma_rt", lifespan=lifespan)
    app.state.backend = backend
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    # ------------------------------------------------------------------ error handlers
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                            code="invalid_json").response()
        param = loc[0] if loc else None
        extra = [e for e in errors if e.get("type") == "extra_forbidden"]
        if extra:  # first: a misspelt field often explains the other errors (a required one missing)
            where = [str(p) for p in extra[0].get("loc", ()) if p != "body"]
            name = where[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in where[1:])
            return APIError(400, f"Unrecognized request argument supplied: {name}", param=where[0],
                            code="unrecognized_argument").response()
        if not loc and "json" not in request.headers.get("content-type", ""):
            return APIError(400, "the body must be a JSON object sent with Content-Type: application/json "
                            f"(got {request.headers.get('content-type') or 'no Content-Type'})",
                            code="invalid_json").response()
        return APIError(400, _validation_message(errors), param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        cause = exc.__cause__
        if exc.status_code == 400 and cause is not None:  # FastAPI's "error parsing the body": say which
            # (Python's own advice after a ';', "use sys.set_int_max_str_digits()", is not the client's to take)
            why = ("nested too deeply" if isinstance(cause, RecursionError)
                   else f"{type(cause).__name__}: {str(cause).split(';')[0]}")
            return APIError(400, f"malformed JSON body: {why}"[:500], code="invalid_json").response()
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        # Starlette's headers stay (a 405's Allow names the methods the route takes)
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    # ------------------------------------------------------------------ request handling
    def unsupported(param: str, what: str) -> APIError:
        return APIError(400, f"{what} is not supported", param=param, code="unsupported_parameter")

    def common(req: _Request, max_tokens: int | None, tokens_param: str = "max_tokens") -> tuple[int, int, dict[str, Any]]:
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        # What OpenAI clients send by default (LangChain: temperature 0.7, top_p 1, penalties 0, best_of 1,
        # logit_bias {}) is taken; what asks for something this sampler cannot do is a 400, never ignored.
        if req.top_p is not None and not 0 <= req.top_p <= 1:
            raise APIError(400, f"top_p must be in [0, 1], got {req.top_p}", param="top_p")
        if req.top_p is not None and req.top_p != 1:
            raise unsupported("top_p", "top_p below 1 (nucleus sampling)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0):
                raise unsupported(name, name.replace("_", " "))
        if req.logit_bias:
            raise unsupported("logit_bias", "logit_bias")
        if req.n is not None and req.n < 1:
            raise APIError(400, f"n must be a positive integer, got {req.n}", param="n")
        if isinstance(req, CompletionRequest):
            if req.echo:
                raise unsupported("echo", "echo")
            if req.best_of is not None and req.best_of != 1:
                raise unsupported("best_of", "best_of other than 1")
        if isinstance(req, ChatRequest):
            if req.response_format is not None and req.response_format.get("type", "text") != "text":
                raise unsupported("response_format", f"response_format {req.response_format.get('type')!r}")
            # Tools are taken only with tool_choice "none" (they ask for nothing then); a tool choice without
            # tools is OpenAI's 400 too.
            for tools, choice, tname, cname in ((req.tools, req.tool_choice, "tools", "tool_choice"),
                                                (req.functions, req.function_call, "functions", "function_call")):
                if tools and choice != "none":
                    raise unsupported(tname, "tool calling")
                if not tools and choice not in (None, "none"):
                    raise APIError(400, f"{cname} is only allowed when {tname} are specified", param=cname)
            if req.modalities is not None and req.modalities != ["text"]:
                raise unsupported("modalities", f"modalities {req.modalities} (this model answers in text only)")
            for name, what in (("audio", "audio output"), ("reasoning_effort", "reasoning_effort (no reasoning mode)"),
                               ("verbosity", "verbosity"), ("web_search_options", "web search")):
                if getattr(req, name) is not None:
                    raise unsupported(name, what)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        chat = isinstance(req, ChatRequest)
        # Chat's logprobs is a flag, and false asks for nothing; completions' is a count, and even 0
        # asks for the sampled tokens' log probabilities.
        if req.logprobs is not None and not (chat and req.logprobs is False):
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
        if chat and req.top_logprobs is not None:
            raise APIError(400, "top_logprobs are not supported", param="top_logprobs", code="unsupported_parameter")
        mt = min(256, max_request_tokens) if max_tokens is None else max_tokens
        if mt <= 0:
            raise APIError(400, f"{tokens_param} must be a positive integer, got {mt}", param=tokens_param)
        if mt > max_request_tokens:
            raise APIError(400, f"{tokens_param} {mt} exceeds this server's limit of {max_request_tokens} "
                           "(max_request_tokens)", param=tokens_param, code="limit_exceeded")
        steps = req.max_denoising_steps if req.max_denoising_steps is not None else default_steps
        for name, value in (("max_denoising_steps", steps), ("stability_threshold", req.stability_threshold)):
            if value is not None and value > max_request_steps:
                raise APIError(400, f"{name} {value} exceeds this server's limit of {max_request_steps} "
                               "(max_request_steps)", param=name, code="limit_exceeded")
        seed = 0 if req.seed is None else req.seed
        if not 0 <= seed < 2**64:
            raise APIError(400, f"seed must be in [0, 2**64), got {seed}", param="seed")
        if req.canvas_template is not None:
            vocab = int(engine.config["vocab_size"])
            if len(req.canvas_template) > mt:
                raise APIError(400, f"canvas_template has {len(req.canvas_template)} positions, more than max_tokens "
                               f"{mt}", param="canvas_template")
            bad = [t for t in req.canvas_template if t != -1 and not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"canvas_template holds {bad[0]}: a token id in [0, {vocab}) or -1 (free)",
                               param="canvas_template")
        kwargs = {name: getattr(req, name) for name in _SAMPLER_FIELDS if getattr(req, name) is not None}
        for name, value in kwargs.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise APIError(400, f"{name} must be finite", param=name)
        if req.temperature is not None:
            kwargs.update(temperature_schedule(req.temperature, "t_min" in kwargs or "t_max" in kwargs))
        return mt, seed, kwargs

    def choice_count(req: _Request, prompts: int = 1) -> int:
        """How many choices each prompt gets (n), checked against what one request may queue."""
        n = 1 if req.n is None else req.n
        if prompts * n > max_prompts:
            what = f"n={n}" if prompts == 1 else f"{prompts} prompts with n={n}"
            raise APIError(400, f"{what} asks for {prompts * n} choices, more than this server queues at once "
                           f"({max_prompts})", param="n", code="limit_exceeded")
        return n

    def include_usage(req: _Request) -> bool:
        return bool(req.stream and req.stream_options is not None and req.stream_options.include_usage)

    def stop_sequences(req: _Request) -> list[str]:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop holds {len(stops)} sequences: at most 4", param="stop")
        stops = [s for s in stops if s]  # "" stops nothing (some clients send it for "none")
        for s in stops:
            try:
                check_text(s, "stop")
            except ValueError as e:
                raise APIError(400, str(e), param="stop", code="invalid_text") from None
        return stops

    def temperature_schedule(temperature: float, explicit: bool) -> dict[str, float]:
        """OpenAI's temperature as DiffusionGemma's schedule: it scales the checkpoint's t_min / t_max (1: as
        configured); 0 scales them by 1/100, which samples each step's argmax in practice (greedy)."""
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and 0 <= temperature <= 2):
            raise APIError(400, f"temperature must be a number in [0, 2], got {temperature}", param="temperature")
        if explicit:
            if temperature == 1:  # neutral, and what some clients always send: the request's t_min / t_max stand
                return {}
            raise APIError(400, "give temperature or t_min / t_max, not both (temperature 1 goes with them)",
                           param="temperature")
        scale = max(float(temperature), 0.01)
        return {"t_min": default_t_min * scale, "t_max": default_t_max * scale}

    def check_prompt(ids: list[int], max_tokens: int, where: str = "prompt") -> None:
        vocab = int(engine.config["vocab_size"])
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        canvases = -(-max_tokens // backend.canvas)
        if len(ids) + canvases * backend.canvas > backend.max_pos:
            raise APIError(400, f"{where} ({len(ids)} tokens) plus {canvases * backend.canvas} new tokens exceeds the "
                           f"model's {backend.max_pos} positions", param="prompt",
                           code="context_length_exceeded")

    def _retrieved(f: Any) -> None:  # an outcome nobody awaits (the client left) is not reported as lost
        if not f.cancelled():
            f.exception()

    async def results(jobs: list[_Job], request: Request) -> list[dict[str, Any]] | None:
        """Submits the jobs (all or none: 429) and waits for all of them; None when the client disconnected
        first. However it ends early (a job fails, the client leaves, the server shuts down), the others are
        cancelled, and those still queued leave the queue at once."""
        futures = backend.submit_all(jobs)
        pending = [asyncio.wrap_future(f) for f in futures]
        for p in pending:
            p.add_done_callback(_retrieved)
        everything = asyncio.gather(*pending)
        everything.add_done_callback(_retrieved)

        def drop() -> None:
            for job, f in zip(jobs, futures):
                job.abort()
                f.cancel()  # still queued: dropped now (never_ran does the counting), else a no-op

        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({everything, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not everything.done():  # the client disconnected: nobody will read the answer
                drop()
                return None
            if any(p.cancelled() for p in pending):  # dropped from the queue: the server shuts down
                drop()
                raise _engine_error(_Cancelled())
            return everything.result()
        except APIError:
            raise
        except BaseException as e:
            drop()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise _engine_error(e) from None
        finally:
            gone.cancel()

    def total_usage(done: list[dict[str, Any]], n: int) -> dict[str, int]:
        """usage of a request's choices: each prompt once (choices i * n .. i * n + n - 1 share prompt i),
        every choice's completion tokens and denoising steps."""
        usage = {k: sum(_usage(r)[k] for r in done) for k in _usage(done[0])}
        usage["prompt_tokens"] = sum(r["prompt_tokens"] for r in done[::n])
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return usage

    async def run_batch(jobs: list[_Job], request: Request, chat: bool, n: int = 1):
        """Answers a non-streaming request: choice i is jobs[i] (prompt i // n, its choice i % n)."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        done = await results(jobs, request)
        if done is None:
            return Response(status_code=499)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": None,
                        "finish_reason": r["finish_reason"]} for i, r in enumerate(done)]
        else:
            choices = [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                       for i, r in enumerate(done)]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": choices, "usage": total_usage(done, n)}

    async def run(jobs: list[_Job], chat: bool, request: Request):
        """Answers a request of one prompt and its n = len(jobs) choices, as a stream when the jobs are."""
        if not jobs[0].stream:
            return await run_batch(jobs, request, chat, len(jobs))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        for j, job in enumerate(jobs):
            job.loop, job.queue, job.choice = loop, queue, j
        futures = backend.submit_all(jobs)

        def drop() -> None:
            for job, f in zip(jobs, futures):
                job.abort()
                f.cancel()  # still queued: dropped now (never_ran does the counting), else a no-op

        # Nothing is sent before the first event (errors raised before the first step become a plain 4xx
        # answer), so a client that leaves while the request waits for a worker, for KV blocks or for its
        # prefill is watched for here: it leaves the queue at once, as a non-streaming one does.
        getter = asyncio.ensure_future(queue.get())
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                drop()
                return Response(status_code=499)
            first = getter.result()
        except BaseException:
            drop()
            raise
        finally:
            getter.cancel()
            gone.cancel()
        if first[1] == "error":
            drop()
            raise _engine_error(first[2])

        def chunk(j: int, delta: Any = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
            if chat:
                choice = {"index": j, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name, "choices": [choice]}
            else:
                choice = {"index": j, "text": delta or "", "logprobs": None, "finish_reason": finish}
                obj = {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": [choice]}
            obj.update(extra)
            return obj

        def content(text: str) -> Any:
            return {"content": text} if chat else text

        async def events():
            event = first
            if chat:
                for j in range(len(jobs)):
                    yield _sse(chunk(j, {"role": "assistant", "content": ""}))
            done: dict[int, dict[str, Any]] = {}
            while True:
                j, kind, *data = event
                if kind == "draft":
                    yield _sse(chunk(j, None, dgemma_draft={"canvas": data[0], "step": data[1], "text": data[2]}))
                elif kind == "delta":
                    yield _sse(chunk(j, content(data[0])))
                elif kind == "done":
                    result = done[j] = data[0]
                    if result["tail"]:
                        yield _sse(chunk(j, content(result["tail"])))
                    if len(done) < len(jobs):  # the request's usage comes once, with its last choice
                        yield _sse(chunk(j, None, result["finish_reason"]))
                    else:
                        usage = total_usage([done[i] for i in range(len(jobs))], len(jobs))
                        # usage rides on the finish chunk; with stream_options.include_usage it comes instead as
                        # OpenAI sends it, in a last chunk with no choices (clients that add up chunks count it once).
                        if jobs[0].include_usage:
                            yield _sse(chunk(j, None, result["finish_reason"]))
                            last = chunk(j, None, usage=usage)
                            last["choices"] = []
                            yield _sse(last)
                        else:
                            yield _sse(chunk(j, None, result["finish_reason"], usage=usage))
                        yield "data: [DONE]\n\n"
                        return
                elif kind == "error":  # the other choices are cancelled as the response ends
                    yield _sse(_engine_error(data[0]).body())
                    yield "data: [DONE]\n\n"
                    return
                else:  # cancelled: by the client leaving (nobody reads this) or by the shutdown
                    if backend.shutting_down:
                        yield _sse(_engine_error(_Cancelled()).body())
                        yield "data: [DONE]\n\n"
                    return
                event = await queue.get()

        return _CancellingStreamingResponse(
            events(), jobs, media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        problem = backend.health_problem()
        if problem is not None:
            raise APIError(503, problem, type="server_error", code="unhealthy")
        return {"status": "ok", "model": model_name}

    model_card = {"id": model_name, "object": "model", "created": started, "owned_by": "dgemma_rt"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return model_card

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        max_tokens, seed, kwargs = common(req, req.max_tokens)
        # A list of strings or of token-id lists is a batch (LangChain sends up to 20): one choice per prompt,
        # each its own request to the engine (batched with everything else).
        many = isinstance(req.prompt, list) and bool(req.prompt) and not isinstance(req.prompt[0], int)
        prompts = list(req.prompt) if many else [req.prompt]
        if len(prompts) > 1 and req.stream:
            raise APIError(400, f"prompt holds {len(prompts)} prompts: a stream takes one", param="prompt",
                           code="unsupported_parameter")
        if len(prompts) > max_prompts:
            raise APIError(400, f"prompt holds {len(prompts)} prompts, more than this server queues at once "
                           f"({max_prompts})", param="prompt", code="limit_exceeded")
        n = choice_count(req, len(prompts))

        def encode_prompts() -> list[list[int]]:
            batch = []
            for i, prompt in enumerate(prompts):
                where = f"prompt[{i}]" if many else "prompt"
                if isinstance(prompt, str):
                    try:
                        ids = backend.tok.encode(prompt)  # "" is the BOS alone, as OpenAI takes it
                    except ValueError as e:  # text the tokenizer cannot take (a lone surrogate)
                        raise APIError(400, f"{where}: {e}", param="prompt", code="invalid_text") from None
                    if not ids:
                        raise APIError(400, f"{where} is empty (and the tokenizer adds no BOS)", param="prompt",
                                       code="empty_prompt")
                else:
                    if not prompt:
                        raise APIError(400, f"{where} is empty", param="prompt", code="empty_prompt")
                    ids = list(prompt)
                batch.append(ids)
            return batch

        # Tokenizing a body's worth of text takes about a second: not on the event loop, which serves everyone.
        batch = await run_in_threadpool(encode_prompts)
        template, middle = req.canvas_template, None
        if req.suffix is not None:
            if template is not None:
                raise APIError(400, "give suffix or canvas_template, not both", param="suffix")
            if isinstance(req.suffix, str):
                try:
                    suffix = (await run_in_threadpool(backend.tok.encode, req.suffix, add_special_tokens=False)
                              if req.suffix else [])
                except ValueError as e:
                    raise APIError(400, f"suffix: {e}", param="suffix", code="invalid_text") from None
            else:
                suffix = list(req.suffix)
                vocab = int(engine.config["vocab_size"])
                if any(not 0 <= t < vocab for t in suffix):
                    raise APIError(400, f"suffix token ids must lie in [0, {vocab})", param="suffix")
            # The suffix ends the last canvas; the free positions before it (at least max_tokens) are the middle.
            if max_tokens + len(suffix) > max_request_tokens:
                raise APIError(400, f"max_tokens plus the suffix ({max_tokens + len(suffix)} tokens) exceeds this "
                               f"server's limit of {max_request_tokens} (max_request_tokens)", param="suffix",
                               code="limit_exceeded")
            total = -(-(max_tokens + len(suffix)) // backend.canvas) * backend.canvas
            middle = total - len(suffix)
            template = [-1] * middle + suffix
        stops = stop_sequences(req)
        jobs = []
        for i, ids in enumerate(batch):
            check_prompt(ids, len(template) if middle is not None else max_tokens, f"prompt[{i}]" if many else "prompt")
            jobs += [_Job(ids, max_tokens, (seed + j) % 2**64, kwargs, bool(req.stream), template=template,
                          middle=middle, stop=stops, include_usage=include_usage(req)) for j in range(n)]
        if len(batch) > 1:
            return await run_batch(jobs, request, chat=False, n=n)
        if req.suffix is not None and req.stream:  # the drafts show the middle settling before it
            shown = req.suffix if isinstance(req.suffix, str) else backend.tok.decode(suffix)
            for job in jobs:
                job.suffix_text = shown
        return await run(jobs, chat=False, request=request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        # max_completion_tokens is OpenAI's current name (max_tokens is deprecated for chat): it wins when both are sent.
        if req.max_completion_tokens is not None:
            max_tokens, seed, kwargs = common(req, req.max_completion_tokens, "max_completion_tokens")
        else:
            max_tokens, seed, kwargs = common(req, req.max_tokens)
        if not req.messages:
            raise APIError(400, "messages is empty", param="messages", code="empty_prompt")
        n = choice_count(req)
        messages = []
        for i, m in enumerate(req.messages):
            c = m.content
            if m.role not in _ROLES:
                raise APIError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)}; got {m.role!r}",
                               param="messages")
            if c is None and m.role not in ("assistant", "function"):  # OpenAI's rule: only these may leave it out
                raise APIError(400, f"messages[{i}].content is required for role {m.role!r}", param="messages")
            if isinstance(c, list) and not c:
                raise APIError(400, f"messages[{i}].content is an empty list of parts", param="messages")
            if m.audio is not None:
                raise unsupported("messages", f"messages[{i}].audio (audio in the history)")
            text = "" if c is None else c if isinstance(c, str) else "".join(p.text for p in c)
            for what, value in (("content", text), ("name", m.name), ("tool_call_id", m.tool_call_id),
                                ("refusal", m.refusal)):
                if value is None:
                    continue
                try:
                    check_text(value, f"messages[{i}].{what}")
                except ValueError as e:  # a lone surrogate: the same 400 as in the prompt or the content
                    raise APIError(400, str(e), param="messages", code="invalid_text") from None
            # OpenAI's newer name for the system message (the current SDK sends it); chat templates know "system".
            message = {"role": "system" if m.role == "developer" else m.role, "content": text}
            for name in ("name", "tool_calls", "tool_call_id", "function_call", "refusal"):
                if getattr(m, name) is not None:
                    message[name] = getattr(m, name)
            messages.append(message)
        try:  # the checkpoint's template may take a while: not on the event loop, which serves everyone
            ids = await run_in_threadpool(backend.tok.apply_chat_template, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        if not ids:
            raise APIError(400, "the chat renders to an empty prompt", param="messages", code="empty_prompt")
        check_prompt(ids, max_tokens)
        jobs = [_Job(ids, max_tokens, (seed + j) % 2**64, kwargs, bool(req.stream), template=req.canvas_template,
                     stop=stop_sequences(req), include_usage=include_usage(req)) for j in range(n)]
        return await run(jobs, chat=True, request=request)

    @app.get("/metrics")
    async def metrics():
        snap = backend.snapshot()
        waiting, running, outcomes, rejected = snap["waiting"], snap["running"], snap["outcomes"], snap["rejected"]
        ptoks, gtoks, steps = snap["prompt_tokens"], snap["generated_tokens"], snap["denoising_steps"]
        kv, sched = snap["kv"], snap["scheduler"]
        steps_per_s, tokens_per_s = backend.rates()
        lines = [
            "# HELP dgemma_queue_depth Requests waiting: for a worker, or in the engine for a batch row / KV blocks.",
            "# TYPE dgemma_queue_depth gauge",
            f"dgemma_queue_depth {waiting + sched['queued_requests']}",
            "# HELP dgemma_active_rows Rows in the engine's batch now (denoised together each step).",
            "# TYPE dgemma_active_rows gauge",
            f"dgemma_active_rows {sched['active_rows']}",
            "# HELP dgemma_decoder_passes_total Batched decoder passes (denoising steps) run by the engine.",
            "# TYPE dgemma_decoder_passes_total counter",
            f"dgemma_decoder_passes_total {sched['decoder_passes']}",
            "# HELP dgemma_row_steps_total Rows denoised, summed over decoder passes.",
            "# TYPE dgemma_row_steps_total counter",
            f"dgemma_row_steps_total {sched['row_steps']}",
            "# HELP dgemma_steps_per_second Decoder passes per second since the previous scrape (the first: since "
            "the server started).",
            "# TYPE dgemma_steps_per_second gauge",
            f"dgemma_steps_per_second {steps_per_s:.3f}",
            "# HELP dgemma_tokens_per_second Committed (non-pad) tokens per second since the previous scrape (the "
            "first: since the server started).",
            "# TYPE dgemma_tokens_per_second gauge",
            f"dgemma_tokens_per_second {tokens_per_s:.3f}",
            "# HELP dgemma_requests_running Requests handed to the engine (batched or waiting in it).",
            "# TYPE dgemma_requests_running gauge",
            f"dgemma_requests_running {running}",
            "# HELP dgemma_requests_in_flight Requests accepted and not finished (waiting + running).",
            "# TYPE dgemma_requests_in_flight gauge",
            f"dgemma_requests_in_flight {waiting + running}",
            "# HELP dgemma_requests_total Finished requests by outcome (completed; cancelled; invalid: refused by "
            "the engine as a bad request, 4xx; failed: server errors, 5xx; rejected: queue full, 429).",
            "# TYPE dgemma_requests_total counter",
            *(f'dgemma_requests_total{{outcome="{k}"}} {v}' for k, v in outcomes.items()),
            f'dgemma_requests_total{{outcome="rejected"}} {rejected}',
            "# HELP dgemma_requests_completed_total Requests completed successfully.",
            "# TYPE dgemma_requests_completed_total counter",
            f"dgemma_requests_completed_total {outcomes['completed']}",
            "# HELP dgemma_prompt_tokens_total Prompt tokens of completed requests (a choice of n is a request).",
            "# TYPE dgemma_prompt_tokens_total counter",
            f"dgemma_prompt_tokens_total {ptoks}",
            "# HELP dgemma_generated_tokens_total Completion tokens returned by completed requests.",
            "# TYPE dgemma_generated_tokens_total counter",
            f"dgemma_generated_tokens_total {gtoks}",
            "# HELP dgemma_denoising_steps_total Denoising steps (decoder passes) of completed requests.",
            "# TYPE dgemma_denoising_steps_total counter",
            f"dgemma_denoising_steps_total {steps}",
            "# HELP dgemma_kv_blocks_in_use KV cache blocks in use, per pool.",
            "# TYPE dgemma_kv_blocks_in_use gauge",
            f'dgemma_kv_blocks_in_use{{pool="full"}} {kv["full_total"] - kv["full_free"]}',
            f'dgemma_kv_blocks_in_use{{pool="sliding"}} {kv["sliding_total"] - kv["sliding_free"]}',
            "# HELP dgemma_kv_blocks_reserved Free KV cache blocks promised to admitted requests, per pool.",
            "# TYPE dgemma_kv_blocks_reserved gauge",
            f'dgemma_kv_blocks_reserved{{pool="full"}} {kv["full_reserved"]}',
            f'dgemma_kv_blocks_reserved{{pool="sliding"}} {kv["sliding_reserved"]}',
            "# HELP dgemma_kv_blocks_total KV cache blocks, per pool.",
            "# TYPE dgemma_kv_blocks_total gauge",
            f'dgemma_kv_blocks_total{{pool="full"}} {kv["full_total"]}',
            f'dgemma_kv_blocks_total{{pool="sliding"}} {kv["sliding_total"]}',
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def no_tokenizer(checkpoint: str | os.PathLike) -> ValueError:
    """The refusal of a checkpoint without tokenizer.json (create_app, serve and ray_serve say it alike)."""
    return ValueError(f"{os.fspath(checkpoint)} has no tokenizer.json: the server needs one to read and write text")


def listen(host: str, port: int) -> list[Any]:
    """Listening TCP sockets on every address ``host`` resolves to ("" or "0.0.0.0" / "::": all interfaces), as
    asyncio's create_server (uvicorn's default) binds them, or a ValueError naming the address."""
    import socket

    sockets: list[Any] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # one socket per family, as asyncio does (no v4-mapped addresses)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(2048)  # uvicorn's backlog
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sockets


def serve(
    checkpoint: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_name: str | None = None,
    max_queue: int = 64,
    max_running: int | None = None,
    max_body_bytes: int = 1 << 20,
    max_request_tokens: int = 8192,
    max_request_steps: int = 256,
    shutdown_timeout: float = 10.0,
    log_level: str = "info",
    **engine_kwargs: Any,
) -> None:
    """Loads ``checkpoint`` into an Engine (``engine_kwargs`` go to ``Engine``) and serves it with uvicorn.

    On SIGINT/SIGTERM every accepted request is cancelled at once, so the process exits within a
    denoising step or so; ``shutdown_timeout`` seconds bound the wait for connections to close.
    """
    import sys

    import uvicorn

    from dgemma_rt.engine import Engine

    from dgemma_rt.text import lacks_tokenizer

    if lacks_tokenizer(checkpoint):  # create_app's refusal, before the load
        raise no_tokenizer(checkpoint)
    # Bound before the load (minutes for a large checkpoint): a busy port or a bad host is a ValueError at once,
    # and the port stays ours meanwhile (clients that connect early wait in the backlog).
    sockets = listen(host, port)
    try:
        engine = Engine(checkpoint, **engine_kwargs)
        name = model_name or os.path.basename(os.path.abspath(os.fspath(checkpoint)))  # "." names its directory
        app = create_app(engine, name, max_queue=max_queue, max_body_bytes=max_body_bytes, max_running=max_running,
                         max_request_tokens=max_request_tokens, max_request_steps=max_request_steps)
        backend = app.state.backend

        class Server(uvicorn.Server):
            async def shutdown(self, sockets: Any = None) -> None:
                # uvicorn waits for open connections before the app's lifespan shutdown runs; requests
                # still running would keep it waiting, so they are cancelled first.
                backend.shutdown()
                await super().shutdown(sockets=sockets)

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=shutdown_timeout)
        where = f"[{host}]" if ":" in host else host or "all interfaces"
        print(f"serving {name!r} on {where}:{sockets[0].getsockname()[1]} (requests name it as their \"model\")",
              file=sys.stderr)
        Server(config).run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
