/*
 * hostile: a malicious virtio driver against every virtio-mmio slot the
 * monitor announces on the command line ("virtio_mmio.device=512@0xADDR:IRQ").
 *
 * For each transport:
 *  - "DEV 0x<base> ID=<device id>";
 *  - register and config-space abuse: reads of every register and of the
 *    config space with 1/2/4/8-byte accesses, writes to read-only registers,
 *    unaligned and wrongly sized register writes, config-space writes, a
 *    queue selector far out of range, status bits out of order, features
 *    the device never offered, notifications of queues that do not exist;
 *    then "ABUSE STATUS=<status>";
 *  - for every queue q (QueueNumMax != 0) and every case c below, the queue
 *    is set up alone (8 entries), the device started (DRIVER_OK), the bad
 *    chain published and the queue notified (and queue 0xffff); then the
 *    guest waits until the device reports NEEDS_RESET (0x40), the used ring
 *    moves, or ~0.1-0.2 s, and prints "CASE ID=<id> Q=<q> C=<c> STATUS=<status
 *    byte in hex> USED=<used idx>":
 *      c0  descriptor address outside guest RAM
 *      c1  a loop in the chain (0 -> 1 -> 0)
 *      c2  a device-writable descriptor of 4 GiB - 1
 *      c3  a head index beyond the queue size
 *      c4  a next index beyond the queue size
 *      c5  avail.idx 1000 entries ahead (more than the queue holds)
 *      c6  an INDIRECT descriptor (never negotiated) pointing outside RAM
 *      c7  the rings themselves outside guest RAM (descriptor table at 1 TiB)
 *      c8  a zero-length descriptor
 *  - "CANARY OK" / "CANARY BAD" per device: the page after the buffer the
 *    descriptors point at is unchanged (nothing was written past a buffer).
 * Finally "HOSTILE DONE" and exit (i8042 reset).
 */
#include "guest.h"

#define VM_MAGIC        0x000
#define VM_DEVICE_ID    0x008
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

#define QSIZE           8
#define RING_AVAIL      0x100
#define RING_USED       0x200
#define NCASES          9
#define MAXQ            8
#define F_NEXT          1
#define F_WRITE         2
#define F_INDIRECT      4
#define CANARY          0x5a5aa5a5c3c33c3c

        .text
        .globl  main
main:
        push    %rbx
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        push    %rbp
        PRINT   "HOSTILE GUEST\n"
        call    cmdline
        mov     %rax, %r15              /* r15: where the scan for devices goes on */
next_device:
        mov     %r15, %rdi
        call    next_dev
        test    %rax, %rax
        jz      all_done
        mov     %rax, %rbx              /* rbx: transport base */
        mov     %rdx, %r15
        cmpl    $0x74726976, VM_MAGIC(%rbx)
        jne     next_device
        mov     VM_DEVICE_ID(%rbx), %r12d
        PRINT   "DEV "
        PRINTHEX %rbx
        PRINT   " ID="
        PRINTDEC %r12
        PRINT   "\n"
        call    fill_canary
        call    abuse_registers
        PRINT   "ABUSE STATUS="
        mov     VM_STATUS(%rbx), %eax
        PRINTHEX %rax
        PRINT   "\n"
        xor     %r13d, %r13d            /* r13: queue */
1:      movl    $0, VM_STATUS(%rbx)
        mov     %r13d, VM_QUEUE_SEL(%rbx)
        cmpl    $0, VM_QUEUE_NUM_MAX(%rbx)
        je      3f
        xor     %r14d, %r14d            /* r14: case */
2:      call    attack
        inc     %r14d
        cmp     $NCASES, %r14d
        jb      2b
        inc     %r13d
        cmp     $MAXQ, %r13d
        jb      1b
3:      movl    $0, VM_STATUS(%rbx)     /* leave the device reset */
        call    check_canary
        jmp     next_device
all_done:
        PRINT   "HOSTILE DONE\n"
        pop     %rbp
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbx
        ret

/* next_dev(rdi: scan position) -> rax = next transport base (0: none),
   rdx = scan position after it. */
next_dev:
        push    %rbx
        mov     %rdi, %rbx
1:      cmpb    $0, (%rbx)
        je      9f
        lea     key_dev(%rip), %rsi
        mov     %rbx, %rdi
2:      movzbl  (%rsi), %eax
        test    %eax, %eax
        jz      4f                      /* key matched at rbx */
        cmpb    %al, (%rdi)
        jne     3f
        inc     %rsi
        inc     %rdi
        jmp     2b
3:      inc     %rbx
        jmp     1b
4:      movzbl  (%rdi), %eax            /* skip "512@" */
        test    %eax, %eax
        jz      9f
        inc     %rdi
        cmp     $'@', %eax
        jne     4b
        call    parse_num               /* rax = base, rdx = end */
        pop     %rbx
        ret
9:      xor     %eax, %eax
        mov     %rbx, %rdx
        pop     %rbx
        ret

/* ---- register and config-space abuse (rbx = transport) ------------------- */
abuse_registers:
        push    %r12
        /* reads: every register and config offset, 4 bytes, then 1/2/8 bytes
           in the config space and at registers */
        xor     %r12d, %r12d
