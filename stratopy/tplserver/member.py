"""A pool member: the child the server forks, which becomes one clone.

Life of a member (its own process, its own session):

1. restore: a machine of the template's command line (a MicroVm, or a
   Q35Vm: its PCI side is restored per member too) without per-VM parts
   (no serial chardev, no QMP) is built from the template the server
   already opened and validated (builder.build_from_template, ``verify=done``):
   KVM VM, memory mapped copy-on-write, vCPUs created and their state set,
   devices restored; then a request's path is run once on a made-up request
   (_warm). A refill does both under SCHED_IDLE (idle_thread). Then what
   the clone's start needs that depends only on the template: its vCPU
   threads (held), its seccomp filter, its signal handlers and logging
   (cli.prepare_clone). One line to the server: ``{"ready": PID}``.
2. wait: blocked in recvmsg on its channel to the server, vCPUs not
   running. EOF (the server stopped or died) ends it.
3. a client's connection, handed over by the server unread (``{"conn":
   {"buf": ...}}`` with the connection's fd, then the fds read with
   ``buf``, if the server read any): the member reads the request from it
   and answers it itself. A request it cannot serve gets its one error
   line and the member stays in the pool (``{"back": ...}`` to the server,
   with what it did not consume); a query-pool goes back unanswered (the
   server knows the pool). A clone request: its drives, serial and QMP are
   opened and attached (attach_clone_parts; Q35Vm's is MicroVm's),
   ``{"return": {"pid": PID}}`` to the client and ``{"gone": ...}`` to the server once its
   vCPUs are released (cli.run_clone's ``started``), and the member is a
   clone.
4. run: stratopy.cli.run_clone, the CLI's path from a restore on (QMP
   listeners, vCPU start, device loop): from there on it is an ordinary
   stratopy VM; its exit code is the process's.

Errors never reach the server except as those lines: every path ends in
os._exit (a forked child must not run the server's cleanup).
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import threading
import time

from stratopy.errors import StratoError
from stratopy.tplserver import request, wire

REQUEST_WAIT = 1.0       # s a handed connection may take to bring its request


def run(chan: socket.socket, prepared, pool_config, inherited_fds, template_config,
        idle: bool = False) -> None:
    """The child's whole life (never returns)."""
    code = 1
    try:
        code = _member(chan, prepared, pool_config, inherited_fds, template_config, idle)
    except BaseException as e:                   # noqa: BLE001 - the last resort of a child
        try:
            print(f"stratopy-server: pool member {os.getpid()}: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        except BaseException:                    # noqa: BLE001
            pass
    finally:
        os._exit(code)


def idle_thread(fn):
    """``fn()`` in a thread of its own under SCHED_IDLE (its result, or its
    exception raised here): a refill's restore then takes only CPU that
    nothing else wants, never a clone's being started. An unprivileged
    process may enter SCHED_IDLE but not leave it (leaving needs RLIMIT_NICE
    to allow nice 0, and it is 0 by default: sched(7)), so the policy goes
    with a throwaway thread: the member's main thread, and the vCPU threads
    it creates later, stay SCHED_OTHER."""
    out: dict = {}

    def body() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass                 # not allowed here: the restore runs at normal priority
        try:
            out["result"] = fn()
        except BaseException as e:               # noqa: BLE001 - re-raised in the caller
            out["error"] = e
    t = threading.Thread(target=body, name="restore")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("result")


def _member(chan, prepared, pool_config, inherited_fds, template_config, idle) -> int:
    from stratopy import builder, cli

    # Its own session: a signal to the server's terminal or process group
    # does not reach the clones, which outlive the server.
    os.setsid()
    signal.set_wakeup_fd(-1)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(s, signal.SIG_DFL)
    wire.close_fds(inherited_fds)
    chan.setblocking(True)
    t0 = time.monotonic()

    def restore():
        machine = builder.create_machine(pool_config)
        # the template's taps and console chardevs are the request's to give
        machine.deferred_backends = frozenset(
            [nd.id for nd in pool_config.netdevs] + list(request.console_chardevs(pool_config)))
        try:
            builder.build_from_template(machine, prepared)
        except BaseException:
            machine.teardown()
            raise
        _warm(machine, template_config)
        return machine
    try:
        machine = idle_thread(restore) if idle else restore()
    except StratoError as e:
        _reply(chan, wire.error(f"restore failed: {e}"))
        return 1
    # What the clone's start would do first, done while it waits: its vCPU
    # threads, held before their first KVM_RUN, and its seccomp filter. The
    # filter goes in before the request: attaching the request's parts
    # (opening drives, chardevs, QMP listeners) uses only calls it allows,
    # and the clone's start then finds the process jailed already.
    machine.prestart_vcpus()
    if not pool_config.disable_seccomp:
        from stratopy import seccomp

        seccomp.install()
    try:
        signals = cli.prepare_clone(pool_config)
    except StratoError as e:
        _reply(chan, wire.error(f"restore failed: {e}"))
        machine.teardown()
        return 1
    # what the restore made stays where it is: a collection while the
    # member waits or the clone starts does not walk (and write) it
    gc.freeze()
    try:
        try:
            wire.send(chan, {"ready": os.getpid(),
                             "restore_ms": round((time.monotonic() - t0) * 1000, 3)})
        except OSError:
            return _end(machine, signals, 0)        # the server is gone already
        reader = wire.Reader(chan, max_line=wire.CHAN_LINE, max_fds=wire.CHAN_FDS)
        while True:
            sock = _next_connection(reader)
            if sock is None:
                return _end(machine, signals, 0)  # the server stopped: an idle member goes
            code = _serve(chan, machine, sock[0], sock[1], template_config, signals)
            if code is not None:
                return code
    except cli.Terminated:
        return _end(machine, signals, 0)


def _end(machine, signals, code: int) -> int:
    machine.teardown()
    signals.close()
    return code


def _next_connection(reader: wire.Reader):
    """(the connection, its Reader with what the server read of it) from
    the next ``conn`` message on the channel; None at EOF."""
    while True:
        got = None
        while got is None:
            reader.feed()
            got = reader.line()
            if got is None and reader.eof:
                return None
        msg, fds = got
        conn = msg.get("conn")
        if not isinstance(conn, dict) or not fds:
            wire.close_fds(fds)
            continue
        try:
            buf = wire.unpack("conn.buf", conn.get("buf", ""))
        except wire.WireError:
            buf = b""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fds[0])
        return sock, wire.Reader(sock, buf, fds[1:])


