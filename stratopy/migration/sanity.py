"""What a template's state *means*, checked before KVM sees it.

The state file's checksum only proves that nobody changed it since it was
hashed; a forger re-hashes. So every value KVM would take (or that our
devices would act on) is checked for meaning here: reserved bits clear,
modes that exist, addresses the guest can reach, MSRs this KVM knows. Each
failure is a TemplateError naming the field path (``vcpus[0].sregs.efer``).
Bounds are those of the architecture (Intel SDM / AMD APM, the 8254 and
82093AA data sheets) and of KVM's own state layouts.
"""

from __future__ import annotations

from stratopy.errors import TemplateError
from stratopy.kvm import uapi

# EFER: SCE, LME, LMA, NXE, SVME, LMSLE, FFXSR, TCE, AUTOIBRS
EFER_KNOWN = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 13) \
    | (1 << 14) | (1 << 15) | (1 << 21)
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
# CR0: PE MP EM TS ET NE WP AM NW CD PG
CR0_KNOWN = 0x3F | (1 << 16) | (1 << 18) | (1 << 29) | (1 << 30) | (1 << 31)
CR0_PE, CR0_PG = 1, 1 << 31
CR4_KNOWN = (1 << 26) - 1 - (1 << 15) | (1 << 28)     # bits 0-25 but 15, LAM_SUP
# RFLAGS: bit 1 is always 1; bits 3, 5, 15 and 22-63 are reserved (0)
RFLAGS_RESERVED = (1 << 3) | (1 << 5) | (1 << 15) | ~((1 << 22) - 1)
# IA32_APIC_BASE: bits 0-7 and 9 reserved
APIC_BASE_RESERVED = 0xFF | (1 << 9)
APIC_ID, APIC_LVR = 0x20, 0x30
IOAPIC_BASE = 0xFEC00000
PIT_FLAGS_KNOWN = uapi.KVM_PIT_FLAGS_HPET_LEGACY | uapi.KVM_PIT_FLAGS_SPEAKER_DATA_ON
CLOCK_FLAGS_KNOWN = uapi.KVM_CLOCK_TSC_STABLE | uapi.KVM_CLOCK_REALTIME | uapi.KVM_CLOCK_HOST_TSC


def _bad(path: str, msg: str) -> TemplateError:
    return TemplateError(f"state file field {path}: {msg}")


def _canonical(addr: int) -> bool:
    top = addr >> 47
    return top == 0 or top == (1 << 17) - 1


def check_vcpu(st, ram: list[tuple[int, int]]) -> None:
    """Registers, control registers, LAPIC of one (shape-validated) VcpuState."""
    n = f"vcpus[{st.index}]"
    regs = uapi.kvm_regs.from_buffer_copy(st.regs)
    sregs = uapi.kvm_sregs.from_buffer_copy(st.sregs)
    if sregs.efer & ~EFER_KNOWN:
        raise _bad(f"{n}.sregs.efer", f"{sregs.efer:#x} sets reserved bits "
                                      f"{sregs.efer & ~EFER_KNOWN:#x}")
    if sregs.cr0 & ~CR0_KNOWN:
        raise _bad(f"{n}.sregs.cr0", f"{sregs.cr0:#x} sets reserved bits")
    if sregs.cr4 & ~CR4_KNOWN:
        raise _bad(f"{n}.sregs.cr4", f"{sregs.cr4:#x} sets reserved bits")
    paging, long_mode = bool(sregs.cr0 & CR0_PG), bool(sregs.efer & EFER_LMA)
    if paging and not sregs.cr0 & CR0_PE:
        raise _bad(f"{n}.sregs.cr0", "paging without protected mode")
    if long_mode != bool(paging and sregs.efer & EFER_LME):
        raise _bad(f"{n}.sregs.efer", f"LMA={int(long_mode)} does not follow LME and "
                                      f"CR0.PG")
    if sregs.apic_base & APIC_BASE_RESERVED:
        raise _bad(f"{n}.sregs.apic_base", f"{sregs.apic_base:#x} sets reserved bits")
    if regs.rflags & RFLAGS_RESERVED or not regs.rflags & 2:
        raise _bad(f"{n}.regs.rflags", f"{regs.rflags:#x} is not a valid RFLAGS")
    rip = regs.rip
    if long_mode:
        if not _canonical(rip):
            raise _bad(f"{n}.regs.rip", f"{rip:#x} is not a canonical address")
    elif not paging:
        # no translation: the next instruction is at cs.base + rip in RAM
        linear = (sregs.cs.base + rip) & 0xFFFFFFFF
        if not any(gpa <= linear < gpa + size for gpa, size in ram):
            raise _bad(f"{n}.regs.rip", f"{rip:#x} (linear {linear:#x}) is outside "
                                        f"guest RAM and paging is off")
    elif rip >> 32:
        raise _bad(f"{n}.regs.rip", f"{rip:#x} does not fit 32-bit mode")
    _check_lapic(st, n)


