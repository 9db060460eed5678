/*
 * Runtime shared by every stratopy test guest: entry points, serial I/O,
 * command-line parsing, IDT, LAPIC/IOAPIC helpers, exit.
 *
 * Two ways in:
 *  - _start64 (the ELF e_entry): the stratopy/StratoVirt/Firecracker 64-bit
 *    boot contract: long mode, CS=0x10, identity map of the first 1 GiB with
 *    PML4 at 0x9000, RSI = boot_params (0x7000), interrupts off.
 *  - pvh_start32 (the XEN_ELFNOTE_PHYS32_ENTRY note): QEMU's PVH boot, in
 *    32-bit protected mode with EBX = hvm_start_info. The stub rebuilds the
 *    same layout (boot_params at 0x7000 with command line and e820, GDT at
 *    0x500, page tables at 0x9000) and joins _start64, so the same ELF can be
 *    debugged under `qemu-system-x86_64 -M microvm` with TCG.
 *
 * Register convention: SysV-like. Arguments in rdi/rsi, result in rax;
 * every routine may clobber rax rcx rdx rsi rdi r8-r11 and keeps
 * rbx rbp r12-r15.
 */
#include "guest.h"

/* ---- PVH note (read by QEMU only; stratopy enters at e_entry) ---------- */
        .section .note.Xen, "a", @note
        .balign 4
        .long   4               /* namesz: "Xen\0" */
        .long   8               /* descsz */
        .long   18              /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .balign 4
        .quad   pvh_start32
        .balign 4

/* ---- 32-bit PVH entry --------------------------------------------------- */
        .section .text.pvh, "ax"
        .code32
        .globl  pvh_start32
pvh_start32:
        cli
        cld
        mov     %ebx, %ebp
        /* Save the command line and the memory map before building over
           low memory (the loader may have put them anywhere). */
        mov     24(%ebp), %esi          /* cmdline_paddr (low half) */
        mov     $pvh_cmdline, %edi
        mov     $4095, %ecx
        test    %esi, %esi
        jz      2f
1:      lodsb
        test    %al, %al
        jz      2f
        stosb
        loop    1b
2:      movb    $0, (%edi)
        xor     %ecx, %ecx
        cmpl    $1, 4(%ebp)             /* version >= 1 has the memmap */
        jb      4f
        mov     48(%ebp), %ecx          /* memmap_entries */
        cmp     $32, %ecx
        jbe     3f
        mov     $32, %ecx
3:      mov     40(%ebp), %esi          /* memmap_paddr */
        mov     $pvh_e820, %edi
        mov     %ecx, %edx
        jecxz   4f
5:      movsl                           /* addr, size, type: 20 bytes */
        movsl
        movsl
        movsl
        movsl
        add     $4, %esi                /* skip hvm_memmap_table_entry.reserved */
        loop    5b
        mov     %edx, %ecx
4:      mov     %ecx, pvh_nr_e820
        /* boot_params at 0x7000 */
        mov     $0x7000, %edi
        xor     %eax, %eax
        mov     $1024, %ecx
        rep stosl
        mov     $pvh_cmdline, %esi
        mov     $0x20000, %edi
        mov     $1024, %ecx
        rep movsl
        movl    $0x20000, 0x7000 + BP_CMD_LINE_PTR
        mov     pvh_nr_e820, %ecx
        mov     %cl, 0x7000 + BP_E820_ENTRIES
        mov     $pvh_e820, %esi
        mov     $0x7000 + BP_E820_TABLE, %edi
        imul    $5, %ecx
        rep movsl
        /* GDT at 0x500: null, null, code 0xa09b, data 0xc093 */
        movl    $0, 0x500
        movl    $0, 0x504
        movl    $0, 0x508
        movl    $0, 0x50c
        movl    $0x0000ffff, 0x510
        movl    $0x00af9b00, 0x514
        movl    $0x0000ffff, 0x518
        movl    $0x00cf9300, 0x51c
        /* page tables: PML4 0x9000 -> PDPT 0xa000 -> PD 0xb000, 2 MiB pages */
        mov     $0x9000, %edi
        xor     %eax, %eax
        mov     $3072, %ecx
        rep stosl
        movl    $0xa003, 0x9000
        movl    $0xb003, 0xa000
        mov     $0xb000, %edi
        mov     $0x83, %eax
        mov     $512, %ecx
