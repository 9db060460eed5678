"""JSON lines with file descriptors on a unix stream socket.

One message is one JSON object on one line; the fds it refers to travel as
SCM_RIGHTS with its bytes (sent with one sendmsg). The reader collects the
fds of every recvmsg and hands them out with the line they came with, so a
line split over two reads keeps its fds. Bounded: a line longer than
MAX_LINE or more than MAX_FDS fds is an error, never a growing buffer.
"""

from __future__ import annotations

import array
import json
import os
import socket

MAX_LINE = 64 * 1024
MAX_FDS = 16


class WireError(Exception):
    """The peer broke the framing (too long, too many fds, not JSON)."""


def send(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
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

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []
        self.eof = False

    def feed(self) -> None:
        """One recvmsg (the socket may be blocking or not)."""
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(
                MAX_LINE, socket.CMSG_SPACE(MAX_FDS * 4))
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
        if len(self.fds) > MAX_FDS:
            raise WireError(f"more than {MAX_FDS} file descriptors")

    def line(self) -> tuple[dict, list[int]] | None:
        """The next complete message and its fds, or None. WireError (the
        line is consumed, its fds closed) if it is not one JSON object."""
        end = self.buf.find(b"\n")
        if end < 0:
            if len(self.buf) > MAX_LINE:
                self.buf.clear()
                raise WireError(f"request longer than {MAX_LINE} bytes")
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


def error(desc: str) -> dict:
    """A QMP-style error reply (one line: ``desc`` has no newline)."""
    return {"error": {"class": "GenericError", "desc": " ".join(desc.split())}}