def _warm(machine, template_config) -> None:
    """A request's path, run once on a made-up request between two
    socketpairs: the channel message with an fd, the request read, parsed
    and checked, a stdio chardev opened and closed, the clone's config and
    control object made (and dropped), the reply's JSON; not what changes
    the machine. The first run after fork()
    writes the pages it touches (reference counts, the interpreter's inline
    caches, allocator pools: copy-on-write faults of ~5-10 us each under
    PVM); run here, while the member is not yet in the pool, a request finds
    most of them written (docs/performance.md, "20 concurrent requests")."""
    c1, c2 = socket.socketpair()
    k1, k2 = socket.socketpair()
    try:
        wire.send(c2, {"conn": {"buf": ""}}, [k1.fileno()])
        got = _next_connection(wire.Reader(c1, max_line=wire.CHAN_LINE, max_fds=wire.CHAN_FDS))
        if got is None:
            return
        sock, reader = got
        with sock:
            args: dict = {"serial": {"fd": 0}, "qmp": {"kind": "unix", "path": "/warm"},
                          "drives": [{"id": d.id, "file": d.file}
                                     for d in template_config.drives],
                          "netdevs": [{"id": nd.id, "ifname": "warm0"}
                                      for nd in template_config.netdevs]}
            wire.send(k2, {"execute": "clone", "arguments": args, "id": 0}, [k2.fileno()])
            got = _read_request(sock, reader)
            if got is not None:
                msg, fds = got
                wire.close_fds(fds)
                try:
                    parts = request.parse(msg, len(fds), template_config)
                    _warm_start(machine, parts, k1.fileno())
                except (StratoError, request.RequestError):
                    pass          # only a warm-up
                _answer(sock, {"return": {"pid": os.getpid()}}, msg.get("id"))
            wire.close_fds(reader.take()[1])
    except (OSError, wire.WireError):
        pass                      # only a warm-up: the request runs it for real
    finally:
        for s in (c1, c2, k1, k2):
            s.close()


