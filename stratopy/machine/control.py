"""The machine's side of QMP: VmControl on the device thread, and wiring.

The QMP server runs its own thread and only posts requests: ``dispatch(fn)``
runs ``fn`` on the device thread (EventLoop.call) and waits for it. Every
method here therefore runs on the device thread and may touch machine state.

Start-up cost: the QMP command table (``stratopy.qmp.commands``) is not
imported here; the server loads it when the first command arrives, after the
vCPUs run (see docs/performance.md).
"""

from __future__ import annotations

import os
import stat

from stratopy import config as cfgmod
from stratopy import files
from stratopy.cli_parse import MAX_BLK_SERIAL_LEN, MAX_ID_LEN, _mac
from stratopy.errors import ConfigError, MigrationError, QmpError, StratoError
from stratopy.logs import get_logger
from stratopy.machine import devices as devfactory
from stratopy.machine import slots as slotmod
from stratopy.qmp import events as qmpev

log = get_logger(__name__)



def hot_device_config(driver: str, id: str, registered: tuple, serial: str | None,
                      mac: str | None, pci: tuple | None = None):
    """QMP device_add of a blk (``cfgmod.BLK``) or net (``cfgmod.NET``)
    device on either machine: its DeviceConfig and the backend registered
    for it (``registered``: blockdev-add's (drive, backend) or netdev_add's
    (netdev, backend)); a bad serial or mac is one QmpError line."""
    ref_config, backend = registered
    if driver == cfgmod.BLK:
        if serial is not None and len(serial) > MAX_BLK_SERIAL_LEN:
            raise QmpError(f"device_add: serial is longer than {MAX_BLK_SERIAL_LEN} characters")
        return cfgmod.DeviceConfig(driver=driver, id=id, drive=ref_config, serial=serial,
                                   pci=pci), backend
    if mac is not None:
        try:
            mac = _mac(mac)
        except ConfigError as e:
            raise QmpError(f"device_add: {e.reason}") from None
    return cfgmod.DeviceConfig(driver=driver, id=id, netdev=ref_config, mac=mac, pci=pci), backend

