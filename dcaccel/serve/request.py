"""What a client may send to POST /v1/generate, checked strictly (unknown fields, wrong types and values out of
range are 400s naming the field and what is allowed), and the server's settings that bound it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2 ** 63 - 1


@dataclass(frozen=True)
class Limits:
    """What the served model accepts; sent by the generator replicas to the ingress once they are up."""

    default_size: int
    sizes: tuple[tuple[int, int], ...] | None  # None: any multiple of `multiple` up to max_size
    multiple: int
    max_size: int
    max_steps: int
    default_steps: int
    default_guidance: float
    max_prompt_tokens: int


class RequestError(ValueError):
    """A bad request: answered 400 with {"error": message} (on the OpenAI route, OpenAI's error object, whose
    `param` is the field at fault when there is one; `status` 404 for a model this server does not serve)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


_FIELDS = {
    "prompt": "a non-empty string",
    "negative_prompt": "a string",
    "seed": f"an integer in 0..{MAX_SEED}",
    "steps": "an integer",
    "guidance": "a number",
    "height": "an integer",
    "width": "an integer",
}


@dataclass
class GenerateRequest:
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    extra: dict = field(default_factory=dict)


MAX_BODY_BYTES = 64 * 1024  # a request is a prompt and a few numbers
MAX_NUMBER_DIGITS = 40       # more than any allowed value has; Python refuses ints of over 4300 digits anyway


class _HugeNumber(str):
    """A JSON number with too many digits to be any allowed value (kept as text, reported by its field)."""


def _parse_int(text: str):
    return _HugeNumber(text) if len(text) > MAX_NUMBER_DIGITS else int(text)


def _parse_float(text: str):
    return _HugeNumber(text) if len(text) > MAX_NUMBER_DIGITS else float(text)


def parse_request(body: bytes, limits: Limits) -> GenerateRequest:
    """The request in `body`, or a RequestError naming what is wrong and what is allowed."""
    data = _load_object(body)
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}", unknown[0])
    return _request(data, limits)


def _load_object(body: bytes) -> dict:
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"the body is {len(body)} bytes; at most {MAX_BODY_BYTES} are allowed")
    try:
        data = json.loads(body, parse_int=_parse_int, parse_float=_parse_float)
    except RecursionError:
        raise RequestError("the body is nested too deeply; send a flat JSON object") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the body is not JSON ({e}); send a JSON object such as "
                           '{"prompt": "a red circle", "seed": 1}') from None
    if not isinstance(data, dict):
        raise RequestError(f"the body must be a JSON object, got a {type(data).__name__}")
    return data


def _request(data: dict, limits: Limits) -> GenerateRequest:
    if "prompt" not in data:
        raise RequestError("field 'prompt' is required (a non-empty string)", "prompt")
    req = GenerateRequest(prompt=_text(data, "prompt", required=True))
    if "negative_prompt" in data and data["negative_prompt"] is not None:
        req.negative_prompt = _text(data, "negative_prompt")
    req.seed = _ranged(data, "seed", 0, MAX_SEED, integer=True)
    req.steps = _ranged(data, "steps", 1, limits.max_steps, integer=True)
    req.guidance = _ranged(data, "guidance", 0.0, 50.0, integer=False)
    req.height = _ranged(data, "height", 8, limits.max_size, integer=True)
    req.width = _ranged(data, "width", 8, limits.max_size, integer=True)
    height = req.height or limits.default_size
    width = req.width or limits.default_size
    if limits.sizes is not None:
        if (height, width) not in limits.sizes:
            allowed = ", ".join(f"{h}x{w}" for h, w in limits.sizes)
            raise RequestError(f"fields 'height'/'width': {height}x{width} has no engine on this server; allowed: "
                               f"{allowed}", "height")
    elif height % limits.multiple or width % limits.multiple:
        raise RequestError(f"fields 'height'/'width' must be multiples of {limits.multiple}, got {height}x{width}",
                           "height")
    req.height, req.width = height, width
    return req


