"""Parameter sheets of the models the gateway can run, taken from Wiro's model pages.

Only ``wiro/professional-headshot`` for now (seed sheet ``000_9b04048fe11b5f13``). Each
input is ``text`` (free string), ``integer`` (a number or numeric string, sent as a
string) or ``select`` (one of ``options``). Wiro takes every value as a string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DEFAULT_MODEL = "wiro/professional-headshot"
MAX_URL_LEN = 2048
# Whitespace (``str.isspace``: Unicode's, as ``\s`` matches it in a str pattern) or a
# control character below 32: the same code points as ``c.isspace() or ord(c) < 32``
# (``tests/test_hot_helpers.py`` checks every one), in one scan in C.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f]")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "url" | "integer" | "select"
    default: str | None = None  # None = required
    options: tuple[str, ...] = field(default_factory=tuple)
    help: str = ""


ASPECT_RATIOS = (
    "",
    "1:1",
    "16:9",
    "9:16",
    "4:3",
    "3:4",
    "3:2",
    "2:3",
    "4:5",
    "5:4",
    "21:9",
    "9:21",
    "2:1",
    "1:2",
)

MODELS: dict[str, tuple[Param, ...]] = {
    DEFAULT_MODEL: (
        Param("inputImageUrl", "url", None, help="Image to use as reference (jpeg or png)."),
        Param("background", "select", "neutral", ("white", "black", "neutral", "gray", "office")),
        Param(
            "safetyTolerance",
            "select",
            "2",
            ("2",),
            help="Moderation tolerance; the model offers only 2.",
        ),
        Param("aspectRatio", "select", "", ASPECT_RATIOS, help='"" keeps the input\'s ratio.'),
        Param("seed", "integer", "42"),
        Param("outputFormat", "select", "jpeg", ("jpeg", "png")),
    ),
}


def check_url(value: str) -> str | None:
    """Why ``value`` is not an acceptable input URL, or None."""
    if len(value) > MAX_URL_LEN:
        return f"must be at most {MAX_URL_LEN} characters"
    if _SPACE_OR_CONTROL.search(value):
        return "must not contain whitespace or control characters"
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must be an absolute http(s) URL"
    if not parts.hostname:
        return "must have a host"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "must not contain user info"
    if parts.fragment:
        return "must not contain a fragment"
    return None


def validate_input(model: str, raw: Any) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Normalise ``raw`` against the model's sheet: defaults filled in, every value a string.

    Returns ``(inputs, errors)``; errors are ``{"loc", "msg"}`` items, empty when valid.
    """
    errors: list[dict[str, Any]] = []
    sheet = MODELS.get(model)
    if sheet is None:
        return {}, [{"loc": ["model"], "msg": f"unknown model; known: {', '.join(MODELS)}"}]
    if not isinstance(raw, dict):
        return {}, [{"loc": ["input"], "msg": "must be an object"}]
    known = {p.name for p in sheet}
    for name in raw:
        if name not in known:
            errors.append({"loc": ["input", name], "msg": "unknown input for this model"})
    out: dict[str, str] = {}
    for p in sheet:
        loc = ["input", p.name]
        if p.name not in raw or raw[p.name] is None:
            if p.default is None:
                errors.append({"loc": loc, "msg": "is required"})
            else:
                out[p.name] = p.default
            continue
        v = raw[p.name]
        if p.kind == "integer":
            if isinstance(v, bool) or not isinstance(v, int | str):
                errors.append({"loc": loc, "msg": "must be an integer or a numeric string"})
                continue
            s = str(v).strip()
            try:
                n = int(s, 10)
            except ValueError:
                errors.append({"loc": loc, "msg": "must be an integer or a numeric string"})
                continue
            if not (0 <= n < 2**32):
                errors.append({"loc": loc, "msg": "must be between 0 and 4294967295"})
                continue
            out[p.name] = str(n)
        elif p.kind == "select":
            if isinstance(v, bool) or not isinstance(v, str | int):
                errors.append({"loc": loc, "msg": f"must be one of {list(p.options)}"})
                continue
            s = str(v)
            if s not in p.options:
                errors.append({"loc": loc, "msg": f"must be one of {list(p.options)}"})
                continue
            out[p.name] = s
        else:  # url
            if not isinstance(v, str):
                errors.append({"loc": loc, "msg": "must be a string"})
                continue
            why = check_url(v)
            if why:
                errors.append({"loc": loc, "msg": why})
                continue
            out[p.name] = v
    return out, errors
