"""microvm hot-replace without KVM: a block/net device in a reserved slot
swaps its backend through ``replace_backend`` while a mock driver runs it
through the virtio-mmio transport; the slot plan and the template facts
(SPEC §4: a device hot-replaced before the snapshot must be on the restore
command line)."""

from __future__ import annotations

import hashlib
import struct

import pytest

from stratopy.cli_parse import parse_args
from stratopy.devices.virtio import block as B
from stratopy.devices.virtio import mmio as M
from stratopy.devices.virtio.block import BlockDevice, FileBackend
from stratopy.devices.virtio.device import VIRTIO_ID_BLOCK
from stratopy.devices.virtio.mmio import VirtioMmioTransport
from stratopy.devices.virtio.net import (
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    NetDevice,
)
from stratopy.errors import TemplateError
from stratopy.machine import slots as slotmod
from stratopy.migration import facts as F
from tests.unit.virtio_driver import Driver

SECTORS = 64


def image(tmp_path, name="disk.img", sectors=SECTORS, fill=0x11) -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(bytes((fill + i) & 0xFF for i in range(sectors * 512)))
    return path


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class BlkDriver(Driver):
    """The mock driver plus Linux's virtio-blk request framing."""

    def capacity(self) -> int:
        return struct.unpack("<Q", self.config(0, 8))[0]

    def generation(self) -> int:
        return self.r32(M.REG_CONFIG_GENERATION)

    def request(self, rtype: int, sector: int = 0, data: bytes = b"", read_len: int = 0):
        """-> (status byte, bytes read)."""
        hdr = self.alloc(16)
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        bufs = [(hdr, 16, False)]
        if data:
            a = self.alloc(len(data))
            self.mem.write(a, data)
            bufs.append((a, len(data), False))
        rd = 0
        if read_len:
            rd = self.alloc(read_len)
            bufs.append((rd, read_len, True))
        st = self.alloc(1)
        self.mem.write(st, b"\xee")
        bufs.append((st, 1, True))
        q = self.queues[0]
        head = q.add(bufs)
        q.kick()
        used = q.get_used()
        assert [h for h, _ in used] == [head]
        return self.mem.read(st, 1)[0], (self.mem.read(rd, read_len) if read_len else b"")


@pytest.fixture
def empty_blk():
    dev = BlockDevice(None)
    drv = BlkDriver(dev)
    drv.init()
    yield drv, dev
    drv.mem.close()


# --- block ------------------------------------------------------------------------

def test_empty_block_device_probes_with_capacity_zero_and_fails_requests(empty_blk):
    drv, _dev = empty_blk
    assert drv.r32(M.REG_DEVICE_ID) == VIRTIO_ID_BLOCK
    assert drv.capacity() == 0
    assert not drv.device_features() & (1 << B.VIRTIO_BLK_F_RO)
    for rtype, kw in ((B.VIRTIO_BLK_T_IN, {"read_len": 512}),
                      (B.VIRTIO_BLK_T_OUT, {"data": b"x" * 512}),
                      (B.VIRTIO_BLK_T_FLUSH, {})):
        status, _ = drv.request(rtype, **kw)
        assert status == B.VIRTIO_BLK_S_IOERR
    assert not drv.broken            # a clean error, not a broken device


def test_replace_backend_plug_changes_capacity_and_raises_config_interrupt(
        empty_blk, tmp_path):
    drv, dev = empty_blk
    path = image(tmp_path)
    be = FileBackend(path)
    gen0, irqs0 = drv.generation(), drv.irqs
    assert dev.replace_backend(be, serial="HOT-1") is None
    assert drv.capacity() == SECTORS
    assert drv.generation() == (gen0 + 1) & 0xFFFFFFFF
    assert drv.irqs == irqs0 + 1
    assert drv.ack_irq() & M.INT_CONFIG
    status, data = drv.request(B.VIRTIO_BLK_T_IN, sector=1, read_len=512)
    assert status == B.VIRTIO_BLK_S_OK
    with open(path, "rb") as f:
        assert data == f.read()[512:1024]
    assert drv.request(B.VIRTIO_BLK_T_OUT, sector=2, data=b"\x42" * 512)[0] == 0
    with open(path, "rb") as f:
        assert f.read()[1024:1536] == b"\x42" * 512
    status, ident = drv.request(B.VIRTIO_BLK_T_GET_ID, read_len=20)
    assert status == 0 and ident.rstrip(b"\0") == b"HOT-1"
    # beyond the new capacity: still an error
    assert drv.request(B.VIRTIO_BLK_T_IN, sector=SECTORS, read_len=512)[0] == 1
    be.close()


def test_replace_backend_unplug_back_to_empty(empty_blk, tmp_path):
    drv, dev = empty_blk
    be = FileBackend(image(tmp_path))
    dev.replace_backend(be)
    drv.ack_irq()
    gen, irqs = drv.generation(), drv.irqs
    assert dev.replace_backend(None) is be       # the caller closes it
    be.close()
    assert drv.capacity() == 0
    assert drv.generation() == gen + 1 and drv.irqs == irqs + 1
    assert drv.ack_irq() & M.INT_CONFIG
    assert drv.request(B.VIRTIO_BLK_T_IN, read_len=512)[0] == B.VIRTIO_BLK_S_IOERR
    assert not drv.broken


