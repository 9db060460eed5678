"""The parsed command line: plain, frozen data, no KVM.

``stratopy.cli_parse.parse_args(argv)`` builds a :class:`MachineConfig`; the
machine builder, the QMP server and the template code only read it.

Every reference on the command line is already resolved here: a
:class:`DeviceConfig` for ``virtio-blk-device`` carries the
:class:`DriveConfig` object itself (not the drive id), a net device carries its
:class:`NetdevConfig`, a console its :class:`ChardevConfig`, an rng device its
:class:`RngObjectConfig`.  ``MachineConfig.devices`` keeps command-line order,
which is also the order of the virtio-mmio transports the machine creates
after StratoVirt's reserved slots (and the order a template must match).
"""

from __future__ import annotations

from stratopy.record import Record

MiB = 1024 * 1024
GiB = 1024 * MiB

DEFAULT_MEM_SIZE = 256 * MiB
MIN_MEM_SIZE = 16 * MiB
MAX_CPUS = 254

# Device driver names accepted by ``-device`` (microvm, virtio-mmio).
BLK = "virtio-blk-device"
NET = "virtio-net-device"
SERIAL = "virtio-serial-device"
CONSOLE = "virtconsole"
RNG = "virtio-rng-device"
BALLOON = "virtio-balloon-device"
#: userspace virtio-vsock over unix sockets (StratoVirt's naming: virtio-X-device
#: is emulated by the monitor, vhost-X the kernel's; see cli_devices._parse_vsock)
VSOCK = "virtio-vsock-device"
#: virtio-vsock whose data path is the kernel's vhost-vsock (what Kata starts)
VHOST_VSOCK = "vhost-vsock-device"
DEVICE_DRIVERS = (BLK, NET, SERIAL, CONSOLE, RNG, VSOCK, VHOST_VSOCK, BALLOON)


class _Frozen(Record):
    """Base of the config types: what ``@dataclass(frozen=True)`` gave them.

    Field-wise equality (same class only) and a repr (stratopy.record), a
    hash that agrees with the equality, immutability (assigning raises
    AttributeError) and :meth:`replace`. Written out rather than generated:
    every start imports this module, and ``dataclasses`` compiles each
    generated method with ``exec`` -- 42 M instructions for these eight
    classes, ~13 ms (docs/performance.md). ``__slots__`` lists the fields in
    declaration order; each ``__init__`` sets them once with
    ``object.__setattr__``.
    """

    __slots__ = ()

    def __hash__(self) -> int:
        return hash(self._values())

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")

    def __reduce__(self):
        # copy, deepcopy and pickle: rebuilt field by field (their default
        # for slotted objects would assign, which __setattr__ refuses).
        return (_rebuild, (type(self), self._values()))

    def replace(self, **changes):
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        values = {f: getattr(self, f) for f in self.__slots__}
        unknown = set(changes) - set(values)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        values.update(changes)
        return type(self)(**values)


_set = object.__setattr__


def _rebuild(cls, values: tuple):
    obj = cls.__new__(cls)
    for name, value in zip(cls.__slots__, values):
        _set(obj, name, value)
    return obj


class DriveConfig(_Frozen):
    """``-drive id=ID,file=PATH[,readonly=,direct=,serial=,if=none,format=raw,aio=]``.

    ``direct`` defaults to True, as in StratoVirt (open with O_DIRECT; the block
    device falls back with a warning where the filesystem refuses it).
    ``aio`` is the resolved StratoVirt default: ``'native'`` when ``direct`` is
    on, ``'off'`` otherwise; ``'off'|'native'|'io_uring'`` are accepted, only
    synchronous I/O is implemented, so every value behaves like ``'off'``.
    """

    __slots__ = ("id", "file", "readonly", "direct", "serial", "format", "aio")

    def __init__(
            self,
            id: str,
            file: str,
            readonly: bool = False,
            direct: bool = True,
            serial: str | None = None,
            format: str = "raw",
            aio: str = "native",
    ):
        _set(self, "id", id)
        _set(self, "file", file)
        _set(self, "readonly", readonly)
        _set(self, "direct", direct)
        _set(self, "serial", serial)
        _set(self, "format", format)
        _set(self, "aio", aio)


