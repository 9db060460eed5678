/*
 * pci_walk: walks PCI bus 0 of a q35 twice, through the 0xCF8/0xCFC ports
 * and through the ECAM window at 0xb0000000 (MCFG's), and prints per
 * function found:
 *     "PCI <dev>.<fn> ID=<device><vendor> ECAM=<same read through ECAM>"
 *     "BAR <n> SIZE=<size, 64-bit hex> <IO|M32|M64>"   for each BAR
 * (the sizing protocol: write all ones, read back, restore), then
 * "ECAM WRITE OK" when a value written through CF8 reads back through ECAM,
 * and "WALK DONE <functions found>". Functions 1-7 are probed only when
 * function 0 says multifunction.
 */
#include "guest.h"

#define CF8             0xcf8
#define CFC             0xcfc
#define ECAM            0xb0000000

        .text
        .globl  main
main:
        push    %rbx
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        call    map_ecam
        xor     %r15d, %r15d            /* functions found */
        xor     %r12d, %r12d            /* dev */
1:      xor     %r13d, %r13d            /* fn */
2:      mov     %r12d, %edi
        mov     %r13d, %esi
        xor     %edx, %edx
        call    cf8_read
        cmp     $0xffffffff, %eax
        je      5f
        mov     %eax, %r14d
        inc     %r15d
        PRINT   "PCI "
        mov     %r12d, %edi
        call    puthex8
        PRINT   "."
        mov     %r13d, %edi
        call    puthex8
        PRINT   " ID="
        mov     %r14d, %edi
        call    puthex32
        PRINT   " ECAM="
        mov     %r12d, %edi
        mov     %r13d, %esi
        xor     %edx, %edx
        call    ecam_addr
        mov     (%rax), %edi
        call    puthex32
        PRINT   "\n"
        /* BARs of a type 0 header (type 1: bridges have 2) */
        mov     %r12d, %edi
        mov     %r13d, %esi
        mov     $0x0c, %edx
        call    cf8_read
        shr     $16, %eax
        and     $0x7f, %eax
        mov     $6, %ecx
        test    %eax, %eax
        jz      3f
        mov     $2, %ecx
3:      xor     %ebx, %ebx
4:      push    %rcx
        mov     %ebx, %edx
        call    size_bar                /* ebx: bar index; skips the high half */
        pop     %rcx
        inc     %ebx
        cmp     %ecx, %ebx
        jb      4b
        /* only function 0 of a single-function device */
        test    %r13d, %r13d
        jnz     5f
        mov     %r12d, %edi
        xor     %esi, %esi
        mov     $0x0c, %edx
        call    cf8_read
        test    $0x800000, %eax
        jz      6f
5:      inc     %r13d
        cmp     $8, %r13d
        jb      2b
6:      inc     %r12d
        cmp     $32, %r12d
        jb      1b

        /* a write through CF8 (interrupt line of 00:00.0) seen through ECAM */
        xor     %edi, %edi
        xor     %esi, %esi
        mov     $0x3c, %edx
        mov     $0x5a, %ecx
        call    cf8_write
        xor     %edi, %edi
        xor     %esi, %esi
        mov     $0x3c, %edx
        call    ecam_addr
        movzbl  (%rax), %eax
        cmp     $0x5a, %eax
        jne     7f
        PRINT   "ECAM WRITE OK\n"
7:      PRINT   "WALK DONE "
        mov     %r15, %rdi
        call    putdec
        PRINT   "\n"
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbx
        ret

/* size_bar: r12d dev, r13d fn, ebx BAR index. Prints its size; for a
   64-bit BAR sizes both halves and advances ebx past the high one. */
size_bar:
        push    %rbp
        lea     0x10(,%rbx,4), %ebp     /* register offset */
        mov     %r12d, %edi
        mov     %r13d, %esi
        mov     %ebp, %edx
        mov     $0xffffffff, %ecx
        call    cf8_write
        mov     %r12d, %edi
        mov     %r13d, %esi
        mov     %ebp, %edx
        call    cf8_read
        mov     %eax, %r8d              /* low half as read back */
        push    %r8
        mov     %r12d, %edi
        mov     %r13d, %esi
        mov     %ebp, %edx
        xor     %ecx, %ecx
        call    cf8_write
        pop     %r8
        test    %r8d, %r8d
        jz      9f                      /* not implemented */
        test    $1, %r8d
        jnz     8f
        mov     %r8d, %eax
        and     $6, %eax
        cmp     $4, %eax
        je      7f
        /* 32-bit memory */
        mov     %r8d, %eax
        and     $0xfffffff0, %eax
        neg     %eax
        mov     %eax, %r9d
        mov     $'3', %r10d
        jmp     10f
