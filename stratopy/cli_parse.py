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

docs/cli.md is the user-facing description of every rule below.
"""

from __future__ import annotations

import re

from stratopy import __version__
from stratopy.config import (
    BLK,
    CONSOLE,
    DEVICE_DRIVERS,
    MAX_CPUS,
    MIN_MEM_SIZE,
    NET,
    RNG,
    SERIAL,
    ChardevConfig,
    DeviceConfig,
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

MAX_ID_LEN = 255  # StratoVirt's MAX_STRING_LENGTH
MAX_PATH_LEN = 4096  # StratoVirt's MAX_PATH_LENGTH
MAX_SOCK_PATH_BYTES = 107  # sun_path is 108 bytes with the terminating NUL
MAX_BLK_SERIAL_LEN = 20  # VIRTIO_BLK_ID_BYTES
MAX_IFNAME_LEN = 15  # IFNAMSIZ - 1
MAX_NET_QUEUE_PAIRS = 16
PAGE_SIZE = 4096
MAX_U64 = (1 << 64) - 1
SERIAL_CHARDEV_ID = "serial_chardev"


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
  -serial stdio|pty|none|file,path=PATH|socket,path=PATH[,server][,nowait]|chardev:ID
  -qmp unix:PATH,server,nowait  |  tcp:IP:PORT,server,nowait   (repeatable)
  -incoming file:DIR[,mapped=on|off]   start from the VM template in DIR
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

# StratoVirt options stratopy knows of but does not implement (a clearer refusal).
_STRATOVIRT_ONLY = {
    "-accel", "-cpu", "-numa", "-mod-test", "-mon", "-overcommit",
    "-no-user-config", "-nodefaults", "-sandbox", "-msg", "-rtc", "-no-shutdown",
    "-battery", "-boot", "-nographic", "-realtime", "-display", "-usb", "-trace",
    "-global", "-hardware-signature", "-smbios", "-cameradev", "-vnc",
    "-windows_emu_pid", "-freeze",
}

_BOOL_TRUE = ("on", "true", "yes")
_BOOL_FALSE = ("off", "false", "no")
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_SIZE = re.compile(r"([0-9]+)([kKmMgG]?)", re.ASCII)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)
_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --------------------------------------------------------------------------
# value helpers


def _bool(option: str, key: str, value: str) -> bool:
    v = value.lower()
    if v in _BOOL_TRUE:
        return True
    if v in _BOOL_FALSE:
        return False
    raise ConfigError(option, f"{key}: invalid boolean '{value}' (use on/off, true/false or yes/no)")


def _int(option: str, key: str, value: str, lo: int, hi: int) -> int:
    if not _DIGITS.fullmatch(value):
        raise ConfigError(option, f"{key}: '{value}' is not a number")
    if len(value) > 20:
        raise ConfigError(option, f"{key}: {value} is out of range {lo}..{hi}")
    n = int(value)
    if not lo <= n <= hi:
        raise ConfigError(option, f"{key}: {n} is out of range {lo}..{hi}")
    return n


def _size(option: str, value: str) -> int:
    m = _SIZE.fullmatch(value)
    if not m:
        raise ConfigError(option, f"invalid size '{value}' (use N, NK, NM or NG; no unit means MiB)")
    digits, unit = m.groups()
    if len(digits) > 20:
        raise ConfigError(option, f"size '{value}' is too large")
    shift = {"": 20, "k": 10, "m": 20, "g": 30}[unit.lower()]
    size = int(digits) << shift
    if size > MAX_U64:
        raise ConfigError(option, f"size '{value}' is too large")
    return size


def _no_control(option: str, what: str, value: str) -> None:
    """Names and paths end up in log lines and one-line errors: a newline
    would split them, a NUL cannot reach the kernel at all."""
    m = _CONTROL.search(value)
    if m:
        c = m.group()
        name = "a NUL character" if c == "\0" else f"a control character ({c!r})"
        raise ConfigError(option, f"{what} contains {name}")


def _id(option: str, what: str, value: str) -> str:
    if not value:
        raise ConfigError(option, f"{what}: id must not be empty")
    if len(value) > MAX_ID_LEN:
        raise ConfigError(option, f"{what}: id is longer than {MAX_ID_LEN} characters")
    _no_control(option, f"{what}: id", value)
    return value


def _path(option: str, key: str, value: str) -> str:
    if not value:
        raise ConfigError(option, f"{key}: path must not be empty")
    if len(value) > MAX_PATH_LEN:
        raise ConfigError(option, f"{key}: path is longer than {MAX_PATH_LEN} characters")
    _no_control(option, f"{key}: path", value)
    return value


def _sock_path(option: str, key: str, value: str) -> str:
    _path(option, key, value)
    if len(value.encode("utf-8", "surrogatepass")) > MAX_SOCK_PATH_BYTES:
        raise ConfigError(option, f"{key}: unix socket path is longer than {MAX_SOCK_PATH_BYTES} bytes")
    return value


class _Props:
    """A ``key=value,...`` list.  Bare words are keys with value None.

    Consumers ``take`` what they know; ``finish`` refuses whatever is left.
    """

    def __init__(self, option: str, text: str, what: str, items: list[str]):
        self.option = option
        self.what = what
        self.known: list[str] = []
        self.d: dict[str, str | None] = {}
        for item in items:
            if item == "":
                raise ConfigError(option, f"empty item in '{text}' (stray comma?)")
            key, eq, value = item.partition("=")
            if key == "":
                raise ConfigError(option, f"'{item}' has no property name")
            if key in self.d:
                raise ConfigError(option, f"property '{key}' given twice for {what}")
            self.d[key] = value if eq else None

    def _pop(self, names: tuple[str, ...]) -> tuple[str, str | None] | None:
        self.known.append(names[0])
        found = [n for n in names if n in self.d]
        if len(found) > 1:
            raise ConfigError(self.option, f"'{found[0]}' and '{found[1]}' are the same property for {self.what}")
        if not found:
            return None
        return found[0], self.d.pop(found[0])

    def take(self, *names: str) -> str | None:
        got = self._pop(names)
        if got is None:
            return None
        key, value = got
        if value is None:
            raise ConfigError(self.option, f"property '{key}' of {self.what} needs a value ({key}=...)")
        return value

    def need(self, *names: str) -> str:
        value = self.take(*names)
        if value is None:
            raise ConfigError(self.option, f"{self.what} requires {names[0]}=")
        return value

    def take_bool(self, default: bool, *names: str) -> bool:
        got = self._pop(names)
        if got is None:
            return default
        key, value = got
        if value is None:
            raise ConfigError(self.option, f"property '{key}' of {self.what} needs a value ({key}=on|off)")
        return _bool(self.option, key, value)

    def take_flag(self, name: str) -> bool:
        """A bare word such as ``server``; ``server=on|off`` is accepted too."""
        got = self._pop((name,))
        if got is None:
            return False
        key, value = got
        return True if value is None else _bool(self.option, key, value)

    def refuse(self, name: str, reason: str) -> None:
        if name in self.d:
            raise ConfigError(self.option, f"property '{name}' of {self.what}: {reason}")

    def finish(self) -> None:
        for key in self.d:
            accepted = ", ".join(dict.fromkeys(self.known)) or "none"
            raise ConfigError(self.option, f"unknown property '{key}' for {self.what} (accepted: {accepted})")


def _split(option: str, text: str) -> list[str]:
    if text == "":
        raise ConfigError(option, "empty value")
    return text.split(",")


def _first_bare(option: str, text: str, key: str, what: str) -> _Props:
    """``-machine microvm,...``: a leading bare word is the value of ``key``."""
    items = _split(option, text)
    if "=" not in items[0] and items[0] != "":
        items[0] = f"{key}={items[0]}"
    return _Props(option, text, what, items)


def _typed(option: str, text: str, what: str) -> tuple[str, _Props]:
    """``-device DRIVER,...`` / ``-chardev BACKEND,...``: the first item is the type."""
    items = _split(option, text)
    kind = items[0]
    if kind == "" or "=" in kind:
        raise ConfigError(option, f"'{text}' must start with the {what}")
    return kind, _Props(option, text, kind, items[1:])


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
    if mtype == "q35":
        raise ConfigError(o, "q35 is not supported yet (only microvm)")
    if mtype == "virt":
        raise ConfigError(o, "virt is an aarch64 machine, not supported (only microvm)")
    if mtype != "microvm":
        raise ConfigError(o, f"unknown machine type '{mtype}' (only microvm)")
    dump = p.take_bool(True, "dump-guest-core", "dump_guest_core")
    share = p.take_bool(False, "mem-share", "mem_share")
    accel = p.take("accel")
    if accel is not None and accel != "kvm":
        raise ConfigError(o, f"accel={accel} is not supported (only kvm)")
    usb = p.take("usb")
    if usb is not None and usb.lower() not in _BOOL_FALSE:
        raise ConfigError(o, "usb must be off")
    p.finish()
    return {"machine_type": "microvm", "dump_guest_core": dump, "mem_share": share}


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


def _parse_drive(text: str) -> DriveConfig:
    o = "-drive"
    p = _Props(o, text, "-drive", _split(o, text))
    drive_id = p.take("id")
    if drive_id is None:
        raise ConfigError(o, "requires id=")
    _id(o, "-drive", drive_id)
    file = p.take("file")
    if file is None:
        raise ConfigError(o, f"drive '{drive_id}' requires file=")
    _path(o, "file", file)
    readonly = p.take_bool(False, "readonly")
    direct = p.take_bool(True, "direct")
    serial = p.take("serial")
    if serial is not None and len(serial) > MAX_BLK_SERIAL_LEN:
        raise ConfigError(o, f"serial is longer than {MAX_BLK_SERIAL_LEN} characters")
    iface = p.take("if")
    if iface is not None and iface != "none":
        if iface == "pflash":
            raise ConfigError(o, "if=pflash is not supported on microvm (only if=none)")
        raise ConfigError(o, f"unknown if={iface} (only if=none)")
    fmt = p.take("format")
    if fmt is not None and fmt != "raw":
        raise ConfigError(o, f"format={fmt} is not supported (only raw)")
    aio = p.take("aio")
    if aio is None:
        aio = "native" if direct else "off"
    elif aio not in ("off", "native", "io_uring"):
        raise ConfigError(o, f"unknown aio={aio} (off, native or io_uring)")
    elif aio == "native" and not direct:
        raise ConfigError(o, 'aio=native needs direct=on (use aio=off with direct=off)')
    p.finish()
    return DriveConfig(id=drive_id, file=file, readonly=readonly, direct=direct,
                       serial=serial, format="raw", aio=aio)


def _parse_netdev(text: str) -> NetdevConfig:
    o = "-netdev"
    kind, p = _typed(o, text, "netdev type (tap)")
    if kind != "tap":
        if kind == "vhost-user":
            raise ConfigError(o, "vhost-user is not supported (only tap)")
        raise ConfigError(o, f"unknown netdev type '{kind}' (only tap)")
    net_id = _id(o, "-netdev", p.need("id"))
    ifname = p.take("ifname")
    fd_raw = p.take("fd")
    fds_raw = p.take("fds")
    vhost = p.take_bool(False, "vhost")
    queues_raw = p.take("queues")
    p.finish()
    given = [k for k, v in (("ifname", ifname), ("fd", fd_raw), ("fds", fds_raw)) if v is not None]
    if len(given) > 1:
        raise ConfigError(o, f"netdev '{net_id}': give one of ifname=, fd= or fds=, not "
                             + " and ".join(f"{k}=" for k in given))
    if not given:
        raise ConfigError(o, f"netdev '{net_id}': the tap device is missing, use ifname=, fd= or fds=")
    fd = None
    extra: tuple[int, ...] = ()
    if ifname is not None:
        if not _valid_ifname(ifname):
            raise ConfigError(o, f"ifname '{ifname}' is not a valid interface name (1..{MAX_IFNAME_LEN} "
                                 f"bytes, no '/', ':', space or control character)")
    else:
        key, raw = ("fd", fd_raw) if fd_raw is not None else ("fds", fds_raw)
        fds = [_tap_fd(o, key, x) for x in raw.split(":")]
        if len(fds) > MAX_NET_QUEUE_PAIRS:
            raise ConfigError(o, f"{key}={raw}: more than {MAX_NET_QUEUE_PAIRS} queues")
        if len(set(fds)) != len(fds):
            raise ConfigError(o, f"{key}={raw}: a file descriptor is given twice")
        fd, extra = fds[0], tuple(fds[1:])
    queues = 1 if queues_raw is None else _int(o, "queues", queues_raw, 1, MAX_NET_QUEUE_PAIRS)
    return NetdevConfig(id=net_id, kind="tap", ifname=ifname, fd=fd, vhost=vhost, queues=queues,
                        extra_fds=extra)


def _tap_fd(o: str, key: str, raw: str) -> int:
    if raw.startswith("-"):
        raise ConfigError(o, f"{key}={raw}: a file descriptor cannot be negative")
    fd = _int(o, key, raw, 0, (1 << 31) - 1)
    if fd < 3:
        raise ConfigError(o, f"{key}: fd {fd} is stdin/stdout/stderr")
    return fd


def _valid_ifname(name: str) -> bool:
    """Linux's dev_valid_name(), and no control characters."""
    return (0 < len(name.encode()) <= MAX_IFNAME_LEN and name not in (".", "..")
            and not any(c in "/:" or c.isspace() for c in name) and not _CONTROL.search(name))