def test_replace_before_driver_ok_bumps_generation_without_interrupt(tmp_path):
    dev = BlockDevice(None)
    irqs = []
    from stratopy.memory import GuestMemory
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    t = VirtioMmioTransport(dev, mem, lambda: irqs.append(1))
    be = FileBackend(image(tmp_path))
    dev.replace_backend(be)
    assert t.config_generation == 1 and not irqs and t.interrupt_status == 0
    # a driver probing now reads the new capacity
    assert struct.unpack("<Q", t.read(0x100, 8))[0] == SECTORS
    be.close()
    mem.close()


def test_readonly_drive_hot_replaced_into_a_writable_negotiation(empty_blk, tmp_path):
    drv, dev = empty_blk
    path = image(tmp_path)
    before = digest(path)
    be = FileBackend(path, readonly=True)
    dev.replace_backend(be)
    # the driver negotiated without RO; the device still refuses writes
    assert drv.request(B.VIRTIO_BLK_T_OUT, sector=0, data=b"\0" * 512)[0] == 1
    assert drv.request(B.VIRTIO_BLK_T_IN, sector=0, read_len=512)[0] == 0
    assert digest(path) == before
    # a driver probing again is offered RO
    assert dev.avail_features & (1 << B.VIRTIO_BLK_F_RO)
    be.close()


def test_block_state_after_unplug_restores_into_an_empty_device(tmp_path):
    """A readonly drive the driver negotiated (RO acked) is removed, then a
    template is taken: the restored empty device takes the offer the driver
    saw from the state, so acked RO is accepted."""
    path = image(tmp_path)
    be = FileBackend(path, readonly=True)
    dev = BlockDevice(be, serial="RO")
    drv = BlkDriver(dev)
    acked = drv.init()
    assert acked & (1 << B.VIRTIO_BLK_F_RO)
    dev.replace_backend(None)
    be.close()
    dstate, mstate = dev.state(), drv.t.state()
    assert dstate.capacity == 0 and dstate.serial == "" and dstate.readonly is False
    dev2 = BlockDevice(None)
    dev2.restore(dstate)
    t2 = VirtioMmioTransport(dev2, drv.mem, lambda: None)
    t2.restore(mstate)
    assert dev2.activated and dev2.acked_features == acked
    # the restored device still has no drive: the template's capacity 0 holds
    be3 = FileBackend(path)
    with pytest.raises(TemplateError, match="capacity"):
        BlockDevice(be3).restore(dstate)
    be3.close()
    bad = B.BlockState(**{**dstate.__dict__, "offered_features": 1 << 40})
    with pytest.raises(TemplateError, match="offered_features"):
        BlockDevice(None).restore(bad)
    drv.mem.close()


# --- net ---------------------------------------------------------------------------

class FakeTap:
    def __init__(self):
        self.sent = []
        self.inbox = []

    def read_frame(self):
        return self.inbox.pop(0) if self.inbox else None

    def write_frame(self, frame):
        self.sent.append(bytes(frame))
        return True


def _tx(drv, payload: bytes) -> None:
    q = drv.queues[TX_QUEUE]
    a = drv.alloc(12 + len(payload))
    drv.mem.write(a, bytes(12) + payload)
    q.add([(a, 12 + len(payload), False)])
    q.kick()
    q.get_used()


def test_empty_net_device_link_follows_the_backend():
    dev = NetDevice(None, link_up=False)
    drv = Driver(dev)
    feats = drv.init()
    assert feats & (1 << VIRTIO_NET_F_STATUS) and not feats & (1 << VIRTIO_NET_F_MAC)
    assert struct.unpack("<H", drv.config(6, 2))[0] == 0          # link down
    _tx(drv, b"\xff" * 14)
    assert dev.tx_dropped == 1
    dev.on_backend_readable()
    assert dev.rx_blocked
    tap = FakeTap()
    irqs = drv.irqs
    mac = bytes.fromhex("525400abcdef")
    assert dev.replace_backend(tap, mac=mac) is None
    assert struct.unpack("<H", drv.config(6, 2))[0] == 1          # link up
    assert drv.config(0, 6) == mac
    assert dev.avail_features & (1 << VIRTIO_NET_F_MAC)
    assert drv.irqs == irqs + 1 and drv.ack_irq() & M.INT_CONFIG
    _tx(drv, b"\xff" * 14)
    assert len(tap.sent) == 1
    # receive works once the tap is there
    rx = drv.queues[RX_QUEUE]
    a = drv.alloc(1526)
    rx.add([(a, 1526, True)])
    rx.kick()
    tap.inbox.append(bytes(12) + b"\xff" * 14)
    dev.on_backend_readable()
    assert rx.get_used() and dev.rx_frames == 1
    assert dev.replace_backend(None) is tap
    assert struct.unpack("<H", drv.config(6, 2))[0] == 0
    _tx(drv, b"\xff" * 14)
    assert len(tap.sent) == 1 and dev.tx_dropped == 2
    # state of the unplugged slot (MAC offer seen by the driver) restores
    st = dev.state()
    dev2 = NetDevice(None, link_up=False)
    dev2.restore(st)
    assert dev2.link_up is False and dev2.acked_features == dev.acked_features
    drv.mem.close()


