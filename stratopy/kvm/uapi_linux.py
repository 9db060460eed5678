"""KVM's ``<linux/kvm.h>`` structures and constants: memory regions, irq
lines, kvm_run and its exits, ioeventfd/irqfd, capabilities, GSI routing,
clock, MSI. Part of :mod:`stratopy.kvm.uapi` (import that)."""

from __future__ import annotations

from ctypes import (
    Structure, Union,
    c_char, c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p,
)

u8, u16, u32, u64 = c_uint8, c_uint16, c_uint32, c_uint64
s32, s64 = c_int32, c_int64

from stratopy.kvm.uapi_asm import *  # noqa: F401,F403 - kvm_run embeds the x86 structs
from stratopy.kvm.uapi_asm import kvm_debug_exit_arch, kvm_guest_debug_arch, kvm_sync_regs  # noqa: F401

KVM_API_VERSION = 12

# -------------------------------------------------------------- linux/kvm.h --

class kvm_userspace_memory_region(Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_irq_level_u(Union):
    _fields_ = [
        ("irq", u32),
        ("status", s32),
    ]


class kvm_irq_level(Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("u", kvm_irq_level_u),
        ("level", u32),
    ]


class kvm_irqchip_chip(Union):
    _fields_ = [
        ("dummy", c_char * 512),
        ("pic", kvm_pic_state),
        ("ioapic", kvm_ioapic_state),
    ]


class kvm_irqchip(Structure):
    _fields_ = [
        ("chip_id", u32),
        ("pad", u32),
        ("chip", kvm_irqchip_chip),
    ]


class kvm_pit_config(Structure):
    _fields_ = [
        ("flags", u32),
        ("pad", u32 * 15),
    ]


KVM_PIT_SPEAKER_DUMMY = 1

# exit reasons (kvm_run.exit_reason)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_S390_SIEIC = 13
KVM_EXIT_S390_RESET = 14
KVM_EXIT_DCR = 15
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_OSI = 18
KVM_EXIT_PAPR_HCALL = 19
KVM_EXIT_S390_UCONTROL = 20
KVM_EXIT_WATCHDOG = 21
KVM_EXIT_S390_TSCH = 22
KVM_EXIT_EPR = 23
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_S390_STSI = 25
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_ARM_NISV = 28
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_RISCV_SBI = 35
KVM_EXIT_RISCV_CSR = 36
KVM_EXIT_NOTIFY = 37

# KVM_EXIT_INTERNAL_ERROR suberrors
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2


class kvm_run_hw(Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_fail_entry(Structure):
    _fields_ = [
        ("hardware_entry_failure_reason", u64),
        ("cpu", u32),
    ]


class kvm_run_ex(Structure):
    _fields_ = [
        ("exception", u32),
        ("error_code", u32),
    ]


class kvm_run_io(Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),   # relative to the start of kvm_run
    ]


class kvm_run_debug(Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class kvm_run_mmio(Structure):
    _fields_ = [
        ("phys_addr", u64),
        ("data", u8 * 8),
        ("len", u32),
        ("is_write", u8),
    ]


class kvm_run_hypercall(Structure):
    _fields_ = [
        ("nr", u64),
        ("args", u64 * 6),
        ("ret", u64),
        ("longmode", u32),
        ("pad", u32),
    ]


class kvm_run_tpr_access(Structure):
    _fields_ = [
        ("rip", u64),
        ("is_write", u32),
        ("pad", u32),
    ]


class kvm_run_internal(Structure):
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("data", u64 * 16),
    ]


class kvm_run_emulation_failure(Structure):
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("flags", u64),
        ("insn_size", u8),
        ("insn_bytes", u8 * 15),
    ]


class kvm_run_system_event_u(Union):
    _fields_ = [
        ("flags", u64),
        ("data", u64 * 16),
    ]


class kvm_run_system_event(Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("type", u32),
        ("ndata", u32),
        ("u", kvm_run_system_event_u),
    ]


class kvm_run_eoi(Structure):
    _fields_ = [("vector", u8)]


class kvm_run_msr(Structure):
    _fields_ = [
        ("error", u8),
        ("pad", u8 * 7),
        ("reason", u32),
        ("index", u32),
        ("data", u64),
    ]


