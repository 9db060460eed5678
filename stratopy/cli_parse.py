"""StratoVirt's command line, parsed into a :class:`~stratopy.config.MachineConfig`.

Public API:

* ``parse_args(argv) -> MachineConfig``: ``argv`` excludes the program name.
  Pure: no file system, no KVM.  Raises
  :class:`~stratopy.errors.ConfigError` (``.option`` is the bare option, e.g.
  ``'-device'``; ``.reason`` says why) for anything it refuses, or
  :class:`HelpRequested` / :class:`VersionRequested` (both
  :class:`CliExit`, not errors) when ``-h``/``-help``/``--help`` or
  ``-V``/``-version``/``--version`` is seen: print ``exc.text`` to stdout and
  exit with ``exc.exit_code`` (0).
* ``HELP_TEXT``, ``version_text()``.
* ``one_line(text)``: user text made fit for one line (control characters
  escaped), for errors and log lines that echo it.

docs/cli.md is the user-facing description of every rule below. The
value helpers live in :mod:`stratopy.cli_values`, the device-side options
(``-drive``, ``-netdev``, ``-chardev``, ``-serial``, ``-object``,
``-device``) in :mod:`stratopy.cli_devices`.
"""

from __future__ import annotations

import re

from stratopy import __version__
from stratopy.cli_devices import (  # noqa: F401 - _mac re-exported (machine/control.py)
    _build_devices,
    _parse_chardev,
    _parse_drive,
    _parse_netdev,
    _parse_object,
    _parse_serial,
    _mac,
)
from stratopy.cli_values import (  # noqa: F401 - MAX_BLK_SERIAL_LEN re-exported (control.py)
    MAX_BLK_SERIAL_LEN,
    MAX_ID_LEN,
    PAGE_SIZE,
    SERIAL_CHARDEV_ID,
    _BOOL_FALSE,
    _Props,
    _first_bare,
    _int,
    _no_control,
    _path,
    _size,
    _sock_path,
    _split,
)
from stratopy.config import (
    MAX_CPUS,
    MIN_MEM_SIZE,
    ChardevConfig,
    DriveConfig,
    IncomingConfig,
    MachineConfig,
    NetdevConfig,
    QmpConfig,
    RngObjectConfig,
)
from stratopy.errors import ConfigError

__all__ = [
    "HELP_TEXT",
    "CliExit",
    "HelpRequested",
    "VersionRequested",
    "one_line",
    "parse_args",
    "version_text",
]


class CliExit(Exception):
    """Not an error: the command line asks to print ``text`` and exit with ``exit_code``."""

    exit_code = 0

    def __init__(self, text: str):
        self.text = text
        super().__init__(text)


class HelpRequested(CliExit):
    """``-h``, ``-help`` or ``--help``: ``text`` is the usage."""


class VersionRequested(CliExit):
    """``-V``, ``-version`` or ``--version``: ``text`` is the version line."""


def version_text() -> str:
    return f"stratopy {__version__} (StratoVirt-compatible microvm monitor)"