class MachineControl:
    """Implements stratopy.qmp.commands.VmControl for a MicroVm."""

    def __init__(self, machine):
        self.m = machine
        # backends registered by blockdev-add / netdev_add, not bound yet:
        # name -> (DriveConfig, FileBackend) / (NetdevConfig, Tap)
        self.drives: dict[str, tuple] = {}
        self.netdevs: dict[str, tuple] = {}
        # nodes whose device device_del removed (file closed then): in QEMU's
        # model they live until blockdev-del, which Kata sends next
        self.released_nodes: set[str] = set()

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
        # ACPI power button when the guest listens to the GED, else the end
        # of the VM at once (StratoVirt's microvm): MicroVm.request_powerdown
        self.m.request_powerdown()

    def query_vm_generation_id(self) -> dict:
        return {"guid": self.m.generation_id()}

    def query_cpus(self) -> list:
        from stratopy.machine.microvm import VmState
        from stratopy.qmp import commands as qmpcmd

        halted = self.m.state is not VmState.RUNNING
        out = []
        for r in self.m.runners:
            tid = r.thread.native_id or 0
            out.append(qmpcmd.cpu_info(r.vcpu.index, tid, props=qmpcmd.cpu_props(core_id=r.vcpu.index),
                                       halted=halted, current=r.vcpu.index == 0))
        return out

    def query_hotpluggable_cpus(self) -> list:
        from stratopy.qmp import commands as qmpcmd

        n = self.m.config.cpus
        return [qmpcmd.hotpluggable_cpu(i, present=i < n, props=qmpcmd.cpu_props(core_id=i))
                for i in range(max(self.m.config.max_cpus, n))]

    # --- balloon ------------------------------------------------------------------
    # StratoVirt (machine/src/micro_common/mod.rs, virtio/src/device/balloon.rs):
    # without a balloon device, or before its driver activated it, both
    # commands answer DeviceNotActive; balloon emits BALLOON_CHANGED at once.
    _NO_BALLOON = "No balloon device has been activated"

    def _balloon(self):
        for slot in self.m.slots:
            if slot.config is not None and slot.config.driver == cfgmod.BALLOON:
                return slot.device
        raise QmpError(self._NO_BALLOON, "DeviceNotActive")

    def balloon(self, value: int) -> None:
        if value < 0:
            raise QmpError(f"Invalid parameter 'value': {value} is negative")
        dev = self._balloon()
        # posted requests run without device_lock; the vCPUs touch the same
        # transport registers (config interrupt) under it
        with self.m.loop.device_lock:
            if not dev.activated:
                raise QmpError(self._NO_BALLOON, "DeviceNotActive")
            dev.set_target(value)
            actual = dev.guest_bytes()
        self.m.event_sink(qmpev.BALLOON_CHANGED, {"actual": actual})

    def query_balloon(self) -> dict:
        dev = self._balloon()
        with self.m.loop.device_lock:
            return {"actual": dev.guest_bytes()}

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

    # --- hot-replace -----------------------------------------------------------------
    # StratoVirt's microvm hot-replace (machine/src/micro_common/mod.rs):
    # blockdev-add / netdev_add register a backend under a name; device_add
    # binds it into one of the reserved slots (blk addr 0x0-0x3, net addr
    # 0x0-0x1, relative to the kind); device_del unbinds it (the slot's
    # device stays, empty) and emits DEVICE_DELETED. See docs/qmp.md.

    def _live_ids(self) -> set[str]:
        """Ids of the devices the machine has now (deleted ones excluded)."""
        ids = {s.config.id for s in self.m.slots if s.config is not None}
        ids |= {d.id for d in self.m.config.devices if d.driver == cfgmod.CONSOLE}
        return ids

    def _check_limit(self) -> None:
        bound = sum(1 for s in self.m.slots if s.replaceable and s.config is not None)
        if bound + len(self.drives) + len(self.netdevs) >= slotmod.RESERVED_COUNT:
            raise QmpError(f"A maximum of {slotmod.RESERVED_COUNT} replaceable devices "
                           f"(bound or waiting for device_add) are supported")

    def _check_backend_name(self, what: str, name: str) -> None:
        if not name or len(name) > MAX_ID_LEN or "\0" in name:
            raise QmpError(f"{what}: invalid id '{name[:40]}' (1 to {MAX_ID_LEN} characters)")
        if name in self.drives or name in self.netdevs:
            raise QmpError(f"{what}: {name} is already registered")
        if name in self._live_ids():
            # StratoVirt keeps one namespace for device ids and backends
            raise QmpError(f"{what}: {name} is already registered (a device has this id)")

    def _open_files(self):
        for s in self.m.slots:
            # every block device: the reserved slots' and the others (q35's
            # hot-plugged disks, a microvm's disks beyond the reserved four)
            if (s.config is not None and s.backend is not None
                    and (s.kind == "blk" or s.config.driver == cfgmod.BLK)):
                yield s.config.id, s.backend
        for name, (_, be) in self.drives.items():
            yield name, be

    def blockdev_add(self, node_name: str, file: dict, cache: dict | None = None,
                     read_only: bool | None = None, driver: str | None = None,
                     media: str | None = None, aio: str | None = None, **_ignored) -> None:
        """Register a raw file as block backend ``node_name`` (opened now)."""
        self._check_backend_name("blockdev-add", node_name)
        if file.get("driver") not in ("file", "host_device"):
            raise QmpError(f"blockdev-add: file driver '{file.get('driver')}' is not "
                           f"supported (use 'file')")
        if driver not in (None, "raw", "file"):
            raise QmpError(f"blockdev-add: format '{driver}' is not supported (only raw)")
        if media not in (None, "disk"):
            raise QmpError(f"blockdev-add: media '{media}' is not supported (only disk)")
        for engine in (aio, file.get("aio")):
            if engine not in (None, "off", "native", "io_uring", "threads"):
                raise QmpError(f"blockdev-add: aio '{engine}' is not supported")
        path = file["filename"]
        if not path:
            raise QmpError("blockdev-add: file.filename must not be empty")
        readonly = bool(read_only)
        direct = True if cache is None or cache.get("direct") is None else bool(cache["direct"])
        self._check_limit()
        try:
            st = os.stat(path)
        except OSError as e:
            raise QmpError(f"blockdev-add: cannot open {path}: {e.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise QmpError(f"blockdev-add: {path} is not a regular file or block device")
        users = []
        for other, be in self._open_files():
            try:
                users.append((other, files.identity(os.fstat(be.fd)), be.readonly))
            except OSError:
                continue
        other = files.sharing_conflict(files.identity(st), readonly, users)
        if other is not None:
            raise QmpError(f"blockdev-add: {path} is already in use by {other} "
                           f"(only read-only drives may share a file)")
        drive = cfgmod.DriveConfig(id=node_name, file=path, readonly=readonly, direct=direct,
                                   aio="native" if direct else "off")
        try:
            backend = devfactory.open_drive(drive, "blockdev-add")
        except ConfigError as e:
            raise QmpError(str(e)) from None
        self.drives[node_name] = (drive, backend)

    def netdev_add(self, id: str, type: str | None = None, ifname: str | None = None,
                   fd=None, fds=None, vhost: bool | None = None, queues: int | None = None,
                   **_ignored) -> None:
        """Register a tap (``ifname``, or ``fd``/``fds``: a getfd name or a
        descriptor number) as net backend ``id`` (opened now)."""
        self._check_backend_name("netdev_add", id)
        if type not in (None, "tap"):
            raise QmpError(f"netdev_add: type '{type}' is not supported (only tap)")
        if vhost:
            raise QmpError("netdev_add: vhost-net is not supported (nor by templates)")
        if queues not in (None, 1, 2):
            raise QmpError("netdev_add: multi-queue is not supported on microvm")
        ref = fds if fds is not None else fd
        if isinstance(ref, str) and ":" in ref:
            ref = ref.split(":")[-1]          # StratoVirt takes the last of "a:b"
        if ref is None and not ifname:
            raise QmpError("netdev_add: ifname or fd is required")
        self._check_limit()
        fdnum = None
        if ref is not None:
            # A getfd name was resolved to its number by the QMP layer
            # (stratopy.qmp.fdstore), which also closes it if this fails.
            try:
                fdnum = int(ref, 0) if isinstance(ref, str) else int(ref)
            except ValueError:
                raise QmpError(f"netdev_add: fd '{ref}' is neither a name given to "
                               f"getfd nor a descriptor number") from None
            taken = {s.backend.fileno() for s in self.m.slots
                     if s.kind == "net" and s.backend is not None}
            taken |= {t.fileno() for _, t in self.netdevs.values()}
            if fdnum < 0 or fdnum in taken:
                raise QmpError(f"netdev_add: fd {fdnum} is not a free tap descriptor")
        nd = cfgmod.NetdevConfig(id=id, ifname=None if fdnum is not None else ifname,
                                 fd=fdnum)
        try:
            tap = devfactory.open_tap(nd)
        except StratoError as e:
            raise QmpError(f"netdev_add: {e}") from None
        self.netdevs[id] = (nd, tap)

    @staticmethod
    def _slot_number(dev_id: str, addr, lun) -> int:
        if addr is not None:
            try:
                n = int(str(addr), 0)
            except ValueError:
                raise QmpError(f"Invalid addr for device {dev_id}") from None
            if n < 0:
                raise QmpError(f"Invalid addr for device {dev_id}")
            return n
        if lun is not None:
            try:
                return int(lun) + 1         # StratoVirt: slot = lun + 1
            except ValueError:
                raise QmpError(f"Invalid lun for device {dev_id}") from None
        return 0

    def device_add(self, id: str, driver: str, addr=None, lun=None,
                   drive: str | None = None, netdev: str | None = None,
                   mac: str | None = None, serial: str | None = None, **_ignored) -> None:
        """Bind a registered backend into a free replaceable slot."""
        if self.m.config.machine_type == "q35":
            from stratopy.machine import q35_hotplug
            return q35_hotplug.device_add(self, id, driver, _ignored.get("bus"), addr, drive,
                                          netdev, mac, serial)
        kind = {"virtio-blk-device": slotmod.BLK, "virtio-blk-mmio": slotmod.BLK,
                "virtio-net-device": slotmod.NET, "virtio-net-mmio": slotmod.NET}.get(driver)
        if kind is None:
            raise QmpError(f"device_add: '{driver}' cannot be hot-replaced on microvm "
                           f"(virtio-blk-device, virtio-blk-mmio, virtio-net-device, "
                           f"virtio-net-mmio can)")
        if not id or len(id) > MAX_ID_LEN or "\0" in id:
            raise QmpError(f"device_add: invalid id '{id[:40]}' (1 to {MAX_ID_LEN} characters)")
        if id in self._live_ids():
            raise QmpError(f"device_add: device id '{id}' is already in use")
        n = self._slot_number(id, addr, lun)
        first, count = slotmod.RESERVED[kind]
        what = "block" if kind == slotmod.BLK else "net"
        if n >= count:
            raise QmpError(f"A maximum of {count} {what} replaceable devices are supported "
                           f"(addr 0x0-{count - 1:#x}); addr {n:#x} is out of range")
        slot = self.m.slots[first + n]
        # StratoVirt finds the backend by the device id (node-name / netdev
        # id == device id); stratopy also takes drive= / netdev= when given.
        ref = (drive if kind == slotmod.BLK else netdev) or id
        mine, theirs = ((self.drives, self.netdevs) if kind == slotmod.BLK
                        else (self.netdevs, self.drives))
        if ref not in mine:
            if ref in theirs:
                raise QmpError(f"The device type is {what}, but the backend '{ref}' is not "
                               f"for this type")
            how = "blockdev-add" if kind == slotmod.BLK else "netdev_add"
            raise QmpError(f"device_add: no {what} backend '{ref}' (add it with {how} first)")
        if slot.config is not None:
            raise QmpError(f"The slot {n:#x} is occupied already (by device "
                           f"'{slot.config.id}')")
        config, backend = hot_device_config(cfgmod.BLK if kind == slotmod.BLK else cfgmod.NET,
                                            id, mine[ref], serial, mac)
        self.m.hot_bind(slot, config, backend)
        del mine[ref]
        log.info("device_add: %s (%s) bound into %s slot %#x", id, ref, what, n)

    def device_del(self, id: str) -> None:  # noqa: A002
        """Unbind device ``id`` from its replaceable slot (the slot stays,
        empty) and emit DEVICE_DELETED."""
        if self.m.config.machine_type == "q35":
            from stratopy.machine import q35_hotplug
            if q35_hotplug.device_del(self, id):
                return
        for slot in self.m.slots:
            if slot.config is not None and slot.config.id == id:
                if not slot.replaceable:
                    raise QmpError(f"Device {id} cannot be removed: only virtio-blk and "
                                   f"virtio-net devices in the replaceable slots can "
                                   f"(microvm hot-replace)", "DeviceNotFound")
                if slot.kind == "blk" and slot.config.drive is not None:
                    self.released_nodes.add(slot.config.drive.id)
                self.m.hot_unbind(slot)
                self.m.event_sink(qmpev.DEVICE_DELETED, qmpev.device_deleted_data(id))
                return
        for registry in (self.drives, self.netdevs):
            if id in registry:
                # StratoVirt: device_del also drops a backend that was never
                # bound (microvm has no blockdev-del / netdev_del)
                _, backend = registry.pop(id)
                backend.close()
                self.m.event_sink(qmpev.DEVICE_DELETED, qmpev.device_deleted_data(id))
                return
        d = self.m.config.device(id)
        if d is not None and d.driver not in (cfgmod.BLK, cfgmod.NET):
            raise QmpError(f"Device {id} cannot be removed: only virtio-blk and virtio-net "
                           f"devices in the replaceable slots can (microvm hot-replace)",
                           "DeviceNotFound")
        raise QmpError(f"Device {id} not found", "DeviceNotFound")

    def blockdev_del(self, node_name: str) -> None:
        """Drop block node ``node_name``: one blockdev-add registered and no
        device uses (Kata's rollback after a failed device_add), or one whose
        device device_del removed (Kata's hot-unplug). StratoVirt's microvm
        answers "blockdev_del not support yet" (Kata ignores that error)."""
        if node_name in self.drives:
            _, backend = self.drives.pop(node_name)
            backend.close()
            return
        if node_name in self.released_nodes:
            self.released_nodes.discard(node_name)
            return
        for slot in self.m.slots:
            drive = slot.config.drive if slot.config is not None else None
            if drive is not None and drive.id == node_name:
                raise QmpError(f"Node '{node_name}' is busy: device '{slot.config.id}' uses it "
                               f"(device_del it first)")
        raise QmpError(f"Failed to find node with node-name='{node_name}'")


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
