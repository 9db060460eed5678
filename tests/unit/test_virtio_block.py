"""virtio-blk: a mock driver submits requests through the MMIO transport to a
block device backed by a temporary file."""

from __future__ import annotations

import errno
import hashlib
import os
import struct

import pytest

from stratopy.devices.virtio import block as B
from stratopy.devices.virtio import mmio as M
from stratopy.devices.virtio.block import BlockDevice, BlockState, FileBackend
from stratopy.devices.virtio.device import STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1
from stratopy.devices.virtio.mmio import VirtioMmioTransport
from stratopy.errors import TemplateError
from stratopy.memory import GuestMemory

try:
    from test_virtio_mmio import MockDriver
except ImportError:  # tests/unit imported as a package
    from .test_virtio_mmio import MockDriver  # type: ignore

RAM = 1 << 20
HDR = 0x40000
DATA = 0x50000
STATUS = 0x4F000
SECTORS = 64


class Irq:
    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1


def image(tmp_path, sectors=SECTORS) -> str:
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.write(bytes((i * 7 + i // 512) & 0xFF for i in range(sectors * 512)))
    return path


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Rig:
    def __init__(self, path, readonly=False, direct=False, serial="stratopy-disk-0"):
        self.mem = GuestMemory.anonymous([(0, RAM)])
        self.backend = FileBackend(path, readonly=readonly, direct=direct)
        self.dev = BlockDevice(self.backend, serial=serial)
        self.irq = Irq()
        self.t = VirtioMmioTransport(self.dev, self.mem, self.irq)
        self.drv = MockDriver(self.t, self.mem)

    def close(self):
        self.backend.close()
        self.mem.close()

    def header(self, rtype, sector=0, addr=HDR):
        self.mem.write(addr, struct.pack("<IIQ", rtype, 0, sector))

    def request(self, rtype, sector=0, data=b"", read_len=0, status_addr=STATUS):
        """Linux framing: header | data | status. Returns (status, used_len)."""
        self.header(rtype, sector)
        self.mem.write(status_addr, b"\xee")
        bufs = [(HDR, 16, False)]
        if data:
            self.mem.write(DATA, data)
            bufs.append((DATA, len(data), False))
        if read_len:
            bufs.append((DATA, read_len, True))
        bufs.append((status_addr, 1, True))
        head = self.drv.submit(0, bufs)
        used = self.drv.used(0)
        assert len(used) == 1 and used[0][0] == head
        return self.mem.read(status_addr, 1)[0], used[0][1]


@pytest.fixture
def disk(tmp_path):
    return image(tmp_path)


@pytest.fixture
def rig(disk):
    r = Rig(disk)
    r.drv.init()
    yield r
    r.close()


def test_config_space_and_features(disk):
    r = Rig(disk)
    try:
        acked = r.drv.init()
        assert acked & (1 << B.VIRTIO_BLK_F_FLUSH)
        assert acked & (1 << B.VIRTIO_BLK_F_SEG_MAX)
        assert acked & (1 << B.VIRTIO_BLK_F_BLK_SIZE)
        assert not acked & (1 << B.VIRTIO_BLK_F_RO)
        assert acked & (1 << VIRTIO_F_VERSION_1)
        assert r.drv.r(M.REG_DEVICE_ID) == 2
        cap = struct.unpack("<Q", r.t.read(0x100, 8))[0]
        assert cap == SECTORS
        assert struct.unpack("<I", r.t.read(0x100 + 12, 4))[0] == B.SEG_MAX
        assert struct.unpack("<I", r.t.read(0x100 + 20, 4))[0] == 512
        assert r.t.read(0x100 + 4, 2) == b"\0\0"       # unaligned, any size
        assert r.t.read(0x100 + 60, 4) == bytes(4)
        r.t.write(0x100, b"\xff" * 8)                  # read-only config
        assert struct.unpack("<Q", r.t.read(0x100, 8))[0] == SECTORS
    finally:
        r.close()


def test_read_sectors(rig, disk):
    with open(disk, "rb") as f:
        expect = f.read()[3 * 512:5 * 512]
    status, used_len = rig.request(B.VIRTIO_BLK_T_IN, sector=3, read_len=1024)
    assert status == B.VIRTIO_BLK_S_OK
    assert used_len == 1025
    assert rig.mem.read(DATA, 1024) == expect
    assert rig.irq.count == 1


def test_write_then_read_back(rig, disk):
    payload = os.urandom(2048)
    status, _ = rig.request(B.VIRTIO_BLK_T_OUT, sector=10, data=payload)
    assert status == B.VIRTIO_BLK_S_OK
    with open(disk, "rb") as f:
        f.seek(10 * 512)
        assert f.read(2048) == payload
    rig.mem.write(DATA, bytes(2048))
    status, _ = rig.request(B.VIRTIO_BLK_T_IN, sector=10, read_len=2048)
    assert status == B.VIRTIO_BLK_S_OK
    assert rig.mem.read(DATA, 2048) == payload


def test_last_sector_ok_beyond_is_ioerr(rig, disk):
    before = digest(disk)
    assert rig.request(B.VIRTIO_BLK_T_IN, sector=SECTORS - 1, read_len=512)[0] == 0
    assert rig.request(B.VIRTIO_BLK_T_IN, sector=SECTORS - 1, read_len=1024)[0] == 1
    assert rig.request(B.VIRTIO_BLK_T_IN, sector=SECTORS, read_len=512)[0] == 1
    assert rig.request(B.VIRTIO_BLK_T_OUT, sector=SECTORS, data=bytes(512))[0] == 1
    assert rig.request(B.VIRTIO_BLK_T_OUT, sector=(1 << 64) - 1, data=bytes(512))[0] == 1
    assert rig.request(B.VIRTIO_BLK_T_IN, sector=1 << 60, read_len=512)[0] == 1
    assert digest(disk) == before


def test_partial_sector_is_ioerr(rig, disk):
    before = digest(disk)
    assert rig.request(B.VIRTIO_BLK_T_IN, sector=0, read_len=100)[0] == 1
    assert rig.request(B.VIRTIO_BLK_T_OUT, sector=0, data=b"x" * 100)[0] == 1
    assert digest(disk) == before


def test_flush(rig):
    assert rig.request(B.VIRTIO_BLK_T_FLUSH)[0] == B.VIRTIO_BLK_S_OK


def test_get_id(rig):
    status, used_len = rig.request(B.VIRTIO_BLK_T_GET_ID, read_len=20)
    assert status == 0
    assert rig.mem.read(DATA, 20) == b"stratopy-disk-0".ljust(20, b"\0")
    assert used_len == 21


def test_get_id_long_serial_truncated(disk):
    r = Rig(disk, serial="S" * 30)
    try:
        r.drv.init()
        assert r.request(B.VIRTIO_BLK_T_GET_ID, read_len=20)[0] == 0
        assert r.mem.read(DATA, 20) == b"S" * 20
    finally:
        r.close()


@pytest.mark.parametrize("rtype", [2, 11, 13, 0xFFFFFFFF])
def test_unknown_type_unsupp(rig, rtype):
    assert rig.request(rtype, read_len=0)[0] == B.VIRTIO_BLK_S_UNSUPP


def test_readonly_drive(tmp_path):
    disk = image(tmp_path)
    before = digest(disk)
    r = Rig(disk, readonly=True)
    try:
        acked = r.drv.init()
        assert acked & (1 << B.VIRTIO_BLK_F_RO)
        assert r.request(B.VIRTIO_BLK_T_OUT, sector=0, data=b"\xaa" * 512)[0] == 1
        assert r.request(B.VIRTIO_BLK_T_IN, sector=0, read_len=512)[0] == 0
        assert r.request(B.VIRTIO_BLK_T_FLUSH)[0] == 0
        with pytest.raises(OSError):
            r.backend.write_from(0, memoryview(b"x" * 512))
    finally:
        r.close()
    assert digest(disk) == before
    # the file was opened read-only: even a direct os.write would fail
    be = FileBackend(disk, readonly=True)
    try:
        with pytest.raises(OSError):
            os.pwrite(be.fd, b"x", 0)
    finally:
        be.close()


def test_any_layout_header_and_data_split(rig, disk):
    """Header split over two descriptors, data and status in one buffer."""
    payload = os.urandom(512)
    rig.mem.write(HDR, struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 5)[:7])
    rig.mem.write(HDR + 0x100, struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 5)[7:] + payload)
    rig.drv.submit(0, [(HDR, 7, False), (HDR + 0x100, 9 + 512, False), (STATUS, 1, True)])
    assert rig.drv.used(0)
    assert rig.mem.read(STATUS, 1) == b"\0"
    with open(disk, "rb") as f:
        f.seek(5 * 512)
        assert f.read(512) == payload
    # read: data and status share one writable buffer
    rig.header(B.VIRTIO_BLK_T_IN, 5)
    rig.drv.submit(0, [(HDR, 16, False), (DATA, 513, True)])
    assert rig.drv.used(0)[0][1] == 513
    assert rig.mem.read(DATA, 512) == payload
    assert rig.mem.read(DATA + 512, 1) == b"\0"


def test_many_requests_one_kick(rig):
    for k in range(5):
        rig.header(B.VIRTIO_BLK_T_IN, k, addr=HDR + k * 32)
        rig.drv.submit(0, [(HDR + k * 32, 16, False), (DATA + k * 512, 512, True),
                           (STATUS + k, 1, True)], kick=False)
    rig.drv.w(M.REG_QUEUE_NOTIFY, 0)
    used = rig.drv.used(0)
    assert len(used) == 5
    assert rig.irq.count == 1            # one interrupt for the batch
    assert rig.mem.read(STATUS, 5) == bytes(5)


# --- hostile guests ----------------------------------------------------------------

def test_short_header_ioerr(rig):
    rig.drv.submit(0, [(HDR, 8, False), (STATUS, 1, True)])
    assert rig.drv.used(0)
    assert rig.mem.read(STATUS, 1) == b"\x01"
    assert not rig.t.broken


def test_readable_after_writable_ioerr(rig, disk):
    before = digest(disk)
    rig.header(B.VIRTIO_BLK_T_OUT, 0)
    rig.drv.submit(0, [(HDR, 16, False), (STATUS, 1, True), (DATA, 512, False),
                       (STATUS + 1, 1, True)])
    assert rig.drv.used(0)
    assert rig.mem.read(STATUS + 1, 1) == b"\x01"
    assert digest(disk) == before


def test_no_status_byte_breaks_device(rig):
    rig.header(B.VIRTIO_BLK_T_IN, 0)
    rig.drv.submit(0, [(HDR, 16, False), (DATA, 512, False)])
    assert rig.drv.status() & STATUS_NEEDS_RESET
    assert rig.drv.r(M.REG_INTERRUPT_STATUS) & M.INT_CONFIG


def test_descriptor_outside_ram_breaks_device(rig, disk):
    before = digest(disk)
    rig.header(B.VIRTIO_BLK_T_IN, 0)
    rig.drv.submit(0, [(HDR, 16, False), (RAM - 256, 512, True), (STATUS, 1, True)])
    assert rig.drv.status() & STATUS_NEEDS_RESET
    assert rig.drv.used(0) == []
    assert digest(disk) == before


def test_huge_length_breaks_device(rig):
    rig.header(B.VIRTIO_BLK_T_IN, 0)
    rig.drv.submit(0, [(HDR, 16, False), (DATA, 0xFFFFFFFF, True), (STATUS, 1, True)])
    assert rig.drv.status() & STATUS_NEEDS_RESET


def test_descriptor_loop_breaks_device(rig):
    rig.drv.write_desc(0, 0, HDR, 16, 1, 1)
    rig.drv.write_desc(0, 1, DATA, 512, 1 | 2, 0)
    rig.drv.publish(0, 0)
    assert rig.drv.status() & STATUS_NEEDS_RESET
    assert "loop" in rig.t.broken_reason


def test_next_out_of_range_breaks_device(rig):
    rig.drv.write_desc(0, 0, HDR, 16, 1, 4000)
    rig.drv.publish(0, 0)
    assert rig.drv.status() & STATUS_NEEDS_RESET


def test_avail_idx_jump_breaks_device(rig):
    rig.mem.write_u16(rig.drv.ring_addrs(0)[1] + 2, 1000)
    rig.drv.w(M.REG_QUEUE_NOTIFY, 0)
    assert rig.drv.status() & STATUS_NEEDS_RESET


def test_completed_requests_signalled_before_break(rig):
    rig.header(B.VIRTIO_BLK_T_FLUSH)
    rig.drv.submit(0, [(HDR, 16, False), (STATUS, 1, True)], kick=False)
    rig.drv.write_desc(0, 5, HDR, 16, 1, 999)
    rig.drv.publish(0, 5)
    assert rig.drv.status() & STATUS_NEEDS_RESET
    assert len(rig.drv.used(0)) == 1      # the good request was completed
    assert rig.drv.r(M.REG_INTERRUPT_STATUS) == M.INT_USED_RING | M.INT_CONFIG


class FailingBackend:
    size = 64 * 512
    readonly = False

    def read_into(self, offset, buf):
        raise OSError(errno.EIO, "disk on fire")

    def write_from(self, offset, buf):
        return len(buf) // 2              # short write

    def flush(self):
        raise OSError(errno.EIO, "no")


def test_backend_errors_become_ioerr():
    mem = GuestMemory.anonymous([(0, RAM)])
    try:
        dev = BlockDevice(FailingBackend())
        t = VirtioMmioTransport(dev, mem, Irq())
        drv = MockDriver(t, mem)
        drv.init()
        for rtype, bufs in ((B.VIRTIO_BLK_T_IN, [(DATA, 512, True)]),
                            (B.VIRTIO_BLK_T_OUT, [(DATA, 512, False)]),
                            (B.VIRTIO_BLK_T_FLUSH, [])):
            mem.write(HDR, struct.pack("<IIQ", rtype, 0, 0))
            drv.submit(0, [(HDR, 16, False)] + bufs + [(STATUS, 1, True)])
            assert drv.used(0)
            assert mem.read(STATUS, 1) == b"\x01"
        assert not t.broken
    finally:
        mem.close()


# --- backend ----------------------------------------------------------------------

def test_direct_io_or_fallback(tmp_path):
    disk = image(tmp_path)
    be = FileBackend(disk, readonly=False, direct=True)
    try:
        assert be.direct or (be.warning and "O_DIRECT" in be.warning)
        mem = GuestMemory.anonymous([(0, RAM)])
        try:
            # a guest buffer that is not 512-aligned in host memory
            payload = os.urandom(1024)
            mem.write(0x10003, payload)
            v = mem.view(0x10003, 1024)
            assert be.write_from(2048, v) == 1024
            v.release()
            v = mem.view(0x20001, 1024)
            assert be.read_into(2048, v) == 1024
            v.release()
            assert mem.read(0x20001, 1024) == payload
            be.flush()
        finally:
            mem.close()
    finally:
        be.close()
    with open(disk, "rb") as f:
        f.seek(2048)
        assert f.read(1024) == payload


def test_direct_refused_by_filesystem_falls_back(tmp_path, monkeypatch):
    disk = image(tmp_path)
    real_open = os.open

    def fake_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)
    monkeypatch.setattr(B.os, "open", fake_open)
    be = FileBackend(disk, direct=True)
    try:
        assert not be.direct
        assert "O_DIRECT" in be.warning
        buf = bytearray(512)
        assert be.read_into(0, memoryview(buf)) == 512
    finally:
        be.close()


