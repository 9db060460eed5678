"""The microvm's ACPI wiring without KVM: the GED pin no virtio slot can
take, the cold-boot blobs (tables describing every slot, the GED on its pin,
a fresh GUID), the command line (virtio_mmio.device= only for acpi=off),
the warm start's new generation ID and system_powerdown's choice (fakes
stand in for guest memory and the in-kernel IOAPIC; tests/kvm/test_acpi.py
does the same on KVM)."""

from __future__ import annotations

import pytest

from stratopy.acpi import aml_resources as res
from stratopy.acpi import ged
from stratopy.arch.x86_64 import acpi as x86_acpi
from stratopy.arch.x86_64 import layout
from stratopy.cli_parse import parse_args
from stratopy.errors import ConfigError, TemplateError
from stratopy.kvm import uapi
from stratopy.machine import slots as slotmod
from stratopy.machine.microvm import MicroVm, VmState
from stratopy.migration.codec import from_plain
from tests.unit.test_hotreplace import _argv


def test_virtio_slots_never_take_the_ged_pin(tmp_path):
    # root + 3 extra blk fill the reserved blk slots; the next 11 blk and
    # vser0 take IRQ 11-22; one more device would need the GED's pin 23
    slots = slotmod.plan_slots(_argv(tmp_path, *[f"b{i}" for i in range(14)]))
    assert max(s.irq for s in slots) == layout.VIRTIO_IRQ_MAX == 22
    with pytest.raises(ConfigError, match="no IRQ left for"):
        slotmod.plan_slots(_argv(tmp_path, *[f"b{i}" for i in range(15)]))
    assert layout.GED_IRQ == layout.IRQ_MAX


def test_boot_blobs_describe_every_slot_and_the_ged(tmp_path):
    slots = slotmod.plan_slots(_argv(tmp_path))
    blobs = x86_acpi.boot_blobs(2, slots)
    spans = sorted((gpa, gpa + len(data)) for gpa, data in blobs)
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0, "blobs overlap"
    # everything in the e820-reserved BIOS area, the GUID alone on its page
    assert spans[0][0] == layout.ACPI_RSDP_ADDR and spans[-1] == (0xFF000, 0xFF010)
    assert all(layout.BIOS_ROM_START <= a0 and a1 <= layout.BIOS_ROM_END for a0, a1 in spans)
    dsdt = next(data for _, data in blobs if data[:4] == b"DSDT")
    assert dsdt.count(b"LNRO0005") == len(slots) == 7
    for s in slots:
        assert res.memory32_fixed(s.base, layout.VIRTIO_MMIO_SIZE) in dsdt
    assert res.interrupt(layout.GED_IRQ, edge=True) in dsdt
    guids = {data for gpa, data in blobs + x86_acpi.boot_blobs(2, slots)
             if gpa == layout.VMGENID_GUID_ADDR}
    assert len(guids) == 2 and all(len(g) == ged.GUID_SIZE for g in guids)


def _machine(tmp_path, append: str) -> MicroVm:
    config = parse_args(["-kernel", "/boot/vmlinux", "-append", append])
    vm = MicroVm(config)
    vm.devices.slots = slotmod.plan_slots(config)
    return vm


@pytest.mark.parametrize("append, listed", [("console=ttyS0 pci=off", False),
                                            ("console=ttyS0 acpi=off", True),
                                            ("console=ttyS0 acpi=offx", False)])
def test_virtio_on_the_command_line_only_with_acpi_off(tmp_path, append, listed):
    vm = _machine(tmp_path, append)
    try:
        line = vm.kernel_cmdline()
    finally:
        vm.loop.close()
    assert line.startswith(append)
    assert ("virtio_mmio.device=512@0xf0100000:5" in line) is listed
    assert line.count("virtio_mmio.device=") == (6 if listed else 0)


class FakeMemory:
    def __init__(self):
        self.ram = bytearray(1 << 20)

    def write(self, gpa, data):
        self.ram[gpa:gpa + len(data)] = data

    def read(self, gpa, size):
        return bytes(self.ram[gpa:gpa + size])


