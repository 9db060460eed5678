"""The machine's side of QMP: VmControl on the device thread, and wiring.

The QMP server runs its own thread and only posts requests: ``dispatch(fn)``
runs ``fn`` on the device thread (EventLoop.call) and waits for it. Every
method here therefore runs on the device thread and may touch machine state.
"""

from __future__ import annotations

import logging

from stratopy.errors import MigrationError, QmpError
from stratopy.qmp import commands as qmpcmd
from stratopy.qmp import events as qmpev

log = logging.getLogger(__name__)


class MachineControl:
    """Implements stratopy.qmp.commands.VmControl for a MicroVm."""

    def __init__(self, machine):
        self.m = machine
        self.fds: dict[str, int] = {}

    # --- run state ------------------------------------------------------------
    def query_status(self) -> dict:
        from stratopy.machine.microvm import VmState

        st = self.m.state
        status = {VmState.RUNNING: "running", VmState.PAUSED: "paused",
                  VmState.CREATED: "prelaunch", VmState.SHUTDOWN: "shutdown"}[st]
        return {"running": st is VmState.RUNNING, "singlestep": False, "status": status}

    def stop(self) -> None:
        from stratopy.machine.microvm import VmState

        if self.m.state is not VmState.RUNNING:
            raise QmpError(f"VM is already {self.m.state.value}" if self.m.state is VmState.PAUSED
                           else f"VM is {self.m.state.value}")
        self.m.pause()

    def cont(self) -> None:
        from stratopy.machine.microvm import VmState

        if self.m.state is not VmState.PAUSED:
            raise QmpError("VM is already running" if self.m.state is VmState.RUNNING
                           else f"VM is {self.m.state.value}")
        self.m.resume()

    def quit(self) -> None:
        self.m.request_shutdown(qmpev.HOST_QMP_QUIT, guest=False, code=0)

    def system_reset(self) -> None:
        # A microvm has no reset path: StratoVirt ends the VM.
        self.m.request_shutdown(qmpev.HOST_QMP_SYSTEM_RESET, guest=False, code=0)

    def system_powerdown(self) -> None:
        self.m.request_shutdown("host-qmp-system-powerdown", guest=False, code=0)

    def query_cpus(self) -> list:
        from stratopy.machine.microvm import VmState

        halted = self.m.state is not VmState.RUNNING
        out = []
        for r in self.m.runners:
            tid = r.thread.native_id or 0
            out.append(qmpcmd.cpu_info(r.vcpu.index, tid, props=qmpcmd.cpu_props(core_id=r.vcpu.index),
                                       halted=halted, current=r.vcpu.index == 0))
        return out

    def query_hotpluggable_cpus(self) -> list:
        n = self.m.config.cpus
        return [qmpcmd.hotpluggable_cpu(i, present=i < n, props=qmpcmd.cpu_props(core_id=i))
                for i in range(max(self.m.config.max_cpus, n))]

    # --- migration --------------------------------------------------------------
    def migrate(self, uri: str) -> None:
        from stratopy.migration.snapshot import take_template

        try:
            take_template(self.m, uri)
        except MigrationError as e:
            raise QmpError(str(e)) from None

    def query_migrate(self) -> dict:
        return self.m.migration.query()

    def migrate_cancel(self) -> None:
        # Templates are written synchronously on the device thread: by the time
        # this request runs, no migration is in progress. Nothing to cancel.
        return None

    # --- hot-replace (issue: microvm hot-replace) ---------------------------------
    def blockdev_add(self, **args) -> None:
        raise QmpError("blockdev-add: hot-replace is not implemented yet")

    def netdev_add(self, **args) -> None:
        raise QmpError("netdev_add: hot-replace is not implemented yet")

    def device_add(self, **args) -> None:
        raise QmpError("device_add: hot-replace is not implemented yet")

    def device_del(self, id: str) -> None:  # noqa: A002
        if self.m.config.device(id) is None:
            raise QmpError(f"Failed to find device {id}", "DeviceNotFound")
        raise QmpError("device_del: hot-replace is not implemented yet")

    def getfd(self, fdname: str, fd: int) -> None:
        import os

        old = self.fds.pop(fdname, None)
        if old is not None:
            os.close(old)
        self.fds[fdname] = fd


class Control:
    """Owns the QMP servers of a machine; closes them at exit."""

    def __init__(self, machine, servers: list):
        self.machine = machine
        self.servers = servers

    def close(self) -> None:
        for s in self.servers:
            try:
                s.flush(2.0)
            except Exception:
                pass
            s.close()


def attach_control(machine) -> Control:
    """Create the QMP listeners and route the machine's events to them."""
    from stratopy.qmp.server import QmpServer, TcpListener, UnixListener

    vmc = MachineControl(machine)
    servers = []
    if machine.config.qmp:
        listeners = [UnixListener(q.path) if q.kind == "unix" else TcpListener(q.host, q.port)
                     for q in machine.config.qmp]
        server = QmpServer(listeners, lambda fn: machine.loop.call(fn, timeout=600), vm=vmc)
        server.start()
        servers.append(server)
        machine.event_sink = server.emit_event
    return Control(machine, servers)
