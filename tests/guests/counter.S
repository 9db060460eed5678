/*
 * counter: increments the 64-bit counter at COUNTER_ADDR (0x300000) in a
 * tight loop. Every 2^poll iterations (cmdline "poll=N", default 16) it looks
 * at the serial port; for each byte received it prints "COUNT=0x<value>",
 * 'q' exits. Used to prove that `stop` pauses the vCPU (the counter in the
 * guest memory stops advancing) and that the guest runs on after `cont` or
 * a restore from a template.
 */
#include "guest.h"

        .text
        .globl  main
main:
        push    %rbx
        push    %r12
        lea     key_poll(%rip), %rdi
        mov     $16, %esi
        call    cmdline_num
        mov     %eax, %ecx
        mov     $1, %r12d
        shl     %cl, %r12
        dec     %r12                    /* poll mask */
        movq    $0, COUNTER_ADDR
        PRINT   "COUNTER AT 0x300000 READY\n"
        xor     %ebx, %ebx
1:      incq    COUNTER_ADDR
        inc     %rbx
        test    %r12, %rbx
        jnz     1b
        call    serial_poll
        test    %eax, %eax
        jz      1b
        call    getc
        cmp     $'q', %al
        je      9f
        PRINT   "COUNT="
        PRINTHEX COUNTER_ADDR
        PRINT   "\n"
        jmp     1b
9:      PRINT   "FINAL COUNT="
        PRINTHEX COUNTER_ADDR
        PRINT   "\n"
        pop     %r12
        pop     %rbx
        ret

        .section .rodata
key_poll: .asciz "poll="
