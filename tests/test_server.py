"""The OpenAI-compatible server (dgemma_rt.server) over loopback, on the built-in tiny checkpoint."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import dgemma_rt  # noqa: E402
from dgemma_rt.server import create_app  # noqa: E402
from dgemma_rt.tiny import make_tiny  # noqa: E402

MODEL = "tiny-dgemma"
STEPS = 4
FAST = {"max_denoising_steps": STEPS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """uvicorn.Server on a free loopback port, in a background thread."""

    def __init__(self, app):
        self.port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "server did not shut down"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny_server"))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return dgemma_rt.Engine(tiny_dir, num_threads=2)


@pytest.fixture(scope="module")
def server(engine):
    srv = _Server(create_app(engine, MODEL, max_queue=64, max_body_bytes=64 * 1024))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _pool_full(engine) -> bool:
    s = engine.kv_pool_stats()
    return s["full_free"] == s["full_total"] and s["sliding_free"] == s["sliding_total"]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"metric {name} not found in:\n{text}")


def _reference_text(engine, ids, max_tokens, seed=0):
    """What the server should answer: the engine's own output cut at EOS/pad and at max_tokens."""
    out = engine.generate([ids], max_new_tokens=max_tokens, seed=seed, **FAST)
    g = engine.generation_defaults
    stop = set(g["eos_token_id"]) | {g["pad_token_id"]}
    new = []
    hit = False
    for t in out.sequences[0][len(ids) :]:
        if int(t) in stop:
            hit = True
            break
        new.append(int(t))
    finish = "stop" if hit and len(new) <= max_tokens else "length"
    return engine.tokenizer.decode(new[:max_tokens]), len(new[:max_tokens]), finish


# ------------------------------------------------------------------------------------------ basics
def test_health_models(server):
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": MODEL}
    r = httpx.get(server.url + "/v1/models", timeout=10)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [MODEL]


def test_completion_matches_engine(client, engine):
    prompt = "the quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, seed=3, extra_body=FAST)
    ids = engine.tokenizer.encode(prompt)
    text, n, finish = _reference_text(engine, ids, 64, seed=3)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == n
    assert r.usage.total_tokens == len(ids) + n
    assert 1 <= r.usage.model_extra["denoising_steps"] <= STEPS

    # token-id prompts give the same answer
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=64, seed=3, extra_body=FAST)
    assert r2.choices[0].text == text


def test_max_tokens_truncates(client, engine):
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, extra_body=FAST)
    assert r.usage.completion_tokens <= 3
    text, n, finish = _reference_text(engine, engine.tokenizer.encode("hello"), 3)
    assert (r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason) == (text, n, finish)


def test_chat_matches_engine(client, engine):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why is the sky blue?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, extra_body=FAST)
    ids = engine.tokenizer.apply_chat_template(messages)
    text, n, finish = _reference_text(engine, ids, 64)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n


# ------------------------------------------------------------------------------------------ streaming
def test_stream_completion(client):
    kwargs = dict(model=MODEL, prompt="once upon a time", max_tokens=100, seed=7, extra_body=FAST)
    whole = client.completions.create(**kwargs)
    text, drafts, finishes, usage = "", [], [], None
    for chunk in client.completions.create(stream=True, **kwargs):
        extra = chunk.model_extra or {}
        if "dgemma_draft" in extra:
            drafts.append(extra["dgemma_draft"])
            assert chunk.choices[0].text == ""
        text += chunk.choices[0].text
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
            usage = chunk.usage
    assert text == whole.choices[0].text
    assert finishes == [whole.choices[0].finish_reason]
    assert drafts and all(isinstance(d["text"], str) and d["canvas"] >= 0 and d["step"] >= 1 for d in drafts)
    assert drafts[0]["canvas"] == 0
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.model_extra["denoising_steps"] == whole.usage.model_extra["denoising_steps"]
    assert usage.model_extra["denoising_steps"] == len(drafts) or finishes == ["stop"]


def test_stream_chat(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=64, extra_body=FAST)
    whole = client.chat.completions.create(**kwargs)
    content, roles, finishes, drafts = "", [], [], 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        assert chunk.object == "chat.completion.chunk"
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        content += delta.content or ""
        drafts += "dgemma_draft" in (chunk.model_extra or {})
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert roles == ["assistant"]
    assert content == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert 1 <= drafts <= STEPS


def test_stream_n_choices(client):
    """n streamed: each choice's chunks carry its index and add up to what it answers unstreamed (seed + j);
    every choice gets its finish chunk, and the request's usage (each prompt once) comes once, at the end."""
    kwargs = dict(model=MODEL, prompt="once upon a time", max_tokens=64, seed=7, extra_body=FAST)
    whole = client.completions.create(n=3, **kwargs)
    texts, finishes, usages, drafts = {}, {}, [], set()
    for chunk in client.completions.create(stream=True, n=3, **kwargs):
        c = chunk.choices[0]
        texts[c.index] = texts.get(c.index, "") + c.text
        if "dgemma_draft" in (chunk.model_extra or {}):
            drafts.add(c.index)
        if c.finish_reason:
            assert c.index not in finishes
            finishes[c.index] = c.finish_reason
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]
    assert [finishes[i] for i in range(3)] == [c.finish_reason for c in whole.choices]
    assert drafts == {0, 1, 2}
    assert len(usages) == 1 and usages[0].prompt_tokens == whole.usage.prompt_tokens
    assert usages[0].completion_tokens == whole.usage.completion_tokens

    chat = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=64, seed=2, extra_body=FAST)
    whole = client.chat.completions.create(n=2, **chat)
    content, roles, last = {}, [], None
    for chunk in client.chat.completions.create(stream=True, n=2, stream_options={"include_usage": True}, **chat):
        last = chunk
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        if c.delta.role:
            roles.append((c.index, c.delta.role))
        content[c.index] = content.get(c.index, "") + (c.delta.content or "")
    assert sorted(roles) == [(0, "assistant"), (1, "assistant")]
    assert [content[i] for i in range(2)] == [c.message.content for c in whole.choices]
    assert last.choices == [] and last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.total_tokens == whole.usage.total_tokens


def test_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 8, "stream": True, **FAST}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") and line.isascii() for line in lines)  # ASCII JSON: no U+2028 in a line
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in last


# ------------------------------------------------------------------------------------------ concurrency
def test_concurrent_clients_deterministic(client, server):
    """16 clients at once, half streaming: every reply complete, each the text the request gets alone."""
    n = 16
    prompts = [f"story number {i}" for i in range(n)]
    alone = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=64 * (1 + i % 2), seed=11,
                                          extra_body=FAST).choices[0].text
             for i, p in enumerate(prompts)}

    def one(i):
        p = prompts[i]
        kw = dict(model=MODEL, prompt=p, max_tokens=64 * (1 + i % 2), seed=11, extra_body=FAST)
        if i % 4 >= 2:
            text = ""
            finish = None
            for chunk in client.completions.create(stream=True, **kw):
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            return p, text, finish
        r = client.completions.create(**kw)
        return p, r.choices[0].text, r.choices[0].finish_reason

    m0 = httpx.get(server.url + "/metrics", timeout=10).text
    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    assert time.monotonic() - t0 < 60
    assert len(results) == n
    for p, text, finish in results:
        assert finish in ("stop", "length")
        assert text == alone[p]
    # They were batched: decoder passes carried several rows on average.
    m1 = httpx.get(server.url + "/metrics", timeout=10).text
    passes = _metric(m1, "dgemma_decoder_passes_total") - _metric(m0, "dgemma_decoder_passes_total")
    rows = _metric(m1, "dgemma_row_steps_total") - _metric(m0, "dgemma_row_steps_total")
    assert rows > 2 * passes > 0, (rows, passes)
    # same prompt + seed under concurrency: identical answers
    with ThreadPoolExecutor(4) as pool:
        same = list(pool.map(lambda _: one(0)[1], range(4)))
    assert same == [alone[prompts[0]]] * 4


