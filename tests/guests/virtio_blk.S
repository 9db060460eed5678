/*
 * virtio_blk: drives a virtio-mmio (version 2) block device by polling.
 *
 *  - transport address from the "virtio_mmio.device=512@0xADDR:IRQ" entry the
 *    monitor appends to the command line (prints "MMIO=0x..."), else
 *    0xf0100000 ("MMIO DEFAULT");
 *  - checks magic/version/device id ("VIRTIO OK" or "VIRTIO BAD ..."),
 *    negotiates VIRTIO_F_VERSION_1 (+ FLUSH when offered), reads the capacity;
 *  - queue 0 with 8 descriptors in guest RAM;
 *  - requests, each printing "REQ <name> STATUS=<status byte>":
 *      read  sector 0  -> also "SECTOR0=<first 16 bytes in hex>"
 *      write sector 1  with byte[i] = (i & 0xff) ^ 0x5a
 *      flush           (only when VIRTIO_BLK_F_FLUSH was offered)
 *      read  sector 1  -> "READBACK MATCH=<0|1>"
 *  - "DONE", exit.
 */
#include "guest.h"

#define VM_MAGIC        0x000
#define VM_VERSION      0x004
#define VM_DEVICE_ID    0x008
#define VM_DEV_FEAT     0x010
#define VM_DEV_FEAT_SEL 0x014
#define VM_DRV_FEAT     0x020
#define VM_DRV_FEAT_SEL 0x024
#define VM_QUEUE_SEL    0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM    0x038
#define VM_QUEUE_READY  0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INT_STATUS   0x060
#define VM_INT_ACK      0x064
#define VM_STATUS       0x070
#define VM_DESC_LO      0x080
#define VM_DESC_HI      0x084
#define VM_AVAIL_LO     0x090
#define VM_AVAIL_HI     0x094
#define VM_USED_LO      0x0a0
#define VM_USED_HI      0x0a4
#define VM_CONFIG       0x100

#define QSIZE           8
#define RING_AVAIL      0x100   /* offsets in the ring page */
#define RING_USED       0x200

#define T_IN            0
#define T_OUT           1
#define T_FLUSH         4

        .text
        .globl  main
main:
        push    %rbx
        push    %r12
        push    %r13
        PRINT   "VIRTIO-BLK TEST\n"
        /* --- find the transport --- */
        lea     key_dev(%rip), %rdi
        call    cmdline_find
        test    %rax, %rax
        jz      2f
1:      movzbl  (%rax), %ecx            /* skip "512@" */
        test    %ecx, %ecx
        jz      2f
        inc     %rax
        cmp     $'@', %ecx
        jne     1b
        mov     %rax, %rdi
        call    parse_num
        mov     %rax, %rbx
        PRINT   "MMIO="
        PRINTHEX %rbx
        PRINT   "\n"
        jmp     3f
2:      mov     $0xf0100000, %ebx
        PRINT   "MMIO DEFAULT\n"
3:      /* rbx = transport base from here on */
        cmpl    $0x74726976, VM_MAGIC(%rbx)
        jne     bad
        cmpl    $2, VM_VERSION(%rbx)
        jne     bad
        cmpl    $2, VM_DEVICE_ID(%rbx)
        jne     bad
        PRINT   "VIRTIO OK\n"

        /* --- negotiate --- */
        movl    $0, VM_STATUS(%rbx)     /* reset */
        movl    $1, VM_STATUS(%rbx)     /* ACKNOWLEDGE */
        movl    $3, VM_STATUS(%rbx)     /* | DRIVER */
        movl    $1, VM_DEV_FEAT_SEL(%rbx)
        mov     VM_DEV_FEAT(%rbx), %r12d
        shl     $32, %r12
        movl    $0, VM_DEV_FEAT_SEL(%rbx)
        mov     VM_DEV_FEAT(%rbx), %eax
        or      %rax, %r12              /* r12 = device features */
        PRINT   "FEATURES="
        PRINTHEX %r12
        PRINT   "\n"
        bt      $32, %r12
        jc      4f
        PRINT   "NO VIRTIO_F_VERSION_1\n"
        jmp     99f
