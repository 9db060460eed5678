"""vhost-vsock-device: the ioctl ABI, the exact ioctl sequence that hands
rx/tx to the kernel, the memory table, the eventfd wiring, templates and
the one-line errors.

This host has no /dev/vhost-vsock (and no kernel modules), so the kernel
side is a recording double of the ioctl call (``FakeVhost``): the only test
double of the kernel in this suite. The numbers it is called with are
pinned to <linux/vhost.h> by compiling vhost_abi.c against the host's
header (and to literal values when no compiler is there).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from stratopy.cli_parse import parse_args
from stratopy.config import VHOST_VSOCK
from stratopy.devices.virtio import mmio, vhost
from stratopy.devices.virtio.device import STATUS_DRIVER_OK, VIRTIO_F_VERSION_1
from stratopy.devices.virtio.vhost import VhostError, VhostVsock
from stratopy.devices.virtio.vhost_vsock import VhostVsockDevice, VhostVsockState
from stratopy.errors import ConfigError, TemplateError
from stratopy.memory import GuestMemory
from tests.unit.virtio_driver import Driver

ABI_C = Path(__file__).with_name("vhost_abi.c")

# `gcc tests/unit/vhost_abi.c && ./a.out` on x86_64 (Linux 6.1 headers)
EXPECTED = {
    ("sizeof", "vhost_vring_state"): 8, ("sizeof", "vhost_vring_file"): 8,
    ("sizeof", "vhost_vring_addr"): 40, ("sizeof", "vhost_memory_region"): 32,
    ("sizeof", "vhost_memory"): 8,
    ("offsetof", "vhost_vring_state.index"): 0, ("offsetof", "vhost_vring_state.num"): 4,
    ("offsetof", "vhost_vring_file.index"): 0, ("offsetof", "vhost_vring_file.fd"): 4,
    ("offsetof", "vhost_vring_addr.index"): 0, ("offsetof", "vhost_vring_addr.flags"): 4,
    ("offsetof", "vhost_vring_addr.desc_user_addr"): 8,
    ("offsetof", "vhost_vring_addr.used_user_addr"): 16,
    ("offsetof", "vhost_vring_addr.avail_user_addr"): 24,
    ("offsetof", "vhost_vring_addr.log_guest_addr"): 32,
    ("offsetof", "vhost_memory_region.guest_phys_addr"): 0,
    ("offsetof", "vhost_memory_region.memory_size"): 8,
    ("offsetof", "vhost_memory_region.userspace_addr"): 16,
    ("offsetof", "vhost_memory_region.flags_padding"): 24,
    ("offsetof", "vhost_memory.nregions"): 0, ("offsetof", "vhost_memory.padding"): 4,
    ("offsetof", "vhost_memory.regions"): 8,
    ("ioctl", "VHOST_GET_FEATURES"): 2148052736, ("ioctl", "VHOST_SET_FEATURES"): 1074310912,
    ("ioctl", "VHOST_SET_OWNER"): 44801, ("ioctl", "VHOST_RESET_OWNER"): 44802,
    ("ioctl", "VHOST_SET_MEM_TABLE"): 1074310915, ("ioctl", "VHOST_SET_VRING_NUM"): 1074310928,
    ("ioctl", "VHOST_SET_VRING_ADDR"): 1076408081, ("ioctl", "VHOST_SET_VRING_BASE"): 1074310930,
    ("ioctl", "VHOST_GET_VRING_BASE"): 3221794578, ("ioctl", "VHOST_SET_VRING_KICK"): 1074310944,
    ("ioctl", "VHOST_SET_VRING_CALL"): 1074310945,
    ("ioctl", "VHOST_VSOCK_SET_GUEST_CID"): 1074311008,
    ("ioctl", "VHOST_VSOCK_SET_RUNNING"): 1074048865,
}


def python_abi() -> dict:
    out = {}
    for (kind, name) in EXPECTED:
        if kind == "sizeof":
            out[(kind, name)] = ctypes.sizeof(getattr(vhost, name))
        elif kind == "offsetof":
            s, m = name.split(".")
            out[(kind, name)] = getattr(getattr(vhost, s), m).offset if s != "vhost_memory" or \
                m != "regions" else vhost.vhost_memory_n(1).regions.offset
        else:
            out[(kind, name)] = getattr(vhost, name)
    return out


def test_abi_matches_the_literal_header_values():
    assert python_abi() == EXPECTED
    assert set(vhost.IOCTL_NAMES) == {n for k, n in EXPECTED if k == "ioctl"}


def test_abi_matches_this_hosts_header(tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "no C compiler: the literal values above are the check"
    exe = tmp_path / "vhost_abi"
    subprocess.run([cc, "-o", str(exe), str(ABI_C)], check=True, timeout=60)
    live = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True,
                               timeout=10).stdout.splitlines():
        kind, name, value = line.split()
        live[(kind, name)] = int(value)
    assert set(live) == set(EXPECTED), "vhost_abi.c and EXPECTED are out of sync"
    assert python_abi() == live


# --- the kernel double --------------------------------------------------------------

NAMES = {getattr(vhost, n): n for n in vhost.IOCTL_NAMES}
KERNEL_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << 1) | (1 << 28) | (1 << 29)  # + SEQPACKET, INDIRECT, EVENT_IDX


class FakeVhost:
    """Records every ioctl as (name, decoded argument); answers the GETs;
    ``fail[name] = errno`` makes that one fail."""

    def __init__(self, fd: int = 1000):
        self.fd = fd
        self.calls: list[tuple] = []
        self.fail: dict[str, int] = {}
        self.bases = {0: 0, 1: 0}

    def __call__(self, fd: int, request: int, arg) -> int:
        assert fd == self.fd
        name = NAMES[request]          # an unknown number fails here
        obj = arg._obj if arg is not None else None
        if name in ("VHOST_SET_OWNER", "VHOST_RESET_OWNER"):
            rec = None
        elif name == "VHOST_GET_FEATURES":
            obj.value = KERNEL_FEATURES
            rec = None
        elif name in ("VHOST_SET_FEATURES", "VHOST_VSOCK_SET_GUEST_CID", "VHOST_VSOCK_SET_RUNNING"):
            rec = obj.value
        elif name == "VHOST_SET_MEM_TABLE":
            assert ctypes.sizeof(obj) == 8 + 32 * obj.nregions and obj.padding == 0
            rec = [(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.flags_padding)
                   for r in obj.regions[:obj.nregions]]
        elif name in ("VHOST_SET_VRING_NUM", "VHOST_SET_VRING_BASE"):
            rec = (obj.index, obj.num)
            if name == "VHOST_SET_VRING_BASE":
                self.bases[obj.index] = obj.num
        elif name == "VHOST_GET_VRING_BASE":
            obj.num = self.bases[obj.index]
            rec = obj.index
        elif name == "VHOST_SET_VRING_ADDR":
            rec = (obj.index, obj.flags, obj.desc_user_addr, obj.used_user_addr,
                   obj.avail_user_addr, obj.log_guest_addr)
        else:                                        # KICK, CALL
            rec = (obj.index, obj.fd)
        self.calls.append((name, rec))
        if name in self.fail:
            return -self.fail[name]
        return 0

    def take(self) -> list[tuple]:
        out, self.calls = self.calls, []
        return out


@pytest.fixture
def kicks():
    fds = {0: os.eventfd(0, os.EFD_NONBLOCK), 1: os.eventfd(0, os.EFD_NONBLOCK)}
    yield fds
    for fd in fds.values():
        os.close(fd)


def make(kicks, cid=3, fake=None):
    fake = fake or FakeVhost()
    backend = VhostVsock(fake.fd, owned=False, ioctl=fake)
    dev = VhostVsockDevice(cid, backend)
    dev.kick_fds.update(kicks)
    return dev, backend, fake



@pytest.mark.parametrize("cid", [0, 2, (1 << 32) - 1])
def test_reserved_guest_cid_is_refused(kicks, cid):
    """The same range as the userspace device (VsockShared._set_guest_cid)."""
    with pytest.raises(ValueError, match="reserved or out of range"):
        make(kicks, cid=cid)

def expected_activation(drv, backend, kicks, acked, bases=(0, 0), cid=3, size=16):
    region = drv.mem.regions[0]
    seq = [("VHOST_SET_FEATURES", acked),
           ("VHOST_SET_MEM_TABLE", [(r.gpa, r.size, r.host_addr, 0) for r in drv.mem.regions])]
    for q in (0, 1):
        dq = drv.queues[q]
        hva = lambda gpa: region.host_addr + gpa    # noqa: E731 - region 0 starts at gpa 0
        seq += [("VHOST_SET_VRING_NUM", (q, size)),
                ("VHOST_SET_VRING_ADDR", (q, 0, hva(dq.desc), hva(dq.used), hva(dq.avail), 0)),
                ("VHOST_SET_VRING_BASE", (q, bases[q])),
                ("VHOST_SET_VRING_KICK", (q, kicks[q])),
                ("VHOST_SET_VRING_CALL", (q, backend.call_fds[q]))]
    return seq + [("VHOST_VSOCK_SET_GUEST_CID", cid), ("VHOST_VSOCK_SET_RUNNING", 1)]


def test_open_sets_the_owner_then_asks_the_features(kicks):
    dev, backend, fake = make(kicks)
    assert fake.take() == [("VHOST_SET_OWNER", None), ("VHOST_GET_FEATURES", None)]
    # the transport offers the kernel's device bits (SEQPACKET) and VERSION_1,
    # never ring features the event queue's userspace code does not have
    drv = Driver(dev)
    assert drv.device_features() == (1 << VIRTIO_F_VERSION_1) | (1 << 1)
    assert drv.config(0, 8) == struct.pack("<Q", 3)
    assert len(backend.call_fds) == 2
    backend.close()


def test_driver_ok_hands_rx_and_tx_to_the_kernel_in_order(kicks):
    dev, backend, fake = make(kicks, cid=0x1234_5678)
    fake.take()
    drv = Driver(dev)
    acked = drv.init(queue_size=16)
    assert fake.take() == expected_activation(drv, backend, kicks, acked, cid=0x1234_5678)
    assert dev.running and not drv.broken
    # the userspace addresses are the guest's rings themselves
    dq = drv.queues[1]
    drv.mem.write(dq.desc, b"descriptor-bytes")
    hva = drv.mem.regions[0].host_addr + dq.desc
    assert ctypes.string_at(hva, 16) == b"descriptor-bytes"
    backend.close()


def test_memory_table_holds_every_ram_region(kicks):
    dev, backend, fake = make(kicks)
    drv = Driver(dev)
    # RAM below and above the 32-bit gap, as the machine lays it out
    drv.mem = drv.t.mem = GuestMemory.anonymous([(0, 1 << 20), (1 << 32, 2 << 20)])
    fake.take()
    drv.init()
    table = dict(fake.take())["VHOST_SET_MEM_TABLE"]
    r0, r1 = drv.mem.regions
    assert table == [(0, 1 << 20, r0.host_addr, 0), (1 << 32, 2 << 20, r1.host_addr, 0)]
    assert r0.host_addr and r1.host_addr and r0.host_addr != r1.host_addr
    backend.close()


def test_the_call_eventfd_raises_the_slot_interrupt_with_its_status(kicks):
    """The kernel writes a queue's call eventfd; the machine's reader sets
    InterruptStatus and raises the interrupt (an irqfd alone would leave
    the status 0 and Linux's virtio_mmio would ignore it)."""
    from stratopy.machine.devices import kernel_call_cb

    dev, backend, fake = make(kicks)
    drv = Driver(dev)
    drv.init()

    class Slot:
        transport = drv.t
    irqs = drv.irqs
    cb = kernel_call_cb(backend.call_fds[0], Slot, 0)
    cb()                                          # nothing written: nothing raised
    assert drv.irqs == irqs
    os.eventfd_write(backend.call_fds[0], 1)      # what the kernel's vhost worker does
    cb()
    assert drv.irqs == irqs + 1
    assert drv.r32(mmio.REG_INTERRUPT_STATUS) & mmio.INT_USED_RING
    backend.close()


def test_a_kick_the_monitor_sees_goes_to_the_kernel(kicks):
    dev, backend, fake = make(kicks)
    drv = Driver(dev)
    drv.init()
    drv.queues[1].kick()         # an MMIO QueueNotify write the ioeventfd did not take
    assert os.eventfd_read(kicks[1]) == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(kicks[0])
    backend.close()


def test_pause_stops_the_kernel_and_resume_restarts_it(kicks):
    dev, backend, fake = make(kicks)
    drv = Driver(dev)
    drv.init()
    fake.take()
    dev.pause()
    dev.pause()
    assert fake.take() == [("VHOST_VSOCK_SET_RUNNING", 0)]
    dev.resume()
    assert fake.take() == [("VHOST_VSOCK_SET_RUNNING", 1)]
    # a driver that starts the device while the VM is paused: started on resume
    dev.pause()
    drv.w32(mmio.REG_STATUS, 0)
    fake.take()
    drv.init()
    assert ("VHOST_VSOCK_SET_RUNNING", 1) not in fake.take()
    dev.resume()
    assert fake.take() == [("VHOST_VSOCK_SET_RUNNING", 1)]
    backend.close()


def test_driver_reset_stops_the_kernel_and_forgets_the_positions(kicks):
    dev, backend, fake = make(kicks)
    drv = Driver(dev)
    drv.init()
    fake.bases = {0: 7, 1: 9}
    dev.pause()
    dev.state()
    fake.take()
    drv.w32(mmio.REG_STATUS, 0)
    assert not dev.running and dev.bases == [0, 0]
    dev.resume()                   # the VM runs on; the device is not active: nothing to start
    assert fake.take() == []
    acked = drv.init()
    assert fake.take() == expected_activation(drv, backend, kicks, acked)
    backend.close()


def test_template_saves_the_kernel_positions_and_a_clone_restores_them(kicks):
    # the source: paused, state taken (VHOST_GET_VRING_BASE of rx and tx)
    dev, backend, fake = make(kicks)
    drv = Driver(dev)
    acked = drv.init()
    fake.bases = {0: 5, 1: 0xFFFE}
    fake.take()
    dev.pause()
    st = dev.state()
    assert fake.take() == [("VHOST_VSOCK_SET_RUNNING", 0), ("VHOST_GET_VRING_BASE", 0),
                           ("VHOST_GET_VRING_BASE", 1)]
    assert st == VhostVsockState(guest_cid=3, acked_features=acked, last_avail_idx=[5, 0xFFFE])
    mmio_state = drv.t.state()
    # the driver had posted an event buffer before the snapshot
    ev = drv.queues[2]
    buf = drv.alloc(8)
    ev.add([(buf, 8, True)])
    drv.mem.write(buf, b"\xff" * 8)
    # the clone: its own vhost-vsock fd and cid, the template's memory
    fake2 = FakeVhost(fd=2000)
    dev2, backend2, _ = make(kicks, cid=9, fake=fake2)
    fake2.take()
    drv2 = Driver(dev2)
    drv2.mem, drv2.t.mem = drv.mem, drv.mem
    dev2.restore(st)
    drv2.t.restore(mmio_state)
    assert drv2.status & STATUS_DRIVER_OK
    drv2.queues = drv.queues
    assert fake2.take() == expected_activation(drv2, backend2, kicks, acked, bases=(5, 0xFFFE),
                                               cid=9)
    # its connections did not come along: TRANSPORT_RESET on the event queue
    assert ev.get_used() == [(0, 4)]
    assert drv.mem.read(buf, 4) == struct.pack("<I", 0)
    assert not dev2.reset_event_pending
    backend.close()
    backend2.close()


@pytest.mark.parametrize("field,value,match", [
    ("guest_cid", 2, "guest_cid"),
    ("last_avail_idx", [1], "last_avail_idx"),
    ("last_avail_idx", [0, 1 << 16], r"last_avail_idx\[1\]"),
    ("last_avail_idx", [True, 0], r"last_avail_idx\[0\]"),
    ("acked_features", 1 << 40, "acked_features"),
])
def test_restore_checks_the_template_state(kicks, field, value, match):
    dev, backend, fake = make(kicks)
    st = VhostVsockState(guest_cid=3, acked_features=1 << VIRTIO_F_VERSION_1)
    setattr(st, field, value)
    with pytest.raises(TemplateError, match=match):
        dev.restore(st)
    backend.close()


def test_a_failing_ioctl_at_activation_marks_the_device_broken(kicks):
    fake = FakeVhost()
    fake.fail["VHOST_VSOCK_SET_GUEST_CID"] = errno.EADDRINUSE
    dev, backend, _ = make(kicks, fake=fake)
    drv = Driver(dev)
    drv.init()
    assert drv.broken
    assert "VHOST_VSOCK_SET_GUEST_CID failed" in drv.t.broken_reason
    assert "guest-cid 3 is used by another VM" in drv.t.broken_reason
    backend.close()


# --- opening: one line for each way it fails ------------------------------------------

@pytest.mark.parametrize("err,text", [
    (errno.ENOTTY, "VHOST_SET_OWNER failed: Inappropriate ioctl for device (not a vhost device)"),
    (errno.EBUSY, "another process owns this vhost-vsock fd"),
])
def test_set_owner_refused_is_one_line_and_leaks_nothing(err, text):
    fake = FakeVhost()
    fake.fail["VHOST_SET_OWNER"] = err
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(VhostError) as e:
        VhostVsock(fake.fd, owned=False, ioctl=fake)
    assert text in str(e.value) and "\n" not in str(e.value)
    assert set(os.listdir("/proc/self/fd")) == before       # the call eventfds are closed


def test_vhostfd_that_is_not_open():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(VhostError, match=rf"^vhostfd={r} is not an open file descriptor$"):
        VhostVsock.open(r)


def test_vhostfd_that_is_not_vhost_vsock(tmp_path):
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(VhostError, match=rf"vhostfd={r} is not /dev/vhost-vsock "
                                             r"\(not a character device"):
            VhostVsock.open(r)
        with pytest.raises(VhostError, match=r"\(a character device 1:3; vhost-vsock is 10:241\)"):
            VhostVsock.open(null)
    finally:
        for fd in (r, w, null):
            os.close(fd)


def test_without_vhostfd_the_device_node_is_opened():
    if os.path.exists(vhost.VHOST_VSOCK_PATH):
        b = VhostVsock.open(None)
        assert b.features & (1 << VIRTIO_F_VERSION_1)
        b.close()
    else:
        with pytest.raises(VhostError, match="^cannot open /dev/vhost-vsock: No such file"):
            VhostVsock.open(None)


# --- command line -------------------------------------------------------------------

K = ["-kernel", "/k"]


def test_kata_vhost_vsock_line_is_parsed():
    cfg = parse_args(K + ["-device", "vhost-vsock-device,id=vsock-id,guest-cid=3,vhostfd=5"])
    d = cfg.devices[0]
    assert (d.driver, d.id, d.guest_cid, d.vhostfd) == (VHOST_VSOCK, "vsock-id", 3, 5)
    cfg = parse_args(K + ["-device", "vhost-vsock-device,id=v,guest-cid=4"])
    assert cfg.devices[0].vhostfd is None


@pytest.mark.parametrize("args,text", [
    (["-device", "vhost-vsock-device,id=v,guest-cid=2"], "guest-cid"),
    (["-device", "vhost-vsock-device,id=v,guest-cid=3,vhostfd=1"], "stdin/stdout/stderr"),
    (["-device", "vhost-vsock-device,id=v,guest-cid=3,vhostfd=x"], "vhostfd"),
    (["-device", "vhost-vsock-device,id=v,guest-cid=3,uds-path=/x"], "uds-path"),
    (["-device", "vhost-vsock-device,id=v,guest-cid=3",
      "-device", "virtio-vsock-device,id=w,guest-cid=4,uds-path=/tmp/x"], "only one vsock"),
    (["-netdev", "tap,id=n,fds=5", "-device", "virtio-net-device,netdev=n",
      "-device", "vhost-vsock-device,id=v,guest-cid=3,vhostfd=5"], "also a -netdev tap fd"),
])
def test_bad_vhost_vsock_options_are_refused(args, text):
    with pytest.raises(ConfigError, match=text):
        parse_args(K + args)


def test_vhostfd_is_checked_before_the_monitor_opens_its_own_fds(tmp_path):
    """fd 5 not passed by the parent: the one line says so (by the time
    devices are built, 5 would be one of the monitor's own fds)."""
    from tests import harness

    kernel = tmp_path / "k"
    kernel.write_bytes(b"\0" * 4096)
    harness.refused(["-kernel", str(kernel), "-device",
                     "vhost-vsock-device,id=vsock-id,guest-cid=3,vhostfd=5"],
                    "stratopy: -device: vhost-vsock-device 'vsock-id': "
                    "vhostfd=5 is not an open file descriptor")


def test_machine_wires_the_kernel_queues_to_the_device(monkeypatch):
    """The slot's QueueNotify ioeventfds of rx and tx are the kernel's kicks
    (the device thread must not read them), the event queue's stays ours,
    the call eventfds are read by the device thread; pause/resume reach
    the device; teardown closes the backend."""
    from stratopy.machine import slots as slotmod
    from stratopy.machine.base import VmState
    from stratopy.machine.microvm import MicroVm

    fake = FakeVhost()
    monkeypatch.setattr(VhostVsock, "open", classmethod(
        lambda cls, vhostfd: VhostVsock(fake.fd, owned=False, ioctl=fake)))

    class FakeVm:
        def __init__(self):
            self.ioeventfds = []

        def register_ioeventfd(self, efd, addr, length, datamatch=None):
            self.ioeventfds.append((efd, addr, length, datamatch))

        def irq_pulse(self, gsi):
            return lambda: None

        def close(self):
            pass

    config = parse_args(["-kernel", "/k", "-device", "vhost-vsock-device,id=v,guest-cid=3"])
    vm = MicroVm(config)
    vm.vm, vm.mem = FakeVm(), GuestMemory.anonymous([(0, 1 << 20)])
    try:
        vm.devices.add_virtio_slots(slotmod.plan_slots(config))
        slot = next(s for s in vm.slots if s.config is not None and s.config.driver == VHOST_VSOCK)
        dev, backend = slot.device, slot.backend
        assert isinstance(dev, VhostVsockDevice) and backend.call_fds
        n0, n1, n2 = slot.notify_fds
        mine = [e for e in vm.vm.ioeventfds if e[1] == slot.base + 0x50]   # every slot is plugged
        assert mine == [(n0, slot.base + 0x50, 4, 0), (n1, slot.base + 0x50, 4, 1),
                        (n2, slot.base + 0x50, 4, 2)]
        assert dev.kick_fds == {0: n0, 1: n1}
        watched = set(vm.loop.sel.get_map())
        assert n2 in watched and set(backend.call_fds) <= watched
        assert n0 not in watched and n1 not in watched
        events = []
        vm.event_sink = lambda name, data: events.append(name)
        vm.state = VmState.RUNNING     # as start() leaves it (no vCPUs here)
        vm.pause()                     # QMP stop, and migrate's own pause
        assert dev.paused
        vm.resume()
        assert not dev.paused and events == ["STOP", "RESUME"]
    finally:
        vm.teardown()
    assert backend.call_fds == () and backend.fd == -1


def test_a_clone_whose_kernel_offers_less_than_the_guest_acked_is_refused(kicks):
    """The template's guest acked SEQPACKET; this host's vhost-vsock lacks it."""
    class OldKernel(FakeVhost):
        def __call__(self, fd, request, arg):
            ret = super().__call__(fd, request, arg)
            if NAMES[request] == "VHOST_GET_FEATURES":
                arg._obj.value = 1 << VIRTIO_F_VERSION_1
            return ret
    dev, backend, _ = make(kicks, fake=OldKernel())
    st = VhostVsockState(guest_cid=3, acked_features=(1 << VIRTIO_F_VERSION_1) | (1 << 1))
    with pytest.raises(TemplateError, match="acked_features"):
        dev.restore(st)
    backend.close()