6:      mov     %eax, (%edi)
        add     $8, %edi
        add     $0x200000, %eax
        loop    6b
        lgdt    pvh_gdtr
        mov     %cr4, %eax
        or      $0x20, %eax             /* PAE */
        mov     %eax, %cr4
        mov     $0x9000, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx       /* EFER.LME */
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80000001, %eax       /* PG | PE */
        mov     %eax, %cr0
        mov     $0x18, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        ljmp    $0x10, $pvh_long
        .code64
pvh_long:
        mov     $0x7000, %esi
        mov     $0x8ff0, %esp
        jmp     _start64

        .section .rodata
        .balign 8
pvh_gdtr:
        .word   31
        .long   0x500

/* ---- 64-bit entry ----------------------------------------------------------- */
        .text
        .code64
        .globl  _start64
_start64:
        cli
        cld
        mov     %rsi, boot_params(%rip)
        lea     stack_top(%rip), %rsp
        xor     %ebp, %ebp
        call    map_high
        call    main
        jmp     exit_ok

/* Map 3-4 GiB (virtio-mmio, IOAPIC, LAPIC) uncached, and 4-5 GiB (the RAM
   above the MMIO gap when -m > 3 GiB) write-back, 2 MiB pages, by adding
   PDPT[3] and PDPT[4] to the page tables the loader gave us. */
map_high:
        lea     high_pd(%rip), %rdi
        mov     $0xc000009b, %eax       /* P RW PWT PCD PS */
        mov     $512, %ecx
1:      mov     %rax, (%rdi)
        add     $8, %rdi
        add     $0x200000, %rax
        loop    1b
        lea     above4g_pd(%rip), %rdi
        movabs  $0x100000083, %rax      /* 4 GiB: P RW PS */
        mov     $512, %ecx
2:      mov     %rax, (%rdi)
        add     $8, %rdi
        add     $0x200000, %rax
        loop    2b
        movabs  $0x000ffffffffff000, %r8
        mov     %cr3, %rax
        and     %r8, %rax
        mov     (%rax), %rdx            /* PML4[0] */
        and     %r8, %rdx               /* PDPT */
        lea     high_pd(%rip), %rcx
        or      $3, %rcx
        mov     %rcx, 24(%rdx)          /* PDPT[3]: 3 GiB .. 4 GiB */
        lea     above4g_pd(%rip), %rcx
        or      $3, %rcx
        mov     %rcx, 32(%rdx)          /* PDPT[4]: 4 GiB .. 5 GiB */
        mov     %cr3, %rax
        mov     %rax, %cr3
        ret

/* ---- exit ---------------------------------------------------------------- */
        .globl  exit_ok
exit_ok:
        cli
        PRINT   "EXIT\n"
        mov     $0xfe, %al
        out     %al, $I8042_CMD         /* i8042 reset: the VM ends */
1:      cli
        hlt
        jmp     1b

/* ---- serial ---------------------------------------------------------------- */
        .globl  putc
putc:                                   /* dil: byte */
        mov     $COM1 + 5, %dx
1:      in      %dx, %al
        test    $LSR_THRE, %al
        jz      1b
        mov     %edi, %eax
        mov     $COM1, %dx
        out     %al, %dx
        ret

        .globl  puts
puts:                                   /* rdi: NUL-terminated string */
        push    %rbx
        mov     %rdi, %rbx
1:      movzbl  (%rbx), %edi
        test    %edi, %edi
        jz      2f
        call    putc
        inc     %rbx
        jmp     1b
2:      pop     %rbx
        ret

        .globl  puthex