def _check_lapic(st, n: str) -> None:
    regs = bytes(st.lapic)
    x2apic = bool(uapi.kvm_sregs.from_buffer_copy(st.sregs).apic_base & (1 << 10))
    apic_id = int.from_bytes(regs[APIC_ID:APIC_ID + 4], "little")
    # KVM reports the ID in xAPIC form (id << 24) unless userspace enabled the
    # x2APIC API; an x2APIC-form ID is accepted in x2APIC mode
    xapic_form = apic_id >> 24 == st.index and not apic_id & 0xFFFFFF
    if not (xapic_form or (x2apic and apic_id == st.index)):
        raise _bad(f"{n}.lapic", f"APIC ID register {apic_id:#x} does not name vCPU "
                                 f"{st.index}")
    ver = int.from_bytes(regs[APIC_LVR:APIC_LVR + 4], "little")
    # KVM's integrated APIC: version 0x14, max LVT entry 5 or 6, bit 24 = EOI
    # broadcast suppression; nothing else.
    if ver & 0xFF != 0x14 or (ver >> 16) & 0xFF not in (5, 6) or ver & 0xFE00FF00:
        raise _bad(f"{n}.lapic", f"APIC version register {ver:#x} is not KVM's")


MSR_IA32_PAT = 0x277
PAT_TYPES = {0, 1, 4, 5, 6, 7}          # UC WC WT WP WB UC-; 2 and 3 are reserved
# MSRs holding linear addresses: SYSENTER_ESP/EIP, LSTAR, CSTAR, KERNEL_GS_BASE
CANONICAL_MSRS = (0x175, 0x176, 0xC0000082, 0xC0000083, 0xC0000102)


def check_msr_indices(st, host_msrs: set[int]) -> None:
    """Every MSR is one this KVM knows, and the values whose meaning is
    architectural are valid (some KVMs, PVM among them, take an invalid
    PAT without complaint)."""
    for i, v in zip(st.msr_indices, st.msr_values):
        if i not in host_msrs:
            raise _bad(f"vcpus[{st.index}].msr_indices", f"MSR {i:#x} is not one this "
                                                         f"host's KVM saves or restores")
        if i == MSR_IA32_PAT and any((v >> (8 * b)) & 0xFF not in PAT_TYPES
                                    for b in range(8)):
            raise _bad(f"vcpus[{st.index}].msr_values", f"MSR {i:#x} (IA32_PAT) = {v:#x} "
                                                        f"holds a reserved memory type")
        if i in CANONICAL_MSRS and not _canonical(v):
            raise _bad(f"vcpus[{st.index}].msr_values", f"MSR {i:#x} = {v:#x} is not a "
                                                        f"canonical address")


def check_vm(vm) -> None:
    """IOAPIC, PIT and kvmclock of a shape-validated VmArchState."""
    chip = uapi.kvm_irqchip.from_buffer_copy(vm.ioapic).chip.ioapic
    if chip.base_address != IOAPIC_BASE:
        raise _bad("vm.ioapic.base_address", f"{chip.base_address:#x}, not {IOAPIC_BASE:#x}")
    if chip.id > 0xF:
        raise _bad("vm.ioapic.id", f"{chip.id:#x} is not a 4-bit IOAPIC id")
    if chip.ioregsel > 0xFF:
        raise _bad("vm.ioapic.ioregsel", f"{chip.ioregsel:#x}")
    for pin in range(uapi.KVM_IOAPIC_NUM_PINS):
        bits = chip.redirtbl[pin].bits
        mode = (bits >> 8) & 7
        # bits 17-55 reserved; delivery modes 3 and 6 reserved
        if bits & (((1 << 56) - 1) & ~((1 << 17) - 1)) or mode in (3, 6):
            raise _bad(f"vm.ioapic.redirtbl[{pin}]", f"{bits:#018x} is not a valid "
                                                    f"redirection entry")
    pit = uapi.kvm_pit_state2.from_buffer_copy(vm.pit)
    if pit.flags & ~PIT_FLAGS_KNOWN:
        raise _bad("vm.pit.flags", f"{pit.flags:#x} has unknown bits")
    for i, c in enumerate(pit.channels):
        p = f"vm.pit.channels[{i}]"
        # KVM resets a channel's mode to 0xff until the guest programs it
        if c.mode > 5 and c.mode != 0xFF:
            raise _bad(f"{p}.mode", f"{c.mode} is not an 8254 mode")
        if c.count > 0x10000:
            raise _bad(f"{p}.count", f"{c.count:#x} exceeds the 16-bit counter")
        if c.rw_mode > 3 or c.read_state > 4 or c.write_state > 4 or c.bcd > 1 \
                or c.gate > 1 or c.count_latched > 4 or c.status_latched > 1:
            raise _bad(p, "access mode, latch or gate state out of range")
    clock = uapi.kvm_clock_data.from_buffer_copy(vm.clock)
    if clock.flags & ~CLOCK_FLAGS_KNOWN:
        raise _bad("vm.clock.flags", f"{clock.flags:#x} has unknown bits")
    if clock.clock >> 63:
        raise _bad("vm.clock.clock", f"{clock.clock:#x} is negative")


def check_queues(mmio_state, path: str) -> None:
    """Split virtqueue sizes are powers of two (virtio 1.x, 2.6) within the
    queue's maximum (which the transport compares with the device's)."""
    for i, q in enumerate(getattr(mmio_state, "queues", []) or []):
        size = getattr(q, "size", 0)
        if type(size) is not int or size < 0:
            raise _bad(f"{path}.queues[{i}].size", f"{size!r}")
        if size & (size - 1):
            raise _bad(f"{path}.queues[{i}].size", f"{size} is not a power of two")
        if type(q.max_size) is int and size > q.max_size:
            raise _bad(f"{path}.queues[{i}].size", f"{size} exceeds the maximum "
                                                   f"{q.max_size}")
