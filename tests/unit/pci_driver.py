"""A tiny PCI + virtio-pci driver for unit tests: it enumerates through
CF8/CFC, sizes and programs BARs, walks capabilities and drives the modern
virtio-pci transport the way Linux's virtio_pci_modern does."""

from __future__ import annotations

import pytest

from stratopy.devices.virtio.device import (
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1)
from stratopy.devices.bus import Bus
from stratopy.memory import GuestMemory
from stratopy.pci import bus as pbus
from stratopy.pci import virtio_pci as vp
from tests.unit.virtio_driver import DriverQueue


class ConfigAccess:
    """Config cycles through the CF8/CFC port pair on a PIO bus."""

    def __init__(self, pio: Bus):
        self.pio = pio

    def _addr(self, bus, dev, fn, reg):
        self.pio.write(0xCF8, (0x80000000 | bus << 16 | dev << 11 | fn << 8 | reg & 0xFC)
                       .to_bytes(4, "little"))

    def read(self, bus, dev, fn, reg, size=4):
        self._addr(bus, dev, fn, reg)
        return int.from_bytes(self.pio.read(0xCFC + (reg & 3), size), "little")

    def write(self, bus, dev, fn, reg, value, size=4):
        self._addr(bus, dev, fn, reg)
        self.pio.write(0xCFC + (reg & 3), value.to_bytes(size, "little"))


class EcamAccess:
    def __init__(self, mmio: Bus, base: int):
        self.mmio, self.base = mmio, base

    def read(self, bus, dev, fn, reg, size=4):
        a = self.base | bus << 20 | dev << 15 | fn << 12 | reg
        return int.from_bytes(self.mmio.read(a, size), "little")

    def write(self, bus, dev, fn, reg, value, size=4):
        a = self.base | bus << 20 | dev << 15 | fn << 12 | reg
        self.mmio.write(a, value.to_bytes(size, "little"))


def size_bar(cfg, bus, dev, fn, index):
    """The sizing protocol (PCI 3.0 §6.2.5.1): -> (size, kind)."""
    reg = 0x10 + 4 * index
    orig = cfg.read(bus, dev, fn, reg)
    cfg.write(bus, dev, fn, reg, 0xFFFFFFFF)
    lo = cfg.read(bus, dev, fn, reg)
    cfg.write(bus, dev, fn, reg, orig)
    if lo == 0:
        return 0, None
    if lo & 1:
        return (~(lo & 0xFFFFFFFC) + 1) & 0xFFFF, "io"
    if lo & 6 == 4:
        orig_hi = cfg.read(bus, dev, fn, reg + 4)
        cfg.write(bus, dev, fn, reg + 4, 0xFFFFFFFF)
        hi = cfg.read(bus, dev, fn, reg + 4)
        cfg.write(bus, dev, fn, reg + 4, orig_hi)
        mask = hi << 32 | (lo & 0xFFFFFFF0)
        return (~mask + 1) & ((1 << 64) - 1), "mem64"
    return (~(lo & 0xFFFFFFF0) + 1) & 0xFFFFFFFF, "mem32"


def capabilities(cfg, bus, dev, fn):
    out = []
    if not cfg.read(bus, dev, fn, 0x06, 2) & 0x10:
        return out
    off = cfg.read(bus, dev, fn, 0x34, 1)
    while off:
        out.append((cfg.read(bus, dev, fn, off, 1), off))
        off = cfg.read(bus, dev, fn, off + 1, 1)
    return out


