"""The Ray Serve application: an HTTP ingress and N generator replicas.

    Ingress    (no CPU reserved) GET / (a page to try it), GET /healthz, GET /v1/models, POST /v1/generate,
               POST /v1/images/generations (OpenAI's Images API): checks requests (400),
               answers overload with 503 + Retry-After, applies the deadline (504, the replica's work cancelled)
    Generator  (N replicas) loads the pipeline and its engines once; requests with the same height, width,
               steps and guidance are grouped by Ray Serve's batching (one queue per group) into one pipeline
               call of up to max_batch images, one forward at a time per replica

`build_app(args)` is the import path of the Serve config file (`dcaccel serve --emit-config`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time

import ray
from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.metrics import Counter, Histogram
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from .model import APP_NAME, ServeSettings, deployment_options
from .request import MAX_SEED, Limits, RequestError, parse_images_request, parse_request

logger = logging.getLogger(__name__)

GENERATOR = "Generator"
IMAGES = "/v1/images/generations"  # OpenAI's Images API
ROUTES = {"/": "GET", "/healthz": "GET", "/v1/models": "GET", "/v1/generate": "POST", IMAGES: "POST"}
_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error"}
# a generator replica (or its node) lost while it held the request: the client may retry on another replica
REPLICA_LOST = (RayActorError, NodeDiedError, WorkerCrashedError, ReplicaUnavailableError,
                DeploymentUnavailableError)
LATENCY_BOUNDS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]


@serve.deployment(name=GENERATOR, ray_actor_options={"num_cpus": 1}, max_constructor_retry_count=3)
class Generator:
    def __init__(self, settings: dict):
        from .model import ModelServer

        self.server = ModelServer(ServeSettings(**settings))
        self.replica = f"{ray.util.get_node_ip_address()}/{os.getpid()}"  # X-Replica: which node, which process
        self.settings = self.server.settings
        self.lock = asyncio.Lock()  # one pipeline call at a time per replica
        self.batched = serve.batch(max_batch_size=self.settings.max_batch,
                                   batch_wait_timeout_s=self.settings.batch_wait_ms / 1000)(self._run_batch)
        self.batch_size = Histogram("dcaccel_batch_size", description="images per pipeline call",
                                    boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32])
        self.queue_s = Histogram("dcaccel_queue_seconds", description="time from the ingress to the pipeline call",
                                 boundaries=LATENCY_BOUNDS)
        self.denoiser_s = Histogram("dcaccel_denoiser_seconds", description="denoiser loop time per pipeline call",
                                    boundaries=LATENCY_BOUNDS)
        self.steps = Counter("dcaccel_denoiser_steps", description="denoiser evaluations by graph",
                             tag_keys=("graph",))

    def check_health(self):
        if self.server is None:
            raise RuntimeError("no model loaded")

    def limits(self) -> dict:
        return self.server.limits().__dict__

    def describe(self) -> dict:
        return {**self.server.describe(), "replica_pid": os.getpid(), "load_seconds": self.server.load_seconds}

    async def _run_batch(self, params: list[dict]) -> list[dict]:
        """What Ray Serve's batching grouped (up to max_batch requests): one pipeline call per group of requests
        with the same height, width, steps and guidance (different resolutions never share a call)."""
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p["height"], p["width"], p["steps"], p["guidance"]), []).append(i)
        results: list[dict | None] = [None] * len(params)
        for indices in groups.values():
            group = [params[i] for i in indices]
            async with self.lock:
                start = time.time()
                call = asyncio.ensure_future(asyncio.to_thread(self.server.generate, group))
                try:
                    out = await asyncio.shield(call)
                except asyncio.CancelledError:
                    # the thread cannot be stopped: hold the lock until it ends, so calls never overlap
                    await asyncio.gather(call, return_exceptions=True)
                    raise
                except Exception as e:  # nothing a batch does may take the replica down
                    logger.exception("pipeline call failed")
                    out = [{"error": f"{type(e).__name__}: {e}", "status": 500}] * len(group)
            if "error" not in out[0]:
                for p, r in zip(group, out):
                    r["queue_s"] = start - p["received"]
                    r["replica"] = self.replica
                try:
                    self._record(out)
                except Exception:  # metrics never fail a request
                    logger.exception("recording metrics failed")
            for i, r in zip(indices, out):
                results[i] = r
        return results

    def _record(self, results: list[dict]) -> None:
        self.batch_size.observe(len(results))
        self.denoiser_s.observe(results[0]["denoiser_s"])
        for graph in ("full", "shallow"):
            if results[0][f"{graph}_steps"]:  # Counter.inc refuses 0
                self.steps.inc(results[0][f"{graph}_steps"], tags={"graph": graph})
        for r in results:
            self.queue_s.observe(r["queue_s"])

    async def generate(self, params: dict) -> dict:
        try:
            reason = self.server.check_prompt(params)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}", "status": 500}
        if reason:
            return {"error": reason, "status": 400}
        return await self.batched(params)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
                  max_queued_requests=256, backpressure_config={"status_code": 503, "retry_after_s": 1})
class Ingress:
    def __init__(self, generator, settings: dict, app_name: str = APP_NAME):
        self.generator, self.app_name = generator, app_name
        self.settings = ServeSettings(**settings)
        self.limits: Limits | None = None
        self.limits_lock = asyncio.Lock()
        self._status_cache = None
        self.requests = Counter("dcaccel_requests", description="HTTP requests by route and status",
                                tag_keys=("route", "status"))
        self.latency = Histogram("dcaccel_request_seconds", description="request latency (POST /v1/generate, 200)",
                                 boundaries=LATENCY_BOUNDS)

    def _json(self, route: str, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        self.requests.inc(tags={"route": route, "status": str(status)})
        return JSONResponse(body, status_code=status, headers=headers)

    def _error(self, route: str, status: int, message: str, headers: dict | None = None, param: str | None = None,
               code: str | None = None) -> JSONResponse:
        """{"error": message} on dcaccel's routes; OpenAI's error object on its route (its client raises
        BadRequestError, NotFoundError, ... carrying the message)."""
        if route != IMAGES:
            return self._json(route, status, {"error": message}, headers)
        kind = _ERROR_TYPES.get(status, "server_error")
        return self._json(route, status, {"error": {"message": message, "type": kind, "param": param, "code": code}},
                          headers)

    async def __call__(self, request: Request) -> Response:
        path = request.scope["path"][len(request.scope.get("root_path", "")):] or "/"
        try:
            if path == "/" and request.method == "GET":  # a page to try it: no build step, no external assets
                self.requests.inc(tags={"route": "/", "status": "200"})
                return HTMLResponse(_page())
            if path == "/healthz" and request.method == "GET":
                return await self._health()
            if path == "/v1/models" and request.method == "GET":
                return await self._models()
            if path == "/v1/generate" and request.method == "POST":
                return await self._generate(request)
            if path == IMAGES and request.method == "POST":
                return await self._images(request)
            if path in ROUTES:
                allowed = ROUTES[path]
                return self._error(path, 405, f"method {request.method} is not allowed on {path}; use {allowed}",
                                   {"Allow": allowed})
            routes = ", ".join(f"{m} {r}" for r, m in ROUTES.items())
            return self._json("other", 404, {"error": f"no route {path}; routes: {routes}"})
        except BackPressureError:  # any call to the generator (limits, describe, generate) may be refused
            return self._overloaded(path)
        except REPLICA_LOST as e:
            logger.warning("replica lost: %s", str(e).strip().splitlines()[0] if str(e).strip() else type(e))
            return self._error(path if path in ROUTES else "other", 503,
                               f"the replica serving this request was lost ({type(e).__name__}: its node left or "
                               "its process died); retry: the other replicas go on serving",
                               {"Retry-After": "1"}, code="replica_lost")
        except Exception as e:  # an answer, never a dead ingress
            logger.exception("ingress error")
            cause = getattr(e, "cause", None) or e  # a replica's exception arrives as RayTaskError(cause)
            message = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
            return self._error(path if path in ROUTES else "other", 500,
                               f"internal error: {type(cause).__name__}: {message}")

    def _loading(self, route: str) -> JSONResponse:
        return self._error(route, 503, "the model is loading", {"Retry-After": "1"}, code="loading")

    def _overloaded(self, route: str) -> JSONResponse:
        return self._error(route, 503, "the server is overloaded; retry later", {"Retry-After": "1"},
                           code="overloaded")

    async def _status(self) -> tuple[bool, int, dict]:
        """(every replica loaded, replicas running, replica states), asked of the controller at most once a
        second."""
        from ray.serve.schema import DeploymentStatus

        now = time.monotonic()
        if self._status_cache is None or now - self._status_cache[0] > 1.0:
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(self.app_name)
            dep = app.deployments.get(GENERATOR) if app else None
            states = {str(getattr(k, "value", k)): v for k, v in dict(dep.replica_states).items()} if dep else {}
            self._status_cache = (now, dep is not None and dep.status == DeploymentStatus.HEALTHY,
                                  states.get("RUNNING", 0), states)
        return self._status_cache[1:]

    async def _ready(self) -> bool:
        """Requests are taken while at least one replica runs (also while others start or stop: scaling)."""
        _, running, _ = await self._status()
        return running > 0

    async def _health(self) -> Response:
        ready, _, replicas = await self._status()  # healthy: every replica has loaded
        if not ready:
            return self._json("/healthz", 503, {"status": "loading", "replicas": replicas}, {"Retry-After": "1"})
        return self._json("/healthz", 200, {"status": "ok", "replicas": replicas})

    async def _limits(self) -> Limits:
        async with self.limits_lock:  # fetched once, by the first request
            if self.limits is None:
                self.limits = Limits(**(await self.generator.limits.remote()))
        return self.limits

    async def _models(self) -> Response:
        if not await self._ready():
            return self._loading("/v1/models")
        info = await self.generator.describe.remote()
        # OpenAI's list shape (object, data[].id), with dcaccel's own fields kept beside it and in each entry
        entry = {"id": self.settings.model, "object": "model", "created": 0, "owned_by": "dcaccel", **info}
        return self._json("/v1/models", 200, {"object": "list", "data": [entry], "models": [info],
                                              "replicas": self.settings.replicas})

    async def _generate(self, request: Request) -> Response:
        received = time.time()
        if not await self._ready():
            return self._loading("/v1/generate")
        limits = await self._limits()
        try:
            req = parse_request(await request.body(), limits)
        except RequestError as e:
            return self._error("/v1/generate", 400, str(e))
        seed = _seed(req)
        results = await self._run([_params(req, limits, seed, received)], received)
        if isinstance(results, Response):
            return results
        result = results[0]
        total = time.time() - received
        self.latency.observe(total)
        self.requests.inc(tags={"route": "/v1/generate", "status": "200"})
        headers = {"X-Seed": str(seed), "X-Server-Seconds": f"{total:.4f}",
                   "X-Queue-Seconds": f"{result['queue_s']:.4f}",
                   "X-Pipeline-Seconds": f"{result['pipeline_s']:.4f}",
                   "X-Denoiser-Seconds": f"{result['denoiser_s']:.4f}", "X-Batch-Size": str(result["batch_size"]),
                   "X-Replica": result["replica"],
                   "X-Steps": f"{result['full_steps']} full, {result['shallow_steps']} shallow",
                   "X-Schedule": result.get("schedule", "")}
        return Response(result["png"], media_type="image/png", headers=headers)

    async def _run(self, params: list[dict], received: float, route: str = "/v1/generate"):
        """Each request of `params` on the generators at once (Ray Serve batches those that fit together): their
        results, or the error response (the first error; the deadline cancels them all)."""
        responses = []
        try:
            for p in params:
                responses.append(self.generator.generate.remote(p))  # a full queue: BackPressureError, 503
        except BackPressureError:
            for response in responses:  # all or none of a request's images
                response.cancel()
            raise
        try:
            results = await asyncio.wait_for(asyncio.gather(*responses),
                                             max(0.0, self.settings.deadline_s - (time.time() - received)))
        except asyncio.TimeoutError:
            # wait_for alone would leave it on the replica: a queued request is dropped; one whose batch already
            # runs finishes with its batch (the other requests in it need that call) and its image is discarded
            for response in responses:
                response.cancel()
            return self._error(route, 504, f"the request ran past its deadline of {self.settings.deadline_s:g} s "
                                           "and was cancelled", code="deadline_exceeded")
        except Exception:  # e.g. a replica lost: the request's other images are not waited for
            for response in responses:
                response.cancel()
            raise
        for result in results:
            if "error" in result:
                return self._error(route, result["status"], result["error"])
        return results

    async def _images(self, request: Request) -> Response:
        """POST /v1/images/generations as OpenAI's Images API defines it: n images of one prompt, batched
        together, as base64 PNGs; seeds seed, seed + 1, ... (random when none is given), listed in X-Seeds."""
        import base64

        received = time.time()
        if not await self._ready():
            return self._loading(IMAGES)
        limits = await self._limits()
        try:
            req, n = parse_images_request(await request.body(), limits, self.settings.model, self.settings.max_batch)
        except RequestError as e:
            return self._error(IMAGES, e.status, str(e), param=e.param, code=e.code)
        first = _seed(req)
        seeds = [(first + i) % (MAX_SEED + 1) for i in range(n)]
        results = await self._run([_params(req, limits, seed, received) for seed in seeds], received, IMAGES)
        if isinstance(results, Response):
            return results
        total = time.time() - received
        self.latency.observe(total)
        body = {"created": int(received), "data": [{"b64_json": base64.b64encode(r["png"]).decode()} for r in results]}
        headers = {"X-Seeds": ",".join(map(str, seeds)), "X-Server-Seconds": f"{total:.4f}",
                   "X-Replica": ",".join(sorted({r["replica"] for r in results})),
                   "X-Steps": f"{results[0]['full_steps']} full, {results[0]['shallow_steps']} shallow",
                   "X-Schedule": results[0].get("schedule", "")}
        return self._json(IMAGES, 200, body, headers)


def _seed(req) -> int:
    """The request's seed, or a random one (63 bits)."""
    return req.seed if req.seed is not None else int.from_bytes(os.urandom(8), "big") >> 1


def _params(req, limits: Limits, seed: int, received: float) -> dict:
    """What a generator replica runs for one image of `req`, the server's defaults filled in."""
    return {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": seed,
            "steps": req.steps or limits.default_steps,
            "guidance": req.guidance if req.guidance is not None else limits.default_guidance,
            "height": req.height, "width": req.width, "received": received}


@functools.lru_cache(maxsize=1)
def _page() -> str:
    """The page at GET / (read once per ingress process)."""
    from importlib import resources

    return resources.files("dcaccel.serve").joinpath("page.html").read_text(encoding="utf-8")


def build_app(args: dict):
    """The application for `settings` (a ServeSettings as a dict): what `dcaccel serve` runs and what the Serve
    config file's import_path names."""
    settings = ServeSettings(**args)
    options = deployment_options(settings)
    generator = Generator.options(num_replicas=settings.replicas, **options[GENERATOR]).bind(settings.to_dict())
    return Ingress.options(**options["Ingress"]).bind(generator, settings.to_dict())


def settings_json(settings: ServeSettings) -> str:
    return json.dumps(settings.to_dict(), sort_keys=True)
