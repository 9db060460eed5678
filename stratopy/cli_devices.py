"""The device-side options of StratoVirt's command line: ``-drive``,
``-netdev``, ``-chardev``, ``-serial``, ``-object`` and ``-device`` (each
device's properties, and the references between them resolved by
:func:`_build_devices`). Pure, like :mod:`stratopy.cli_parse`, which calls
these; docs/cli.md describes every rule.
"""

from __future__ import annotations

import re

from stratopy.cli_values import (
    MAX_BLK_SERIAL_LEN,
    MAX_NET_QUEUE_PAIRS,
    MAX_U64,
    SERIAL_CHARDEV_ID,
    _Props,
    _id,
    _int,
    _path,
    _sock_path,
    _split,
    _typed,
)
from stratopy.config import (
    BALLOON,
    BLK,
    CONSOLE,
    ChardevConfig,
    DEVICE_DRIVERS,
    DeviceConfig,
    DriveConfig,
    NET,
    NetdevConfig,
    RNG,
    RngObjectConfig,
    SERIAL,
    VSOCK,
    VHOST_VSOCK,
)
from stratopy.errors import ConfigError

_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}", re.ASCII)


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
        # One rule for the command line, QMP and the tap itself (imported
        # here: a start without -netdev ifname= does not need it).
        from stratopy.cli_parse import one_line
        from stratopy.devices.virtio.tap import ifname_problem

        problem = ifname_problem(ifname)
        if problem is not None:
            raise ConfigError(o, f"ifname '{one_line(ifname)}' is not a valid interface name: "
                                 f"it {problem}")
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


_UNSUPPORTED_DEVICE_HINT = {
    "virtserialport": "only virtconsole ports are supported",
    "vhost-user-fs-device": "virtio-fs is not supported",
    "vfio-pci": "vfio is not supported",
}


def _parse_device(text: str, machine: str = "microvm") -> tuple[str, _Props]:
    o = "-device"
    driver, p = _typed(o, text, "device driver")
    if machine == "q35":
        from stratopy import cli_pci
        cli_pci.check_pci_driver(driver)
        return driver, p
    if driver not in DEVICE_DRIVERS:
        if driver in _UNSUPPORTED_DEVICE_HINT:
            reason = _UNSUPPORTED_DEVICE_HINT[driver]
        elif driver.endswith("-pci"):
            reason = "PCI devices need -machine q35"
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


def _guest_cid(p: _Props) -> int:
    return _int("-device", "guest-cid", p.need("guest-cid"), 3, (1 << 32) - 2)   # 0-2 are reserved


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


def _backend(o: str, kind: str, table: dict, ref: str, who: str, claim):
    """The -drive/-netdev/-chardev ``ref`` a device names, claimed for ``who``
    (one device each)."""
    found = table.get(ref)
    if found is None:
        raise ConfigError(o, f"{who}: {kind} '{ref}' is not defined by -{kind}")
    claim(kind, ref, who, o)
    return found


def _build_devices(texts, drives, netdevs, chardevs, rngs, claim,
                   machine: str = "microvm") -> tuple[DeviceConfig, ...]:
    o = "-device"
    pci_of: dict[str, tuple] = {}       # q35: device id -> (bus, slot, fn, multifunction)
    devices: list[DeviceConfig] = []
    ids: set[str] = set()
    serial_bus: str | None = None  # id of the virtio-serial-device
    serial_port: DeviceConfig | None = None  # its virtconsole
    # inherited fds the netdevs already take (a vhostfd must be another one)
    fds_in_use = {fd for nd in netdevs.values() for fd in (nd.fd, *nd.extra_fds) if fd is not None}

    for index, text in enumerate(texts):
        driver, p = _parse_device(text, machine)
        pci_name = None
        if machine == "q35" and driver != CONSOLE:
            from stratopy import cli_pci
            if driver == cli_pci.ROOT_PORT:
                devices.append(cli_pci.root_port_config(p, _id(o, driver, p.need("id"))))
                if devices[-1].id in ids:
                    raise ConfigError(o, f"device id '{devices[-1].id}' is used twice")
                ids.add(devices[-1].id)
                continue
            pci_name, driver = driver, cli_pci.PCI_DRIVERS[driver]
        given_id = p.take("id")
        if pci_name is not None:
            pci_of[given_id or f"{driver}.{index}"] = cli_pci.take_placement(
                p, f"{pci_name} '{given_id or index}'")
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
            drive = _backend(o, "drive", drives, ref, who, claim)
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
            netdev = _backend(o, "netdev", netdevs, ref, who, claim)
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
            chardev = _backend(o, "chardev", chardevs, ref, who, claim)
            serial_port = DeviceConfig(driver=CONSOLE, id=dev_id, chardev=chardev, bus=serial_bus)
            devices.append(serial_port)
        elif driver == VSOCK:
            cid = _guest_cid(p)
            uds = _sock_path(o, "uds-path", p.need("uds-path"))
            p.finish()
            if any(d.driver in (VSOCK, VHOST_VSOCK) for d in devices):
                raise ConfigError(o, f"{who}: only one vsock device is supported")
            devices.append(DeviceConfig(driver=VSOCK, id=dev_id, guest_cid=cid, uds_path=uds))
        elif driver == VHOST_VSOCK:
            # StratoVirt's vhost-vsock-device,id=,guest-cid=[,vhostfd=]: the
            # kernel's data path on /dev/vhost-vsock or the inherited fd
            # (Kata's); opened and checked when the machine is built
            cid = _guest_cid(p)
            raw_fd = p.take("vhostfd")
            vhostfd = None if raw_fd is None else _tap_fd(o, "vhostfd", raw_fd)
            p.finish()
            if any(d.driver in (VSOCK, VHOST_VSOCK) for d in devices):
                raise ConfigError(o, f"{who}: only one vsock device is supported")
            if vhostfd is not None and vhostfd in fds_in_use:
                raise ConfigError(o, f"{who}: vhostfd={vhostfd} is also a -netdev tap fd")
            devices.append(DeviceConfig(driver=VHOST_VSOCK, id=dev_id, guest_cid=cid,
                                        vhostfd=vhostfd))
        elif driver == BALLOON:
            # StratoVirt: deflate-on-oom / free-page-reporting, default off;
            # one balloon per VM
            deflate = p.take_bool(False, "deflate-on-oom", "deflate_on_oom")
            reporting = p.take_bool(False, "free-page-reporting", "free_page_reporting")
            p.finish()
            if any(d.driver == BALLOON for d in devices):
                raise ConfigError(o, f"{who}: only one balloon device is supported for each VM")
            devices.append(DeviceConfig(driver=BALLOON, id=dev_id, deflate_on_oom=deflate,
                                        free_page_reporting=reporting))
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
    if machine == "q35":
        from stratopy import cli_pci
        devices = [d.replace(pci=pci_of[d.id]) if d.id in pci_of else d for d in devices]
        cli_pci.check_topology(devices)
    return tuple(devices)
