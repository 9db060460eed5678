"""Kernel ABI for /dev/kvm on x86_64: struct layouts, constants, ioctl numbers.

This is the ONLY module holding kernel layouts.  Names are exactly those of
``<linux/kvm.h>`` / ``<asm/kvm.h>`` (Linux 6.x uapi).  Every size, offset and
ioctl number here is pinned against the real header by
``tests/unit/test_kvm_uapi.py`` (and re-checked live with ``kvm_abi.c`` when a
compiler is available).

Nested anonymous C structs get their own classes named ``<outer>_<member>``
(e.g. ``kvm_vcpu_events_exception``, ``kvm_run_io``); anonymous unions are
exposed through ``_anonymous_`` so C-style access (``run.io.port``,
``run.system_event.data``, ``level.irq``) works.

Variable-length structs (C flexible array members).  The plain class is the
*header* only; its sizeof is what the kernel puts in the ioctl number
(``sizeof(struct kvm_msrs) == 8``).  To get a buffer with room for ``n``
entries use the factories (cached per ``n``, the only code in this module):

    kvm_msrs_n(n)          nmsrs, pad, entries[n] of kvm_msr_entry
    kvm_msr_list_n(n)      nmsrs, indices[n] of u32
    kvm_cpuid2_n(n)        nent, padding, entries[n] of kvm_cpuid_entry2
    kvm_irq_routing_n(n)   nr, flags, entries[n] of kvm_irq_routing_entry

and pass ``ctypes.byref(kvm_msrs_n(n)(nmsrs=n))`` with the header's ioctl.

XSAVE: ``kvm_xsave`` is the legacy fixed 4096-byte area (KVM_GET/SET_XSAVE).
With KVM_CAP_XSAVE2, ``KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)`` *on the VM fd*
returns the real size (>= 4096); allocate that many bytes yourself, e.g.
``buf = (ctypes.c_uint32 * (size // 4))()`` and call
``ioctl(vcpu, KVM_GET_XSAVE2, ctypes.byref(buf))``; KVM_SET_XSAVE then reads
that many bytes from the same kind of buffer.  (The ioctl number still encodes
sizeof(struct kvm_xsave) == 4096.)
"""

from __future__ import annotations

from ctypes import (
    Structure, Union,
    c_char, c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p,
)

from stratopy.kvm.ioctl import KVMIO, _IO, _IOR, _IOW, _IOWR

u8, u16, u32, u64 = c_uint8, c_uint16, c_uint32, c_uint64
s32, s64 = c_int32, c_int64

KVM_API_VERSION = 12

# ---------------------------------------------------------------- asm/kvm.h --

KVM_PIO_PAGE_OFFSET = 1
KVM_COALESCED_MMIO_PAGE_OFFSET = 2
KVM_DIRTY_LOG_PAGE_OFFSET = 64

DE_VECTOR = 0
DB_VECTOR = 1
BP_VECTOR = 3
OF_VECTOR = 4
BR_VECTOR = 5
UD_VECTOR = 6
NM_VECTOR = 7
DF_VECTOR = 8
TS_VECTOR = 10
NP_VECTOR = 11
SS_VECTOR = 12
GP_VECTOR = 13
PF_VECTOR = 14
MF_VECTOR = 16
AC_VECTOR = 17
MC_VECTOR = 18
XM_VECTOR = 19
VE_VECTOR = 20

KVM_NR_INTERRUPTS = 256


class kvm_pic_state(Structure):
    _fields_ = [
        ("last_irr", u8),
        ("irr", u8),
        ("imr", u8),
        ("isr", u8),
        ("priority_add", u8),
        ("irq_base", u8),
        ("read_reg_select", u8),
        ("poll", u8),
        ("special_mask", u8),
        ("init_state", u8),
        ("auto_eoi", u8),
        ("rotate_on_auto_eoi", u8),
        ("special_fully_nested_mode", u8),
        ("init4", u8),
        ("elcr", u8),
        ("elcr_mask", u8),
    ]


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_redirtbl_fields(Structure):
    _fields_ = [
        ("vector", u8),
        ("delivery_mode", u8, 3),
        ("dest_mode", u8, 1),
        ("delivery_status", u8, 1),
        ("polarity", u8, 1),
        ("remote_irr", u8, 1),
        ("trig_mode", u8, 1),
        ("mask", u8, 1),
        ("reserve", u8, 7),
        ("reserved", u8 * 4),
        ("dest_id", u8),
    ]