# ------------------------------------------------------------------------------------------ disconnect
@pytest.mark.parametrize("n", [1, 3])
def test_disconnect_cancels_and_frees_kv(server, engine, n):
    """Every choice of the stream is cancelled and gives its KV blocks back."""
    before = _metric(httpx.get(server.url + "/metrics", timeout=10).text, 'dgemma_requests_total{outcome="cancelled"}')
    # a long request: 60 canvases, so it is still running when the client goes away
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 64 * 60, "stream": True,
            "max_denoising_steps": 8, "stability_threshold": 100, "n": n}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen += 1
                if seen >= 3:
                    break
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = httpx.get(server.url + "/metrics", timeout=10).text
        if (_metric(m, 'dgemma_requests_total{outcome="cancelled"}') >= before + n
                and _metric(m, "dgemma_requests_in_flight") == 0 and _pool_full(engine)):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"request not cancelled / KV not freed: {engine.kv_pool_stats()}\n{m}")
    # the server still answers
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4, **FAST}, timeout=30)
    assert r.status_code == 200


# ------------------------------------------------------------------------------------------ bad input
def _error_shape(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


OK = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **FAST}

BAD = [
    ("unknown model", "/v1/completions", {**OK, "model": "gpt-4"}, 404, "model"),
    ("missing model", "/v1/completions", {k: v for k, v in OK.items() if k != "model"}, 400, "model"),
    ("empty token prompt", "/v1/completions", {**OK, "prompt": []}, 400, "prompt"),
    ("prompt wrong type", "/v1/completions", {**OK, "prompt": 5}, 400, "prompt"),
    ("token out of vocab", "/v1/completions", {**OK, "prompt": [1, 99999999]}, 400, "prompt"),
    ("prompt too long", "/v1/completions", {**OK, "prompt": [7] * 9000}, 400, "prompt"),
    ("max_tokens zero", "/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", {**OK, "max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens string", "/v1/completions", {**OK, "max_tokens": "four"}, 400, "max_tokens"),
    ("seed float", "/v1/completions", {**OK, "seed": 1.5}, 400, "seed"),
    ("seed negative", "/v1/completions", {**OK, "seed": -1}, 400, "seed"),
    ("stream not bool", "/v1/completions", {**OK, "stream": "yes"}, 400, "stream"),
    ("temperature above 2", "/v1/completions", {**OK, "temperature": 2.5}, 400, "temperature"),
    ("temperature negative", "/v1/completions", {**OK, "temperature": -0.1}, 400, "temperature"),
    ("temperature and t_min", "/v1/completions", {**OK, "temperature": 0.5, "t_min": 0.1}, 400, "temperature"),
    ("temperature string", "/v1/completions", {**OK, "temperature": "hot"}, 400, "temperature"),
    ("top_p", "/v1/completions", {**OK, "top_p": 0.9}, 400, "top_p"),
    ("presence_penalty", "/v1/completions", {**OK, "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("frequency_penalty", "/v1/completions", {**OK, "frequency_penalty": -1}, 400, "frequency_penalty"),
    ("logit_bias", "/v1/completions", {**OK, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("echo", "/v1/completions", {**OK, "echo": True}, 400, "echo"),
    ("best_of", "/v1/completions", {**OK, "best_of": 3}, 400, "best_of"),
    ("two prompts, streamed", "/v1/completions", {**OK, "prompt": ["a", "b"], "stream": True}, 400, "prompt"),
    ("second prompt out of vocab", "/v1/completions", {**OK, "prompt": [[5, 6], [7, 10**9]]}, 400, "prompt"),
    ("second prompt empty", "/v1/completions", {**OK, "prompt": ["a", []]}, 400, "prompt"),
    ("empty token prompt in a list", "/v1/completions", {**OK, "prompt": [[]]}, 400, "prompt"),
    ("stream_options without stream", "/v1/completions", {**OK, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("stop not a string", "/v1/completions", {**OK, "stop": 5}, 400, "stop"),
    ("n=0", "/v1/completions", {**OK, "n": 0}, 400, "n"),
    ("n negative, chat", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": -1}, 400, "n"),
    ("n=0, streamed", "/v1/completions", {**OK, "n": 0, "stream": True}, 400, "n"),
    ("n not an integer", "/v1/completions", {**OK, "n": 1.5}, 400, "n"),
    ("steps zero", "/v1/completions", {**OK, "max_denoising_steps": 0}, 400, "max_denoising_steps"),
    ("t_min negative", "/v1/completions", {**OK, "t_min": -1.0}, 400, "t_min"),
    ("entropy_bound negative", "/v1/completions", {**OK, "entropy_bound": -0.5}, 400, "entropy_bound"),
    ("stability negative", "/v1/completions", {**OK, "stability_threshold": -1}, 400, "stability_threshold"),
    ("t_max string", "/v1/completions", {**OK, "t_max": "hot"}, 400, "t_max"),
    ("bad sampler, streamed", "/v1/completions", {**OK, "t_min": -1.0, "stream": True}, 400, "t_min"),
    ("too long, streamed", "/v1/completions", {**OK, "prompt": [7] * 9000, "stream": True}, 400, "prompt"),
    ("no messages", "/v1/chat/completions", {"model": MODEL, "messages": [], "max_tokens": 4}, 400, "messages"),
    ("messages wrong type", "/v1/chat/completions", {"model": MODEL, "messages": "hi", "max_tokens": 4}, 400, "messages"),
    ("message no role", "/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, 400, "messages"),
    ("chat unknown model", "/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("chat temperature", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ("chat json mode", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("chat tools", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tools"),
    ("chat max_completion_tokens zero", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0, "max_tokens": 4},
     400, "max_completion_tokens"),
]

HI = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **FAST}
# Asked of OpenAI, these change its answer; here each is a 400 naming the field, never accepted and ignored.
NOT_IGNORED = [
    ("misspelt field", "/v1/completions", {**OK, "max_tkens": 9}, "max_tkens", "Unrecognized request argument"),
    ("misspelt required field", "/v1/chat/completions", {**{k: v for k, v in HI.items() if k != "messages"},
                                                          "mesages": HI["messages"]}, "mesages", "mesages"),
    ("vLLM's top_k", "/v1/completions", {**OK, "top_k": 5}, "top_k", "top_k"),
    ("vLLM's ignore_eos", "/v1/chat/completions", {**HI, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ("response_format on completions", "/v1/completions", {**OK, "response_format": {"type": "json_object"}},
     "response_format", "response_format"),
    ("unknown message field", "/v1/chat/completions",
     {**HI, "messages": [{"role": "user", "content": "hi", "weight": 2}]}, "messages", "messages[0].weight"),
    ("unknown stream option", "/v1/completions", {**OK, "stream": True, "stream_options": {"usage": True}},
     "stream_options", "stream_options.usage"),
    ("audio output", "/v1/chat/completions", {**HI, "modalities": ["text", "audio"], "audio": {"voice": "alloy"}},
     "modalities", "text only"),
    ("audio alone", "/v1/chat/completions", {**HI, "audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio"),
    ("reasoning_effort", "/v1/chat/completions", {**HI, "reasoning_effort": "high"}, "reasoning_effort", "reasoning"),
    ("verbosity", "/v1/chat/completions", {**HI, "verbosity": "low"}, "verbosity", "verbosity"),
    ("web search", "/v1/chat/completions", {**HI, "web_search_options": {}}, "web_search_options", "web search"),
    ("tool_choice without tools", "/v1/chat/completions", {**HI, "tool_choice": "required"}, "tool_choice",
     "only allowed when tools"),
    ("named tool without tools", "/v1/chat/completions",
     {**HI, "tools": [], "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "tools"),
    ("function_call without functions", "/v1/chat/completions", {**HI, "function_call": "auto"}, "function_call",
     "only allowed when functions"),
    ("functions", "/v1/chat/completions", {**HI, "functions": [{"name": "f", "parameters": {}}]}, "functions",
     "tool calling"),
    ("unknown role", "/v1/chat/completions", {**HI, "messages": [{"role": "wizard", "content": "hi"}]}, "messages",
     "messages[0].role must be one of"),
    ("user content null", "/v1/chat/completions", {**HI, "messages": [{"role": "user", "content": None}]}, "messages",
     "messages[0].content is required for role 'user'"),
    ("user content no parts", "/v1/chat/completions", {**HI, "messages": [{"role": "user", "content": []}]},
     "messages", "empty list"),
    ("audio in the history", "/v1/chat/completions",
     {**HI, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "audio": {"id": "a"}},
                         {"role": "user", "content": "again"}]}, "messages", "messages[1].audio"),
    ("top_p above 1", "/v1/completions", {**OK, "top_p": 1.5}, "top_p", "top_p must be in [0, 1]"),
    ("second prompt out of vocab", "/v1/completions", {**OK, "prompt": [[5, 6], [7, 99999999]]}, "prompt",
     "prompt[1]: token id 99999999"),
]


@pytest.mark.parametrize("name,path,body,param,says", NOT_IGNORED, ids=[b[0] for b in NOT_IGNORED])
def test_what_changes_the_answer_is_never_ignored(server, name, path, body, param, says):
    err = _error_shape(httpx.post(server.url + path, json=body, timeout=30), 400)
    assert err["param"] == param and says in err["message"], err


def test_what_asks_for_nothing_is_accepted(server):
    """OpenAI fields that never change its answer (bookkeeping, caching hints, predicted output) are taken,
    and the answer is the one without them."""
    plain = httpx.post(server.url + "/v1/chat/completions", json={**HI, "seed": 3}, timeout=60)
    assert plain.status_code == 200, plain.text
    extra = {"user": "u", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "prompt_cache_key": "c",
             "safety_identifier": "s", "parallel_tool_calls": True, "modalities": ["text"], "tool_choice": "none",
             "function_call": "none", "prediction": {"type": "content", "content": "x"}}
    r = httpx.post(server.url + "/v1/chat/completions", json={**HI, "seed": 3, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        **HI, "seed": 3, "functions": [{"name": "f", "parameters": {}}], "function_call": "none",
        "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}})
    assert r.status_code == 200, r.text


class _TemplateSpy:
    """The real engine whose tokenizer records the messages given to the chat template (and renders "hi")."""

    def __init__(self, engine):
        self._engine = engine
        self.seen = []
        outer, tok = self, engine.tokenizer

        class Tok:
            def __getattr__(self, name):
                return getattr(tok, name)

            def apply_chat_template(self, messages, **kw):
                outer.seen.append(messages)
                return tok.encode("hi")

        self.tokenizer = Tok()

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_message_fields_reach_the_chat_template(engine):
    """name, tool_calls and tool_call_id go to the template with role and content, as transformers passes a
    message: the template decides what they mean (they used to be dropped, and a tool-call history then
    failed in the template as roles that do not alternate)."""
    spy = _TemplateSpy(engine)
    srv = _Server(create_app(spy, MODEL))
    try:
        call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
        messages = [{"role": "developer", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "?"}],
                     "name": "ann"},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                    {"role": "assistant", "content": None, "refusal": "no"},
                    {"role": "function", "name": "weather", "content": None}]
        r = httpx.post(srv.url + "/v1/chat/completions", json={**HI, "messages": messages}, timeout=60)
        assert r.status_code == 200, r.text
        # A reply sent back as the openai SDK's message.model_dump() (every field, null ones included).
        reply = openai.types.chat.ChatCompletionMessage(role="assistant", content="hi").model_dump()
        assert reply["annotations"] is None
        back = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                          json={**HI, "messages": [{"role": "user", "content": "hi"}, reply,
                                                   {"role": "user", "content": "more"}]})
        assert back.status_code == 200, back.text
        assert spy.seen[0] == [{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "Weather?", "name": "ann"},
                               {"role": "assistant", "content": "", "tool_calls": [call]},
                               {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
                               {"role": "assistant", "content": "", "refusal": "no"},
                               {"role": "function", "content": "", "name": "weather"}]
    finally:
        srv.stop()


def test_405_names_the_methods_allowed(server):
    r = httpx.get(server.url + "/v1/completions", timeout=30)
    _error_shape(r, 405)
    assert r.headers.get("allow") == "POST", r.headers


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input(server, name, path, body, status, param):
    r = httpx.post(server.url + path, json=body, timeout=30)
    err = _error_shape(r, status)
    if param is not None:
        assert err["param"] == param, err


def test_empty_prompt_is_the_bos(server, engine):
    """OpenAI takes prompt "": here the tokenizer's BOS alone."""
    ids = engine.tokenizer.encode("")
    assert ids and _completion(server, prompt="") == _completion(server, prompt=ids)
    assert _completion(server, prompt=[""]) == _completion(server, prompt=ids)


def test_body_without_json_content_type_says_so(server):
    r = httpx.post(server.url + "/v1/completions", content=json.dumps(OK),
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    err = _error_shape(r, 400)
    assert "Content-Type: application/json" in err["message"] and "x-www-form-urlencoded" in err["message"], err


def test_null_temperature_accepted(server):
    r = httpx.post(server.url + "/v1/completions", json={**OK, "temperature": None, "top_p": None}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def _completion(server, **body):
    r = httpx.post(server.url + "/v1/completions", json={**OK, "max_tokens": 64, "seed": 5, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_what_openai_clients_send_by_default_is_taken(server, engine):
    """LangChain's completions client always sends temperature 0.7, top_p 1, zero penalties, n 1, best_of 1,
    logit_bias {} and a one-element prompt list: neutral values are taken, and temperature scales the
    checkpoint's schedule (t_min / t_max), 1 keeping it as configured."""
    g = engine.generation_defaults
    t_min, t_max = g["t_min"] if g.get("t_min") is not None else 0.4, g["t_max"] if g.get("t_max") is not None else 0.8
    langchain = dict(prompt=["hello"], temperature=0.7, top_p=1, presence_penalty=0, frequency_penalty=0, n=1,
                     best_of=1, logit_bias={}, user="u")
    assert _completion(server, **langchain) == _completion(server, t_min=0.7 * t_min, t_max=0.7 * t_max)
    assert _completion(server, temperature=1) == _completion(server)
    # clients that always send temperature (LangChain: its default 0.7, or 1 set) can still pass t_min / t_max
    assert _completion(server, temperature=1, t_min=0.2, t_max=0.3) == _completion(server, t_min=0.2, t_max=0.3)
    assert _completion(server, temperature=0) == _completion(server, t_min=0.01 * t_min, t_max=0.01 * t_max)
    ids = engine.tokenizer.encode("hello")
    assert _completion(server, prompt=[ids]) == _completion(server, prompt=ids) == _completion(server)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, **FAST}
    for extra in ({"response_format": {"type": "text"}, "tools": [], "temperature": 0.3},
                  {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}):
        r = httpx.post(server.url + "/v1/chat/completions", json={**chat, **extra}, timeout=60)
        assert r.status_code == 200, r.text


def test_several_prompts_answer_one_choice_each(server, engine):
    """LangChain's OpenAI.batch / generate send up to 20 prompts in one request: choice i answers prompt i, as
    that prompt alone would be answered, and usage adds them up."""
    prompts = ["hello", "the story", "hello"]
    body = {**OK, "max_tokens": 32, "seed": 4}
    alone = [httpx.post(server.url + "/v1/completions", json={**body, "prompt": p}, timeout=60).json() for p in prompts]
    r = httpx.post(server.url + "/v1/completions", json={**body, "prompt": prompts}, timeout=60)
    assert r.status_code == 200, r.text
    together = r.json()
    assert [c["index"] for c in together["choices"]] == [0, 1, 2]
    assert [c["text"] for c in together["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert [c["finish_reason"] for c in together["choices"]] == [a["choices"][0]["finish_reason"] for a in alone]
    for k in ("prompt_tokens", "completion_tokens", "total_tokens", "denoising_steps"):
        assert together["usage"][k] == sum(a["usage"][k] for a in alone), k
    ids = [engine.tokenizer.encode(p) for p in prompts]
    as_ids = httpx.post(server.url + "/v1/completions", json={**body, "prompt": ids}, timeout=60).json()
    assert as_ids["choices"] == together["choices"]
    assert _pool_full(engine)


def test_n_choices_are_the_answers_to_consecutive_seeds(server, engine):
    """n asks for several choices per prompt: choice j is what the prompt gets alone with seed + j, a prompt
    list's choice i * n + j belongs to prompt i, and usage counts each prompt once."""
    body = {**OK, "max_tokens": 32, "seed": 9}
    prompts = ["hello", "the story"]
    alone = {(p, s): httpx.post(server.url + "/v1/completions", json={**body, "prompt": p, "seed": s},
                                timeout=60).json() for p in prompts for s in (9, 10, 11)}
    r = httpx.post(server.url + "/v1/completions", json={**body, "prompt": prompts, "n": 3}, timeout=120)
    assert r.status_code == 200, r.text
    got = r.json()
    assert [c["index"] for c in got["choices"]] == list(range(6))
    want = [alone[(p, s)]["choices"][0] for p in prompts for s in (9, 10, 11)]
    assert [(c["text"], c["finish_reason"]) for c in got["choices"]] == [(w["text"], w["finish_reason"]) for w in want]
    assert len({c["text"] for c in got["choices"][:3]}) > 1  # the seeds differ, and so do the answers
    usage = got["usage"]
    assert usage["prompt_tokens"] == sum(alone[(p, 9)]["usage"]["prompt_tokens"] for p in prompts)
    assert usage["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone.values())
    assert usage["denoising_steps"] == sum(a["usage"]["denoising_steps"] for a in alone.values())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # one prompt; chat the same way; the last seed wraps around 2**64
    one = httpx.post(server.url + "/v1/completions", json={**body, "prompt": "hello", "n": 2}, timeout=60).json()
    assert [c["text"] for c in one["choices"]] == [alone[("hello", s)]["choices"][0]["text"] for s in (9, 10)]
    assert one["usage"]["prompt_tokens"] == alone[("hello", 9)]["usage"]["prompt_tokens"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, **FAST}
    seeds = (2**64 - 1, 0)
    single = [httpx.post(server.url + "/v1/chat/completions", json={**chat, "seed": s}, timeout=60).json()
              for s in seeds]
    r = httpx.post(server.url + "/v1/chat/completions", json={**chat, "seed": seeds[0], "n": 2}, timeout=60)
    assert r.status_code == 200, r.text
    both = r.json()
    assert both["object"] == "chat.completion" and both["id"].startswith("chatcmpl-")
    assert [c["message"] for c in both["choices"]] == [a["choices"][0]["message"] for a in single]
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert both["usage"]["prompt_tokens"] == single[0]["usage"]["prompt_tokens"]
    assert both["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in single)
    assert _pool_full(engine)


def test_more_choices_than_the_queue_are_refused(engine):
    """n times the prompts is what one request queues: more than max_running + max_queue is a 400 naming n."""
    srv = _Server(create_app(engine, MODEL, max_queue=3, max_running=2))
    try:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **FAST}
        for path, body in (("/v1/completions", {**OK, "prompt": ["a", "b"], "n": 3}),
                           ("/v1/completions", {**OK, "n": 6}), ("/v1/chat/completions", {**chat, "n": 10**9})):
            err = _error_shape(httpx.post(srv.url + path, json=body, timeout=30), 400)
            assert err["param"] == "n" and err["code"] == "limit_exceeded" and "(5)" in err["message"], err
        assert httpx.post(srv.url + "/v1/chat/completions", json={**chat, "n": 5}, timeout=60).status_code == 200
    finally:
        srv.stop()


def test_a_batch_larger_than_the_queue_is_refused(engine):
    """More prompts than max_running + max_queue could never be queued at once: a 400 naming the limit (not in
    BAD: test_ray_serve replays that table against replicas with other queue sizes)."""
    srv = _Server(create_app(engine, MODEL, max_queue=3, max_running=2))
    try:
        r = httpx.post(srv.url + "/v1/completions", json={**OK, "prompt": ["a"] * 6}, timeout=30)
        err = _error_shape(r, 400)
        assert err["param"] == "prompt" and err["code"] == "limit_exceeded" and "(5)" in err["message"], err
        assert httpx.post(srv.url + "/v1/completions", json={**OK, "prompt": ["a"] * 5}, timeout=60).status_code == 200
    finally:
        srv.stop()


def test_max_completion_tokens_wins_over_max_tokens(server):
    """OpenAI's current name wins (max_tokens is deprecated for chat); errors name it (the BAD cases)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": 1, **FAST}
    answers = [httpx.post(server.url + "/v1/chat/completions", json={**body, **extra}, timeout=60).json()
               for extra in ({"max_tokens": 40, "max_completion_tokens": 3}, {"max_completion_tokens": 3})]
    assert answers[0]["choices"] == answers[1]["choices"] and answers[0]["usage"]["completion_tokens"] <= 3


def test_retrieve_model(client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_malformed_and_oversized_bodies(server):
    h = {"content-type": "application/json"}
    err = _error_shape(httpx.post(server.url + "/v1/completions", content=b'{"model": ', headers=h, timeout=10), 400)
    assert err["type"] == "invalid_request_error"
    _error_shape(httpx.post(server.url + "/v1/completions", content=b"[1, 2]", headers=h, timeout=10), 400)
    # bodies json.loads refuses with other than a JSON syntax error (FastAPI: "There was an error parsing the body")
    for body, words in [(b'{"model": "x", "prompt": "\xff\xfe"}', "UnicodeDecodeError"),
                        (b"[" * 20000 + b"]" * 20000, "nested too deeply"),
                        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "ValueError")]:
        err = _error_shape(httpx.post(server.url + "/v1/completions", content=body, headers=h, timeout=10), 400)
        assert err["code"] == "invalid_json" and err["message"].startswith("malformed JSON body: "), err
        assert words in err["message"], err
    big = json.dumps({**OK, "prompt": "x" * (70 * 1024)}).encode()
    _error_shape(httpx.post(server.url + "/v1/completions", content=big, headers=h, timeout=10), 413)

    def chunks():  # chunked upload: no content-length
        for _ in range(20):
            yield b" " * 4096
        yield json.dumps(OK).encode()

    _error_shape(httpx.post(server.url + "/v1/completions", content=chunks(), headers=h, timeout=10), 413)
    _error_shape(httpx.get(server.url + "/v1/nothing", timeout=10), 404)
    # other requests are not disturbed
    assert httpx.post(server.url + "/v1/completions", json=OK, timeout=30).status_code == 200


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)


# ------------------------------------------------------------------------------------------ metrics
def test_metrics(server, client, engine):
    m0 = httpx.get(server.url + "/metrics", timeout=10).text
    r = client.completions.create(model=MODEL, prompt="count me", max_tokens=16, extra_body=FAST)
    resp = httpx.get(server.url + "/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    m1 = resp.text
    assert _metric(m1, "dgemma_requests_completed_total") == _metric(m0, "dgemma_requests_completed_total") + 1
    assert _metric(m1, "dgemma_generated_tokens_total") - _metric(m0, "dgemma_generated_tokens_total") == r.usage.completion_tokens
    assert (_metric(m1, "dgemma_denoising_steps_total") - _metric(m0, "dgemma_denoising_steps_total")
            == r.usage.model_extra["denoising_steps"])
    assert _metric(m1, "dgemma_queue_depth") == 0
    assert _metric(m1, "dgemma_requests_in_flight") == 0
    assert _metric(m1, 'dgemma_kv_blocks_in_use{pool="full"}') == 0
    assert _metric(m1, 'dgemma_kv_blocks_reserved{pool="sliding"}') == 0
    assert _metric(m1, 'dgemma_kv_blocks_total{pool="full"}') == engine.kv_pool_stats()["full_total"]
    assert "# TYPE dgemma_generated_tokens_total counter" in m1


def test_first_scrape_rates_count_from_the_start(engine):
    """The rates are since the previous scrape; the first one's are since the server started (they were 0
    however much had run)."""
    srv = _Server(create_app(engine, MODEL))
    try:
        r = httpx.post(srv.url + "/v1/completions", json={**OK, "max_tokens": 16}, timeout=60)
        assert r.status_code == 200, r.text
        first = httpx.get(srv.url + "/metrics", timeout=10).text
        assert _metric(first, "dgemma_steps_per_second") > 0 and _metric(first, "dgemma_tokens_per_second") > 0
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ queue bound
class _GatedEngine:
    """The real engine behind a gate: submit() waits until the test opens it."""

    def __init__(self, engine):
        self._engine = engine
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(30)
        return self._engine.submit(*args, **kwargs)


class _SlowTextEngine:
    """The real engine whose tokenizer blocks on any text holding "SLOW" until the test opens the gate."""

    def __init__(self, engine):
        self._engine = engine
        self.gate = threading.Event()
        self.entered = threading.Event()
        outer, tok = self, engine.tokenizer

        class Tok:
            def __getattr__(self, name):
                return getattr(tok, name)

            def _wait(self, text):
                if "SLOW" in text:
                    outer.entered.set()
                    assert outer.gate.wait(30)

            def encode(self, text, **kw):
                self._wait(text)
                return tok.encode(text, **kw)

            def apply_chat_template(self, messages, **kw):
                self._wait(" ".join(m["content"] for m in messages))
                return tok.apply_chat_template(messages, **kw)

        self.tokenizer = Tok()

    def __getattr__(self, name):
        return getattr(self._engine, name)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {**OK, "prompt": "SLOW"}),
    ("/v1/completions", {**OK, "prompt": "hi", "suffix": "SLOW"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 4,
                              **FAST}),
])
def test_text_is_tokenized_off_the_event_loop(engine, path, body):
    """Tokenizing a 1 MiB prompt takes about a second; on the event loop it held up /health, /metrics and
    every stream meanwhile."""
    slow = _SlowTextEngine(engine)
    srv = _Server(create_app(slow, MODEL))
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, srv.url + path, json=body, timeout=60)
            assert slow.entered.wait(10)
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
            slow.gate.set()
            assert pending.result(30).status_code == 200
    finally:
        slow.gate.set()
        srv.stop()


@contextlib.contextmanager
def _one_worker_held(engine, max_queue: int, threads: int = 1):
    """A server with one worker, held by a request that the gate stops in the engine's submit: yields the
    server, the gate, the pool the held request runs on and that request's future."""
    gated = _GatedEngine(engine)
    srv = _Server(create_app(gated, MODEL, max_queue=max_queue, max_running=1))
    try:
        with ThreadPoolExecutor(threads) as pool:
            running = pool.submit(httpx.post, srv.url + "/v1/completions", json={**OK, "max_tokens": 4}, timeout=60)
            assert gated.entered.wait(10)
            yield srv, gated, pool, running
    finally:
        gated.gate.set()
        srv.stop()


def test_queue_full_429(engine):
    gated = _GatedEngine(engine)
    srv = _Server(create_app(gated, MODEL, max_queue=2, max_running=1))
    try:
        body = {**OK, "max_tokens": 4}

        def post():
            return httpx.post(srv.url + "/v1/completions", json=body, timeout=60)

        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(post)
            assert gated.entered.wait(10)
            waiting = [pool.submit(post) for _ in range(2)]
            deadline = time.monotonic() + 10
            while _metric(httpx.get(srv.url + "/metrics", timeout=10).text, "dgemma_queue_depth") < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # health and metrics stay responsive while the worker is busy
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
            err = _error_shape(post(), 429)
            assert err["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0).completions.create(
                    model=MODEL, prompt="hello", max_tokens=4, extra_body=FAST)
            full = post()
            assert full.headers["retry-after"] == "1"  # OpenAI's clients wait that long before retrying
            gated.gate.set()
            assert running.result(30).status_code == 200
            assert [f.result(30).status_code for f in waiting] == [200, 200]
        m = httpx.get(srv.url + "/metrics", timeout=10).text
        assert _metric(m, 'dgemma_requests_total{outcome="rejected"}') == 3
    finally:
        gated.gate.set()
        srv.stop()


def test_a_batch_of_prompts_is_queued_whole_or_not_at_all(engine):
    """One running, two places in the queue: a batch of three is refused whole (its first two prompts used to
    take the two places until a worker was free, so lone requests got 429 too); a batch of two fits."""
    with _one_worker_held(engine, max_queue=2, threads=2) as (srv, gated, pool, running):
        r = httpx.post(srv.url + "/v1/completions", json={**OK, "prompt": ["a", "b", "c"]}, timeout=60)
        assert _error_shape(r, 429)["type"] == "rate_limit_error"
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 3, **FAST}
        err = _error_shape(httpx.post(srv.url + "/v1/chat/completions", json=chat, timeout=60), 429)
        assert "too full for 3 choices" in err["message"], err  # n choices are queued whole too
        m = httpx.get(srv.url + "/metrics", timeout=10).text
        assert _metric(m, 'dgemma_requests_total{outcome="rejected"}') == 6, m  # the engine's requests, as elsewhere
        assert _metric(m, "dgemma_requests_in_flight") == 1 and _metric(m, "dgemma_queue_depth") == 0, m
        two = pool.submit(httpx.post, srv.url + "/v1/completions", json={**OK, "prompt": ["a", "b"]}, timeout=60)
        _wait_for(lambda: _metric(httpx.get(srv.url + "/metrics", timeout=10).text,
                                  "dgemma_requests_in_flight") == 3, 10, "the batch of two to be queued")
        gated.gate.set()
        assert running.result(30).status_code == 200
        assert two.result(30).status_code == 200 and len(two.result().json()["choices"]) == 2


def test_shutdown_while_a_batch_waits_answers_503(engine, caplog):
    """Prompts dropped from the queue by the shutdown: 503 as documented (it was a 500 from the CancelledError),
    and no asyncio error about a result nobody read."""
    gated = _GatedEngine(engine)
    app = create_app(gated, MODEL, max_queue=8, max_running=1)
    srv = _Server(app)
    try:
        with ThreadPoolExecutor(1) as pool:
            batch = pool.submit(httpx.post, srv.url + "/v1/completions", json={**OK, "prompt": ["a", "b", "c"]},
                                timeout=60)
            assert gated.entered.wait(10)
            app.state.backend.shutdown()
            gated.gate.set()
            r = batch.result(30)
        assert _error_shape(r, 503)["code"] == "shutting_down"
    finally:
        gated.gate.set()
        srv.stop()
    assert "never retrieved" not in caplog.text and "Exception in ASGI application" not in caplog.text, caplog.text


def test_max_queue_counts_only_requests_waiting_for_a_worker(engine):
    """--max-queue 0 with idle workers serves requests; only a request that would wait for a worker gets 429."""
    gated = _GatedEngine(engine)
    srv = _Server(create_app(gated, MODEL, max_queue=0, max_running=2))
    try:
        gated.gate.set()
        for _ in range(3):  # no load: no 429, however often
            assert httpx.post(srv.url + "/v1/completions", json=OK, timeout=60).status_code == 200
        gated.gate.clear()

        def post():
            return httpx.post(srv.url + "/v1/completions", json=OK, timeout=60)

        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(post) for _ in range(2)]  # both workers take one
            _wait_for(lambda: _metric(httpx.get(srv.url + "/metrics", timeout=10).text, "dgemma_requests_running") == 2,
                      10, "both workers to be busy")
            err = _error_shape(post(), 429)  # it would have to wait: max_queue 0
            assert err["code"] == "queue_full"
            gated.gate.set()
            assert [f.result(30).status_code for f in running] == [200, 200]
        assert post().status_code == 200
    finally:
        gated.gate.set()
        srv.stop()


def test_create_app_rejects_bad_max_running(engine):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_running"):
            create_app(engine, MODEL, max_running=bad)


# ------------------------------------------------------------------------------------------ hardening (issue 11)
# Work that would run for minutes if nothing stopped it: 64 canvases of 200 steps that never stop early
# (a stability threshold of 200 can never be met in 200 steps).
ENDLESS = {"model": MODEL, "prompt": "a long story", "max_tokens": 4096, "max_denoising_steps": 200,
           "stability_threshold": 200}


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _raw_post(port: int, path: str, body: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % (path.encode(), len(body)) + body)
    return s


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_non_streaming_disconnect_cancels_and_frees_kv(server, engine, path, caplog):
    metric = 'dgemma_requests_total{outcome="cancelled"}'
    before = _metric(httpx.get(server.url + "/metrics", timeout=10).text, metric)
    body = dict(ENDLESS)
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    s = _raw_post(server.port, path, json.dumps(body).encode())
    _wait_for(lambda: engine.scheduler_stats()["running_requests"] == 1, 15, "the request to run")
    s.close()  # the client gives up without reading the answer

    def cancelled() -> bool:
        m = httpx.get(server.url + "/metrics", timeout=10).text
        return _metric(m, metric) > before and _metric(m, "dgemma_requests_in_flight") == 0 and _pool_full(engine)

    _wait_for(cancelled, 15, "the request to be cancelled and its KV blocks freed")
    r = httpx.post(server.url + "/v1/completions", json=OK, timeout=30)
    assert r.status_code == 200
    assert "never retrieved" not in caplog.text, caplog.text  # the wait's futures are all read


def test_streaming_client_leaving_while_queued_leaves_the_queue(engine):
    """A stream sends nothing before its first event, so its disconnect was not watched for while the
    request waited for a worker: it kept its queue slot (429 for live clients) until it ran a step."""
    with _one_worker_held(engine, max_queue=1) as (srv, gated, _, running):
        s = _raw_post(srv.port, "/v1/completions", json.dumps({**OK, "stream": True}).encode())

        def depth() -> float:
            return _metric(httpx.get(srv.url + "/metrics", timeout=10).text, "dgemma_queue_depth")

        _wait_for(lambda: depth() == 1, 15, "the stream to queue")
        s.close()
        _wait_for(lambda: depth() == 0, 15, "the stream to leave the queue")  # the worker is still held
        m = httpx.get(srv.url + "/metrics", timeout=10).text
        assert _metric(m, 'dgemma_requests_total{outcome="cancelled"}') == 1
        gated.gate.set()
        assert running.result(30).status_code == 200
        assert httpx.post(srv.url + "/v1/completions", json={**OK, "stream": True}, timeout=30).status_code == 200


def test_bad_requests_the_engine_refuses_count_as_invalid_not_failed(engine):
    """Sampler values the engine checks, and a request its KV pool could never hold, are the client's 400s:
    they were counted as failed, the outcome an operator's alert watches."""
    srv = _Server(create_app(engine, MODEL))
    try:
        def outcomes() -> dict[str, float]:
            m = httpx.get(srv.url + "/metrics", timeout=10).text
            return {k: _metric(m, f'dgemma_requests_total{{outcome="{k}"}}') for k in ("invalid", "failed")}

        before = outcomes()
        r = httpx.post(srv.url + "/v1/completions", json={**OK, "t_min": 0.5, "t_max": 0.1}, timeout=30)
        assert _error_shape(r, 400)["param"] == "t_max"
        r = httpx.post(srv.url + "/v1/completions",
                       json={**OK, "t_min": 0.5, "t_max": 0.1, "stream": True}, timeout=30)
        assert _error_shape(r, 400)["param"] == "t_max"
        after = outcomes()
        assert (after["invalid"] - before["invalid"], after["failed"] - before["failed"]) == (2, 0)
    finally:
        srv.stop()


def test_errors_after_a_request_started_count_as_failed(engine):
    """Only the engine's refusals are the client's: a ValueError or a pool error raised while the request
    runs (the sliding pool running dry mid-way would be an engine bug) is a 500, counted as failed."""
    class Failing:
        def __init__(self, error):
            self.error = error

        def result(self):
            raise self.error

        def cancel(self):
            pass

    class Wrapped:
        error: BaseException = ValueError("x")

        def __getattr__(self, name):
            return getattr(engine, name)

        def submit(self, *args, **kwargs):
            return Failing(self.error)

    wrapped = Wrapped()
    srv = _Server(create_app(wrapped, MODEL))
    try:
        for error, status, outcome in [(RuntimeError("KV cache pool is full (sliding-window layers): 0 free"), 500,
                                        "failed"),
                                       (RuntimeError("KV cache pool too small: this request needs 99"), 400, "invalid")]:
            wrapped.error = error
            r = httpx.post(srv.url + "/v1/completions", json=OK, timeout=30)
            assert r.status_code == status, r.text
            m = httpx.get(srv.url + "/metrics", timeout=10).text
            assert _metric(m, f'dgemma_requests_total{{outcome="{outcome}"}}') == 1, m
    finally:
        srv.stop()


def test_a_choice_failing_mid_stream_ends_every_choice(engine):
    """n streamed: one choice failing after the stream started sends the error event and [DONE], and the other
    choices are cancelled (not left running), as a non-streaming request's are."""
    seed = 100

    class FailingChoice:  # choice 1 (seed + 1) raises from its third step's callback
        def __getattr__(self, name):
            return getattr(engine, name)

        def submit(self, *args, **kwargs):
            if kwargs.get("seed") == seed + 1:
                inner, steps = kwargs["on_step"], [0]

                def on_step(draft):
                    steps[0] += 1
                    if steps[0] == 3:
                        raise RuntimeError("boom at step 3")
                    return inner(draft)

                kwargs["on_step"] = on_step
            return engine.submit(*args, **kwargs)

    srv = _Server(create_app(FailingChoice(), MODEL, max_running=4))
    try:
        body = {"model": MODEL, "prompt": "a long story", "max_tokens": 64 * 40, "max_denoising_steps": 8,
                "stability_threshold": 100, "seed": seed, "stream": True, "n": 3}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and "error" in json.loads(lines[-2][6:]), lines[-2:]
        seen = {json.loads(line[6:])["choices"][0]["index"] for line in lines[:-2]}
        assert seen == {0, 1, 2}, seen

        def settled():
            m = httpx.get(srv.url + "/metrics", timeout=10).text
            return (_metric(m, 'dgemma_requests_total{outcome="failed"}') == 1
                    and _metric(m, 'dgemma_requests_total{outcome="cancelled"}') == 2
                    and _metric(m, "dgemma_requests_in_flight") == 0 and _pool_full(engine))

        _wait_for(settled, 15, "the other choices to be cancelled and the KV pool freed")
    finally:
        srv.stop()


CAPPED = [
    ("max_tokens over the cap", {**OK, "max_tokens": 8193}, "max_tokens"),
    ("max_tokens 2**31", {**OK, "max_tokens": 2**31}, "max_tokens"),
    ("max_tokens 2**64", {**OK, "max_tokens": 2**64}, "max_tokens"),
    ("steps over the cap", {**OK, "max_denoising_steps": 257}, "max_denoising_steps"),
    ("steps 2**31-1", {**OK, "max_denoising_steps": 2**31 - 1}, "max_denoising_steps"),
    ("stability 10**7", {**OK, "stability_threshold": 10**7}, "stability_threshold"),
    ("stability 2**31-1", {**OK, "stability_threshold": 2**31 - 1}, "stability_threshold"),
    ("logprobs 0", {**OK, "logprobs": 0}, "logprobs"),
    ("logprobs 5", {**OK, "logprobs": 5}, "logprobs"),
    ("logprobs false (completions: a count)", {**OK, "logprobs": False}, "logprobs"),
]


@pytest.mark.parametrize("name,body,param", CAPPED, ids=[c[0] for c in CAPPED])
def test_per_request_work_is_capped(server, name, body, param):
    err = _error_shape(httpx.post(server.url + "/v1/completions", json=body, timeout=30), 400)
    assert err["param"] == param, err
    assert err["code"] != "kv_cache_exhausted", err


def test_chat_logprobs(server):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **FAST}
    for extra, param in [({"logprobs": True}, "logprobs"), ({"top_logprobs": 5}, "top_logprobs"),
                         ({"logprobs": False, "top_logprobs": 0}, "top_logprobs")]:
        err = _error_shape(httpx.post(server.url + "/v1/chat/completions", json={**chat, **extra}, timeout=30), 400)
        assert err["param"] == param, err
    # false asks for nothing: accepted
    assert httpx.post(server.url + "/v1/chat/completions", json={**chat, "logprobs": False}, timeout=30).status_code == 200


def test_operator_sets_the_caps(engine):
    srv = _Server(create_app(engine, MODEL, max_request_tokens=64, max_request_steps=4))
    try:
        ok = {"model": MODEL, "prompt": "x", "max_tokens": 64, "max_denoising_steps": 4, "stability_threshold": 4}
        assert httpx.post(srv.url + "/v1/completions", json=ok, timeout=30).status_code == 200
        for key, value in [("max_tokens", 65), ("max_denoising_steps", 5), ("stability_threshold", 5)]:
            err = _error_shape(httpx.post(srv.url + "/v1/completions", json={**ok, key: value}, timeout=30), 400)
            assert err["param"] == key and "limit" in err["message"], err
        # the checkpoint's default steps (48) are over this server's cap too
        err = _error_shape(httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4},
                                      timeout=30), 400)
        assert err["param"] == "max_denoising_steps", err
    finally:
        srv.stop()
    for bad in (0, -1, 2**31, 1.5, True):
        with pytest.raises(ValueError, match="max_request_tokens"):
            create_app(engine, MODEL, max_request_tokens=bad)


def test_lone_surrogate_is_a_400(server):
    # json.dumps writes the surrogate as the escape \ud800: valid JSON, not valid Unicode
    for path, body, param in [
        ("/v1/completions", {**OK, "prompt": "x\ud800y"}, "prompt"),
        ("/v1/completions", {**OK, "prompt": "x\ud800y", "stream": True}, "prompt"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x\udfffy"}], "max_tokens": 4},
         "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi", "name": "a\ud800"}],
                                  "max_tokens": 4}, "messages"),
    ]:
        err = _error_shape(httpx.post(server.url + path, content=json.dumps(body).encode(),
                                      headers={"content-type": "application/json"}, timeout=30), 400)
        assert err["param"] == param, err
        assert "not valid Unicode" in err["message"], err


def _start_cli_server(tiny_dir, port: int):
    import os
    import subprocess
    import sys

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(dgemma_rt.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "dgemma_rt.cli", "serve", str(tiny_dir), "--port", str(port),
                             "--threads", "1", "--model-name", MODEL],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _wait_for(up, 60, "the server to start")
    return proc, url


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_stops_the_server_while_requests_run(tiny_dir, sig):
    import signal

    proc, url = _start_cli_server(tiny_dir, _free_port())
    try:
        results: dict[int, object] = {}

        def post(i: int, stream: bool) -> None:
            try:
                r = httpx.post(url + "/v1/completions", json={**ENDLESS, "stream": stream}, timeout=60)
                results[i] = r.status_code
            except httpx.HTTPError as e:
                results[i] = e

        clients = [threading.Thread(target=post, args=(i, i == 2)) for i in range(3)]
        for c in clients:
            c.start()
        _wait_for(lambda: _metric(httpx.get(url + "/metrics", timeout=10).text, "dgemma_requests_running") == 3, 30,
                  "the requests to run")
        t0 = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=15)  # raises if the server is still waiting for the requests
        assert time.monotonic() - t0 < 15
        for c in clients:
            c.join(30)
            assert not c.is_alive()
        # non-streaming clients are told why; the stream ends (with an error event)
        assert results[0] == 503 and results[1] == 503, results
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert f"serving '{MODEL}' on 127.0.0.1:" in out, out  # the id clients must send


def test_serve_refuses_a_checkpoint_without_tokenizer_before_loading(tmp_path, tiny_dir):
    import shutil

    from dgemma_rt.server import serve

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "model.safetensors").write_bytes(b"not safetensors")  # a load would fail on this first
    with pytest.raises(ValueError, match="has no tokenizer.json: the server needs one"):
        serve(ckpt, port=_free_port())


def test_listen_binds_what_the_host_names():
    """As asyncio's create_server (uvicorn's own binding) does: "" is every interface, a name every address."""
    from dgemma_rt.server import listen

    for host, want in (("", {"0.0.0.0"}), ("127.0.0.1", {"127.0.0.1"})):
        socks = listen(host, 0)
        try:
            got = {s.getsockname()[0] for s in socks}
            assert want <= got, (host, got)
        finally:
            for s in socks:
                s.close()
    with pytest.raises(ValueError, match="cannot listen on 192.0.2.1:80: Cannot assign"):  # TEST-NET: not ours
        listen("192.0.2.1", 80)


def test_cli_server_refuses_a_busy_port_before_loading(tmp_path):
    """The port is bound before the checkpoint loads (minutes for a large one): a busy port is the CLI's one-line
    error at once (it was uvicorn's log and exit 3 after the load); here the checkpoint does not even exist."""
    import os
    import socket
    import subprocess
    import sys

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(dgemma_rt.__file__)))
    env = dict(os.environ, PYTHONPATH=package_root)
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "dgemma_rt.cli", "serve", str(tmp_path / "missing"), "--port",
                               str(port)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: Address already in use"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ------------------------------------------------------------------------------------------ infilling
def test_suffix_infills_like_the_engine(client, engine, server):
    prefix, suffix = "the quick brown", " the lazy dog"
    r = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=20, seed=4, extra_body=FAST)
    tok = engine.tokenizer
    middle = engine.infill(tok.encode(prefix), tok.encode(suffix, add_special_tokens=False), max_middle_tokens=20,
                           seed=4, **FAST)
    assert r.choices[0].text == tok.decode(middle[:20])
    assert r.usage.completion_tokens == len(middle[:20])
    assert r.choices[0].finish_reason == ("stop" if len(middle) <= 20 and len(middle) < 64 - len(
        tok.encode(suffix, add_special_tokens=False)) else "length")
    # Streaming: each draft is the middle settling before the fixed suffix; the text matches.
    chunks = list(client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=20, seed=4,
                                            stream=True, extra_body=FAST))
    text = "".join(c.choices[0].text or "" for c in chunks)
    assert text == r.choices[0].text
    drafts = [d for d in ((c.model_extra or {}).get("dgemma_draft") for c in chunks) if d]
    assert drafts and [d["step"] for d in drafts] == list(range(1, len(drafts) + 1))  # one canvas here
    assert all(d["text"].endswith(suffix) for d in drafts)
    last_middle = drafts[-1]["text"][: -len(suffix)]
    assert last_middle == tok.decode(middle)  # the last step's draft is what was committed (uncut)
    assert last_middle.startswith(r.choices[0].text)
    # Token-id suffixes get the decoded suffix after the draft.
    ids = tok.encode(prefix)
    suffix_ids = tok.encode(suffix, add_special_tokens=False)
    chunks = list(client.completions.create(model=MODEL, prompt=ids, suffix=suffix_ids, max_tokens=20, seed=4,
                                            stream=True, extra_body=FAST))
    drafts = [d for d in ((c.model_extra or {}).get("dgemma_draft") for c in chunks) if d]
    assert drafts and all(d["text"].endswith(tok.decode(suffix_ids)) for d in drafts)


def test_canvas_template_extension(server, engine):
    L = engine.config["canvas_length"]
    template = [-1] * L
    template[5:9] = [300, 301, 302, 303]
    body = {**OK, "prompt": [2, 40, 41], "max_tokens": L, "canvas_template": template, "seed": 2}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = engine.generate([[2, 40, 41]], max_new_tokens=L, seed=2, canvas_template=[template], **FAST)
    assert list(out.sequences[0][3 + 5:3 + 9]) == [300, 301, 302, 303]


BAD_INFILL = [
    ("template too long", {**OK, "max_tokens": 4, "canvas_template": [-1] * 5}, "canvas_template"),
    ("template bad id", {**OK, "canvas_template": [10**9]}, "canvas_template"),
    ("suffix and template", {**OK, "suffix": "x", "canvas_template": [-1]}, "suffix"),
    ("suffix ids out of range", {**OK, "prompt": [2, 3], "suffix": [10**9]}, "suffix"),
    ("suffix lone surrogate", {**OK, "suffix": "x\ud800"}, "suffix"),
]


@pytest.mark.parametrize("name,body,param", BAD_INFILL, ids=[b[0] for b in BAD_INFILL])
def test_bad_infill_requests(server, name, body, param):
    r = httpx.post(server.url + "/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"},
                   timeout=30)
    assert _error_shape(r, 400)["param"] == param


