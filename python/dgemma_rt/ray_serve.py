"""dgemma_rt on Ray Serve: one Engine per replica, the same OpenAI-compatible app as ``dgemma-rt serve``.

``pip install "dgemma_rt[ray]"``. Each replica loads the checkpoint into its own ``Engine`` and serves
``dgemma_rt.server.create_app`` around it through Serve's FastAPI ingress, so routes, validation,
errors, SSE draft streaming and disconnect cancellation are those of ``dgemma-rt serve``; Serve's
proxy routes each request to a replica.

- ``build(checkpoint, replicas=..., ...)`` returns a Serve ``Application`` for ``serve.run``;
  ``app_builder`` is the same for ``serve run`` / ``serve deploy`` config files (``import_path:
  dgemma_rt.ray_serve:app_builder``, ``args:`` the fields of :class:`AppArgs`).
- ``dgemma-rt serve CKPT --ray --replicas N [--max-replicas M]`` starts (or joins) a Ray instance and
  runs it (:func:`run`).

Admission: a replica takes ``max_ongoing_requests = max_batch_size + replica_queue`` requests: a
full batch plus ``replica_queue`` (default 1: one request ready for the next free row, so a row
does not wait for a round trip to the router) waiting for a row. Serve's router keeps the rest and
hands each to a replica with room as rows free up. Its choice among replicas is approximate
(power of two choices on cached queue lengths), so a larger ``replica_queue`` lets requests wait
in one replica while another idles; the cap is what keeps engines evenly filled. Beyond
``max_queued_requests`` waiting in the router the answer is 503 (Serve's back-pressure), where the
single-process server answers 429. A completions ``prompt`` list (or ``n`` choices) is one request
to Serve and one job per prompt and choice in the replica, whose own queue is sized so that it never
refuses what Serve admitted (up to ``max_batch_size + max_queued_requests`` choices, 64 when
unbounded, as ``dgemma-rt serve`` takes). With ``max_replicas`` above ``replicas`` the deployment
autoscales on ongoing requests, targeting ``max_batch_size`` per replica: replicas are added while
requests wait for a row, removed while batches run part-empty.

State: every request is self-contained (the prompt, chat history included, is encoded afresh and
the KV blocks go back to the pool when it ends), so any replica can serve any turn of a
conversation and no session affinity is needed; a given seed gives the same text on every replica.

Replicas answer with the header ``x-dgemma-replica`` (Serve's replica id). Per-replica metrics go
through Ray's metrics (the Prometheus endpoint of each Ray node, tagged ``deployment``, ``replica``,
``application``): ``ray_dgemma_*``, the counters and gauges of ``dgemma-rt serve``'s ``/metrics``
(not its per-scrape rates, which Prometheus derives from the counters). ``/metrics`` over HTTP
answers for whichever replica the router picked. Serve's
``check_health`` fails a replica whose engine stopped answering, or that has had work and made no
progress for ``stall_timeout_s``; Serve then replaces it, as it does a replica whose process died.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from typing import Any, Literal, Optional

try:
    from pydantic import BaseModel, ConfigDict, Field
    from ray import serve
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("dgemma_rt.ray_serve needs Ray Serve: pip install 'dgemma_rt[ray]'") from e

from dgemma_rt.engine import MAX_BATCH_SIZE
from dgemma_rt.server import create_app, listen, no_tokenizer

__all__ = ["AppArgs", "DGemmaReplica", "REPLICA_HEADER", "app_builder", "build", "deployment_options", "run"]

#: Response header naming the replica that served a request (Serve's replica id).
REPLICA_HEADER = "x-dgemma-replica"
DEPLOYMENT_NAME = "DGemma"
APP_NAME = "dgemma"


class _ReplicaHeader:
    """ASGI middleware: adds ``x-dgemma-replica`` to every response (streams included)."""

    def __init__(self, app: Any, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, tagged)


class _RayMetrics:
    """Publishes a backend's ``/metrics`` series as Ray metrics, every ``interval_s`` seconds, from a thread."""

    def __init__(self, backend: Any, interval_s: float):
        from ray.serve.metrics import Counter, Gauge

        self.backend, self.interval_s = backend, interval_s
        g = lambda name, doc, tags=(): Gauge(name, description=doc, tag_keys=tags)  # noqa: E731
        c = lambda name, doc, tags=(): Counter(name, description=doc, tag_keys=tags)  # noqa: E731
        self.gauges = {
            "queue_depth": g("dgemma_queue_depth", "Requests waiting for a worker, a row or KV blocks."),
            "active_rows": g("dgemma_active_rows", "Rows in the engine's batch now."),
            "running": g("dgemma_requests_running", "Requests handed to the engine."),
            "in_flight": g("dgemma_requests_in_flight", "Requests accepted and not finished."),
            "kv_in_use": g("dgemma_kv_blocks_in_use", "KV cache blocks in use, per pool.", ("pool",)),
            "kv_total": g("dgemma_kv_blocks_total", "KV cache blocks, per pool.", ("pool",)),
            "kv_reserved": g("dgemma_kv_blocks_reserved", "Free KV cache blocks promised to admitted requests, per pool.",
                             ("pool",)),
        }
        self.counters = {
            "decoder_passes": c("dgemma_decoder_passes_total", "Batched decoder passes run by the engine."),
            "row_steps": c("dgemma_row_steps_total", "Rows denoised, summed over decoder passes."),
            "committed_tokens": c("dgemma_committed_tokens_total", "Committed (non-pad) tokens."),
            "requests": c("dgemma_requests_total", "Finished requests by outcome.", ("outcome",)),
            "prompt_tokens": c("dgemma_prompt_tokens_total", "Prompt tokens of completed requests."),
            "generated_tokens": c("dgemma_generated_tokens_total", "Completion tokens of completed requests."),
            "denoising_steps": c("dgemma_denoising_steps_total", "Denoising steps of completed requests."),
        }
        self.last: dict[tuple[str, str], float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="dgemma-ray-metrics", daemon=True)
        self.thread.start()

    def _count(self, key: str, value: float, tags: dict[str, str] | None = None) -> None:
        k = (key, repr(sorted((tags or {}).items())))
        delta = value - self.last.get(k, 0)
        if delta > 0:
            self.counters[key].inc(delta, tags=tags)
        self.last[k] = value

    def publish(self) -> None:
        snap = self.backend.snapshot()
        sched, kv = snap["scheduler"], snap["kv"]
        self.gauges["queue_depth"].set(snap["waiting"] + sched["queued_requests"])
        self.gauges["active_rows"].set(sched["active_rows"])
        self.gauges["running"].set(snap["running"])
        self.gauges["in_flight"].set(snap["waiting"] + snap["running"])
        for pool in ("full", "sliding"):
            self.gauges["kv_in_use"].set(kv[f"{pool}_total"] - kv[f"{pool}_free"], tags={"pool": pool})
            self.gauges["kv_total"].set(kv[f"{pool}_total"], tags={"pool": pool})
            self.gauges["kv_reserved"].set(kv[f"{pool}_reserved"], tags={"pool": pool})
        self._count("decoder_passes", sched["decoder_passes"])
        self._count("row_steps", sched["row_steps"])
        self._count("committed_tokens", sched["committed_tokens"])
        for outcome, n in [*snap["outcomes"].items(), ("rejected", snap["rejected"])]:
            self._count("requests", n, {"outcome": outcome})
        for key in ("prompt_tokens", "generated_tokens", "denoising_steps"):
            self._count(key, snap[key])

    def _loop(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.publish()
            except Exception:  # noqa: BLE001 - metrics never take the replica down; check_health reports a dead engine
                pass


@serve.ingress()
class DGemmaReplica:
    """One Engine and the OpenAI-compatible app around it (see the module docstring).

    ``engine_kwargs`` go to ``Engine``; ``app_kwargs`` to ``dgemma_rt.server.create_app``.
    """

    def __init__(self, checkpoint: str, model_name: str, engine_kwargs: dict[str, Any], app_kwargs: dict[str, Any],
                 stall_timeout_s: float = 300.0, metrics_interval_s: float = 5.0):
        from dgemma_rt.engine import Engine

        self._engine = Engine(checkpoint, **engine_kwargs)
        self._model_name = model_name
        self._app_kwargs = dict(app_kwargs)
        self._stall_timeout_s = stall_timeout_s
        self._metrics_interval_s = metrics_interval_s
        self._backend: Any = None
        self._metrics: _RayMetrics | None = None
        try:
            self._replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (unit tests)
            self._replica = f"pid-{os.getpid()}"

    def __serve_build_asgi_app__(self):
        app = create_app(self._engine, self._model_name, **self._app_kwargs)
        app.add_middleware(_ReplicaHeader, replica=self._replica)
        self._backend = app.state.backend
        if self._metrics_interval_s > 0:
            self._metrics = _RayMetrics(self._backend, self._metrics_interval_s)
        return app

    def check_health(self) -> None:
        """Serve's health hook: raising marks the replica unhealthy, and Serve replaces it."""
        if self._backend is None:
            return
        problem = self._backend.health_problem(self._stall_timeout_s)
        if problem is not None:
            raise RuntimeError(f"dgemma_rt replica {self._replica}: {problem}")

    def __del__(self):
        if getattr(self, "_metrics", None) is not None:
            self._metrics.stop.set()


def deployment_options(
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    max_batch_size: int = 8,
    replica_queue: int | None = None,
    max_queued_requests: int = -1,
    num_gpus: float = 0,
    num_cpus: float = 1,
    runtime_env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Serve deployment options: replicas (or autoscaling), admission tied to the batch size, resources."""
    if replicas < 1 and not (max_replicas and max_replicas >= 1):
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if max_replicas is not None and max_replicas < replicas:
        raise ValueError(f"max_replicas {max_replicas} is below replicas {replicas}")
    queue = 1 if replica_queue is None else replica_queue
    if queue < 0:
        raise ValueError(f"replica_queue must be >= 0, got {queue}")
    actor: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        actor["num_gpus"] = num_gpus
    if runtime_env:
        actor["runtime_env"] = runtime_env
    opts: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor,
        "max_ongoing_requests": max_batch_size + queue,
        "max_queued_requests": max_queued_requests,
    }
    if max_replicas is not None and max_replicas > replicas:
        opts["autoscaling_config"] = {
            "min_replicas": replicas, "initial_replicas": max(replicas, 1), "max_replicas": max_replicas,
            "target_ongoing_requests": max_batch_size,
        }
    else:
        opts["num_replicas"] = replicas
    return opts


def build(
    checkpoint: str | os.PathLike,
    *,
    model_name: str | None = None,
    replicas: int = 1,
    max_replicas: int | None = None,
    num_gpus: float = 0,
    num_cpus: float = 1,
    device: str = "cpu",
    max_batch_size: int = 8,
    replica_queue: int | None = None,
    max_queued_requests: int = -1,
    kv_cache_tokens: int | None = None,
    num_threads: int | None = None,
    cpu_weights: str = "bf16",
    max_request_tokens: int = 8192,
    max_request_steps: int = 256,
    max_body_bytes: int = 1 << 20,
    stall_timeout_s: float = 300.0,
    metrics_interval_s: float = 5.0,
    runtime_env: dict[str, Any] | None = None,
    **deployment_overrides: Any,
) -> "serve.Application":
    """A Serve application of ``replicas`` dgemma_rt replicas of ``checkpoint`` (a path every node can read).

    On CPU replicas the engine uses ``num_cpus`` threads unless ``num_threads`` says otherwise.
    ``deployment_overrides`` go to ``Deployment.options`` (e.g. ``health_check_period_s``).
    """
    if not os.fspath(checkpoint):
        raise ValueError("checkpoint is empty: give the checkpoint directory's path")
    # The checks a config file's args get (AppArgs): here, not as replicas that fail to start.
    AppArgs(checkpoint=os.fspath(checkpoint), model_name=model_name, replicas=replicas, max_replicas=max_replicas,
            num_gpus=num_gpus, num_cpus=num_cpus, device=device, max_batch_size=max_batch_size,
            replica_queue=replica_queue, max_queued_requests=max_queued_requests, kv_cache_tokens=kv_cache_tokens,
            num_threads=num_threads, cpu_weights=cpu_weights, max_request_tokens=max_request_tokens,
            max_request_steps=max_request_steps, max_body_bytes=max_body_bytes, stall_timeout_s=stall_timeout_s,
            metrics_interval_s=metrics_interval_s)
    path = os.path.abspath(os.fspath(checkpoint))  # replicas do not run in this process's directory
    name = model_name or os.path.basename(os.path.normpath(path))
    queue = 1 if replica_queue is None else replica_queue
    if num_threads is None and not num_gpus:
        num_threads = max(1, int(num_cpus))
    engine_kwargs = {"device": device, "max_batch_size": max_batch_size, "kv_cache_tokens": kv_cache_tokens,
                     "num_threads": num_threads, "cpu_weights": cpu_weights}
    opts = deployment_options(replicas=replicas, max_replicas=max_replicas, max_batch_size=max_batch_size,
                              replica_queue=queue, max_queued_requests=max_queued_requests, num_gpus=num_gpus,
                              num_cpus=num_cpus, runtime_env=runtime_env)
    opts.update(deployment_overrides)
    # Serve never hands a replica more than max_ongoing_requests, each of them at most max_prompts choices (a
    # prompt list times n; as dgemma-rt serve allows: its running requests plus its queue, 64 by default), so
    # the app's own queue (429 when full) can hold all of them: admission is Serve's.
    max_prompts = max_batch_size + (max_queued_requests if max_queued_requests > 0 else 64)
    ongoing = int(opts["max_ongoing_requests"])
    app_kwargs = {"max_queue": ongoing * max_prompts - max_batch_size, "max_running": max_batch_size,
                  "max_prompts": max_prompts, "max_body_bytes": max_body_bytes,
                  "max_request_tokens": max_request_tokens, "max_request_steps": max_request_steps}
    _check_replica_device(device, _replica_gpus(num_gpus, deployment_overrides))
    return serve.deployment(DGemmaReplica).options(**opts).bind(path, name, engine_kwargs, app_kwargs,
                                                                stall_timeout_s, metrics_interval_s)


class AppArgs(BaseModel):
    """The ``args`` of ``app_builder`` (``serve run`` config files): :func:`build`'s parameters."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    checkpoint: str
    model_name: Optional[str] = None
    replicas: int = Field(1, ge=0)
    max_replicas: Optional[int] = Field(None, ge=1)
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, ge=0)
    device: str = "cpu"
    max_batch_size: int = Field(8, ge=1, le=MAX_BATCH_SIZE)
    replica_queue: Optional[int] = Field(None, ge=0)
    max_queued_requests: int = -1
    kv_cache_tokens: Optional[int] = Field(None, ge=1)
    num_threads: Optional[int] = Field(None, ge=1)
    cpu_weights: Literal["bf16", "stored", "float32"] = "bf16"
    max_request_tokens: int = Field(8192, ge=1)
    max_request_steps: int = Field(256, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1)
    stall_timeout_s: float = Field(300.0, gt=0)
    metrics_interval_s: float = Field(5.0, ge=0)


def app_builder(args: "AppArgs | dict[str, Any]") -> "serve.Application":
    """Serve application builder: ``serve run dgemma_rt.ray_serve:app_builder checkpoint=/models/x``.

    ``args`` is validated here (Serve validates only builders whose annotation is a class, and
    this module's annotations are strings): unknown keys and out-of-range values are errors, and
    the strings of ``serve run ... key=value`` become numbers.
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(dict(args))
    return build(**args.model_dump())


def _replica_gpus(num_gpus: float, overrides: dict[str, Any]) -> float:
    """The GPUs a replica really gets: ray_actor_options among the deployment overrides replace the actor
    options build() makes from num_gpus."""
    actor = overrides.get("ray_actor_options")
    return (actor.get("num_gpus") if isinstance(actor, dict) else num_gpus) or 0


def _check_replica_device(device: str, num_gpus: float) -> None:
    """A CUDA device a replica cannot see: Ray shows a replica only the ceil(num_gpus) GPUs it assigns
    (CUDA_VISIBLE_DEVICES), numbered from 0, so every replica would fail to start."""
    kind, _, index = str(device).partition(":")
    if kind != "cuda":
        return  # "cpu", or what the engine's own check names as unknown
    visible = math.ceil(num_gpus)
    if visible == 0:
        raise ValueError(f"device {device!r} needs GPUs per replica (num_gpus, --gpus-per-replica): "
                         "a replica sees only the GPUs Ray gives it")
    if index.isdigit() and int(index) >= visible:
        raise ValueError(f"device {device!r}: a replica with {num_gpus:g} GPU(s) (num_gpus, --gpus-per-replica) "
                         f"sees {visible}, as cuda:0" + (f" to cuda:{visible - 1}" if visible > 1 else ""))


def _check_port_free(host: str, port: int) -> None:
    for sock in listen(host, port):  # Ray's proxy binds it itself
        sock.close()


def _check_resources(have: dict[str, float], build_kwargs: dict[str, Any]) -> None:
    """A local instance that cannot place the first replicas: serve.run would wait for them forever."""
    n = max(int(build_kwargs.get("replicas", 1)), 1)
    need = {"CPU": n * float(build_kwargs.get("num_cpus", 1)), "GPU": n * float(build_kwargs.get("num_gpus") or 0)}
    short = [f"{need[k]:g} {k}s (it has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0)]
    if short:
        raise ValueError(f"{n} replica(s) need {' and '.join(short)} on this machine's Ray instance: lower --replicas, "
                         "--cpus-per-replica or --gpus-per-replica, or join a cluster with --ray-address")


def _running_apps() -> set[str]:
    """The names of the Serve applications on the cluster this process joined (none where Serve is not up)."""
    try:
        return set(serve.status().applications)
    except Exception:  # noqa: BLE001 - no Serve controller yet: nothing runs
        return set()


def _deployment_message(app_name: str) -> str:
    try:
        return str(serve.status().applications[app_name].deployments[DEPLOYMENT_NAME].message)
    except Exception:  # noqa: BLE001 - the status is a detail of an error already being raised
        return ""


def run(
    checkpoint: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    app_name: str = APP_NAME,
    **build_kwargs: Any,
) -> None:
    """``dgemma-rt serve --ray``: deploys ``build(checkpoint, **build_kwargs)`` and serves until SIGINT/SIGTERM.

    ``address=None`` starts a local Ray instance (shut down on exit); ``"auto"`` or ``ray://...`` joins
    a running cluster (only this application is removed on exit). Serve's HTTP proxy listens on
    ``host:port`` on every node it runs on.
    """
    _check_replica_device(build_kwargs.get("device", "cpu"),
                          _replica_gpus(build_kwargs.get("num_gpus") or 0, build_kwargs))
    if port == 0:  # Serve's proxy would listen on a port nobody is told
        raise ValueError("port 0 (any free port) is not available with Ray Serve: give the port to listen on")
    import ray

    local = address is None
    if local and not os.path.isdir(checkpoint):  # on a cluster only the nodes need it
        raise ValueError(f"checkpoint directory {os.fspath(checkpoint)!r} does not exist")
    if local:
        # On this machine, what every replica would fail on is said here, before Ray starts, instead of
        # as a failed deployment with the cause in the Serve controller's log: the Engine's own checks
        # (device, options, the checkpoint's files, memory) and a port another process listens on.
        from dgemma_rt import _core
        from dgemma_rt.engine import DEFAULT_KV_CACHE_TOKENS

        kv = build_kwargs.get("kv_cache_tokens") or DEFAULT_KV_CACHE_TOKENS
        _core.check_checkpoint(os.fspath(checkpoint), build_kwargs.get("device", "cpu"), int(kv),
                               int(build_kwargs.get("max_batch_size", 8)), int(build_kwargs.get("num_threads") or 0))
        from dgemma_rt.text import Tokenizer

        if Tokenizer.from_dir(checkpoint) is None:  # CheckpointError for a corrupt one
            raise no_tokenizer(checkpoint)
        _check_port_free(host, port)
        # Workers of a local instance import the same dgemma_rt as this process (a source checkout too).
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        build_kwargs.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": pythonpath}})
    stop = threading.Event()
    raising = serving = ours = False

    def on_signal(*_: Any) -> None:
        stop.set()
        if raising and not serving:  # deploying: interrupt serve.run, then clean up below
            raise KeyboardInterrupt

    # Installed before ray.init, which takes seconds: a signal then only sets the flag (interrupting it
    # halfway could leave its processes behind), acted on once it returns. Ray's own SIGTERM handler, which
    # ray.init installs, aborts the process, leaving no chance to remove the application: ours again after.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if local:  # "local" even where RAY_ADDRESS is set: this instance is ours to shut down
            ray.init(address="local", include_dashboard=False)
        else:
            ray.init(address=address)
        for s in previous:
            signal.signal(s, on_signal)
        raising = True
        if stop.is_set():
            raise KeyboardInterrupt
        if local:
            _check_resources(ray.cluster_resources(), build_kwargs)
        elif app_name in _running_apps():  # serve.run would replace it (and our exit delete it)
            raise ValueError(f"this cluster already runs a Serve application named {app_name!r}: stop that "
                             f"server first (or `serve delete {app_name}`)")
        serve.start(http_options={"host": host, "port": port})
        ours = True
        try:
            serve.run(build(checkpoint, **build_kwargs), name=app_name, route_prefix="/")
        except RuntimeError as e:  # "Deploying application ... failed": the replicas' own error, if Serve has it
            raise RuntimeError(f"{e} {_deployment_message(app_name)}".strip()) from None
        serving = True
        print(f"dgemma_rt on Ray Serve: http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        try:
            if local and ray.is_initialized():
                serve.shutdown()
            elif ours:  # not an application this call refused to replace
                serve.delete(app_name)
        finally:
            ray.shutdown()
