/* Shared constants and macros of the stratopy test guests (GNU as, AT&T). */
#ifndef GUEST_H
#define GUEST_H

#define COM1            0x3f8
#define LSR_DR          0x01
#define LSR_THRE        0x20
#define I8042_CMD       0x64

#define BP_E820_ENTRIES 0x1e8
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE   0x2d0

#define COUNTER_ADDR    0x300000

/* LAPIC register offsets (xAPIC MMIO offset; x2APIC MSR = 0x800 + off/16) */
#define APIC_ID         0x020
#define APIC_TPR        0x080
#define APIC_EOI        0x0b0
#define APIC_SVR        0x0f0
#define APIC_LVT_TIMER  0x320
#define APIC_TIMER_INIT 0x380
#define APIC_TIMER_CUR  0x390
#define APIC_TIMER_DIV  0x3e0
#define XAPIC_BASE      0xfee00000
#define IOAPIC_BASE     0xfec00000

#define VEC_TIMER       0x20
#define VEC_IOAPIC      0x21
#define VEC_SPURIOUS    0xff

/* PRINT "text\n": print a string literal on the serial port.
   Clobbers the caller-saved registers (rax rcx rdx rsi rdi r8-r11). */
.macro PRINT s
        .pushsection .rodata.str, "a"
990:    .asciz "\s"
        .popsection
        lea     990b(%rip), %rdi
        call    puts
.endm

/* PRINTHEX reg: print a 64-bit value as 0x%016x. */
.macro PRINTHEX r
        mov     \r, %rdi
        call    puthex
.endm

/* PRINTDEC reg: print an unsigned value in decimal. */
.macro PRINTDEC r
        mov     \r, %rdi
        call    putdec
.endm

#endif
