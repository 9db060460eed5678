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
        self.reader = wire.Reader(chan)
        self.ready = False
        self.client: Client | None = None       # whose request it is serving
        self.request_id = None                   # that request's "id", echoed


class Client:
    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.reader = wire.Reader(conn)


class Pending:
    def __init__(self, client: Client, msg: dict, fds: list[int]):
        self.client, self.msg, self.fds = client, msg, fds
        self.since = time.monotonic()


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
    if config.machine_type != "microvm":
        raise ConfigError("-machine", f"the template server serves microvm templates only "
                                      f"(a {config.machine_type} template: stratopy -incoming)")
    return listen, pool, wait_ms / 1000.0, config


def preload() -> None:
    """Import, once and before forking, what a clone runs between the request
    and its first KVM_RUN (the CLI's run path, QMP, seccomp, chardevs, the
    block backend): a clone then imports nothing on its way to running."""
    import importlib

    for name in ("stratopy.cli", "stratopy.machine.control", "stratopy.qmp.server",
                 "stratopy.qmp.commands", "stratopy.seccomp", "stratopy.chardev",
                 "stratopy.machine.devices", "stratopy.devices.virtio.block",
                 "stratopy.tplserver.member", "stratopy.files", "stratopy.daemon"):
        importlib.import_module(name)


class Server:
    def __init__(self, listen: str, pool: int, wait: float, config):
        from stratopy import builder

        self.path, self.pool_size, self.wait = listen, pool, wait
        self.template = config
        # Pool members restore without per-VM parts; the request brings them.
        self.pool_config = config.replace(serial=None, qmp=(), daemonize=False, pidfile=None)
        t0 = time.monotonic()
        self.prepared = builder.prepare_template(self.pool_config, config.incoming)
        from stratopy.migration import memfile

        op = self.prepared.opened
        memfile.verify_chunks(op.memory_fd, op.memory_path, op.record, self.prepared.ram)
        self.prepare_s = time.monotonic() - t0
        self.members: list[Member] = []
        self.clients: list[Client] = []
        self.pending: list[Pending] = []
        self.failed_starts = 0
        self.last_failure = ""
        self.last_handout = 0.0
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
        fds += [fd for p in self.pending for fd in p.fds]
        return fds

    def _spawn(self) -> None:
        from stratopy.tplserver import member

        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        inherited = self._inherited() + [parent.fileno()]
        pid = os.fork()
        if pid == 0:
            member.run(child, self.prepared, self.pool_config, inherited, self.template)
        child.close()
        parent.setblocking(False)
        m = Member(pid, parent)
        self.members.append(m)
        self.sel.register(parent, selectors.EVENT_READ, lambda m=m: self._member_readable(m))

    def refill(self) -> None:
        """Restores compete for the host's CPUs with the clones just handed
        out (measured: 20 members restoring at once made 20 concurrent
        requests wait 200 ms for their first KVM_RUN): at most RESTORE_JOBS
        members restore at a time, and none starts while requests are being
        served or for REFILL_HOLDOFF after the last hand-out, unless the
        requests waiting outnumber the members that could serve them."""
        if self.stopping or self.failed_starts >= MAX_FAILED_STARTS:
            return
        idle = [m for m in self.members if m.client is None]
        restoring = [m for m in idle if not m.ready]
        ready = len(idle) - len(restoring)
        busy = (any(m.client is not None for m in self.members)
                or time.monotonic() - self.last_handout < REFILL_HOLDOFF)
        starved = len(self.pending) > ready + len(restoring)
        if busy and not starved:
            return
        room = RESTORE_JOBS - len(restoring)
        for _ in range(min(room, self.pool_size - len(idle))):
            self._spawn()

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
            wire.close_fds(fds)
            if "ready" in msg and not m.ready:
                m.ready = True
                self.failed_starts = 0
            elif m.client is not None and ("return" in msg or "error" in msg):
                self._reply(m.client, _with_id(msg, m.request_id))
                m.client = None
                self._drop_member(m)     # handed out (or failed): no longer ours
                return
            elif "error" in msg:
                self.last_failure = msg["error"].get("desc", "")
            got = m.reader.line()
        if m.reader.eof:
            if not m.ready:
                self.failed_starts += 1
                print(f"stratopy-server: a pool member failed to restore: "
                      f"{self.last_failure or 'it died'}", file=sys.stderr, flush=True)
            if m.client is not None:
                self._reply(m.client, wire.error("the pool member died before it started"))
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
        self.sel.register(conn, selectors.EVENT_READ, lambda c=c: self._client_readable(c))

    def _client_readable(self, c: Client) -> None:
        try:
            c.reader.feed()
            while True:
                got = c.reader.line()
                if got is None:
                    break
                msg, fds = got
                if msg.get("execute") == "query-pool":
                    wire.close_fds(fds)
                    self._reply(c, _with_id({"return": self.query_pool()}, msg.get("id")))
                    continue
                try:
                    request.parse(msg, len(fds), self.template)
                except request.RequestError as e:
                    wire.close_fds(fds)
                    self._reply(c, _with_id(wire.error(str(e)), msg.get("id")))
                    continue
                self.pending.append(Pending(c, msg, fds))
        except wire.WireError as e:
            self._reply(c, wire.error(str(e)))
        if c.reader.eof:
            self._close_client(c)

    def _close_client(self, c: Client) -> None:
        if c in self.clients:
            self.clients.remove(c)
            self.sel.unregister(c.conn)
            c.conn.close()
            c.reader.close()
        for p in [p for p in self.pending if p.client is c]:
            self.pending.remove(p)
            wire.close_fds(p.fds)

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

    def dispatch(self) -> None:
        now = time.monotonic()
        for p in list(self.pending):
            ready = next((m for m in self.members if m.ready and m.client is None), None)
            if ready is not None:
                self.pending.remove(p)
                try:
                    wire.send(ready.chan, p.msg, p.fds)
                except OSError:
                    self.pending.insert(0, p)
                    self._drop_member(ready)
                    continue
                finally:
                    if p not in self.pending:
                        wire.close_fds(p.fds)      # the member has its own copies
                ready.client, ready.request_id = p.client, p.msg.get("id")
                self.last_handout = time.monotonic()
                continue
            why = None
            if self.wait == 0:
                why = "the pool is empty (-wait 0: no waiting for a member to restore)"
            elif self.failed_starts >= MAX_FAILED_STARTS:
                why = ("the pool is empty and cannot grow: pool members fail to restore"
                       + (f" ({self.last_failure})" if self.last_failure else ""))
            elif now - p.since > self.wait:
                why = f"no pool member was ready within {self.wait * 1000:.0f} ms"
            if why is not None:
                self.pending.remove(p)
                wire.close_fds(p.fds)
                self._reply(p.client, _with_id(wire.error(why), p.msg.get("id")))
        if self.pending:
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
        preload()
        gc.freeze()            # what the members inherit stays shared (no gc writes)
        print(f"stratopy-server: template {self.template.incoming.path} checked in "
              f"{self.prepare_s * 1000:.1f} ms; pool of {self.pool_size} on {self.path}",
              file=sys.stderr, flush=True)
        try:
            while not self.stopping:
                self.refill()
                idle = sum(1 for m in self.members if m.client is None)
                # short naps while a refill is deferred or requests wait
                nap = 0.01 if self.pending or idle < self.pool_size else 0.5
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
        for p in self.pending:
            wire.close_fds(p.fds)
            self._reply(p.client, wire.error("the server is stopping"))
        self.pending = []
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
