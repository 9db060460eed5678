"""PCI config space, host bridge, CF8/ECAM, MSI-X, root port, virtio-pci
transport (pure state machines, no KVM)."""

from __future__ import annotations

import struct

import pytest

from stratopy.devices.virtio.rng import RngDevice
from stratopy.pci import bus as pbus
from stratopy.pci import config as pcfg
from stratopy.pci import root_port as rp
from stratopy.pci import virtio_pci as vp
from stratopy.pci.msix import Msix
from tests.unit.pci_driver import (ConfigAccess, EcamAccess, VirtioPciDriver, capabilities,
                                   platform, size_bar)  # noqa: F401 (platform: a fixture)


class Fn(pbus.PciFunction):
    def __init__(self, mf=False):
        cs = pcfg.ConfigSpace(pcfg.PCIE_CONFIG_SIZE)
        cs.header(0x1234, 0x5678, 0x0200, interrupt_pin=1)
        cs.set_multifunction(mf)
        super().__init__(cs)
        cs.add_bar(0, pcfg.BAR_IO_KIND, 0x20)
        cs.add_bar(1, pcfg.BAR_MEM32, 0x1000)
        cs.add_bar(2, pcfg.BAR_MEM64_KIND, 0x100000000, prefetchable=True)
        cs.add_capability(pcfg.CAP_ID_VENDOR, 8)
        cs.add_capability(pcfg.CAP_ID_PM, 8)


def test_host_bridge_is_q35_mch(platform):
    root, pio, mmio, _ = platform
    cfg = ConfigAccess(pio)
    assert cfg.read(0, 0, 0, 0) == 0x29C08086
    assert cfg.read(0, 0, 0, 0x08) >> 8 == 0x060000
    # empty slots and functions read all ones
    assert cfg.read(0, 1, 0, 0) == 0xFFFFFFFF
    assert cfg.read(0, 0, 1, 0) == 0xFFFFFFFF
    assert cfg.read(5, 0, 0, 0) == 0xFFFFFFFF


def test_bar_sizing_protocol(platform):
    root, pio, mmio, _ = platform
    root.bus0.add(3, 0, Fn())
    cfg = ConfigAccess(pio)
    assert size_bar(cfg, 0, 3, 0, 0) == (0x20, "io")
    assert size_bar(cfg, 0, 3, 0, 1) == (0x1000, "mem32")
    assert size_bar(cfg, 0, 3, 0, 2) == (0x100000000, "mem64")
    assert size_bar(cfg, 0, 3, 0, 4) == (0, None)
    # flags are read-only: IO bit, 64-bit + prefetchable
    cfg.write(0, 3, 0, 0x10, 0)
    assert cfg.read(0, 3, 0, 0x10) == 1
    cfg.write(0, 3, 0, 0x18, 0)
    assert cfg.read(0, 3, 0, 0x18) == 0xC
    # address bits below the size are not writable
    cfg.write(0, 3, 0, 0x14, 0xC0000FFF)
    assert cfg.read(0, 3, 0, 0x14) == 0xC0000000


def test_readonly_and_write_one_to_clear(platform):
    root, pio, mmio, _ = platform
    fn = Fn()
    root.bus0.add(3, 0, fn)
    cfg = ConfigAccess(pio)
    cfg.write(0, 3, 0, 0, 0)                       # ids are read-only
    assert cfg.read(0, 3, 0, 0) == 0x56781234
    fn.config.set(pcfg.STATUS, 2, fn.config.get(pcfg.STATUS, 2) | 0x8000 | 0x2000)
    cfg.write(0, 3, 0, 0x06, 0x8000, 2)            # clears only the bit written
    st = cfg.read(0, 3, 0, 0x06, 2)
    assert st & 0x2000 and not st & 0x8000 and st & pcfg.STATUS_CAP_LIST
    cfg.write(0, 3, 0, 0x04, 0xFFFF, 2)            # only the defined command bits stick
    assert cfg.read(0, 3, 0, 0x04, 2) == 0x0507


