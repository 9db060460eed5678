"""The machine's shape without KVM: the snapshot tree through the strict
codec (round trip, field paths, lazily imported state classes), the
builder's two recipes (step order, lifecycle), the device manager's
state()/restore() over real devices driven by a mock virtio driver, and the
lifecycle table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from stratopy import builder
from stratopy.acpi.ged import GedState
from stratopy.cli_parse import parse_args
from stratopy.devices.serial import SerialState
from stratopy.devices.i8042 import I8042State
from stratopy.devices.virtio.block import BlockState
from stratopy.devices.virtio.mmio import MmioState
from stratopy.devices.virtio.net import NetState
from stratopy.devices.virtio.queue import QueueState
from stratopy.errors import LifecycleError, TemplateError
from stratopy.devices.rtc import RtcState
from stratopy.machine.base import TRANSITIONS, Machine, VmState
from stratopy.machine.device_manager import DeviceManager
from stratopy.machine.eventloop import EventLoop
from stratopy.machine.schema import (
    DEVICE_STATES,
    DevicesState,
    MachineState,
    VirtioSlotState,
)
from stratopy.machine.vcpu_state import VcpuState, VmArchState
from stratopy.memory import GuestMemory
from stratopy.migration.codec import from_plain, to_plain
from stratopy.record import StateRecord
from tests.unit.virtio_driver import Driver

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- the snapshot tree through the codec ----------------------------------------------

def _tree() -> MachineState:
    vcpu = VcpuState(index=0, mp_state=b"\0" * 4, regs=b"r" * 144, sregs=b"s" * 312,
                     xsave=b"x" * 4096, fpu=b"", xcrs=b"c" * 392, debugregs=b"d" * 128,
                     lapic=b"l" * 1024, msr_indices=[0x10, 0x277], msr_values=[5, 7],
                     vcpu_events=b"e" * 64, cpuid=[[0, 0, 0, 0xD, 1, 2, 3]])
    vm = VmArchState(pic_master=b"1" * 520, pic_slave=b"2" * 520, ioapic=b"3" * 520,
                     pit=b"4" * 112, clock=b"5" * 48)
    q = QueueState(max_size=256, size=16, ready=True, desc_table=0x10000,
                   avail_ring=0x11000, used_ring=0x12000, next_avail=3, next_used=3)
    blk = VirtioSlotState(index=0, kind="blk", driver="virtio-blk-device", id="root",
                          transport_type="virtio-mmio",
                          transport=MmioState(status=15, queues=[q]),
                          device_type="virtio-blk",
                          device=BlockState(acked_features=1 << 32, capacity=64))
    net = VirtioSlotState(index=4, kind="net", driver="", id="",
                          transport_type="virtio-mmio", transport=MmioState(),
                          device_type="virtio-net",
                          device=NetState(mac="", acked_features=0, link_up=False))
    devices = DevicesState(serial=SerialState(in_buffer=b"ab"), i8042=I8042State(),
                           rtc=RtcState(index=0x0B, cmos=bytes(range(128))),
                           ged=GedState(pending=1), pci=None, virtio=[blk, net])
    return MachineState(machine_type="microvm", vm=vm, vcpus=[vcpu], devices=devices)


def _plain(tree) -> dict:
    # through JSON, as the state file carries it
    return json.loads(json.dumps(to_plain(tree)))


def test_machine_state_round_trips_through_the_codec():
    tree = _tree()
    plain = _plain(tree)
    assert set(plain) == {"machine_type", "vm", "vcpus", "devices"}
    assert plain["devices"]["virtio"][0]["device_type"] == "virtio-blk"
    assert plain["vcpus"][0]["cpuid"] == [[0, 0, 0, 0xD, 1, 2, 3]]
    back = from_plain(MachineState, plain)
    assert back == tree
    assert type(back.devices.virtio[0].device) is BlockState
    assert type(back.devices.virtio[1].device) is NetState
    assert type(back.devices.virtio[0].transport) is MmioState
    assert to_plain(back) == to_plain(tree)


def _refused(plain, needle: str) -> str:
    with pytest.raises(TemplateError) as ei:
        from_plain(MachineState, plain)
    assert needle in str(ei.value), str(ei.value)
    return str(ei.value)


def test_strict_decoding_names_the_field_path():
    p = _plain(_tree())
    del p["devices"]["virtio"][1]["device_type"]
    _refused(p, "devices.virtio[1].device_type: missing field in VirtioSlotState")
    p = _plain(_tree())
    p["devices"]["virtio"][0]["device"]["capacity"] = "64"
    _refused(p, "devices.virtio[0].device.capacity: expected an integer, got a string")
    p = _plain(_tree())
    p["devices"]["virtio"][0]["transport"]["queues"][0]["ready"] = 1
    _refused(p, "devices.virtio[0].transport.queues[0].ready: expected a boolean")
    p = _plain(_tree())
    p["devices"]["serial"]["extra"] = 0
    _refused(p, "devices.serial.extra: unknown field in SerialState")
    p = _plain(_tree())
    p["vcpus"][0]["cpuid"] = "none"
    _refused(p, "vcpus[0].cpuid: expected a list")
    p = _plain(_tree())
    p["devices"]["ged"] = None                  # Optional: a machine without a GED
    assert from_plain(MachineState, p).devices.ged is None
    p = _plain(_tree())
    p["devices"]["virtio"][0]["extra"] = 1
    _refused(p, "devices.virtio[0].extra: unknown field in VirtioSlotState")


def test_a_tag_names_the_state_class_and_an_unknown_tag_is_refused():
    p = _plain(_tree())
    p["devices"]["virtio"][0]["device_type"] = "virtio-gpu"
    _refused(p, "devices.virtio[0].device_type: 'virtio-gpu' is not a known "
                "VirtioSlotState kind")
    p = _plain(_tree())
    p["devices"]["virtio"][0]["transport_type"] = ["virtio-mmio"]
    _refused(p, "devices.virtio[0].transport_type: expected a string")
    # a block state under a net tag is decoded as NetState and refused
    p = _plain(_tree())
    p["devices"]["virtio"][0]["device_type"] = "virtio-net"
    _refused(p, "devices.virtio[0].device.capacity: unknown field in NetState")
    # encoding checks the tag too: a state that is not the tag's class
    tree = _tree()
    tree.devices.virtio[1].device = BlockState()
    with pytest.raises(Exception, match="devices.virtio\\[1\\].device: expected NetState"):
        to_plain(tree)


def test_state_classes_are_imported_only_when_a_template_names_them():
    """A template with a block device only decodes without loading the rng,
    console or vsock modules (and their dataclasses) at start."""
    probe = (
        "import json, sys\n"
        "from stratopy.machine.schema import MachineState\n"
        "from stratopy.migration.codec import from_plain\n"
        "from tests.unit.test_machine_shape import _plain, _tree\n"
        "t = _tree(); t.devices.virtio = t.devices.virtio[:1]\n"
        "from_plain(MachineState, _plain(t))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('stratopy.devices'))))\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout))
    assert "stratopy.devices.virtio.block" in loaded
    for name in ("rng", "console", "vsock"):
        assert f"stratopy.devices.virtio.{name}" not in loaded


def test_every_device_state_class_exists_and_is_the_devices_own():
    from stratopy.devices.virtio.block import BlockDevice
    from stratopy.devices.virtio.console import ConsoleDevice
    from stratopy.devices.virtio.net import NetDevice
    from stratopy.devices.virtio.rng import RngDevice
    from stratopy.devices.virtio.vhost_vsock import VhostVsockDevice
    from stratopy.devices.virtio.vsock import VsockDevice

    labels = {BlockDevice.label, NetDevice.label, RngDevice.label, ConsoleDevice.label,
              VsockDevice.label, VhostVsockDevice.label}
    assert labels == set(DEVICE_STATES)
    for where in DEVICE_STATES.values():
        module, _, name = where.partition(":")
        assert hasattr(__import__(module, fromlist=[name]), name)


def test_state_record_init_is_strict():
    class Pair(StateRecord):
        __slots__ = ("a", "b")
        a: int
        b: str
    assert Pair(1, b="x") == Pair(a=1, b="x")
    with pytest.raises(TypeError, match="field b missing"):
        Pair(1)
    with pytest.raises(TypeError, match="unknown field"):
        Pair(1, "x", c=2)
    with pytest.raises(TypeError, match="3 values"):
        Pair(1, "x", 3)


# --- the builder's recipes ---------------------------------------------------------------

class RecordingMachine(Machine):
    """A Machine whose steps only record their order (no KVM)."""

    machine_type = "microvm"

    def __init__(self, config):
        super().__init__(config)
        self.calls: list[str] = []

    @classmethod
    def ram_layout_of(cls, config):
        return [(0, config.mem_size)]

    @staticmethod
    def plan_slots(config, placement=None):
        return ["slots", placement]

    def create_vm(self):
        self.calls.append("create_vm")
        self.vm = object()
        self.kvm = object()

    def set_memory(self, mem):
        self.calls.append(f"set_memory:{mem}")
        self.mem = mem

    def create_vcpus(self, cpuids=None):
        self.calls.append(f"create_vcpus:{cpuids}")

    def create_devices(self, slots):
        self.calls.append(f"create_devices:{slots}")

    def load_guest(self):
        self.calls.append("load_guest")
        return 0x1000000

    def setup_boot_vcpus(self, entry):
        self.calls.append(f"setup_boot_vcpus:{entry:#x}")

    def restore_state(self, state):
        self.calls.append(f"restore_state:{state}")

    def warm_started(self):
        self.calls.append("warm_started")

    def teardown(self):
        self.loop.close()


class FakeMem:
    def __str__(self):
        return "mem"

    def exclude_from_core_dump(self):
        pass


def test_build_for_boot_runs_its_recipe_in_order(monkeypatch):
    from stratopy import memory

    monkeypatch.setattr(memory.GuestMemory, "for_boot", classmethod(lambda cls, *a, **k: FakeMem()))
    m = RecordingMachine(parse_args(["-kernel", "/boot/vmlinux", "-m", "64"]))
    try:
        builder.build_for_boot(m)
        assert m.calls == ["create_vm", "set_memory:mem", "create_vcpus:None",
                           "create_devices:['slots', None]", "load_guest",
                           "setup_boot_vcpus:0x1000000"]
        assert m.built and m.state is VmState.CREATED
        with pytest.raises(LifecycleError, match="built already"):
            builder.build_for_boot(m)
        with pytest.raises(LifecycleError, match="built already"):
            builder.build_from_template(m, object())
    finally:
        m.teardown()


def test_build_from_template_runs_its_recipe_in_order(monkeypatch):
    from stratopy.migration import memfile, restore

    calls: list[str] = []
    monkeypatch.setattr(restore, "check_host",
                        lambda state, cpuids, kvm: calls.append(f"check_host:{cpuids}"))
    monkeypatch.setattr(memfile, "map_memory",
                        lambda fd, ram, mapped=True: calls.append(f"map:{fd}") or FakeMem())
    monkeypatch.setattr(memfile, "verify_chunks", lambda *a: calls.append("verify"))

    class Opened:
        memory_fd, memory_path, record = 7, "memory", {}

        def close(self):
            calls.append("close")

    config = parse_args(["-kernel", "/boot/vmlinux", "-m", "64",
                         "-incoming", "file:/nonexistent"])
    for verify, expect_verify in (("done", []), ("full", ["verify"])):
        calls.clear()
        m = RecordingMachine(config)
        m.calls = calls
        prepared = builder.PreparedTemplate(Opened(), "STATE", "CPUIDS", "SLOTS", [(0, 64)])
        try:
            builder.build_from_template(m, prepared, verify=verify)
            assert calls == ["create_vm", "check_host:CPUIDS", *expect_verify, "map:7",
                             "set_memory:mem", "create_vcpus:CPUIDS", "create_devices:SLOTS",
                             "restore_state:STATE",
                             *(["close"] if verify == "full" else []), "warm_started"]
            assert m.built and m.migration.status.value == "completed"
        finally:
            m.teardown()


def test_lazy_verify_is_woken_by_the_device_loops_first_turn(monkeypatch):
    """verify=lazy: the check is handed an Event that nothing sets while the
    VM is built; the device loop's first turn (after machine.start()
    released the vCPUs) sets it."""
    from stratopy.migration import memfile, restore

    monkeypatch.setattr(restore, "check_host", lambda state, cpuids, kvm: None)
    monkeypatch.setattr(memfile, "map_memory", lambda fd, ram, mapped=True: FakeMem())
    handed = []
    monkeypatch.setattr(restore, "start_lazy_verify",
                        lambda opened, ram, started, damaged: handed.append(started))
    config = parse_args(["-kernel", "/boot/vmlinux", "-m", "64",
                         "-incoming", "file:/nonexistent"])
    m = RecordingMachine(config)
    try:
        opened = types.SimpleNamespace(memory_fd=7, memory_path="memory", record={},
                                       close=lambda: None)
        builder.build_from_template(m, builder.PreparedTemplate(
            opened, "STATE", "CPUIDS", "SLOTS", [(0, 64)]), verify="lazy")
        assert len(handed) == 1 and not handed[0].is_set()
        m.loop.call_soon(m.loop.stop)
        m.loop.run()                     # one turn: what was queued runs
        assert handed[0].is_set()
    finally:
        m.teardown()


def test_a_started_machine_cannot_be_built():
    m = RecordingMachine(parse_args(["-kernel", "/boot/vmlinux"]))
    try:
        m.state = VmState.RUNNING
        with pytest.raises(LifecycleError, match="the VM is running"):
            builder.build_for_boot(m)
        assert m.calls == []
        m.state = VmState.CREATED
        with pytest.raises(LifecycleError, match="not built"):
            m.start()
    finally:
        m.teardown()


def test_lifecycle_transitions():
    m = RecordingMachine(parse_args(["-kernel", "/boot/vmlinux"]))
    try:
        assert TRANSITIONS[VmState.SHUTDOWN] == ()
        m.transition(VmState.RUNNING)
        m.transition(VmState.PAUSED)
        m.transition(VmState.PAUSED)                 # staying is no move
        m.transition(VmState.RUNNING)
        m.transition(VmState.SHUTDOWN)
        for to in (VmState.RUNNING, VmState.PAUSED, VmState.CREATED):
            with pytest.raises(LifecycleError, match="shutdown: it cannot become"):
                m.transition(to)
        m.state = VmState.RUNNING
        with pytest.raises(LifecycleError, match="cannot become created"):
            m.transition(VmState.CREATED)
        with pytest.raises(LifecycleError, match="expected paused"):
            m.snapshot_state()                       # vCPUs must be parked
    finally:
        m.teardown()


def test_create_machine_by_machine_type():
    from stratopy.errors import ConfigError
    from stratopy.machine.microvm import MicroVm
    from stratopy.machine.q35 import Q35Vm
    config = parse_args(["-kernel", "/boot/vmlinux"])
    q = config.replace(machine_type="q35")
    assert type(builder.create_machine(config)) is MicroVm
    assert type(builder.create_machine(q)) is Q35Vm
    with pytest.raises(ConfigError, match="q35 needs its own machine class"):
        MicroVm(q)
    with pytest.raises(ConfigError, match="virt is not supported"):
        builder.create_machine(config.replace(machine_type="virt"))


# --- the device manager ----------------------------------------------------------------

class FakeVm:
    def __init__(self):
        self.ioeventfds: list[tuple[int, int]] = []
        self.pulses: list[int] = []

    def register_ioeventfd(self, fd, addr, length, datamatch=None):
        self.ioeventfds.append((addr, datamatch))

    def irq_pulse(self, gsi):
        return lambda: self.pulses.append(gsi)


class DevMachine:
    """What the device manager and the device factory use of a machine."""

    def __init__(self, config, mem):
        self.config, self.mem = config, mem
        self.vm = FakeVm()
        self.loop = EventLoop()
        self.devices = DeviceManager(self)
        self.events: list = []

    def irq_line(self, gsi):
        return self.vm.irq_pulse(gsi)

    @property
    def chardevs(self):
        return self.devices.chardevs

    def event_sink(self, name, data):
        self.events.append((name, data))

    def close(self):
        self.devices.close()
        self.loop.close()


def _disk(tmp_path) -> str:
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.write(bytes(64 * 512))
    return path


def _dev_config(tmp_path):
    return parse_args(["-kernel", "/boot/vmlinux",
                       "-drive", f"id=root,file={_disk(tmp_path)},direct=off",
                       "-device", "virtio-blk-device,drive=root,id=root",
                       "-object", "rng-random,id=rng0,filename=/dev/urandom",
                       "-device", "virtio-rng-device,rng=rng0,id=rng"])


def _built(config, mem) -> DevMachine:
    from stratopy.machine import slots as slotmod

    m = DevMachine(config, mem)
    m.devices.add_legacy_devices(reset=lambda: None)
    m.devices.add_rtc(with_ports=True)
    m.devices.add_virtio_slots(slotmod.plan_slots(config))
    return m


def test_device_manager_wires_every_slot(tmp_path):
    from stratopy.arch.x86_64 import layout

    mem = GuestMemory.anonymous([(0, 1 << 20)])
    m = _built(_dev_config(tmp_path), mem)
    try:
        slots = m.devices.slots
        assert [s.kind for s in slots] == ["blk"] * 4 + ["net"] * 2 + ["other"]
        assert [s.device.label for s in slots] == ["virtio-blk"] * 4 + ["virtio-net"] * 2 \
            + ["virtio-rng"]
        # one ioeventfd per queue on QueueNotify, datamatch = the queue index
        assert (slots[0].base + 0x50, 0) in m.vm.ioeventfds
        assert (slots[4].base + 0x50, 1) in m.vm.ioeventfds
        assert len(m.vm.ioeventfds) == sum(len(s.device.queue_sizes) for s in slots)
        # the transports are on the MMIO bus, the serial and i8042 on port I/O
        assert m.devices.mmio.lookup(slots[6].base)[0] is slots[6].transport
        assert m.devices.pio.lookup(layout.SERIAL_PORT)[0] is m.devices.serial
    finally:
        m.close()


def test_device_manager_state_restores_into_a_new_manager(tmp_path):
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    config = _dev_config(tmp_path)
    m = _built(config, mem)
    m2 = None
    try:
        # the guest drives the block device (the mock driver's rings sit at
        # fixed addresses: one driven device per guest memory)
        drv = Driver(m.devices.slots[0].device)
        drv.mem.close()
        drv.mem, drv.t = mem, m.devices.slots[0].transport
        drv.init()
        drv.queues[0].add([(0x30000, 16, False), (0x30010, 1, True)])
        drv.queues[0].kick()
        m.devices.serial.write(7, b"\x5a")             # scratch register
        saved = m.devices.state()
        assert [v.device_type for v in saved.virtio][-1] == "virtio-rng"
        assert saved.virtio[0].transport.queues[0].next_used == 1
        assert saved.serial.scratch == 0x5a
        decoded = from_plain(DevicesState, json.loads(json.dumps(to_plain(saved))),
                             "devices")

        m2 = _built(config, mem)
        m2.devices.restore(decoded)
        again = m2.devices.state()
        assert to_plain(again) == to_plain(saved)
        assert m2.devices.slots[0].device.activated
        assert not m2.devices.slots[6].device.activated     # never driven: not activated
    finally:
        m.close()
        if m2 is not None:
            m2.close()


def test_device_manager_restore_refuses_other_devices(tmp_path):
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    config = _dev_config(tmp_path)
    m = _built(config, mem)
    try:
        saved = m.devices.state()
        # a device of another type in a slot
        saved.virtio[6].device_type = "virtio-blk"
        with pytest.raises(TemplateError, match="devices.virtio\\[6\\].device_type differs"):
            m.devices.restore(saved)
        # another slot plan: the command line lost a device
        saved = m.devices.state()
        saved.virtio = saved.virtio[:-1]
        with pytest.raises(TemplateError, match="6 virtio-mmio slots, the command line "
                                                "makes 7"):
            m.devices.restore(saved)
        saved = m.devices.state()
        saved.virtio[6].driver = "virtio-blk-device"
        with pytest.raises(TemplateError, match="virtio-mmio slot 6 differs"):
            m.devices.restore(saved)
        saved = m.devices.state()
        saved.virtio[0].transport_type = "virtio-pci"
        with pytest.raises(TemplateError, match="virtio-pci"):
            m.devices.restore(saved)
        saved = m.devices.state()
        saved.ged = GedState(pending=0)              # this machine has no ACPI device
        with pytest.raises(TemplateError, match="ACPI device"):
            m.devices.restore(saved)
    finally:
        m.close()


def test_hot_replace_through_the_manager(tmp_path):
    from stratopy.machine import devices as devfactory

    mem = GuestMemory.anonymous([(0, 1 << 20)])
    config = _dev_config(tmp_path)
    m = _built(config, mem)
    try:
        slot = m.devices.slots[1]
        assert slot.config is None and slot.device.capacity == 0
        extra = parse_args(["-kernel", "/boot/vmlinux",
                            "-drive", f"id=hot,file={_disk(tmp_path)},direct=off",
                            "-device", "virtio-blk-device,drive=hot,id=hot"]).device("hot")
        backend = devfactory.open_drive(extra.drive)
        m.devices.hot_bind(slot, extra, backend)
        assert slot.hot and slot.backend is backend and slot.device.capacity == 64
        assert m.devices.state().virtio[1].id == "hot"
        m.devices.hot_unbind(slot)
        assert slot.config is None and slot.backend is None and slot.device.capacity == 0
        assert m.devices.state().virtio[1].id == ""
    finally:
        m.close()


def test_migration_never_reaches_into_a_machine():
    """migration/ turns a directory into a MachineState and back: it calls
    no private machine code (the builder and Machine do the building)."""
    import re

    mig = os.path.join(REPO, "stratopy", "migration")
    for name in sorted(os.listdir(mig)):
        if name.endswith(".py"):
            with open(os.path.join(mig, name)) as f:
                text = f.read()
            assert not re.search(r"machine\._\w", text), name
            assert "machine.microvm" not in text, name