HELP_TEXT = f"""\
{version_text()}
usage: stratopy -kernel PATH [options]   (options take a single dash, as in StratoVirt)

  -machine [type=]microvm[,dump-guest-core=on|off][,mem-share=on|off]
  -smp [cpus=]N[,maxcpus=N][,sockets=N][,cores=N][,threads=N]   (1..254)
  -m [size=]N[K|M|G]               guest memory (no unit: MiB; default 256M)
  -mem-path PATH                   memory backend file
  -mem-prealloc                    pre-fault guest memory
  -kernel PATH                     vmlinux (ELF) or bzImage; required
  -append "CMDLINE"                kernel command line (repeatable, joined by spaces)
  -initrd PATH                     initramfs
  -drive id=ID,file=PATH[,readonly=on|off][,direct=on|off][,serial=S][,if=none][,format=raw][,aio=off|native|io_uring]
  -netdev tap,id=ID,ifname=NAME|fd=N|fds=N:M...[,vhost=on|off][,queues=N]
  -chardev stdio|pty,id=ID  |  file,id=ID,path=PATH  |  socket,id=ID,path=PATH[,server][,nowait]
  -object rng-random,id=ID,filename=PATH
  -device virtio-blk-device,id=ID,drive=DRIVE_ID[,serial=S]
  -device virtio-net-device,netdev=NETDEV_ID[,id=ID][,mac=XX:XX:XX:XX:XX:XX]
  -device virtio-serial-device[,id=ID]
  -device virtconsole,id=ID,chardev=CHARDEV_ID
  -device virtio-rng-device,rng=OBJECT_ID[,id=ID][,max-bytes=N,period=MS]
  -device virtio-vsock-device,id=ID,guest-cid=N,uds-path=PATH   (userspace vsock over unix sockets)
  -serial stdio|pty|none|file,path=PATH|socket,path=PATH[,server][,nowait]|chardev:ID
  -qmp unix:PATH,server,nowait  |  tcp:IP:PORT,server,nowait   (repeatable)
  -incoming file:DIR[,mapped=on|off][,verify=lazy|full][,clock=realtime|saved]
                                       start from the VM template in DIR
  -S                               start with vCPUs paused (QMP 'cont' starts them)
  -name NAME                       guest name
  -uuid UUID                       the VM's UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)
  -D [LOGFILE]                     log to LOGFILE (to stderr when no file is given)
  -daemonize                       detach after initialising
  -pidfile PATH                    write the PID (needs -daemonize)
  -disable-seccomp                 no seccomp sandbox
  -h, -help                        this text
  -V, -version                     the version
"""

# Option table: name -> (arity, repeatable).  arity: "value", "flag", "optional".
_OPTIONS: dict[str, tuple[str, bool]] = {
    "-machine": ("value", False),
    "-smp": ("value", False),
    "-m": ("value", False),
    "-mem-path": ("value", False),
    "-mem-prealloc": ("flag", False),
    "-kernel": ("value", False),
    "-append": ("value", True),
    "-initrd": ("value", False),
    "-drive": ("value", True),
    "-netdev": ("value", True),
    "-chardev": ("value", True),
    "-object": ("value", True),
    "-device": ("value", True),
    "-serial": ("value", False),
    "-qmp": ("value", True),
    "-incoming": ("value", False),
    "-S": ("flag", False),
    "-name": ("value", False),
    "-uuid": ("value", False),
    "-D": ("optional", False),
    "-daemonize": ("flag", False),
    "-pidfile": ("value", False),
    "-disable-seccomp": ("flag", False),
}
_HELP = ("-h", "-help", "--help")
_VERSION = ("-V", "-version", "--version")

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)

# StratoVirt options stratopy knows of but does not implement (a clearer refusal).
_STRATOVIRT_ONLY = {
    "-accel", "-cpu", "-numa", "-mod-test", "-mon", "-overcommit",
    "-no-user-config", "-nodefaults", "-sandbox", "-msg", "-rtc", "-no-shutdown",
    "-battery", "-boot", "-nographic", "-realtime", "-display", "-usb", "-trace",
    "-global", "-hardware-signature", "-smbios", "-cameradev", "-vnc",
    "-windows_emu_pid", "-freeze",
}

# --------------------------------------------------------------------------
# tokenizing