def test_capability_walk(platform):
    root, pio, mmio, _ = platform
    fn = Fn()
    root.bus0.add(3, 0, fn)
    cfg = ConfigAccess(pio)
    caps = capabilities(cfg, 0, 3, 0)
    assert [c for c, _ in caps] == [pcfg.CAP_ID_VENDOR, pcfg.CAP_ID_PM]
    assert caps == fn.config.capabilities()
    assert caps[0][1] == 0x40 and caps[1][1] == 0x48
    cfg.write(0, 3, 0, 0x41, 0, 1)                 # next pointers are read-only
    assert capabilities(cfg, 0, 3, 0) == caps


def test_cf8_and_ecam_agree(platform):
    root, pio, mmio, _ = platform
    root.bus0.add(3, 0, Fn(mf=True))
    root.bus0.add(3, 1, Fn())
    cf8, ecam = ConfigAccess(pio), EcamAccess(mmio, 0xB0000000)
    for dev, fn in ((0, 0), (3, 0), (3, 1), (3, 2), (7, 0)):
        for reg in range(0, 0x100, 4):
            assert cf8.read(0, dev, fn, reg) == ecam.read(0, dev, fn, reg), (dev, fn, reg)
            for sub in range(4):
                assert cf8.read(0, dev, fn, reg + sub, 1) == ecam.read(0, dev, fn, reg + sub, 1)
    # a write through one is seen through the other
    ecam.write(0, 3, 1, 0x14, 0xD0000000)
    assert cf8.read(0, 3, 1, 0x14) == 0xD0000000
    cf8.write(0, 3, 0, 0x3C, 0x0B, 1)
    assert ecam.read(0, 3, 0, 0x3C, 1) == 0x0B
    # extended config space only through ECAM
    assert ecam.read(0, 3, 0, 0x100) == 0
    # multifunction bit on function 0
    assert cf8.read(0, 3, 0, 0x0E, 1) & 0x80
    assert not cf8.read(0, 3, 1, 0x0E, 1) & 0x80


def test_cf8_disabled_and_misaligned(platform):
    root, pio, mmio, _ = platform
    pio.write(0xCF8, (0x00000000).to_bytes(4, "little"))       # enable bit clear
    assert pio.read(0xCFC, 4) == b"\xff" * 4
    assert int.from_bytes(mmio.read(0xB0000001, 2), "little") == 0xFFFF  # misaligned ECAM


def test_bar_mapping_follows_command_and_address(platform):
    root, pio, mmio, _ = platform
    fn = Fn()
    region = object()
    fn.regions = {1: region}
    moves = []
    root.map_bar = lambda f, i, old, new: moves.append((i, old, new))
    root.bus0.add(3, 0, fn)
    cfg = ConfigAccess(pio)
    cfg.write(0, 3, 0, 0x14, 0xC0000000)
    assert moves == []                                         # decode off
    cfg.write(0, 3, 0, 0x04, 0x2, 2)
    assert moves == [(1, None, 0xC0000000)]
    cfg.write(0, 3, 0, 0x14, 0xC0100000)
    assert moves[-1] == (1, 0xC0000000, 0xC0100000)
    cfg.write(0, 3, 0, 0x04, 0x0, 2)
    assert moves[-1] == (1, 0xC0100000, None)