def _chardev_from(o: str, backend: str, p: _Props, chardev_id: str) -> ChardevConfig:
    if backend in ("stdio", "pty"):
        p.finish()
        return ChardevConfig(id=chardev_id, backend=backend)
    if backend == "file":
        path = _path(o, "path", p.need("path"))
        p.finish()
        return ChardevConfig(id=chardev_id, backend="file", path=path)
    if backend == "socket":
        path = p.take("path")
        if path is None:
            if "port" in p.d or "host" in p.d:
                raise ConfigError(o, "tcp sockets (host=/port=) are not supported for chardevs (use path=)")
            raise ConfigError(o, "socket requires path=")
        _sock_path(o, "path", path)
        server = p.take_flag("server")
        nowait = p.take_flag("nowait")
        p.finish()
        if nowait and not server:
            raise ConfigError(o, "nowait only makes sense with server")
        return ChardevConfig(id=chardev_id, backend="socket", path=path, server=server, nowait=nowait)
    raise ConfigError(o, f"unknown chardev backend '{backend}' (stdio, pty, file or socket)")


def _parse_chardev(text: str) -> ChardevConfig:
    o = "-chardev"
    backend, p = _typed(o, text, "backend (stdio, pty, file or socket)")
    chardev_id = _id(o, "-chardev", p.need("id"))
    return _chardev_from(o, backend, p, chardev_id)


