"""The typed PCI snapshot records (q35 templates) and their checks: each
record round-trips through the strict codec, each bad field is refused with
its path, and a device manager restored from them maps the BARs and the
doorbells where the template's guest had them (pure: no KVM)."""

from __future__ import annotations

import json

import pytest

from stratopy.arch.x86_64 import q35_layout
from stratopy.cli_parse import parse_args
from stratopy.devices.virtio.rng import RngDevice
from stratopy.errors import TemplateError
from stratopy.machine.device_manager import DeviceManager
from stratopy.machine.eventloop import EventLoop
from stratopy.machine.pci_devices import PciDevices
from stratopy.machine.schema import DevicesState
from stratopy.memory import GuestMemory
from stratopy.migration.codec import from_plain, to_plain
from stratopy.pci import config as pcfg
from stratopy.pci import root_port as rp
from stratopy.pci import virtio_pci as vp
from stratopy.pci.msix import MsixState
from stratopy.pci.state import PciState, RootPortState
from tests.unit.pci_driver import (ConfigAccess, VirtioPciDriver, make_platform,  # noqa: F401
                                   platform)  # (a fixture)


def _through_json(tp, value, path="x"):
    return from_plain(tp, json.loads(json.dumps(to_plain(value))), path)


def _rng_fn(mem, msis=None, intx=None):
    msis = [] if msis is None else msis
    intx = [] if intx is None else intx
    return vp.VirtioPciFunction(RngDevice(lambda n: bytes(range(n))), mem,
                                lambda v, a, d: msis.append((v, a, d)), intx.append)


def _driven(platform, msix=True):
    root, pio, mmio, mem = platform
    msis, intx = [], []
    fn = _rng_fn(mem, msis, intx)
    root.bus0.add(4, 0, fn)
    drv = VirtioPciDriver(ConfigAccess(pio), mmio, mem, 4)
    if msix:
        drv.enable_msix(2)
    drv.init(msix=msix)
    return fn, drv, msis, intx


# --- config space -----------------------------------------------------------------------

def test_config_space_state_round_trip(platform):
    fn, drv, _, _ = _driven(platform)
    st = _through_json(pcfg.ConfigSpaceState, fn.config.state())
    other = _rng_fn(platform[3])
    other.config.restore(st, "x")
    assert other.config.bar_mapping(vp.MODERN_BAR) == drv.bar4
    assert other.config.bar_mapping(vp.MSIX_BAR) == drv.bar1
    assert other.config.command & pcfg.COMMAND_MASTER


@pytest.mark.parametrize("offset, value, needle", [
    (0x00, 0x34, "byte 0x0"),                      # vendor id
    (0x0E, 0x80, "byte 0xe"),                      # multifunction bit
    (0x41, 0x80, "byte 0x41"),                     # the capability chain
    (0x20, 0x0C, "byte 0x20"),                     # BAR 4's flag bits (no longer 64-bit)
])
def test_config_space_refuses_read_only_bits(offset, value, needle):
    fn = _rng_fn(None)
    data = bytearray(fn.config.data)
    data[offset] ^= value
    with pytest.raises(TemplateError, match=rf"devices\.virtio\[2\]\.transport\.config\.data: "
                                            rf"read-only bits of register {needle}"):
        fn.config.restore(pcfg.ConfigSpaceState(bytes(data)),
                          "devices.virtio[2].transport.config")
    assert fn.config.data != data                  # nothing applied


def test_config_space_takes_what_guest_and_device_change():
    fn = _rng_fn(None)
    data = bytearray(fn.config.data)
    data[pcfg.STATUS] |= pcfg.STATUS_INTERRUPT     # the device's (vmask)
    data[pcfg.COMMAND] = 0x06                      # the guest's (wmask)
    fn.config.restore(pcfg.ConfigSpaceState(bytes(data)), "x")
    assert fn.config.data == data
    with pytest.raises(TemplateError, match=r"x\.data: 3 bytes, the function has 4096"):
        fn.config.restore(pcfg.ConfigSpaceState(b"abc"), "x")


def test_config_space_state_is_decoded_strictly():
    with pytest.raises(TemplateError, match=r"x\.data"):
        from_plain(pcfg.ConfigSpaceState, {"data": 7}, "x")
    with pytest.raises(TemplateError, match=r"x"):
        from_plain(pcfg.ConfigSpaceState, {"data": "", "more": 1}, "x")