def _warm_start(machine, parts, fd: int) -> None:
    from stratopy import files
    from stratopy.chardev import Chardev
    from stratopy.machine.control import MachineControl

    ch = Chardev(parts.serial, stdin_fd=fd, stdout_fd=fd)
    ch.open()
    ch.close()
    machine.config.replace(serial=parts.serial, qmp=parts.qmp)
    MachineControl(machine)
    if machine.config.drives:
        files.check_drives(machine.config.drives)


def _read_request(conn: socket.socket, reader: wire.Reader):
    """The first line on the connection, waiting up to REQUEST_WAIT for it;
    None if it does not come (or the client went); WireError if it is not
    a JSON object."""
    conn.setblocking(False)
    deadline = time.monotonic() + REQUEST_WAIT
    got = reader.line()
    while got is None and not reader.eof:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([conn], [], [], left)[0]:
            return None
        reader.feed()
        got = reader.line()
    return got


def _hand_back(chan, reader: wire.Reader, key: str) -> None:
    """The connection goes back to the server (``back``: the member stays
    in the pool; ``gone``: it is a clone now, or failed), with what was read
    from it and not consumed."""
    rest, fds = reader.take()
    try:
        wire.send(chan, {key: {"buf": wire.pack(rest)}}, fds)
    except OSError:
        pass                 # the server is gone: it has nothing to give back to
    wire.close_fds(fds)


def _answer(conn: socket.socket, obj: dict, request_id=None) -> None:
    if request_id is not None:
        obj = dict(obj, id=request_id)
    try:
        conn.settimeout(1.0)     # a client that does not read cannot hold the member
        wire.send(conn, obj)
    except OSError:
        pass


def _stay(chan, reader: wire.Reader, conn, reply: dict | None = None, request_id=None) -> None:
    """The member stays in the pool: the connection goes back to the server
    first (so the pool counts this member again before the client, answered,
    can ask anew), then the one reply line, if any."""
    _hand_back(chan, reader, "back")
    if reply is not None:
        _answer(conn, reply, request_id)
    conn.close()


def _serve(chan, machine, conn, reader, template_config, signals):
    """One handed connection: None if the member stays in the pool, else
    the clone's exit code."""
    try:
        got = _read_request(conn, reader)
    except wire.WireError as e:
        return _stay(chan, reader, conn, wire.error(str(e)))
    if got is None:
        return _stay(chan, reader, conn)     # nothing complete in time: the server reads on
    msg, fds = got
    if msg.get("execute") == "query-pool":
        reader.buf[:0] = wire.encode(msg)    # the server answers it
        reader.fds[:0] = fds
        return _stay(chan, reader, conn)
    try:
        parts = request.parse(msg, len(fds), template_config)
    except request.RequestError as e:
        wire.close_fds(fds)
        return _stay(chan, reader, conn, wire.error(str(e)), msg.get("id"))

    def started(error) -> None:
        # called once the vCPUs are released: the client and the server
        # these lines wake do not run before the guest does
        _answer(conn, {"return": {"pid": os.getpid()}} if error is None else wire.error(error),
                msg.get("id"))
        _hand_back(chan, reader, "gone")
        conn.close()
        chan.close()
    try:
        _attach(machine, parts, fds, msg)
    except StratoError as e:
        started(str(e))
        machine.teardown()
        signals.close()
        return 1
    from stratopy import cli

    return cli.run_clone(machine, signals, started)