7:      /* 64-bit memory: the high half too */
        push    %r8
        lea     4(%rbp), %edx
        mov     %r12d, %edi
        mov     %r13d, %esi
        mov     $0xffffffff, %ecx
        call    cf8_write
        lea     4(%rbp), %edx
        mov     %r12d, %edi
        mov     %r13d, %esi
        call    cf8_read
        push    %rax
        lea     4(%rbp), %edx
        mov     %r12d, %edi
        mov     %r13d, %esi
        xor     %ecx, %ecx
        call    cf8_write
        pop     %rax
        pop     %r8
        shl     $32, %rax
        mov     %r8d, %ecx
        and     $0xfffffff0, %ecx
        or      %rcx, %rax
        neg     %rax
        mov     %rax, %r9
        mov     $'6', %r10d
        inc     %ebx
        jmp     10f
8:      /* I/O */
        mov     %r8d, %eax
        and     $0xfffffffc, %eax
        neg     %eax
        and     $0xffff, %eax
        mov     %eax, %r9d
        mov     $'I', %r10d
10:     push    %r9
        push    %r10
        PRINT   "BAR "
        lea     -0x10(%rbp), %edi
        shr     $2, %edi
        call    puthex8
        PRINT   " SIZE="
        pop     %r10
        pop     %rdi
        push    %r10
        call    puthex
        pop     %r10
        cmp     $'I', %r10d
        jne     11f
        PRINT   " IO\n"
        jmp     9f
11:     cmp     $'3', %r10d
        jne     12f
        PRINT   " M32\n"
        jmp     9f
12:     PRINT   " M64\n"
9:      pop     %rbp
        ret

/* cf8_read(dev=edi, fn=esi, reg=edx) -> eax */
cf8_read:
        call    cf8_addr
        mov     $CFC, %dx
        in      %dx, %eax
        ret

/* cf8_write(dev=edi, fn=esi, reg=edx, value=ecx) */
cf8_write:
        push    %rcx
        call    cf8_addr
        pop     %rax
        mov     $CFC, %dx
        out     %eax, %dx
        ret

cf8_addr:
        mov     %edi, %eax
        shl     $11, %eax
        shl     $8, %esi
        or      %esi, %eax
        and     $0xfc, %edx
        or      %edx, %eax
        or      $0x80000000, %eax
        mov     $CF8, %dx
        out     %eax, %dx
        ret

/* ecam_addr(dev=edi, fn=esi, reg=edx) -> rax */
ecam_addr:
        mov     %edi, %eax
        shl     $15, %eax
        shl     $12, %esi
        or      %esi, %eax
        or      %edx, %eax
        or      $ECAM, %eax
        ret

/* puthex32(edi): 8 hex digits */
puthex32:
        push    %rbx
        mov     %edi, %ebx
        mov     %ebx, %edi
        shr     $24, %edi
        call    puthex8
        mov     %ebx, %edi
        shr     $16, %edi
        and     $0xff, %edi
        call    puthex8
        mov     %ebx, %edi
        shr     $8, %edi
        and     $0xff, %edi
        call    puthex8
        mov     %ebx, %edi
        and     $0xff, %edi
        call    puthex8
        pop     %rbx
        ret

/* Map 2-3 GiB (the ECAM window) uncached with 2 MiB pages: PDPT[2]. */
map_ecam:
        lea     ecam_pd(%rip), %rdi
        mov     $0x8000009b, %eax       /* 2 GiB: P RW PWT PCD PS */
        mov     $512, %ecx
1:      mov     %rax, (%rdi)
        add     $8, %rdi
        add     $0x200000, %rax
        loop    1b
        movabs  $0x000ffffffffff000, %r8
        mov     %cr3, %rax
        and     %r8, %rax
        mov     (%rax), %rdx
        and     %r8, %rdx
        lea     ecam_pd(%rip), %rcx
        or      $3, %rcx
        mov     %rcx, 16(%rdx)          /* PDPT[2]: 2 GiB .. 3 GiB */
        mov     %cr3, %rax
        mov     %rax, %cr3
        ret

        .bss
        .balign 4096
ecam_pd: .skip  4096
