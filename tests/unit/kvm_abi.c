/*
 * Prints the x86_64 KVM ABI as seen by <linux/kvm.h>, one "kind name value"
 * per line, for tests/unit/test_kvm_uapi.py:
 *     sizeof   <struct>            <bytes>
 *     offsetof <struct>.<member>   <bytes>
 *     ioctl    <KVM_NAME>          <number>
 *     const    <NAME>              <value>
 * Build: gcc -o kvm_abi tests/unit/kvm_abi.c
 */
#include <stddef.h>
#include <stdio.h>
#include <linux/kvm.h>

#define SZ(s)      printf("sizeof %s %zu\n", #s, sizeof(struct s))
#define OFF(s, m)  printf("offsetof %s.%s %zu\n", #s, #m, offsetof(struct s, m))
#define IOC(n)     printf("ioctl %s %lu\n", #n, (unsigned long)(n))
#define K(n)       printf("const %s %llu\n", #n, (unsigned long long)(n))

int main(void)
{
	SZ(kvm_regs); SZ(kvm_segment); SZ(kvm_dtable); SZ(kvm_sregs); SZ(kvm_fpu);
	SZ(kvm_xsave); SZ(kvm_xcr); SZ(kvm_xcrs); SZ(kvm_lapic_state);
	SZ(kvm_msr_entry); SZ(kvm_msrs); SZ(kvm_msr_list); SZ(kvm_cpuid_entry2);
	SZ(kvm_cpuid2); SZ(kvm_mp_state); SZ(kvm_vcpu_events); SZ(kvm_debugregs);
	SZ(kvm_pic_state); SZ(kvm_ioapic_state); SZ(kvm_irqchip);
	SZ(kvm_pit_channel_state); SZ(kvm_pit_state2); SZ(kvm_pit_config);
	SZ(kvm_clock_data); SZ(kvm_userspace_memory_region); SZ(kvm_irq_level);
	SZ(kvm_irqfd); SZ(kvm_ioeventfd); SZ(kvm_run); SZ(kvm_translation);
	SZ(kvm_guest_debug); SZ(kvm_guest_debug_arch); SZ(kvm_debug_exit_arch);
	SZ(kvm_sync_regs); SZ(kvm_interrupt); SZ(kvm_dirty_log); SZ(kvm_enable_cap);
	SZ(kvm_irq_routing_irqchip); SZ(kvm_irq_routing_msi);
	SZ(kvm_irq_routing_entry); SZ(kvm_irq_routing); SZ(kvm_msi);

	/* kvm_run header and exit union */
	OFF(kvm_run, request_interrupt_window); OFF(kvm_run, immediate_exit);
	OFF(kvm_run, exit_reason); OFF(kvm_run, ready_for_interrupt_injection);
	OFF(kvm_run, if_flag); OFF(kvm_run, flags); OFF(kvm_run, cr8);
	OFF(kvm_run, apic_base);
	OFF(kvm_run, hw); OFF(kvm_run, hw.hardware_exit_reason);
	OFF(kvm_run, fail_entry.hardware_entry_failure_reason);
	OFF(kvm_run, fail_entry.cpu);
	OFF(kvm_run, ex.exception); OFF(kvm_run, ex.error_code);
	OFF(kvm_run, io.direction); OFF(kvm_run, io.size); OFF(kvm_run, io.port);
	OFF(kvm_run, io.count); OFF(kvm_run, io.data_offset);
	OFF(kvm_run, debug.arch.exception); OFF(kvm_run, debug.arch.dr6);
	OFF(kvm_run, mmio.phys_addr); OFF(kvm_run, mmio.data); OFF(kvm_run, mmio.len);
	OFF(kvm_run, mmio.is_write);
	OFF(kvm_run, hypercall.nr); OFF(kvm_run, hypercall.ret);
	OFF(kvm_run, hypercall.longmode);
	OFF(kvm_run, internal.suberror); OFF(kvm_run, internal.ndata);
	OFF(kvm_run, internal.data);
	OFF(kvm_run, emulation_failure.flags); OFF(kvm_run, emulation_failure.insn_size);
	OFF(kvm_run, emulation_failure.insn_bytes);
	OFF(kvm_run, system_event.type); OFF(kvm_run, system_event.ndata);
	OFF(kvm_run, system_event.flags); OFF(kvm_run, system_event.data);
	OFF(kvm_run, msr.error); OFF(kvm_run, msr.reason); OFF(kvm_run, msr.index);
	OFF(kvm_run, msr.data);
	OFF(kvm_run, notify.flags);
	OFF(kvm_run, padding);
	OFF(kvm_run, kvm_valid_regs); OFF(kvm_run, kvm_dirty_regs); OFF(kvm_run, s);
	OFF(kvm_run, s.regs.regs); OFF(kvm_run, s.regs.sregs); OFF(kvm_run, s.regs.events);

	/* registers */
	OFF(kvm_regs, rsp); OFF(kvm_regs, r8); OFF(kvm_regs, rip); OFF(kvm_regs, rflags);
	OFF(kvm_segment, base); OFF(kvm_segment, limit); OFF(kvm_segment, selector);
	OFF(kvm_segment, type); OFF(kvm_segment, present); OFF(kvm_segment, dpl);
	OFF(kvm_segment, db); OFF(kvm_segment, s); OFF(kvm_segment, l);
	OFF(kvm_segment, g); OFF(kvm_segment, avl); OFF(kvm_segment, unusable);
	OFF(kvm_dtable, base); OFF(kvm_dtable, limit);
	OFF(kvm_sregs, cs); OFF(kvm_sregs, ds); OFF(kvm_sregs, es); OFF(kvm_sregs, fs);
	OFF(kvm_sregs, gs); OFF(kvm_sregs, ss); OFF(kvm_sregs, tr); OFF(kvm_sregs, ldt);
	OFF(kvm_sregs, gdt); OFF(kvm_sregs, idt); OFF(kvm_sregs, cr0); OFF(kvm_sregs, cr2);
	OFF(kvm_sregs, cr3); OFF(kvm_sregs, cr4); OFF(kvm_sregs, cr8); OFF(kvm_sregs, efer);
	OFF(kvm_sregs, apic_base); OFF(kvm_sregs, interrupt_bitmap);
	OFF(kvm_fpu, fcw); OFF(kvm_fpu, ftwx); OFF(kvm_fpu, last_opcode);
	OFF(kvm_fpu, last_ip); OFF(kvm_fpu, last_dp); OFF(kvm_fpu, xmm); OFF(kvm_fpu, mxcsr);
	OFF(kvm_xsave, region);
	OFF(kvm_xcrs, xcrs); OFF(kvm_xcrs, padding); OFF(kvm_xcr, value);
	OFF(kvm_lapic_state, regs);
	OFF(kvm_msrs, entries); OFF(kvm_msr_entry, data); OFF(kvm_msr_list, indices);
	OFF(kvm_cpuid2, entries); OFF(kvm_cpuid_entry2, flags); OFF(kvm_cpuid_entry2, eax);
	OFF(kvm_cpuid_entry2, edx); OFF(kvm_cpuid_entry2, padding);

	/* vcpu events */
	OFF(kvm_vcpu_events, exception.injected); OFF(kvm_vcpu_events, exception.nr);
	OFF(kvm_vcpu_events, exception.has_error_code);
	OFF(kvm_vcpu_events, exception.pending); OFF(kvm_vcpu_events, exception.error_code);
	OFF(kvm_vcpu_events, interrupt); OFF(kvm_vcpu_events, interrupt.nr);
	OFF(kvm_vcpu_events, interrupt.soft); OFF(kvm_vcpu_events, interrupt.shadow);
	OFF(kvm_vcpu_events, nmi); OFF(kvm_vcpu_events, nmi.pending);
	OFF(kvm_vcpu_events, nmi.masked);
	OFF(kvm_vcpu_events, sipi_vector); OFF(kvm_vcpu_events, flags);
	OFF(kvm_vcpu_events, smi); OFF(kvm_vcpu_events, smi.pending);
	OFF(kvm_vcpu_events, smi.smm_inside_nmi); OFF(kvm_vcpu_events, smi.latched_init);
	OFF(kvm_vcpu_events, triple_fault); OFF(kvm_vcpu_events, triple_fault.pending);
	OFF(kvm_vcpu_events, reserved); OFF(kvm_vcpu_events, exception_has_payload);
	OFF(kvm_vcpu_events, exception_payload);
	OFF(kvm_debugregs, dr6); OFF(kvm_debugregs, dr7); OFF(kvm_debugregs, flags);
	OFF(kvm_debugregs, reserved);

	/* irqchip / pit / clock */
	OFF(kvm_irqchip, chip_id); OFF(kvm_irqchip, chip); OFF(kvm_irqchip, chip.pic);
	OFF(kvm_irqchip, chip.ioapic); OFF(kvm_irqchip, chip.ioapic.redirtbl);
	OFF(kvm_pic_state, irq_base); OFF(kvm_pic_state, elcr); OFF(kvm_pic_state, elcr_mask);
	OFF(kvm_ioapic_state, ioregsel); OFF(kvm_ioapic_state, id); OFF(kvm_ioapic_state, irr);
	OFF(kvm_ioapic_state, redirtbl); OFF(kvm_ioapic_state, redirtbl[1]);
	OFF(kvm_ioapic_state, redirtbl[0].fields.reserved);
	OFF(kvm_ioapic_state, redirtbl[0].fields.dest_id);
	OFF(kvm_pit_channel_state, latched_count); OFF(kvm_pit_channel_state, status);
	OFF(kvm_pit_channel_state, rw_mode); OFF(kvm_pit_channel_state, mode);
	OFF(kvm_pit_channel_state, gate); OFF(kvm_pit_channel_state, count_load_time);
	OFF(kvm_pit_state2, channels); OFF(kvm_pit_state2, channels[1]);
	OFF(kvm_pit_state2, flags); OFF(kvm_pit_state2, reserved);
	OFF(kvm_clock_data, clock); OFF(kvm_clock_data, flags); OFF(kvm_clock_data, realtime);
	OFF(kvm_clock_data, host_tsc); OFF(kvm_clock_data, pad);

	/* misc */
	OFF(kvm_userspace_memory_region, guest_phys_addr);
	OFF(kvm_userspace_memory_region, memory_size);
	OFF(kvm_userspace_memory_region, userspace_addr);
	OFF(kvm_irq_level, irq); OFF(kvm_irq_level, status); OFF(kvm_irq_level, level);
	OFF(kvm_irqfd, gsi); OFF(kvm_irqfd, flags); OFF(kvm_irqfd, resamplefd);
	OFF(kvm_ioeventfd, addr); OFF(kvm_ioeventfd, len); OFF(kvm_ioeventfd, fd);
	OFF(kvm_ioeventfd, flags); OFF(kvm_ioeventfd, pad);
	OFF(kvm_translation, physical_address); OFF(kvm_translation, valid);
	OFF(kvm_translation, writeable); OFF(kvm_translation, usermode);
	OFF(kvm_guest_debug, arch); OFF(kvm_dirty_log, dirty_bitmap);
	OFF(kvm_enable_cap, args); OFF(kvm_enable_cap, pad);
	OFF(kvm_irq_routing_entry, u); OFF(kvm_irq_routing_entry, u.msi.devid);
	OFF(kvm_irq_routing, entries); OFF(kvm_msi, devid);

	/* ioctl numbers */
	IOC(KVM_GET_API_VERSION); IOC(KVM_CREATE_VM); IOC(KVM_GET_MSR_INDEX_LIST);
	IOC(KVM_CHECK_EXTENSION); IOC(KVM_GET_VCPU_MMAP_SIZE); IOC(KVM_GET_SUPPORTED_CPUID);
	IOC(KVM_GET_EMULATED_CPUID); IOC(KVM_GET_MSR_FEATURE_INDEX_LIST);
	IOC(KVM_CREATE_VCPU); IOC(KVM_GET_DIRTY_LOG); IOC(KVM_SET_USER_MEMORY_REGION);
	IOC(KVM_SET_TSS_ADDR); IOC(KVM_SET_IDENTITY_MAP_ADDR); IOC(KVM_CREATE_IRQCHIP);
	IOC(KVM_IRQ_LINE); IOC(KVM_GET_IRQCHIP); IOC(KVM_SET_IRQCHIP); IOC(KVM_IRQ_LINE_STATUS);
	IOC(KVM_SET_GSI_ROUTING); IOC(KVM_IRQFD); IOC(KVM_CREATE_PIT2); IOC(KVM_IOEVENTFD);
	IOC(KVM_SET_CLOCK); IOC(KVM_GET_CLOCK); IOC(KVM_GET_PIT2); IOC(KVM_SET_PIT2);
	IOC(KVM_SIGNAL_MSI); IOC(KVM_ENABLE_CAP);
	IOC(KVM_RUN); IOC(KVM_GET_REGS); IOC(KVM_SET_REGS); IOC(KVM_GET_SREGS);
	IOC(KVM_SET_SREGS); IOC(KVM_TRANSLATE); IOC(KVM_INTERRUPT); IOC(KVM_GET_MSRS);
	IOC(KVM_SET_MSRS); IOC(KVM_GET_FPU); IOC(KVM_SET_FPU); IOC(KVM_GET_LAPIC);
	IOC(KVM_SET_LAPIC); IOC(KVM_SET_CPUID2); IOC(KVM_GET_CPUID2); IOC(KVM_GET_MP_STATE);
	IOC(KVM_SET_MP_STATE); IOC(KVM_NMI); IOC(KVM_SET_GUEST_DEBUG);
	IOC(KVM_GET_VCPU_EVENTS); IOC(KVM_SET_VCPU_EVENTS); IOC(KVM_GET_DEBUGREGS);
	IOC(KVM_SET_DEBUGREGS); IOC(KVM_SET_TSC_KHZ); IOC(KVM_GET_TSC_KHZ);
	IOC(KVM_GET_XSAVE); IOC(KVM_SET_XSAVE); IOC(KVM_GET_XCRS); IOC(KVM_SET_XCRS);
	IOC(KVM_KVMCLOCK_CTRL); IOC(KVM_GET_XSAVE2);

	/* constants */
	K(KVM_API_VERSION); K(KVMIO);
	K(KVM_EXIT_UNKNOWN); K(KVM_EXIT_EXCEPTION); K(KVM_EXIT_IO); K(KVM_EXIT_HYPERCALL);
	K(KVM_EXIT_DEBUG); K(KVM_EXIT_HLT); K(KVM_EXIT_MMIO); K(KVM_EXIT_IRQ_WINDOW_OPEN);
	K(KVM_EXIT_SHUTDOWN); K(KVM_EXIT_FAIL_ENTRY); K(KVM_EXIT_INTR); K(KVM_EXIT_SET_TPR);
	K(KVM_EXIT_TPR_ACCESS); K(KVM_EXIT_NMI); K(KVM_EXIT_INTERNAL_ERROR);
	K(KVM_EXIT_SYSTEM_EVENT); K(KVM_EXIT_IOAPIC_EOI); K(KVM_EXIT_X86_RDMSR);
	K(KVM_EXIT_X86_WRMSR); K(KVM_EXIT_DIRTY_RING_FULL); K(KVM_EXIT_X86_BUS_LOCK);
	K(KVM_EXIT_NOTIFY);
	K(KVM_EXIT_IO_IN); K(KVM_EXIT_IO_OUT);
	K(KVM_INTERNAL_ERROR_EMULATION); K(KVM_INTERNAL_ERROR_SIMUL_EX);
	K(KVM_INTERNAL_ERROR_DELIVERY_EV); K(KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON);
	K(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES);
	K(KVM_SYSTEM_EVENT_SHUTDOWN); K(KVM_SYSTEM_EVENT_RESET); K(KVM_SYSTEM_EVENT_CRASH);
	K(KVM_SYSTEM_EVENT_WAKEUP); K(KVM_SYSTEM_EVENT_SUSPEND); K(KVM_SYSTEM_EVENT_SEV_TERM);
	K(KVM_MP_STATE_RUNNABLE); K(KVM_MP_STATE_UNINITIALIZED); K(KVM_MP_STATE_INIT_RECEIVED);
	K(KVM_MP_STATE_HALTED); K(KVM_MP_STATE_SIPI_RECEIVED);
	K(KVM_IRQCHIP_PIC_MASTER); K(KVM_IRQCHIP_PIC_SLAVE); K(KVM_IRQCHIP_IOAPIC);
	K(KVM_NR_IRQCHIPS); K(KVM_IOAPIC_NUM_PINS); K(KVM_APIC_REG_SIZE); K(KVM_MAX_XCRS);
	K(KVM_NR_INTERRUPTS); K(KVM_PIO_PAGE_OFFSET); K(SYNC_REGS_SIZE_BYTES);
	K(KVM_PIT_SPEAKER_DUMMY); K(KVM_PIT_FLAGS_HPET_LEGACY); K(KVM_PIT_FLAGS_SPEAKER_DATA_ON);
	K(KVM_IRQFD_FLAG_DEASSIGN); K(KVM_IRQFD_FLAG_RESAMPLE);
	K(KVM_IOEVENTFD_FLAG_DATAMATCH); K(KVM_IOEVENTFD_FLAG_PIO); K(KVM_IOEVENTFD_FLAG_DEASSIGN);
	K(KVM_CLOCK_TSC_STABLE); K(KVM_CLOCK_REALTIME); K(KVM_CLOCK_HOST_TSC);
	K(KVM_MEM_LOG_DIRTY_PAGES); K(KVM_MEM_READONLY);
	K(KVM_VCPUEVENT_VALID_NMI_PENDING); K(KVM_VCPUEVENT_VALID_SIPI_VECTOR);
	K(KVM_VCPUEVENT_VALID_SHADOW); K(KVM_VCPUEVENT_VALID_SMM);
	K(KVM_VCPUEVENT_VALID_PAYLOAD); K(KVM_VCPUEVENT_VALID_TRIPLE_FAULT);
	K(KVM_X86_SHADOW_INT_MOV_SS); K(KVM_X86_SHADOW_INT_STI);
	K(KVM_CPUID_FLAG_SIGNIFCANT_INDEX); K(KVM_CPUID_FLAG_STATEFUL_FUNC);
	K(KVM_CPUID_FLAG_STATE_READ_NEXT);
	K(KVM_SYNC_X86_REGS); K(KVM_SYNC_X86_SREGS); K(KVM_SYNC_X86_EVENTS);
	K(KVM_RUN_X86_SMM); K(KVM_RUN_X86_BUS_LOCK);
	K(KVM_GUESTDBG_ENABLE); K(KVM_GUESTDBG_SINGLESTEP); K(KVM_GUESTDBG_USE_SW_BP);
	K(KVM_GUESTDBG_USE_HW_BP); K(KVM_GUESTDBG_INJECT_DB); K(KVM_GUESTDBG_INJECT_BP);
	K(KVM_IRQ_ROUTING_IRQCHIP); K(KVM_IRQ_ROUTING_MSI);
	K(KVM_CAP_IRQCHIP); K(KVM_CAP_HLT); K(KVM_CAP_USER_MEMORY); K(KVM_CAP_SET_TSS_ADDR);
	K(KVM_CAP_EXT_CPUID); K(KVM_CAP_CLOCKSOURCE); K(KVM_CAP_NR_VCPUS);
	K(KVM_CAP_NR_MEMSLOTS); K(KVM_CAP_NOP_IO_DELAY); K(KVM_CAP_PV_MMU);
	K(KVM_CAP_MP_STATE); K(KVM_CAP_SYNC_MMU); K(KVM_CAP_USER_NMI);
	K(KVM_CAP_IRQ_ROUTING); K(KVM_CAP_IRQ_INJECT_STATUS); K(KVM_CAP_MCE);
	K(KVM_CAP_IRQFD); K(KVM_CAP_PIT2); K(KVM_CAP_PIT_STATE2); K(KVM_CAP_IOEVENTFD);
	K(KVM_CAP_SET_IDENTITY_MAP_ADDR); K(KVM_CAP_ADJUST_CLOCK);
	K(KVM_CAP_INTERNAL_ERROR_DATA); K(KVM_CAP_VCPU_EVENTS); K(KVM_CAP_DEBUGREGS);
	K(KVM_CAP_XSAVE); K(KVM_CAP_XCRS); K(KVM_CAP_TSC_CONTROL); K(KVM_CAP_GET_TSC_KHZ);
	K(KVM_CAP_MAX_VCPUS); K(KVM_CAP_TSC_DEADLINE_TIMER); K(KVM_CAP_KVMCLOCK_CTRL);
	K(KVM_CAP_READONLY_MEM); K(KVM_CAP_SPLIT_IRQCHIP); K(KVM_CAP_MAX_VCPU_ID);
	K(KVM_CAP_X2APIC_API); K(KVM_CAP_IMMEDIATE_EXIT); K(KVM_CAP_EXCEPTION_PAYLOAD);
	K(KVM_CAP_XSAVE2); K(KVM_CAP_SYSTEM_EVENT_DATA); K(KVM_CAP_X86_TRIPLE_FAULT_EVENT);
	return 0;
}
