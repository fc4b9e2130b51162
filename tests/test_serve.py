"""`dcaccel serve` on a local Ray (CPU): health, models, images equal to `dcaccel generate`, batching, every bad
request, overload (503), deadline (504), a replica that keeps serving, metrics, the config file, Ctrl-C."""

import concurrent.futures
import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest

ray = pytest.importorskip("ray")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from dcaccel.serve.model import ServeSettings  # noqa: E402
from dcaccel.models import shipped_calibration  # noqa: E402

PROMPT = "a large red circle at the top left"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, body=None, method=None, timeout=120):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()  # case-insensitive
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture(scope="module")
def cluster():
    from ray import serve

    http_port, metrics_port = _free_port(), _free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 ** 2, logging_level="WARNING",
             log_to_driver=False, _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    yield {"url": f"http://127.0.0.1:{http_port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    serve.shutdown()
    ray.shutdown()


def _deploy(cluster, **settings):
    """The app with these settings on the module's Ray (deployed again only when another one is running: the slow
    tests deploy their own, and the tests after them must not run against it)."""
    from ray import serve

    from dcaccel.serve.app import APP_NAME, build_app

    defaults = dict(model="shapes", threads=1, cpus_per_replica=1.0)
    wanted = ServeSettings(**{**defaults, **settings}).to_dict()
    if cluster.get("deployed") == wanted:
        return cluster["url"]
    serve.delete(APP_NAME)
    cluster["deployed"] = None
    serve.run(build_app(wanted), name=APP_NAME, route_prefix="/")
    deadline = time.time() + 120
    while time.time() < deadline:
        status, _, _ = _request(cluster["url"] + "/healthz", timeout=30)
        if status == 200:
            cluster["deployed"] = wanted
            return cluster["url"]
        time.sleep(0.5)
    raise AssertionError("the app did not become healthy")


@pytest.fixture
def batched(cluster):
    """The batching server (deployed once, and again after a test that deployed another)."""
    return _deploy(cluster, max_batch=4, batch_wait_ms=300, max_queued=8)


def _generate_png(tmp_path, seed, steps=20, extra=()):
    """What `dcaccel generate` writes for the same model, settings and seed (in its own process, with the
    replica's one thread)."""
    import subprocess
    import sys

    out = tmp_path / f"cli-{seed}-{steps}.png"
    result = subprocess.run([sys.executable, "-m", "dcaccel.cli", "generate", PROMPT, "--seed", str(seed), "--steps",
                             str(steps), "--threads", "1", "--output", str(out), *extra], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


def test_health_and_models(batched):
    status, _, body = _request(batched + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = _request(batched + "/v1/models")
    info = json.loads(body)["models"][0]
    assert status == 200 and info["model"] == "shapes" and info["family"] == "unet" and info["backend"] == "eager"
    # the shapes model's default: its shipped calibration at the default budget, the cut filled in
    cal = json.loads(open(shipped_calibration("shapes")).read())
    k = cal["default_budget"]
    assert info["deepcache"]["schedule"] == "calibrated" and info["deepcache"]["branch"] == 0
    assert info["deepcache"]["num_full_steps"] == k and info["deepcache"]["full_steps"] == \
        cal["budgets"][str(k)]["full_steps"]
    assert info["max_batch"] == 4
    assert info["defaults"] == {"height": 32, "width": 32, "steps": 20, "guidance": 4.0}


def test_a_lone_request_equals_dcaccel_generate(batched, tmp_path):
    status, headers, png = _request(batched + "/v1/generate", {"prompt": PROMPT, "seed": 7})
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert headers["X-Seed"] == "7" and headers["X-Batch-Size"] == "1"
    k = json.loads(open(shipped_calibration("shapes")).read())["default_budget"]
    assert headers["X-Steps"] == f"{k} full, {20 - k} shallow"
    assert headers["X-Schedule"] == f"calibrated, {k} full steps of 20"
    assert float(headers["X-Server-Seconds"]) >= float(headers["X-Pipeline-Seconds"]) > 0
    assert png == _generate_png(tmp_path, 7)


def test_batched_requests_keep_their_seeds(batched):
    """Four at once: one pipeline call of 4, each image that request's own (same as it alone, within the
    tolerance batched arithmetic leaves: measured max |diff| <= 2 of 255 here)."""
    import io

    import numpy as np
    from PIL import Image

    seeds = [11, 12, 13, 14]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: _request(batched + "/v1/generate", {"prompt": PROMPT, "seed": s}), seeds))
    assert all(r[0] == 200 for r in results)
    assert max(int(r[1]["X-Batch-Size"]) for r in results) > 1, "requests were batched"
    for seed, (_, headers, png) in zip(seeds, results):
        assert headers["X-Seed"] == str(seed)
        _, _, alone = _request(batched + "/v1/generate", {"prompt": PROMPT, "seed": seed})
        a = np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(alone)), dtype=np.int16)
        assert np.abs(a - b).max() <= 2, (seed, np.abs(a - b).max())
    assert len({r[2] for r in results}) == 4


