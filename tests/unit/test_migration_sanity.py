"""What a (re-hashed, well-shaped) state means: forged values are refused
with the field path; what a real KVM hands out is accepted. Also strict
types in the facts, and CPUID in the template (synthetic tables)."""

from __future__ import annotations

import struct

import pytest

from stratopy.arch.x86_64 import cpu, layout
from stratopy.errors import TemplateError
from stratopy.kvm import uapi
from stratopy.machine.vcpu_state import VcpuState, VmArchState
from stratopy.migration import facts, sanity
from stratopy.devices.virtio.mmio import MmioState
from stratopy.devices.virtio.queue import QueueState

RAM = layout.ram_layout(64 << 20)
FF = b"\xff"


def vcpu(index=0, *, regs=None, sregs=None, lapic=None) -> VcpuState:
    """A vCPU as stratopy boots it: long mode, flat segments, KVM's LAPIC."""
    if sregs is None:
        s = uapi.kvm_sregs()
        cpu.boot_sregs(s)
        s.apic_base = 0xFEE00000 | (1 << 11) | ((index == 0) << 8)
        sregs = bytes(s)
    if regs is None:
        regs = bytes(cpu.boot_regs(0x100000))
    if lapic is None:
        raw = bytearray(uapi.KVM_APIC_REG_SIZE)
        struct.pack_into("<I", raw, 0x20, index << 24)
        struct.pack_into("<I", raw, 0x30, 0x50014)
        lapic = bytes(raw)
    return VcpuState(index=index, mp_state=bytes(4), regs=regs, sregs=sregs, xsave=b"",
                     fpu=b"", xcrs=b"", debugregs=b"", lapic=lapic,
                     msr_indices=[0x10, 0x174], msr_values=[0, 0])


def with_sregs(**fields) -> bytes:
    s = uapi.kvm_sregs.from_buffer_copy(vcpu().sregs)
    for k, v in fields.items():
        setattr(s, k, v)
    return bytes(s)


def with_regs(**fields) -> bytes:
    r = uapi.kvm_regs.from_buffer_copy(vcpu().regs)
    for k, v in fields.items():
        setattr(r, k, v)
    return bytes(r)


def vm(**over) -> VmArchState:
    chips = []
    for cid in (0, 1, 2):
        c = uapi.kvm_irqchip()
        c.chip_id = cid
        if cid == 2:
            c.chip.ioapic.base_address = sanity.IOAPIC_BASE
            for pin in range(uapi.KVM_IOAPIC_NUM_PINS):
                c.chip.ioapic.redirtbl[pin].bits = 1 << 16       # masked
        chips.append(bytes(c))
    pit = uapi.kvm_pit_state2()
    for i, ch in enumerate(pit.channels):
        ch.mode = 0xFF if i else 2
        ch.count = 0x10000
        ch.rw_mode = 3
        ch.gate = int(i != 2)
    clock = uapi.kvm_clock_data()
    clock.clock = 123456789
    clock.flags = uapi.KVM_CLOCK_TSC_STABLE | uapi.KVM_CLOCK_REALTIME
    kw = dict(pic_master=chips[0], pic_slave=chips[1], ioapic=chips[2], pit=bytes(pit),
              clock=bytes(clock))
    kw.update(over)
    return VmArchState(**kw)


def test_a_boot_like_state_is_accepted():
    for i in range(3):
        sanity.check_vcpu(vcpu(i), RAM)
    sanity.check_vm(vm())
    sanity.check_msr_indices(vcpu(), {0x10, 0x174, 0x175})


@pytest.mark.parametrize("st, field", [
    (lambda: vcpu(sregs=with_sregs(efer=(1 << 64) - 1)), r"vcpus\[0\]\.sregs\.efer"),
    (lambda: vcpu(sregs=with_sregs(efer=sanity.EFER_LME)), r"sregs\.efer: LMA"),
    (lambda: vcpu(sregs=with_sregs(cr0=(1 << 64) - 1)), r"sregs\.cr0"),
    (lambda: vcpu(sregs=with_sregs(cr4=1 << 40)), r"sregs\.cr4"),
    (lambda: vcpu(sregs=with_sregs(apic_base=(1 << 64) - 1)), r"sregs\.apic_base"),
    (lambda: vcpu(regs=with_regs(rip=0xDEAD_BEEF_0000_0000)), r"regs\.rip: .*canonical"),
    (lambda: vcpu(regs=with_regs(rflags=(1 << 64) - 1)), r"regs\.rflags"),
    (lambda: vcpu(lapic=FF * 1024), r"vcpus\[0\]\.lapic: APIC ID"),
    (lambda: vcpu(1, lapic=vcpu(0).lapic), r"vcpus\[1\]\.lapic: APIC ID"),
])
def test_forged_vcpu_values_are_refused(st, field):
    with pytest.raises(TemplateError, match=field):
        sanity.check_vcpu(st(), RAM)


