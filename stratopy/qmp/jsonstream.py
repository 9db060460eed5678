"""QMP input framing as QEMU does it: a JSON lexer, a message streamer, a parser.

Behaviour follows QEMU 7.2 (qobject/json-lexer.c, json-streamer.c,
json-parser.c), checked byte for byte against ``qemu-system-x86_64`` with a
plain socket (the expected replies in tests/unit/test_qmp_protocol.py were
observed from it):

* Lexer: tokens are ``{ } [ ] , :``, strings (``"..."`` and QEMU's
  ``'...'``), numbers, keywords ``[a-z]+``; whitespace separates.  A byte that
  cannot continue the current token ends it as an error token, which gets
  ``JSON parse error, stray '<token so far>'`` at once and resets the
  streamer; the lexer then skips input up to a structural character
  (``{ } [ ] , :``), a control byte (a newline) or 0xfe/0xff, and starts
  afresh there.  So ``\\xff`` or a newline-terminated junk line always brings
  a session back to a clean state, and a client's mistake does not swallow
  its next command.
* Streamer: counts braces and brackets token by token.  A message ends when
  both counts are back to 0 (a top-level scalar is a message by itself) or
  either goes negative (a stray closer: ``]`` alone gets ``JSON parse error,
  expecting value`` at once).  Mismatched closers do not end a message
  (``{"a":[1}`` waits for a ``]``, as in QEMU).
* Parser: QEMU's error texts (``expecting value``, ``missing : in object
  pair``, ``duplicate key``, ``invalid keyword 'x'``, ...).  Two stricter
  rules than QEMU: a number that does not fit a double (``1e999``) is
  refused, because QEMU answers such an id with ``inf``, which is not JSON;
  strings must be UTF-8 (QEMU also takes ``\\xc0\\x80`` for NUL).

Limits (memory and recursion stay bounded whatever a client sends):
``max_message`` bytes of tokens per message (1 MiB, QEMU 64 MiB),
``max_tokens`` tokens (64 Ki, QEMU 2 Mi), ``max_nesting`` levels (128, QEMU
1024: Python's own recursion limit of 1000 frames must be far away, as the
reply echoes the id).  The first byte over a limit gets one error at once
(``JSON token size limit exceeded``, ``... count ...``, ``JSON nesting depth
limit exceeded``); the rest of that message is skipped without being kept
(strings and bracket counts still tracked, so the session stays in step), and
the next message is read normally.  QEMU instead restarts right after the
limit and answers every leftover token.
"""

from __future__ import annotations

import math
import re
from typing import Any, Union

__all__ = ["JsonError", "JsonStreamer", "MAX_MESSAGE", "MAX_NESTING", "MAX_TOKENS"]

#: Bytes of tokens one message may hold.
MAX_MESSAGE = 1 << 20
#: Deepest nesting of objects/arrays.
MAX_NESTING = 128
#: Most tokens in one message.
MAX_TOKENS = 1 << 16
#: Longest token text quoted in a "stray" error.
_QUOTE_MAX = 200


class JsonError:
    """One complete message that is not valid JSON; ``desc`` is QEMU's text."""

    __slots__ = ("desc",)

    def __init__(self, desc: str):
        self.desc = desc

    def __repr__(self) -> str:
        return f"JsonError({self.desc!r})"


Parsed = Union[JsonError, tuple]  # (value,) for a parsed value

# lexer states
(_START, _DQ, _DQ_ESC, _SQ, _SQ_ESC, _ZERO, _NONZERO, _NEG, _MANT, _MANT_D,
 _EXP_E, _EXP_SIGN, _EXP_D, _KEYWORD, _RECOVERY) = range(15)