class NetdevConfig(_Frozen):
    """``-netdev tap,id=ID,ifname=NAME`` or ``-netdev tap,id=ID,fd=N|fds=N:M:...``.

    Exactly one of ``ifname``/``fd`` is set. ``fds=`` (the queues of one
    multi-queue tap, as Kata passes them): ``fd`` is the first, used for the
    device's one queue pair; ``extra_fds`` the others, checked to be queues
    of the same tap and then detached from it (nothing is steered to a
    queue nobody reads).  ``queues`` counts queue pairs
    (StratoVirt's ``queues=``), default 1.  ``vhost=on`` is accepted here; the
    machine refuses it where it cannot honour it (templates).
    """

    __slots__ = ("id", "kind", "ifname", "fd", "vhost", "queues", "extra_fds")

    def __init__(
            self,
            id: str,
            kind: str = "tap",
            ifname: str | None = None,
            fd: int | None = None,
            vhost: bool = False,
            queues: int = 1,
            extra_fds: tuple[int, ...] = (),
    ):
        _set(self, "id", id)
        _set(self, "kind", kind)
        _set(self, "ifname", ifname)
        _set(self, "fd", fd)
        _set(self, "vhost", vhost)
        _set(self, "queues", queues)
        _set(self, "extra_fds", extra_fds)


class ChardevConfig(_Frozen):
    """A character backend: ``-chardev`` or the one ``-serial`` creates.

    ``backend`` is ``'stdio'``, ``'pty'``, ``'file'`` (``path`` set) or
    ``'socket'`` (a unix socket at ``path``; ``server``: listen instead of
    connect; ``nowait``: do not wait for a client before starting).
    The chardev ``-serial stdio|pty|file|socket`` creates has id
    ``'serial_chardev'`` (StratoVirt's name).
    """

    __slots__ = ("id", "backend", "path", "server", "nowait")

    def __init__(
            self,
            id: str,
            backend: str,
            path: str | None = None,
            server: bool = False,
            nowait: bool = False,
    ):
        _set(self, "id", id)
        _set(self, "backend", backend)
        _set(self, "path", path)
        _set(self, "server", server)
        _set(self, "nowait", nowait)


class RngObjectConfig(_Frozen):
    """``-object rng-random,id=ID,filename=PATH``."""

    __slots__ = ("id", "filename")

    def __init__(self, id: str, filename: str):
        _set(self, "id", id)
        _set(self, "filename", filename)