def test_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        FileBackend(str(tmp_path / "nope.img"))


def test_odd_sized_image_capacity_rounds_down(tmp_path):
    path = str(tmp_path / "odd.img")
    with open(path, "wb") as f:
        f.write(bytes(512 * 3 + 100))
    be = FileBackend(path, readonly=True)
    try:
        assert BlockDevice(be).capacity == 3
    finally:
        be.close()


# --- state --------------------------------------------------------------------------

def test_state_round_trip_through_transport(tmp_path):
    disk = image(tmp_path)
    r = Rig(disk)
    try:
        r.drv.init()
        assert r.request(B.VIRTIO_BLK_T_OUT, sector=1, data=b"\x11" * 512)[0] == 0
        dstate = r.dev.state()
        mstate = r.t.state()
        assert dstate == BlockState(acked_features=r.dev.acked_features,
                                    capacity=SECTORS, serial="stratopy-disk-0",
                                    readonly=False, offered_features=r.dev.avail_features)
        # a clone: a copy of the disk, a new device and transport, same memory
        clone_path = str(tmp_path / "clone.img")
        with open(disk, "rb") as f, open(clone_path, "wb") as g:
            g.write(f.read())
        be2 = FileBackend(clone_path)
        dev2 = BlockDevice.from_state(dstate, be2)
        irq2 = Irq()
        t2 = VirtioMmioTransport(dev2, r.mem, irq2)
        t2.restore(mstate)
        assert dev2.state() == dstate and t2.state() == mstate
        r.drv.t = t2
        assert r.request(B.VIRTIO_BLK_T_IN, sector=1, read_len=512)[0] == 0
        assert r.mem.read(DATA, 512) == b"\x11" * 512
        assert irq2.count == 1
        be2.close()
    finally:
        r.close()