_WS_RUN = re.compile(rb"[ \t\r\n]*")
_DIGIT_RUN = re.compile(rb"[0-9]*")
_KEYWORD_RUN = re.compile(rb"[a-z]*")
# inside a string: everything but the closing quote, a backslash, control bytes, 0xfe/0xff
_DQ_RUN = re.compile(rb'[^"\\\x00-\x1f\xfe\xff]*')
_SQ_RUN = re.compile(rb"[^'\\\x00-\x1f\xfe\xff]*")
# skipped after an error: up to a structural character, a control byte other
# than tab, or 0xfe/0xff
_RECOVERY_RUN = re.compile(rb"[^{}\[\],:\x00-\x08\x0a-\x1f\xfe\xff]*")
_STRUCTURAL = frozenset(b"{}[],:")
# Fast path: a whole token that the automaton below would take the same way,
# found by one regex (numbers and keywords only when the byte after them is
# already here and ends them for sure).  Anything else goes byte by byte.
_WHOLE_TOKEN = re.compile(
    rb'[{}\[\],:]'
    rb'|"[^"\\\x00-\x1f\xfe\xff]*(?:\\[\x20-\xfd][^"\\\x00-\x1f\xfe\xff]*)*"'
    rb"|'[^'\\\x00-\x1f\xfe\xff]*(?:\\[\x20-\xfd][^'\\\x00-\x1f\xfe\xff]*)*'"
    rb"|[a-z]+(?=[^a-z])"
    # QEMU's IN_ZERO has no exponent: "0e1" is 0 then a stray "e", "0.0e1" a number
    rb"|-?(?:0(?:\.[0-9]+(?:[eE][+-]?[0-9]+)?)?"
    rb"|[1-9][0-9]*(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)(?=[ \t\r\n{}\[\],:])")
_DIGITS = frozenset(b"0123456789")


