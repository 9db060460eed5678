"""A stand-in for the kernel's vhost-vsock, inside the monitor, for hosts
without /dev/vhost-vsock (this one): the one test double of the kernel the
end-to-end tests use, and only for what cannot exist here.

    python -m tests.vhost_kernel_double UDS -- STRATOPY ARGS...

runs stratopy with ``VhostVsock.open`` answering every vhost ioctl from a
double that does what drivers/vhost/vsock.c does with them, from what the
ioctls said and nothing else: guest RAM only through the userspace
addresses of VHOST_SET_MEM_TABLE / VHOST_SET_VRING_ADDR, kicks only from the
eventfds of VHOST_SET_VRING_KICK (the slot's KVM ioeventfds), interrupts
only by writing the eventfds of VHOST_SET_VRING_CALL, the rings' positions
from VHOST_SET_VRING_BASE (and used->idx in guest memory, as
vhost_vq_init_access reads it), VHOST_GET_VRING_BASE answering the next
avail index, nothing touched while not running (SET_RUNNING 0 returns once
the worker is out of the rings, as the kernel's vq mutex makes it). The
packets themselves are served by stratopy's userspace vsock engine over
unix sockets at UDS (the kernel would use host AF_VSOCK sockets): what is
checked is the monitor's side of the vhost contract with a real guest
driver, not the kernel's vsock.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import sys
import threading
import time

from stratopy.devices.virtio import vhost
from stratopy.errors import GuestMemoryError

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class HvaMemory:
    """Guest RAM as the kernel sees it: the memory table's regions at their
    userspace addresses (the GuestMemory interface the queue code uses)."""

    def __init__(self, table: list[tuple[int, int, int]]):
        self.table = table

    def _hva(self, gpa: int, n: int) -> int:
        for g, size, hva in self.table:
            if g <= gpa and gpa + n <= g + size:
                return hva + (gpa - g)
        raise GuestMemoryError(gpa, n)

    def gpa_of(self, hva: int) -> int:
        for g, size, h in self.table:
            if h <= hva < h + size:
                return g + (hva - h)
        raise GuestMemoryError(hva, 0)

    def check(self, gpa: int, n: int) -> bool:
        try:
            self._hva(gpa, n)
            return True
        except GuestMemoryError:
            return False

    def read(self, gpa: int, n: int) -> bytes:
        return ctypes.string_at(self._hva(gpa, n), n)

    def write(self, gpa: int, data) -> None:
        data = bytes(data)
        ctypes.memmove(self._hva(gpa, len(data)), data, len(data))

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack(self.read(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return _U32.unpack(self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return _U64.unpack(self.read(gpa, 8))[0]

    def write_u16(self, gpa: int, v: int) -> None:
        self.write(gpa, _U16.pack(v))

    def write_u32(self, gpa: int, v: int) -> None:
        self.write(gpa, _U32.pack(v))

    def write_u64(self, gpa: int, v: int) -> None:
        self.write(gpa, _U64.pack(v))


class KernelDouble:
    FEATURES = (1 << 32) | (1 << 28) | (1 << 29) | (1 << 24) | (1 << 27)

    def __init__(self, uds: str):
        from stratopy.devices.virtio.vsock_muxer import unix_listen

        self.uds = uds
        self.lock = threading.Lock()
        self.owner = False
        self.acked = 0
        self.table: list[tuple[int, int, int]] = []
        self.vq = [dict(num=0, desc=0, used=0, avail=0, base=0, kick=-1, call=-1) for _ in range(2)]
        self.cid = 0
        self.running = False
        self.queues = None           # the engine's Queues while running
        self.engine = None
        self.watched: dict[int, tuple] = {}
        self.timers: list[tuple[float, object]] = []
        self.listener = unix_listen(uds)
        self.wake_r, self.wake_w = os.pipe()
        self.names = {getattr(vhost, n): n for n in vhost.IOCTL_NAMES}
        self.log: list[str] = []
        threading.Thread(target=self._worker, name="vhost-double", daemon=True).start()

    # --- the ioctls ----------------------------------------------------------------
    def __call__(self, fd: int, request: int, arg) -> int:
        name = self.names.get(request)
        if name is None:
            return -25                                        # ENOTTY
        obj = arg._obj if arg is not None else None
        with self.lock:
            self.log.append(name)
            if name == "VHOST_SET_OWNER":
                if self.owner:
                    return -16                                # EBUSY
                self.owner = True
            elif name == "VHOST_GET_FEATURES":
                obj.value = self.FEATURES
            elif name == "VHOST_SET_FEATURES":
                if obj.value & ~self.FEATURES:
                    return -95                                # EOPNOTSUPP
                self.acked = obj.value
            elif name == "VHOST_SET_MEM_TABLE":
                self.table = [(r.guest_phys_addr, r.memory_size, r.userspace_addr)
                              for r in obj.regions[:obj.nregions]]
            elif name in ("VHOST_SET_VRING_NUM", "VHOST_SET_VRING_BASE", "VHOST_SET_VRING_ADDR"):
                if self.running:
                    return -16                                # EBUSY: moving an active ring
                v = self.vq[obj.index]
                if name == "VHOST_SET_VRING_NUM":
                    v["num"] = obj.num
                elif name == "VHOST_SET_VRING_BASE":
                    v["base"] = obj.num
                else:
                    v.update(desc=obj.desc_user_addr, used=obj.used_user_addr,
                             avail=obj.avail_user_addr)
            elif name == "VHOST_GET_VRING_BASE":
                v = self.vq[obj.index]
                obj.num = self.queues[obj.index].next_avail if self.queues else v["base"]
            elif name == "VHOST_SET_VRING_KICK":
                self.vq[obj.index]["kick"] = obj.fd
            elif name == "VHOST_SET_VRING_CALL":
                self.vq[obj.index]["call"] = obj.fd
            elif name == "VHOST_VSOCK_SET_GUEST_CID":
                self.cid = obj.value
            elif name == "VHOST_VSOCK_SET_RUNNING":
                ret = self._start() if obj.value else self._stop()
                if ret:
                    return ret
        os.write(self.wake_w, b"x")
        return 0

    def _start(self) -> int:
        from stratopy.devices.virtio.queue import Queue
        from stratopy.devices.virtio.vsock import VsockDevice
        from stratopy.devices.virtio.vsock_muxer import VsockMuxer, unix_connect

        if self.running:
            return 0
        mem = HvaMemory(self.table)
        queues = []
        for v in self.vq:
            q = Queue(1 << 15)
            q.size, q.ready = v["num"], True
            try:
                q.desc_table, q.avail_ring, q.used_ring = (mem.gpa_of(v["desc"]),
                                                           mem.gpa_of(v["avail"]),
                                                           mem.gpa_of(v["used"]))
                q.next_avail = v["base"]
                q.next_used = mem.read_u16(q.used_ring + 2)   # vhost_vq_init_access
            except GuestMemoryError:
                return -14                                    # EFAULT
            queues.append(q)
        queues.append(Queue(64))                              # the event queue is not ours
        if self.engine is None:
            muxer = VsockMuxer(self.uds, self.listener, self._watch, unix_connect,
                               lambda d, fn: self.timers.append((time.monotonic() + d, fn)))
            self.engine = VsockDevice(self.cid, muxer)
        self.engine.acked_features = self.acked
        self.engine.activate(mem, queues, self._signal)
        self.queues = queues
        self.running = True
        return 0

    def _stop(self) -> int:
        if self.running:
            v0, v1 = self.vq
            v0["base"], v1["base"] = self.queues[0].next_avail, self.queues[1].next_avail
            self.running = False
            self.engine.activated = False
        return 0

    def _signal(self, q: int) -> None:
        if q < 2 and self.vq[q]["call"] >= 0:
            os.eventfd_write(self.vq[q]["call"], 1)

    def _watch(self, fd, cb, read, write) -> None:
        if cb is None or not (read or write):
            self.watched.pop(fd, None)
        else:
            self.watched[fd] = (cb, read, write)

    # --- the worker ------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            with self.lock:
                kicks = {v["kick"]: i for i, v in enumerate(self.vq) if v["kick"] >= 0} \
                    if self.running else {}
                rd = [self.wake_r, *kicks] + [fd for fd, (_, r, _w) in self.watched.items() if r]
                wr = [fd for fd, (_, _r, w) in self.watched.items() if w]
            try:
                r, w, _ = select.select(rd, wr, [], 0.05)
            except OSError:
                continue              # an fd closed under us: look again
            with self.lock:
                if self.wake_r in r:
                    os.read(self.wake_r, 4096)
                now = time.monotonic()
                due = [t for t in self.timers if t[0] <= now]
                self.timers = [t for t in self.timers if t[0] > now]
                for _, fn in due:
                    fn()
                for fd in set(r) | set(w):
                    if fd in kicks and self.running:
                        try:
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            continue
                        self.engine.process_queue(kicks[fd])
                    elif fd in self.watched:
                        self.watched[fd][0]()


def main() -> None:
    uds, sep, *argv = sys.argv[1:]
    assert sep == "--" and argv, __doc__
    double = KernelDouble(uds)

    def fake_open(cls, vhostfd):
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC) if vhostfd is None else vhostfd
        return cls(fd, owned=True, ioctl=double)
    vhost.VhostVsock.open = classmethod(fake_open)
    from stratopy.cli import main as stratopy_main

    sys.argv = ["stratopy", *argv]
    raise SystemExit(stratopy_main())


if __name__ == "__main__":
    main()
