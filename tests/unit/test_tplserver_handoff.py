"""The template server's connection hand-off (no KVM, no fork): a request
goes to a ready pool member unread, with its fds; the member answers it (a
bad one with one line, staying in the pool) and gives back what it did not
consume; the server answers query-pool itself. Pool members are socketpairs
here (Server._spawn replaced); member._serve is the real one."""

from __future__ import annotations

import array
import json
import os
import socket
import time

import pytest

from stratopy.cli_parse import parse_args
from stratopy.tplserver import member, wire
from stratopy.tplserver.server import Member, Server

TEMPLATE = parse_args(["-kernel", "/k", "-m", "64", "-incoming", "file:/t"])
TIMEOUT = 5.0


class PairServer(Server):
    """Members are the test's end of a socketpair (pids that exist nowhere
    are never signalled: the test ends them by closing its end)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.ends: dict[int, socket.socket] = {}

    def _spawn(self, low: bool) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent.setblocking(False)
        m = Member(-1000 - len(self.ends), parent)   # a pid no process has
        self.members.append(m)
        self.ends[m.pid] = child
        self.sel.register(parent, 1, lambda m=m: self._member_readable(m))

    def pump(self) -> None:
        """One round of the server's loop (serve() without the reaping)."""
        for key, _ in self.sel.select(timeout=0.01):
            key.data()
        self.dispatch()

    def step(self, until, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not until():
            assert time.monotonic() < deadline, what
            self.pump()

    def close(self) -> None:
        for m in list(self.members):
            self._drop_member(m)
        for c in list(self.clients):
            self._close_client(c)
        for end in self.ends.values():
            end.close()
        self.listener.close()
        os.unlink(self.path)
        self.sel.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


@pytest.fixture
def server(tmp_path):
    servers = []

    def start(pool: int = 1, wait: float = 2.0) -> PairServer:
        s = PairServer(str(tmp_path / f"s{len(servers)}.sock"), pool, wait, TEMPLATE,
                       prepared=object())
        servers.append(s)
        s.refill()
        for pid, end in s.ends.items():
            wire.send(end, {"ready": pid})
        s.step(lambda: len(s.query_pool()["ready"]) == pool, "the pool did not fill")
        return s
    yield start
    for s in servers:
        s.close()


def connect(s: Server, data: bytes, fds=()) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(TIMEOUT)
    c.connect(s.path)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    c.sendmsg([data], anc)
    return c


def lines(c: socket.socket, n: int) -> list[dict]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = c.recv(65536)
        assert chunk, buf
        buf += chunk
    return [json.loads(x) for x in buf.splitlines()]


def handed(s: PairServer, pid: int):
    """What member ``pid`` got from the server: (message, connection, the
    connection's Reader with the fds that came with it)."""
    end = s.ends[pid]
    end.setblocking(False)
    r = wire.Reader(end, max_line=wire.CHAN_LINE, max_fds=wire.CHAN_FDS)
    got = None
    deadline = time.monotonic() + TIMEOUT
    while got is None:
        assert time.monotonic() < deadline and not r.eof, "nothing handed"
        s.pump()
        r.feed()
        got = r.line()
    msg, fds = got
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fds[0])
    return msg, sock, wire.Reader(sock, wire.unpack("buf", msg["conn"]["buf"]), fds[1:])


def test_a_request_goes_to_the_member_unread_with_its_fds(server):
    s = server()
    pid = s.query_pool()["ready"][0]
    r, w = os.pipe()
    req = b'{"execute":"clone","arguments":{"serial":{"fd":0}},"id":7}\n'
    with connect(s, req, [w]) as c:
        os.close(w)
        msg, sock, reader = handed(s, pid)
        with sock:
            assert msg == {"conn": {"buf": ""}}       # the server read nothing of it
            got = member._read_request(sock, reader)
            assert got is not None
            (body, fds) = got
            assert body["id"] == 7 and len(fds) == 1  # the member reads it, fd and all
            os.write(fds[0], b"x")
            assert os.read(r, 1) == b"x"
            wire.close_fds(fds)
        assert c.fileno() >= 0
    os.close(r)
    assert s.query_pool()["ready"] == []              # held by the member meanwhile