@pytest.mark.parametrize("body, field", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    ({"prompt": PROMPT, "sed": 1}, "unknown field(s) ['sed']"),
    ({"seed": 1}, "field 'prompt' is required"),
    ({"prompt": ""}, "field 'prompt' must be a non-empty string, got an empty one"),
    ({"prompt": 3}, "field 'prompt' must be a non-empty string, got int"),
    ({"prompt": "a " * 100}, "field 'prompt' is 102 tokens long; this model reads at most 16"),
    ({"prompt": "x" * 2001}, "at most 2000"),
    ({"prompt": PROMPT, "steps": 0}, "field 'steps' must be an integer in 1..200, got 0"),
    ({"prompt": PROMPT, "steps": "20"}, "field 'steps' must be an integer in 1..200, got \"20\""),
    ({"prompt": PROMPT, "steps": 2.5}, "field 'steps' must be an integer"),
    ({"prompt": PROMPT, "seed": -1}, "field 'seed' must be an integer in 0.."),
    ({"prompt": PROMPT, "guidance": "high"}, "field 'guidance' must be a number in 0..50"),
    ({"prompt": PROMPT, "height": 36}, "fields 'height'/'width' must be multiples of 8"),
    ({"prompt": PROMPT, "width": 100000}, "field 'width' must be an integer in 8..64"),  # 2x the model's size
    (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
    ({"prompt": "x" * 70000}, "at most 65536 are allowed"),
    (b'{"prompt": "a red circle", "seed": ' + b"9" * 5000 + b"}",
     "field 'seed' must be an integer in 0..9223372036854775807, got a number of 5000 characters"),
    (b'{"prompt": "a red circle", "steps": ' + b"1" * 5000 + b"}", "field 'steps' must be an integer in 1..200"),
    (b'{"prompt": "a red circle", "guidance": 1.' + b"5" * 5000 + b"}", "field 'guidance' must be a number"),
    (b'{"prompt": "a red \\ud800 circle"}', "field 'prompt' is not valid Unicode text: it holds a lone surrogate "
                                            "('\\ud800' at character 6)"),
    (b'{"prompt": "a red circle", "negative_prompt": "\\udfff"}', "field 'negative_prompt' is not valid Unicode"),
])
def test_bad_requests_get_400_naming_the_field(batched, body, field):
    status, headers, raw = _request(batched + "/v1/generate", body)
    assert status == 400, raw
    assert field in json.loads(raw)["error"]
    assert headers["Content-Type"] == "application/json"


# -- OpenAI's Images API, spoken to by the official client ------------------------------------------------------