class JsonStreamer:
    """Feed bytes, get complete messages: ``(value,)`` or :class:`JsonError`.

    Never raises on any input; memory is bounded by ``max_message``.
    """

    def __init__(self, max_message: int = MAX_MESSAGE, max_nesting: int = MAX_NESTING,
                 max_tokens: int = MAX_TOKENS):
        self.max_message = max_message
        self.max_nesting = max_nesting
        self.max_tokens = max_tokens
        self._state = _START
        self._tok = bytearray()      # text of the token being lexed
        self._reset_message()

    def _reset_message(self) -> None:
        self._tokens: list[bytes] = []
        self._size = 0               # bytes of tokens held for this message
        self._braces = 0
        self._brackets = 0
        self._skipping = False       # over a limit: error sent, rest of message dropped

    # -- public -------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete message."""
        return self._size + len(self._tok)

    @property
    def idle(self) -> bool:
        """True when nothing of a message is pending."""
        return (self._state in (_START, _RECOVERY) and not self._tokens
                and not self._braces and not self._brackets and not self._skipping)

    def feed(self, data: bytes) -> list[Parsed]:
        out: list[Parsed] = []
        self._lex(bytes(data), out)
        return out

    # -- lexer ----------------------------------------------------------------

    def _lex(self, data: bytes, out: list) -> None:
        i, n = 0, len(data)
        while i < n:
            st = self._state
            c = data[i]
            if st == _START:
                if c in b" \t\r\n":
                    i = _WS_RUN.match(data, i).end()
                    continue
                m = _WHOLE_TOKEN.match(data, i)
                if (m is not None and not self._skipping
                        and self._size + m.end() - i <= self.max_message):
                    i = m.end()
                    self._token(m.group(), out)
                    continue
                i += 1
                if c in _STRUCTURAL:
                    self._token(bytes((c,)), out)
                elif c == 0x22:
                    self._begin(c, _DQ)
                elif c == 0x27:
                    self._begin(c, _SQ)
                elif c == 0x30:
                    self._begin(c, _ZERO)
                elif 0x31 <= c <= 0x39:
                    self._begin(c, _NONZERO)
                elif c == 0x2D:
                    self._begin(c, _NEG)
                elif 0x61 <= c <= 0x7A:
                    self._begin(c, _KEYWORD)
                else:
                    self._tok.append(c)
                    self._error(out)
            elif st in (_DQ, _SQ):
                m = (_DQ_RUN if st == _DQ else _SQ_RUN).match(data, i)
                self._grow(data[i:m.end()], out)
                i = m.end()
                if i == n:
                    return
                c = data[i]
                i += 1
                self._grow(data[i - 1:i], out)
                if c == 0x5C:
                    self._state = _DQ_ESC if st == _DQ else _SQ_ESC
                elif c in (0x22, 0x27):
                    self._end_token(out)
                else:  # control byte or 0xfe/0xff
                    self._error(out)
            elif st in (_DQ_ESC, _SQ_ESC):
                # any printable byte may follow a backslash; the parser checks it
                i += 1
                self._grow(data[i - 1:i], out)
                if 0x20 <= c <= 0xFD:
                    self._state = _DQ if st == _DQ_ESC else _SQ
                else:
                    self._error(out)
            elif st == _RECOVERY:
                i = _RECOVERY_RUN.match(data, i).end()
                if i < n:
                    self._state = _START
            elif st == _KEYWORD:
                m = _KEYWORD_RUN.match(data, i)
                self._grow(data[i:m.end()], out)
                i = m.end()
                if i < n:
                    self._end_token(out)   # the next byte is looked at afresh
            else:
                i = self._number(data, i, out)

    def _number(self, data: bytes, i: int, out: list) -> int:
        """One step of the number automaton (QEMU's); returns the new index."""
        st, c = self._state, data[i]
        nxt = None
        if st in (_NONZERO, _MANT_D, _EXP_D) and c in _DIGITS:
            m = _DIGIT_RUN.match(data, i)
            self._grow(data[i:m.end()], out)
            return m.end()
        if st == _ZERO:
            nxt = _MANT if c == 0x2E else (None if c in _DIGITS else "end")
        elif st == _NONZERO:
            nxt = _MANT if c == 0x2E else _EXP_E if c in b"eE" else "end"
        elif st == _NEG:
            nxt = _ZERO if c == 0x30 else _NONZERO if c in _DIGITS else None
        elif st == _MANT:
            nxt = _MANT_D if c in _DIGITS else None
        elif st == _MANT_D:
            nxt = _EXP_E if c in b"eE" else "end"
        elif st == _EXP_E:
            nxt = _EXP_SIGN if c in b"+-" else _EXP_D if c in _DIGITS else None
        elif st == _EXP_SIGN:
            nxt = _EXP_D if c in _DIGITS else None
        elif st == _EXP_D:
            nxt = "end"
        if nxt == "end":
            self._end_token(out)       # lookahead: the byte is lexed afresh
            return i
        self._grow(data[i:i + 1], out)
        if nxt is None:
            self._error(out)           # the offending byte is part of the error token
        else:
            self._state = nxt
        return i + 1

    def _begin(self, c: int, state: int) -> None:
        self._tok.append(c)
        self._state = state

    def _grow(self, chunk: bytes, out: list) -> None:
        if self._skipping:
            return
        self._tok += chunk
        if self._size + len(self._tok) > self.max_message:
            self._over_limit(out, "JSON token size limit exceeded")

    def _end_token(self, out: list) -> None:
        text = bytes(self._tok)
        self._tok.clear()
        self._state = _START
        self._token(text, out)

    def _error(self, out: list) -> None:
        text = bytes(self._tok).decode("utf-8", "replace")
        if len(text) > _QUOTE_MAX:
            text = text[:_QUOTE_MAX] + "..."
        skipped = self._skipping
        self._tok.clear()
        self._reset_message()
        self._state = _RECOVERY
        if not skipped:  # a message over a limit already got its one error
            out.append(JsonError(f"JSON parse error, stray '{text}'"))

    # -- streamer -------------------------------------------------------------

    def _over_limit(self, out: list, desc: str) -> None:
        out.append(JsonError(desc))
        self._skipping = True
        self._tokens = []
        self._size = 0
        self._tok.clear()

    def _token(self, text: bytes, out: list) -> None:
        c = text[0] if text else 0
        if c == 0x7B:
            self._braces += 1
        elif c == 0x7D:
            self._braces -= 1
        elif c == 0x5B:
            self._brackets += 1
        elif c == 0x5D:
            self._brackets -= 1
        if not self._skipping:
            self._tokens.append(text)
            self._size += len(text)
        if self._braces < 0 or self._brackets < 0 or not (self._braces or self._brackets):
            tokens, skipped = self._tokens, self._skipping
            self._reset_message()
            if not skipped:
                out.append(parse_tokens(tokens))
            return
        if self._skipping:
            return
        if self._size > self.max_message:
            self._over_limit(out, "JSON token size limit exceeded")
        elif len(self._tokens) > self.max_tokens:
            self._over_limit(out, "JSON token count limit exceeded")
        elif self._braces + self._brackets > self.max_nesting:
            self._over_limit(out, "JSON nesting depth limit exceeded")


# --------------------------------------------------------------------------
# parser (a complete message's tokens -> a value), QEMU's error texts


class _ParseError(Exception):
    pass


_ESCAPES = {0x22: '"', 0x5C: "\\", 0x2F: "/", 0x27: "'", 0x62: "\b", 0x66: "\f",
            0x6E: "\n", 0x72: "\r", 0x74: "\t"}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")


def parse_tokens(tokens: list[bytes]) -> Parsed:
    """Parse one message's tokens; ``(value,)`` or a JsonError."""
    try:
        value, pos = _value(tokens, 0)
        if pos != len(tokens):   # cannot happen with the streamer's framing
            raise _ParseError("expecting value")
    except _ParseError as exc:
        return JsonError(f"JSON parse error, {exc}")
    return (value,)


