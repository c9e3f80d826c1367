"""dgemma_rt.ray_serve: two CPU replicas of the tiny model on a local Ray instance, driven over loopback.

One Ray instance for the module (2 CPUs, no dashboard, a 100 MB object store), shut down at its end;
skipped when Ray is not installed or cannot start. The replica-killing test runs last.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import dgemma_rt  # noqa: E402
from dgemma_rt import ray_serve  # noqa: E402
from dgemma_rt.server import create_app  # noqa: E402
from dgemma_rt.tiny import make_tiny  # noqa: E402
from test_server import BAD, BAD_INFILL, MODEL  # noqa: E402  (the single-process server's bad-request table)

STEPS = 4
FAST = {"max_denoising_steps": STEPS}
APP = "dgemma"
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "ray")
# Enough work that a request is still running a second after it starts (the tiny model, one thread).
LONG = {"model": MODEL, "prompt": "a long story", "max_tokens": 64 * 15,
        "extra_body": {"max_denoising_steps": 6, "stability_threshold": 100}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny_ray"))


@pytest.fixture(scope="module")
def local_engine(tiny_dir):
    """The same checkpoint in this process: what `dgemma-rt serve` would answer."""
    return dgemma_rt.Engine(tiny_dir, num_threads=1, max_batch_size=4)


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    """Two replicas behind Serve's proxy on a loopback port; yields its base URL."""
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    try:
        # address="local": a fresh instance even where RAY_ADDRESS points at a cluster.
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
                 log_to_driver=False, _system_config={"metrics_report_interval_ms": 1000})
    except Exception as e:  # noqa: BLE001 - any failure to start is a skip, not a failure
        pytest.skip(f"Ray cannot start here: {type(e).__name__}: {e}")
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Replicas import the dgemma_rt this process runs (a source checkout or the installed package).
        root = os.path.dirname(os.path.dirname(os.path.abspath(dgemma_rt.__file__)))
        pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        app = ray_serve.build(tiny_dir, model_name=MODEL, replicas=2, num_cpus=0.5, num_threads=1, max_batch_size=4,
                              max_body_bytes=64 * 1024, metrics_interval_s=1,
                              runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                              max_constructor_retry_count=2, health_check_period_s=2)
        serve.run(app, name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture()
def client(cluster):
    return openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0, timeout=60)


def _reference(engine, prompt: str, max_tokens: int, seed: int) -> str:
    ids = engine.tokenizer.encode(prompt)
    out = engine.generate([ids], max_new_tokens=max_tokens, seed=seed, **FAST)
    g = engine.generation_defaults
    stop = set(g["eos_token_id"]) | {g["pad_token_id"]}
    new = []
    for t in out.sequences[0][len(ids):]:
        if int(t) in stop:
            break
        new.append(int(t))
    return engine.tokenizer.decode(new[:max_tokens])


def _complete(client, stream: bool, **kw):
    """(text, finish_reason, replica) of one completion through the official client."""
    raw = client.completions.with_raw_response.create(stream=stream, **kw)
    replica = raw.headers.get(ray_serve.REPLICA_HEADER)
    if not stream:
        r = raw.parse()
        return r.choices[0].text, r.choices[0].finish_reason, replica
    text, finish = "", None
    for chunk in raw.parse():
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
    return text, finish, replica


# ------------------------------------------------------------------------------------------ routing
def test_concurrent_requests_reach_both_replicas(client, local_engine):
    """16 clients at once, half streaming: all complete, with the engine's own text, on both replicas."""
    n = 16
    kws = [dict(model=MODEL, prompt=f"story number {i}", max_tokens=64, seed=11, extra_body=FAST) for i in range(n)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: _complete(client, i % 2 == 1, **kws[i]), range(n)))
    assert time.monotonic() - t0 < 60
    for kw, (text, finish, replica) in zip(kws, results):
        assert finish in ("stop", "length")
        assert replica
        assert text == _reference(local_engine, kw["prompt"], 64, 11)
    assert len({r for _, _, r in results}) == 2, [r for _, _, r in results]


