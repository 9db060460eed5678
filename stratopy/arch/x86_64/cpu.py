"""Initial vCPU state for the 64-bit Linux boot protocol.

GDT, identity page tables, segment/control registers, general registers,
FPU, boot MSRs, LAPIC LINT pins and per-vCPU CPUID (SPEC §2). Pure data
builders: the vCPU object applies them through its ioctls.
"""

from __future__ import annotations

import struct

from stratopy.arch.x86_64 import layout
from stratopy.kvm import uapi

# GDT: null, null, code (__BOOT_CS = 0x10), data (__BOOT_DS = 0x18)
GDT_FLAGS = (0, 0, 0xA09B, 0xC093)
BOOT_CS = 0x10
BOOT_DS = 0x18

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# MSRs zeroed at boot (Firecracker's create_boot_msr_entries)
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE = 1 << 11
MTRR_MEM_TYPE_WB = 6

BOOT_MSRS = (
    (MSR_IA32_SYSENTER_CS, 0),
    (MSR_IA32_SYSENTER_ESP, 0),
    (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (MSR_IA32_TSC, 0),
    (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
)

# LAPIC register offsets and delivery modes
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def gdt_entry(flags: int, base: int, limit: int) -> int:
    return (((base & 0xFF000000) << (56 - 24)) | ((flags & 0x0000F0FF) << 40)
            | ((limit & 0x000F0000) << (48 - 16)) | ((base & 0x00FFFFFF) << 16)
            | (limit & 0x0000FFFF))


def gdt_bytes() -> bytes:
    return b"".join(struct.pack("<Q", gdt_entry(f, 0, 0xFFFFF) if f else 0) for f in GDT_FLAGS)


def _segment(index: int, flags: int) -> uapi.kvm_segment:
    """Decode a GDT entry into the kvm_segment KVM wants (selector = index*8)."""
    seg = uapi.kvm_segment()
    seg.base = 0
    seg.limit = 0xFFFFFFFF  # 0xfffff with 4 KiB granularity
    seg.selector = index * 8
    seg.type = flags & 0xF
    seg.present = (flags >> 7) & 1
    seg.dpl = (flags >> 5) & 3
    seg.db = (flags >> 14) & 1
    seg.s = (flags >> 4) & 1
    seg.l = (flags >> 13) & 1
    seg.g = (flags >> 15) & 1
    seg.avl = (flags >> 12) & 1
    seg.unusable = 0 if seg.present else 1
    return seg


def page_tables() -> list[tuple[int, bytes]]:
    """PML4 -> PDPT -> PD identity-mapping the first 1 GiB with 2 MiB pages."""
    pml4 = struct.pack("<Q", layout.PDPTE_ADDR | 0x03)
    pdpt = struct.pack("<Q", layout.PDE_ADDR | 0x03)
    pd = b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512))
    return [(layout.PML4_ADDR, pml4), (layout.PDPTE_ADDR, pdpt), (layout.PDE_ADDR, pd)]


def boot_sregs(sregs: uapi.kvm_sregs) -> None:
    """Long mode, flat segments from our GDT, paging on our identity map."""
    code = _segment(2, GDT_FLAGS[2])
    data = _segment(3, GDT_FLAGS[3])
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = len(GDT_FLAGS) * 8 - 1
    sregs.idt.base = layout.IDT_ADDR
    sregs.idt.limit = 7
    sregs.cs = code
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, data)
    # KVM refuses entry without a usable TR: a busy 64-bit TSS descriptor.
    tr = uapi.kvm_segment()
    tr.limit = 0x67
    tr.type = 0xB
    tr.present = 1
    tr.selector = 0
    sregs.tr = tr
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET | X86_CR0_PG)
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 = sregs.cr4 | X86_CR4_PAE
    sregs.efer = sregs.efer | EFER_LME | EFER_LMA


def boot_regs(entry: int) -> uapi.kvm_regs:
    regs = uapi.kvm_regs()
    regs.rflags = 0x2
    regs.rip = entry
    regs.rsp = layout.BOOT_STACK_POINTER
    regs.rbp = layout.BOOT_STACK_POINTER
    regs.rsi = layout.ZERO_PAGE_ADDR
    return regs


def boot_fpu() -> uapi.kvm_fpu:
    fpu = uapi.kvm_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    return fpu


def set_lint(lapic: uapi.kvm_lapic_state) -> None:
    """LINT0 = ExtINT (the PIC), LINT1 = NMI, as a BIOS would leave them."""
    for off, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        v = struct.unpack_from("<I", lapic, off)[0]
        struct.pack_into("<I", lapic, off, (v & ~0x700) | (mode << 8))


# CPUID 0x80000007 EDX bit 8. Hidden from the guest, as QEMU's CPU models and
# its migratable `-cpu host` do: with it Linux rates kvm-clock below the TSC
# (arch/x86/kernel/kvmclock.c: 299 < 300) and keeps time with the raw TSC,
# which the monitor cannot set on a restore (on a PVM host it is the host's
# and jumps by the template's age; on another host it may tick at another
# rate). Without it the guest keeps time with kvm-clock, which the monitor
# restores as the -incoming clock= policy says (docs/snapshot.md, "Clock").
INVARIANT_TSC = 1 << 8