def _openai(url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_generates_the_images_of_v1_generate(batched):
    import base64
    import io

    import numpy as np
    from PIL import Image

    client = _openai(batched)
    models = client.models.list()
    assert [m.id for m in models.data] == ["shapes"]
    assert models.data[0].model_dump()["family"] == "unet"  # dcaccel's details kept in the entry
    one = client.images.generate(model="shapes", prompt=PROMPT, size="32x32", extra_body={"seed": 11, "steps": 8})
    assert len(one.data) == 1 and one.created > 0
    _, headers, png = _request(batched + "/v1/generate", {"prompt": PROMPT, "seed": 11, "steps": 8})
    assert base64.b64decode(one.data[0].b64_json) == png  # the same PNG, byte for byte
    three = client.images.with_raw_response.generate(prompt=PROMPT, n=3, response_format="b64_json",
                                                      user="someone", extra_body={"seed": 20, "steps": 8})
    assert three.headers["X-Seeds"] == "20,21,22"
    images = [base64.b64decode(d.b64_json) for d in three.parse().data]
    assert len(images) == 3 and len(set(images)) == 3
    for seed, image in zip((20, 21, 22), images):  # batched together: equal to each alone within rounding
        _, _, alone = _request(batched + "/v1/generate", {"prompt": PROMPT, "seed": seed, "steps": 8})
        a = np.asarray(Image.open(io.BytesIO(image)), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(alone)), dtype=np.int16)
        assert np.abs(a - b).max() <= 2


@pytest.mark.parametrize("kwargs, error, message, param", [
    (dict(prompt=PROMPT, size="1024x1024"), "BadRequestError", "size '1024x1024' is not served here; sizes: "
                                                               "multiples of 8 from 8 to 64 a side", "size"),
    (dict(prompt=PROMPT, size="big"), "BadRequestError", "field 'size' must be 'WIDTHxHEIGHT'", "size"),
    (dict(prompt=""), "BadRequestError", "field 'prompt' must be a non-empty string, got an empty one", "prompt"),
    (dict(prompt=PROMPT, model="dall-e-3"), "NotFoundError", "model 'dall-e-3' is not served here; this server "
                                                            "serves 'shapes'", "model"),
    (dict(prompt=PROMPT, n=5), "BadRequestError", "field 'n' must be an integer in 1..4 (this server's batch limit)",
     "n"),
    (dict(prompt=PROMPT, response_format="url"), "BadRequestError", "response_format 'url' is not offered",
     "response_format"),
    (dict(prompt=PROMPT, quality="hd"), "BadRequestError", "field 'quality' has no meaning for this server",
     "quality"),
    (dict(prompt=PROMPT, extra_body={"seed": "x" * 5000}), "BadRequestError", "field 'seed' must be an integer",
     "seed"),
    (dict(prompt=PROMPT, extra_body={"sed": 1}), "BadRequestError", "unknown field(s) ['sed']", "sed"),
])
def test_openai_client_raises_its_errors_with_our_message(batched, kwargs, error, message, param):
    import openai

    client = _openai(batched)
    with pytest.raises(getattr(openai, error)) as e:
        client.images.generate(**kwargs)
    assert message in e.value.message
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


def test_the_replica_keeps_serving_after_bad_requests(batched):
    for body in (b"\xff\xfe", b'{"prompt": null}', b'{"prompt": "a", "negative_prompt": 5}'):
        assert _request(batched + "/v1/generate", body)[0] == 400
    status, headers, _ = _request(batched + "/v1/generate", {"prompt": PROMPT, "seed": 3, "steps": 4})
    assert status == 200  # another step count than the shipped calibration's: the documented fallback, reported
    assert headers["X-Schedule"].startswith("calibrated fallback: calibrated for 20 steps")
    assert _request(batched + "/nowhere")[0] == 404
    assert _request(batched + "/v1/generate", method="GET")[0] == 405


@pytest.mark.slow
def test_overload_answers_503_and_loses_nothing_below_it(cluster):
    url = _deploy(cluster, max_batch=1, batch_wait_ms=0, max_queued=2)
    body = {"prompt": PROMPT, "steps": 60}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: _request(url + "/v1/generate", {**body, "seed": i}), range(12)))
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 3, \
        [(r[0], r[2][:300]) for r in results if r[0] != 200]
    assert all(r[1].get("Retry-After") == "1" for r in results if r[0] == 503)
    # below the limit, nothing is lost (Ray's router counts simultaneous arrivals as queued until a replica takes
    # them, so up to max_queued requests arriving at once are always taken)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert [r[0] for r in pool.map(lambda i: _request(url + "/v1/generate", {**body, "seed": i}), range(2))] \
            == [200] * 2