4:      bt      $5, %r12
        jnc     5f
        PRINT   "DEVICE SAYS RO\n"
5:      movl    $1, VM_DRV_FEAT_SEL(%rbx)
        movl    $1, VM_DRV_FEAT(%rbx)   /* VERSION_1 */
        movl    $0, VM_DRV_FEAT_SEL(%rbx)
        mov     %r12d, %eax
        and     $0x200, %eax            /* FLUSH when offered */
        mov     %eax, VM_DRV_FEAT(%rbx)
        movl    $0xb, VM_STATUS(%rbx)   /* | FEATURES_OK */
        mov     VM_STATUS(%rbx), %eax
        test    $8, %eax
        jnz     6f
        PRINT   "FEATURES_OK REFUSED\n"
        jmp     99f
6:      mov     VM_CONFIG(%rbx), %eax   /* capacity, 512-byte sectors */
        mov     VM_CONFIG + 4(%rbx), %edx
        shl     $32, %rdx
        or      %rax, %rdx
        mov     %rdx, %r13
        PRINT   "CAPACITY="
        PRINTDEC %r13
        PRINT   "\n"

        /* --- queue 0 --- */
        movl    $0, VM_QUEUE_SEL(%rbx)
        mov     VM_QUEUE_NUM_MAX(%rbx), %eax
        cmp     $QSIZE, %eax
        jae     7f
        PRINT   "QUEUE TOO SMALL\n"
        jmp     99f
7:      movl    $QSIZE, VM_QUEUE_NUM(%rbx)
        lea     ring(%rip), %rax
        mov     %eax, VM_DESC_LO(%rbx)
        movl    $0, VM_DESC_HI(%rbx)
        add     $RING_AVAIL, %eax
        mov     %eax, VM_AVAIL_LO(%rbx)
        movl    $0, VM_AVAIL_HI(%rbx)
        add     $RING_USED - RING_AVAIL, %eax
        mov     %eax, VM_USED_LO(%rbx)
        movl    $0, VM_USED_HI(%rbx)
        movl    $1, VM_QUEUE_READY(%rbx)
        movl    $0xf, VM_STATUS(%rbx)   /* | DRIVER_OK */
        mov     VM_STATUS(%rbx), %eax
        test    $0x40, %eax
        jz      8f
        PRINT   "DEVICE NEEDS RESET\n"
        jmp     99f

        /* --- read sector 0 --- */
8:      mov     $T_IN, %edi
        xor     %esi, %esi
        call    request
        push    %rax
        PRINT   "REQ read0 STATUS="
        pop     %rax
        PRINTDEC %rax
        PRINT   "\nSECTOR0="
        xor     %r13d, %r13d
9:      lea     buf(%rip), %rax
        movzbl  (%rax,%r13), %edi
        call    puthex8
        inc     %r13d
        cmp     $16, %r13d
        jb      9b
        PRINT   "\n"

        /* --- write sector 1 --- */
        xor     %ecx, %ecx
        lea     buf(%rip), %rdx
10:     mov     %ecx, %eax
        xor     $0x5a, %al
        mov     %al, (%rdx,%rcx)
        inc     %ecx
        cmp     $512, %ecx
        jb      10b
        mov     $T_OUT, %edi
        mov     $1, %esi
        call    request
        push    %rax
        PRINT   "REQ write1 STATUS="
        pop     %rax
        PRINTDEC %rax
        PRINT   "\n"

        /* --- flush --- */
        bt      $9, %r12
        jnc     11f
        mov     $T_FLUSH, %edi
        xor     %esi, %esi
        call    request
        push    %rax
        PRINT   "REQ flush STATUS="
        pop     %rax
        PRINTDEC %rax
        PRINT   "\n"
        jmp     12f
11:     PRINT   "NO FLUSH FEATURE\n"

        /* --- read sector 1 back --- */
12:     lea     buf(%rip), %rdi
        xor     %eax, %eax
        mov     $64, %ecx
        rep stosq
        mov     $T_IN, %edi
        mov     $1, %esi
        call    request
        push    %rax
        PRINT   "REQ read1 STATUS="
        pop     %rax
        PRINTDEC %rax
        xor     %ecx, %ecx
        lea     buf(%rip), %rdx
        mov     $1, %r13d