class FakeVm:
    """The two KVM VM calls the GED wiring makes: an edge on a pin, the IOAPIC state."""

    def __init__(self, ged_pin_masked: bool):
        self.pulses: list[int] = []
        chip = uapi.kvm_irqchip(chip_id=uapi.KVM_IRQCHIP_IOAPIC)
        for pin in range(uapi.KVM_IOAPIC_NUM_PINS):
            chip.chip.ioapic.redirtbl[pin].fields.mask = 1
        chip.chip.ioapic.redirtbl[layout.GED_IRQ].fields.mask = int(ged_pin_masked)
        self.ioapic = bytes(chip)

    def irq_pulse(self, gsi):
        return lambda: self.pulses.append(gsi)

    def get_irqchip(self, chip_id):
        assert chip_id == uapi.KVM_IRQCHIP_IOAPIC
        return self.ioapic


def _wired(tmp_path, ged_pin_masked: bool) -> MicroVm:
    vm = _machine(tmp_path, "console=ttyS0")
    vm.mem, vm.vm = FakeMemory(), FakeVm(ged_pin_masked)
    vm._setup_ged()        # what MicroVm.create_devices does first
    vm.state = VmState.RUNNING
    return vm


def test_renew_generation_id_writes_a_new_guid_then_raises_the_event(tmp_path):
    vm = _wired(tmp_path, ged_pin_masked=False)
    try:
        before = vm.generation_id()
        new = vm.renew_generation_id()
        assert new == vm.generation_id() != before
        assert vm.mem.read(layout.VMGENID_GUID_ADDR, 16) != bytes(16)
        assert vm.vm.pulses == [layout.GED_IRQ]
        # the guest's _EVT reads the selector: the VMGenID bit, then nothing
        assert vm.mmio.read(layout.GED_MMIO_ADDR, 4) == ged.EVENT_VMGENID.to_bytes(4, "little")
        assert vm.mmio.read(layout.GED_MMIO_ADDR, 4) == bytes(4)
        assert vm.renew_generation_id() != new
    finally:
        vm.loop.close()


def test_powerdown_presses_the_button_only_when_the_guest_listens(tmp_path):
    vm = _wired(tmp_path, ged_pin_masked=False)
    try:
        vm.request_powerdown()
        assert vm.vm.pulses == [layout.GED_IRQ] and vm.shutdown_reason is None
        assert vm.ged.pending == ged.EVENT_POWER_BUTTON
        # the guest powers off through the sleep control register: exit 0
        vm.mmio.write(layout.GED_MMIO_ADDR + ged.SLEEP_CONTROL_OFFSET,
                      bytes([ged.SLP_TYP_S5 << ged.SLEEP_TYPE_SHIFT | ged.SLEEP_ENABLE]))
        assert (vm.shutdown_reason, vm.exit_code) == ("guest-shutdown", 0)
    finally:
        vm.loop.close()
    vm = _wired(tmp_path, ged_pin_masked=True)
    try:
        vm.request_powerdown()
        assert vm.vm.pulses == [] and vm.ged.pending == 0
        assert (vm.shutdown_reason, vm.exit_code) == ("host-qmp-system-powerdown", 0)
    finally:
        vm.loop.close()


def test_ged_state_from_a_template_is_decoded_strictly():
    dev = ged.GedDevice(irq=lambda: None)
    dev.restore(from_plain(ged.GedState, {"pending": ged.EVENT_VMGENID}, "ged"))
    assert dev.pending == ged.EVENT_VMGENID
    with pytest.raises(TemplateError, match="ged"):
        from_plain(ged.GedState, {"pending": "1"}, "ged")
    with pytest.raises(TemplateError, match="ged"):
        from_plain(ged.GedState, {}, "ged")
    with pytest.raises(TemplateError, match="pending"):
        dev.restore(from_plain(ged.GedState, {"pending": 1 << 7}, "ged"))