# --- MSI-X ----------------------------------------------------------------------------------

def test_msix_state_round_trip_and_checks(platform):
    fn, _, _, _ = _driven(platform)
    fn.msix.pending = 0b10
    st = _through_json(MsixState, fn.msix.state())
    other = _rng_fn(None)
    other.msix.restore(st, "m")
    assert other.msix.table == fn.msix.table and other.msix.pending == 0b10
    with pytest.raises(TemplateError, match=r"m\.table: 16 bytes, the function has 32"):
        other.msix.restore(MsixState(table=bytes(16), pending=0), "m")
    bad = bytearray(fn.msix.table)
    bad[16 + 13] = 1                               # vector 1: a reserved control bit
    with pytest.raises(TemplateError, match=r"m\.table: vector 1 control 0x100"):
        other.msix.restore(MsixState(table=bytes(bad), pending=0), "m")
    with pytest.raises(TemplateError, match=r"m\.pending: 0x4 names a vector past"):
        other.msix.restore(MsixState(table=bytes(fn.msix.table), pending=4), "m")


# --- the virtio-pci function ---------------------------------------------------------

def test_virtio_pci_state_round_trip_and_msix_after_restore(platform):
    root, pio, mmio, mem = platform
    fn, drv, _, _ = _driven(platform)
    st = _through_json(vp.VirtioPciState, fn.state())
    assert (st.bus, st.addr, st.multifunction) == ("pcie.0", 4 << 3, False)
    assert st.queue_vectors == [1] and st.msix_config == 0
    # a new platform, the function restored and its BARs mapped as the guest had them
    root2, pio2, mmio2 = make_platform(mem)
    msis = []
    fn2 = _rng_fn(mem, msis)
    root2.bus0.add(4, 0, fn2)
    fn2.device.restore(fn.device.state())          # the device first, as the manager does
    fn2.restore(st, "p")
    root2.update_bars(fn2)
    assert fn2.transport.queue_vectors == [1] and fn2.device.activated
    q = drv.queues[0]
    drv.mmio = mmio2                       # the guest's next request, on the restored machine
    buf = drv.alloc(16)
    q.add([(buf, 16, True)])
    q.kick()
    assert msis == [(1, 0xFEE00000, 0x41)]
    assert q.get_used() == [(0, 16)]


@pytest.mark.parametrize("field, value, needle", [
    ("queue_vectors", [7], r"p\.queue_vectors\[0\]: vector 7 is out of range"),
    ("queue_vectors", [1, 1], r"p\.queue_vectors: 2 entries, the device has 1 queues"),
    ("msix_config", 5, r"p\.msix_config: vector 5 is out of range"),
])
def test_virtio_pci_state_refuses_bad_vectors(platform, field, value, needle):
    fn, _, _, _ = _driven(platform)
    st = fn.state()
    setattr(st, field, value)
    other = _rng_fn(platform[3])
    with pytest.raises(TemplateError, match=needle):
        other.restore(st, "p")
    assert other.transport.status == 0             # nothing applied


def test_virtio_pci_state_names_the_common_config(platform):
    fn, _, _, _ = _driven(platform)
    st = fn.state()
    st.common.status = 0x80 | 0x04                 # DRIVER_OK without its predecessors
    with pytest.raises(TemplateError, match=r"p\.common: virtio-mmio state field status"):
        _rng_fn(platform[3]).restore(st, "p")


def test_intx_level_comes_back(platform):
    fn, drv, _, intx = _driven(platform, msix=False)
    q = drv.queues[0]
    q.add([(drv.alloc(16), 16, True)])
    q.kick()
    assert intx == [True]
    st = _through_json(vp.VirtioPciState, fn.state())
    assert st.intx_level and st.common.interrupt_status == 1
    again = []
    fn2 = _rng_fn(platform[3], intx=again)
    fn2.device.restore(fn.device.state())
    fn2.restore(st, "p")
    assert again == [True]                         # the line is driven again
    assert fn2.config.get(pcfg.STATUS, 2) & pcfg.STATUS_INTERRUPT


# --- root ports ---------------------------------------------------------------------------