def test_restore_rejects_mismatches(tmp_path):
    disk = image(tmp_path)
    be = FileBackend(disk)
    try:
        dev = BlockDevice(be, serial="a")
        good = dev.state()
        for field, value, attr in (("serial", "b", "serial"), ("capacity", 63, "capacity"),
                                   ("readonly", True, "readonly")):
            bad = BlockState(**{**good.__dict__, field: value})
            with pytest.raises(TemplateError) as ei:
                BlockDevice(be, serial="a").restore(bad)
            assert attr in str(ei.value)
        for field, value in (("acked_features", 1 << 40), ("acked_features", -1),
                             ("acked_features", 1 << B.VIRTIO_BLK_F_RO),   # not offered
                             ("capacity", "64"), ("serial", 5), ("readonly", 0)):
            bad = BlockState(**{**good.__dict__, field: value})
            with pytest.raises(TemplateError):
                BlockDevice.from_state(bad, be, serial="a")
        with pytest.raises(TemplateError):
            BlockDevice(be).restore(M.MmioState())
        # the serial on the command line must match the template's
        with pytest.raises(TemplateError):
            BlockDevice.from_state(good, be, serial="other")
    finally:
        be.close()


def test_direct_io_einval_drops_to_buffered(tmp_path):
    disk = image(tmp_path)
    with open(disk, "rb") as f:
        expect = f.read()[100:612]
    be = FileBackend(disk, direct=True)
    try:
        if not be.direct:
            pytest.skip("this filesystem refuses O_DIRECT at open")
        buf = bytearray(512)
        assert be.read_into(100, memoryview(buf)) == 512    # unaligned: EINVAL
        assert bytes(buf) == expect
        assert not be.direct and "O_DIRECT" in be.warning
    finally:
        be.close()