def test_msix_masking_and_pending():
    cs = pcfg.ConfigSpace()
    sent = []
    m = Msix(cs, 3, 1, 0, 0x800, lambda v, a, d: sent.append((v, a, d)))
    cap = m.cap
    assert cs.get(cap, 1) == pcfg.CAP_ID_MSIX
    assert cs.get(cap + 2, 2) == 2                      # table size - 1
    assert cs.get(cap + 4, 4) == 1 and cs.get(cap + 8, 4) == 0x801
    m.table_write(16, struct.pack("<Q", 0xFEE00000))
    m.table_write(24, struct.pack("<I", 0x41))
    m.notify(1)                                          # not enabled: pending
    assert sent == [] and m.pba_read(0, 8) == (2).to_bytes(8, "little")
    cs.write(cap + 2, 2, 0xC000)                         # enable + function mask
    m.config_written(cap + 2, 2)
    assert sent == []
    m.table_write(28, b"\0\0\0\0")                       # unmask vector 1
    assert sent == []                                    # function still masked
    cs.write(cap + 2, 2, 0x8000)
    m.config_written(cap + 2, 2)
    assert sent == [(1, 0xFEE00000, 0x41)] and m.pending == 0
    m.notify(0)                                          # vector 0 is masked
    assert m.pending == 1 and len(sent) == 1
    m.notify(7)                                          # out of range: ignored
    m.table_write(12, struct.pack("<I", 0xFFFFFFFE))     # reserved bits read 0
    assert m.table_read(12, 4) == b"\0\0\0\0"
    assert sent[-1] == (0, 0, 0)                         # unmasking delivered it
    m.table_write(3, b"\1\2\3\4")                        # misaligned: dropped
    assert m.table_read(0, 4) == b"\0\0\0\0"


def test_root_port_hotplug_events():
    sent = []
    port = rp.RootPort(1, 1, lambda v, a, d: sent.append((a, d)), name="pcie.1")
    cs = port.config
    e = port.exp
    assert cs.get(0, 4) == 0x000C1B36 and cs.data[pcfg.HEADER_TYPE] == 1
    assert [c for c, _ in cs.capabilities()] == [pcfg.CAP_ID_EXP, pcfg.CAP_ID_MSI]
    assert cs.get(e + 2, 2) >> 4 & 0xF == rp.TYPE_ROOT_PORT
    assert cs.get(e + rp.EXP_SLTCAP, 4) & rp.SLTCAP_HPC
    # guest enables MSI, bus mastering and the hotplug interrupt
    port.config_write(pcfg.COMMAND, 2, pcfg.COMMAND_MASTER)
    port.config_write(port.msi + 4, 4, 0xFEE00000)
    port.config_write(port.msi + 12, 2, 0x55)
    port.config_write(port.msi + 2, 2, 1)
    port.config_write(e + rp.EXP_SLTCTL, 2, rp.SLTCTL_HPIE | rp.SLTCTL_PDCE
                      | rp.SLTCTL_ABPE | rp.SLTCTL_DLLSCE)
    assert sent == []
    fn = Fn()
    port.plug(fn)
    assert sent == [(0xFEE00000, 0x55)]
    st = cs.get(e + rp.EXP_SLTSTA, 2)
    assert st & rp.SLTSTA_PDS and st & rp.SLTSTA_PDC and st & rp.SLTSTA_DLLSC
    assert cs.get(e + rp.EXP_LNKSTA, 2) & rp.LNKSTA_DLLLA
    port.plug_again = None
    port.config_write(e + rp.EXP_SLTSTA, 2, rp.SLTSTA_PDC | rp.SLTSTA_DLLSC)  # W1C
    assert cs.get(e + rp.EXP_SLTSTA, 2) & rp.SLTSTA_EVENTS == 0
    assert cs.get(e + rp.EXP_SLTSTA, 2) & rp.SLTSTA_PDS
    assert port.unplug() is fn
    assert len(sent) == 2
    assert not cs.get(e + rp.EXP_SLTSTA, 2) & rp.SLTSTA_PDS
    assert port.occupant is None


def test_devices_behind_a_root_port(platform):
    root, pio, mmio, _ = platform
    port = rp.RootPort(1, 1, lambda *a: None)
    root.bus0.add(1, 0, port)
    port.attach(Fn())
    cfg = ConfigAccess(pio)
    assert cfg.read(1, 0, 0, 0) == 0xFFFFFFFF            # bridge not configured yet
    cfg.write(0, 1, 0, 0x18, 0x020100)                   # primary 0, secondary 1, sub 2
    assert cfg.read(1, 0, 0, 0) == 0x56781234
    assert cfg.read(1, 1, 0, 0) == 0xFFFFFFFF            # only device 0 behind a link
    assert cfg.read(2, 0, 0, 0) == 0xFFFFFFFF