def test_root_port_state_round_trip_and_checks():
    port = rp.RootPort(1, 1, lambda *a: None, name="pcie.1")
    e = port.exp
    port.config_write(rp.SECONDARY_BUS, 1, 2)
    port.config_write(e + rp.EXP_SLTCTL, 2, rp.SLTCTL_HPIE | rp.SLTCTL_PDCE)
    port._set_slot_status(rp.SLTSTA_PDC)
    st = _through_json(RootPortState, RootPortState(
        id="pcie.1", addr=0xF8, port=1, chassis=1, config=port.config.state(),
        asserted=rp.SLTSTA_PDC))
    other = rp.RootPort(1, 1, lambda *a: None, name="pcie.1")
    other.restore(st.config, st.asserted, "r")
    assert other.secondary_bus == 2 and other.asserted == rp.SLTSTA_PDC
    assert other._slot(rp.EXP_SLTSTA) & rp.SLTSTA_PDC
    with pytest.raises(TemplateError, match=r"r\.asserted: 0x4 holds bits"):
        other.restore(st.config, 4, "r")
    third = rp.RootPort(1, 3, lambda *a: None)     # another chassis: read-only slot capability
    with pytest.raises(TemplateError, match=r"r\.config\.data: read-only bits"):
        third.restore(st.config, 0, "r")


# --- the device manager with PCI -------------------------------------------------------------

class FakeVm:
    fd = -1

    def __init__(self):
        self.ioeventfds: dict[int, int] = {}       # fd -> address
        self.lines: list = []

    def register_ioeventfd(self, fd, addr, length, datamatch=None, deassign=False):
        if deassign:
            assert self.ioeventfds.pop(fd) == addr
        else:
            self.ioeventfds[fd] = addr

    def irq_line(self, gsi, level):
        self.lines.append((gsi, level))

    def irq_pulse(self, gsi):
        return lambda: None


class PciMachine:
    def __init__(self, config, mem):
        self.config, self.mem = config, mem
        self.vm = FakeVm()
        self.loop = EventLoop()
        self.devices = DeviceManager(self)

    def irq_line(self, gsi):
        return self.vm.irq_pulse(gsi)

    def build(self):
        from stratopy.machine.q35 import Q35Vm

        self.devices.add_legacy_devices(reset=lambda: None)
        self.devices.add_rtc(with_ports=True)
        self.devices.add_pci(q35_layout, Q35Vm.plan_slots(self.config))
        return self

    def close(self):
        self.devices.close()
        self.loop.close()


def q35_config(addr="0x4", mf="off", port="0x1"):
    return parse_args(["-kernel", "/boot/vmlinux", "-machine", "q35",
                       "-object", "rng-random,id=r,filename=/dev/urandom",
                       "-device", f"virtio-rng-pci,id=rng0,rng=r,bus=pcie.0,addr={addr},"
                                  f"multifunction={mf}",
                       "-device", f"pcie-root-port,id=pcie.1,port={port},bus=pcie.0,addr=0x1f"])


@pytest.fixture
def machines(monkeypatch):
    monkeypatch.setattr(PciDevices, "_msi_sender", lambda self: (lambda *a: None))
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    made = []

    def make(**kw):
        made.append(PciMachine(q35_config(**kw), mem).build())
        return made[-1]
    yield make
    for m in made:
        m.close()
    mem.close()


def _saved(m) -> DevicesState:
    dm = m.devices
    VirtioPciDriver(ConfigAccess(dm.pio), dm.mmio, m.mem, 4).init()
    return _through_json(DevicesState, dm.state(), "devices")


def test_device_manager_maps_bars_and_doorbells_on_restore(machines):
    m = machines()
    saved = _saved(m)
    assert saved.pci.root_ports[0].id == "pcie.1" and saved.i8042 is not None
    assert saved.virtio[0].transport_type == "virtio-pci"
    m2 = machines()
    dm2 = m2.devices
    assert dm2.mmio.lookup(0xC0010000) is None
    dm2.restore(saved)
    region, _ = dm2.mmio.lookup(0xC0010000)
    assert region is dm2.slots[0].transport               # BAR 4 where the guest put it
    assert list(m2.vm.ioeventfds.values()) == [0xC0010000 + vp.NOTIFY_OFFSET]
    assert dm2.pci.doorbell_base(dm2.slots[0]) == 0xC0010000
    assert to_plain(dm2.state()) == to_plain(saved)