def test_same_seed_same_text_on_either_replica(client, local_engine):
    kw = dict(model=MODEL, prompt="the same seed", max_tokens=64, seed=5, extra_body=FAST)
    answers: dict[str, set] = {}
    for i in range(24):
        text, _, replica = _complete(client, i % 2 == 1, **kw)
        answers.setdefault(replica, set()).add(text)
        if len(answers) == 2 and i >= 3:
            break
    assert len(answers) == 2, answers
    assert {t for texts in answers.values() for t in texts} == {_reference(local_engine, kw["prompt"], 64, 5)}


def test_prompt_lists_as_dgemma_rt_serve_takes_them(client, local_engine):
    """A replica's queue was sized for Serve's ongoing requests as if each were one prompt: a list of more than
    max_batch_size + 1 prompts was refused (400), and a few concurrent lists got 429s Serve never sent."""
    prompts = [f"list item {i}" for i in range(12)]
    kw = dict(model=MODEL, max_tokens=8, seed=3, extra_body=FAST)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: client.completions.create(prompt=prompts, **kw), range(3)))
    for r in answers:
        assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [
            _reference(local_engine, p, 8, 3) for p in prompts]


def test_health_and_models(cluster):
    r = httpx.get(cluster + "/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": MODEL}
    assert r.headers[ray_serve.REPLICA_HEADER]
    assert [m["id"] for m in httpx.get(cluster + "/v1/models", timeout=10).json()["data"]] == [MODEL]


def test_disconnect_cancels_on_the_replica(cluster):
    """A client leaving a stream cancels its request in the replica that ran it, as with `dgemma-rt serve`."""
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 64 * 60, "stream": True,
            "max_denoising_steps": 8, "stability_threshold": 100}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", cluster + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            replica = r.headers[ray_serve.REPLICA_HEADER]
            drafts = 0
            for line in r.iter_lines():
                drafts += line.startswith("data: {")
                if drafts >= 3:
                    break

    def cancelled_there():
        # /metrics answers for the replica the router picked: ask until the one that ran the stream answers.
        r = httpx.get(cluster + "/metrics", timeout=10)
        if r.headers[ray_serve.REPLICA_HEADER] != replica:
            return False
        lines = dict(line.rsplit(" ", 1) for line in r.text.splitlines() if line and not line.startswith("#"))
        return float(lines['dgemma_requests_total{outcome="cancelled"}']) >= 1 and \
            float(lines["dgemma_requests_in_flight"]) == 0

    _wait_for(cancelled_there, 30, "the stream's request to be cancelled in its replica")


# ------------------------------------------------------------------------------------------ bad input
def test_bad_requests_get_the_same_answer_as_dgemma_rt_serve(cluster, local_engine):
    """Every request of test_server's bad-input tables: the same status and body through Serve as from the app alone."""
    from fastapi.testclient import TestClient

    cases = [(path, json.dumps(body)) for _, path, body, _, _ in BAD]
    cases += [("/v1/completions", json.dumps(body)) for _, body, _ in BAD_INFILL]
    too_big = json.dumps({"model": MODEL, "prompt": "x" * 70000})  # over max_body_bytes: 413
    cases += [("/v1/completions", "{not json"), ("/v1/completions", too_big)]
    headers = {"content-type": "application/json"}
    with TestClient(create_app(local_engine, MODEL, max_body_bytes=64 * 1024)) as alone, \
            httpx.Client(base_url=cluster, timeout=30) as via_ray:
        for path, body in cases:
            want = alone.post(path, content=body, headers=headers)
            got = via_ray.post(path, content=body, headers=headers)
            assert 400 <= want.status_code < 500, (path, body[:80], want.text)
            assert (got.status_code, got.json()) == (want.status_code, want.json()), (path, body[:80])


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_per_replica_through_ray(cluster):
    # The app's own /metrics answers for the replica the router picked, and says which.
    r = httpx.get(cluster + "/metrics", timeout=10)
    assert r.status_code == 200 and "dgemma_requests_completed_total" in r.text
    assert r.headers[ray_serve.REPLICA_HEADER]
    # Ray's metrics: every replica's series, tagged with the replica, on the node's Prometheus endpoint.
    node = ray._private.worker.global_worker.node
    port = getattr(node, "metrics_export_port", None)
    if not port:
        pytest.skip("this Ray build exposes no metrics export port")

    def replicas_reporting():
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        tagged = set()
        for line in text.splitlines():
            if line.startswith("ray_dgemma_requests_total{") and 'outcome="completed"' in line:
                tagged.add(line.split('replica="', 1)[1].split('"', 1)[0])
        return tagged if len(tagged) >= 2 else None

    assert len(_wait_for(replicas_reporting, 30, "both replicas' ray_dgemma_requests_total")) >= 2