def _parse_serial(text: str) -> ChardevConfig | str | None:
    """A ChardevConfig, the id of a ``-chardev`` (``chardev:ID``), or None (``none``)."""
    o = "-serial"
    if text.startswith("chardev:"):
        ref = text[len("chardev:"):]
        if not ref or "," in ref:
            raise ConfigError(o, f"'{text}': use chardev:ID")
        return ref
    if text == "none":
        return None
    backend, p = _typed(o, text, "backend (stdio, pty, file, socket or chardev:ID)")
    if "id" in p.d:
        raise ConfigError(o, "id= is not accepted here (use -chardev ...,id=ID and -serial chardev:ID)")
    return _chardev_from(o, backend, p, SERIAL_CHARDEV_ID)


def _parse_object(text: str) -> RngObjectConfig:
    o = "-object"
    kind, p = _typed(o, text, "object type (rng-random)")
    if kind != "rng-random":
        if kind.startswith("memory-backend"):
            raise ConfigError(o, f"{kind} is not supported (use -m, -mem-path)")
        raise ConfigError(o, f"unknown object type '{kind}' (only rng-random)")
    obj_id = _id(o, "rng-random", p.need("id"))
    filename = _path(o, "filename", p.need("filename"))
    p.finish()
    return RngObjectConfig(id=obj_id, filename=filename)


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
    p.finish()
    return IncomingConfig(path=path, mapped=mapped)