# ------------------------------------------------------------------------------------------ stop sequences
def _long_reference(engine, prompt="the story", max_tokens=192):
    """A seed whose answer runs past the first canvas, its text, and where the first canvas's text ends."""
    ids = engine.tokenizer.encode(prompt)
    L = engine.config["canvas_length"]
    for seed in range(40):
        out = engine.generate([ids], max_new_tokens=max_tokens, seed=seed, **FAST)
        text, n, _ = _reference_text(engine, ids, max_tokens, seed=seed)
        if n > L + 8:
            new = [int(t) for t in out.sequences[0][len(ids):]]
            return seed, text, len(engine.tokenizer.decode(new[:L])), out
    pytest.skip("no seed gave two canvases of text")


def _stream_text(server, path, body):
    text, finishes, chunks = "", [], []
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                c = json.loads(line[6:])
                chunks.append(c)
                for choice in c["choices"]:
                    text += choice.get("text") or choice.get("delta", {}).get("content") or ""
                    if choice["finish_reason"]:
                        finishes.append(choice["finish_reason"])
    return text, finishes, chunks


def test_stop_sequences_end_the_text_and_the_request(server, engine):
    """The text ends before the first stop sequence (not returned), finish_reason is "stop", usage counts the
    returned text's tokens, and no canvas after the one that completed it is denoised; streamed, the same text,
    with a stop sequence split across two canvases never sent in part."""
    seed, text, boundary, out = _long_reference(engine)
    body = {**OK, "prompt": "the story", "max_tokens": 192, "seed": seed}
    across = text[boundary - 2 : boundary + 2]  # the first canvas's text ends inside it
    for stop in (text[5:8], [text[boundary + 3 : boundary + 6], "\u2028never"], across):
        first = min(text.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s in text)
        r = httpx.post(server.url + "/v1/completions", json={**body, "stop": stop}, timeout=60).json()
        choice = r["choices"][0]
        assert choice["text"] == text[:first] and choice["finish_reason"] == "stop", (stop, r)
        toks = engine.tokenizer.encode(text, add_special_tokens=False)
        assert 0 < r["usage"]["completion_tokens"] <= len(toks)
        streamed, finishes, _ = _stream_text(server, "/v1/completions", {**body, "stop": stop})
        assert streamed == text[:first] and finishes == ["stop"], (stop, streamed)
    before = engine.scheduler_stats()
    early = httpx.post(server.url + "/v1/completions", json={**body, "stop": text[5:8]}, timeout=60).json()
    assert early["usage"]["denoising_steps"] <= STEPS < sum(out.steps_per_canvas[0])  # one canvas, not all
    after = engine.scheduler_stats()  # ended as done in the engine (StopGeneration), as /metrics counts it
    assert [after[k] - before[k] for k in ("completed", "cancelled", "failed")] == [1, 0, 0]
    # a stop sequence that never comes changes nothing
    plain = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    never = httpx.post(server.url + "/v1/completions", json={**body, "stop": ["\u2028never", ""]}, timeout=60)
    assert never.json()["choices"][0] == plain
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stop": [],
            "seed": seed, **FAST}
    assert httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
    r = httpx.post(server.url + "/v1/completions", json={**body, "stop": ["a", "b", "c", "d", "e"]}, timeout=60)
    assert _error_shape(r, 400)["param"] == "stop"