def _tokenize(argv: list[str]) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    i = 0
    n = len(argv)
    while i < n:
        tok = argv[i]
        if not isinstance(tok, str):
            raise ConfigError(repr(tok), "not a string")
        i += 1
        if tok in _HELP:
            raise HelpRequested(HELP_TEXT)
        if tok in _VERSION:
            raise VersionRequested(version_text())
        spec = _OPTIONS.get(tok)
        if spec is None:
            if tok.startswith("--") and tok[1:] in _OPTIONS:
                raise ConfigError(tok, f"unknown option; options take a single dash: {tok[1:]}")
            if tok in _STRATOVIRT_ONLY:
                raise ConfigError(tok, "a StratoVirt option stratopy does not support")
            if tok.startswith("-"):
                raise ConfigError(tok, "unknown option (see -help)")
            raise ConfigError(f"'{tok}'", "unexpected argument (not the value of any option)")
        arity, repeatable = spec
        if tok in seen and not repeatable:
            raise ConfigError(tok, "given more than once")
        seen.add(tok)
        value: str | None = None
        if arity == "value":
            if i >= n or _is_option(argv[i]):
                raise ConfigError(tok, "missing value")
            value = argv[i]
            i += 1
        elif arity == "optional" and i < n and isinstance(argv[i], str) and not argv[i].startswith("-"):
            value = argv[i]
            i += 1
        if value is not None and not _is_utf8(value):
            # Python hands undecodable argv bytes over as lone surrogates,
            # which no file name, log line or kernel command line can carry.
            raise ConfigError(tok, f"the value '{_undecodable(value)}' is not valid UTF-8")
        out.append((tok, value))
    return out


