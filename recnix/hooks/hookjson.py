"""JSON for the hooks' control requests, without importing :mod:`json`.

The hooks run on the critical path of every opted-in build, twice. Importing
``json`` costs a Python start ~6 ms (it pulls in ``re`` and ``enum``); this
module, ~0.1 ms. It covers what the control protocol carries: objects, arrays,
strings, integers, floats, booleans and null, as :func:`json.dumps` writes them
(``\\uXXXX`` escapes included) and as :func:`json.loads` reads them. The unit
tests check both directions against :mod:`json` on generated values.
"""

from __future__ import annotations

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",
    "\f": "\\f",
}
_UNESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_NUMBER_CHARS = frozenset("+-0123456789.eE")
_WHITESPACE = " \t\n\r"


def dumps(value: object) -> str:
    """``value`` (dict with str keys, list, tuple, str, int, float, bool, None) as JSON."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _dump_str(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value!r} has no JSON form")
        return repr(value)
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be strings, not {key!r}")
            items.append(f"{_dump_str(key)}: {dumps(item)}")
        return "{" + ", ".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps(item) for item in value) + "]"
    raise TypeError(f"{type(value).__name__} has no JSON form")


def _dump_str(text: str) -> str:
    out = []
    for ch in text:
        escaped = _ESCAPES.get(ch)
        if escaped is not None:
            out.append(escaped)
        elif ch < " " or "\ud800" <= ch <= "\udfff":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def loads(text: str) -> object:
    """Parse one JSON value; raises ValueError on anything else."""
    value, end = _parse(text, _skip(text, 0))
    if _skip(text, end) != len(text):
        raise ValueError(f"extra data at offset {end}")
    return value


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _parse(text: str, i: int) -> tuple[object, int]:
    if i >= len(text):
        raise ValueError("unexpected end of JSON")
    ch = text[i]
    if ch == "{":
        return _parse_object(text, i + 1)
    if ch == "[":
        return _parse_array(text, i + 1)
    if ch == '"':
        return _parse_str(text, i + 1)
    for word, value in (("null", None), ("true", True), ("false", False)):
        if text.startswith(word, i):
            return value, i + len(word)
    end = i
    while end < len(text) and text[end] in _NUMBER_CHARS:
        end += 1
    number = text[i:end]
    if not number:
        raise ValueError(f"unexpected {ch!r} at offset {i}")
    if any(c in number for c in ".eE"):
        return float(number), end
    return int(number), end


def _parse_object(text: str, i: int) -> tuple[dict[str, object], int]:
    result: dict[str, object] = {}
    i = _skip(text, i)
    if text[i : i + 1] == "}":
        return result, i + 1
    while True:
        if text[i : i + 1] != '"':
            raise ValueError(f"expected a string key at offset {i}")
        key, i = _parse_str(text, i + 1)
        i = _skip(text, i)
        if text[i : i + 1] != ":":
            raise ValueError(f"expected ':' at offset {i}")
        result[key], i = _parse(text, _skip(text, i + 1))
        i = _skip(text, i)
        if text[i : i + 1] == "}":
            return result, i + 1
        if text[i : i + 1] != ",":
            raise ValueError(f"expected ',' or '}}' at offset {i}")
        i = _skip(text, i + 1)


def _parse_array(text: str, i: int) -> tuple[list[object], int]:
    result: list[object] = []
    i = _skip(text, i)
    if text[i : i + 1] == "]":
        return result, i + 1
    while True:
        item, i = _parse(text, i)
        result.append(item)
        i = _skip(text, i)
        if text[i : i + 1] == "]":
            return result, i + 1
        if text[i : i + 1] != ",":
            raise ValueError(f"expected ',' or ']' at offset {i}")
        i = _skip(text, i + 1)


def _parse_str(text: str, i: int) -> tuple[str, int]:
    out = []
    while True:
        end = i
        while end < len(text) and text[end] not in '"\\':
            end += 1
        if end >= len(text):
            raise ValueError("unterminated string")
        out.append(text[i:end])
        if text[end] == '"':
            return "".join(out), end + 1
        code = text[end + 1 : end + 2]
        if code == "u":
            hex_digits = text[end + 2 : end + 6]
            if len(hex_digits) != 4:
                raise ValueError(f"bad \\u escape at offset {end}")
            point = int(hex_digits, 16)
            i = end + 6
            if 0xD800 <= point < 0xDC00 and text[i : i + 2] == "\\u":
                low = int(text[i + 2 : i + 6], 16)
                if 0xDC00 <= low < 0xE000:
                    point = 0x10000 + ((point - 0xD800) << 10) + (low - 0xDC00)
                    i += 6
            out.append(chr(point))
        elif code in _UNESCAPES:
            out.append(_UNESCAPES[code])
            i = end + 2
        else:
            raise ValueError(f"bad escape at offset {end}")
