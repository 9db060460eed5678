"""QMP wire protocol, without sockets: framing, parsing, and message builders.

Everything here works on bytes and dicts so that it can be tested by feeding
byte strings.  The socket side lives in :mod:`stratopy.qmp.server`, the
command table in :mod:`stratopy.qmp.commands`.

Framing rules (see docs/qmp.md, "Framing")
-------------------------------------------
* Output: one JSON object per message, compact, ending in ``\\r\\n``.
* Input: a stream of JSON texts.  Newlines are optional (StratoVirt's own test
  client and ``qemu.qmp`` send none); several objects may arrive in one read
  and one object may be split across reads.  A value may span several lines.
* A top-level object/array is complete when its brackets balance (a stack of
  open brackets, strings and escapes respected).  A closer that matches a
  deeper opener closes down to it (``{"a":[1}`` ends there); a closer that
  matches nothing open is ignored for framing.  Either way json.loads then
  reports the error.  Top-level scalars (``123``, ``true``, ``"s"``) are
  complete at the next whitespace, ``{``, ``[`` or ``"`` and are refused as
  "not an object".
* Error recovery, as in QEMU's JSON lexer: a byte that can never appear
  outside a string in JSON (e.g. ``0xff``, ``#``, a letter that is not part
  of ``true``/``false``/``null``/an exponent) ends the current message with
  one "JSON parse error" reply; then input is skipped up to the next
  structural character (``{ [`` start afresh, a ``} ]`` is swallowed) or
  control byte (newline).  A control byte inside a string (a raw newline,
  which JSON forbids) ends the message with an error and resyncs right
  there.  ``0xfe``/``0xff`` between messages are ignored silently, so
  ``\\xff\\n`` always brings a session back to a clean state, whatever came
  before.
* Bounded buffer: a message larger than ``max_message`` bytes (1 MiB by
  default) is not buffered.  The scanner drops its bytes but keeps tracking
  braces and strings until the message ends, then sends one GenericError
  ("QMP message too large") and goes on with the next message.  So memory
  stays bounded and the session stays in step.  Nesting deeper than
  ``MAX_NESTING`` is refused the same way.

A complete message that is not valid JSON gets ``GenericError`` "JSON parse
error: ...".  A valid JSON value that is not an object, an object without
``execute``, a non-string ``execute``, non-object ``arguments`` or an
unknown top-level member each get a GenericError.  The session goes on in
all of these cases.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Union

import stratopy

__all__ = [
    "MAX_MESSAGE", "MAX_NESTING", "NO_ID", "Request", "ProtocolError",
    "QmpSession", "greeting", "version_info", "encode", "reply", "error_reply",
    "event", "timestamp",
]

#: Largest message accepted on input (bytes).  Bigger ones get an error.
MAX_MESSAGE = 1 << 20
#: Deepest nesting of objects/arrays accepted (QEMU uses the same limit).
MAX_NESTING = 1024


class _NoId:
    """Marker for "the request carried no id" (``None`` is a valid id)."""

    _inst = None

    def __new__(cls):
        if cls._inst is None:
            cls._inst = super().__new__(cls)
        return cls._inst

    def __repr__(self) -> str:
        return "NO_ID"

    def __bool__(self) -> bool:
        return False


NO_ID: Any = _NoId()


# --------------------------------------------------------------------------
# message builders


def version_info(version: str | None = None) -> dict:
    """The ``version`` object of the greeting, also returned by query-version."""
    if version is None:
        version = stratopy.__version__
    return {
        "StratoVirt": {"micro": 1, "minor": 0, "major": 0},
        "qemu": {"micro": 1, "minor": 0, "major": 5},
        "package": f"stratopy-{version}",
    }


def greeting(version: str | None = None) -> dict:
    """The greeting sent to every new client.

    ``{"QMP":{"version":{"StratoVirt":{...},"qemu":{...},"package":"stratopy-V"},"capabilities":[]}}``
    """
    return {"QMP": {"version": version_info(version), "capabilities": []}}


def encode(obj: Any) -> bytes:
    """Serialize one message: compact JSON followed by ``\\r\\n``."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\r\n"


def reply(ret: Any = None, id: Any = NO_ID) -> dict:  # noqa: A002 - QMP name
    """``{"return": ret, "id": id}``; ``ret`` None becomes ``{}``; no id key if NO_ID."""
    msg: dict = {"return": {} if ret is None else ret}
    if id is not NO_ID:
        msg["id"] = id
    return msg


def error_reply(desc: str, klass: str = "GenericError", id: Any = NO_ID) -> dict:  # noqa: A002
    """``{"error": {"class": klass, "desc": desc}, "id": id}``."""
    msg: dict = {"error": {"class": klass, "desc": desc}}
    if id is not NO_ID:
        msg["id"] = id
    return msg


