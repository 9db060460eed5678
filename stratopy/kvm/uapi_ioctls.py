"""KVM's ioctl numbers (system, VM and vCPU), ``IOCTL_NAMES``, and the
factories of the variable-length structs. Part of :mod:`stratopy.kvm.uapi`
(import that)."""

from __future__ import annotations

from ctypes import Structure

from stratopy.ioctl_codes import _IO, _IOR, _IOW, _IOWR
from stratopy.kvm.ioctl import KVMIO
from stratopy.kvm.uapi_asm import *  # noqa: F401,F403
from stratopy.kvm.uapi_linux import *  # noqa: F401,F403
from stratopy.kvm.uapi_asm import u32

# -------------------------------------------------------------- ioctl numbers --

# system ioctls (/dev/kvm)
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)          # also valid on a VM fd
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_GET_EMULATED_CPUID = _IOWR(KVMIO, 0x09, kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(KVMIO, 0x0a, kvm_msr_list)

# VM ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, u64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)    # sic: _IOR in the kernel
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, kvm_irq_level)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6a, kvm_irq_routing)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7b, kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7c, kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9f, kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xa0, kvm_pit_state2)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xa5, kvm_msi)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xa3, kvm_enable_cap)   # VM and vCPU

# vCPU ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, kvm_translation)
KVM_INTERRUPT = _IOW(KVMIO, 0x86, kvm_interrupt)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8c, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8d, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8e, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8f, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_NMI = _IO(KVMIO, 0x9a)
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9b, kvm_guest_debug)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9f, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xa0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xa1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xa2, kvm_debugregs)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xa2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xa3)
KVM_GET_XSAVE = _IOR(KVMIO, 0xa4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xa5, kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xa6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xa7, kvm_xcrs)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xad)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xcf, kvm_xsave)

# Every ioctl number above, by name (stratopy.kvm.ioctl builds its reverse
# table for error messages from this; the test checks it is complete).
IOCTL_NAMES = (
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST",
    "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID",
    "KVM_GET_EMULATED_CPUID", "KVM_GET_MSR_FEATURE_INDEX_LIST",
    "KVM_CREATE_VCPU", "KVM_GET_DIRTY_LOG", "KVM_SET_USER_MEMORY_REGION",
    "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP",
    "KVM_IRQ_LINE", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "KVM_IRQ_LINE_STATUS",
    "KVM_SET_GSI_ROUTING", "KVM_IRQFD", "KVM_CREATE_PIT2", "KVM_IOEVENTFD",
    "KVM_SET_CLOCK", "KVM_GET_CLOCK", "KVM_GET_PIT2", "KVM_SET_PIT2",
    "KVM_SIGNAL_MSI", "KVM_ENABLE_CAP",
    "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS",
    "KVM_TRANSLATE", "KVM_INTERRUPT", "KVM_GET_MSRS", "KVM_SET_MSRS",
    "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_LAPIC", "KVM_SET_LAPIC",
    "KVM_SET_CPUID2", "KVM_GET_CPUID2", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE",
    "KVM_NMI", "KVM_SET_GUEST_DEBUG", "KVM_GET_VCPU_EVENTS",
    "KVM_SET_VCPU_EVENTS", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS",
    "KVM_SET_TSC_KHZ", "KVM_GET_TSC_KHZ", "KVM_GET_XSAVE", "KVM_SET_XSAVE",
    "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_KVMCLOCK_CTRL", "KVM_GET_XSAVE2",
)


# ------------------------------------------- variable-length struct factories --
# The single exception to "no logic": build (and cache) a Structure with room
# for n trailing entries.  Same leading layout as the header class.

_flex_cache: dict[tuple[str, int], type] = {}


def _flex(name: str, head: list, field: str, elem, n: int) -> type:
    key = (name, n)
    cls = _flex_cache.get(key)
    if cls is None:
        if n < 0:
            raise ValueError(f"{name}: negative entry count {n}")
        cls = type(f"{name}_{n}", (Structure,), {"_fields_": head + [(field, elem * n)]})
        _flex_cache[key] = cls
    return cls


def kvm_msrs_n(n: int) -> type:
    """struct kvm_msrs with entries[n] (for KVM_GET_MSRS / KVM_SET_MSRS)."""
    return _flex("kvm_msrs", [("nmsrs", u32), ("pad", u32)], "entries", kvm_msr_entry, n)


def kvm_msr_list_n(n: int) -> type:
    """struct kvm_msr_list with indices[n] (KVM_GET_MSR_(FEATURE_)INDEX_LIST)."""
    return _flex("kvm_msr_list", [("nmsrs", u32)], "indices", u32, n)


def kvm_cpuid2_n(n: int) -> type:
    """struct kvm_cpuid2 with entries[n] (KVM_GET_SUPPORTED_CPUID, KVM_SET/GET_CPUID2)."""
    return _flex("kvm_cpuid2", [("nent", u32), ("padding", u32)], "entries",
                 kvm_cpuid_entry2, n)


def kvm_irq_routing_n(n: int) -> type:
    """struct kvm_irq_routing with entries[n] (KVM_SET_GSI_ROUTING)."""
    return _flex("kvm_irq_routing", [("nr", u32), ("flags", u32)], "entries",
                 kvm_irq_routing_entry, n)