def _rng_platform(platform):
    root, pio, mmio, mem = platform
    msis, intx = [], []
    src = lambda n: bytes(range(n))  # noqa: E731
    fn = vp.VirtioPciFunction(RngDevice(src), mem, lambda v, a, d: msis.append((v, a, d)),
                              intx.append)
    root.bus0.add(4, 0, fn)
    return fn, VirtioPciDriver(ConfigAccess(pio), mmio, mem, 4), msis, intx


def test_virtio_pci_identity_and_capabilities(platform):
    fn, drv, _, _ = _rng_platform(platform)
    cfg = drv.cfg
    assert cfg.read(0, 4, 0, 0) == 0x1044 << 16 | 0x1AF4
    assert cfg.read(0, 4, 0, 0x08, 1) == 1                 # revision 1: modern only
    assert cfg.read(0, 4, 0, 0x2C) == vp.SUBSYSTEM_ID << 16 | 0x1AF4
    assert size_bar(cfg, 0, 4, 0, 1) == (0x1000, "mem32")
    assert size_bar(cfg, 0, 4, 0, 4) == (0x4000, "mem64")
    assert set(drv.caps) >= {vp.CAP_COMMON, vp.CAP_NOTIFY, vp.CAP_ISR, vp.CAP_DEVICE, ("id", 0x11)}
    assert drv.notify_mult == vp.NOTIFY_MULTIPLIER


def test_virtio_pci_rng_with_msix(platform):
    fn, drv, msis, intx = _rng_platform(platform)
    drv.enable_msix(2)
    drv.init()
    q = drv.queues[0]
    buf = drv.alloc(16)
    q.add([(buf, 16, True)])
    q.kick()
    assert q.get_used() == [(0, 16)]
    assert drv.mem.read(buf, 16) == bytes(range(16))
    assert msis == [(1, 0xFEE00000, 0x41)]                 # the queue's vector
    assert intx == [] and drv.read_isr() == 0              # MSI-X: no ISR, no INTx


def test_virtio_pci_rng_with_intx(platform):
    fn, drv, msis, intx = _rng_platform(platform)
    drv.init(msix=False)
    q = drv.queues[0]
    q.add([(drv.alloc(8), 8, True)])
    q.kick()
    assert msis == [] and intx == [True]
    assert drv.cfg.read(0, 4, 0, 0x06, 2) & pcfg.STATUS_INTERRUPT
    assert drv.read_isr() == 1                             # read clears and deasserts
    assert intx == [True, False] and drv.read_isr() == 0
    # INTx disable gates the line, not the ISR
    drv.cfg.write(0, 4, 0, 0x04, 0x406, 2)
    q.add([(drv.alloc(8), 8, True)])
    q.kick()
    assert intx == [True, False]
    drv.cfg.write(0, 4, 0, 0x04, 0x006, 2)
    assert intx == [True, False, True]


def test_virtio_pci_refuses_vectors_it_lacks(platform):
    fn, drv, msis, intx = _rng_platform(platform)
    c = drv.common
    drv.w(c + vp.C_MSIX, 9, 2)
    assert drv.r(c + vp.C_MSIX, 2) == 0xFFFF


def test_virtio_pci_broken_queue_raises_config_vector(platform):
    fn, drv, msis, intx = _rng_platform(platform)
    drv.enable_msix(2)
    drv.init()
    q = drv.queues[0]
    q.raw_desc(0, 0xFFFFFF000, 16, 2, 0)                   # outside guest RAM
    q.raw_avail(0)
    q.kick()
    assert drv.r(drv.common + vp.C_STATUS, 1) & 0x40      # NEEDS_RESET
    assert msis[-1][0] == 0                                # msix_config vector