def timestamp(now: float | None = None) -> dict:
    """``{"seconds": S, "microseconds": U}`` for ``now`` (default: wall clock)."""
    if now is None:
        ns = time.time_ns()
        return {"seconds": ns // 1_000_000_000, "microseconds": (ns // 1000) % 1_000_000}
    sec = int(now)
    return {"seconds": sec, "microseconds": int(round((now - sec) * 1e6)) % 1_000_000}


def event(name: str, data: dict | None = None, now: float | None = None) -> dict:
    """``{"event": NAME, "data": {...}, "timestamp": {...}}`` (data ``{}`` if None)."""
    return {"event": name, "data": {} if data is None else data,
            "timestamp": timestamp(now)}


# --------------------------------------------------------------------------
# parsed input


@dataclass
class Request:
    """One well-formed ``{"execute": NAME, "arguments": {...}, "id": ...}``."""

    name: str
    arguments: dict = field(default_factory=dict)
    id: Any = NO_ID  # noqa: A003 - QMP name; NO_ID when absent

    @property
    def has_id(self) -> bool:
        return self.id is not NO_ID


@dataclass
class ProtocolError:
    """Input that is not a valid request; ``reply`` is the error to send back."""

    desc: str
    id: Any = NO_ID  # noqa: A003
    klass: str = "GenericError"

    @property
    def reply(self) -> dict:
        return error_reply(self.desc, self.klass, self.id)


Item = Union[Request, ProtocolError]

_ALLOWED_MEMBERS = ("execute", "arguments", "id")


def parse_message(text: bytes) -> Item:
    """Turn one complete JSON text into a Request or a ProtocolError."""
    try:
        obj = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return ProtocolError(f"JSON parse error: {_short(exc)}")
    return request_from_object(obj)


def request_from_object(obj: Any) -> Item:
    if not isinstance(obj, dict):
        return ProtocolError("QMP input must be a JSON object")
    rid = obj.get("id", NO_ID)
    if "execute" not in obj:
        if "exec-oob" in obj:
            return ProtocolError("QMP input member 'exec-oob' is not supported "
                                 "(out-of-band execution is not available)", rid)
        return ProtocolError("QMP input lacks member 'execute'", rid)
    name = obj["execute"]
    if not isinstance(name, str):
        return ProtocolError("QMP input member 'execute' must be a string", rid)
    for key in obj:
        if key not in _ALLOWED_MEMBERS:
            return ProtocolError(f"QMP input member '{key}' is unexpected", rid)
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        return ProtocolError("QMP input member 'arguments' must be an object", rid)
    return Request(name, args, rid)


def _byte_desc(c: int) -> str:
    return f"byte 0x{c:02x}" if c < 0x21 or c > 0x7E else f"character '{chr(c)}'"


def _short(exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    return msg if len(msg) <= 200 else msg[:200] + "..."


# --------------------------------------------------------------------------
# the stream splitter

_WS = b" \t\r\n"
# Bytes that may appear outside strings in some JSON text.
_LEXICAL = frozenset(b" \t\r\n{}[],:-+.0123456789eEtrufalsn\"")
# In a structure, outside strings: the next byte we must look at.
_STRUCT_INTEREST = re.compile(rb'[{}\[\]"]|[^ \t\r\n{}\[\],:\-+.0-9eEtrufalsn"]')
# In a string: the next quote, backslash or control byte.
_STRING_INTEREST = re.compile(rb'["\\\x00-\x1f]')
# Top-level scalar token (starts with - 0-9 t f n): ends at whitespace or
# one of {[" (complete), or at a byte that cannot appear in JSON (error).
_TOKEN_END = re.compile(rb'[ \t\r\n{\["]|[^ \t\r\n{}\[\],:\-+.0-9eEtrufalsn"]')
# Bytes that may start a top-level JSON value (after whitespace).
_VALUE_START = frozenset(b'{["-0123456789tfn')
# Error recovery ends at a structural character or a control byte (the
# newline) or 0xfe/0xff, as in QEMU's JSON lexer.
_RECOVER_END = re.compile(rb'[{}\[\]\x00-\x08\x0a-\x1f\xfe\xff]')

_TOP, _STRUCT, _TOKEN, _RECOVER = 0, 1, 2, 3


class QmpSession:
    """Per-connection input state: feed bytes, get requests and protocol errors.

    ``feed(data)`` returns a list, in input order, of :class:`Request` (a
    well-formed request, arguments not yet checked against the command table)
    and :class:`ProtocolError` (send ``item.reply`` back).  It never raises.
    """

    def __init__(self, max_message: int = MAX_MESSAGE, max_nesting: int = MAX_NESTING):
        self.max_message = max_message
        self.max_nesting = max_nesting
        self._buf = bytearray()   # bytes of the current message (unless discarding)
        self._mode = _TOP
        self._stack = bytearray()  # open brackets of the current message
        self._excess = 0           # nesting beyond max_nesting (not stacked)
        self._in_string = False
        self._escape = False
        self._discard = False      # message too large: bytes are not kept
        self._too_deep = False

    # -- public -------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes currently held for an incomplete message."""
        return len(self._buf)

    @property
    def idle(self) -> bool:
        """True when no partial message is pending."""
        return self._mode == _TOP and not self._buf

    def feed(self, data: bytes) -> list[Item]:
        out: list[Item] = []
        try:
            self._scan(bytes(data), out)
        except Exception as exc:  # pragma: no cover - defensive: never raise
            self._reset()
            out.append(ProtocolError(f"JSON parse error: internal scanner error: {_short(exc)}"))
        return out

    # -- scanner ------------------------------------------------------------

    def _reset(self) -> None:
        self._buf = bytearray()
        self._mode = _TOP
        self._stack = bytearray()
        self._excess = 0
        self._in_string = False
        self._escape = False
        self._discard = False
        self._too_deep = False

    def _keep(self, chunk: bytes) -> None:
        if self._discard or self._too_deep:
            return
        if len(self._buf) + len(chunk) > self.max_message:
            self._discard = True
            self._buf = bytearray()
            return
        self._buf += chunk

    def _finish(self, out: list[Item]) -> None:
        """The current message is complete (bytes in self._buf)."""
        if self._discard:
            out.append(ProtocolError(
                f"QMP message too large (more than {self.max_message} bytes); discarded"))
        elif self._too_deep:
            out.append(ProtocolError(
                f"JSON parse error: nesting deeper than {self.max_nesting}"))
        else:
            out.append(parse_message(bytes(self._buf)))
        self._reset()

    def _lex_error(self, out: list[Item], what: str) -> None:
        if self._discard:
            out.append(ProtocolError(
                f"QMP message too large (more than {self.max_message} bytes); discarded"))
        else:
            out.append(ProtocolError(f"JSON parse error: {what}"))
        self._reset()
        self._mode = _RECOVER

    def _scan(self, data: bytes, out: list[Item]) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._mode == _TOP:
                # skip whitespace between messages
                while i < n and data[i] in _WS:
                    i += 1
                if i >= n:
                    return
                c = data[i]
                if c in b"{[":
                    self._mode = _STRUCT
                    self._stack.append(c)
                    self._keep(data[i:i + 1])
                    i += 1
                elif c == 0x22:  # '"' : a top-level string (an error once complete)
                    self._mode, self._in_string = _STRUCT, True
                    self._keep(data[i:i + 1])
                    i += 1
                elif c in _VALUE_START:
                    self._mode = _TOKEN
                elif c >= 0xFE:
                    i += 1  # the reset byte between messages: ignored silently
                else:
                    self._keep(data[i:i + 1])
                    i += 1
                    self._lex_error(out, f"stray {_byte_desc(c)}")
                continue

            if self._mode == _TOKEN:
                m = _TOKEN_END.search(data, i)
                end = m.start() if m else n
                self._keep(data[i:end])
                i = end
                if m:
                    c = data[end]
                    if c in _WS or c in b'{["':
                        self._finish(out)
                    else:
                        self._keep(data[end:end + 1])
                        i = end + 1
                        self._lex_error(out, f"invalid {_byte_desc(c)}")
                continue

            if self._mode == _RECOVER:
                m = _RECOVER_END.search(data, i)
                if m is None:
                    return
                j = m.start()
                # a closer most likely belongs to the broken message: eat it
                i = j + 1 if data[j] in b"}]" else j
                self._mode = _TOP
                continue

            # _STRUCT (also a top-level string: empty stack and in_string)
            if self._in_string:
                if self._escape:
                    self._escape = False
                    if data[i] < 0x20:
                        self._keep(data[i:i + 1])
                        i += 1
                        self._lex_error(out, "control character in string")
                        self._mode = _TOP
                        continue
                    self._keep(data[i:i + 1])
                    i += 1
                    continue
                m = _STRING_INTEREST.search(data, i)
                if m is None:
                    self._keep(data[i:])
                    return
                j = m.start()
                self._keep(data[i:j + 1])
                c = data[j]
                i = j + 1
                if c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:
                    self._in_string = False
                    if not self._stack:
                        self._finish(out)
                else:
                    self._lex_error(out, "control character in string "
                                         "(a newline inside a string?)")
                    self._mode = _TOP
                continue

            m = _STRUCT_INTEREST.search(data, i)
            if m is None:
                self._keep(data[i:])
                return
            j = m.start()
            c = data[j]
            if c not in _LEXICAL:
                self._keep(data[i:j + 1])
                i = j + 1
                self._lex_error(out, f"invalid {_byte_desc(c)}")
                continue
            self._keep(data[i:j + 1])
            i = j + 1
            if c == 0x22:
                self._in_string = True
            elif c in b"{[":
                if len(self._stack) >= self.max_nesting:
                    # refused at the end; stop buffering, keep tracking structure
                    self._too_deep = True
                    self._buf = bytearray()
                    self._excess += 1
                else:
                    self._stack.append(c)
            else:  # } or ]
                if self._excess:
                    self._excess -= 1
                    continue
                opener = 0x7B if c == 0x7D else 0x5B
                k = self._stack.rfind(opener)
                if k < 0:
                    # a stray closer (``{"a": ]}``): ignore it for framing;
                    # the message is invalid JSON and json.loads will say so
                    continue
                # pops what is open above it too (``{"a": [1}`` ends here)
                del self._stack[k:]
                if not self._stack:
                    self._finish(out)
