/*
 * pci_rng: drives a virtio-rng-pci function at 00:<dev>.0 of a q35
 * (command line "dev=N", default 3) through MSI-X, as a driver does with
 * no firmware: places BAR 1 (MSI-X table) at 0xc0000000 and BAR 4
 * (virtio structures) at 0xc0010000 through 0xCF8/0xCFC, turns on
 * memory decode and bus mastering, points MSI-X vector 0 at the LAPIC
 * (vector 0x40) and enables MSI-X, negotiates VIRTIO_F_VERSION_1 and sets
 * queue 0 up with MSI-X vector 0. Then, per byte read from the serial:
 *   'r'  posts one 16-byte buffer, rings the queue's doorbell (BAR 4 +
 *        0x3000) and waits (sti; hlt) for the MSI-X interrupt, then prints
 *        "RNG IRQS=<interrupts so far> USED=<used ring index>"
 *   'q'  exits
 * and "READY" each time it waits for a byte. Everything it keeps (ring
 * indexes, the interrupt count) is guest memory and registers: a template
 * taken while it waits and restored continues the count, through the BARs
 * and the doorbell as the template's guest programmed them.
 */
#include "guest.h"

#define CF8             0xcf8
#define CFC             0xcfc
#define BAR1_ADDR       0xc0000000
#define BAR4_ADDR       0xc0010000
#define VEC_MSIX        0x40

/* common config (virtio 1.1 4.1.4.3) */
#define C_DFSELECT      0x00
#define C_DF            0x04
#define C_GFSELECT      0x08
#define C_GF            0x0c
#define C_MSIX          0x10
#define C_STATUS        0x14
#define C_Q_SELECT      0x16
#define C_Q_SIZE        0x18
#define C_Q_MSIX        0x1a
#define C_Q_ENABLE      0x1c
#define C_Q_NOFF        0x1e
#define C_Q_DESCLO      0x20
#define C_Q_DESCHI      0x24
#define C_Q_AVAILLO     0x28
#define C_Q_AVAILHI     0x2c
#define C_Q_USEDLO      0x30
#define C_Q_USEDHI      0x34
#define NOTIFY          0x3000

#define QSIZE           8
#define RING_AVAIL      0x100
#define RING_USED       0x200

        .text
        .globl  main
main:
        push    %rbx
        push    %r12
        push    %r13
        PRINT   "PCI-RNG TEST\n"
        call    idt_init
        mov     $VEC_MSIX, %edi
        lea     msix_isr(%rip), %rsi
        call    set_gate
        xor     %edi, %edi
        call    apic_init
        lea     key_dev(%rip), %rdi
        mov     $3, %esi
        call    cmdline_num
        mov     %eax, %r12d             /* r12 = device number */

        mov     %r12d, %edi
        xor     %edx, %edx
        call    cf8_read
        cmp     $0x10441af4, %eax
        je      1f
        PRINT   "NO VIRTIO-RNG-PCI\n"
        jmp     99f

        /* --- BARs, decode, bus mastering --- */
1:      mov     %r12d, %edi
        mov     $0x14, %edx
        mov     $BAR1_ADDR, %ecx
        call    cf8_write
        mov     %r12d, %edi
        mov     $0x20, %edx
        mov     $BAR4_ADDR, %ecx
        call    cf8_write
        mov     %r12d, %edi
        mov     $0x24, %edx
        xor     %ecx, %ecx
        call    cf8_write
        mov     %r12d, %edi
        mov     $0x04, %edx
        mov     $0x6, %ecx              /* memory + bus master */
        call    cf8_write

        /* --- MSI-X: vector 0 -> LAPIC 0, VEC_MSIX; enable --- */
        mov     $BAR1_ADDR, %eax
        movl    $0xfee00000, (%rax)
        movl    $0, 4(%rax)
        movl    $VEC_MSIX, 8(%rax)
        movl    $0, 12(%rax)            /* unmasked */
        mov     %r12d, %edi
        mov     $0x34, %edx
        call    cf8_read
        movzbl  %al, %r13d              /* r13 = capability pointer */
2:      test    %r13d, %r13d
        jz      3f
        mov     %r12d, %edi
        mov     %r13d, %edx
        call    cf8_read
        cmp     $0x11, %al
        je      4f
        shr     $8, %eax
        movzbl  %al, %r13d
        and     $0xfc, %r13d
        jmp     2b
3:      PRINT   "NO MSI-X CAPABILITY\n"
        jmp     99f
