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
    """A bad request: answered 400 with {"error": message}."""


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


def parse_request(body: bytes, limits: Limits) -> GenerateRequest:
    """The request in `body`, or a RequestError naming what is wrong and what is allowed."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the body is not JSON ({e}); send a JSON object such as "
                           '{"prompt": "a red circle", "seed": 1}') from None
    if not isinstance(data, dict):
        raise RequestError(f"the body must be a JSON object, got a {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
    if "prompt" not in data:
        raise RequestError("field 'prompt' is required (a non-empty string)")
    req = GenerateRequest(prompt=_text(data, "prompt", required=True))
    if "negative_prompt" in data and data["negative_prompt"] is not None:
        req.negative_prompt = _text(data, "negative_prompt")
    req.seed = _int(data, "seed", 0, MAX_SEED)
    req.steps = _int(data, "steps", 1, limits.max_steps)
    req.guidance = _number(data, "guidance", 0.0, 50.0)
    req.height = _int(data, "height", 8, limits.max_size)
    req.width = _int(data, "width", 8, limits.max_size)
    height = req.height or limits.default_size
    width = req.width or limits.default_size
    if limits.sizes is not None:
        if (height, width) not in limits.sizes:
            allowed = ", ".join(f"{h}x{w}" for h, w in limits.sizes)
            raise RequestError(f"fields 'height'/'width': {height}x{width} has no engine on this server; allowed: "
                               f"{allowed}")
    elif height % limits.multiple or width % limits.multiple:
        raise RequestError(f"fields 'height'/'width' must be multiples of {limits.multiple}, got {height}x{width}")
    req.height, req.width = height, width
    return req


def _text(data, name, required=False) -> str:
    value = data[name]
    if not isinstance(value, str):
        raise RequestError(f"field {name!r} must be {_FIELDS[name]}, got {type(value).__name__}")
    if required and not value.strip():
        raise RequestError(f"field {name!r} must be {_FIELDS[name]}, got an empty one")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(f"field {name!r} is {len(value)} characters long; at most {MAX_PROMPT_CHARS}")
    return value


def _int(data, name, low, high) -> int | None:
    if name not in data or data[name] is None:
        return None
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"field {name!r} must be an integer in {low}..{high}, got {json.dumps(value)}")
    if not low <= value <= high:
        raise RequestError(f"field {name!r} must be an integer in {low}..{high}, got {value}")
    return value


def _number(data, name, low, high) -> float | None:
    if name not in data or data[name] is None:
        return None
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"field {name!r} must be a number in {low:g}..{high:g}, got {json.dumps(value)}")
    if not low <= value <= high:
        raise RequestError(f"field {name!r} must be a number in {low:g}..{high:g}, got {value}")
    return float(value)