puthex:                                 /* rdi: value, printed as 0x%016x */
        push    %rbx
        push    %r12
        mov     %rdi, %rbx
        mov     $'0', %edi
        call    putc
        mov     $'x', %edi
        call    putc
        mov     $16, %r12d
1:      rol     $4, %rbx
        mov     %ebx, %eax
        and     $15, %eax
        lea     hexdigits(%rip), %rdi
        movzbl  (%rdi,%rax), %edi
        call    putc
        dec     %r12d
        jnz     1b
        pop     %r12
        pop     %rbx
        ret

        .globl  puthex8
puthex8:                                /* dil: byte, printed as 2 hex digits */
        push    %rbx
        mov     %edi, %ebx
        mov     %ebx, %eax
        shr     $4, %eax
        and     $15, %eax
        lea     hexdigits(%rip), %rdi
        movzbl  (%rdi,%rax), %edi
        call    putc
        mov     %ebx, %eax
        and     $15, %eax
        lea     hexdigits(%rip), %rdi
        movzbl  (%rdi,%rax), %edi
        call    putc
        pop     %rbx
        ret

        .globl  putdec
putdec:                                 /* rdi: unsigned value in decimal */
        push    %rbx
        sub     $32, %rsp
        lea     31(%rsp), %rbx
        movb    $0, (%rbx)
        mov     %rdi, %rax
        mov     $10, %ecx
1:      xor     %edx, %edx
        div     %rcx
        add     $'0', %dl
        dec     %rbx
        mov     %dl, (%rbx)
        test    %rax, %rax
        jnz     1b
        mov     %rbx, %rdi
        call    puts
        add     $32, %rsp
        pop     %rbx
        ret

        .globl  serial_poll
serial_poll:                            /* eax = 1 when a byte is waiting */
        mov     $COM1 + 5, %dx
        in      %dx, %al
        and     $LSR_DR, %eax
        ret

        .globl  getc
getc:                                   /* eax = next byte (waits) */
        mov     $COM1 + 5, %dx
1:      in      %dx, %al
        test    $LSR_DR, %al
        jz      1b
        mov     $COM1, %dx
        xor     %eax, %eax
        in      %dx, %al
        ret

/* ---- command line ------------------------------------------------------------ */
        .globl  cmdline
cmdline:                                /* rax = the command line (C string) */
        mov     boot_params(%rip), %rax
        mov     BP_CMD_LINE_PTR(%rax), %eax
        ret

        .globl  cmdline_find
cmdline_find:       /* rdi: "key=" -> rax = pointer after it in the command line, or 0 */
        push    %rbx
        push    %r12
        mov     %rdi, %r12
        call    cmdline
        mov     %rax, %rbx
        test    %rbx, %rbx
        jz      9f
1:      movzbl  (%rbx), %eax
        test    %eax, %eax
        jz      9f
        /* a key starts the line or follows a space */
        lea     -1(%rbx), %rcx
        call    cmdline
        cmp     %rax, %rbx
        je      2f
        cmpb    $' ', (%rcx)
        jne     5f
2:      mov     %rbx, %rsi
        mov     %r12, %rdi
3:      movzbl  (%rdi), %eax
        test    %eax, %eax
        jz      8f                      /* whole key matched */
        cmpb    %al, (%rsi)
        jne     5f
        inc     %rdi
        inc     %rsi
        jmp     3b
5:      inc     %rbx
        jmp     1b
8:      mov     %rsi, %rax
        pop     %r12
        pop     %rbx
        ret
9:      xor     %eax, %eax
        pop     %r12
        pop     %rbx
        ret

        .globl  parse_num
parse_num:          /* rdi: string -> rax = number (decimal or 0x hex), rdx = end */
        xor     %eax, %eax
        cmpb    $'0', (%rdi)
        jne     3f
        movzbl  1(%rdi), %ecx
        or      $0x20, %ecx
        cmp     $'x', %ecx
        jne     3f
        add     $2, %rdi