def test_a_bad_request_gets_one_line_from_the_member_which_stays(server):
    """The member answers a request it cannot serve with one line and goes
    back to the pool; what it did not read (a query-pool sent behind it on
    the same connection) is the server's to answer."""
    s = server()
    pid = s.query_pool()["ready"][0]
    data = (b'{"execute":"clone","arguments":{"drives":[{"id":"x","file":"/y"}]},"id":1}\n'
            b'{"execute":"query-pool","id":2}\n')
    with connect(s, data) as c:
        _, sock, reader = handed(s, pid)
        assert member._serve(s.ends[pid], None, sock, reader, TEMPLATE, None) is None
        s.step(lambda: s.query_pool()["ready"] == [pid], "the member did not come back")
        first, second = lines(c, 2)
    assert first["id"] == 1 and "the template has no drive 'x'" in first["error"]["desc"]
    assert second == {"return": {"ready": [pid], "restoring": [], "size": 1}, "id": 2}


def test_not_json_gets_one_line_and_the_member_stays(server):
    s = server()
    pid = s.query_pool()["ready"][0]
    with connect(s, b"{not json\n") as c:
        _, sock, reader = handed(s, pid)
        assert member._serve(s.ends[pid], None, sock, reader, TEMPLATE, None) is None
        (reply,) = lines(c, 1)
        s.step(lambda: s.query_pool()["ready"] == [pid], "the member did not come back")
    assert "not JSON" in reply["error"]["desc"]


def test_query_pool_is_answered_by_the_server_not_a_member(server):
    s = server()
    pid = s.query_pool()["ready"][0]
    with connect(s, b'{"execute":"query-pool"}\n') as c:
        s.pump()
        (reply,) = lines(c, 1)
    assert reply["return"]["ready"] == [pid]
    s.ends[pid].setblocking(False)
    with pytest.raises(BlockingIOError):
        s.ends[pid].recv(1)                           # the member got nothing


def test_a_member_dying_with_the_connection_leaves_one_line(server):
    s = server()
    pid = s.query_pool()["ready"][0]
    with connect(s, b'{"execute":"clone","id":3}\n') as c:
        handed(s, pid)[1].close()
        s.ends.pop(pid).close()                       # the member dies holding it
        s.step(lambda: all(m.pid != pid for m in s.members), "the dead member stayed")
        (reply,) = lines(c, 1)
    assert reply == {"error": {"class": "GenericError",
                               "desc": "the pool member died before it started"}}


def test_no_member_ready_and_no_waiting_refuses_with_the_request_id(server):
    s = server(wait=0)
    pid = s.query_pool()["ready"][0]
    with connect(s, b'{"execute":"clone","id":1}\n{"execute":"clone","id":2}\n') as c:
        _, sock, reader = handed(s, pid)
        with sock:
            assert member._read_request(sock, reader)[0]["id"] == 1
            member._hand_back(s.ends[pid], reader, "gone")   # a clone now: the rest is back
        s.step(lambda: pid not in [m.pid for m in s.members], "the clone stayed a member")
        (reply,) = lines(c, 1)
    assert reply["id"] == 2 and "the pool is empty" in reply["error"]["desc"]


def test_idle_thread_runs_under_sched_idle_and_leaves_the_caller_as_it_was():
    before = os.sched_getscheduler(0)
    seen = member.idle_thread(lambda: os.sched_getscheduler(0))
    assert seen == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == before
    with pytest.raises(KeyError, match="gone"):
        member.idle_thread(lambda: {}["gone"])


def test_what_the_member_did_not_read_comes_back_byte_for_byte(server):
    """Bytes behind the first request (UTF-8, ~37 KiB, the line not
    complete yet) go back to the server with the connection as they were:
    the query-pool they start is answered with its id, echoed exactly."""
    s = server()
    pid = s.query_pool()["ready"][0]
    tag = "é\u2603\"\\" * (wire.MAX_LINE // 16)
    second = json.dumps({"execute": "query-pool", "id": tag}, ensure_ascii=False).encode()
    assert len(second) < wire.MAX_LINE
    with connect(s, b'{"execute":"clone","arguments":{"color":1},"id":1}\n' + second) as c:
        _, sock, reader = handed(s, pid)
        assert member._serve(s.ends[pid], None, sock, reader, TEMPLATE, None) is None
        s.step(lambda: s.query_pool()["ready"] == [pid], "the member did not come back")
        c.sendall(b"\n")
        s.step(lambda: s.clients[0].reader.buf == b"", "the line was not read")
        first, reply = lines(c, 2)
    assert "unknown field 'color'" in first["error"]["desc"]
    assert reply["id"] == tag and reply["return"]["ready"] == [pid]