# --- slot plan and template facts ---------------------------------------------------

def _argv(tmp_path, *extra_blk):
    args = ["-kernel", "/boot/vmlinux",
            "-drive", f"id=root,file={image(tmp_path, 'root.img')},direct=off",
            "-device", "virtio-blk-device,drive=root,id=root",
            "-netdev", "tap,id=n0,ifname=tap0",
            "-device", "virtio-net-device,netdev=n0,id=net0",
            "-device", "virtio-serial-device,id=vser0"]
    for name in extra_blk:
        args += ["-drive", f"id={name},file={image(tmp_path, name + '.img', 8)},direct=off",
                 "-device", f"virtio-blk-device,drive={name},id={name}"]
    return parse_args(args)


def test_reserved_slots_always_exist(tmp_path):
    slots = slotmod.plan_slots(_argv(tmp_path))
    assert [s.kind for s in slots] == ["blk"] * 4 + ["net"] * 2 + ["other"]
    assert [s.config.id if s.config else None for s in slots] == \
        ["root", None, None, None, "net0", None, "vser0"]
    assert [s.base for s in slots][:2] == [0xF0100000, 0xF0100200]
    assert [s.irq for s in slots] == list(range(5, 12))
    assert slots[5].number == 1 and slots[5].replaceable and not slots[6].replaceable


def _live(config, hot_slot: int, hot_cfg):
    """The slots of a running VM after device_add of hot_cfg into hot_slot."""
    slots = slotmod.plan_slots(config)
    slots[hot_slot].config, slots[hot_slot].hot = hot_cfg, True
    return slots


def test_template_after_hot_replace_needs_the_device_on_the_command_line(tmp_path):
    boot = _argv(tmp_path)
    restore_cfg = _argv(tmp_path, "hot")              # the hot disk on the command line
    hot = restore_cfg.device("hot")
    template = F.slot_facts(boot, _live(boot, 3, hot))  # device_add addr=0x3
    assert [d["id"] for d in template["devices"]] == ["root", "hot", "net0", "vser0"]
    assert template["devices"][1]["slot"] == 3 and template["devices"][1]["hot"]
    # with the device on the command line: placed into slot 3, accepted
    assert F.placement(template) == {"root": 0, "hot": 3, "net0": 4}
    plan = slotmod.plan_slots(restore_cfg, F.placement(template))
    assert plan[3].config.id == "hot" and plan[1].config is None
    F.compare(template, F.slot_facts(restore_cfg, plan))
    # without it: refused, naming the device and its slot
    with pytest.raises(TemplateError) as ei:
        F.compare(template, F.machine_facts(boot, F.placement(template)))
    msg = str(ei.value)
    assert ei.value.attribute == "number of devices"
    assert "'hot' was hot-replaced into virtio-blk slot 3" in msg
    assert "must be on the restore command line" in msg
    # plain in-order filling would have put it in slot 1: the slot is checked
    with pytest.raises(TemplateError, match="slot"):
        F.compare(template, F.machine_facts(restore_cfg))


def test_template_after_device_del_refuses_the_deleted_device(tmp_path):
    boot = _argv(tmp_path, "data")
    slots = slotmod.plan_slots(boot)
    slots[1].config = None                            # device_del data
    template = F.slot_facts(boot, slots)
    with pytest.raises(TemplateError) as ei:
        F.compare(template, F.machine_facts(boot, F.placement(template)))
    assert "'data' is not in the template" in str(ei.value)
    F.compare(template, F.machine_facts(_argv(tmp_path), F.placement(template)))


def test_hot_replaced_device_facts_must_match(tmp_path):
    boot = _argv(tmp_path)
    restore_cfg = _argv(tmp_path, "hot")
    template = F.slot_facts(boot, _live(boot, 2, restore_cfg.device("hot")))
    other = parse_args(["-kernel", "/boot/vmlinux",
                        "-drive", f"id=root,file={tmp_path / 'root.img'},direct=off",
                        "-device", "virtio-blk-device,drive=root,id=root",
                        "-netdev", "tap,id=n0,ifname=tap0",
                        "-device", "virtio-net-device,netdev=n0,id=net0",
                        "-device", "virtio-serial-device,id=vser0",
                        "-drive", f"id=hot,file={tmp_path / 'hot.img'},direct=off,readonly=on",
                        "-device", "virtio-blk-device,drive=hot,id=hot"])
    with pytest.raises(TemplateError, match="readonly"):
        F.compare(template, F.machine_facts(other, F.placement(template)))


def test_older_template_without_slots_is_refused_clearly(tmp_path):
    cfg = _argv(tmp_path)
    old = F.machine_facts(cfg)
    for d in old["devices"]:
        d.pop("slot")
    with pytest.raises(TemplateError, match="older stratopy"):
        F.compare(old, F.machine_facts(cfg))
