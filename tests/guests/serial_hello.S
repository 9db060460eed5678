/*
 * serial_hello: prints "HELLO FROM GUEST", reads one line from the 8250
 * (polling LSR.DR), echoes it back as "ECHO:<line>" and exits through the
 * i8042 reset. Proves: ELF loading, the 64-bit entry contract, serial output
 * and input, the i8042 exit.
 */
#include "guest.h"

        .text
        .globl  main
main:
        push    %rbx
        PRINT   "HELLO FROM GUEST\n"
        lea     line(%rip), %rbx
1:      call    getc
        cmp     $'\n', %al
        je      2f
        cmp     $'\r', %al
        je      2f
        lea     line(%rip), %rcx
        lea     255(%rcx), %rcx
        cmp     %rcx, %rbx
        jae     1b                      /* line full: drop the rest */
        mov     %al, (%rbx)
        inc     %rbx
        jmp     1b
2:      movb    $0, (%rbx)
        PRINT   "ECHO:"
        lea     line(%rip), %rdi
        call    puts
        PRINT   "\n"
        pop     %rbx
        ret

        .bss
line:   .skip   256
