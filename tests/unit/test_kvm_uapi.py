"""Pin stratopy.kvm.uapi / stratopy.kvm.ioctl to the real x86_64 KVM ABI.

EXPECTED holds literal values printed by tests/unit/kvm_abi.c compiled against
<linux/kvm.h> (Debian 12 linux-libc-dev 6.1.x, x86_64), so these tests need no
compiler.  When gcc and the header are present, test_live_header_matches
re-compiles kvm_abi.c and compares its output with the Python values directly.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from stratopy.errors import KvmError
from stratopy.kvm import ioctl as kio
from stratopy.kvm import uapi
from stratopy.kvm.ioctl import ioctl

ABI_C = Path(__file__).with_name("kvm_abi.c")

# (kind, name) -> value, from `gcc tests/unit/kvm_abi.c && ./a.out`
EXPECTED = {
    # sizeof
    ("sizeof", "kvm_regs"): 144,
    ("sizeof", "kvm_segment"): 24,
    ("sizeof", "kvm_dtable"): 16,
    ("sizeof", "kvm_sregs"): 312,
    ("sizeof", "kvm_fpu"): 416,
    ("sizeof", "kvm_xsave"): 4096,
    ("sizeof", "kvm_xcr"): 16,
    ("sizeof", "kvm_xcrs"): 392,
    ("sizeof", "kvm_lapic_state"): 1024,
    ("sizeof", "kvm_msr_entry"): 16,
    ("sizeof", "kvm_msrs"): 8,
    ("sizeof", "kvm_msr_list"): 4,
    ("sizeof", "kvm_cpuid_entry2"): 40,
    ("sizeof", "kvm_cpuid2"): 8,
    ("sizeof", "kvm_mp_state"): 4,
    ("sizeof", "kvm_vcpu_events"): 64,
    ("sizeof", "kvm_debugregs"): 128,
    ("sizeof", "kvm_pic_state"): 16,
    ("sizeof", "kvm_ioapic_state"): 216,
    ("sizeof", "kvm_irqchip"): 520,
    ("sizeof", "kvm_pit_channel_state"): 24,
    ("sizeof", "kvm_pit_state2"): 112,
    ("sizeof", "kvm_pit_config"): 64,
    ("sizeof", "kvm_clock_data"): 48,
    ("sizeof", "kvm_userspace_memory_region"): 32,
    ("sizeof", "kvm_irq_level"): 8,
    ("sizeof", "kvm_irqfd"): 32,
    ("sizeof", "kvm_ioeventfd"): 64,
    ("sizeof", "kvm_run"): 2352,
    ("sizeof", "kvm_translation"): 24,
    ("sizeof", "kvm_guest_debug"): 72,
    ("sizeof", "kvm_guest_debug_arch"): 64,
    ("sizeof", "kvm_debug_exit_arch"): 32,
    ("sizeof", "kvm_sync_regs"): 520,
    ("sizeof", "kvm_interrupt"): 4,
    ("sizeof", "kvm_dirty_log"): 16,
    ("sizeof", "kvm_enable_cap"): 104,
    ("sizeof", "kvm_irq_routing_irqchip"): 8,
    ("sizeof", "kvm_irq_routing_msi"): 16,
    ("sizeof", "kvm_irq_routing_entry"): 48,
    ("sizeof", "kvm_irq_routing"): 8,
    ("sizeof", "kvm_msi"): 32,
    # offsetof
    ("offsetof", "kvm_run.request_interrupt_window"): 0,
    ("offsetof", "kvm_run.immediate_exit"): 1,
    ("offsetof", "kvm_run.exit_reason"): 8,
    ("offsetof", "kvm_run.ready_for_interrupt_injection"): 12,
    ("offsetof", "kvm_run.if_flag"): 13,
    ("offsetof", "kvm_run.flags"): 14,
    ("offsetof", "kvm_run.cr8"): 16,
    ("offsetof", "kvm_run.apic_base"): 24,
    ("offsetof", "kvm_run.hw"): 32,
    ("offsetof", "kvm_run.hw.hardware_exit_reason"): 32,
    ("offsetof", "kvm_run.fail_entry.hardware_entry_failure_reason"): 32,
    ("offsetof", "kvm_run.fail_entry.cpu"): 40,
    ("offsetof", "kvm_run.ex.exception"): 32,
    ("offsetof", "kvm_run.ex.error_code"): 36,
    ("offsetof", "kvm_run.io.direction"): 32,
    ("offsetof", "kvm_run.io.size"): 33,
    ("offsetof", "kvm_run.io.port"): 34,
    ("offsetof", "kvm_run.io.count"): 36,
    ("offsetof", "kvm_run.io.data_offset"): 40,
    ("offsetof", "kvm_run.debug.arch.exception"): 32,
    ("offsetof", "kvm_run.debug.arch.dr6"): 48,
    ("offsetof", "kvm_run.mmio.phys_addr"): 32,
    ("offsetof", "kvm_run.mmio.data"): 40,
    ("offsetof", "kvm_run.mmio.len"): 48,
    ("offsetof", "kvm_run.mmio.is_write"): 52,
    ("offsetof", "kvm_run.hypercall.nr"): 32,
    ("offsetof", "kvm_run.hypercall.ret"): 88,
    ("offsetof", "kvm_run.hypercall.longmode"): 96,
    ("offsetof", "kvm_run.internal.suberror"): 32,
    ("offsetof", "kvm_run.internal.ndata"): 36,
    ("offsetof", "kvm_run.internal.data"): 40,
    ("offsetof", "kvm_run.emulation_failure.flags"): 40,
    ("offsetof", "kvm_run.emulation_failure.insn_size"): 48,
    ("offsetof", "kvm_run.emulation_failure.insn_bytes"): 49,
    ("offsetof", "kvm_run.system_event.type"): 32,
    ("offsetof", "kvm_run.system_event.ndata"): 36,
    ("offsetof", "kvm_run.system_event.flags"): 40,
    ("offsetof", "kvm_run.system_event.data"): 40,
    ("offsetof", "kvm_run.msr.error"): 32,
    ("offsetof", "kvm_run.msr.reason"): 40,
    ("offsetof", "kvm_run.msr.index"): 44,
    ("offsetof", "kvm_run.msr.data"): 48,
    ("offsetof", "kvm_run.notify.flags"): 32,
    ("offsetof", "kvm_run.padding"): 32,
    ("offsetof", "kvm_run.kvm_valid_regs"): 288,
    ("offsetof", "kvm_run.kvm_dirty_regs"): 296,
    ("offsetof", "kvm_run.s"): 304,
    ("offsetof", "kvm_run.s.regs.regs"): 304,
    ("offsetof", "kvm_run.s.regs.sregs"): 448,
    ("offsetof", "kvm_run.s.regs.events"): 760,
    ("offsetof", "kvm_regs.rsp"): 48,
    ("offsetof", "kvm_regs.r8"): 64,
    ("offsetof", "kvm_regs.rip"): 128,
    ("offsetof", "kvm_regs.rflags"): 136,
    ("offsetof", "kvm_segment.base"): 0,
    ("offsetof", "kvm_segment.limit"): 8,
    ("offsetof", "kvm_segment.selector"): 12,
    ("offsetof", "kvm_segment.type"): 14,
    ("offsetof", "kvm_segment.present"): 15,
    ("offsetof", "kvm_segment.dpl"): 16,
    ("offsetof", "kvm_segment.db"): 17,
    ("offsetof", "kvm_segment.s"): 18,
    ("offsetof", "kvm_segment.l"): 19,
    ("offsetof", "kvm_segment.g"): 20,
    ("offsetof", "kvm_segment.avl"): 21,
    ("offsetof", "kvm_segment.unusable"): 22,
    ("offsetof", "kvm_dtable.base"): 0,
    ("offsetof", "kvm_dtable.limit"): 8,
    ("offsetof", "kvm_sregs.cs"): 0,
    ("offsetof", "kvm_sregs.ds"): 24,
    ("offsetof", "kvm_sregs.es"): 48,
    ("offsetof", "kvm_sregs.fs"): 72,
    ("offsetof", "kvm_sregs.gs"): 96,
    ("offsetof", "kvm_sregs.ss"): 120,
    ("offsetof", "kvm_sregs.tr"): 144,
    ("offsetof", "kvm_sregs.ldt"): 168,
    ("offsetof", "kvm_sregs.gdt"): 192,
    ("offsetof", "kvm_sregs.idt"): 208,
    ("offsetof", "kvm_sregs.cr0"): 224,
    ("offsetof", "kvm_sregs.cr2"): 232,
    ("offsetof", "kvm_sregs.cr3"): 240,
    ("offsetof", "kvm_sregs.cr4"): 248,
    ("offsetof", "kvm_sregs.cr8"): 256,
    ("offsetof", "kvm_sregs.efer"): 264,
    ("offsetof", "kvm_sregs.apic_base"): 272,
    ("offsetof", "kvm_sregs.interrupt_bitmap"): 280,
    ("offsetof", "kvm_fpu.fcw"): 128,
    ("offsetof", "kvm_fpu.ftwx"): 132,
    ("offsetof", "kvm_fpu.last_opcode"): 134,
    ("offsetof", "kvm_fpu.last_ip"): 136,
    ("offsetof", "kvm_fpu.last_dp"): 144,
    ("offsetof", "kvm_fpu.xmm"): 152,
    ("offsetof", "kvm_fpu.mxcsr"): 408,
    ("offsetof", "kvm_xsave.region"): 0,
    ("offsetof", "kvm_xcrs.xcrs"): 8,
    ("offsetof", "kvm_xcrs.padding"): 264,
    ("offsetof", "kvm_xcr.value"): 8,
    ("offsetof", "kvm_lapic_state.regs"): 0,
    ("offsetof", "kvm_msrs.entries"): 8,
    ("offsetof", "kvm_msr_entry.data"): 8,
    ("offsetof", "kvm_msr_list.indices"): 4,
    ("offsetof", "kvm_cpuid2.entries"): 8,
    ("offsetof", "kvm_cpuid_entry2.flags"): 8,
    ("offsetof", "kvm_cpuid_entry2.eax"): 12,
    ("offsetof", "kvm_cpuid_entry2.edx"): 24,
    ("offsetof", "kvm_cpuid_entry2.padding"): 28,
    ("offsetof", "kvm_vcpu_events.exception.injected"): 0,
    ("offsetof", "kvm_vcpu_events.exception.nr"): 1,
    ("offsetof", "kvm_vcpu_events.exception.has_error_code"): 2,
    ("offsetof", "kvm_vcpu_events.exception.pending"): 3,
    ("offsetof", "kvm_vcpu_events.exception.error_code"): 4,
    ("offsetof", "kvm_vcpu_events.interrupt"): 8,
    ("offsetof", "kvm_vcpu_events.interrupt.nr"): 9,
    ("offsetof", "kvm_vcpu_events.interrupt.soft"): 10,
    ("offsetof", "kvm_vcpu_events.interrupt.shadow"): 11,
    ("offsetof", "kvm_vcpu_events.nmi"): 12,
    ("offsetof", "kvm_vcpu_events.nmi.pending"): 13,
    ("offsetof", "kvm_vcpu_events.nmi.masked"): 14,
    ("offsetof", "kvm_vcpu_events.sipi_vector"): 16,
    ("offsetof", "kvm_vcpu_events.flags"): 20,
    ("offsetof", "kvm_vcpu_events.smi"): 24,
    ("offsetof", "kvm_vcpu_events.smi.pending"): 25,
    ("offsetof", "kvm_vcpu_events.smi.smm_inside_nmi"): 26,
    ("offsetof", "kvm_vcpu_events.smi.latched_init"): 27,
    ("offsetof", "kvm_vcpu_events.triple_fault"): 28,
    ("offsetof", "kvm_vcpu_events.triple_fault.pending"): 28,
    ("offsetof", "kvm_vcpu_events.reserved"): 29,
    ("offsetof", "kvm_vcpu_events.exception_has_payload"): 55,
    ("offsetof", "kvm_vcpu_events.exception_payload"): 56,
    ("offsetof", "kvm_debugregs.dr6"): 32,
    ("offsetof", "kvm_debugregs.dr7"): 40,
    ("offsetof", "kvm_debugregs.flags"): 48,
    ("offsetof", "kvm_debugregs.reserved"): 56,
    ("offsetof", "kvm_irqchip.chip_id"): 0,
    ("offsetof", "kvm_irqchip.chip"): 8,
    ("offsetof", "kvm_irqchip.chip.pic"): 8,
    ("offsetof", "kvm_irqchip.chip.ioapic"): 8,
    ("offsetof", "kvm_irqchip.chip.ioapic.redirtbl"): 32,
    ("offsetof", "kvm_pic_state.irq_base"): 5,
    ("offsetof", "kvm_pic_state.elcr"): 14,
    ("offsetof", "kvm_pic_state.elcr_mask"): 15,
    ("offsetof", "kvm_ioapic_state.ioregsel"): 8,
    ("offsetof", "kvm_ioapic_state.id"): 12,
    ("offsetof", "kvm_ioapic_state.irr"): 16,
    ("offsetof", "kvm_ioapic_state.redirtbl"): 24,
    ("offsetof", "kvm_ioapic_state.redirtbl[1]"): 32,
    ("offsetof", "kvm_ioapic_state.redirtbl[0].fields.reserved"): 27,
    ("offsetof", "kvm_ioapic_state.redirtbl[0].fields.dest_id"): 31,
    ("offsetof", "kvm_pit_channel_state.latched_count"): 4,
    ("offsetof", "kvm_pit_channel_state.status"): 8,
    ("offsetof", "kvm_pit_channel_state.rw_mode"): 12,
    ("offsetof", "kvm_pit_channel_state.mode"): 13,
    ("offsetof", "kvm_pit_channel_state.gate"): 15,
    ("offsetof", "kvm_pit_channel_state.count_load_time"): 16,
    ("offsetof", "kvm_pit_state2.channels"): 0,
    ("offsetof", "kvm_pit_state2.channels[1]"): 24,
    ("offsetof", "kvm_pit_state2.flags"): 72,
    ("offsetof", "kvm_pit_state2.reserved"): 76,
    ("offsetof", "kvm_clock_data.clock"): 0,
    ("offsetof", "kvm_clock_data.flags"): 8,
    ("offsetof", "kvm_clock_data.realtime"): 16,
    ("offsetof", "kvm_clock_data.host_tsc"): 24,
    ("offsetof", "kvm_clock_data.pad"): 32,
    ("offsetof", "kvm_userspace_memory_region.guest_phys_addr"): 8,
    ("offsetof", "kvm_userspace_memory_region.memory_size"): 16,
    ("offsetof", "kvm_userspace_memory_region.userspace_addr"): 24,
    ("offsetof", "kvm_irq_level.irq"): 0,
    ("offsetof", "kvm_irq_level.status"): 0,
    ("offsetof", "kvm_irq_level.level"): 4,
    ("offsetof", "kvm_irqfd.gsi"): 4,
    ("offsetof", "kvm_irqfd.flags"): 8,
    ("offsetof", "kvm_irqfd.resamplefd"): 12,
    ("offsetof", "kvm_ioeventfd.addr"): 8,
    ("offsetof", "kvm_ioeventfd.len"): 16,
    ("offsetof", "kvm_ioeventfd.fd"): 20,
    ("offsetof", "kvm_ioeventfd.flags"): 24,
    ("offsetof", "kvm_ioeventfd.pad"): 28,
    ("offsetof", "kvm_translation.physical_address"): 8,
    ("offsetof", "kvm_translation.valid"): 16,
    ("offsetof", "kvm_translation.writeable"): 17,
    ("offsetof", "kvm_translation.usermode"): 18,
    ("offsetof", "kvm_guest_debug.arch"): 8,
    ("offsetof", "kvm_dirty_log.dirty_bitmap"): 8,
    ("offsetof", "kvm_enable_cap.args"): 8,
    ("offsetof", "kvm_enable_cap.pad"): 40,
    ("offsetof", "kvm_irq_routing_entry.u"): 16,
    ("offsetof", "kvm_irq_routing_entry.u.msi.devid"): 28,
    ("offsetof", "kvm_irq_routing.entries"): 8,
    ("offsetof", "kvm_msi.devid"): 16,
    # ioctl
    ("ioctl", "KVM_GET_API_VERSION"): 0xae00,
    ("ioctl", "KVM_CREATE_VM"): 0xae01,
    ("ioctl", "KVM_GET_MSR_INDEX_LIST"): 0xc004ae02,
    ("ioctl", "KVM_CHECK_EXTENSION"): 0xae03,
    ("ioctl", "KVM_GET_VCPU_MMAP_SIZE"): 0xae04,
    ("ioctl", "KVM_GET_SUPPORTED_CPUID"): 0xc008ae05,
    ("ioctl", "KVM_GET_EMULATED_CPUID"): 0xc008ae09,
    ("ioctl", "KVM_GET_MSR_FEATURE_INDEX_LIST"): 0xc004ae0a,
    ("ioctl", "KVM_CREATE_VCPU"): 0xae41,
    ("ioctl", "KVM_GET_DIRTY_LOG"): 0x4010ae42,
    ("ioctl", "KVM_SET_USER_MEMORY_REGION"): 0x4020ae46,
    ("ioctl", "KVM_SET_TSS_ADDR"): 0xae47,
    ("ioctl", "KVM_SET_IDENTITY_MAP_ADDR"): 0x4008ae48,
    ("ioctl", "KVM_CREATE_IRQCHIP"): 0xae60,
    ("ioctl", "KVM_IRQ_LINE"): 0x4008ae61,
    ("ioctl", "KVM_GET_IRQCHIP"): 0xc208ae62,
    ("ioctl", "KVM_SET_IRQCHIP"): 0x8208ae63,
    ("ioctl", "KVM_IRQ_LINE_STATUS"): 0xc008ae67,
    ("ioctl", "KVM_SET_GSI_ROUTING"): 0x4008ae6a,
    ("ioctl", "KVM_IRQFD"): 0x4020ae76,
    ("ioctl", "KVM_CREATE_PIT2"): 0x4040ae77,
    ("ioctl", "KVM_IOEVENTFD"): 0x4040ae79,
    ("ioctl", "KVM_SET_CLOCK"): 0x4030ae7b,
    ("ioctl", "KVM_GET_CLOCK"): 0x8030ae7c,
    ("ioctl", "KVM_GET_PIT2"): 0x8070ae9f,
    ("ioctl", "KVM_SET_PIT2"): 0x4070aea0,
    ("ioctl", "KVM_SIGNAL_MSI"): 0x4020aea5,
    ("ioctl", "KVM_ENABLE_CAP"): 0x4068aea3,
    ("ioctl", "KVM_RUN"): 0xae80,
    ("ioctl", "KVM_GET_REGS"): 0x8090ae81,
    ("ioctl", "KVM_SET_REGS"): 0x4090ae82,
    ("ioctl", "KVM_GET_SREGS"): 0x8138ae83,
    ("ioctl", "KVM_SET_SREGS"): 0x4138ae84,
    ("ioctl", "KVM_TRANSLATE"): 0xc018ae85,
    ("ioctl", "KVM_INTERRUPT"): 0x4004ae86,
    ("ioctl", "KVM_GET_MSRS"): 0xc008ae88,
    ("ioctl", "KVM_SET_MSRS"): 0x4008ae89,
    ("ioctl", "KVM_GET_FPU"): 0x81a0ae8c,
    ("ioctl", "KVM_SET_FPU"): 0x41a0ae8d,
    ("ioctl", "KVM_GET_LAPIC"): 0x8400ae8e,
    ("ioctl", "KVM_SET_LAPIC"): 0x4400ae8f,
    ("ioctl", "KVM_SET_CPUID2"): 0x4008ae90,
    ("ioctl", "KVM_GET_CPUID2"): 0xc008ae91,
    ("ioctl", "KVM_GET_MP_STATE"): 0x8004ae98,
    ("ioctl", "KVM_SET_MP_STATE"): 0x4004ae99,
    ("ioctl", "KVM_NMI"): 0xae9a,
    ("ioctl", "KVM_SET_GUEST_DEBUG"): 0x4048ae9b,
    ("ioctl", "KVM_GET_VCPU_EVENTS"): 0x8040ae9f,
    ("ioctl", "KVM_SET_VCPU_EVENTS"): 0x4040aea0,
    ("ioctl", "KVM_GET_DEBUGREGS"): 0x8080aea1,
    ("ioctl", "KVM_SET_DEBUGREGS"): 0x4080aea2,
    ("ioctl", "KVM_SET_TSC_KHZ"): 0xaea2,
    ("ioctl", "KVM_GET_TSC_KHZ"): 0xaea3,
    ("ioctl", "KVM_GET_XSAVE"): 0x9000aea4,
    ("ioctl", "KVM_SET_XSAVE"): 0x5000aea5,
    ("ioctl", "KVM_GET_XCRS"): 0x8188aea6,
    ("ioctl", "KVM_SET_XCRS"): 0x4188aea7,
    ("ioctl", "KVM_KVMCLOCK_CTRL"): 0xaead,
    ("ioctl", "KVM_GET_XSAVE2"): 0x9000aecf,
    # const
    ("const", "KVM_API_VERSION"): 12,
    ("const", "KVMIO"): 174,
    ("const", "KVM_EXIT_UNKNOWN"): 0,
    ("const", "KVM_EXIT_EXCEPTION"): 1,
    ("const", "KVM_EXIT_IO"): 2,
    ("const", "KVM_EXIT_HYPERCALL"): 3,
    ("const", "KVM_EXIT_DEBUG"): 4,
    ("const", "KVM_EXIT_HLT"): 5,
    ("const", "KVM_EXIT_MMIO"): 6,
    ("const", "KVM_EXIT_IRQ_WINDOW_OPEN"): 7,
    ("const", "KVM_EXIT_SHUTDOWN"): 8,
    ("const", "KVM_EXIT_FAIL_ENTRY"): 9,
    ("const", "KVM_EXIT_INTR"): 10,
    ("const", "KVM_EXIT_SET_TPR"): 11,
    ("const", "KVM_EXIT_TPR_ACCESS"): 12,
    ("const", "KVM_EXIT_NMI"): 16,
    ("const", "KVM_EXIT_INTERNAL_ERROR"): 17,
    ("const", "KVM_EXIT_SYSTEM_EVENT"): 24,
    ("const", "KVM_EXIT_IOAPIC_EOI"): 26,
    ("const", "KVM_EXIT_X86_RDMSR"): 29,
    ("const", "KVM_EXIT_X86_WRMSR"): 30,
    ("const", "KVM_EXIT_DIRTY_RING_FULL"): 31,
    ("const", "KVM_EXIT_X86_BUS_LOCK"): 33,
    ("const", "KVM_EXIT_NOTIFY"): 37,
    ("const", "KVM_EXIT_IO_IN"): 0,
    ("const", "KVM_EXIT_IO_OUT"): 1,
    ("const", "KVM_INTERNAL_ERROR_EMULATION"): 1,
    ("const", "KVM_INTERNAL_ERROR_SIMUL_EX"): 2,
    ("const", "KVM_INTERNAL_ERROR_DELIVERY_EV"): 3,
    ("const", "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON"): 4,
    ("const", "KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES"): 1,
    ("const", "KVM_SYSTEM_EVENT_SHUTDOWN"): 1,
    ("const", "KVM_SYSTEM_EVENT_RESET"): 2,
    ("const", "KVM_SYSTEM_EVENT_CRASH"): 3,
    ("const", "KVM_SYSTEM_EVENT_WAKEUP"): 4,
    ("const", "KVM_SYSTEM_EVENT_SUSPEND"): 5,
    ("const", "KVM_SYSTEM_EVENT_SEV_TERM"): 6,
    ("const", "KVM_MP_STATE_RUNNABLE"): 0,
    ("const", "KVM_MP_STATE_UNINITIALIZED"): 1,
    ("const", "KVM_MP_STATE_INIT_RECEIVED"): 2,
    ("const", "KVM_MP_STATE_HALTED"): 3,
    ("const", "KVM_MP_STATE_SIPI_RECEIVED"): 4,
    ("const", "KVM_IRQCHIP_PIC_MASTER"): 0,
    ("const", "KVM_IRQCHIP_PIC_SLAVE"): 1,
    ("const", "KVM_IRQCHIP_IOAPIC"): 2,
    ("const", "KVM_NR_IRQCHIPS"): 3,
    ("const", "KVM_IOAPIC_NUM_PINS"): 24,
    ("const", "KVM_APIC_REG_SIZE"): 1024,
    ("const", "KVM_MAX_XCRS"): 16,
    ("const", "KVM_NR_INTERRUPTS"): 256,
    ("const", "KVM_PIO_PAGE_OFFSET"): 1,
    ("const", "SYNC_REGS_SIZE_BYTES"): 2048,
    ("const", "KVM_PIT_SPEAKER_DUMMY"): 1,
    ("const", "KVM_PIT_FLAGS_HPET_LEGACY"): 1,
    ("const", "KVM_PIT_FLAGS_SPEAKER_DATA_ON"): 2,
    ("const", "KVM_IRQFD_FLAG_DEASSIGN"): 1,
    ("const", "KVM_IRQFD_FLAG_RESAMPLE"): 2,
    ("const", "KVM_IOEVENTFD_FLAG_DATAMATCH"): 1,
    ("const", "KVM_IOEVENTFD_FLAG_PIO"): 2,
    ("const", "KVM_IOEVENTFD_FLAG_DEASSIGN"): 4,
    ("const", "KVM_CLOCK_TSC_STABLE"): 2,
    ("const", "KVM_CLOCK_REALTIME"): 4,
    ("const", "KVM_CLOCK_HOST_TSC"): 8,
    ("const", "KVM_MEM_LOG_DIRTY_PAGES"): 1,
    ("const", "KVM_MEM_READONLY"): 2,
    ("const", "KVM_VCPUEVENT_VALID_NMI_PENDING"): 1,
    ("const", "KVM_VCPUEVENT_VALID_SIPI_VECTOR"): 2,
    ("const", "KVM_VCPUEVENT_VALID_SHADOW"): 4,
    ("const", "KVM_VCPUEVENT_VALID_SMM"): 8,
    ("const", "KVM_VCPUEVENT_VALID_PAYLOAD"): 16,
    ("const", "KVM_VCPUEVENT_VALID_TRIPLE_FAULT"): 32,
    ("const", "KVM_X86_SHADOW_INT_MOV_SS"): 1,
    ("const", "KVM_X86_SHADOW_INT_STI"): 2,
    ("const", "KVM_CPUID_FLAG_SIGNIFCANT_INDEX"): 1,
    ("const", "KVM_CPUID_FLAG_STATEFUL_FUNC"): 2,
    ("const", "KVM_CPUID_FLAG_STATE_READ_NEXT"): 4,
    ("const", "KVM_SYNC_X86_REGS"): 1,
    ("const", "KVM_SYNC_X86_SREGS"): 2,
    ("const", "KVM_SYNC_X86_EVENTS"): 4,
    ("const", "KVM_RUN_X86_SMM"): 1,
    ("const", "KVM_RUN_X86_BUS_LOCK"): 2,
    ("const", "KVM_GUESTDBG_ENABLE"): 1,
    ("const", "KVM_GUESTDBG_SINGLESTEP"): 2,
    ("const", "KVM_GUESTDBG_USE_SW_BP"): 65536,
    ("const", "KVM_GUESTDBG_USE_HW_BP"): 131072,
    ("const", "KVM_GUESTDBG_INJECT_DB"): 262144,
    ("const", "KVM_GUESTDBG_INJECT_BP"): 524288,
    ("const", "KVM_IRQ_ROUTING_IRQCHIP"): 1,
    ("const", "KVM_IRQ_ROUTING_MSI"): 2,
    ("const", "KVM_CAP_IRQCHIP"): 0,
    ("const", "KVM_CAP_HLT"): 1,
    ("const", "KVM_CAP_USER_MEMORY"): 3,
    ("const", "KVM_CAP_SET_TSS_ADDR"): 4,
    ("const", "KVM_CAP_EXT_CPUID"): 7,
    ("const", "KVM_CAP_CLOCKSOURCE"): 8,
    ("const", "KVM_CAP_NR_VCPUS"): 9,
    ("const", "KVM_CAP_NR_MEMSLOTS"): 10,
    ("const", "KVM_CAP_NOP_IO_DELAY"): 12,
    ("const", "KVM_CAP_PV_MMU"): 13,
    ("const", "KVM_CAP_MP_STATE"): 14,
    ("const", "KVM_CAP_SYNC_MMU"): 16,
    ("const", "KVM_CAP_USER_NMI"): 22,
    ("const", "KVM_CAP_IRQ_ROUTING"): 25,
    ("const", "KVM_CAP_IRQ_INJECT_STATUS"): 26,
    ("const", "KVM_CAP_MCE"): 31,
    ("const", "KVM_CAP_IRQFD"): 32,
    ("const", "KVM_CAP_PIT2"): 33,
    ("const", "KVM_CAP_PIT_STATE2"): 35,
    ("const", "KVM_CAP_IOEVENTFD"): 36,
    ("const", "KVM_CAP_SET_IDENTITY_MAP_ADDR"): 37,
    ("const", "KVM_CAP_ADJUST_CLOCK"): 39,
    ("const", "KVM_CAP_INTERNAL_ERROR_DATA"): 40,
    ("const", "KVM_CAP_VCPU_EVENTS"): 41,
    ("const", "KVM_CAP_DEBUGREGS"): 50,
    ("const", "KVM_CAP_XSAVE"): 55,
    ("const", "KVM_CAP_XCRS"): 56,
    ("const", "KVM_CAP_TSC_CONTROL"): 60,
    ("const", "KVM_CAP_GET_TSC_KHZ"): 61,
    ("const", "KVM_CAP_MAX_VCPUS"): 66,
    ("const", "KVM_CAP_TSC_DEADLINE_TIMER"): 72,
    ("const", "KVM_CAP_KVMCLOCK_CTRL"): 76,
    ("const", "KVM_CAP_READONLY_MEM"): 81,
    ("const", "KVM_CAP_SPLIT_IRQCHIP"): 121,
    ("const", "KVM_CAP_MAX_VCPU_ID"): 128,
    ("const", "KVM_CAP_X2APIC_API"): 129,
    ("const", "KVM_CAP_IMMEDIATE_EXIT"): 136,
    ("const", "KVM_CAP_EXCEPTION_PAYLOAD"): 164,
    ("const", "KVM_CAP_XSAVE2"): 208,
    ("const", "KVM_CAP_SYSTEM_EVENT_DATA"): 215,
    ("const", "KVM_CAP_X86_TRIPLE_FAULT_EVENT"): 218,
}


def _field(cls, name):
    """(offset, type) of member ``name`` of ctypes struct/union ``cls``,
    looking through ``_anonymous_`` members like C does."""
    for f in cls._fields_:
        fname, ftype = f[0], f[1]
        if fname == name:
            return getattr(cls, fname).offset, ftype
    for anon in getattr(cls, "_anonymous_", ()):
        atype = dict((f[0], f[1]) for f in cls._fields_)[anon]
        try:
            off, t = _field(atype, name)
        except KeyError:
            continue
        return getattr(cls, anon).offset + off, t
    raise KeyError(f"{cls.__name__} has no member {name}")


def _offsetof(cls, path: str) -> int:
    off = 0
    for part in path.split("."):
        idx = None
        if part.endswith("]"):
            part, idx = part[:-1].split("[")
        o, cls = _field(cls, part)
        off += o
        if idx is not None:
            cls = cls._type_
            off += int(idx) * ctypes.sizeof(cls)
    return off


def python_value(kind: str, name: str) -> int:
    if kind == "sizeof":
        return ctypes.sizeof(getattr(uapi, name))
    if kind == "offsetof":
        struct, path = name.split(".", 1)
        return _offsetof(getattr(uapi, struct), path)
    if kind in ("ioctl", "const"):
        return getattr(uapi, name)
    raise ValueError(kind)


@pytest.mark.parametrize("kind,name", sorted(EXPECTED), ids=lambda v: v)
def test_pinned_abi(kind, name):
    assert python_value(kind, name) == EXPECTED[(kind, name)]


def _have_header() -> bool:
    if shutil.which("gcc") is None:
        return False
    r = subprocess.run(["gcc", "-E", "-x", "c", "-"], input="#include <linux/kvm.h>\n",
                       capture_output=True, text=True)
    return r.returncode == 0


@pytest.mark.skipif(not _have_header(), reason="needs gcc and <linux/kvm.h>")
def test_live_header_matches(tmp_path):
    exe = tmp_path / "kvm_abi"
    subprocess.run(["gcc", "-Wall", "-o", str(exe), str(ABI_C)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    live = {}
    for line in out.splitlines():
        kind, name, value = line.split()
        live[(kind, name)] = int(value)
    assert set(live) == set(EXPECTED), "kvm_abi.c and EXPECTED are out of sync"
    mismatches = {k: (v, python_value(*k)) for k, v in live.items() if python_value(*k) != v}
    assert not mismatches, f"(header, python) differ: {mismatches}"


# --- ioctl encoding ------------------------------------------------------------

def test_ioc_encoding():
    assert kio.KVMIO == 0xAE
    assert kio._IOC_WRITE == 1 and kio._IOC_READ == 2
    assert kio._IO(0xAE, 0x80) == 0xAE80
    req = kio._IOWR(0xAE, 0x88, 8)
    assert req == (3 << 30) | (8 << 16) | (0xAE << 8) | 0x88
    assert kio._IOC_DIR(req) == 3 and kio._IOC_SIZE(req) == 8
    assert kio._IOC_TYPE(req) == 0xAE and kio._IOC_NR(req) == 0x88
    assert kio._IOR(0xAE, 0x81, uapi.kvm_regs) == kio._IOR(0xAE, 0x81, 144)
    assert kio._IOW(0xAE, 0x81, 1) >> 30 == 1
    assert kio._IOR(0xAE, 0x81, 1) >> 30 == 2
    with pytest.raises(ValueError):
        kio._IOW(0xAE, 1, 1 << 14)


def test_ioctl_names_complete_and_unique():
    pinned = {name for kind, name in EXPECTED if kind == "ioctl"}
    assert set(uapi.IOCTL_NAMES) == pinned
    assert len(uapi.IOCTL_NAMES) == len(pinned)
    values = [getattr(uapi, n) for n in uapi.IOCTL_NAMES]
    assert len(set(values)) == len(values), "two ioctl names share a number"
    for n in uapi.IOCTL_NAMES:
        assert kio.ioctl_name(getattr(uapi, n)) == n
    assert kio.ioctl_name(0xDEAD) == "ioctl 0xdead"


def test_variable_size_factories():
    m = uapi.kvm_msrs_n(3)
    assert ctypes.sizeof(m) == 8 + 3 * 16 and m.entries.offset == 8
    assert uapi.kvm_msrs_n(3) is m          # cached
    assert ctypes.sizeof(uapi.kvm_msrs_n(0)) == ctypes.sizeof(uapi.kvm_msrs) == 8
    lst = uapi.kvm_msr_list_n(5)
    assert ctypes.sizeof(lst) == 4 + 5 * 4 and lst.indices.offset == 4
    c = uapi.kvm_cpuid2_n(2)
    assert ctypes.sizeof(c) == 8 + 2 * 40 and c.entries.offset == 8
    r = uapi.kvm_irq_routing_n(4)
    assert ctypes.sizeof(r) == 8 + 4 * 48 and r.entries.offset == 8
    buf = m(nmsrs=3)
    buf.entries[2].index = 0x10
    assert buf.nmsrs == 3 and buf.entries[2].index == 0x10
    with pytest.raises(ValueError):
        uapi.kvm_cpuid2_n(-1)


def test_ioapic_redirtbl_bitfields():
    e = uapi.kvm_ioapic_redirtbl()
    e.bits = (0x5A << 56) | (1 << 16) | (1 << 15) | (0b101 << 8) | 0x31
    f = e.fields
    assert (f.vector, f.delivery_mode, f.trig_mode, f.mask, f.dest_id) == (0x31, 0b101, 1, 1, 0x5A)
    assert (f.dest_mode, f.delivery_status, f.polarity, f.remote_irr) == (0, 0, 0, 0)


def test_anonymous_union_access():
    run = uapi.kvm_run()
    run.io.port = 0x3F8
    assert run.exit.io.port == 0x3F8
    run.system_event.data[0] = 7
    assert run.system_event.flags == 7
    lvl = uapi.kvm_irq_level(level=1)
    lvl.irq = 4
    assert lvl.status == 4


def test_ioctl_error_names_op():
    r, w = os.pipe()
    try:
        with pytest.raises(KvmError) as ei:
            ioctl(r, uapi.KVM_GET_API_VERSION)
        assert ei.value.op == "KVM_GET_API_VERSION"
        assert ei.value.errno in (errno.ENOTTY, errno.EINVAL)
        with pytest.raises(KvmError) as ei:
            ioctl(-1, uapi.KVM_RUN, op="KVM_RUN(vcpu0)")
        assert ei.value.op == "KVM_RUN(vcpu0)" and ei.value.errno == errno.EBADF
        regs = uapi.kvm_regs()
        with pytest.raises(KvmError) as ei:
            ioctl(-1, uapi.KVM_GET_REGS, ctypes.byref(regs))
        assert ei.value.op == "KVM_GET_REGS"
        with pytest.raises(KvmError) as ei:
            ioctl(-1, 0xC008AEFF, 0xFFFF_FFFF_FFFF_F000)   # big request and arg pass
        assert ei.value.op == "ioctl 0xc008aeff" and ei.value.errno == errno.EBADF
    finally:
        os.close(r)
        os.close(w)


# --- on this machine's /dev/kvm -------------------------------------------------

@pytest.mark.kvm
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm")
def test_dev_kvm_answers():
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    fds = []
    try:
        assert ioctl(kvm, uapi.KVM_GET_API_VERSION) == uapi.KVM_API_VERSION == 12
        size = ioctl(kvm, uapi.KVM_GET_VCPU_MMAP_SIZE)
        assert size >= ctypes.sizeof(uapi.kvm_run)
        for cap in (uapi.KVM_CAP_IRQCHIP, uapi.KVM_CAP_HLT, uapi.KVM_CAP_USER_MEMORY,
                    uapi.KVM_CAP_IOEVENTFD, uapi.KVM_CAP_IRQFD, uapi.KVM_CAP_IMMEDIATE_EXIT):
            assert ioctl(kvm, uapi.KVM_CHECK_EXTENSION, cap) > 0, cap

        # struct-pointer ioctls on the system fd (variable-size buffers)
        probe = uapi.kvm_msr_list_n(0)()
        with pytest.raises(KvmError) as ei:
            ioctl(kvm, uapi.KVM_GET_MSR_INDEX_LIST, ctypes.byref(probe))
        assert ei.value.errno == errno.E2BIG and probe.nmsrs > 0
        lst = uapi.kvm_msr_list_n(probe.nmsrs)(nmsrs=probe.nmsrs)
        ioctl(kvm, uapi.KVM_GET_MSR_INDEX_LIST, ctypes.byref(lst))
        assert 0x10 in list(lst.indices)                 # IA32_TSC
        cpuid = uapi.kvm_cpuid2_n(256)(nent=256)
        ioctl(kvm, uapi.KVM_GET_SUPPORTED_CPUID, ctypes.byref(cpuid))
        assert 0 < cpuid.nent <= 256
        assert any(e.function == 0 for e in cpuid.entries[:cpuid.nent])

        vm = ioctl(kvm, uapi.KVM_CREATE_VM, 0)
        fds.append(vm)
        xsave_size = ioctl(vm, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_XSAVE2)
        assert xsave_size == 0 or xsave_size >= 4096
        ioctl(vm, uapi.KVM_SET_TSS_ADDR, 0xFFFB_D000)    # arg > 2**31 as an int
        vcpu = ioctl(vm, uapi.KVM_CREATE_VCPU, 0)
        fds.append(vcpu)
        sregs = uapi.kvm_sregs()
        ioctl(vcpu, uapi.KVM_GET_SREGS, ctypes.byref(sregs))
        assert sregs.cs.selector == 0xF000 and sregs.cs.base == 0xFFFF0000
        regs = uapi.kvm_regs()
        ioctl(vcpu, uapi.KVM_GET_REGS, ctypes.byref(regs))
        assert regs.rip == 0xFFF0 and regs.rflags == 0x2
        ev = uapi.kvm_vcpu_events()
        ioctl(vcpu, uapi.KVM_GET_VCPU_EVENTS, ctypes.byref(ev))
        mp = uapi.kvm_mp_state()
        ioctl(vcpu, uapi.KVM_GET_MP_STATE, ctypes.byref(mp))
        assert mp.mp_state == uapi.KVM_MP_STATE_RUNNABLE
        with mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            run = uapi.kvm_run.from_buffer(m)
            assert run.exit_reason == uapi.KVM_EXIT_UNKNOWN
            del run
    finally:
        for fd in reversed(fds):
            os.close(fd)
        os.close(kvm)