class kvm_run_notify(Structure):
    _fields_ = [("flags", u32)]


KVM_NOTIFY_CONTEXT_INVALID = 1 << 0


class kvm_run_exit(Union):
    """The anonymous exit-information union of kvm_run (256 bytes)."""
    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("debug", kvm_run_debug),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("tpr_access", kvm_run_tpr_access),
        ("internal", kvm_run_internal),
        ("emulation_failure", kvm_run_emulation_failure),
        ("system_event", kvm_run_system_event),
        ("eoi", kvm_run_eoi),
        ("msr", kvm_run_msr),
        ("notify", kvm_run_notify),
        ("padding", c_char * 256),
    ]


SYNC_REGS_SIZE_BYTES = 2048


class kvm_run_s(Union):
    _fields_ = [
        ("regs", kvm_sync_regs),
        ("padding", c_char * SYNC_REGS_SIZE_BYTES),
    ]


class kvm_run(Structure):
    """mmap(vcpu_fd, 0, KVM_GET_VCPU_MMAP_SIZE); exit info via run.io etc."""
    _anonymous_ = ("exit",)
    _fields_ = [
        # in
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        # out
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        # in (pre_kvm_run), out (post_kvm_run)
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", kvm_run_s),
    ]


class kvm_translation(Structure):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


class kvm_interrupt(Structure):
    _fields_ = [("irq", u32)]


class kvm_dirty_log_u(Union):
    _fields_ = [
        ("dirty_bitmap", c_void_p),
        ("padding2", u64),
    ]


class kvm_dirty_log(Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("slot", u32),
        ("padding1", u32),
        ("u", kvm_dirty_log_u),
    ]


# MP states (kvm_mp_state.mp_state)
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
KVM_MP_STATE_STOPPED = 5
KVM_MP_STATE_CHECK_STOP = 6
KVM_MP_STATE_OPERATING = 7
KVM_MP_STATE_LOAD = 8
KVM_MP_STATE_AP_RESET_HOLD = 9
KVM_MP_STATE_SUSPENDED = 10


class kvm_mp_state(Structure):
    _fields_ = [("mp_state", u32)]


KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002


class kvm_guest_debug(Structure):
    _fields_ = [
        ("control", u32),
        ("pad", u32),
        ("arch", kvm_guest_debug_arch),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_ioeventfd(Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class kvm_enable_cap(Structure):
    _fields_ = [
        ("cap", u32),
        ("flags", u32),
        ("args", u64 * 4),
        ("pad", u8 * 64),
    ]


# capabilities (KVM_CHECK_EXTENSION argument)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_CLOCKSOURCE = 8
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_NOP_IO_DELAY = 12
KVM_CAP_PV_MMU = 13
KVM_CAP_MP_STATE = 14
KVM_CAP_SYNC_MMU = 16
KVM_CAP_USER_NMI = 22
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_MCE = 31
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_READONLY_MEM = 81
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_XSAVE2 = 208
KVM_CAP_SYSTEM_EVENT_DATA = 215
KVM_CAP_X86_TRIPLE_FAULT_EVENT = 218


class kvm_irq_routing_irqchip(Structure):
    _fields_ = [
        ("irqchip", u32),
        ("pin", u32),
    ]


class kvm_irq_routing_msi_u(Union):
    _fields_ = [
        ("pad", u32),
        ("devid", u32),
    ]


class kvm_irq_routing_msi(Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("u", kvm_irq_routing_msi_u),
    ]


KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2


class kvm_irq_routing_entry_u(Union):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("pad", u32 * 8),
    ]


class kvm_irq_routing_entry(Structure):
    _fields_ = [
        ("gsi", u32),
        ("type", u32),
        ("flags", u32),
        ("pad", u32),
        ("u", kvm_irq_routing_entry_u),
    ]


class kvm_irq_routing(Structure):
    """Header only (sizeof 8); use kvm_irq_routing_n(n) for a buffer."""
    _fields_ = [
        ("nr", u32),
        ("flags", u32),
        ("entries", kvm_irq_routing_entry * 0),
    ]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_irqfd(Structure):
    _fields_ = [
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    ]


# For KVM_CAP_ADJUST_CLOCK.  Do not use 1 (see the header).
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


class kvm_clock_data(Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class kvm_msi(Structure):
    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    ]