def test_partial_transfers_are_continued_and_eof_is_short(tmp_path, monkeypatch):
    disk = image(tmp_path)                      # SECTORS * 512 bytes
    with open(disk, "rb") as f:
        data = f.read()
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = []

    def trickle(real):
        def op(fd, bufs, off):                  # the kernel moves at most 100 bytes a call
            calls.append(off)
            return real(fd, [bufs[0][:100]], off)
        return op
    monkeypatch.setattr(B.os, "preadv", trickle(real_preadv))
    monkeypatch.setattr(B.os, "pwritev", trickle(real_pwritev))
    be = FileBackend(disk)
    try:
        buf = bytearray(512)
        assert be.read_into(512, memoryview(buf)) == 512
        assert bytes(buf) == data[512:1024] and len(calls) == 6
        calls.clear()
        assert be.write_from(1024, memoryview(b"\xaa" * 300)) == 300 and len(calls) == 3
        end = len(data) - 256                   # a read past EOF comes back short
        assert be.read_into(end, memoryview(bytearray(512))) == 256
    finally:
        be.close()
    with open(disk, "rb") as f:
        assert f.read()[1024:1324] == b"\xaa" * 300


def test_direct_short_chunk_ends_the_transfer(tmp_path, monkeypatch):
    disk = image(tmp_path)
    be = FileBackend(disk, direct=True)
    try:
        if not be.direct:
            pytest.skip("this filesystem refuses O_DIRECT at open")
        real_preadv = os.preadv
        monkeypatch.setattr(B.os, "preadv",
                            lambda fd, bufs, off: real_preadv(fd, [bufs[0][:512]], off))
        monkeypatch.setattr(FileBackend, "BOUNCE_SIZE", 1024)
        assert be.read_into(0, memoryview(bytearray(2048))) == 512    # not retried
        assert be.direct
    finally:
        be.close()


