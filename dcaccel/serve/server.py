"""Run the app on a local Ray (or a cluster's), wait until every replica is loaded, serve until Ctrl-C/SIGTERM,
then drain (in-flight requests finish) and exit 0. Also writes the Serve config file a cluster deploys."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from .model import APP_NAME, ServeSettings, deployment_options


def _ray_env() -> None:
    # Ray 2.60 turns token authentication on by default; a local cluster started here needs none, and a joined
    # cluster must be started with the same setting (see README: Serving).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_ray(address: str | None, num_cpus: float | None, metrics_port: int | None):
    _ray_env()
    import ray

    kwargs = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, object_store_memory=100 * 1024 ** 2,
                 _metrics_export_port=metrics_port, **kwargs)
    return ray


def metrics_url() -> str | None:
    import ray

    port = ray.nodes()[0].get("MetricsExportPort")
    return f"http://127.0.0.1:{port}/metrics" if port else None


def serve_forever(settings: ServeSettings, host: str, port: int, address: str | None = None,
                  metrics_port: int | None = None, out=print) -> int:
    """Blocks until stopped; returns the exit code (0 after a clean drain)."""
    start = time.perf_counter()
    cpus = settings.replicas * settings.cpus_per_replica
    ray = start_ray(address, max(cpus, os.cpu_count() or 1), metrics_port)
    stop = []
    # after ray.init: Ray installs its own SIGTERM handler, which exits with status 15
    signal.signal(signal.SIGINT, lambda *_: stop.append("SIGINT"))
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    from ray import serve

    from .app import build_app

    try:
        serve.start(http_options={"host": host, "port": port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        out(f"loading {settings.model} on {settings.replicas} replica(s) ({settings.backend}) ...")
        serve.run(build_app(settings.to_dict()), name=APP_NAME, route_prefix="/")
        out(f"serving http://{host}:{port} (POST /v1/generate, GET /v1/models, GET /healthz); metrics: "
            f"{metrics_url() or 'not exported'}; ready in {time.perf_counter() - start:.1f} s; Ctrl-C stops")
        while not stop:
            time.sleep(0.2)
        out(f"{stop[0]}: draining (in-flight requests finish) ...")
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        ray.shutdown()
    out("stopped")
    return 0


# -- the Serve config file -------------------------------------------------------------------------------------


def serve_config(settings: ServeSettings, host: str, port: int, min_replicas: int | None = None,
                 max_replicas: int | None = None, proxy_location: str = "EveryNode") -> dict:
    """A config for `serve deploy` / `serve run`: this app with its settings, replicas as given or autoscaled
    between min_replicas and max_replicas, the CPUs/GPUs/custom resources each replica reserves, and an HTTP
    proxy on every node or on the head only."""
    options = deployment_options(settings)
    generator = {"name": "Generator", **options["Generator"]}
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        hi = max_replicas if max_replicas is not None else max(lo, settings.replicas)
        if not 1 <= lo <= hi:
            raise ValueError(f"autoscaling needs 1 <= min_replicas <= max_replicas, got {lo} and {hi}")
        generator["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                           "target_ongoing_requests": settings.max_batch}
    else:
        generator["num_replicas"] = settings.replicas
    return {
        "proxy_location": proxy_location,
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": "dcaccel.serve.app:build_app",
            "args": settings.to_dict(),
            "deployments": [generator, {"name": "Ingress", **options["Ingress"]}],
        }],
    }


def validate_config(config: dict) -> None:
    """Check a config with Ray Serve's own schema, and refuse keys it would silently ignore."""
    from ray.serve.schema import ServeDeploySchema

    _unknown_keys(config, ServeDeploySchema, "config")
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        ServeSettings(**app.get("args", {}))


def _unknown_keys(data, model, where: str) -> None:
    import typing

    if not isinstance(data, dict) or not hasattr(model, "model_fields"):
        return
    fields = model.model_fields
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(fields)}")
    for key, value in data.items():
        annotation = fields[key].annotation
        for sub in [annotation, *typing.get_args(annotation)]:
            for inner in [sub, *typing.get_args(sub)]:
                if isinstance(inner, type) and hasattr(inner, "model_fields"):
                    items = value if isinstance(value, list) else [value]
                    for i, item in enumerate(items):
                        _unknown_keys(item, inner, f"{where}.{key}" + (f"[{i}]" if isinstance(value, list) else ""))


def write_config(path: str, config: dict) -> Path:
    import yaml

    validate_config(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text("# dcaccel serve: deploy with `serve deploy " + path.name + "` (or `serve run`)\n"
                   + yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)
    return path

