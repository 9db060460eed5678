"""A pool member: the child the server forks, which becomes one clone.

Life of a member (its own process, its own session):

1. restore: a MicroVm of the template's command line without per-VM parts
   (no serial chardev, no QMP) is built from the template the server
   already opened and validated (builder.build_from_template, ``verify=done``):
   KVM VM, memory mapped copy-on-write, vCPUs created and their state set,
   devices restored. Then one line to the server: ``{"ready": PID}``.
2. wait: blocked in recvmsg on its channel to the server, vCPUs not
   running. EOF (the server stopped or died) ends it.
3. the request (forwarded by the server with its fds): its drives, serial
   and QMP are opened and attached (MicroVm.attach_clone_parts); one line
   back, ``{"return": {"pid": PID}}`` or an error, then the channel closes.
4. run: stratopy.cli.run_clone, the CLI's own path after a restore (QMP
   listeners, seccomp filter, vCPU start, device loop): from there on it
   is an ordinary stratopy VM; its exit code is the process's.

Errors never reach the server except as the one reply line: every path
ends in os._exit (a forked child must not run the server's cleanup).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from stratopy.tplserver import request, wire


def run(chan: socket.socket, prepared, pool_config, inherited_fds, template_config) -> None:
    """The child's whole life (never returns)."""
    code = 1
    try:
        code = _member(chan, prepared, pool_config, inherited_fds, template_config)
    except BaseException as e:                   # noqa: BLE001 - the last resort of a child
        try:
            print(f"stratopy-server: pool member {os.getpid()}: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        except BaseException:                    # noqa: BLE001
            pass
    finally:
        os._exit(code)


def _member(chan, prepared, pool_config, inherited_fds, template_config) -> int:
    from stratopy import builder
    from stratopy.errors import StratoError

    # Its own session: a signal to the server's terminal or process group
    # does not reach the clones, which outlive the server.
    os.setsid()
    signal.set_wakeup_fd(-1)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(s, signal.SIG_DFL)
    wire.close_fds(inherited_fds)
    chan.setblocking(True)
    t0 = time.monotonic()
    try:
        machine = builder.create_machine(pool_config)
    except StratoError as e:
        _reply(chan, wire.error(f"restore failed: {e}"))
        return 1
    # the template's taps and console chardevs are the request's to give
    machine.deferred_backends = frozenset(
        [nd.id for nd in pool_config.netdevs] + list(request.console_chardevs(pool_config)))
    try:
        builder.build_from_template(machine, prepared)
    except StratoError as e:
        _reply(chan, wire.error(f"restore failed: {e}"))
        machine.teardown()
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
        wire.send(chan, {"ready": os.getpid(),
                         "restore_ms": round((time.monotonic() - t0) * 1000, 3)})
    except OSError:
        machine.teardown()              # the server is gone already
        return 0
    reader = wire.Reader(chan)
    got = None
    while got is None:
        reader.feed()
        got = reader.line()
        if got is None and reader.eof:
            machine.teardown()          # the server stopped: an idle member goes
            return 0
    msg, fds = got
    try:
        parts = request.parse(msg, len(fds), template_config)
        _attach(machine, parts, fds, msg)
    except (StratoError, request.RequestError) as e:
        _reply(chan, wire.error(str(e)))
        machine.teardown()
        return 1
    _reply(chan, {"return": {"pid": os.getpid()}})
    chan.close()
    from stratopy import cli

    return cli.run_clone(machine)


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
