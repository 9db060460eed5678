"""Device factory: a slot's DeviceConfig -> (VirtioDevice, backend).

Backends (files, taps, chardevs, entropy sources) are opened here, outside
device logic, and injected.
"""

from __future__ import annotations

import logging
import os

from stratopy import config as cfgmod
from stratopy.errors import ConfigError, StratoError

log = logging.getLogger(__name__)


def make_device(machine, slot):
    d = slot.config
    if d.driver == cfgmod.BLK:
        from stratopy.devices.virtio.block import BlockDevice, FileBackend

        drive = d.drive
        try:
            backend = FileBackend(drive.file, readonly=drive.readonly, direct=drive.direct)
        except OSError as e:
            raise ConfigError("-drive", f"cannot open {drive.file}: {e.strerror}") from None
        warning = getattr(backend, "warning", None)
        if warning:
            log.warning("%s", warning)
        return BlockDevice(backend, serial=d.serial or ""), backend
    if d.driver == cfgmod.RNG:
        from stratopy.devices.virtio.rng import RngDevice

        path = d.rng.filename
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError("-object", f"rng-random {path}: {e.strerror}") from None

        class Source:
            def __call__(self, n: int) -> bytes:
                return os.read(fd, n)

            def close(self) -> None:
                os.close(fd)
        src = Source()
        return RngDevice(src), src
    if d.driver == cfgmod.SERIAL:
        from stratopy.chardev import Chardev
        from stratopy.devices.virtio.console import ConsoleDevice

        ch = None
        out = lambda data: None  # noqa: E731
        if d.chardev is not None:
            ch = Chardev(d.chardev)
            ch.open()
            machine.chardevs.append(ch)
            out = ch.write
        return ConsoleDevice(out=out), ch
    if d.driver == cfgmod.NET:
        from stratopy.devices.virtio.net import NetDevice
        from stratopy.devices.virtio.tap import Tap

        nd = d.netdev
        tap = Tap(ifname=nd.ifname, fd=nd.fd)
        mac = bytes(int(x, 16) for x in d.mac.split(":")) if d.mac else None
        dev = NetDevice(tap, mac=mac)
        return dev, tap
    raise StratoError(f"device {d.driver} is not supported")