def filter_cpuid(entries: list, cpu_index: int, num_cpus: int) -> None:
    """Per-vCPU adjustments to KVM_GET_SUPPORTED_CPUID entries (in place).

    Leaf 1: APIC id, logical count, hypervisor bit; leaf 0xb/0x1f: x2APIC id
    and one thread per core, all cores in one package; leaf 0x80000007: no
    invariant TSC (see INVARIANT_TSC).
    """
    for e in entries:
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (cpu_index << 24) | (min(num_cpus, 255) << 16)
            e.ecx |= 1 << 31          # hypervisor present
            if num_cpus > 1:
                e.edx |= 1 << 28      # HTT: the logical count is meaningful
        elif e.function == 4:
            # cores per package - 1 in EAX[31:26]
            e.eax = (e.eax & 0x03FFFFFF) | ((min(num_cpus, 64) - 1) << 26)
        elif e.function == 0x80000007:
            e.edx &= ~INVARIANT_TSC
        elif e.function in (0xB, 0x1F):
            e.edx = cpu_index
            if e.index == 0:          # SMT level: 1 thread per core
                e.eax, e.ebx, e.ecx = 0, 1, (1 << 8) | 0
            elif e.index == 1:        # core level: every vCPU
                shift = max(num_cpus - 1, 0).bit_length()
                e.eax, e.ebx, e.ecx = shift, num_cpus, (2 << 8) | 1
            else:
                e.eax, e.ebx, e.ecx = 0, 0, e.index


BRAND_LEAVES = (0x80000002, 0x80000003, 0x80000004)


def host_brand_string(cpuinfo: str = "/proc/cpuinfo") -> bytes:
    """The host CPU's brand string (CPUID 0x80000002-4) as 48 bytes, NUL
    padded, or b"" if the host does not say. Linux's ``model name`` is that
    string with its padding stripped; reading it avoids executing CPUID from
    Python."""
    try:
        with open(cpuinfo, "rb") as f:
            for line in f:
                if line.startswith(b"model name"):
                    name = line.partition(b":")[2].strip()
                    return name[:47].ljust(48, b"\0") if name else b""
    except OSError:
        pass
    return b""


def fill_brand_string(entries: list, brand: bytes) -> bool:
    """StratoVirt gives the guest the host's brand string; KVM_GET_SUPPORTED_CPUID
    reports zeros there on some hosts (the guest's ``model name`` is then
    "19/11"). Fill leaves 0x80000002-4 from ``brand`` (48 bytes) where all
    three are present and zero; True if they were filled."""
    if len(brand) != 48:
        return False
    leaves = {e.function: e for e in entries if e.function in BRAND_LEAVES and e.index == 0}
    if len(leaves) != 3 or any(e.eax | e.ebx | e.ecx | e.edx for e in leaves.values()):
        return False
    for n, leaf in enumerate(BRAND_LEAVES):
        e = leaves[leaf]
        e.eax, e.ebx, e.ecx, e.edx = struct.unpack_from("<4I", brand, 16 * n)
    return True


# --------------------------------------------------------------------------
# CPUID in a template (SPEC §4): the entries each vCPU was given are saved;
# a restore gives them back and refuses a host lacking a feature they show.

MAX_CPUID_ENTRIES = 256
_U32 = 0xFFFFFFFF

# (leaf, subleaf) -> {register: mask of feature bits}; the bits filter_cpuid
# sets itself (hypervisor, HTT) are not host features and are left out.
FEATURE_REGS = {
    (0x1, 0): {"ecx": _U32 & ~(1 << 31), "edx": _U32 & ~(1 << 28)},
    (0x7, 0): {"ebx": _U32, "ecx": _U32, "edx": _U32},
    (0x7, 1): {"eax": _U32, "edx": _U32},
    (0xD, 0): {"eax": _U32, "edx": _U32},           # XCR0 state components
    (0xD, 1): {"eax": _U32},                        # XSAVEOPT/XSAVEC/XGETBV1/XSAVES
    (0x80000001, 0): {"ecx": _U32, "edx": _U32},
    (0x80000007, 0): {"edx": _U32},
    (0x80000008, 0): {"ebx": _U32},
}