def test_serve_options_follow_the_batch_size():
    opts = ray_serve.deployment_options(replicas=2, max_batch_size=8, replica_queue=3, num_gpus=1)
    assert opts["max_ongoing_requests"] == 11 and opts["num_replicas"] == 2
    assert opts["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    auto = ray_serve.deployment_options(replicas=1, max_replicas=4, max_batch_size=8)
    assert "num_replicas" not in auto and auto["max_ongoing_requests"] == 9  # a batch and one ready
    assert auto["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4,
                                          "target_ongoing_requests": 8}


# ------------------------------------------------------------------------------------------ health
def test_check_health_fails_a_replica_whose_engine_stopped(local_engine):
    """Serve's hook raises for an engine that stopped answering, or that has work and makes no progress."""
    app = create_app(local_engine, MODEL)
    backend = app.state.backend
    replica = type("Replica", (), {"_backend": backend, "_stall_timeout_s": 0.2, "_replica": "r0"})()
    check = ray_serve.DGemmaReplica.check_health
    check(replica)  # idle: healthy

    real = local_engine.scheduler_stats
    stuck = {**real(), "active_rows": 1}
    try:
        local_engine.scheduler_stats = lambda: stuck  # busy, and the counters never move
        check(replica)
        time.sleep(0.3)
        with pytest.raises(RuntimeError, match="no progress"):
            check(replica)

        def dead():
            raise RuntimeError("engine gone")

        local_engine.scheduler_stats = dead
        with pytest.raises(RuntimeError, match="does not answer"):
            check(replica)
    finally:
        del local_engine.scheduler_stats
    assert local_engine.scheduler_stats() == real()
    backend.shutdown()
    with pytest.raises(RuntimeError, match="shutting down"):
        check(replica)


# ------------------------------------------------------------------------------------------ config files
def test_example_configs_are_valid_serve_configs(tiny_dir):
    yaml = pytest.importorskip("yaml")
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    with open(os.path.join(EXAMPLES, "serve_config.yaml")) as f:
        local = yaml.safe_load(f)
    with open(os.path.join(EXAMPLES, "rayservice.yaml")) as f:
        service = yaml.safe_load(f)
    assert service["kind"] == "RayService"
    in_k8s = yaml.safe_load(service["spec"]["serveConfigV2"])
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for w in workers
               for c in w["template"]["spec"]["containers"])
    for config in (local, in_k8s):
        ServeDeploySchema.model_validate(config)
        (spec,) = config["applications"]
        assert spec["import_path"] == "dgemma_rt.ray_serve:app_builder"
        args = {**spec["args"], "checkpoint": str(tiny_dir)}
        app = call_user_app_builder_with_args_if_necessary(ray_serve.app_builder, args)
        assert app._bound_deployment.name == ray_serve.DEPLOYMENT_NAME
    assert in_k8s["applications"][0]["args"]["num_gpus"] == 1


