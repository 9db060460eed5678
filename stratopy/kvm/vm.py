"""A KVM virtual machine fd: memory slots, irqchip, PIT, irqfd/ioeventfd, clock."""

from __future__ import annotations

import ctypes
import os

from stratopy.errors import KvmError
from stratopy.kvm import uapi
from stratopy.kvm.ioctl import ioctl


class Vm:
    """Owns the VM fd; created by Kvm.create_vm()."""

    def __init__(self, kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list = []

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- platform ---------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        region = uapi.kvm_userspace_memory_region(slot=slot, flags=flags,
                                                  guest_phys_addr=gpa, memory_size=size,
                                                  userspace_addr=host_addr)
        ioctl(self.fd, uapi.KVM_SET_USER_MEMORY_REGION, ctypes.byref(region))

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, uapi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        value = ctypes.c_uint64(addr)
        ioctl(self.fd, uapi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.byref(value))

    def create_irqchip(self) -> None:
        ioctl(self.fd, uapi.KVM_CREATE_IRQCHIP)

    def create_pit2(self) -> None:
        # The PIT's speaker port is a dummy: nothing to emulate in user space.
        cfg = uapi.kvm_pit_config(flags=uapi.KVM_PIT_SPEAKER_DUMMY)
        ioctl(self.fd, uapi.KVM_CREATE_PIT2, ctypes.byref(cfg))

    def irq_line(self, irq: int, level: int) -> None:
        lvl = uapi.kvm_irq_level(irq=irq, level=level)
        ioctl(self.fd, uapi.KVM_IRQ_LINE, ctypes.byref(lvl))

    def irq_pulse(self, irq: int):
        """A callable that raises then lowers ``irq`` (an edge), allocation-free."""
        hi = uapi.kvm_irq_level(irq=irq, level=1)
        lo = uapi.kvm_irq_level(irq=irq, level=0)
        hi_ref, lo_ref = ctypes.byref(hi), ctypes.byref(lo)
        fd, req = self.fd, uapi.KVM_IRQ_LINE

        def pulse() -> None:
            ioctl(fd, req, hi_ref)
            ioctl(fd, req, lo_ref)
        pulse._structs = (hi, lo)   # keep the structs alive with the callable
        return pulse

    def register_irqfd(self, efd: int, gsi: int) -> None:
        req = uapi.kvm_irqfd(fd=efd, gsi=gsi)
        ioctl(self.fd, uapi.KVM_IRQFD, ctypes.byref(req))

    def unregister_irqfd(self, efd: int, gsi: int) -> None:
        req = uapi.kvm_irqfd(fd=efd, gsi=gsi, flags=uapi.KVM_IRQFD_FLAG_DEASSIGN)
        ioctl(self.fd, uapi.KVM_IRQFD, ctypes.byref(req))

    def register_ioeventfd(self, efd: int, addr: int, length: int,
                           datamatch: int | None = None, pio: bool = False,
                           deassign: bool = False) -> None:
        flags = 0
        if datamatch is not None:
            flags |= uapi.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= uapi.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= uapi.KVM_IOEVENTFD_FLAG_DEASSIGN
        req = uapi.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length,
                                 fd=efd, flags=flags)
        ioctl(self.fd, uapi.KVM_IOEVENTFD, ctypes.byref(req))

    # --- state: irqchips, PIT, clock ----------------------------------------
    def get_irqchip(self, chip_id: int) -> bytes:
        chip = uapi.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, uapi.KVM_GET_IRQCHIP, ctypes.byref(chip))
        return bytes(chip)

    def set_irqchip(self, raw: bytes) -> None:
        chip = uapi.kvm_irqchip.from_buffer_copy(raw)
        ioctl(self.fd, uapi.KVM_SET_IRQCHIP, ctypes.byref(chip))

    def get_pit2(self) -> bytes:
        pit = uapi.kvm_pit_state2()
        ioctl(self.fd, uapi.KVM_GET_PIT2, ctypes.byref(pit))
        return bytes(pit)

    def set_pit2(self, raw: bytes) -> None:
        pit = uapi.kvm_pit_state2.from_buffer_copy(raw)
        ioctl(self.fd, uapi.KVM_SET_PIT2, ctypes.byref(pit))

    def get_clock(self) -> bytes:
        clock = uapi.kvm_clock_data()
        ioctl(self.fd, uapi.KVM_GET_CLOCK, ctypes.byref(clock))
        return bytes(clock)

    def set_clock(self, raw: bytes, advance_to_now: bool = True) -> None:
        """Set kvmclock from a saved kvm_clock_data.

        With ``advance_to_now`` and a saved ``realtime`` (KVM_CLOCK_REALTIME),
        KVM moves the clock forward by the wall time elapsed since it was
        saved, so a clone's clock does not start in the template's past.
        Other GET_CLOCK flags (TSC_STABLE, HOST_TSC) are not settable.
        """
        clock = uapi.kvm_clock_data.from_buffer_copy(raw)
        keep = uapi.KVM_CLOCK_REALTIME if advance_to_now else 0
        clock.flags &= keep
        try:
            ioctl(self.fd, uapi.KVM_SET_CLOCK, ctypes.byref(clock))
        except KvmError:
            if not clock.flags:
                raise
            clock.flags = 0  # an older KVM without KVM_CLOCK_REALTIME support
            ioctl(self.fd, uapi.KVM_SET_CLOCK, ctypes.byref(clock))

    def create_vcpu(self, index: int):
        from stratopy.kvm.vcpu import Vcpu

        fd = ioctl(self.fd, uapi.KVM_CREATE_VCPU, index)
        vcpu = Vcpu(self, index, fd)
        self.vcpus.append(vcpu)
        return vcpu