class DeviceConfig(_Frozen):
    """One ``-device``.  Which optional fields are set depends on ``driver``:

    ========================  ===============================================
    ``virtio-blk-device``     ``drive`` (DriveConfig), ``serial`` (the
                              device's ``serial=``, else the drive's, or None)
    ``virtio-net-device``     ``netdev`` (NetdevConfig), ``mac``
                              (``'xx:xx:xx:xx:xx:xx'`` lowercase, or None)
    ``virtio-serial-device``  ``chardev``: the ChardevConfig of the
                              virtconsole plugged into it, or None
    ``virtconsole``           ``chardev`` (ChardevConfig), ``bus``: the id of
                              the virtio-serial-device it belongs to
    ``virtio-rng-device``     ``rng`` (RngObjectConfig), ``max_bytes`` and
                              ``period`` (ms): the rate limit, both or neither
    ``virtio-vsock-device``   ``guest_cid`` (3..2^32-2), ``uds_path`` (the
                              host-side unix socket, Firecracker's uds_path)
    ``vhost-vsock-device``    ``guest_cid``, ``vhostfd`` (an inherited fd of
                              /dev/vhost-vsock, or None: open it)
    ``virtio-balloon-device`` ``deflate_on_oom``, ``free_page_reporting``
                              (bools: the features offered)
    ========================  ===============================================

    ``id`` is always set: when the command line gives none (StratoVirt allows
    that for net, serial, rng and balloon devices) it is ``'<driver>.<n>'``, n being the
    device's index in ``MachineConfig.devices``.
    A virtconsole is a port of the virtio-serial device, not a transport of
    its own: see :meth:`MachineConfig.transport_devices`.
    """

    __slots__ = ("driver", "id", "drive", "serial", "netdev", "mac", "chardev", "bus", "rng",
                 "max_bytes", "period", "guest_cid", "uds_path", "deflate_on_oom",
                 "free_page_reporting", "vhostfd", "pci", "root_port")

    def __init__(
            self,
            driver: str,
            id: str,
            drive: DriveConfig | None = None,
            serial: str | None = None,
            netdev: NetdevConfig | None = None,
            mac: str | None = None,
            chardev: ChardevConfig | None = None,
            bus: str | None = None,
            rng: RngObjectConfig | None = None,
            max_bytes: int | None = None,
            period: int | None = None,
            guest_cid: int | None = None,
            uds_path: str | None = None,
            deflate_on_oom: bool = False,
            free_page_reporting: bool = False,
            vhostfd: int | None = None,
            pci: tuple | None = None,
            root_port: tuple | None = None,
    ):
        _set(self, "driver", driver)
        _set(self, "id", id)
        _set(self, "drive", drive)
        _set(self, "serial", serial)
        _set(self, "netdev", netdev)
        _set(self, "mac", mac)
        _set(self, "chardev", chardev)
        _set(self, "bus", bus)
        _set(self, "rng", rng)
        _set(self, "max_bytes", max_bytes)
        _set(self, "period", period)
        _set(self, "guest_cid", guest_cid)
        _set(self, "uds_path", uds_path)
        _set(self, "deflate_on_oom", deflate_on_oom)
        _set(self, "free_page_reporting", free_page_reporting)
        _set(self, "vhostfd", vhostfd)
        # q35 (stratopy.cli_pci): (bus, slot, function, multifunction) and,
        # for a pcie-root-port, (port, chassis); None on the microvm
        _set(self, "pci", pci)
        _set(self, "root_port", root_port)


class QmpConfig(_Frozen):
    """``-qmp unix:PATH,server,nowait`` (``path``) or ``-qmp tcp:HOST:PORT,server,nowait``."""

    __slots__ = ("kind", "path", "host", "port")

    def __init__(
            self,
            kind: str,
            path: str | None = None,
            host: str | None = None,
            port: int | None = None,
    ):
        _set(self, "kind", kind)
        _set(self, "path", path)
        _set(self, "host", host)
        _set(self, "port", port)


class IncomingConfig(_Frozen):
    """``-incoming file:DIR[,mapped=on|off][,verify=lazy|full][,clock=realtime|saved]``:
    restore from the template in ``path``.

    ``mapped`` (default True): map ``DIR/memory`` copy-on-write; False: read it.
    ``verify``: ``lazy`` (default) checks the memory file's chunk digests in
    a background thread while the guest runs and stops the VM if one is
    damaged; ``full`` checks them all before the guest runs.
    ``clock``: ``realtime`` (default) moves the guest's kvmclock forward by
    the time elapsed since the template was taken (the clone's wall clock is
    the host's); ``saved`` restores it as saved (the clone's wall clock is
    the template's, as under QEMU and Firecracker's default). docs/snapshot.md.
    """

    __slots__ = ("path", "mapped", "verify", "clock")

    def __init__(self, path: str, mapped: bool = True, verify: str = "lazy",
                 clock: str = "realtime"):
        _set(self, "path", path)
        _set(self, "mapped", mapped)
        _set(self, "verify", verify)
        _set(self, "clock", clock)


