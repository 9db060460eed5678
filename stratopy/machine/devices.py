"""Device factory: a slot's DeviceConfig -> (VirtioDevice, backend).

Backends (files, taps, chardevs, entropy sources) are opened here, outside
device logic, and injected.
"""

from __future__ import annotations

import os

from stratopy import config as cfgmod
from stratopy.errors import ConfigError, StratoError
from stratopy.logs import get_logger

log = get_logger(__name__)


def open_drive(drive: cfgmod.DriveConfig, option: str = "-drive"):
    """The FileBackend of a drive (ConfigError naming ``option`` when it cannot open)."""
    from stratopy.devices.virtio.block import FileBackend

    try:
        backend = FileBackend(drive.file, readonly=drive.readonly, direct=drive.direct)
    except OSError as e:
        raise ConfigError(option, f"cannot open {drive.file}: {e.strerror}") from None
    warning = getattr(backend, "warning", None)
    if warning:
        log.warning("%s", warning)
    return backend


def open_tap(nd: cfgmod.NetdevConfig):
    """The Tap of a netdev (StratoError when it cannot be opened/adopted)."""
    from stratopy.devices.virtio.tap import Tap

    tap = Tap(ifname=nd.ifname, fd=nd.fd)
    try:
        for fd in nd.extra_fds:
            tap.drop_extra_queue(fd)
    except BaseException:
        tap.close()
        raise
    return tap


def device_thread_timer(loop):
    """``call_later(delay, fn)`` for a device: ``fn`` runs on the device
    thread after ``delay`` s. Devices call it from a vCPU thread too (an MMIO
    queue notify or config write): the timer heap belongs to the device
    thread, so the timer is armed there."""
    def call_later(delay: float, fn) -> None:
        loop.call_soon(lambda: loop.call_later(delay, fn))
    return call_later


def mac_bytes(mac: str | None) -> bytes | None:
    return bytes(int(x, 16) for x in mac.split(":")) if mac else None


def make_device(machine, slot):
    d = slot.config
    if d is None:
        # A reserved hot-replace slot with no backend (StratoVirt's
        # replaceable device before device_add): a block device of capacity
        # 0, a net device with no tap and its link down.
        if slot.kind == "blk":
            from stratopy.devices.virtio.block import BlockDevice
            return BlockDevice(None), None
        if slot.kind == "net":
            from stratopy.devices.virtio.net import NetDevice
            return NetDevice(None, link_up=False), None
        raise StratoError(f"virtio-mmio slot {slot.index} has no device")
    if d.driver == cfgmod.BLK:
        from stratopy.devices.virtio.block import BlockDevice

        backend = open_drive(d.drive)
        return BlockDevice(backend, serial=d.serial or ""), backend
    if d.driver == cfgmod.RNG:
        from stratopy.devices.virtio.rng import RngDevice

        from stratopy import files

        # a character device or regular file, non-blocking (never a FIFO or
        # a directory): an empty source gives the guest 0 bytes, no stall
        fd = files.open_entropy_source(d.rng.filename, f"-object rng-random '{d.rng.id}'")

        class Source:
            def __call__(self, n: int) -> bytes:
                return os.read(fd, n)

            def close(self) -> None:
                os.close(fd)
        src = Source()
        if d.max_bytes is None:
            return RngDevice(src), src
        from stratopy.devices.virtio.rng import RateLimiter

        return RngDevice(src, limiter=RateLimiter(d.max_bytes, d.period),
                         call_later=device_thread_timer(machine.loop)), src
    if d.driver == cfgmod.SERIAL:
        from stratopy.chardev import Chardev
        from stratopy.devices.virtio.console import ConsoleDevice

        ch = None
        out = lambda data: None  # noqa: E731
        if d.chardev is not None and d.chardev.id not in machine.deferred_backends:
            ch = Chardev(d.chardev)
            ch.open()
            machine.chardevs.append(ch)
            out = ch.write
        return ConsoleDevice(out=out), ch
    if d.driver == cfgmod.NET:
        from stratopy.devices.virtio.net import NetDevice

        # a template server's pool member: the request brings the tap
        tap = None if d.netdev.id in machine.deferred_backends else open_tap(d.netdev)
        return NetDevice(tap, mac=mac_bytes(d.mac)), tap
    if d.driver == cfgmod.VSOCK:
        return make_vsock(machine.loop, d)
    if d.driver == cfgmod.VHOST_VSOCK:
        return make_vhost_vsock(d)
    if d.driver == cfgmod.BALLOON:
        from stratopy.devices.virtio.balloon import BalloonDevice

        def actual_changed(guest_bytes: int) -> None:
            machine.event_sink("BALLOON_CHANGED", {"actual": guest_bytes})
        mem = machine.mem
        return BalloonDevice(mem.size, mem.discard, deflate_on_oom=d.deflate_on_oom,
                             free_page_reporting=d.free_page_reporting,
                             actual_changed=actual_changed,
                             call_later=device_thread_timer(machine.loop)), None
    raise StratoError(f"device {d.driver} is not supported")


def make_vsock(loop, d: cfgmod.DeviceConfig):
    """The userspace virtio-vsock device and its muxer (the backend: closing
    it closes every connection and the listener at ``uds-path``)."""
    from stratopy.devices.virtio.vsock import VsockDevice
    from stratopy.devices.virtio.vsock_muxer import VsockMuxer, unix_connect, unix_listen

    try:
        listener = unix_listen(d.uds_path)
    except OSError as e:
        raise ConfigError("-device", f"{cfgmod.VSOCK} '{d.id}': cannot listen on uds-path "
                                     f"{d.uds_path}: {e.strerror}") from None
    muxer = VsockMuxer(d.uds_path, listener, loop.watch, unix_connect, device_thread_timer(loop))
    return VsockDevice(d.guest_cid, muxer), muxer


def make_vhost_vsock(d: cfgmod.DeviceConfig):
    """The kernel vhost-vsock device on /dev/vhost-vsock or the inherited
    ``vhostfd`` (the backend: closing it closes the fd and the call
    eventfds); ConfigError in one line when neither is a usable device."""
    from stratopy.devices.virtio.vhost import VhostError, VhostVsock
    from stratopy.devices.virtio.vhost_vsock import VhostVsockDevice

    try:
        backend = VhostVsock.open(d.vhostfd)
    except VhostError as e:
        raise ConfigError("-device", f"{cfgmod.VHOST_VSOCK} '{d.id}': {e}") from None
    return VhostVsockDevice(d.guest_cid, backend), backend


def kernel_call_cb(efd: int, slot, q: int):
    """The reader of a kernel queue's call eventfd: the kernel used buffers
    of queue ``q``; the slot's interrupt, with InterruptStatus set."""
    def cb() -> None:
        try:
            os.eventfd_read(efd)
        except BlockingIOError:
            return
        slot.transport.signal_used(q)
    return cb


def watch_kernel_calls(loop, slot) -> None:
    """The device thread reads the call eventfds of a vhost device's queues."""
    for q, call_fd in zip(slot.device.kernel_queues, slot.backend.call_fds):
        loop.add_reader(call_fd, kernel_call_cb(call_fd, slot, q))
