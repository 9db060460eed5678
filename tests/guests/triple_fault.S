/*
 * triple_fault: loads an IDT with limit 0 and executes ud2. #UD cannot be
 * delivered (#GP), neither can #GP (#DF), nor #DF: triple fault, which KVM
 * reports as KVM_EXIT_SHUTDOWN. The monitor must end the VM (SHUTDOWN), not
 * hang or restart the guest.
 */
#include "guest.h"

        .text
        .globl  main
main:
        PRINT   "TRIPLE FAULT NOW\n"
        lidt    null_idtr(%rip)
        ud2
        PRINT   "STILL ALIVE AFTER UD2\n"
        ret

        .section .rodata
        .balign 8
null_idtr:
        .word   0
        .quad   0
