"""``stratopy-server``: one template, a pool of restored paused clones.

    stratopy-server -listen unix:PATH [-pool N] [-wait MS] \\
        <the template's stratopy command line, with -incoming file:DIR>

At start-up it pays, once, what every warm start pays: the interpreter, the
imports, opening the template and validating all of it against the command
line, and checking the memory file's digests in full (builder.prepare_template;
so no clone runs a verify thread). Then ``gc.freeze()`` and it forks N pool
members (tplserver.member), each of which creates its own KVM VM (a VM
cannot cross fork()) and restores it, and waits with its vCPUs created, not
running. A request on the socket (tplserver.request) goes to a ready member
with its fds; the member replies with its pid and runs on as an ordinary VM.
The pool refills in the background; a member that dies is replaced.

The server is one thread and one selector; it never waits on a handed-out
clone (they are reaped with WNOHANG only, so no zombie stays) and never
runs guest code. On SIGTERM/SIGINT it stops: its socket goes, idle members
are ended, handed-out clones run on (each is in its own session). It has no
seccomp filter (it must fork); each clone installs the normal one before
its vCPUs start.
"""

from __future__ import annotations

import gc
import os
import selectors
import signal
import socket
import sys
import time

from stratopy.errors import ConfigError, StratoError
from stratopy.tplserver import request, wire

USAGE = ("usage: stratopy-server -listen unix:PATH [-pool N] [-wait MS] "
         "STRATOPY-ARGS... -incoming file:DIR")
MAX_CLIENTS = 256
MAX_FAILED_STARTS = 3      # consecutive pool members failing to restore: stop refilling
RESTORE_JOBS = max(1, os.cpu_count() or 1)     # pool members restoring at once
REFILL_HOLDOFF = 0.02      # s after a hand-out before refilling (the clone starts)


class Member:
    def __init__(self, pid: int, chan: socket.socket):
        self.pid, self.chan = pid, chan
        self.reader = wire.Reader(chan, max_line=wire.CHAN_LINE, max_fds=wire.CHAN_FDS)
        self.ready = False
        self.low = False           # restoring under SCHED_IDLE (member.idle_thread)
        self.client: Client | None = None       # whose connection it holds


class Client:
    """A connection. The server reads it only while no member holds it: a
    fresh one goes to a ready member unread (the member reads, checks and
    answers the request itself); the server reads one when no member is
    ready (a ``query-pool`` is answered, a request waits), or when a member
    gives it back with what it has not consumed."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.reader = wire.Reader(conn)
        self.registered = False
        self.head = None           # (msg, fds): a request read, waiting for a member
        self.since = time.monotonic()       # waiting for a member since
        self.wants = False         # a request for a member (read or not)
        self.fresh = True          # not looked at yet (_peek)
        self.member: Member | None = None


def _with_id(reply: dict, request_id) -> dict:
    """Replies may come out of order (a clone answers when it is attached):
    a request's "id" is echoed, as in QMP."""
    if request_id is not None:
        reply = dict(reply, id=request_id)
    return reply


def parse_server_args(argv: list[str]):
    """(listen path, pool size, wait seconds, the template's MachineConfig)."""
    from stratopy.cli_parse import parse_args

    rest, listen, pool, wait_ms = [], None, 4, 2000
    it = iter(argv)
    for a in it:
        if a in ("-listen", "-pool", "-wait"):
            v = next(it, None)
            if a == "-listen":
                listen = request.unix_path_option(a, v)
            else:
                try:
                    n = int(v or "")
                except ValueError:
                    n = -1
                lo, hi = (1, 256) if a == "-pool" else (0, 600000)
                if not lo <= n <= hi:
                    raise ConfigError(a, f"'{v}' is not a number from {lo} to {hi}")
                if a == "-pool":
                    pool = n
                else:
                    wait_ms = n
        else:
            rest.append(a)
    if listen is None:
        raise ConfigError("-listen", "is required (-listen unix:PATH)")
    config = parse_args(rest)
    if config.incoming is None:
        raise ConfigError("-incoming", "is required: the server serves one template")
    for d in config.devices:
        if d.driver == "vhost-vsock-device":
            # pool members are restored before a request names them: each
            # would take the template's guest-cid, which the kernel gives one VM
            raise ConfigError("-device", f"vhost-vsock-device '{d.id}': every clone of the "
                                         f"pool would take guest-cid {d.guest_cid} (a template "
                                         f"with it needs stratopy -incoming)")
    if config.daemonize:
        raise ConfigError("-daemonize", "not with stratopy-server")
    return listen, pool, wait_ms / 1000.0, config