def _reply(chan, obj: dict) -> None:
    try:
        wire.send(chan, obj)
    except OSError:
        pass


def _attach(machine, parts, fds: list[int], msg: dict) -> None:
    """Open the request's parts and give them to the restored machine; the
    machine's config then says what this clone is (its QMP, its serial,
    its drives), as a command line would have."""
    from stratopy.chardev import Chardev
    from stratopy.machine import devices as devfactory

    def fd_path(file: str) -> str:
        # a drive sent as an fd is reopened with the template drive's flags
        return f"/proc/self/fd/{fds[int(file[3:])]}" if file.startswith("fd:") else file

    def open_chardev(cfg, pair):
        i, o = pair
        ch = Chardev(cfg, stdin_fd=fds[i], stdout_fd=fds[o]) if i is not None else Chardev(cfg)
        opened.append(ch)
        ch.open()
        return ch

    drives = {i: d.replace(file=fd_path(d.file)) for i, d in parts.drives.items()}
    # a tap sent as fds is adopted (the Tap owns fds[n]; the extra queues
    # are checked, detached and closed by open_tap)
    netdevs = {i: nd if nd.fd is None else
               nd.replace(fd=fds[nd.fd], extra_fds=tuple(fds[n] for n in nd.extra_fds))
               for i, nd in parts.netdevs.items()}
    kept = {n for nd in parts.netdevs.values() if nd.fd is not None
            for n in (nd.fd, *nd.extra_fds)}
    backends: dict = {}
    taps: dict = {}
    opened: list = []
    chardev = None
    try:
        for drive_id, d in drives.items():
            backends[drive_id] = devfactory.open_drive(d, option=f"drive '{drive_id}'")
        for nd_id, nd in netdevs.items():
            taps[nd_id] = devfactory.open_tap(nd)
        consoles = {ch_id: open_chardev(cfg, pair)
                    for ch_id, (cfg, pair) in parts.consoles.items()}
        if parts.serial is not None:
            chardev = open_chardev(parts.serial, parts.serial_fds)
        machine.attach_clone_parts(chardev, backends, taps, consoles)
    except BaseException:
        for b in list(backends.values()) + list(taps.values()):
            if machine.slots and any(s.backend is b for s in machine.slots):
                continue
            b.close()
        for ch in opened:
            if ch not in machine.chardevs:
                ch.close()
        raise                            # the member ends: its fds go with it
    # the fds that became drives were reopened: the received ones go
    used = {parts.serial_fds[0], parts.serial_fds[1]} | kept
    for _, pair in parts.consoles.values():
        used |= set(pair)
    wire.close_fds(fd for n, fd in enumerate(fds) if n not in used)
    c = machine.config
    # as a command line would say it: fd= the clone's own fd of its tap
    named = {i: nd.replace(extra_fds=()) for i, nd in netdevs.items()}
    chs = {ch_id: cfg for ch_id, (cfg, _) in parts.consoles.items()}

    def own(d):
        if d.netdev is not None and d.netdev.id in named:
            return d.replace(netdev=named[d.netdev.id])
        if d.chardev is not None and d.chardev.id in chs:
            return d.replace(chardev=chs[d.chardev.id])
        return d
    kw = {"serial": parts.serial, "qmp": parts.qmp,
          "drives": tuple(drives.get(d.id, d) for d in c.drives),
          "netdevs": tuple(named.get(nd.id, nd) for nd in c.netdevs),
          "chardevs": tuple(chs.get(ch.id, ch) for ch in c.chardevs),
          "devices": tuple(own(d) for d in c.devices)}
    if parts.name is not None:
        kw["name"] = parts.name
    machine.config = c.replace(**kw)
