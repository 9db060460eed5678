/*
 * timer_irq: installs an IDT, starts a periodic timer and counts 10
 * interrupts in a `sti; hlt` loop, then prints "TICKS=10" and exits.
 * Command line:
 *   timer=apic   (default) LAPIC timer, vector 0x20, x2APIC MSRs when CPUID
 *                has x2APIC, else xAPIC MMIO; "apic=xapic" forces MMIO.
 *   timer=pit    i8254 channel 0 (100 Hz) through IOAPIC pins 0 and 2
 *                (vector 0x21), 8259s masked.
 *   count=N      LAPIC initial count (default 10000000: 10 ms at 1 GHz).
 */
#include "guest.h"

        .text
        .globl  main
main:
        push    %rbx
        PRINT   "TIMER TEST\n"
        call    idt_init
        lea     key_apic_xapic(%rip), %rdi
        call    cmdline_find
        xor     %edi, %edi
        test    %rax, %rax
        setnz   %dil
        call    apic_init
        PRINT   "APIC MODE="
        cmpb    $0, apic_x2(%rip)
        je      1f
        PRINT   "x2apic\n"
        jmp     2f
1:      PRINT   "xapic\n"
2:      lea     key_timer_pit(%rip), %rdi
        call    cmdline_find
        test    %rax, %rax
        jnz     pit

        PRINT   "SOURCE=lapic\n"
        lea     key_count(%rip), %rdi
        mov     $10000000, %esi
        call    cmdline_num
        mov     %eax, %edi
        call    apic_timer_start
        jmp     wait

pit:    PRINT   "SOURCE=pit\n"
        mov     $0, %edi
        mov     $VEC_IOAPIC, %esi
        call    ioapic_route
        mov     $2, %edi
        mov     $VEC_IOAPIC, %esi
        call    ioapic_route
        mov     $0x34, %al              /* channel 0, lobyte/hibyte, mode 2 */
        out     %al, $0x43
        mov     $11932, %eax            /* 1193182 Hz / 100 */
        out     %al, $0x40
        mov     %ah, %al
        out     %al, $0x40

wait:   sti
        hlt
        cli
        cmpq    $10, ticks(%rip)
        jb      wait
        call    apic_timer_stop
        mov     $0x30, %al              /* PIT channel 0 back to one-shot, no count */
        out     %al, $0x43
        PRINT   "TICKS=10\n"
        pop     %rbx
        ret

        .section .rodata
key_apic_xapic: .asciz "apic=xapic"
key_timer_pit:  .asciz "timer=pit"
key_count:      .asciz "count="
