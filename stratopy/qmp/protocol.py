"""QMP wire protocol, without sockets: framing, parsing, and message builders.

Everything here works on bytes and dicts so that it can be tested by feeding
byte strings.  The socket side lives in :mod:`stratopy.qmp.server`, the
command table in :mod:`stratopy.qmp.commands`.

Framing (see docs/qmp.md, "Framing")
------------------------------------
* Output: one JSON object per message, compact, ending in ``\\r\\n``; strict
  JSON (no ``Infinity``/``NaN``).
* Input: a stream of JSON texts, split and parsed exactly as QEMU does
  (:mod:`stratopy.qmp.jsonstream`).  Newlines are optional (StratoVirt's own
  test client and ``qemu.qmp`` send none); several objects may arrive in one
  read and one object may be split across reads.

A message that is not valid JSON gets ``GenericError`` "JSON parse error,
..." (QEMU's texts).  A valid JSON value that is not an object, an object without
``execute``, a non-string ``execute``, non-object ``arguments`` or an
unknown top-level member each get a GenericError.  The session goes on in
all of these cases.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Union

import stratopy

from .jsonstream import MAX_MESSAGE, MAX_NESTING, JsonError, JsonStreamer

__all__ = [
    "MAX_MESSAGE", "MAX_NESTING", "NO_ID", "Request", "ProtocolError",
    "QmpSession", "greeting", "version_info", "encode", "reply", "error_reply",
    "event", "timestamp",
]


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
    """Serialize one message: compact JSON followed by ``\\r\\n``.

    Strict JSON: a non-finite float raises ValueError instead of becoming
    ``Infinity`` (the parser refuses such numbers, so no id can carry one).
    """
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\r\n"


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


class QmpSession:
    """Per-connection input state: feed bytes, get requests and protocol errors.

    ``feed(data)`` returns a list, in input order, of :class:`Request` (a
    well-formed request, arguments not yet checked against the command table)
    and :class:`ProtocolError` (send ``item.reply`` back).  It never raises.
    """

    def __init__(self, max_message: int = MAX_MESSAGE, max_nesting: int = MAX_NESTING):
        self._stream = JsonStreamer(max_message=max_message, max_nesting=max_nesting)

    @property
    def buffered(self) -> int:
        """Bytes currently held for an incomplete message."""
        return self._stream.buffered

    @property
    def idle(self) -> bool:
        """True when no partial message is pending."""
        return self._stream.idle

    def feed(self, data: bytes) -> list[Item]:
        out: list[Item] = []
        for msg in self._stream.feed(data):
            if isinstance(msg, JsonError):
                out.append(ProtocolError(msg.desc))
            else:
                out.append(request_from_object(msg[0]))
        return out