def test_cli_serve_ray_arguments(monkeypatch, tiny_dir):
    from dgemma_rt import cli

    seen = {}
    monkeypatch.setattr(ray_serve, "run", lambda checkpoint, **kw: seen.update(checkpoint=checkpoint, **kw))
    assert cli.main(["serve", str(tiny_dir), "--ray", "--replicas", "2", "--max-replicas", "4", "--port", "8123",
                     "--gpus-per-replica", "1", "--max-batch-size", "16", "--max-queue", "32", "--device", "cuda"]) == 0
    assert seen["checkpoint"] == str(tiny_dir) and seen["port"] == 8123 and seen["address"] is None
    assert seen["device"] == "cuda"
    assert (seen["replicas"], seen["max_replicas"], seen["num_gpus"]) == (2, 4, 1)
    assert (seen["max_batch_size"], seen["max_queued_requests"]) == (16, 32)
    assert cli.main(["serve", str(tiny_dir), "--replicas", "2"]) == 2  # Ray flags without --ray
    assert cli.main(["serve", str(tiny_dir), "--ray", "--replicas", "3", "--max-replicas", "2"]) == 2
    assert cli.main(["serve", str(tiny_dir), "--ray", "--device", "cuda"]) == 2  # replicas would see no GPU
    assert cli.main(["serve", str(tiny_dir), "--ray", "--device", "cuda:1", "--gpus-per-replica", "1"]) == 2
    assert cli.main(["serve", str(tiny_dir), "--ray", "--max-queue", "0"]) == 2  # Serve's queue is -1 or >= 1


def test_local_run_refuses_what_its_replicas_would_fail_on(tiny_dir, tmp_path):
    """Said before Ray starts: a device the engine refuses, a port another process listens on; and replicas
    this machine cannot place (serve.run waited for them forever)."""
    with pytest.raises(ValueError, match="device"):
        ray_serve.run(str(tiny_dir), device="bogus")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        with pytest.raises(ValueError, match="cannot listen"):
            ray_serve.run(str(tiny_dir), port=busy.getsockname()[1])
    # Serve's proxy took a random port and the URL printed said :0
    with pytest.raises(ValueError, match="port 0"):
        ray_serve.run(str(tiny_dir), port=0)
    # the tokenizer, which only the replicas read (a failed deployment after ~20 s, the cause deep in a traceback)
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        ray_serve.run(str(no_tok), port=_free_port())
    (no_tok / "tokenizer.json").write_text("{not json")
    with pytest.raises(dgemma_rt.CheckpointError, match="tokenizer.json"):
        ray_serve.run(str(no_tok), port=_free_port())
    with pytest.raises(ValueError, match="GPUs"):
        ray_serve._check_resources({"CPU": 2.0}, {"replicas": 1, "num_gpus": 1})
    with pytest.raises(ValueError, match="CPUs"):
        ray_serve._check_resources({"CPU": 2.0}, {"replicas": 3})
    ray_serve._check_resources({"CPU": 2.0, "GPU": 1.0}, {"replicas": 2, "num_cpus": 1, "num_gpus": 0.5})