class MachineConfig(_Frozen):
    """Everything the command line says.  Keyword-only; only ``kernel`` is required."""

    __slots__ = (
        "machine_type", "dump_guest_core", "mem_share", "cpus", "max_cpus", "sockets", "cores",
        "threads", "mem_size", "mem_path", "mem_prealloc", "kernel", "kernel_cmdline",
        "initrd", "drives", "netdevs", "chardevs", "rng_objects", "devices", "serial", "qmp",
        "incoming", "start_paused", "name", "uuid", "log_file", "log_to_stderr", "daemonize",
        "pidfile", "disable_seccomp",
    )

    def __init__(
            self,
            *,
            machine_type: str = "microvm",
            dump_guest_core: bool = True,
            mem_share: bool = False,
            cpus: int = 1,
            max_cpus: int = 1,
            sockets: int = 1,
            cores: int = 1,
            threads: int = 1,
            mem_size: int = DEFAULT_MEM_SIZE,
            mem_path: str | None = None,
            mem_prealloc: bool = False,
            kernel: str,
            kernel_cmdline: str = "",
            initrd: str | None = None,
            drives: tuple[DriveConfig, ...] = (),
            netdevs: tuple[NetdevConfig, ...] = (),
            chardevs: tuple[ChardevConfig, ...] = (),
            rng_objects: tuple[RngObjectConfig, ...] = (),
            devices: tuple[DeviceConfig, ...] = (),
            serial: ChardevConfig | None = None,
            qmp: tuple[QmpConfig, ...] = (),
            incoming: IncomingConfig | None = None,
            start_paused: bool = False,
            name: str | None = None,
            uuid: str | None = None,
            log_file: str | None = None,
            log_to_stderr: bool = False,
            daemonize: bool = False,
            pidfile: str | None = None,
            disable_seccomp: bool = False,
    ):
        _set(self, "machine_type", machine_type)
        _set(self, "dump_guest_core", dump_guest_core)
        _set(self, "mem_share", mem_share)
        _set(self, "cpus", cpus)
        _set(self, "max_cpus", max_cpus)
        _set(self, "sockets", sockets)
        _set(self, "cores", cores)
        _set(self, "threads", threads)
        _set(self, "mem_size", mem_size)
        _set(self, "mem_path", mem_path)
        _set(self, "mem_prealloc", mem_prealloc)
        _set(self, "kernel", kernel)
        _set(self, "kernel_cmdline", kernel_cmdline)
        _set(self, "initrd", initrd)
        _set(self, "drives", drives)
        _set(self, "netdevs", netdevs)
        _set(self, "chardevs", chardevs)
        _set(self, "rng_objects", rng_objects)
        _set(self, "devices", devices)
        _set(self, "serial", serial)
        _set(self, "qmp", qmp)
        _set(self, "incoming", incoming)
        _set(self, "start_paused", start_paused)
        _set(self, "name", name)
        _set(self, "uuid", uuid)
        _set(self, "log_file", log_file)
        _set(self, "log_to_stderr", log_to_stderr)
        _set(self, "daemonize", daemonize)
        _set(self, "pidfile", pidfile)
        _set(self, "disable_seccomp", disable_seccomp)

    def virtio_devices(self) -> tuple[DeviceConfig, ...]:
        """Every ``-device``, in command-line order."""
        return self.devices

    def transport_devices(self) -> tuple[DeviceConfig, ...]:
        """The devices that each need a virtio-mmio transport (all but virtconsole), in order."""
        return tuple(d for d in self.devices if d.driver not in (CONSOLE, "pcie-root-port"))

    def device(self, dev_id: str) -> DeviceConfig | None:
        """The device with this id, or None."""
        for d in self.devices:
            if d.id == dev_id:
                return d
        return None

    @property
    def logging(self) -> bool:
        """True when ``-D`` was given (to ``log_file``, or to stderr when that is None)."""
        return self.log_to_stderr or self.log_file is not None