def test_a_guest_that_keeps_adding_requests_does_not_hold_the_device(disk):
    """Each flush the backend serves makes the (fake) guest publish another
    request, as a vCPU can while the device thread works. One notification
    must end after a queue's worth and ask to run again, so the device
    thread gets back to the other devices."""
    r = Rig(disk)
    r.drv.init(sizes=[16])
    requeued: list[int] = []
    r.dev.requeue = requeued.append
    served = [0]
    real_flush = r.backend.flush

    def flush_and_add_another():
        real_flush()
        served[0] += 1
        if served[0] < 10_000:          # the old loop would serve all of them
            r.header(B.VIRTIO_BLK_T_FLUSH)
            r.drv.submit(0, [(HDR, 16, False), (STATUS, 1, True)], kick=False)
    r.backend.flush = flush_and_add_another
    try:
        r.header(B.VIRTIO_BLK_T_FLUSH)
        r.drv.submit(0, [(HDR, 16, False), (STATUS, 1, True)])
        assert served[0] == 16           # one queue's worth (size 16) per turn
        assert requeued == [0]
        assert len(r.drv.used(0)) == 16
        assert r.irq.count == 1          # the batch is signalled before yielding
        # the continuation serves the next batch, and again asks for a turn
        r.t.notify(0)
        assert served[0] == 32 and requeued == [0, 0]
        assert not r.t.broken
    finally:
        r.close()


def test_a_batch_that_empties_the_queue_does_not_ask_for_another_turn(rig):
    requeued: list[int] = []
    rig.dev.requeue = requeued.append
    for k in range(3):
        rig.header(B.VIRTIO_BLK_T_FLUSH, addr=HDR + k * 32)
        rig.drv.submit(0, [(HDR + k * 32, 16, False), (STATUS + k, 1, True)], kick=False)
    rig.drv.w(M.REG_QUEUE_NOTIFY, 0)
    assert len(rig.drv.used(0)) == 3
    assert requeued == []


def test_file_backend_refuses_a_fifo_without_blocking(tmp_path):
    # A FIFO swapped in after the command line was checked must neither block
    # the open (no writer) nor become a disk.
    from tests.unit.bounded import deadline

    fifo = tmp_path / "disk"
    os.mkfifo(fifo)
    with deadline(5), pytest.raises(OSError) as e:
        FileBackend(str(fifo), readonly=True)
    assert e.value.errno == errno.EINVAL