1:      mov     (%rbx,%r12), %eax
        movzbl  (%rbx,%r12), %eax
        movzwl  1(%rbx,%r12), %eax
        add     $4, %r12d
        cmp     $0x200, %r12d
        jb      1b
        mov     $0x100, %r12d
2:      mov     (%rbx,%r12), %rax       /* 8-byte config reads */
        add     $8, %r12d
        cmp     $0x200, %r12d
        jb      2b
        /* writes to read-only registers */
        mov     $0xffffffff, %eax
        mov     %eax, 0x000(%rbx)       /* magic */
        mov     %eax, 0x004(%rbx)       /* version */
        mov     %eax, 0x008(%rbx)       /* device id */
        mov     %eax, 0x00c(%rbx)       /* vendor */
        mov     %eax, 0x010(%rbx)       /* device features */
        mov     %eax, 0x034(%rbx)       /* queue num max */
        mov     %eax, 0x060(%rbx)       /* interrupt status */
        mov     %eax, 0x0fc(%rbx)       /* config generation */
        mov     %eax, 0x0b0(%rbx)       /* reserved */
        /* wrong sizes and alignments */
        movb    $0xff, VM_STATUS(%rbx)
        movw    $0xffff, VM_QUEUE_NOTIFY(%rbx)
        movl    $0, VM_QUEUE_NOTIFY + 1(%rbx)
        movl    $0xff, VM_STATUS + 2(%rbx)
        movabs  $0xffffffffffffffff, %rax
        mov     %rax, VM_QUEUE_SEL(%rbx)
        /* config space writes, every size */
        mov     $0x100, %r12d
3:      movb    $0xff, (%rbx,%r12)
        movw    $0xffff, 1(%rbx,%r12)
        movl    $0xffffffff, 3(%rbx,%r12)
        mov     %rax, (%rbx,%r12)
        add     $8, %r12d
        cmp     $0x200, %r12d
        jb      3b
        /* status out of order, features never offered */
        movl    $0, VM_STATUS(%rbx)
        movl    $4, VM_STATUS(%rbx)     /* DRIVER_OK first */
        movl    $0xff, VM_STATUS(%rbx)
        movl    $0, VM_STATUS(%rbx)
        movl    $1, VM_STATUS(%rbx)
        movl    $3, VM_STATUS(%rbx)
        movl    $5, VM_DRV_FEAT_SEL(%rbx)
        movl    $0xffffffff, VM_DRV_FEAT(%rbx)
        movl    $1, VM_DRV_FEAT_SEL(%rbx)
        movl    $0xffffffff, VM_DRV_FEAT(%rbx)
        movl    $0, VM_DRV_FEAT_SEL(%rbx)
        movl    $0xffffffff, VM_DRV_FEAT(%rbx)
        movl    $0xb, VM_STATUS(%rbx)   /* FEATURES_OK: must stay clear */
        /* a queue far out of range, and one of an absurd size */
        movl    $0xffffffff, VM_QUEUE_SEL(%rbx)
        movl    $0x10000, VM_QUEUE_NUM(%rbx)
        movl    $0xffffffff, VM_DESC_LO(%rbx)
        movl    $0xffffffff, VM_DESC_HI(%rbx)
        movl    $1, VM_QUEUE_READY(%rbx)
        mov     VM_QUEUE_NUM_MAX(%rbx), %eax
        movl    $0, VM_QUEUE_SEL(%rbx)
        movl    $0xffff, VM_QUEUE_NUM(%rbx)
        movl    $1, VM_QUEUE_READY(%rbx)
        movl    $0xf, VM_STATUS(%rbx)   /* DRIVER_OK with nothing valid */
        movl    $0xffffffff, VM_QUEUE_NOTIFY(%rbx)
        movl    $0, VM_QUEUE_NOTIFY(%rbx)
        movl    $7, VM_QUEUE_NOTIFY(%rbx)
        movl    $0xffffffff, VM_INT_ACK(%rbx)
        pop     %r12
        ret

/* ---- one queue attack: r13 = queue, r14 = case (rbx = transport) ------------ */
attack:
        push    %rbp
        lea     ring(%rip), %rbp
        mov     %rbp, %rdi              /* clean ring page */
        xor     %eax, %eax
        mov     $512, %ecx
        rep stosq
        movl    $0, VM_STATUS(%rbx)
        movl    $1, VM_STATUS(%rbx)
        movl    $3, VM_STATUS(%rbx)
        movl    $1, VM_DRV_FEAT_SEL(%rbx)
        movl    $1, VM_DRV_FEAT(%rbx)   /* VERSION_1 only */
        movl    $0, VM_DRV_FEAT_SEL(%rbx)
        movl    $0, VM_DRV_FEAT(%rbx)
        movl    $0xb, VM_STATUS(%rbx)
        mov     %r13d, VM_QUEUE_SEL(%rbx)
        movl    $QSIZE, VM_QUEUE_NUM(%rbx)
        mov     %ebp, VM_DESC_LO(%rbx)
        xor     %eax, %eax
        cmp     $7, %r14d               /* c7: the rings at 1 TiB */
        jne     1f
        mov     $0x100, %eax