def test_device_manager_refuses_moved_functions_and_ports(machines):
    saved = _saved(machines())
    with pytest.raises(TemplateError, match=r"devices\.virtio\[0\]\.transport \(rng0\) "
                                            r"bus/addr differs: template has 'pcie\.0 addr "
                                            r"0x4\.0x0', command line has 'pcie\.0 addr 0x5"):
        DeviceManager.check_slots(saved, machines(addr="0x5").devices.slots)
    with pytest.raises(TemplateError, match="multifunction"):
        machines(mf="on").devices.restore(saved)
    with pytest.raises(TemplateError, match=r"devices\.pci\.root_ports\[0\] \(id, devfn, "
                                            r"port, chassis\) differs"):
        machines(port="0x2").devices.restore(saved)


def test_no_template_while_a_device_del_is_pending(machines):
    from stratopy.errors import MigrationError

    m = machines()
    m.devices.pci.root_ports["pcie.1"].removal_pending = True
    with pytest.raises(MigrationError, match="device_del of the device in root port 'pcie.1'"):
        m.devices.state()


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: setattr(s.pci, "config_address", 0x3), r"devices\.pci\.config_address: 0x3"),
    (lambda s: setattr(s, "pci", None), r"devices\.pci: the template's machine has no PCI"),
    (lambda s: s.pci.root_ports.pop(), r"devices\.pci\.root_ports \(number\) differs"),
])
def test_device_manager_refuses_bad_topology(machines, mutate, needle):
    saved = _saved(machines())
    mutate(saved)
    with pytest.raises(TemplateError, match=needle):
        machines().devices.restore(saved)


def _with_bar4(saved: DevicesState, address: int) -> DevicesState:
    data = bytearray(saved.virtio[0].transport.config.data)
    data[0x20:0x28] = (address | 0xC).to_bytes(8, "little")
    saved.virtio[0].transport.config = pcfg.ConfigSpaceState(bytes(data))
    return saved


def test_device_manager_refuses_bars_outside_the_windows(machines):
    saved = _with_bar4(_saved(machines()), 0x1_0000_0000)
    with pytest.raises(TemplateError, match=r"devices\.virtio\[0\]\.transport\.config: BAR 4 "
                                            r"at 0x100000000 .* outside the PCI window"):
        machines().devices.restore(saved)
    saved = _with_bar4(_saved(machines()), 0xC0000000)     # on top of its own BAR 1
    with pytest.raises(TemplateError, match=r"BAR 4 at 0xc0000000 overlaps"):
        machines().devices.restore(saved)


def test_pci_state_round_trip():
    host = pcfg.ConfigSpaceState(bytes(4096))
    st = PciState(config_address=0x80000000, host_bridge=host, root_ports=[])
    assert _through_json(PciState, st) == st
    with pytest.raises(TemplateError, match=r"x\.root_ports"):
        from_plain(PciState, {"config_address": 0, "host_bridge": {"data": ""},
                              "root_ports": {}}, "x")


def test_i8042_is_in_the_tree(machines):
    """The i8042's (empty) state is a node of the tree, decoded strictly."""
    plain = json.loads(json.dumps(to_plain(_saved(machines()))))
    assert plain["i8042"] == {}
    plain["i8042"] = {"reset_pending": 1}
    with pytest.raises(TemplateError, match=r"devices\.i8042"):
        from_plain(DevicesState, plain, "devices")
    del plain["i8042"]
    with pytest.raises(TemplateError, match=r"devices.*i8042"):
        from_plain(DevicesState, plain, "devices")


def test_intx_line_counts_are_recounted(machines):
    """Not saved: a restored function asserting INTx raises its line again
    through the router (count 1, KVM_IRQ_LINE level 1)."""
    m = machines()
    dm = m.devices
    drv = VirtioPciDriver(ConfigAccess(dm.pio), dm.mmio, m.mem, 4)
    drv.init(msix=False)
    q = drv.queues[0]
    q.add([(drv.alloc(16), 16, True)])
    q.kick()
    gsi = dm.slots[0].irq
    assert m.vm.lines == [(gsi, 1)]
    saved = _through_json(DevicesState, dm.state(), "devices")
    m2 = machines()
    m2.devices.restore(saved)
    assert m2.vm.lines == [(gsi, 1)] and m2.devices.pci.intx.count[gsi] == 1