def test_config_space_refuses_bad_bars():
    cs = pcfg.ConfigSpace()
    with pytest.raises(pcfg.ConfigError):
        cs.add_bar(0, pcfg.BAR_MEM32, 0x1001)
    cs.add_bar(4, pcfg.BAR_MEM64_KIND, 0x4000)
    with pytest.raises(pcfg.ConfigError):
        cs.add_bar(5, pcfg.BAR_MEM32, 0x1000)
    with pytest.raises(pcfg.ConfigError):
        cs.add_bar(5, pcfg.BAR_MEM64_KIND, 0x1000)


def test_bus_addresses_are_checked():
    b = pbus.PciBus("pcie.0")
    b.add(31, 7, Fn())
    with pytest.raises(pcfg.ConfigError):
        b.add(31, 7, Fn())
    with pytest.raises(pcfg.ConfigError):
        b.add(32, 0, Fn())


def test_intx_router_shares_a_line():
    from stratopy.machine.pci_devices import IntxRouter

    calls = []
    r = IntxRouter(lambda gsi, lvl: calls.append((gsi, lvl)))
    a, b = r.line(16), r.line(16)
    a(True)
    b(True)                        # already high: no second edge
    a(False)                       # b still asserts
    assert calls == [(16, 1)]
    b(False)
    assert calls == [(16, 1), (16, 0)]
    r.line(17)(False)              # deasserting an idle line does nothing
    assert calls == [(16, 1), (16, 0)]


def test_root_port_orderly_removal():
    sent, removed = [], []
    port = rp.RootPort(2, 2, lambda v, a, d: sent.append(d))
    e = port.exp
    port.on_removed = removed.append
    port.config_write(pcfg.COMMAND, 2, pcfg.COMMAND_MASTER)
    port.config_write(port.msi + 2, 2, 1)
    port.config_write(e + rp.EXP_SLTCTL, 2, rp.SLTCTL_HPIE | rp.SLTCTL_ABPE | rp.SLTCTL_PDCE)
    fn = Fn()
    port.attach(fn)
    port.request_unplug()
    assert len(sent) == 1 and port.config.get(e + rp.EXP_SLTSTA, 2) & rp.SLTSTA_ABP
    port.config_write(e + rp.EXP_SLTSTA, 2, rp.SLTSTA_ABP)       # the guest acks
    assert port.occupant is fn and removed == []                 # still there
    ctl = port.config.get(e + rp.EXP_SLTCTL, 2)
    port.config_write(e + rp.EXP_SLTCTL, 2, ctl | rp.SLTCTL_PIC_OFF)   # power LED off
    assert removed == [fn] and port.occupant is None
    assert not port.config.get(e + rp.EXP_SLTSTA, 2) & rp.SLTSTA_PDS


def test_virtio_pci_cfg_window(platform):
    """VIRTIO_PCI_CAP_PCI_CFG: BAR 4's common config read and written
    through config space alone (no BAR mapping needed)."""
    fn, drv, msis, intx = _rng_platform(platform)
    cfg = drv.cfg
    caps = [off for cid, off in capabilities(cfg, 0, 4, 0)
            if cid == 0x09 and cfg.read(0, 4, 0, off + 3, 1) == vp.CAP_PCI]
    assert len(caps) == 1
    c = caps[0]
    cfg.write(0, 4, 0, c + 4, vp.MODERN_BAR, 1)
    cfg.write(0, 4, 0, c + 8, vp.C_NUMQ)          # offset
    cfg.write(0, 4, 0, c + 12, 2)                 # length
    assert cfg.read(0, 4, 0, c + 16, 2) == 1      # num_queues of virtio-rng
    cfg.write(0, 4, 0, c + 8, vp.C_STATUS)
    cfg.write(0, 4, 0, c + 12, 1)
    cfg.write(0, 4, 0, c + 16, 1, 1)              # ACKNOWLEDGE through the window
    assert fn.transport.status == 1
    cfg.write(0, 4, 0, c + 12, 3)                 # bad length: nothing happens
    cfg.write(0, 4, 0, c + 16, 0, 1)
    assert fn.transport.status == 1