1:      mov     %eax, VM_DESC_HI(%rbx)
        lea     RING_AVAIL(%rbp), %rax
        mov     %eax, VM_AVAIL_LO(%rbx)
        movl    $0, VM_AVAIL_HI(%rbx)
        lea     RING_USED(%rbp), %rax
        mov     %eax, VM_USED_LO(%rbx)
        movl    $0, VM_USED_HI(%rbx)
        movl    $1, VM_QUEUE_READY(%rbx)
        movl    $0xf, VM_STATUS(%rbx)   /* DRIVER_OK */
        /* the descriptors of the case */
        lea     buf(%rip), %rsi
        mov     %r14d, %eax
        lea     cases(%rip), %rcx
        jmp     *(%rcx,%rax,8)
c_out_of_ram:
        movabs  $0x00007fffffff0000, %rax
        mov     %rax, (%rbp)
        movl    $64, 8(%rbp)
        movw    $F_WRITE, 12(%rbp)
        jmp     publish
c_loop:
        mov     %rsi, (%rbp)
        movl    $16, 8(%rbp)
        movw    $F_NEXT, 12(%rbp)
        movw    $1, 14(%rbp)
        mov     %rsi, 16(%rbp)
        movl    $16, 24(%rbp)
        movw    $F_NEXT | F_WRITE, 28(%rbp)
        movw    $0, 30(%rbp)
        jmp     publish
c_huge:
        mov     %rsi, (%rbp)
        movl    $0xffffffff, 8(%rbp)
        movw    $F_WRITE, 12(%rbp)
        jmp     publish
c_head_beyond:
        movw    $200, RING_AVAIL + 4(%rbp)
        movw    $1, RING_AVAIL + 2(%rbp)
        jmp     kick
c_next_beyond:
        mov     %rsi, (%rbp)
        movl    $16, 8(%rbp)
        movw    $F_NEXT, 12(%rbp)
        movw    $100, 14(%rbp)
        jmp     publish
c_idx_jump:
        mov     %rsi, (%rbp)
        movl    $16, 8(%rbp)
        movw    $F_WRITE, 12(%rbp)
        movw    $1000, RING_AVAIL + 2(%rbp)
        jmp     kick
c_indirect:
        movabs  $0x00007fffdead0000, %rax
        mov     %rax, (%rbp)
        movl    $64, 8(%rbp)
        movw    $F_INDIRECT, 12(%rbp)
        jmp     publish
c_rings_away:
        jmp     publish
c_zero_len:
        mov     %rsi, (%rbp)
        movl    $0, 8(%rbp)
        movw    $F_WRITE, 12(%rbp)
publish:
        movw    $0, RING_AVAIL + 4(%rbp)
        mfence
        movw    $1, RING_AVAIL + 2(%rbp)
kick:
        mfence
        mov     %r13d, VM_QUEUE_NOTIFY(%rbx)
        movl    $0xffff, VM_QUEUE_NOTIFY(%rbx)
        /* wait: NEEDS_RESET, the used ring moves, or ~2e8 TSC cycles */
        rdtsc
        shl     $32, %rdx
        or      %rax, %rdx
        lea     200000000(%rdx), %r8
2:      testl   $0x40, VM_STATUS(%rbx)
        jnz     3f
        cmpw    $0, RING_USED + 2(%rbp)
        jne     3f
        pause
        rdtsc
        shl     $32, %rdx
        or      %rax, %rdx
        cmp     %r8, %rdx
        jb      2b
3:      mov     VM_INT_STATUS(%rbx), %eax
        mov     %eax, VM_INT_ACK(%rbx)
        PRINT   "CASE ID="
        PRINTDEC %r12
        PRINT   " Q="
        PRINTDEC %r13
        PRINT   " C="
        PRINTDEC %r14
        PRINT   " STATUS="
        mov     VM_STATUS(%rbx), %edi
        call    puthex8
        PRINT   " USED="
        movzwl  RING_USED + 2(%rbp), %eax
        PRINTDEC %rax
        PRINT   "\n"
        pop     %rbp
        ret

/* ---- canary: the page after buf must never be written -------------------- */
fill_canary:
        lea     canary(%rip), %rdi
        movabs  $CANARY, %rax
        mov     $512, %ecx
        rep stosq
        ret

check_canary:
        lea     canary(%rip), %rdi
        movabs  $CANARY, %rax
        mov     $512, %ecx
        repe scasq
        jne     1f
        PRINT   "CANARY OK\n"
        ret
1:      PRINT   "CANARY BAD\n"
        ret

        .section .rodata
        .balign 8
cases:
        .quad   c_out_of_ram, c_loop, c_huge, c_head_beyond, c_next_beyond
        .quad   c_idx_jump, c_indirect, c_rings_away, c_zero_len
key_dev:        .asciz "virtio_mmio.device="

        .bss
        .balign 4096
ring:           .skip 4096
buf:            .skip 4096
canary:         .skip 4096