class kvm_ioapic_redirtbl(Union):
    _fields_ = [
        ("bits", u64),
        ("fields", kvm_ioapic_redirtbl_fields),
    ]


class kvm_ioapic_state(Structure):
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", kvm_ioapic_redirtbl * KVM_IOAPIC_NUM_PINS),
    ]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_NR_IRQCHIPS = 3

KVM_RUN_X86_SMM = 1 << 0
KVM_RUN_X86_BUS_LOCK = 1 << 1


class kvm_regs(Structure):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx",
        "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15",
        "rip", "rflags",
    )]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(Structure):
    _fields_ = [("regs", c_char * KVM_APIC_REG_SIZE)]


class kvm_segment(Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u16),
        ("padding", u16 * 3),
    ]


class kvm_sregs(Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
        ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
        ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_msr_entry(Structure):
    _fields_ = [
        ("index", u32),
        ("reserved", u32),
        ("data", u64),
    ]


class kvm_msrs(Structure):
    """Header only (sizeof 8); use kvm_msrs_n(n) for a buffer."""
    _fields_ = [
        ("nmsrs", u32),
        ("pad", u32),
        ("entries", kvm_msr_entry * 0),
    ]


class kvm_msr_list(Structure):
    """Header only (sizeof 4); use kvm_msr_list_n(n) for a buffer."""
    _fields_ = [
        ("nmsrs", u32),
        ("indices", u32 * 0),
    ]


class kvm_cpuid_entry2(Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_CPUID_FLAG_STATEFUL_FUNC = 1 << 1
KVM_CPUID_FLAG_STATE_READ_NEXT = 1 << 2


class kvm_cpuid2(Structure):
    """Header only (sizeof 8); use kvm_cpuid2_n(n) for a buffer."""
    _fields_ = [
        ("nent", u32),
        ("padding", u32),
        ("entries", kvm_cpuid_entry2 * 0),
    ]


class kvm_pit_channel_state(Structure):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", s64),
    ]


class kvm_debug_exit_arch(Structure):
    _fields_ = [
        ("exception", u32),
        ("pad", u32),
        ("pc", u64),
        ("dr6", u64),
        ("dr7", u64),
    ]


KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000


class kvm_guest_debug_arch(Structure):
    _fields_ = [("debugreg", u64 * 8)]


class kvm_pit_state(Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3)]


KVM_PIT_FLAGS_HPET_LEGACY = 0x00000001
KVM_PIT_FLAGS_SPEAKER_DATA_ON = 0x00000002


class kvm_pit_state2(Structure):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", u32),
        ("reserved", u32 * 9),
    ]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x00000020

KVM_X86_SHADOW_INT_MOV_SS = 0x01
KVM_X86_SHADOW_INT_STI = 0x02


class kvm_vcpu_events_exception(Structure):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]


class kvm_vcpu_events_interrupt(Structure):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("soft", u8),
        ("shadow", u8),
    ]


class kvm_vcpu_events_nmi(Structure):
    _fields_ = [
        ("injected", u8),
        ("pending", u8),
        ("masked", u8),
        ("pad", u8),
    ]


class kvm_vcpu_events_smi(Structure):
    _fields_ = [
        ("smm", u8),
        ("pending", u8),
        ("smm_inside_nmi", u8),
        ("latched_init", u8),
    ]


class kvm_vcpu_events_triple_fault(Structure):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(Structure):
    _fields_ = [
        ("exception", kvm_vcpu_events_exception),
        ("interrupt", kvm_vcpu_events_interrupt),
        ("nmi", kvm_vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", kvm_vcpu_events_smi),
        ("triple_fault", kvm_vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_debugregs(Structure):
    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


class kvm_xsave(Structure):
    """Legacy 4096-byte XSAVE area; see the module doc for KVM_GET_XSAVE2."""
    _fields_ = [
        ("region", u32 * 1024),
        ("extra", u32 * 0),
    ]


KVM_MAX_XCRS = 16


class kvm_xcr(Structure):
    _fields_ = [
        ("xcr", u32),
        ("reserved", u32),
        ("value", u64),
    ]


class kvm_xcrs(Structure):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2
KVM_SYNC_X86_VALID_FIELDS = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS


class kvm_sync_regs(Structure):
    _fields_ = [
        ("regs", kvm_regs),
        ("sregs", kvm_sregs),
        ("events", kvm_vcpu_events),
    ]


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