13:     mov     %ecx, %eax
        xor     $0x5a, %al
        cmp     %al, (%rdx,%rcx)
        je      14f
        xor     %r13d, %r13d
14:     inc     %ecx
        cmp     $512, %ecx
        jb      13b
        PRINT   "\nREADBACK MATCH="
        PRINTDEC %r13
        PRINT   "\nDONE\n"
        jmp     99f

bad:    PRINT   "VIRTIO BAD magic="
        mov     VM_MAGIC(%rbx), %eax
        PRINTHEX %rax
        PRINT   " version="
        mov     VM_VERSION(%rbx), %eax
        PRINTHEX %rax
        PRINT   " device="
        mov     VM_DEVICE_ID(%rbx), %eax
        PRINTHEX %rax
        PRINT   "\n"
99:     pop     %r13
        pop     %r12
        pop     %rbx
        ret

/* request(edi = type, esi = sector) -> eax = status byte (0x1ff when the used ring
   does not move within ~20e9 TSC cycles). Uses hdr, buf (512 bytes), status; rbx = transport. */
request:
        push    %r12
        lea     hdr(%rip), %rax
        mov     %edi, (%rax)            /* type */
        movl    $0, 4(%rax)             /* reserved */
        mov     %rsi, 8(%rax)           /* sector */
        movb    $0xff, status(%rip)
        lea     ring(%rip), %r8         /* descriptor table */
        /* d0: header, device-readable */
        mov     %rax, (%r8)
        movl    $16, 8(%r8)
        movw    $1, 12(%r8)             /* NEXT */
        movw    $1, 14(%r8)
        lea     16(%r8), %r9
        cmp     $T_FLUSH, %edi
        je      2f
        /* d1: data */
        lea     buf(%rip), %rax
        mov     %rax, (%r9)
        movl    $512, 8(%r9)
        mov     $1, %eax                /* NEXT */
        cmp     $T_IN, %edi
        jne     1f
        or      $2, %eax                /* WRITE: the device writes the buffer */
1:      mov     %ax, 12(%r9)
        movw    $2, 14(%r9)
        lea     32(%r8), %r9
        jmp     3f
2:      movw    $2, 14(%r8)             /* flush: header -> status */
        lea     32(%r8), %r9
        /* (d1 slot unused; d0.next = 2) */
3:      lea     status(%rip), %rax
        mov     %rax, (%r9)
        movl    $1, 8(%r9)
        movw    $2, 12(%r9)             /* WRITE */
        movw    $0, 14(%r9)
        /* publish: avail.ring[idx % QSIZE] = 0, then idx++ */
        lea     RING_AVAIL(%r8), %r10
        movzwl  2(%r10), %eax
        mov     %eax, %ecx
        and     $QSIZE - 1, %ecx
        movw    $0, 4(%r10,%rcx,2)
        mfence
        inc     %eax
        mov     %ax, 2(%r10)
        mfence
        movl    $0, VM_QUEUE_NOTIFY(%rbx)
        /* poll used.idx */
        lea     RING_USED(%r8), %r11
        rdtsc
        shl     $32, %rdx
        or      %rax, %rdx
        movabs  $20000000000, %r12      /* ~5-20 s of TSC */
        add     %rdx, %r12
4:      movzwl  2(%r11), %ecx
        cmp     last_used(%rip), %cx
        jne     5f
        rdtsc
        shl     $32, %rdx
        or      %rax, %rdx
        cmp     %r12, %rdx
        jb      4b
        mov     $0x1ff, %eax            /* timeout */
        jmp     6f
5:      mov     %cx, last_used(%rip)
        mov     VM_INT_STATUS(%rbx), %eax
        mov     %eax, VM_INT_ACK(%rbx)
        movzbl  status(%rip), %eax
6:      pop     %r12
        ret

        .section .rodata
key_dev:        .asciz "virtio_mmio.device="

        .bss
        .balign 4096
ring:           .skip 4096
hdr:            .skip 16
buf:            .skip 512
status:         .skip 8
last_used:      .skip 8