def _is_utf8(tok: str) -> bool:
    """False for the surrogate escapes Python makes of undecodable argv bytes."""
    try:
        tok.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _undecodable(value: str) -> str:
    """The argument's bytes, the undecodable ones as \\xNN."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:           # not from argv: a lone surrogate of its own
        return value.encode("utf-8", "backslashreplace").decode("ascii")
    return raw.decode("utf-8", "backslashreplace")


def _is_option(tok: object) -> bool:
    return isinstance(tok, str) and (tok in _OPTIONS or tok in _HELP or tok in _VERSION)


# --------------------------------------------------------------------------
# the options


def _parse_machine(text: str) -> dict:
    o = "-machine"
    p = _first_bare(o, text, "type", "-machine")
    mtype = p.take("type")
    if mtype is None:
        raise ConfigError(o, "no machine type given (use -machine microvm)")
    mtype = mtype.lower()
    if mtype == "virt":
        raise ConfigError(o, "virt is an aarch64 machine, not supported (microvm or q35)")
    if mtype not in ("microvm", "q35"):
        raise ConfigError(o, f"unknown machine type '{mtype}' (microvm or q35)")
    dump = p.take_bool(True, "dump-guest-core", "dump_guest_core")
    share = p.take_bool(False, "mem-share", "mem_share")
    accel = p.take("accel")
    if accel is not None and accel != "kvm":
        raise ConfigError(o, f"accel={accel} is not supported (only kvm)")
    usb = p.take("usb")
    if usb is not None and usb.lower() not in _BOOL_FALSE:
        raise ConfigError(o, "usb must be off")
    p.finish()
    return {"machine_type": mtype, "dump_guest_core": dump, "mem_share": share}


def _parse_smp(text: str) -> dict:
    o = "-smp"
    p = _first_bare(o, text, "cpus", "-smp")
    raw = p.take("cpus")
    if raw is None:
        raise ConfigError(o, "no vCPU count given (use -smp N or -smp cpus=N)")
    cpus = _int(o, "cpus", raw, 1, MAX_CPUS)

    def opt(key: str) -> int:
        v = p.take(key)
        return 0 if v is None else _int(o, key, v, 0, MAX_CPUS)  # 0: work it out

    maxcpus, sockets, cores, threads = opt("maxcpus"), opt("sockets"), opt("cores"), opt("threads")
    for extra in ("dies", "clusters"):
        v = p.take(extra)
        if v is not None and _int(o, extra, v, 1, MAX_CPUS) != 1:
            raise ConfigError(o, f"{extra} must be 1 on microvm")
    p.finish()

    # StratoVirt's rules: maxcpus defaults to sockets*cores*threads when all
    # three are given, else to cpus; the missing ones are worked out from it.
    if maxcpus == 0:
        product = sockets * cores * threads
        maxcpus = product if product else cpus
    if cores == 0:
        sockets = sockets or 1
        threads = threads or 1
        cores = maxcpus // (sockets * threads)
    elif sockets == 0:
        threads = threads or 1
        sockets = maxcpus // (cores * threads)
    if threads == 0:
        threads = maxcpus // (sockets * cores) if sockets * cores else 0
    if not cpus <= maxcpus <= MAX_CPUS:
        raise ConfigError(o, f"maxcpus={maxcpus} must be between cpus={cpus} and {MAX_CPUS}")
    if 0 in (sockets, cores, threads):
        raise ConfigError(o, f"the topology does not fit in maxcpus={maxcpus} "
                             f"(sockets={sockets or '?'}, cores={cores or '?'}, threads={threads or '?'})")
    if sockets * cores * threads != maxcpus:
        raise ConfigError(
            o, f"sockets*cores*threads must equal maxcpus ({sockets}*{cores}*{threads} != {maxcpus})"
        )
    return {"cpus": cpus, "max_cpus": maxcpus, "sockets": sockets, "cores": cores, "threads": threads}


def _parse_mem(text: str) -> int:
    o = "-m"
    p = _first_bare(o, text, "size", "-m")
    raw = p.take("size")
    if raw is None:
        raise ConfigError(o, "no size given (use -m 512M)")
    size = _size(o, raw)
    maxmem = p.take("maxmem")
    if maxmem is not None and _size(o, maxmem) != size:
        raise ConfigError(o, "maxmem is not supported (no memory hotplug on microvm)")
    p.finish()
    if size == 0:
        raise ConfigError(o, "memory size must not be 0")
    if size % PAGE_SIZE:
        raise ConfigError(o, f"memory size {size} bytes is not a multiple of 4 KiB")
    if size < MIN_MEM_SIZE:
        raise ConfigError(o, f"memory size {raw} is below the minimum of {MIN_MEM_SIZE >> 20}M")
    return size


def _parse_qmp(text: str) -> QmpConfig:
    o = "-qmp"
    items = _split(o, text)
    uri = items[0]
    p = _Props(o, text, "-qmp", items[1:])
    server = p.take_flag("server")
    nowait = p.take_flag("nowait")
    p.finish()
    if not (server and nowait):
        raise ConfigError(o, "'server,nowait' is required (e.g. -qmp unix:/tmp/qmp.sock,server,nowait)")
    scheme, colon, rest = uri.partition(":")
    if not colon:
        raise ConfigError(o, f"'{uri}': use unix:PATH or tcp:IP:PORT")
    if scheme == "unix":
        return QmpConfig(kind="unix", path=_sock_path(o, "unix", rest))
    if scheme == "tcp":
        import ipaddress  # only for a TCP socket: not on every start-up

        host, colon, port_raw = rest.rpartition(":")
        if not colon or not host:
            raise ConfigError(o, f"'{uri}': use tcp:IP:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(o, f"'{host}' is not an IP address") from None
        port = _int(o, "port", port_raw, 1, 65535)
        return QmpConfig(kind="tcp", host=host, port=port)
    raise ConfigError(o, f"unknown socket type '{scheme}' (unix or tcp)")


def _parse_incoming(text: str) -> IncomingConfig:
    o = "-incoming"
    items = _split(o, text)
    uri = items[0]
    scheme, colon, path = uri.partition(":")
    if not colon:
        raise ConfigError(o, f"'{uri}': use file:DIR")
    if scheme.lower() != "file":
        if scheme.lower() in ("tcp", "unix"):
            raise ConfigError(o, f"{scheme}: live migration is not supported (only file:DIR, a VM template)")
        raise ConfigError(o, f"unknown uri type '{scheme}' (only file:DIR)")
    _path(o, "file", path)
    p = _Props(o, text, "-incoming", items[1:])
    mapped = p.take_bool(True, "mapped")
    verify = p.take("verify") or "lazy"
    if verify not in ("lazy", "full"):
        raise ConfigError(o, f"verify={verify}: use verify=lazy (default: the guest starts "
                             f"at once, its memory is checked beside it) or verify=full")
    clock = p.take("clock") or "realtime"
    if clock not in ("realtime", "saved"):
        raise ConfigError(o, f"clock={clock}: use clock=realtime (default: the clone's wall "
                             f"clock is the host's) or clock=saved (the template's)")
    p.finish()
    return IncomingConfig(path=path, mapped=mapped, verify=verify, clock=clock)


# --------------------------------------------------------------------------


def one_line(text: str) -> str:
    """Echoed user input stays on one printable line (control characters escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def parse_args(argv: list[str]) -> MachineConfig:
    """Parse StratoVirt-style ``argv`` (without the program name).

    Raises ConfigError (one printable line: ``"{option}: {reason}"``),
    HelpRequested or VersionRequested.
    """
    try:
        return _parse(argv)
    except ConfigError as e:
        option, reason = one_line(e.option), one_line(e.reason)
        if (option, reason) == (e.option, e.reason):
            raise
        raise ConfigError(option, reason) from None


def _add_once(opt: str, kind: str, table: dict, item) -> None:
    """File a backend (-drive, -netdev, -chardev, -object) under its id, which
    must be new: devices refer to backends by id."""
    if item.id in table:
        raise ConfigError(opt, f"{kind} id '{item.id}' is defined twice")
    table[item.id] = item


def _parse(argv: list[str]) -> MachineConfig:
    tokens = _tokenize(list(argv))

    kw: dict = {}
    appends: list[str] = []
    drives: dict[str, DriveConfig] = {}
    netdevs: dict[str, NetdevConfig] = {}
    chardevs: dict[str, ChardevConfig] = {}
    rngs: dict[str, RngObjectConfig] = {}
    qmps: list[QmpConfig] = []
    device_texts: list[str] = []
    serial_spec: ChardevConfig | str | None = None
    log_given = False

    for opt, value in tokens:
        if opt == "-machine":
            kw.update(_parse_machine(value))
        elif opt == "-smp":
            kw.update(_parse_smp(value))
        elif opt == "-m":
            kw["mem_size"] = _parse_mem(value)
        elif opt == "-mem-path":
            kw["mem_path"] = _path(opt, "-mem-path", value)
        elif opt == "-mem-prealloc":
            kw["mem_prealloc"] = True
        elif opt == "-kernel":
            kw["kernel"] = _path(opt, "-kernel", value)
        elif opt == "-append":
            appends.append(value)
        elif opt == "-initrd":
            kw["initrd"] = _path(opt, "-initrd", value)
        elif opt == "-drive":
            _add_once(opt, "drive", drives, _parse_drive(value))
        elif opt == "-netdev":
            _add_once(opt, "netdev", netdevs, _parse_netdev(value))
        elif opt == "-chardev":
            _add_once(opt, "chardev", chardevs, _parse_chardev(value))
        elif opt == "-object":
            _add_once(opt, "object", rngs, _parse_object(value))
        elif opt == "-device":
            device_texts.append(value)
        elif opt == "-serial":
            serial_spec = _parse_serial(value)
        elif opt == "-qmp":
            qmps.append(_parse_qmp(value))
        elif opt == "-incoming":
            kw["incoming"] = _parse_incoming(value)
        elif opt == "-S":
            kw["start_paused"] = True
        elif opt == "-name":
            if not value or len(value) > MAX_ID_LEN:
                raise ConfigError(opt, f"the name must be 1..{MAX_ID_LEN} characters")
            _no_control(opt, "the name", value)
            kw["name"] = value
        elif opt == "-uuid":
            if not _UUID.fullmatch(value):
                raise ConfigError(opt, f"'{value}' is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, hex)")
            kw["uuid"] = value.lower()
        elif opt == "-D":
            log_given = True
            if value is not None:
                kw["log_file"] = _path(opt, "-D", value)
        elif opt == "-daemonize":
            kw["daemonize"] = True
        elif opt == "-pidfile":
            kw["pidfile"] = _path(opt, "-pidfile", value)
        elif opt == "-disable-seccomp":
            kw["disable_seccomp"] = True
        else:  # pragma: no cover - _OPTIONS and this chain are kept in step
            raise ConfigError(opt, "unknown option")

    if "kernel" not in kw:
        raise ConfigError("-kernel", "is required (the guest kernel: vmlinux or bzImage)")
    kw["kernel_cmdline"] = " ".join(a for a in appends if a)
    kw["log_to_stderr"] = log_given and "log_file" not in kw

    # Who uses what: each drive, netdev and chardev has at most one user.
    users: dict[tuple[str, str], str] = {}

    def claim(kind: str, ref: str, user: str, option: str) -> None:
        other = users.get((kind, ref))
        if other is not None:
            raise ConfigError(option, f"{user}: {kind} '{ref}' is already used by {other}")
        users[(kind, ref)] = user

    serial: ChardevConfig | None = None
    if isinstance(serial_spec, str):
        serial = chardevs.get(serial_spec)
        if serial is None:
            raise ConfigError("-serial", f"chardev '{serial_spec}' is not defined by -chardev")
        claim("chardev", serial_spec, "-serial", "-serial")
    else:
        serial = serial_spec
    kw["serial"] = serial

    machine = kw.get("machine_type", "microvm")
    devices = _build_devices(device_texts, drives, netdevs, chardevs, rngs, claim, machine)

    # stdio can be used once, and not when daemonized (StratoVirt's rules).
    stdio = [c for c in chardevs.values() if c.backend == "stdio"]
    if serial is not None and serial.backend == "stdio" and serial not in stdio:
        stdio.append(serial)
    if len(stdio) > 1:
        raise ConfigError("-chardev", "only one device can be redirected to stdio ("
                          + ", ".join(repr(c.id) for c in stdio) + ")")
    if kw.get("daemonize") and stdio:
        opt = "-serial" if serial is not None and serial.backend == "stdio" else "-chardev"
        raise ConfigError("-daemonize", f"cannot be combined with stdio ({opt} {stdio[0].backend})")
    if "incoming" in kw:
        # a warm start's RAM is the template's memory file mapped private;
        # it cannot also be a -mem-path file, a memfd or preallocated (and
        # StratoVirt takes no template of a VM with these)
        for key, opt in (("mem_path", "-mem-path"), ("mem_share", "-machine mem-share=on"),
                         ("mem_prealloc", "-mem-prealloc")):
            if kw.get(key):
                raise ConfigError("-incoming", f"cannot be combined with {opt} (guest RAM "
                                               "comes from the template's memory file)")
    if "pidfile" in kw and not kw.get("daemonize"):
        raise ConfigError("-pidfile", "requires -daemonize")

    # No two listeners on one unix socket path.
    sock_paths: dict[str, str] = {}
    for q in qmps:
        if q.kind == "unix":
            if q.path in sock_paths:
                raise ConfigError("-qmp", f"socket path '{q.path}' is given twice")
            sock_paths[q.path] = "-qmp"
        elif any(x.kind == "tcp" and (x.host, x.port) == (q.host, q.port) for x in qmps if x is not q):
            raise ConfigError("-qmp", f"tcp:{q.host}:{q.port} is given twice")
    socket_devs = [c for c in chardevs.values() if c.backend == "socket"]
    if serial is not None and serial.backend == "socket" and serial not in socket_devs:
        socket_devs.append(serial)
    for c in socket_devs:
        if c.server and c.path in sock_paths:
            raise ConfigError("-chardev" if c.id != SERIAL_CHARDEV_ID else "-serial",
                              f"socket path '{c.path}' is also used by {sock_paths[c.path]}")
        if c.server:
            sock_paths[c.path] = f"chardev '{c.id}'"
    for d in devices:
        if d.uds_path is not None:
            if d.uds_path in sock_paths:
                raise ConfigError("-device", f"uds-path '{d.uds_path}' is also used by "
                                             f"{sock_paths[d.uds_path]}")
            sock_paths[d.uds_path] = f"device '{d.id}'"

    return MachineConfig(
        drives=tuple(drives.values()),
        netdevs=tuple(netdevs.values()),
        chardevs=tuple(chardevs.values()),
        rng_objects=tuple(rngs.values()),
        devices=devices,
        qmp=tuple(qmps),
        **kw,
    )
