"""JSON lines with file descriptors on a unix stream socket.

One message is one JSON object on one line; the fds it refers to travel as
SCM_RIGHTS with its bytes (sent with one sendmsg). The reader collects the
fds of every recvmsg and hands them out with the line they came with, so a
line split over two reads keeps its fds. Bounded: a line longer than
MAX_LINE or more than MAX_FDS fds is an error, never a growing buffer.
"""

from __future__ import annotations

import array
import binascii
import json
import os
import socket

MAX_LINE = 64 * 1024
MAX_FDS = 16
# between the server and a member: a connection handed over with what was
# read from it (a line and what came after it in the same reads: a few
# times MAX_LINE at most, base64) and its fds
CHAN_LINE = 8 * MAX_LINE
CHAN_FDS = MAX_FDS + 1


class WireError(Exception):
    """The peer broke the framing (too long, too many fds, not JSON)."""


def send(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    data = encode(obj)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        sent = sock.sendmsg([data], anc)
    else:
        sent = sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Reader:
    """Lines (with their fds) from one socket; ``feed`` after each readable."""

    def __init__(self, sock: socket.socket, buf: bytes = b"", fds=(),
                 max_line: int = MAX_LINE, max_fds: int = MAX_FDS):
        self.sock = sock
        self.max_line, self.max_fds = max_line, max_fds
        self.buf = bytearray(buf)
        self.fds: list[int] = list(fds)
        self.eof = False

    def feed(self) -> None:
        """One recvmsg (the socket may be blocking or not)."""
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(
                MAX_LINE, socket.CMSG_SPACE(self.max_fds * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc = b"", []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % 4])
                self.fds.extend(got)
        if not data:
            self.eof = True
        self.buf += data
        if len(self.fds) > self.max_fds:
            raise WireError(f"more than {self.max_fds} file descriptors")

    def line(self) -> tuple[dict, list[int]] | None:
        """The next complete message and its fds, or None. WireError (the
        line is consumed, its fds closed) if it is not one JSON object."""
        end = self.buf.find(b"\n")
        if end < 0:
            if len(self.buf) > self.max_line:
                self.buf.clear()
                raise WireError(f"request longer than {self.max_line} bytes")
            return None
        raw = bytes(self.buf[:end])
        del self.buf[:end + 1]
        fds, self.fds = self.fds, []
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            close_fds(fds)
            raise WireError(f"not JSON: {e}") from None
        if not isinstance(obj, dict):
            close_fds(fds)
            raise WireError("not a JSON object")
        return obj, fds

    def close(self) -> None:
        close_fds(self.fds)
        self.fds = []

    def take(self) -> tuple[bytes, list[int]]:
        """What was read and not consumed yet, to go with the connection to
        another process (``pack`` it); the reader is left empty."""
        rest, fds = bytes(self.buf), self.fds
        self.buf.clear()
        self.fds = []
        return rest, fds


def pack(data: bytes) -> str:
    """Bytes as a JSON string (base64)."""
    return binascii.b2a_base64(data, newline=False).decode() if data else ""


def unpack(where: str, text) -> bytes:
    if not isinstance(text, str) or len(text) > CHAN_LINE:
        raise WireError(f"{where}: not a buffer")
    try:
        return binascii.a2b_base64(text) if text else b""
    except (binascii.Error, ValueError):
        raise WireError(f"{where}: not a buffer") from None


def encode(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def error(desc: str) -> dict:
    """A QMP-style error reply (one line: ``desc`` has no newline)."""
    return {"error": {"class": "GenericError", "desc": " ".join(desc.split())}}