def _text(data, name, required=False) -> str:
    value = data[name]
    if not isinstance(value, str):
        raise RequestError(f"field {name!r} must be {_FIELDS[name]}, got {type(value).__name__}", name)
    if required and not value.strip():
        raise RequestError(f"field {name!r} must be {_FIELDS[name]}, got an empty one", name)
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(f"field {name!r} is {len(value)} characters long; at most {MAX_PROMPT_CHARS}", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to lone surrogates, which no text encoder reads
        raise RequestError(f"field {name!r} is not valid Unicode text: it holds a lone surrogate "
                           f"({ascii(value[e.start:e.end])} at character {e.start})", name) from None
    return value


def _ranged(data, name, low, high, integer: bool, what: str | None = None):
    """data[name] if it is a number (an integer if `integer`) in low..high, None if absent; else a RequestError."""
    if name not in data or data[name] is None:
        return None
    value = data[name]
    what = what or (f"an integer in {low}..{high}" if integer else f"a number in {low:g}..{high:g}")
    if isinstance(value, _HugeNumber):
        raise RequestError(f"field {name!r} must be {what}, got a number of {len(value)} characters", name)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise RequestError(f"field {name!r} must be {what}, got {json.dumps(value)}", name)
    if not low <= value <= high:
        raise RequestError(f"field {name!r} must be {what}, got {value}", name)
    return value if integer else float(value)


# -- POST /v1/images/generations: OpenAI's Images API ---------------------------------------------------------------

# OpenAI's fields with no meaning here: accepted only at the value that means what this server does.
_OPENAI_FIXED = {"response_format": ("b64_json",), "output_format": ("png",), "stream": (False,),
                 "partial_images": (0,), "moderation": ("auto", "low"), "background": ("auto", "opaque")}
_OPENAI_REFUSED = ("quality", "style", "output_compression")  # no such setting here: refused, never ignored
_OPENAI_FIELDS = ("model", "prompt", "n", "size", "user", *_OPENAI_FIXED, *_OPENAI_REFUSED)
OWN_FIELDS = ("seed", "steps", "guidance", "negative_prompt")  # dcaccel's own, as extra body fields


def parse_images_request(body: bytes, limits: Limits, model_id: str, max_n: int) -> tuple[GenerateRequest, int]:
    """An OpenAI `images.generate` body: (the request, n images), or a RequestError with the OpenAI `param`."""
    data = _load_object(body)
    unknown = sorted(set(data) - set(_OPENAI_FIELDS) - set(OWN_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; allowed: OpenAI's {sorted(_OPENAI_FIELDS)} and dcaccel's "
                           f"{sorted(OWN_FIELDS)}", unknown[0])
    model = data.get("model")
    if model is not None and model != model_id:
        raise RequestError(f"model {model!r} is not served here; this server serves {model_id!r} (GET /v1/models)",
                           "model", status=404, code="model_not_found")
    if data.get("response_format") == "url":
        raise RequestError("response_format 'url' is not offered: this server keeps no images to link to; use "
                           "'b64_json' (the default)", "response_format")
    for name, allowed in _OPENAI_FIXED.items():
        if data.get(name) is not None and data[name] not in allowed:
            raise RequestError(f"field {name!r} must be one of {list(allowed)} on this server, got "
                               f"{json.dumps(data[name])}", name)
    for name in _OPENAI_REFUSED:
        if data.get(name) is not None:
            raise RequestError(f"field {name!r} has no meaning for this server (a diffusion model with fixed "
                               f"settings); leave it out, or use dcaccel's {list(OWN_FIELDS)}", name)
    if data.get("user") is not None and not isinstance(data["user"], str):
        raise RequestError(f"field 'user' must be a string, got {type(data['user']).__name__}", "user")
    n = _ranged(data, "n", 1, max_n, integer=True, what=f"an integer in 1..{max_n} (this server's batch limit)")
    own = {k: data[k] for k in OWN_FIELDS if k in data}
    size = data.get("size")
    if size is not None and size != "auto":
        if not isinstance(size, str) or size.count("x") != 1 or not all(p.isdigit() and len(p) <= 5
                                                                        for p in size.split("x")):
            raise RequestError(f"field 'size' must be 'WIDTHxHEIGHT' (such as '{limits.default_size}x"
                               f"{limits.default_size}') or 'auto', got {json.dumps(size)}", "size")
        width, height = (int(p) for p in size.split("x"))
        own["width"], own["height"] = width, height
    try:
        req = _request({"prompt": data.get("prompt"), **own} if "prompt" in data else own, limits)
    except RequestError as e:
        if e.param in ("height", "width"):  # the size as OpenAI names it, and the sizes served
            served = (", ".join(f"{w}x{h}" for h, w in limits.sizes) if limits.sizes else
                      f"multiples of {limits.multiple} from 8 to {limits.max_size} a side")
            raise RequestError(f"size {size!r} is not served here; sizes: {served}", "size") from None
        raise
    return req, n or 1