def test_build_refuses_what_the_cli_refuses(tiny_dir):
    with pytest.raises(ValueError, match="max_replicas 2 is below replicas 3"):
        ray_serve.build(str(tiny_dir), replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="checkpoint is empty"):
        ray_serve.build("")
    # A replica sees only the ceil(num_gpus) GPUs Ray assigns it, as cuda:0, cuda:1, ...
    for device, num_gpus, words in (("cuda", 0, "needs GPUs per replica"), ("cuda:0", 0, "needs GPUs"),
                                    ("cuda:1", 1, r"sees 1, as cuda:0$"), ("cuda:2", 2, "sees 2, as cuda:0 to cuda:1"),
                                    ("cuda:1", 0.5, "sees 1")):
        with pytest.raises(ValueError, match=words):
            ray_serve.build(str(tiny_dir), device=device, num_gpus=num_gpus)
        with pytest.raises(ValueError, match=words):
            ray_serve.app_builder({"checkpoint": str(tiny_dir), "device": device, "num_gpus": num_gpus})
    for device, num_gpus in (("cuda", 0.5), ("cuda:1", 2), ("cpu", 0), ("cpu", 1)):
        ray_serve.build(str(tiny_dir), device=device, num_gpus=num_gpus)
    # GPUs given through the deployment overrides count: they replace the actor options num_gpus made
    ray_serve.build(str(tiny_dir), device="cuda", ray_actor_options={"num_gpus": 1})
    with pytest.raises(ValueError, match="needs GPUs"):
        ray_serve.build(str(tiny_dir), device="cuda", num_gpus=1, ray_actor_options={"num_cpus": 1})
    with pytest.raises(ValueError, match="needs GPUs"):
        ray_serve.run(str(tiny_dir), device="cuda", num_gpus=1, ray_actor_options={"num_cpus": 1})
    for field in ("num_cpus", "num_gpus", "stall_timeout_s"):
        with pytest.raises(ValueError, match=field):  # pydantic's ValidationError: no inf or NaN
            ray_serve.app_builder({"checkpoint": str(tiny_dir), field: float("inf")})
    # build() itself checks what AppArgs checks (each was only a replica failing to start)
    for field, value in (("max_batch_size", 0), ("max_body_bytes", 0), ("max_request_tokens", 0),
                         ("kv_cache_tokens", 0), ("cpu_weights", "bogus"), ("stall_timeout_s", 0)):
        with pytest.raises(ValueError, match=field):
            ray_serve.build(str(tiny_dir), **{field: value})


# ------------------------------------------------------------------------------------------ failure (last)
def test_killing_a_replica_mid_run(client, cluster):
    """In-flight requests on the killed replica fail cleanly (no hang), the others complete; Serve replaces it."""
    from ray.serve._private.common import DeploymentID, ReplicaID

    n = 6
    results: dict[int, tuple] = {}
    replica_of: dict[int, str] = {}
    ended: dict[int, float] = {}

    def one(i: int) -> None:
        t0 = time.monotonic()
        try:
            raw = client.completions.with_raw_response.create(stream=i % 2 == 1, **LONG)
            replica_of[i] = raw.headers.get(ray_serve.REPLICA_HEADER)
            if i % 2 == 1:
                finish = None
                for chunk in raw.parse():
                    if chunk.choices:
                        finish = chunk.choices[0].finish_reason or finish
            else:
                finish = raw.parse().choices[0].finish_reason
            results[i] = ("done", finish, time.monotonic() - t0)
        except (openai.APIError, httpx.HTTPError) as e:  # APIConnectionError, InternalServerError, ...
            results[i] = ("error", type(e).__name__, time.monotonic() - t0)
        ended[i] = time.monotonic()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    # A stream announces its replica once it runs; kill that replica while it does.
    _wait_for(lambda: replica_of.get(1), 30, "the first stream to start")
    victim = replica_of[1]
    name = ReplicaID(victim, DeploymentID(name=ray_serve.DEPLOYMENT_NAME, app_name=APP)).to_full_id_str()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    killed = time.monotonic()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung after its replica was killed"
    assert len(results) == n
    for i, (kind, detail, _) in results.items():
        if kind == "done":
            assert detail in ("stop", "length"), (i, results[i])  # a stream that ended must have finished
        if replica_of.get(i) == victim:
            # The requests are alike and may reach EOS early: one on the victim may have ended before the kill.
            assert kind == "error" or ended[i] <= killed, (i, results[i])
        elif replica_of.get(i) is not None:
            assert kind == "done", (i, results[i])

    def replaced():
        seen = set()
        for _ in range(8):
            r = httpx.post(cluster + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4, **FAST},
                           timeout=30)
            if r.status_code != 200:
                return None
            seen.add(r.headers[ray_serve.REPLICA_HEADER])
        return seen if len(seen) == 2 and victim not in seen else None

    _wait_for(replaced, 60, "a new replica beside the survivor")
    status = serve.status().applications[APP].deployments[ray_serve.DEPLOYMENT_NAME]
    assert status.replica_states.get("RUNNING") == 2, status