def test_lapic_version_must_be_kvms():
    raw = bytearray(vcpu().lapic)
    struct.pack_into("<I", raw, 0x30, 0xFFFFFFFF)
    with pytest.raises(TemplateError, match="APIC version"):
        sanity.check_vcpu(vcpu(lapic=bytes(raw)), RAM)


def test_rip_outside_ram_with_paging_off():
    real = with_sregs(cr0=1, efer=0)            # protected mode, no paging
    sanity.check_vcpu(vcpu(sregs=real, regs=with_regs(rip=0x100000)), RAM)
    with pytest.raises(TemplateError, match=r"regs\.rip: .*outside guest RAM"):
        sanity.check_vcpu(vcpu(sregs=real, regs=with_regs(rip=0xF000_0000)), RAM)


def test_msr_not_in_the_hosts_list_is_refused():
    st = vcpu()
    st.msr_indices = [0x10, 0xDEADBEEF]
    with pytest.raises(TemplateError, match=r"vcpus\[0\]\.msr_indices: MSR 0xdeadbeef"):
        sanity.check_msr_indices(st, {0x10, 0x174})


@pytest.mark.parametrize("index, value, what", [
    (0x277, (1 << 64) - 1, "IA32_PAT"), (0x277, 0x0007040600070402, "IA32_PAT"),
    (0xC0000082, 0x8000_0000_0000_0000, "canonical"), (0x176, 1 << 50, "canonical")])
def test_msr_values_that_mean_nothing_are_refused(index, value, what):
    st = vcpu()
    st.msr_indices, st.msr_values = [0x10, index], [0, value]
    with pytest.raises(TemplateError, match=rf"vcpus\[0\]\.msr_values: MSR {index:#x}.*{what}"):
        sanity.check_msr_indices(st, {0x10, index})
    st.msr_values = [0, 0x0007040600070406 if index == 0x277 else 0xFFFFFFFF81000000]
    sanity.check_msr_indices(st, {0x10, index})


def test_an_msr_kvm_refuses_on_restore_is_an_error(monkeypatch):
    """KVM_SET_MSRS stops at the first MSR it cannot set and returns how
    many it set: that is an error naming the MSR, never skipped. (This
    host's KVM takes every value tried, so its answer is stubbed.)"""
    from stratopy.kvm import ioctl as ioctl_mod
    from stratopy.machine import vcpu_state

    calls = []

    def set_one(fd, request, arg):
        calls.append(request)
        return 1
    monkeypatch.setattr(ioctl_mod, "ioctl", set_one)
    st = vcpu()
    st.msr_indices, st.msr_values = [0x10, 0x174], [5, 6]

    class FakeVcpu:
        fd = -1
    with pytest.raises(TemplateError, match=r"vcpus\[0\]\.msr_values: KVM refused MSR "
                                            r"0x174 = 0x6"):
        vcpu_state.set_msrs_strict(FakeVcpu(), st)
    assert calls == [uapi.KVM_SET_MSRS]


@pytest.mark.parametrize("name", ["ioapic", "pit", "clock"])
def test_all_ones_vm_blobs_are_refused(name):
    import ctypes
    blob = FF * ctypes.sizeof(uapi.kvm_irqchip if name == "ioapic" else
                              uapi.kvm_pit_state2 if name == "pit" else uapi.kvm_clock_data)
    if name == "ioapic":        # keep the chip id valid: shape checks pass
        blob = struct.pack("<II", 2, 0) + blob[8:]
    with pytest.raises(TemplateError, match=rf"vm\.{name}"):
        sanity.check_vm(vm(**{name: blob}))


def test_ioapic_fields():
    c = uapi.kvm_irqchip.from_buffer_copy(vm().ioapic)
    c.chip.ioapic.redirtbl[3].bits = (1 << 16) | (3 << 8)            # reserved mode
    with pytest.raises(TemplateError, match=r"vm\.ioapic\.redirtbl\[3\]"):
        sanity.check_vm(vm(ioapic=bytes(c)))
    c = uapi.kvm_irqchip.from_buffer_copy(vm().ioapic)
    c.chip.ioapic.id = 0x20
    with pytest.raises(TemplateError, match=r"vm\.ioapic\.id"):
        sanity.check_vm(vm(ioapic=bytes(c)))