FEATURE_NAMES = {
    (0x1, "ecx"): {0: "sse3", 1: "pclmulqdq", 9: "ssse3", 12: "fma", 13: "cx16",
                   19: "sse4_1", 20: "sse4_2", 21: "x2apic", 22: "movbe", 23: "popcnt",
                   24: "tsc_deadline_timer", 25: "aes", 26: "xsave", 28: "avx",
                   29: "f16c", 30: "rdrand"},
    (0x1, "edx"): {0: "fpu", 4: "tsc", 5: "msr", 6: "pae", 8: "cx8", 9: "apic",
                   11: "sep", 13: "pge", 15: "cmov", 19: "clflush", 23: "mmx",
                   24: "fxsr", 25: "sse", 26: "sse2"},
    (0x7, "ebx"): {0: "fsgsbase", 3: "bmi1", 5: "avx2", 7: "smep", 8: "bmi2",
                   9: "erms", 10: "invpcid", 16: "avx512f", 18: "rdseed", 19: "adx",
                   20: "smap", 23: "clflushopt", 24: "clwb", 29: "sha_ni"},
    (0x7, "ecx"): {1: "avx512vbmi", 2: "umip", 3: "pku", 5: "waitpkg", 8: "gfni",
                   9: "vaes", 10: "vpclmulqdq", 22: "rdpid", 27: "movdiri"},
    (0x7, "edx"): {4: "fsrm", 8: "avx512_vp2intersect", 10: "md_clear",
                   14: "serialize", 26: "ibrs", 27: "stibp", 29: "arch_capabilities",
                   31: "ssbd"},
    (0xD, "eax"): {0: "x87 state", 1: "sse state", 2: "avx state", 5: "avx512 opmask",
                   6: "avx512 zmm_hi256", 7: "avx512 hi16_zmm", 9: "pkru state"},
    (0x80000001, "ecx"): {0: "lahf_lm", 5: "abm", 6: "sse4a", 8: "3dnowprefetch"},
    (0x80000001, "edx"): {11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp",
                          29: "lm"},
    (0x80000007, "edx"): {8: "invariant tsc"},
}


def cpuid_to_plain(cpuid) -> list[list[int]]:
    """A kvm_cpuid2 as [[function, index, flags, eax, ebx, ecx, edx], ...]."""
    return [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx]
            for e in cpuid.entries[:cpuid.nent]]


def cpuid_from_plain(entries: object, path: str):
    """A kvm_cpuid2 from saved entries (untrusted: TemplateError naming the path)."""
    from stratopy.errors import TemplateError
    if type(entries) is not list or not 0 < len(entries) <= MAX_CPUID_ENTRIES:
        raise TemplateError(f"{path}: expected a list of 1-{MAX_CPUID_ENTRIES} CPUID entries")
    cpuid = uapi.kvm_cpuid2_n(len(entries))()
    cpuid.nent = len(entries)
    seen = set()
    for i, e in enumerate(entries):
        if (type(e) is not list or len(e) != 7
                or any(type(v) is not int or not 0 <= v <= _U32 for v in e)):
            raise TemplateError(f"{path}[{i}]: expected 7 unsigned 32-bit integers")
        if (e[0], e[1]) in seen:
            raise TemplateError(f"{path}[{i}]: leaf {e[0]:#x} subleaf {e[1]} given twice")
        seen.add((e[0], e[1]))
        c = cpuid.entries[i]
        c.function, c.index, c.flags, c.eax, c.ebx, c.ecx, c.edx = e
    return cpuid


def cpuids_from_plain(saved: object, num_cpus: int) -> list:
    from stratopy.errors import TemplateError
    if type(saved) is not list or len(saved) != num_cpus:
        raise TemplateError(f"meta.cpuid: expected the CPUID of {num_cpus} vCPU(s)")
    return [cpuid_from_plain(e, f"meta.cpuid[{i}]") for i, e in enumerate(saved)]


def _entry_map(cpuid) -> dict:
    out = {}
    for e in cpuid.entries[:cpuid.nent]:
        out.setdefault((e.function, e.index), e)
        out.setdefault((e.function, None), e)      # for leaves without subleaves
    return out


def missing_features(saved, host) -> list[str]:
    """Feature bits the ``saved`` CPUID shows and ``host`` (this host's
    KVM_GET_SUPPORTED_CPUID) lacks, named ("avx2 (leaf 0x7.0 ebx bit 5)")."""
    have = _entry_map(host)
    out = []
    for e in saved.entries[:saved.nent]:
        regs = FEATURE_REGS.get((e.function, e.index))
        if regs is None:
            continue
        h = have.get((e.function, e.index)) or (have.get((e.function, None))
                                                 if e.index == 0 else None)
        for reg, mask in regs.items():
            lacking = getattr(e, reg) & mask & ~(getattr(h, reg) if h is not None else 0)
            for bit in range(32):
                if lacking >> bit & 1:
                    name = FEATURE_NAMES.get((e.function, reg), {}).get(bit, "feature")
                    out.append(f"{name} (CPUID leaf {e.function:#x}.{e.index} "
                               f"{reg} bit {bit})")
    return out


def check_cpuid_supported(saved_list: list, host) -> None:
    from stratopy.errors import TemplateError
    for i, saved in enumerate(saved_list):
        lacking = missing_features(saved, host)
        if lacking:
            more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
            raise TemplateError(f"this host lacks a CPU feature the template's guest saw "
                                f"(vCPU {i}): {', '.join(lacking[:3])}{more}")