@pytest.mark.slow
def test_deadline_answers_504_and_the_replica_goes_on(cluster):
    url = _deploy(cluster, max_batch=1, batch_wait_ms=0, deadline_s=1.0)
    start = time.time()
    status, _, raw = _request(url + "/v1/generate", {"prompt": PROMPT, "steps": 200})
    assert status == 504 and "deadline of 1 s" in json.loads(raw)["error"] and time.time() - start < 10
    assert _request(url + "/v1/generate", {"prompt": PROMPT, "steps": 2})[0] == 200


@pytest.mark.slow
def test_metrics_on_rays_prometheus_endpoint(batched, cluster):
    _request(batched + "/v1/generate", {"prompt": PROMPT, "seed": 1})
    wanted = ("ray_dcaccel_requests_total", "ray_dcaccel_request_seconds_bucket", "ray_dcaccel_batch_size_bucket",
              "ray_dcaccel_queue_seconds_bucket", "ray_dcaccel_denoiser_seconds_bucket",
              'ray_dcaccel_denoiser_steps_total{')
    deadline = time.time() + 60
    text = ""
    while time.time() < deadline:
        _, _, raw = _request(cluster["metrics"])
        text = raw.decode()
        if all(w in text for w in wanted) and 'graph="shallow"' in text:
            return
        time.sleep(2)
    raise AssertionError([w for w in wanted if w not in text])


