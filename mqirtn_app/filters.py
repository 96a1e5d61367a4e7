"""Metadata filters of the in-process backends (exact, faiss-*): the small subset of Milvus's boolean expressions that
they evaluate in Python, so one filter string means the same on every backend.

    folder == "shoes"
    category in ["dress", "shirt"] and folder != "archive"
    year == 2024

Conditions are `field == value`, `field != value`, `field in [v, ...]` and `field not in [v, ...]`, joined by
`and`; values are quoted strings, integers, floats, `true` or `false`. A row without the field matches no condition
on it (as a missing dynamic field in Milvus). Anything else (`or`, parentheses, `<`, functions) is refused with a one
line error; the milvus backend passes the string to the engine, which understands its whole language.
"""

from __future__ import annotations

import re
from collections.abc import Callable


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<number>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
      | (?P<op>==|!=|\[|\]|,)
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<bad>\S)
    )""",
    re.VERBOSE,
)
SUPPORTED = (
    "`field == value`, `field != value`, `field in [...]`, `field not in [...]` joined by `and` (values: quoted "
    "strings, numbers, true, false)"
)


class FilterError(ValueError):
    """A filter the in-process backends cannot evaluate."""


def _tokens(expression: str) -> list[tuple[str, object]]:
    tokens, position = [], 0
    expression = expression.rstrip()
    while position < len(expression):
        match = _TOKEN.match(expression, position)
        kind = match.lastgroup
        text = match.group(kind)
        if kind == "bad":
            raise FilterError(
                f"filter {expression!r}: unexpected {text!r}; the exact/FAISS backends support {SUPPORTED}"
            )
        if kind == "string":
            value = re.sub(r"\\(.)", r"\1", text[1:-1])
            tokens.append(("value", value))
        elif kind == "number":
            tokens.append(("value", float(text) if any(c in text for c in ".eE") else int(text)))
        elif kind == "word" and text in ("true", "false", "True", "False"):
            tokens.append(("value", text.lower() == "true"))
        else:
            tokens.append((kind, text))
        position = match.end()
    return tokens


def parse_filter(expression: str) -> Callable[[dict], bool]:
    """A predicate on a row's metadata dict for `expression` (see the module docstring); `FilterError` otherwise."""
    if not isinstance(expression, str) or not expression.strip():
        raise FilterError(f"a filter must be a non-empty string, got {expression!r}")
    tokens, position, conditions = _tokens(expression), 0, []

    def fail(what: str):
        raise FilterError(f"filter {expression!r}: {what}; the exact/FAISS backends support {SUPPORTED}")

    def take(kind: str, text: str | None = None):
        nonlocal position
        if (
            position >= len(tokens)
            or tokens[position][0] != kind
            or (text is not None and tokens[position][1] != text)
        ):
            found = repr(tokens[position][1]) if position < len(tokens) else "the end"
            fail(f"expected {text or kind} at {found}")
        position += 1
        return tokens[position - 1][1]

    while True:
        field = take("word")
        if field in ("and", "or", "not", "in"):
            fail(f"expected a field name, got {field!r}")
        kind, text = tokens[position] if position < len(tokens) else ("end", None)
        if kind == "op" and text in ("==", "!="):
            position += 1
            value = take("value")
            conditions.append((field, "==" if text == "==" else "!=", (value,)))
        elif kind == "word" and text in ("in", "not"):
            position += 1
            negate = text == "not"
            if negate:
                take("word", "in")
            take("op", "[")
            values = []
            while True:
                values.append(take("value"))
                if position < len(tokens) and tokens[position] == ("op", ","):
                    position += 1
                    continue
                break
            take("op", "]")
            conditions.append((field, "not in" if negate else "in", tuple(values)))
        else:
            fail(f"expected ==, !=, in or not in after {field!r}")
        if position == len(tokens):
            break
        word = take("word")
        if word != "and":
            fail(f"{word!r} is not supported between conditions")

    def matches(row: dict) -> bool:
        for field, operator, values in conditions:
            if field not in row:
                return False
            value = row[field]
            hit = any(_same(value, v) for v in values)
            if operator in ("==", "in") and not hit:
                return False
            if operator in ("!=", "not in") and hit:
                return False
        return True

    return matches


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(value, wanted) -> bool:
    """Equality as Milvus compares: 1 == 1.0, but a string never equals a number and a bool only a bool."""
    if isinstance(value, str) or isinstance(wanted, str):
        return isinstance(value, str) and isinstance(wanted, str) and value == wanted
    if isinstance(value, bool) or isinstance(wanted, bool):
        return isinstance(value, bool) and isinstance(wanted, bool) and value == wanted
    return _number(value) and _number(wanted) and value == wanted


__all__ = ["FilterError", "SUPPORTED", "parse_filter"]