_UNSUPPORTED_DEVICE_HINT = {
    "virtserialport": "only virtconsole ports are supported",
    "virtio-balloon-device": "balloon is not supported",
    "vhost-user-fs-device": "virtio-fs is not supported",
    "vfio-pci": "vfio needs q35, which is not supported yet",
}


def _parse_device(text: str) -> tuple[str, _Props]:
    o = "-device"
    driver, p = _typed(o, text, "device driver")
    if driver == "vhost-vsock-device":
        _refuse_vsock(p)
    if driver not in DEVICE_DRIVERS:
        if driver in _UNSUPPORTED_DEVICE_HINT:
            reason = _UNSUPPORTED_DEVICE_HINT[driver]
        elif driver.endswith("-pci"):
            reason = "PCI devices need q35, which is not supported yet"
        else:
            reason = "unknown device"
        raise ConfigError(o, f"'{driver}': {reason} (microvm supports: {', '.join(DEVICE_DRIVERS)})")
    for prop in ("bus", "addr", "multifunction"):
        p.refuse(prop, "not used on microvm (virtio-mmio has no bus address)")
    return driver, p


def _rng_limit(who: str, max_raw: str | None, period_raw: str | None) -> tuple[int | None, int | None]:
    """StratoVirt's rules: both or neither; max-bytes*1000/period (bytes per
    second) within 64..1000000000."""
    from stratopy.devices.virtio.rng import MAX_BYTES_PER_SEC, MIN_BYTES_PER_SEC

    o = "-device"
    if (max_raw is None) != (period_raw is None):
        raise ConfigError(o, f"{who}: max-bytes and period go together (give both or neither)")
    if max_raw is None:
        return None, None
    max_bytes = _int(o, "max-bytes", max_raw, 1, MAX_U64)
    period = _int(o, "period", period_raw, 1, MAX_U64)
    rate = max_bytes * 1000 // period
    if not MIN_BYTES_PER_SEC <= rate <= MAX_BYTES_PER_SEC:
        raise ConfigError(o, f"{who}: max-bytes*1000/period is {rate} bytes per second, "
                             f"outside {MIN_BYTES_PER_SEC}..{MAX_BYTES_PER_SEC}")
    return max_bytes, period