1:      movzbl  (%rdi), %ecx            /* hex */
        lea     -'0'(%rcx), %edx
        cmp     $9, %edx
        jbe     2f
        or      $0x20, %ecx
        lea     -'a'(%rcx), %edx
        cmp     $5, %edx
        ja      9f
        add     $10, %edx
2:      shl     $4, %rax
        or      %rdx, %rax
        inc     %rdi
        jmp     1b
3:      movzbl  (%rdi), %ecx            /* decimal */
        lea     -'0'(%rcx), %edx
        cmp     $9, %edx
        ja      9f
        imul    $10, %rax, %rax
        add     %rdx, %rax
        inc     %rdi
        jmp     3b
9:      mov     %rdi, %rdx
        ret

        .globl  cmdline_num
cmdline_num:        /* rdi: "key=", rsi: default -> rax = value */
        push    %rbx
        mov     %rsi, %rbx
        call    cmdline_find
        test    %rax, %rax
        jz      1f
        mov     %rax, %rdi
        call    parse_num
        mov     %rax, %rbx
1:      mov     %rbx, %rax
        pop     %rbx
        ret

/* ---- IDT -------------------------------------------------------------------- */
        .globl  set_gate
set_gate:                               /* rdi: vector, rsi: handler */
        shl     $4, %rdi
        lea     idt(%rip), %rax
        add     %rax, %rdi
        mov     %esi, %eax
        mov     %ax, (%rdi)
        movw    $0x10, 2(%rdi)
        movw    $0x8e00, 4(%rdi)        /* present, DPL 0, 64-bit interrupt gate */
        shr     $16, %eax
        mov     %ax, 6(%rdi)
        mov     %rsi, %rax
        shr     $32, %rax
        mov     %eax, 8(%rdi)
        movl    $0, 12(%rdi)
        ret

        .globl  idt_init
idt_init:           /* exceptions report and exit; 0x20 = timer, 0x21 = IOAPIC, 0xff = spurious */
        push    %rbx
        xor     %ebx, %ebx
1:      mov     %rbx, %rdi
        lea     unexpected_isr(%rip), %rsi
        cmp     $32, %ebx
        jae     2f
        mov     %rbx, %rsi
        shl     $4, %rsi
        lea     exc_stubs(%rip), %rax
        add     %rax, %rsi
2:      call    set_gate
        inc     %ebx
        cmp     $256, %ebx
        jb      1b
        mov     $VEC_TIMER, %edi
        lea     tick_isr(%rip), %rsi
        call    set_gate
        mov     $VEC_IOAPIC, %edi
        lea     tick_isr(%rip), %rsi
        call    set_gate
        mov     $VEC_SPURIOUS, %edi
        lea     spurious_isr(%rip), %rsi
        call    set_gate
        lidt    idtr(%rip)
        pop     %rbx
        ret

        .balign 16
exc_stubs:
        .irp    n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .balign 16
        .if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
        .else
        pushq   $0
        .endif
        pushq   $\n
        jmp     exc_common
        .endr

exc_common:         /* stack: vector, error code, rip, cs, rflags, rsp, ss */
        PRINT   "\nEXCEPTION vec="
        PRINTHEX (%rsp)
        PRINT   " err="
        PRINTHEX 8(%rsp)
        PRINT   " rip="
        PRINTHEX 16(%rsp)
        PRINT   " cr2="
        mov     %cr2, %rax
        PRINTHEX %rax
        PRINT   "\n"
        jmp     exit_ok

unexpected_isr:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        PRINT   "UNEXPECTED-IRQ\n"
        call    apic_eoi
        jmp     isr_ret

        .globl  ticks
tick_isr:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        incq    ticks(%rip)
        call    apic_eoi
isr_ret:
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rdi
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
spurious_isr:
        iretq

/* ---- LAPIC ----------------------------------------------------------------- */
        .globl  apic_init
apic_init:          /* edi: 0 = x2APIC when CPUID has it, 1 = force xAPIC MMIO */
        push    %rbx
        mov     $0xff, %al              /* mask both 8259s */
        out     %al, $0x21
        out     %al, $0xa1
        movb    $0, apic_x2(%rip)
        test    %edi, %edi
        jnz     1f
        mov     $1, %eax
        cpuid
        bt      $21, %ecx
        jnc     1f
        movb    $1, apic_x2(%rip)
