/*
 * memcheck: proves guest RAM survives pause / snapshot / restore.
 *
 *  1. Prints the e820 table from boot_params ("E820 addr size type"), then
 *     "RAM=<bytes> TOP=0x<end of highest RAM>".
 *  2. Fills [base, base + mib MiB) (cmdline "base=", default 0x1000000;
 *     "mib=", default 16; inside the mapped RAM: the first 1 GiB, or
 *     4-5 GiB) page by page: every qword of page p (its address)
 *     holds  pattern ^ (p * 0x9e3779b97f4a7c15),  pattern = cmdline
 *     "pattern=" (default 0x5a5a5a5a5a5a5a5a). Prints "FILLED pattern=...".
 *  3. Verifies, prints "CHECK ok=1 sum=0x... passes=N", then halts in a
 *     `sti; hlt` loop woken by the LAPIC timer every 100 ms. Every "every="
 *     ticks (default 50, i.e. 5 s) it re-verifies the whole range (a mismatch prints "CORRUPT at 0x..").
 *     Each serial byte received prints a fresh "CHECK ok=<0|1> sum=..
 *     passes=N" line; 'q' exits.
 *
 *  sum: for each page in order, sum = rol(sum, 1) ^ first qword of the page
 *  (read back from memory), starting from 0.  ok=1 iff every qword of every
 *  page holds its expected value (repe scasq).
 */
#include "guest.h"

        .text
        .globl  main
main:
        push    %rbx
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        PRINT   "MEMCHECK\n"
        /* --- e820 --- */
        mov     boot_params(%rip), %r12
        movzbl  BP_E820_ENTRIES(%r12), %r13d
        lea     BP_E820_TABLE(%r12), %r12
        xor     %r14d, %r14d            /* RAM bytes */
        xor     %r15d, %r15d            /* top */
1:      test    %r13d, %r13d
        jz      3f
        PRINT   "E820 "
        PRINTHEX (%r12)
        PRINT   " "
        PRINTHEX 8(%r12)
        PRINT   " "
        mov     16(%r12), %eax
        PRINTDEC %rax
        PRINT   "\n"
        cmpl    $1, 16(%r12)
        jne     2f
        add     8(%r12), %r14
        mov     (%r12), %rax
        add     8(%r12), %rax
        cmp     %r15, %rax
        jbe     2f
        mov     %rax, %r15
2:      add     $20, %r12
        dec     %r13d
        jmp     1b
3:      PRINT   "RAM="
        PRINTDEC %r14
        PRINT   " TOP="
        PRINTHEX %r15
        PRINT   "\n"

        /* --- parameters --- */
        lea     key_pattern(%rip), %rdi
        movabs  $0x5a5a5a5a5a5a5a5a, %rsi
        call    cmdline_num
        mov     %rax, pattern(%rip)
        lea     key_base(%rip), %rdi
        mov     $0x1000000, %esi
        call    cmdline_num
        and     $~0xfff, %rax
        mov     %rax, base(%rip)
        lea     key_mib(%rip), %rdi
        mov     $16, %esi
        call    cmdline_num
        shl     $8, %rax                /* MiB -> pages */
        push    %rax
        lea     key_every(%rip), %rdi
        mov     $50, %esi
        call    cmdline_num
        mov     %rax, every(%rip)
        pop     %rax
        mov     %rax, npages(%rip)
        shl     $12, %rax
        add     base(%rip), %rax
        cmp     %r15, %rax
        jbe     4f
        PRINT   "RANGE BEYOND RAM\n"
        jmp     99f
        /* mapped RAM: the first 1 GiB, and 4-5 GiB (common.S map_high) */
4:      cmp     $0x40000000, %rax
        jbe     5f
        movabs  $0x100000000, %rdx
        cmp     %rdx, base(%rip)
        jb      3f
        movabs  $0x140000000, %rdx
        cmp     %rdx, %rax
        jbe     5f
3:      PRINT   "RANGE OUTSIDE THE MAPPED RAM (0-1 GiB, 4-5 GiB)\n"
        jmp     99f

        /* --- fill --- */
5:      mov     base(%rip), %rdx
        xor     %r8d, %r8d              /* page index */
        movabs  $0x9e3779b97f4a7c15, %r9
6:      cmp     npages(%rip), %r8
        jae     7f
        mov     %r8, %rax
        imul    %r9, %rax
        xor     pattern(%rip), %rax
        mov     %rdx, %rdi
        mov     $512, %ecx
        rep stosq
        add     $4096, %rdx
        inc     %r8
        jmp     6b
7:      PRINT   "FILLED pattern="
        PRINTHEX pattern(%rip)
        PRINT   " base="
        PRINTHEX base(%rip)
        PRINT   " pages="
        PRINTDEC npages(%rip)
        PRINT   "\n"
        call    verify
        call    report

        /* --- idle loop --- */
        call    idt_init
        xor     %edi, %edi
        call    apic_init
        mov     $100000000, %edi        /* 100 ms at 1 GHz */
        call    apic_timer_start
        xor     %r12d, %r12d            /* tick of the last verification */
10:     sti
        hlt
        cli
        call    serial_poll
        test    %eax, %eax
        jz      12f
        call    getc
        cmp     $'q', %al
        je      98f
        call    verify
        call    report
        mov     ticks(%rip), %r12
12:     mov     ticks(%rip), %rax
        sub     %r12, %rax
        cmp     every(%rip), %rax
        jb      10b
        mov     ticks(%rip), %r12
        call    verify
        jmp     10b

98:     call    apic_timer_stop
99:     pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbx
        ret

/* verify: ok = every qword as expected (CORRUPT line at the first bad
   page), sum recomputed from memory, passes++. */
verify:
        push    %rbx
        push    %r12
        movq    $1, ok(%rip)
        xor     %ebx, %ebx              /* sum */
        xor     %r8d, %r8d
        mov     base(%rip), %r10
        movabs  $0x9e3779b97f4a7c15, %r9
1:      cmp     npages(%rip), %r8
        jae     3f
        rol     $1, %rbx
        xor     (%r10), %rbx
        mov     %r8, %rax
        imul    %r9, %rax
        xor     pattern(%rip), %rax
        mov     %r10, %rdi
        mov     $512, %ecx
        repe scasq
        je      2f
        cmpq    $0, ok(%rip)
        je      2f
        movq    $0, ok(%rip)
        lea     -8(%rdi), %r12
        push    %r8
        push    %r9
        push    %r10
        PRINT   "CORRUPT at "
        PRINTHEX %r12
        PRINT   "\n"
        pop     %r10
        pop     %r9
        pop     %r8
2:      add     $4096, %r10
        inc     %r8
        jmp     1b
3:      mov     %rbx, sum(%rip)
        incq    passes(%rip)
        pop     %r12
        pop     %rbx
        ret

report:
        PRINT   "CHECK ok="
        PRINTDEC ok(%rip)
        PRINT   " sum="
        PRINTHEX sum(%rip)
        PRINT   " passes="
        PRINTDEC passes(%rip)
        PRINT   "\n"
        ret

        .section .rodata
key_pattern:    .asciz "pattern="
key_base:       .asciz "base="
key_mib:        .asciz "mib="
key_every:      .asciz "every="

        .bss
        .balign 8
pattern:        .skip 8
base:           .skip 8
npages:         .skip 8
every:          .skip 8
ok:             .skip 8
sum:            .skip 8
passes:         .skip 8