class VirtioPciDriver:
    """Drives one virtio-pci function at (0, dev, 0) whose BARs it places
    at ``bar1`` / ``bar4`` in ``mmio``."""

    def __init__(self, cfg, mmio: Bus, mem, dev: int, bar1=0xC0000000, bar4=0xC0010000):
        self.cfg, self.mmio, self.mem, self.dev = cfg, mmio, mem, dev
        c = cfg
        c.write(0, dev, 0, 0x14, bar1)
        c.write(0, dev, 0, 0x20, bar4 & 0xFFFFFFFF)
        c.write(0, dev, 0, 0x24, bar4 >> 32)
        c.write(0, dev, 0, 0x04, 0x6, 2)     # memory + bus master
        self.bar1, self.bar4 = bar1, bar4
        self.caps = {}
        for cid, off in capabilities(c, 0, dev, 0):
            if cid == 0x09:
                t = c.read(0, dev, 0, off + 3, 1)
                self.caps[t] = (c.read(0, dev, 0, off + 8), off)
            else:
                self.caps[("id", cid)] = off
        self.common = bar4 + self.caps[vp.CAP_COMMON][0]
        self.isr = bar4 + self.caps[vp.CAP_ISR][0]
        self.device_cfg = bar4 + self.caps[vp.CAP_DEVICE][0]
        noff = self.caps[vp.CAP_NOTIFY][1]
        self.notify_base = bar4 + self.caps[vp.CAP_NOTIFY][0]
        self.notify_mult = c.read(0, dev, 0, noff + 16)
        self._next = 0x40000
        self.queues = []

    def r(self, addr, size):
        return int.from_bytes(self.mmio.read(addr, size), "little")

    def w(self, addr, v, size):
        self.mmio.write(addr, v.to_bytes(size, "little"))

    def alloc(self, n, align=16):
        addr = (self._next + align - 1) & ~(align - 1)
        self._next = addr + n
        return addr

    def enable_msix(self, vectors):
        """Program ``vectors`` table entries (address 0xfee00000, data
        0x40 + v), unmask them and enable MSI-X."""
        for v in range(vectors):
            e = self.bar1 + 16 * v
            self.w(e, 0xFEE00000, 4)
            self.w(e + 4, 0, 4)
            self.w(e + 8, 0x40 + v, 4)
            self.w(e + 12, 0, 4)
        cap = self.caps[("id", 0x11)]
        ctl = self.cfg.read(0, self.dev, 0, cap + 2, 2)
        self.cfg.write(0, self.dev, 0, cap + 2, ctl | 0x8000, 2)

    def init(self, queue_size=16, msix=True):
        c = self.common
        self.w(c + vp.C_STATUS, 0, 1)
        self.w(c + vp.C_STATUS, STATUS_ACKNOWLEDGE, 1)
        self.w(c + vp.C_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER, 1)
        self.w(c + vp.C_DFSELECT, 0, 4)
        lo = self.r(c + vp.C_DF, 4)
        self.w(c + vp.C_DFSELECT, 1, 4)
        hi = self.r(c + vp.C_DF, 4)
        feats = lo | hi << 32
        assert feats & 1 << VIRTIO_F_VERSION_1
        self.w(c + vp.C_GFSELECT, 0, 4)
        self.w(c + vp.C_GF, feats & 0xFFFFFFFF, 4)
        self.w(c + vp.C_GFSELECT, 1, 4)
        self.w(c + vp.C_GF, feats >> 32, 4)
        s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        self.w(c + vp.C_STATUS, s, 1)
        assert self.r(c + vp.C_STATUS, 1) & STATUS_FEATURES_OK
        nq = self.r(c + vp.C_NUMQ, 2)
        if msix:
            self.w(c + vp.C_MSIX, 0, 2)
            assert self.r(c + vp.C_MSIX, 2) == 0
        self.queues = []
        for i in range(nq):
            self.w(c + vp.C_Q_SELECT, i, 2)
            size = min(self.r(c + vp.C_Q_SIZE, 2), queue_size)
            q = DriverQueue(self, i, size)
            self.w(c + vp.C_Q_SIZE, size, 2)
            for reg, addr in ((vp.C_Q_DESCLO, q.desc), (vp.C_Q_AVAILLO, q.avail),
                              (vp.C_Q_USEDLO, q.used)):
                self.w(c + reg, addr & 0xFFFFFFFF, 4)
                self.w(c + reg + 4, addr >> 32, 4)
            if msix:
                self.w(c + vp.C_Q_MSIX, i + 1, 2)
                assert self.r(c + vp.C_Q_MSIX, 2) == i + 1
            noff = self.r(c + vp.C_Q_NOFF, 2)
            q.notify_addr = self.notify_base + noff * self.notify_mult
            q.kick = (lambda q=q: self.w(q.notify_addr, q.index, 2))
            self.w(c + vp.C_Q_ENABLE, 1, 2)
            self.queues.append(q)
        self.w(c + vp.C_STATUS, s | STATUS_DRIVER_OK, 1)
        assert self.r(c + vp.C_STATUS, 1) & STATUS_DRIVER_OK
        return feats

    def read_isr(self):
        return self.r(self.isr, 1)


def make_platform(mem, ecam_base=0xB0000000):
    """A PciRoot with CF8 ports and ECAM on fresh buses; BAR regions of
    functions are mapped into ``mmio`` as the guest places them."""
    pio, mmio = Bus(), Bus()

    def map_bar(fn, index, old, new):
        target = pio if fn.config.bars[index].is_io else mmio
        if old is not None:
            target.remove(old)
        if new is not None and index in fn.regions:
            target.insert(new, fn.config.bars[index].size, fn.regions[index])
    root = pbus.PciRoot(map_bar)
    pio.insert(0xCF8, 8, pbus.ConfigPorts(root))
    ecam = pbus.Ecam(root)
    mmio.insert(ecam_base, ecam.size, ecam)
    return root, pio, mmio


@pytest.fixture
def platform():
    """1 MiB of guest RAM and the q35 PCI root on fresh PIO/MMIO buses
    (test_pci.py, test_pci_state.py: imported there as a fixture)."""
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    root, pio, mmio = make_platform(mem)
    yield root, pio, mmio, mem
    mem.close()
