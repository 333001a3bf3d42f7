"""Command-line override values as Hydra's override grammar reads them (what NeMo RL's
`parse_hydra_overrides` hands to OmegaConf), so that `+policy.hf_config_overrides={rope_theta:1000}`
is {"rope_theta": 1000} here as there.

    parse_value("{rope_theta:1000}")          -> {"rope_theta": 1000}
    parse_value("[{name:a,kwargs:{x:1}},{milestones:[10]}]")
    parse_value("'quoted, text'")             -> "quoted, text"
    parse_value("null"), parse_value("1e-5")  -> None, 1e-05

The grammar (Hydra 1.3's `OverrideParser.g4`, value side): an element is a primitive, a list
`[e, ...]` or a dict `{key: e, ...}`. A primitive is a quoted string ('...' or "...": the quote
and the backslashes just before a quote are escaped with a backslash, nothing else), or a run of
unquoted text, `${...}` interpolations included (kept as text; OmegaConf resolves them later),
with whitespace at both ends dropped and `\\` escaping one of `()[]{}:=, \\t\\`. A primitive that is
one token converts: an integer (`1_000`, `-3`), a float (`1e-5`, `.5`, `inf`, `nan`), `true` /
`false`, `null` (any case); anything else is a string. Dict keys are strings.

Hydra's sweeps (`a,b` at the top level) and functions (`int(3)`, `choice(...)`) are multirun and
cast syntax, not values: an error says so. Beyond Hydra, dict keys may be quoted, so that JSON
objects (`{"a": 1}`) read as before; a value Hydra reads is read the same.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["OverrideValueError", "parse_value"]

_INT = re.compile(r"[+-]?(0|[1-9](_?\d)*)")
_FLOAT = re.compile(
    r"[+-]?((\d(_?\d)*)?\.\d(_?\d)*([eE][+-]?\d+)?|\d(_?\d)*\.([eE][+-]?\d+)?|\d(_?\d)*[eE][+-]?\d+|inf|nan)",
    re.IGNORECASE,
)
_ESCAPABLE = set("()[]{}:=, \t\\")
_STRUCTURE = set("[]{}(),")


class OverrideValueError(ValueError):
    """The value does not parse; the message says where and what was expected."""


class _Parser:
    def __init__(self, text: str):
        self.text, self.i = text, 0

    def fail(self, what: str) -> OverrideValueError:
        return OverrideValueError(f"{what} at character {self.i + 1} of {self.text!r}")

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.peek() in (" ", "\t") and self.peek():
            self.i += 1

    def element(self, in_dict_or_list: bool) -> Any:
        self.skip_ws()
        c = self.peek()
        if c == "[":
            return self.sequence()
        if c == "{":
            return self.mapping()
        return self.primitive(in_dict_or_list)

    def sequence(self) -> list:
        self.i += 1
        out: list = []
        self.skip_ws()
        if self.peek() == "]":
            self.i += 1
            return out
        while True:
            out.append(self.element(True))
            self.skip_ws()
            c = self.peek()
            self.i += 1
            if c == "]":
                return out
            if c != ",":
                self.i -= 1
                raise self.fail("expected ',' or ']' in a list")

    def mapping(self) -> dict:
        self.i += 1
        out: dict = {}
        self.skip_ws()
        if self.peek() == "}":
            self.i += 1
            return out
        while True:
            key = self.key()
            self.skip_ws()
            if self.peek() != ":":
                raise self.fail(f"expected ':' after the dict key {key!r}")
            self.i += 1
            out[key] = self.element(True)
            self.skip_ws()
            c = self.peek()
            self.i += 1
            if c == "}":
                return out
            if c != ",":
                self.i -= 1
                raise self.fail("expected ',' or '}' in a dict")

    def key(self) -> str:
        self.skip_ws()
        if self.peek() in ("'", '"'):
            return self.quoted()
        start, parts = self.i, []
        while self.peek() and self.peek() not in _STRUCTURE and self.peek() != ":":
            parts.append(self.unquoted_char())
        key = "".join(parts).strip()
        if not key:
            self.i = start
            raise self.fail("expected a dict key")
        return key

    def unquoted_char(self) -> str:
        c = self.peek()
        if c == "\\" and self.i + 1 < len(self.text) and self.text[self.i + 1] in _ESCAPABLE:
            self.i += 2
            return self.text[self.i - 1]
        self.i += 1
        return c

    def quoted(self) -> str:
        quote, out = self.peek(), []
        self.i += 1
        while True:
            c = self.peek()
            if not c:
                raise self.fail(f"unterminated {quote}quoted{quote} string")
            if c == "\\":
                run = len(self.text[self.i :]) - len(self.text[self.i :].lstrip("\\"))
                after = self.text[self.i + run] if self.i + run < len(self.text) else ""
                self.i += run
                if after != quote:  # backslashes not before a quote are literal
                    out.append("\\" * run)
                    continue
                out.append("\\" * (run // 2))
                if run % 2:  # an escaped quote
                    out.append(quote)
                    self.i += 1
                continue
            self.i += 1
            if c == quote:
                return "".join(out)
            out.append(c)

    def interpolation(self) -> str:
        start, depth = self.i, 0
        while True:
            c = self.peek()
            if not c:
                self.i = start
                raise self.fail("unterminated ${...} interpolation")
            self.i += 1
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return self.text[start : self.i]

    def primitive(self, nested: bool) -> Any:
        self.skip_ws()
        if self.peek() in ("'", '"'):
            value = self.quoted()
            self.skip_ws()
            return value
        parts, tokens = [], 0
        stops = _STRUCTURE | ({":"} if nested else set())
        while self.peek() and self.peek() not in stops:
            if self.text.startswith("${", self.i):
                parts.append(self.interpolation())
                tokens += 2  # an interpolation is never converted
            else:
                escaped = self.peek() == "\\"
                parts.append(self.unquoted_char())
                tokens += escaped
        if self.peek() == "(":
            raise self.fail("Hydra functions (int(...), choice(...), ...) are not supported in a value")
        text = "".join(parts).strip()
        if not text and not nested:
            return ""
        if not text:
            raise self.fail("expected a value")
        return text if tokens else _convert(text)


def _convert(text: str) -> Any:
    """A one-token primitive: int, float, bool, null, else the string."""
    low = text.lower()
    if low == "null":
        return None
    if low in ("true", "false"):
        return low == "true"
    if _INT.fullmatch(text):
        return int(text.replace("_", ""))
    if _FLOAT.fullmatch(text):
        return float(text.replace("_", ""))
    return text


def parse_value(text: str) -> Any:
    """The value of an override `key=<text>` as Hydra's grammar reads it (see the module
    docstring); OverrideValueError when it does not parse."""
    p = _Parser(text)
    value = p.element(False)
    p.skip_ws()
    if p.peek() == ",":
        raise p.fail(
            "a top-level ',' is Hydra's multirun sweep, not a value: quote the text ('a,b') or write a list [a,b]"
        )
    if p.peek():
        raise p.fail(f"unexpected {p.peek()!r}")
    return value