def _value(tokens: list[bytes], pos: int) -> tuple[Any, int]:
    if pos >= len(tokens):
        raise _ParseError("premature EOI")
    tok = tokens[pos]
    c = tok[0]
    if c == 0x7B:
        return _object(tokens, pos + 1)
    if c == 0x5B:
        return _array(tokens, pos + 1)
    if c in (0x22, 0x27):
        return _string(tok), pos + 1
    if c == 0x2D or c in _DIGITS:
        return _number(tok), pos + 1
    if 0x61 <= c <= 0x7A:
        word = tok.decode("ascii")
        if word in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[word], pos + 1
        raise _ParseError(f"invalid keyword '{word}'")
    raise _ParseError("expecting value")


def _next(tokens: list[bytes], pos: int) -> bytes:
    if pos >= len(tokens):
        raise _ParseError("premature EOI")
    return tokens[pos]


def _object(tokens: list[bytes], pos: int) -> tuple[dict, int]:
    obj: dict = {}
    if _next(tokens, pos) == b"}":
        return obj, pos + 1
    while True:
        key, pos = _value(tokens, pos)
        if not isinstance(key, str):
            raise _ParseError("key is not a string in object")
        if _next(tokens, pos) != b":":
            raise _ParseError("missing : in object pair")
        value, pos = _value(tokens, pos + 1)
        if key in obj:
            raise _ParseError("duplicate key")
        obj[key] = value
        done, pos = _separator(tokens, pos, b"}", "dict")
        if done:
            return obj, pos


def _array(tokens: list[bytes], pos: int) -> tuple[list, int]:
    arr: list = []
    if _next(tokens, pos) == b"]":
        return arr, pos + 1
    while True:
        value, pos = _value(tokens, pos)
        arr.append(value)
        done, pos = _separator(tokens, pos, b"]", "list")
        if done:
            return arr, pos


def _separator(tokens: list[bytes], pos: int, closer: bytes, what: str) -> tuple[bool, int]:
    """After a member: (True, next) at ``closer``, (False, next) after a comma."""
    sep = _next(tokens, pos)
    if sep != closer and sep != b",":
        raise _ParseError(f"expected separator in {what}")
    return sep == closer, pos + 1


def _number(tok: bytes) -> Union[int, float]:
    text = tok.decode("ascii")
    try:
        if b"." in tok or b"e" in tok or b"E" in tok:
            value: Union[int, float] = float(text)
            if math.isfinite(value):
                return value
        else:
            return int(text)
    except ValueError:   # more digits than int() converts
        pass
    shown = text if len(text) <= 40 else text[:40] + "..."
    raise _ParseError(f"number {shown} is out of range")


def _string(tok: bytes) -> str:
    body = tok[1:-1]
    parts: list[str] = []
    pos, n = 0, len(body)
    while True:
        j = body.find(b"\\", pos)
        seg = body[pos:] if j < 0 else body[pos:j]
        try:
            parts.append(seg.decode("utf-8"))
        except UnicodeDecodeError:
            raise _ParseError("invalid UTF-8 sequence in string") from None
        if j < 0:
            return "".join(parts)
        esc = body[j + 1] if j + 1 < n else 0
        if esc != 0x75:  # not \u
            if esc not in _ESCAPES:
                raise _ParseError("invalid escape sequence in string")
            parts.append(_ESCAPES[esc])
            pos = j + 2
            continue
        cp, pos = _unicode_escape(body, tok, j)
        parts.append(chr(cp))


def _unicode_escape(body: bytes, tok: bytes, j: int) -> tuple[int, int]:
    """``\\uXXXX`` (or a surrogate pair of them) at ``body[j]``: (code point,
    next index in body).  ``body`` is ``tok`` without its quotes; the error
    quotes the token's own bytes, closing quote included, as QEMU does."""
    end = j + 6
    cp = int(body[j + 2:end], 16) if _HEX4.fullmatch(body, j + 2, end) else -1
    if 0xD800 <= cp <= 0xDBFF and body[end:end + 2] == b"\\u":
        low = int(body[end + 2:end + 6], 16) if _HEX4.fullmatch(body, end + 2, end + 6) else -1
        if 0xDC00 <= low <= 0xDFFF:
            return 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00), end + 6
        cp = -1
    if cp < 0 or 0xD800 <= cp <= 0xDFFF:
        shown = tok[j + 1:j + 7].decode("utf-8", "replace")
        raise _ParseError(f"{shown} is not a valid Unicode character")
    return cp, end