# what a q35 member restores besides a microvm's: its PCI side
_Q35_MODULES = ("stratopy.machine.q35", "stratopy.machine.pci_devices", "stratopy.pci.bus",
                "stratopy.pci.root_port", "stratopy.pci.virtio_pci", "stratopy.kvm.uapi_irq")


def preload(machine_type: str = "microvm") -> None:
    """Import, once and before forking, what a member restores and a clone
    runs between the request and its first KVM_RUN (the CLI's run path, QMP,
    seccomp, chardevs, the block backend; q35's PCI side): neither then
    imports anything of its own after the fork."""
    import importlib

    names = ("stratopy.cli", "stratopy.machine.control", "stratopy.qmp.server",
             "stratopy.qmp.commands", "stratopy.seccomp", "stratopy.chardev",
             "stratopy.machine.devices", "stratopy.devices.virtio.block",
             "stratopy.tplserver.member", "stratopy.files", "stratopy.daemon")
    if machine_type == "q35":
        names += _Q35_MODULES
    for name in names:
        importlib.import_module(name)


class Server:
    def __init__(self, listen: str, pool: int, wait: float, config, prepared=None):
        """``prepared``: the template opened and checked (None: done here;
        the unit tests give a stand-in and fork no member)."""
        self.path, self.pool_size, self.wait = listen, pool, wait
        self.template = config
        # Pool members restore without per-VM parts; the request brings them.
        self.pool_config = config.replace(serial=None, qmp=(), daemonize=False, pidfile=None)
        t0 = time.monotonic()
        if prepared is None:
            from stratopy import builder
            from stratopy.migration import memfile

            prepared = builder.prepare_template(self.pool_config, config.incoming)
            op = prepared.opened
            memfile.verify_chunks(op.memory_fd, op.memory_path, op.record, prepared.ram)
        self.prepared = prepared
        self.prepare_s = time.monotonic() - t0
        self.members: list[Member] = []
        self.clients: list[Client] = []
        self.failed_starts = 0
        self.last_failure = ""
        self.last_handout = 0.0
        self.handed_out = 0
        self.stopping = False
        self.sel = selectors.DefaultSelector()
        self.listener = self._listen(listen)
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self._signalled)

    @staticmethod
    def _listen(path: str) -> socket.socket:
        from stratopy import files

        try:
            # a stale socket of an earlier server goes; a live server or a
            # file of another kind stays (the rename below would replace it)
            files.free_socket_path(path)
        except OSError as e:
            raise ConfigError("-listen", f"cannot listen on {path}: {e.strerror}") from None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # bound and listening under another name, then renamed: the path
        # never names a socket that refuses connections
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            s.bind(tmp)
            # whoever can connect can ask for clones (and name files the
            # server opens for them): the owner only, whatever the umask
            os.chmod(tmp, 0o600)
            s.listen(128)
            os.rename(tmp, path)
        except OSError as e:
            s.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ConfigError("-listen", f"cannot listen on {path}: {e.strerror}") from None
        s.setblocking(False)
        return s

    # --- the pool --------------------------------------------------------------
    def _inherited(self) -> list[int]:
        fds = [self.listener.fileno(), self.wake_r, self.wake_w, self.sel.fileno()]
        fds += [m.chan.fileno() for m in self.members]
        fds += [c.conn.fileno() for c in self.clients]
        fds += [fd for c in self.clients for fd in c.reader.fds]
        fds += [fd for c in self.clients if c.head is not None for fd in c.head[1]]
        return fds

    def _spawn(self, low: bool) -> None:
        from stratopy.tplserver import member

        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        inherited = self._inherited() + [parent.fileno()]
        # what the server made since the last fork joins the frozen heap: a
        # member's collections then never walk (and write) inherited objects
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            member.run(child, self.prepared, self.pool_config, inherited, self.template, low)
        child.close()
        parent.setblocking(False)
        m = Member(pid, parent)
        m.low = low
        self.members.append(m)
        self.sel.register(parent, selectors.EVENT_READ, lambda m=m: self._member_readable(m))

    def refill(self) -> None:
        """Restores compete for the host's CPUs with the clones just handed
        out (measured: 20 members restoring at once made 20 concurrent
        requests wait 200 ms for their first KVM_RUN): at most RESTORE_JOBS
        members restore at a time, and none starts while requests are being
        served or for REFILL_HOLDOFF after the last hand-out, unless the
        requests waiting outnumber the members that could serve them.
        Refills after the first fill restore under SCHED_IDLE, so they take
        only CPU no clone wants; such a restore may crawl on a busy host, so
        a request waiting for a member does not count on one: it gets a
        restore at normal priority."""
        if self.stopping or self.failed_starts >= MAX_FAILED_STARTS:
            return
        idle = [m for m in self.members if m.client is None]
        restoring = [m for m in idle if not m.ready]
        urgent = [m for m in restoring if not m.low]
        ready = len(idle) - len(restoring)
        busy = (any(m.client is not None for m in self.members)
                or time.monotonic() - self.last_handout < REFILL_HOLDOFF)
        need = len(self._waiting()) - ready - len(urgent)
        if busy and need <= 0:
            return
        low = need <= 0 and self.handed_out > 0
        room = RESTORE_JOBS - (len(restoring) if low else len(urgent))
        for _ in range(min(room, max(self.pool_size - len(idle), need))):
            self._spawn(low)

    def _drop_member(self, m: Member) -> None:
        self.members.remove(m)
        self.sel.unregister(m.chan)
        m.chan.close()
        m.reader.close()

    def _member_readable(self, m: Member) -> None:
        try:
            m.reader.feed()
            got = m.reader.line()
        except wire.WireError as e:
            got, m.reader.eof = None, True
            self.last_failure = str(e)
        while got is not None:
            msg, fds = got
            if "gone" in msg or "back" in msg:
                # the member answered the request itself (or left it to us)
                self._given_back(m, msg, fds)
                if "gone" in msg:
                    self.last_handout = time.monotonic()
                    self.handed_out += 1
                    self._drop_member(m)     # a clone now (or failed): no longer ours
                    return
            else:
                wire.close_fds(fds)
            if "ready" in msg and not m.ready:
                m.ready = True
                self.failed_starts = 0
            elif "error" in msg:
                self.last_failure = msg["error"].get("desc", "")
            got = m.reader.line()
        if m.reader.eof:
            if not m.ready:
                self.failed_starts += 1
                print(f"stratopy-server: a pool member failed to restore: "
                      f"{self.last_failure or 'it died'}", file=sys.stderr, flush=True)
            c = m.client
            if c is not None:
                self._reply(c, wire.error("the pool member died before it started"))
                self._given_back(m, {}, [])
            self._drop_member(m)         # died: refill() replaces it

    # --- clients -----------------------------------------------------------------
    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self.clients) >= MAX_CLIENTS:
            self._send(conn, wire.error(f"more than {MAX_CLIENTS} connections"))
            conn.close()
            return
        conn.setblocking(False)
        c = Client(conn)
        self.clients.append(c)
        self._peek(c)

    def _peek(self, c: Client) -> None:
        """A new connection, not read: a request goes to a member as it is
        (dispatch), a query-pool is the server's to read and answer (handed
        to a member, it would cost it CPU and dirty its pages). Told apart by
        a look at the bytes waiting (MSG_PEEK), not parsed: what names
        query-pool (or is EOF) is read here, the rest goes on; a member that
        finds a query-pool after all gives it back unanswered."""
        try:
            data = c.conn.recv(4096, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            c.wants = False                   # nothing yet: look again when readable
            self._watch(c)
            return
        except OSError:
            data = b""
        c.fresh = False
        self._unwatch(c)
        if b"query-pool" in data or not data:
            c.wants = False                   # read here (EOF: closed here)
            self._watch(c)
            self._client_readable(c)
        else:
            c.wants, c.since = True, time.monotonic()

    def _watch(self, c: Client) -> None:
        if not c.registered:
            c.conn.setblocking(False)
            self.sel.register(c.conn, selectors.EVENT_READ, lambda c=c: self._client_readable(c))
            c.registered = True

    def _unwatch(self, c: Client) -> None:
        if c.registered:
            self.sel.unregister(c.conn)
            c.registered = False

    def _client_readable(self, c: Client) -> None:
        if c.fresh:
            self._peek(c)
            return
        try:
            c.reader.feed()
        except wire.WireError as e:
            self._reply(c, wire.error(str(e)))
        self._client_lines(c)

    def _client_lines(self, c: Client) -> None:
        """Answer what the server answers itself (query-pool, framing errors);
        stop at the first request for a member, which waits in ``head``."""
        while c.head is None and c in self.clients:
            try:
                got = c.reader.line()
            except wire.WireError as e:
                self._reply(c, wire.error(str(e)))
                continue
            if got is None:
                break
            msg, fds = got
            if msg.get("execute") == "query-pool":
                wire.close_fds(fds)
                self._reply(c, _with_id({"return": self.query_pool()}, msg.get("id")))
                continue
            c.head, c.since, c.wants = (msg, fds), time.monotonic(), True
            self._unwatch(c)          # read no more until a member takes it
        if c.reader.eof and c.head is None and c in self.clients:
            self._close_client(c)

    def _handoff(self, c: Client, m: Member) -> bool:
        """Give ``c``'s connection, with what was read from it and not
        answered, to ``m``; the server keeps its own copy, unwatched, to
        answer if the member dies holding it."""
        head = b""
        fds: list[int] = []
        if c.head is not None:
            head, fds = wire.encode(c.head[0]), c.head[1]
        rest, more = c.reader.take()
        fds = fds + more
        buf = head + rest
        try:
            wire.send(m.chan, {"conn": {"buf": wire.pack(buf)}}, [c.conn.fileno()] + fds)
        except OSError:
            c.reader = wire.Reader(c.conn, buf, fds)
            return False
        wire.close_fds(fds)                  # the member has its own copies
        c.head, c.wants = None, False
        self._unwatch(c)
        c.member, m.client = m, c
        return True

    def _given_back(self, m: Member, msg: dict, fds: list[int]) -> None:
        """A member is done with a connection: it answered the request (a
        clone, or an error line) or left it to the server (a query-pool,
        nothing complete read in time); what it did not consume comes back."""
        c, m.client = m.client, None
        if c is None or c not in self.clients:
            wire.close_fds(fds)
            return
        c.member = None
        try:
            buf = wire.unpack("buf", (msg.get("back") or msg.get("gone") or {}).get("buf", ""))
        except wire.WireError:
            buf = b""
        c.reader = wire.Reader(c.conn, buf, fds)
        self._watch(c)
        self._client_lines(c)

    def _close_client(self, c: Client) -> None:
        if c in self.clients:
            self.clients.remove(c)
            self._unwatch(c)
            c.conn.close()
            c.reader.close()
            if c.head is not None:
                wire.close_fds(c.head[1])
                c.head = None
        if c.member is not None:
            c.member.client = None
            c.member = None

    @staticmethod
    def _send(conn: socket.socket, obj: dict) -> bool:
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)        # a client that does not read cannot hold us
            wire.send(conn, obj)
            return True
        except OSError:
            return False
        finally:
            try:
                conn.setblocking(False)
            except OSError:
                pass

    def _reply(self, c: Client, obj: dict) -> None:
        if c in self.clients and not self._send(c.conn, obj):
            self._close_client(c)

    def _waiting(self) -> list:
        return [c for c in self.clients if c.wants and c.member is None]

    def dispatch(self) -> None:
        now = time.monotonic()
        for c in self._waiting():
            if c not in self.clients or not c.wants:
                continue
            ready = next((m for m in self.members if m.ready and m.client is None), None)
            if ready is not None:
                if not self._handoff(c, ready):
                    self._drop_member(ready)
                continue
            if c.head is None:
                # no member for it: read it here (a query-pool is answered
                # at once; a request waits in head for a member)
                c.wants = False
                self._watch(c)
                continue
            why = None
            if self.wait == 0:
                why = "the pool is empty (-wait 0: no waiting for a member to restore)"
            elif self.failed_starts >= MAX_FAILED_STARTS:
                why = ("the pool is empty and cannot grow: pool members fail to restore"
                       + (f" ({self.last_failure})" if self.last_failure else ""))
            elif now - c.since > self.wait:
                why = f"no pool member was ready within {self.wait * 1000:.0f} ms"
            if why is not None:
                msg, fds = c.head
                c.head, c.wants = None, False
                wire.close_fds(fds)
                self._reply(c, _with_id(wire.error(why), msg.get("id")))
                if c in self.clients:
                    self._watch(c)
                    self._client_lines(c)
        if self._waiting():
            self.refill()        # requests wait: a member must be restoring for them

    def query_pool(self) -> dict:
        """``query-pool``: the pids of ready and still restoring members."""
        return {"ready": [m.pid for m in self.members if m.ready and m.client is None],
                "restoring": [m.pid for m in self.members if not m.ready],
                "size": self.pool_size}

    # --- loop ------------------------------------------------------------------
    def _signalled(self) -> None:
        try:
            data = os.read(self.wake_r, 64)
        except BlockingIOError:
            return
        if any(s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) for s in data):
            self.stopping = True

    @staticmethod
    def reap() -> None:
        """Handed-out clones and dead members: never waited for, only reaped."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def serve(self) -> int:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(s, lambda *_: None)
        preload(self.template.machine_type)
        gc.freeze()            # what the members inherit stays shared (no gc writes)
        print(f"stratopy-server: template {self.template.incoming.path} checked in "
              f"{self.prepare_s * 1000:.1f} ms; pool of {self.pool_size} on {self.path}",
              file=sys.stderr, flush=True)
        try:
            while not self.stopping:
                self.refill()
                idle = sum(1 for m in self.members if m.client is None)
                # short naps while a refill is deferred or requests wait
                nap = 0.01 if self._waiting() or idle < self.pool_size else 0.5
                for key, _ in self.sel.select(timeout=nap):
                    key.data()
                self.reap()
                self.dispatch()
        finally:
            self.stop()
        return 0

    def stop(self) -> None:
        """The socket goes, idle members are ended; handed-out clones run on."""
        self.stopping = True
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self.listener.close()
        for c in self._waiting():
            if c.head is not None:
                self._reply(c, _with_id(wire.error("the server is stopping"), c.head[0].get("id")))
        for c in list(self.clients):
            self._close_client(c)
        idle = [m for m in self.members if m.client is None]
        for m in list(self.members):
            if m.client is not None:      # being handed out: it runs on
                self._drop_member(m)
        for m in idle:
            try:
                os.kill(m.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._drop_member(m)
        deadline = time.monotonic() + 5.0
        for m in idle:
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(m.pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.005)
        self.reap()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"], ["-help"]):
        print(USAGE)
        return 0
    try:
        listen, pool, wait, config = parse_server_args(argv)
        server = Server(listen, pool, wait, config)
    except StratoError as e:
        print(f"stratopy-server: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return server.serve()


if __name__ == "__main__":
    sys.exit(main())