1:      mov     $0x1b, %ecx             /* IA32_APIC_BASE */
        rdmsr
        or      $0x800, %eax            /* enable */
        cmpb    $0, apic_x2(%rip)
        je      2f
        or      $0x400, %eax            /* x2APIC */
2:      wrmsr
        mov     $APIC_TPR, %edi
        xor     %esi, %esi
        call    apic_write
        mov     $APIC_SVR, %edi
        mov     $0x100 | VEC_SPURIOUS, %esi
        call    apic_write
        pop     %rbx
        ret

        .globl  apic_write
apic_write:         /* edi: register offset, esi: value */
        cmpb    $0, apic_x2(%rip)
        je      1f
        mov     %edi, %ecx
        shr     $4, %ecx
        add     $0x800, %ecx
        mov     %esi, %eax
        xor     %edx, %edx
        wrmsr
        ret
1:      mov     %edi, %edi
        mov     $XAPIC_BASE, %eax
        add     %rax, %rdi
        mov     %esi, (%rdi)
        ret

        .globl  apic_read
apic_read:          /* edi: register offset -> eax */
        cmpb    $0, apic_x2(%rip)
        je      1f
        mov     %edi, %ecx
        shr     $4, %ecx
        add     $0x800, %ecx
        rdmsr
        ret
1:      mov     %edi, %edi
        mov     $XAPIC_BASE, %eax
        add     %rax, %rdi
        mov     (%rdi), %eax
        ret

        .globl  apic_eoi
apic_eoi:
        mov     $APIC_EOI, %edi
        xor     %esi, %esi
        jmp     apic_write

        .globl  apic_timer_start
apic_timer_start:   /* edi: initial count (divide by 1, periodic, vector 0x20) */
        push    %rbx
        mov     %edi, %ebx
        mov     $APIC_TIMER_DIV, %edi
        mov     $0xb, %esi
        call    apic_write
        mov     $APIC_LVT_TIMER, %edi
        mov     $0x20000 | VEC_TIMER, %esi
        call    apic_write
        mov     $APIC_TIMER_INIT, %edi
        mov     %ebx, %esi
        call    apic_write
        pop     %rbx
        ret

        .globl  apic_timer_stop
apic_timer_stop:
        mov     $APIC_LVT_TIMER, %edi
        mov     $0x10000 | VEC_TIMER, %esi      /* masked */
        call    apic_write
        mov     $APIC_TIMER_INIT, %edi
        xor     %esi, %esi
        jmp     apic_write

/* ---- IOAPIC ------------------------------------------------------------------ */
        .globl  ioapic_route
ioapic_route:       /* edi: pin, esi: vector (edge, fixed, to APIC 0, unmasked) */
        mov     $IOAPIC_BASE, %eax
        lea     0x10(,%rdi,2), %ecx
        inc     %ecx
        mov     %ecx, (%rax)            /* IOREGSEL: high dword */
        movl    $0, 0x10(%rax)          /* destination APIC id 0 */
        dec     %ecx
        mov     %ecx, (%rax)            /* low dword */
        mov     %esi, 0x10(%rax)
        ret

/* ---- data -------------------------------------------------------------------- */
        .section .rodata
hexdigits:
        .ascii  "0123456789abcdef"
        .balign 8
idtr:
        .word   256 * 16 - 1
        .quad   idt

        .bss
        .balign 4096
high_pd:        .skip 4096
above4g_pd:     .skip 4096
idt:            .skip 256 * 16
stack:          .skip 16384
stack_top:
        .globl  boot_params
boot_params:    .skip 8
        .globl  apic_x2
ticks:          .skip 8
apic_x2:        .skip 8
pvh_nr_e820:    .skip 8
pvh_e820:       .skip 32 * 20
pvh_cmdline:    .skip 4096