def _refuse_vsock(p: _Props) -> None:
    """``vhost-vsock-device,id=ID,guest-cid=N[,vhostfd=FD]`` (what Kata
    starts) is understood, checked, then refused: stratopy has no vsock
    device yet, and the VM must not start without the one channel Kata's
    agent talks over."""
    o = "-device"
    dev_id = _id(o, "vhost-vsock-device", p.need("id"))
    cid = _int(o, "guest-cid", p.need("guest-cid"), 3, (1 << 32) - 2)   # 0-2 are reserved
    vhostfd = p.take("vhostfd")
    if vhostfd is not None:
        _tap_fd(o, "vhostfd", vhostfd)
    p.finish()
    raise ConfigError(o, f"vhost-vsock-device '{dev_id}' (guest-cid={cid}): vsock is not implemented "
                         "yet; the VM would start without its host channel")


def _mac(value: str) -> str:
    if not _MAC.fullmatch(value):
        raise ConfigError("-device", f"{NET}: mac '{value}' is malformed (use xx:xx:xx:xx:xx:xx)")
    mac = value.lower()
    first = int(mac[:2], 16)
    if first & 1:
        raise ConfigError("-device", f"{NET}: mac {mac} is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise ConfigError("-device", f"{NET}: mac 00:00:00:00:00:00 is not a usable address")
    return mac


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
            d = _parse_drive(value)
            if d.id in drives:
                raise ConfigError(opt, f"drive id '{d.id}' is defined twice")
            drives[d.id] = d
        elif opt == "-netdev":
            n = _parse_netdev(value)
            if n.id in netdevs:
                raise ConfigError(opt, f"netdev id '{n.id}' is defined twice")
            netdevs[n.id] = n
        elif opt == "-chardev":
            c = _parse_chardev(value)
            if c.id in chardevs:
                raise ConfigError(opt, f"chardev id '{c.id}' is defined twice")
            chardevs[c.id] = c
        elif opt == "-object":
            r = _parse_object(value)
            if r.id in rngs:
                raise ConfigError(opt, f"object id '{r.id}' is defined twice")
            rngs[r.id] = r
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

    devices = _build_devices(device_texts, drives, netdevs, chardevs, rngs, claim)

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

    return MachineConfig(
        drives=tuple(drives.values()),
        netdevs=tuple(netdevs.values()),
        chardevs=tuple(chardevs.values()),
        rng_objects=tuple(rngs.values()),
        devices=devices,
        qmp=tuple(qmps),
        **kw,
    )


def _build_devices(texts, drives, netdevs, chardevs, rngs, claim) -> tuple[DeviceConfig, ...]:
    o = "-device"
    devices: list[DeviceConfig] = []
    ids: set[str] = set()
    serial_bus: str | None = None  # id of the virtio-serial-device
    serial_port: DeviceConfig | None = None  # its virtconsole

    for index, text in enumerate(texts):
        driver, p = _parse_device(text)
        given_id = p.take("id")
        if given_id is None:
            if driver in (BLK, CONSOLE):
                raise ConfigError(o, f"{driver} requires id=")
            dev_id = f"{driver}.{index}"
        else:
            dev_id = _id(o, driver, given_id)
        if dev_id in ids:
            raise ConfigError(o, f"device id '{dev_id}' is used twice")
        ids.add(dev_id)
        who = f"{driver} '{dev_id}'"

        if driver == BLK:
            ref = p.need("drive")
            serial = p.take("serial")
            p.finish()
            drive = drives.get(ref)
            if drive is None:
                raise ConfigError(o, f"{who}: drive '{ref}' is not defined by -drive")
            claim("drive", ref, who, o)
            if serial is not None and len(serial) > MAX_BLK_SERIAL_LEN:
                raise ConfigError(o, f"{who}: serial is longer than {MAX_BLK_SERIAL_LEN} characters")
            if serial is not None and drive.serial is not None and serial != drive.serial:
                raise ConfigError(o, f"{who}: serial '{serial}' differs from drive '{ref}' serial '{drive.serial}'")
            devices.append(DeviceConfig(driver=BLK, id=dev_id, drive=drive,
                                        serial=serial if serial is not None else drive.serial))
        elif driver == NET:
            ref = p.need("netdev")
            mac_raw = p.take("mac")
            p.finish()
            netdev = netdevs.get(ref)
            if netdev is None:
                raise ConfigError(o, f"{who}: netdev '{ref}' is not defined by -netdev")
            claim("netdev", ref, who, o)
            mac = None if mac_raw is None else _mac(mac_raw)
            devices.append(DeviceConfig(driver=NET, id=dev_id, netdev=netdev, mac=mac))
        elif driver == SERIAL:
            max_ports = p.take("max_ports")
            if max_ports is not None and _int(o, "max_ports", max_ports, 1, 31) != 1:
                raise ConfigError(o, f"{who}: max_ports must be 1 on microvm (one virtconsole)")
            p.finish()
            if serial_bus is not None:
                raise ConfigError(o, f"{who}: only one virtio-serial-device is supported")
            serial_bus = dev_id
            devices.append(DeviceConfig(driver=SERIAL, id=dev_id))
        elif driver == CONSOLE:
            ref = p.need("chardev")
            nr = p.take("nr")
            if nr is not None and _int(o, "nr", nr, 0, 31) != 0:
                raise ConfigError(o, f"{who}: nr must be 0 (port 0 is the console)")
            p.finish()
            if serial_bus is None:
                raise ConfigError(o, f"{who}: needs a virtio-serial-device before it on the command line")
            if serial_port is not None:
                raise ConfigError(o, f"{who}: the virtio-serial-device already has a console ('{serial_port.id}')")
            chardev = chardevs.get(ref)
            if chardev is None:
                raise ConfigError(o, f"{who}: chardev '{ref}' is not defined by -chardev")
            claim("chardev", ref, who, o)
            serial_port = DeviceConfig(driver=CONSOLE, id=dev_id, chardev=chardev, bus=serial_bus)
            devices.append(serial_port)
        else:  # RNG
            ref = p.need("rng")
            max_bytes, period = _rng_limit(who, p.take("max-bytes", "max_bytes"), p.take("period"))
            p.finish()
            rng = rngs.get(ref)
            if rng is None:
                raise ConfigError(o, f"{who}: rng object '{ref}' is not defined by -object rng-random")
            devices.append(DeviceConfig(driver=RNG, id=dev_id, rng=rng,
                                        max_bytes=max_bytes, period=period))

    # The virtio-serial-device carries its console's chardev for the builder.
    if serial_port is not None:
        devices = [
            DeviceConfig(driver=SERIAL, id=d.id, chardev=serial_port.chardev)
            if d.driver == SERIAL else d
            for d in devices
        ]
    return tuple(devices)
