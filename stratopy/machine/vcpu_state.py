"""Saving and restoring vCPU and VM (irqchip, PIT, clock) state.

Plain-data dataclasses hold the raw KVM structs as bytes: what KVM gave is
what a restore gives back. ``from_state`` validates every size, because a
template is untrusted input. The ORDER of the ioctls matters and is written
beside the code that obeys it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from stratopy.errors import TemplateError
from stratopy.kvm import uapi

MAX_MSRS = 4096


def _check_size(name: str, raw: bytes, struct_type) -> None:
    want = ctypes.sizeof(struct_type)
    if len(raw) != want:
        raise TemplateError(f"{name} has {len(raw)} bytes, expected {want}")


@dataclass
class VcpuState:
    index: int
    mp_state: bytes
    regs: bytes
    sregs: bytes
    xsave: bytes          # empty when the host has no KVM_CAP_XSAVE (then fpu is set)
    fpu: bytes
    xcrs: bytes           # empty without KVM_CAP_XCRS
    debugregs: bytes
    lapic: bytes
    msr_indices: list[int] = field(default_factory=list)
    msr_values: list[int] = field(default_factory=list)
    vcpu_events: bytes = b""
    # the CPUID the vCPU was given, as cpu.cpuid_to_plain writes it (a
    # restore gives the same one, before any other state: KVM checks MSRs
    # and XSAVE against it)
    cpuid: list[list[int]] = field(default_factory=list)

    def validate(self, num_cpus: int) -> None:
        if not 0 <= self.index < num_cpus:
            raise TemplateError(f"vCPU index {self.index} out of range")
        n = f"vcpus[{self.index}]"
        _check_size(f"{n}.mp_state", self.mp_state, uapi.kvm_mp_state)
        _check_size(f"{n}.regs", self.regs, uapi.kvm_regs)
        _check_size(f"{n}.sregs", self.sregs, uapi.kvm_sregs)
        if self.xsave:
            _check_size(f"{n}.xsave", self.xsave, uapi.kvm_xsave)
        else:
            _check_size(f"{n}.fpu", self.fpu, uapi.kvm_fpu)
        if self.xcrs:
            _check_size(f"{n}.xcrs", self.xcrs, uapi.kvm_xcrs)
        _check_size(f"{n}.debugregs", self.debugregs, uapi.kvm_debugregs)
        _check_size(f"{n}.lapic", self.lapic, uapi.kvm_lapic_state)
        _check_size(f"{n}.vcpu_events", self.vcpu_events, uapi.kvm_vcpu_events)
        if len(self.msr_indices) != len(self.msr_values) or len(self.msr_indices) > MAX_MSRS:
            raise TemplateError(f"{n}.msrs: {len(self.msr_indices)} indices for "
                                f"{len(self.msr_values)} values")
        for v in self.msr_indices:
            if not 0 <= v < 1 << 32:
                raise TemplateError(f"{n}.msrs: index {v} out of range")
        for v in self.msr_values:
            if not 0 <= v < 1 << 64:
                raise TemplateError(f"{n}.msrs: value out of range")
        mp = uapi.kvm_mp_state.from_buffer_copy(self.mp_state)
        if mp.mp_state > uapi.KVM_MP_STATE_SIPI_RECEIVED:
            raise TemplateError(f"{n}.mp_state: unknown state {mp.mp_state}")


def save_vcpu(vcpu, msr_indices: list[int], has_xsave: bool, has_xcrs: bool,
              cpuid: list | None = None) -> VcpuState:
    """Read a parked vCPU's state (``cpuid``: the plain CPUID it was given).
    Order (Firecracker's, for good reasons):"""
    # 1. MP state first: KVM_GET_MP_STATE flushes pending LAPIC events
    #    (INIT/SIPI) into the state it returns, before anything else is read.
    mp_state = vcpu._get(uapi.KVM_GET_MP_STATE, uapi.kvm_mp_state)
    regs = vcpu._get(uapi.KVM_GET_REGS, uapi.kvm_regs)
    sregs = vcpu._get(uapi.KVM_GET_SREGS, uapi.kvm_sregs)
    xsave = vcpu._get(uapi.KVM_GET_XSAVE, uapi.kvm_xsave) if has_xsave else b""
    fpu = b"" if has_xsave else vcpu._get(uapi.KVM_GET_FPU, uapi.kvm_fpu)
    xcrs = vcpu._get(uapi.KVM_GET_XCRS, uapi.kvm_xcrs) if has_xcrs else b""
    debugregs = vcpu._get(uapi.KVM_GET_DEBUGREGS, uapi.kvm_debugregs)
    lapic = vcpu._get(uapi.KVM_GET_LAPIC, uapi.kvm_lapic_state)
    msrs = vcpu.get_msrs(msr_indices)
    # 2. vCPU events last: pending exceptions/interrupts/NMIs as of now.
    events = vcpu._get(uapi.KVM_GET_VCPU_EVENTS, uapi.kvm_vcpu_events)
    return VcpuState(index=vcpu.index, mp_state=mp_state, regs=regs, sregs=sregs,
                     xsave=xsave, fpu=fpu, xcrs=xcrs, debugregs=debugregs, lapic=lapic,
                     msr_indices=[i for i, _ in msrs], msr_values=[v for _, v in msrs],
                     vcpu_events=events, cpuid=list(cpuid or []))


def restore_vcpu(vcpu, st: VcpuState) -> None:
    """Apply a validated VcpuState. CPUID must already be set (KVM checks MSRs
    and XSAVE features against it)."""
    # MP state before registers: setting it may reset parts of the vCPU.
    vcpu._set(uapi.KVM_SET_MP_STATE, uapi.kvm_mp_state, st.mp_state)
    vcpu._set(uapi.KVM_SET_REGS, uapi.kvm_regs, st.regs)
    # SREGS before LAPIC: SET_SREGS writes apic_base, which resets the LAPIC.
    vcpu._set(uapi.KVM_SET_SREGS, uapi.kvm_sregs, st.sregs)
    if st.xsave:
        vcpu._set(uapi.KVM_SET_XSAVE, uapi.kvm_xsave, st.xsave)
    else:
        vcpu._set(uapi.KVM_SET_FPU, uapi.kvm_fpu, st.fpu)
    if st.xcrs:
        vcpu._set(uapi.KVM_SET_XCRS, uapi.kvm_xcrs, st.xcrs)
    vcpu._set(uapi.KVM_SET_DEBUGREGS, uapi.kvm_debugregs, st.debugregs)
    vcpu._set(uapi.KVM_SET_LAPIC, uapi.kvm_lapic_state, st.lapic)
    # MSRs after LAPIC (TSC deadline timer MSR needs the LAPIC mode restored).
    # Every saved MSR must be taken: one KVM refuses is an error, not skipped.
    set_msrs_strict(vcpu, st)
    # Events last: pending interrupts are injected on top of the LAPIC state.
    vcpu._set(uapi.KVM_SET_VCPU_EVENTS, uapi.kvm_vcpu_events, st.vcpu_events)


def set_msrs_strict(vcpu, st: VcpuState) -> None:
    """KVM_SET_MSRS with all of ``st``'s MSRs; TemplateError naming the first
    one KVM refuses (it stops at the first it cannot set)."""
    from stratopy.kvm.ioctl import ioctl

    n = len(st.msr_indices)
    if not n:
        return
    msrs = uapi.kvm_msrs_n(n)()
    msrs.nmsrs = n
    for i, (idx, val) in enumerate(zip(st.msr_indices, st.msr_values)):
        msrs.entries[i].index = idx
        msrs.entries[i].data = val
    got = ioctl(vcpu.fd, uapi.KVM_SET_MSRS, ctypes.byref(msrs))
    if got < n:
        raise TemplateError(f"state file field vcpus[{st.index}].msr_values: KVM refused "
                            f"MSR {st.msr_indices[got]:#x} = {st.msr_values[got]:#x}")


@dataclass
class VmArchState:
    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock: bytes

    def validate(self) -> None:
        for name in ("pic_master", "pic_slave", "ioapic"):
            raw = getattr(self, name)
            _check_size(f"vm.{name}", raw, uapi.kvm_irqchip)
        for name, want in (("pic_master", uapi.KVM_IRQCHIP_PIC_MASTER),
                           ("pic_slave", uapi.KVM_IRQCHIP_PIC_SLAVE),
                           ("ioapic", uapi.KVM_IRQCHIP_IOAPIC)):
            chip = uapi.kvm_irqchip.from_buffer_copy(getattr(self, name))
            if chip.chip_id != want:
                raise TemplateError(f"vm.{name}: chip id {chip.chip_id}, expected {want}")
        _check_size("vm.pit", self.pit, uapi.kvm_pit_state2)
        _check_size("vm.clock", self.clock, uapi.kvm_clock_data)


def save_vm(vm) -> VmArchState:
    return VmArchState(pic_master=vm.get_irqchip(uapi.KVM_IRQCHIP_PIC_MASTER),
                       pic_slave=vm.get_irqchip(uapi.KVM_IRQCHIP_PIC_SLAVE),
                       ioapic=vm.get_irqchip(uapi.KVM_IRQCHIP_IOAPIC),
                       pit=vm.get_pit2(), clock=vm.get_clock())


def restore_vm(vm, st: VmArchState, clock: str = "realtime") -> None:
    """``clock``: ``realtime`` advances kvmclock by the time since the
    template was taken, ``saved`` restores it as saved (IncomingConfig)."""
    # irqchip and PIT exist already (created before the vCPUs); set their state.
    vm.set_irqchip(st.pic_master)
    vm.set_irqchip(st.pic_slave)
    vm.set_irqchip(st.ioapic)
    vm.set_pit2(st.pit)
    vm.set_clock(st.clock, advance_to_now=clock == "realtime")
