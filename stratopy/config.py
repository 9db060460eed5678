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

from dataclasses import dataclass

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
DEVICE_DRIVERS = (BLK, NET, SERIAL, CONSOLE, RNG)


@dataclass(frozen=True)
class DriveConfig:
    """``-drive id=ID,file=PATH[,readonly=,direct=,serial=,if=none,format=raw,aio=]``.

    ``direct`` defaults to True, as in StratoVirt (open with O_DIRECT; the block
    device falls back with a warning where the filesystem refuses it).
    ``aio`` is the resolved StratoVirt default: ``'native'`` when ``direct`` is
    on, ``'off'`` otherwise; ``'off'|'native'|'io_uring'`` are accepted, only
    synchronous I/O is implemented, so every value behaves like ``'off'``.
    """

    id: str
    file: str
    readonly: bool = False
    direct: bool = True
    serial: str | None = None
    format: str = "raw"
    aio: str = "native"


@dataclass(frozen=True)
class NetdevConfig:
    """``-netdev tap,id=ID,ifname=NAME`` or ``-netdev tap,id=ID,fd=N``.

    Exactly one of ``ifname``/``fd`` is set.  ``queues`` counts queue pairs
    (StratoVirt's ``queues=``), default 1.  ``vhost=on`` is accepted here; the
    machine refuses it where it cannot honour it (templates).
    """

    id: str
    kind: str = "tap"
    ifname: str | None = None
    fd: int | None = None
    vhost: bool = False
    queues: int = 1


@dataclass(frozen=True)
class ChardevConfig:
    """A character backend: ``-chardev`` or the one ``-serial`` creates.

    ``backend`` is ``'stdio'``, ``'pty'``, ``'file'`` (``path`` set) or
    ``'socket'`` (a unix socket at ``path``; ``server``: listen instead of
    connect; ``nowait``: do not wait for a client before starting).
    The chardev ``-serial stdio|pty|file|socket`` creates has id
    ``'serial_chardev'`` (StratoVirt's name).
    """

    id: str
    backend: str
    path: str | None = None
    server: bool = False
    nowait: bool = False


@dataclass(frozen=True)
class RngObjectConfig:
    """``-object rng-random,id=ID,filename=PATH``."""

    id: str
    filename: str


@dataclass(frozen=True)
class DeviceConfig:
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
    ``virtio-rng-device``     ``rng`` (RngObjectConfig)
    ========================  ===============================================

    ``id`` is always set: when the command line gives none (StratoVirt allows
    that for net, serial and rng devices) it is ``'<driver>.<n>'``, n being the
    device's index in ``MachineConfig.devices``.
    A virtconsole is a port of the virtio-serial device, not a transport of
    its own: see :meth:`MachineConfig.transport_devices`.
    """

    driver: str
    id: str
    drive: DriveConfig | None = None
    serial: str | None = None
    netdev: NetdevConfig | None = None
    mac: str | None = None
    chardev: ChardevConfig | None = None
    bus: str | None = None
    rng: RngObjectConfig | None = None


@dataclass(frozen=True)
class QmpConfig:
    """``-qmp unix:PATH,server,nowait`` (``path``) or ``-qmp tcp:HOST:PORT,server,nowait``."""

    kind: str
    path: str | None = None
    host: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class IncomingConfig:
    """``-incoming file:DIR[,mapped=on|off][,verify=lazy|full]``: restore
    from the template in ``path``.

    ``mapped`` (default True): map ``DIR/memory`` copy-on-write; False: read it.
    ``verify``: ``lazy`` (default) checks the memory file's chunk digests in
    a background thread while the guest runs and stops the VM if one is
    damaged; ``full`` checks them all before the guest runs.
    """

    path: str
    mapped: bool = True
    verify: str = "lazy"


@dataclass(frozen=True, kw_only=True)
class MachineConfig:
    """Everything the command line says.  Keyword-only; only ``kernel`` is required."""

    machine_type: str = "microvm"
    dump_guest_core: bool = True
    mem_share: bool = False
    cpus: int = 1
    max_cpus: int = 1
    sockets: int = 1
    cores: int = 1
    threads: int = 1
    mem_size: int = DEFAULT_MEM_SIZE
    mem_path: str | None = None
    mem_prealloc: bool = False
    kernel: str
    kernel_cmdline: str = ""
    initrd: str | None = None
    drives: tuple[DriveConfig, ...] = ()
    netdevs: tuple[NetdevConfig, ...] = ()
    chardevs: tuple[ChardevConfig, ...] = ()
    rng_objects: tuple[RngObjectConfig, ...] = ()
    devices: tuple[DeviceConfig, ...] = ()
    serial: ChardevConfig | None = None
    qmp: tuple[QmpConfig, ...] = ()
    incoming: IncomingConfig | None = None
    start_paused: bool = False
    name: str | None = None
    log_file: str | None = None
    log_to_stderr: bool = False
    daemonize: bool = False
    pidfile: str | None = None
    disable_seccomp: bool = False

    def virtio_devices(self) -> tuple[DeviceConfig, ...]:
        """Every ``-device``, in command-line order."""
        return self.devices

    def transport_devices(self) -> tuple[DeviceConfig, ...]:
        """The devices that each need a virtio-mmio transport (all but virtconsole), in order."""
        return tuple(d for d in self.devices if d.driver != CONSOLE)

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