4:      or      $0x80000000, %eax       /* Message Control: enable */
        mov     %eax, %ecx
        mov     %r12d, %edi
        mov     %r13d, %edx
        call    cf8_write

        /* --- virtio: negotiate VERSION_1 only, queue 0 on vector 0 --- */
        mov     $BAR4_ADDR, %ebx
        movb    $0, C_STATUS(%rbx)
        movb    $1, C_STATUS(%rbx)
        movb    $3, C_STATUS(%rbx)
        movl    $1, C_GFSELECT(%rbx)
        movl    $1, C_GF(%rbx)          /* bit 32: VIRTIO_F_VERSION_1 */
        movl    $0, C_GFSELECT(%rbx)
        movl    $0, C_GF(%rbx)
        movb    $0xb, C_STATUS(%rbx)
        testb   $8, C_STATUS(%rbx)
        jnz     5f
        PRINT   "FEATURES_OK REFUSED\n"
        jmp     99f
5:      movw    $0xffff, C_MSIX(%rbx)   /* no config vector */
        movw    $0, C_Q_SELECT(%rbx)
        movw    $QSIZE, C_Q_SIZE(%rbx)
        movw    $0, C_Q_MSIX(%rbx)
        cmpw    $0, C_Q_MSIX(%rbx)
        je      6f
        PRINT   "VECTOR REFUSED\n"
        jmp     99f
6:      lea     ring(%rip), %rax
        mov     %eax, C_Q_DESCLO(%rbx)
        movl    $0, C_Q_DESCHI(%rbx)
        add     $RING_AVAIL, %eax
        mov     %eax, C_Q_AVAILLO(%rbx)
        movl    $0, C_Q_AVAILHI(%rbx)
        add     $RING_USED - RING_AVAIL, %eax
        mov     %eax, C_Q_USEDLO(%rbx)
        movl    $0, C_Q_USEDHI(%rbx)
        movw    $1, C_Q_ENABLE(%rbx)
        movb    $0xf, C_STATUS(%rbx)
        PRINT   "MSIX ON\n"

        /* --- serve the serial's commands --- */
10:     PRINT   "READY\n"
        call    getc
        cmp     $'q', %eax
        je      99f
        cmp     $'r', %eax
        jne     10b
        call    request
        PRINT   "RNG IRQS="
        PRINTDEC msix_count(%rip)
        PRINT   " USED="
        lea     ring(%rip), %rax
        movzwl  RING_USED + 2(%rax), %edi
        call    putdec
        PRINT   "\n"
        jmp     10b

99:     pop     %r13
        pop     %r12
        pop     %rbx
        ret

/* request: one write-only buffer on queue 0, doorbell, wait for the MSI-X */
request:
        lea     ring(%rip), %rdx
        lea     buf(%rip), %rax
        mov     %rax, (%rdx)            /* desc 0: addr */
        movl    $16, 8(%rdx)            /* len */
        movw    $2, 12(%rdx)            /* VIRTQ_DESC_F_WRITE */
        movw    $0, 14(%rdx)
        movzwl  RING_AVAIL + 2(%rdx), %eax
        mov     %eax, %ecx
        and     $QSIZE - 1, %ecx
        movw    $0, RING_AVAIL + 4(%rdx,%rcx,2)
        inc     %eax
        mfence
        mov     %ax, RING_AVAIL + 2(%rdx)
        mfence
        mov     msix_count(%rip), %r8
        mov     $BAR4_ADDR, %eax
        movw    $0, NOTIFY(%rax)        /* queue 0's doorbell (notify_off 0) */
1:      cli
        cmp     msix_count(%rip), %r8
        jne     2f
        sti
        hlt
        jmp     1b
2:      sti
        ret

msix_isr:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        incq    msix_count(%rip)
        call    apic_eoi
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rdi
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        iretq

/* cf8_read(dev=edi, reg=edx) -> eax, bus 0 function 0 */
cf8_read:
        call    cf8_addr
        mov     $CFC, %dx
        in      %dx, %eax
        ret

/* cf8_write(dev=edi, reg=edx, value=ecx) */
cf8_write:
        call    cf8_addr
        mov     %ecx, %eax
        mov     $CFC, %dx
        out     %eax, %dx
        ret

cf8_addr:
        mov     %edi, %eax
        shl     $11, %eax
        and     $0xfc, %edx
        or      %edx, %eax
        or      $0x80000000, %eax
        mov     $CF8, %dx
        out     %eax, %dx
        ret

        .section .rodata
key_dev:        .asciz "dev="

        .bss
        .balign 4096
ring:           .skip 4096
buf:            .skip 16
        .balign 8
msix_count:     .skip 8