def test_config_file_is_what_serve_deploy_accepts(tmp_path):
    import yaml

    from dcaccel.cli import main
    from dcaccel.serve.server import validate_config

    path = tmp_path / "serve.yaml"
    assert main(["serve", "--emit-config", str(path), "--replicas", "2", "--gpus-per-replica", "1",
                 "--min-replicas", "1", "--max-replicas", "8", "--backend", "eager"]) == 0
    config = yaml.safe_load(path.read_text())
    validate_config(config)
    app = config["applications"][0]
    assert app["import_path"] == "dcaccel.serve.app:build_app" and app["args"]["model"] == "shapes"
    generator = next(d for d in app["deployments"] if d["name"] == "Generator")
    assert generator["ray_actor_options"]["num_gpus"] == 1
    assert all(d["graceful_shutdown_timeout_s"] >= 120 for d in app["deployments"])  # a drain outlasts the deadline
    assert generator["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 4}
    config["applications"][0]["deployments"][0]["num_replica"] = 2  # a typo Ray Serve would silently ignore
    with pytest.raises(ValueError, match=r"unknown keys \['num_replica'\]"):
        validate_config(config)


def test_config_file_for_a_cluster_places_replicas_and_keeps_paths_absolute(tmp_path, monkeypatch, capsys):
    """--resources-per-replica / --ingress-resources / --proxy-location reach the config; relative paths become
    absolute (the replicas of `serve deploy` run in another working directory: found by deploying one)."""
    import yaml

    from dcaccel.cli import main

    (tmp_path / "engines").mkdir()
    (tmp_path / "cal.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--emit-config", "serve.yaml", "--backend", "onnxruntime", "--engine-dir", "engines",
                 "--calibration", "cal.json", "--replicas", "2", "--resources-per-replica", '{"dcaccel_slot": 1}',
                 "--ingress-resources", '{"dcaccel_ingress": 0.5}', "--proxy-location", "HeadOnly"]) != 0
    assert "cal.json" in capsys.readouterr().err  # the calibration is read before anything is written
    assert main(["serve", "--emit-config", "serve.yaml", "--backend", "onnxruntime", "--engine-dir", "engines",
                 "--replicas", "2", "--resources-per-replica", '{"dcaccel_slot": 1}',
                 "--ingress-resources", '{"dcaccel_ingress": 0.5}', "--proxy-location", "HeadOnly"]) == 0
    config = yaml.safe_load((tmp_path / "serve.yaml").read_text())
    assert config["proxy_location"] == "HeadOnly"
    app = config["applications"][0]
    assert app["args"]["engine_dirs"] == [str(tmp_path / "engines")]
    options = {d["name"]: d["ray_actor_options"] for d in app["deployments"]}
    assert options["Generator"]["resources"] == {"dcaccel_slot": 1}
    assert options["Ingress"] == {"num_cpus": 0, "resources": {"dcaccel_ingress": 0.5}}
    for bad, message in (("[1]", "give a JSON object"), ("{x", "not JSON"), ('{"CPU": 1}', "Ray's own resources"),
                         ('{"slot": -1}', "numbers >= 0")):
        try:
            code = main(["serve", "--emit-config", "x.yaml", "--resources-per-replica", bad])
        except SystemExit as e:  # argparse's own refusal of the argument
            code = e.code
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_bad_serve_arguments(capsys):
    from dcaccel.cli import main

    assert main(["serve", "--max-batch", "0"]) == 2
    assert "max_batch must be an integer >= 1" in capsys.readouterr().err
    assert main(["serve", "--interval", "0"]) == 2
    assert "interval must be an integer >= 1" in capsys.readouterr().err
    assert main(["serve", "--engine-dir", "x"]) == 2
    assert "engine_dirs need an engine backend" in capsys.readouterr().err
    # checked before Ray starts, with the reason (not Ray's "Failed to update the deployments")
    assert main(["serve", "--model", "/nonexistent"]) == 2
    assert "model '/nonexistent' is neither a local pipeline directory" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny-sd3", "--branch", "0"]) == 2
    assert "--branch cuts a U-Net; tiny-sd3 is an SD 3 transformer" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--head-blocks", "1"]) == 2
    assert "tiny is a U-Net: give --branch" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_drains_and_exits_0(tmp_path):
    import signal
    import subprocess
    import sys
    import threading

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dcaccel.cli", "serve", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.time() + 180
    while time.time() < deadline and not any(line.startswith("serving") for line in lines):
        assert proc.poll() is None, lines
        time.sleep(0.5)
    url = f"http://127.0.0.1:{port}"
    assert _request(url + "/healthz")[0] == 200
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(_request, url + "/v1/generate", {"prompt": PROMPT, "steps": 40})
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        assert in_flight.result()[0] == 200, "the request in flight finished"
    assert proc.wait(timeout=120) == 0, lines
    assert any("draining" in line for line in lines) and lines[-1].strip() == "stopped"


@pytest.mark.slow  # 16 s
def test_a_server_without_deepcache(cluster):
    """--no-cache: every step full (0 shallow steps: this was a 500, as Ray's Counter refuses inc(0))."""
    url = _deploy(cluster, no_cache=True, max_batch=2, batch_wait_ms=0, max_queued=4)
    status, headers, body = _request(url + "/v1/generate", {"prompt": PROMPT, "seed": 3, "steps": 6})
    assert status == 200, body
    assert headers["X-Steps"] == "6 full, 0 shallow"
    _, _, models = _request(url + "/v1/models")
    assert json.loads(models)["models"][0]["deepcache"] == "off"



def test_wrong_method_gets_405_with_allow(batched):
    status, headers, body = _request(batched + "/v1/generate", method="GET")
    assert status == 405 and headers["Allow"] == "POST" and "use POST" in json.loads(body)["error"]