def test_stream_options_include_usage(server):
    """As OpenAI sends it: usage once, in a last chunk with no choices (LangChain adds up every chunk's usage)."""
    body = {**OK, "max_tokens": 16, "stream_options": {"include_usage": True}}
    text, finishes, chunks = _stream_text(server, "/v1/completions", body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 0
    assert finishes and chunks[-2]["choices"][0]["finish_reason"] == finishes[0]
    assert [c for c in chunks if c.get("usage")] == [chunks[-1]]
    _, _, plain = _stream_text(server, "/v1/completions", {**OK, "max_tokens": 16})
    assert all(c["choices"] for c in plain)  # without it, no choice-less chunk, and usage on the finish chunk
    assert [c for c in plain if c.get("usage")] == [c for c in plain if c["choices"][0]["finish_reason"]]


def test_stop_after_a_character_of_several_tokens_counts_them_all(server, engine):
    tok = engine.tokenizer
    emoji, word = tok.encode("\U0001F600", add_special_tokens=False), tok.encode(" stopword", add_special_tokens=False)
    assert len(emoji) > 1  # byte tokens: its first ones alone decode to U+FFFD
    for stream in (False, True):
        body = {**OK, "max_tokens": 64, "canvas_template": emoji + word, "stop": " stopword", "stream": stream}
        if stream:
            text, finishes, chunks = _stream_text(server, "/v1/completions", body)
            usage = next(c["usage"] for c in chunks if c.get("usage"))
        else:
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
            text, finishes, usage = r["choices"][0]["text"], [r["choices"][0]["finish_reason"]], r["usage"]
        assert (text, finishes, usage["completion_tokens"]) == ("\U0001F600", ["stop"], len(emoji)), (stream, text, usage)


def test_developer_role_is_the_system_message(server):
    msgs = [{"role": "user", "content": "hi"}]
    body = {"model": MODEL, "max_tokens": 16, "seed": 2, **FAST}
    answers = [httpx.post(server.url + "/v1/chat/completions", json={**body, "messages": [{"role": r, "content": "be brief"},
                                                                                          *msgs]}, timeout=60)
               for r in ("developer", "system")]
    assert answers[0].status_code == 200 and answers[0].json()["choices"] == answers[1].json()["choices"]


@pytest.mark.parametrize("body,message", [
    ({**OK, "temperature": "0.5"}, "temperature: must be a number"),
    ({**OK, "prompt": 5}, "prompt: must be a string or a list of token ids or a list of strings or a list of "
                          "token-id lists"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.type: Input should be 'text'"),
    ({**OK, "stop": ["", "", "a", "b", "c"]}, "stop holds 5 sequences: at most 4"),
    # sibling fields and list indices are not a union's branches
    ({"model": MODEL, "messages": [{"content": 5}]}, "messages.0.role: Field required"),
    ({**OK, "prompt": ["a", 1]}, "prompt: must be a string or a list of token ids or a list of strings or a list of "
                                 "token-id lists"),
])
def test_validation_messages_name_what_a_field_takes(server, body, message):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    err = _error_shape(httpx.post(server.url + path, json=body, timeout=30), 400)
    assert err["message"] == message, err
