"""KVM's x86_64 ``<asm/kvm.h>``: vectors, irqchip, registers, MSRs, CPUID,
PIT, vCPU events, XSAVE/XCRs, sync regs. Part of :mod:`stratopy.kvm.uapi`
(import that; this split only keeps each file readable)."""

from __future__ import annotations

from ctypes import (
    Structure, Union,
    c_char, c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64,
)

u8, u16, u32, u64 = c_uint8, c_uint16, c_uint32, c_uint64
s32, s64 = c_int32, c_int64

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