def test_static_engine_server_pads_batches_and_takes_its_defaults_from_the_engine(tmp_path):
    """A replica on an ONNX Runtime engine built for 2 images without guidance (no Ray needed): a request that
    names no guidance gets 1 (what the engine runs), a lone request is padded to the engine's batch and keeps its
    own image, a guidance the engine cannot run is refused naming the field."""
    pytest.importorskip("onnxruntime")
    import io

    import numpy as np
    from PIL import Image

    from dcaccel.config import BuildConfig
    from dcaccel.engines import build_engines
    from dcaccel.models import load_pipeline
    from dcaccel.serve.model import ModelServer

    directory, _ = build_engines(load_pipeline("shapes"), BuildConfig(height=32, width=32, batch_size=2, cfg=False,
                                                                        branch=0, backend="onnxruntime"),
                                 out_dir=tmp_path, model_name="shapes")
    server = ModelServer(ServeSettings(model="shapes", backend="onnxruntime", engine_dirs=[str(directory)],
                                       max_batch=2, threads=2))
    limits = server.limits()
    assert limits.default_guidance == 1.0 and limits.sizes == ((32, 32),)
    params = lambda seed: dict(prompt=PROMPT, seed=seed, steps=6, guidance=1.0, height=32, width=32)  # noqa: E731
    alone = server.generate([params(5)])
    assert len(alone) == 1 and alone[0]["padded_to"] == 2 and alone[0]["batch_size"] == 1
    pair = server.generate([params(5), params(6)])
    a, b = (np.asarray(Image.open(io.BytesIO(r["png"])), dtype=np.int16) for r in (alone[0], pair[0]))
    assert np.abs(a - b).max() <= 2
    assert pair[0]["png"] != pair[1]["png"]
    assert "guidance" in server.check_prompt({**params(1), "guidance": 4.0})


# -- the page at GET /, in a real headless browser -------------------------------------------------------------------


def _browser():
    """Headless Chromium from the distribution's packages (apt-get install chromium chromium-driver), driven by
    Selenium; the test skips with the reason where either is missing."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Chromium and its driver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_page_serves_no_external_assets(batched):
    status, headers, body = _request(batched + "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "/v1/generate" in page and "http://" not in page and "https://" not in page and "src=\"" not in page


@pytest.mark.slow  # a browser start and a generation: about 20 s
def test_page_in_a_headless_browser(batched, tmp_path):
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(batched + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: b.find_element(By.ID, "steps").get_attribute("value"))  # defaults from /v1/models
        assert "shapes" in browser.find_element(By.ID, "model").text
        browser.find_element(By.ID, "prompt").send_keys(PROMPT)
        browser.find_element(By.ID, "seed").send_keys("7")
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda b: b.find_element(By.ID, "image").get_attribute("data-state") in ("done", "error"))
        assert browser.find_element(By.ID, "image").get_attribute("data-state") == "done", \
            browser.find_element(By.ID, "error").text
        assert browser.find_element(By.ID, "info-seed").text == "7"
        assert "ran:" in browser.find_element(By.ID, "info-DeepCache").text  # full and shallow steps shown
        shown = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch(document.getElementById("image").src).then(r => r.arrayBuffer()).then(buf => {
                let s = ""; new Uint8Array(buf).forEach(b => s += String.fromCharCode(b)); done(btoa(s)); });""")
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        browser.quit()
    _, _, png = _request(batched + "/v1/generate", {"prompt": PROMPT, "seed": 7})
    assert base64.b64decode(shown) == png  # the PNG the API returns for the same seed
    assert (tmp_path / "page.png").stat().st_size > 0


def test_a_client_that_disconnects_cancels_nothing_else(batched):
    """A client that sends a request and hangs up at once, beside three that wait: the three get their images,
    with their own seeds, and the server serves the next request."""
    import urllib.parse

    url = urllib.parse.urlparse(batched)
    body = json.dumps({"prompt": PROMPT, "seed": 40, "steps": 8}).encode()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(_request, batched + "/v1/generate", {"prompt": PROMPT, "seed": s, "steps": 8})
                   for s in (41, 42, 43)]
        with socket.create_connection((url.hostname, url.port)) as s:  # the one that leaves
            s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        results = [f.result(timeout=300) for f in waiting]
    assert [r[0] for r in results] == [200, 200, 200]
    assert [r[1]["X-Seed"] for r in results] == ["41", "42", "43"]
    status, _, _ = _request(batched + "/v1/generate", {"prompt": PROMPT, "seed": 44, "steps": 8})
    assert status == 200