def test_pit_channel_mode_and_count():
    p = uapi.kvm_pit_state2.from_buffer_copy(vm().pit)
    p.channels[0].mode = 7
    with pytest.raises(TemplateError, match=r"vm\.pit\.channels\[0\]\.mode"):
        sanity.check_vm(vm(pit=bytes(p)))
    p = uapi.kvm_pit_state2.from_buffer_copy(vm().pit)
    p.channels[1].count = 0x10001
    with pytest.raises(TemplateError, match=r"vm\.pit\.channels\[1\]\.count"):
        sanity.check_vm(vm(pit=bytes(p)))


@pytest.mark.parametrize("size, ok", [(0, True), (256, True), (3, False), (512, False)])
def test_queue_size_power_of_two_within_max(size, ok):
    st = MmioState(queues=[QueueState(max_size=256, size=size)])
    if ok:
        sanity.check_queues(st, "slots[0].transport")
    else:
        with pytest.raises(TemplateError, match=r"slots\[0\]\.transport\.queues\[0\]\.size"):
            sanity.check_queues(st, "slots[0].transport")


@pytest.mark.parametrize("forged", [1.0, True])
def test_cpus_must_be_an_integer_in_the_facts(forged):
    current = {"machine": "microvm", "cpus": 1, "mem_size": 64 << 20, "devices": []}
    facts.compare(dict(current), current)
    with pytest.raises(TemplateError, match=r"vCPU count .*template has " + repr(forged)):
        facts.compare(dict(current, cpus=forged), current)


# --- CPUID -----------------------------------------------------------------------
def table(*entries):
    c = uapi.kvm_cpuid2_n(len(entries))()
    c.nent = len(entries)
    for i, (fn, idx, eax, ebx, ecx, edx) in enumerate(entries):
        e = c.entries[i]
        e.function, e.index, e.eax, e.ebx, e.ecx, e.edx = fn, idx, eax, ebx, ecx, edx
    return c


HOST = table((0, 0, 0xD, 0, 0, 0), (1, 0, 0, 0, 0x1 | (1 << 28), 0x1),
             (7, 0, 0, 0x20, 0, 0), (0xD, 0, 0x7, 0, 0, 0))


def test_cpuid_round_trip_and_strict_decoding():
    plain = cpu.cpuid_to_plain(HOST)
    back = cpu.cpuid_from_plain(plain, "meta.cpuid[0]")
    assert cpu.cpuid_to_plain(back) == plain
    for bad, what in (([[1, 0, 0, 0, 0, 0]], r"meta\.cpuid\[0\]\[0\]"),
                      ([[1, 0, 0, 0, 0, 0, True]], r"\[0\]"),
                      ([[1, 0, 0, 0, 0, 0, 1 << 32]], r"\[0\]"),
                      ([plain[0], plain[0]], "given twice"), ([], "list")):
        with pytest.raises(TemplateError, match=what):
            cpu.cpuid_from_plain(bad, "meta.cpuid[0]")


def test_same_features_and_our_own_bits_are_accepted():
    saved = cpu.cpuid_from_plain(cpu.cpuid_to_plain(HOST), "c")
    cpu.filter_cpuid(saved.entries[:saved.nent], 1, 2)     # hypervisor + HTT bits
    assert cpu.missing_features(saved, HOST) == []


def test_a_missing_feature_is_named():
    saved = table((1, 0, 0, 0, 0x1, 0x1), (7, 0, 0, 0x20 | (1 << 29), 0, 0))
    assert cpu.missing_features(saved, HOST) == ["sha_ni (CPUID leaf 0x7.0 ebx bit 29)"]
    with pytest.raises(TemplateError, match=r"lacks a CPU feature .*vCPU 0.*sha_ni"):
        cpu.check_cpuid_supported([saved], HOST)
    no_leaf7 = table((0, 0, 0xD, 0, 0, 0), (1, 0, 0, 0, 0x1, 0x1))
    assert cpu.missing_features(table((7, 0, 0, 0x20, 0, 0)), no_leaf7) == [
        "avx2 (CPUID leaf 0x7.0 ebx bit 5)"]
    assert cpu.missing_features(table((0xD, 0, 0x7 | (1 << 9), 0, 0, 0)), HOST) == [
        "pkru state (CPUID leaf 0xd.0 eax bit 9)"]
