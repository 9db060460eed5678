"""x86_64 vCPU set-up (stratopy/arch/x86_64/cpu.py): GDT, page tables,
sregs, regs, CPUID filtering and the brand string. Pure data, no KVM."""

from __future__ import annotations

import ctypes
import struct

import pytest

from stratopy.arch.x86_64 import cpu
from stratopy.kvm import uapi

MiB = 1 << 20


def u64(b, off):
    return struct.unpack_from("<Q", b, off)[0]


# ---------------------------------------------------------------------------
# cpu.py: GDT, page tables, sregs, regs, CPUID

def test_gdt_entries_known_values():
    assert cpu.gdt_entry(0xA09B, 0, 0xFFFFF) == 0x00AF9B000000FFFF
    assert cpu.gdt_entry(0xC093, 0, 0xFFFFF) == 0x00CF93000000FFFF
    assert cpu.gdt_bytes() == struct.pack("<4Q", 0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)


def test_page_tables_identity_map_first_gib():
    pts = dict(cpu.page_tables())
    assert set(pts) == {0x9000, 0xA000, 0xB000}
    pml4, pdpt, pd = pts[0x9000], pts[0xA000], pts[0xB000]
    assert u64(pml4, 0) == 0xA000 | 0x3        # present | writable -> PDPT
    assert u64(pdpt, 0) == 0xB000 | 0x3        # -> PD
    assert len(pd) == 512 * 8
    for i in range(512):
        assert u64(pd, 8 * i) == (i << 21) | 0x83   # 2 MiB page, P|RW|PS
    # tables do not overlap each other or the zero page / stack
    for gpa, data in pts.items():
        assert gpa % 4096 == 0 and len(data) <= 4096


def _decode_gdt(desc: int) -> dict:
    access = (desc >> 40) & 0xFF
    flags = (desc >> 52) & 0xF
    return {"type": access & 0xF, "s": (access >> 4) & 1, "dpl": (access >> 5) & 3,
            "present": access >> 7, "avl": flags & 1, "l": (flags >> 1) & 1,
            "db": (flags >> 2) & 1, "g": (flags >> 3) & 1}


def test_boot_sregs_long_mode():
    s = uapi.kvm_sregs()
    cpu.boot_sregs(s)
    assert s.cs.selector == 0x10
    assert s.cs.l == 1 and s.cs.db == 0 and s.cs.present == 1 and s.cs.s == 1
    assert s.cs.type == 0xB and s.cs.dpl == 0 and s.cs.g == 1
    assert s.cs.base == 0 and s.cs.limit == 0xFFFFFFFF
    for name in ("ds", "es", "fs", "gs", "ss"):
        seg = getattr(s, name)
        assert seg.selector == 0x18, name
        assert seg.type == 0x3 and seg.present == 1 and seg.db == 1 and seg.l == 0, name
        assert seg.unusable == 0, name
    assert s.tr.present == 1 and s.tr.type == 0xB     # KVM wants a usable busy TSS
    assert s.gdt.base == 0x500 and s.gdt.limit == 4 * 8 - 1
    assert s.idt.base == 0x520
    assert s.cr0 & 1 and s.cr0 & (1 << 31)             # PE | PG
    assert s.cr4 & (1 << 5)                            # PAE
    assert s.efer & (1 << 8) and s.efer & (1 << 10)    # LME | LMA
    assert s.cr3 == 0x9000
    # the hidden segment state matches the descriptors the guest sees in the GDT
    gdt = cpu.gdt_bytes()
    for seg, sel in ((s.cs, 0x10), (s.ds, 0x18)):
        d = _decode_gdt(u64(gdt, sel))
        for k, v in d.items():
            assert getattr(seg, k) == v, (sel, k)


def test_boot_sregs_keeps_existing_control_bits():
    s = uapi.kvm_sregs()
    s.cr0 = 0x60000010      # KVM's reset value (CD|NW|ET)
    s.cr4 = 1 << 9          # OSFXSR
    cpu.boot_sregs(s)
    assert s.cr0 & 0x60000010 == 0x60000010
    assert s.cr4 & (1 << 9)


def test_boot_regs():
    r = cpu.boot_regs(0x1000000)
    assert r.rip == 0x1000000
    assert r.rsp == 0x8FF0
    assert r.rsi == 0x7000
    assert r.rflags == 2
    assert r.rax == r.rbx == r.rcx == r.rdx == r.rdi == 0


def _cpuid_entries():
    leaves = [(0, 0), (1, 0), (4, 0), (0xB, 0), (0xB, 1), (0xB, 2), (0x1F, 0), (0x1F, 1),
              (0x1F, 2)]
    out = []
    for fn, idx in leaves:
        e = uapi.kvm_cpuid_entry2()
        e.function, e.index = fn, idx
        e.eax, e.ebx, e.ecx, e.edx = 0x11111111, 0xAABBCCDD, 0x00000001, 0x00000002
        out.append(e)
    return out


@pytest.mark.parametrize("n,idx", [(4, 0), (4, 3), (1, 0), (5, 2), (254, 253)])
def test_filter_cpuid(n, idx):
    entries = _cpuid_entries()
    cpu.filter_cpuid(entries, idx, n)
    by = {(e.function, e.index): e for e in entries}
    l0 = by[(0, 0)]
    assert (l0.eax, l0.ebx, l0.ecx, l0.edx) == (0x11111111, 0xAABBCCDD, 1, 2)  # untouched
    l1 = by[(1, 0)]
    assert l1.ebx >> 24 == idx                        # initial APIC id
    assert (l1.ebx >> 16) & 0xFF == min(n, 255)       # logical processor count
    assert l1.ebx & 0xFFFF == 0xCCDD                  # rest preserved
    assert l1.ecx & (1 << 31)                         # hypervisor present
    assert l1.ecx & 1                                 # other feature bits preserved
    assert bool(l1.edx & (1 << 28)) == (n > 1)        # HTT only with several CPUs
    for fn in (0xB, 0x1F):
        for sub in (0, 1, 2):
            assert by[(fn, sub)].edx == idx           # x2APIC id = cpu index
        smt, core, inval = by[(fn, 0)], by[(fn, 1)], by[(fn, 2)]
        assert smt.ebx == 1 and (smt.ecx >> 8) & 0xFF == 1 and smt.ecx & 0xFF == 0
        assert core.ebx == n and (core.ecx >> 8) & 0xFF == 2 and core.ecx & 0xFF == 1
        assert (1 << (core.eax & 0x1F)) >= n          # shift covers every APIC id
        assert (inval.ecx >> 8) & 0xFF == 0           # level type invalid ends the list


def test_filter_cpuid_hides_the_invariant_tsc():
    # With it Linux keeps time with the raw TSC (kvm-clock rated 299), which a
    # restore cannot set on PVM; without it, with kvm-clock (docs/snapshot.md).
    from stratopy.kvm import uapi

    e = uapi.kvm_cpuid_entry2()
    e.function, e.eax, e.ebx, e.ecx, e.edx = 0x80000007, 1, 2, 3, 0x1FF
    cpu.filter_cpuid([e], 0, 1)
    assert (e.eax, e.ebx, e.ecx, e.edx) == (1, 2, 3, 0x0FF)


def test_filter_cpuid_modifies_a_kvm_cpuid2_buffer_in_place():
    # microvm.py passes ``cpuid.entries[:nent]``: the slice must alias the buffer
    n = 3
    buf = uapi.kvm_cpuid2_n(n)()
    buf.nent = n
    for i, fn in enumerate((0, 1, 0xB)):
        buf.entries[i].function = fn
    cpu.filter_cpuid(buf.entries[:buf.nent], 2, 4)
    raw = bytes(buf)
    e1 = uapi.kvm_cpuid_entry2.from_buffer_copy(raw, 8 + ctypes.sizeof(uapi.kvm_cpuid_entry2))
    assert e1.function == 1 and e1.ebx >> 24 == 2 and e1.ecx & (1 << 31)
    eb = uapi.kvm_cpuid_entry2.from_buffer_copy(raw, 8 + 2 * ctypes.sizeof(uapi.kvm_cpuid_entry2))
    assert eb.function == 0xB and eb.edx == 2


# --- CPUID brand string (issue 12: the guest's model name is the host's) -------

def _brand_entries(values=None):
    from stratopy.kvm import uapi

    entries = []
    for leaf in (0x80000000, 0x80000002, 0x80000003, 0x80000004):
        e = uapi.kvm_cpuid_entry2()
        e.function = leaf
        entries.append(e)
    entries[0].eax = 0x80000008
    if values:
        entries[1].eax = values
    return entries


def test_brand_string_from_cpuinfo_fills_zero_leaves(tmp_path):
    from stratopy.arch.x86_64 import cpu

    info = tmp_path / "cpuinfo"
    info.write_bytes(b"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t: fpu\n")
    brand = cpu.host_brand_string(str(info))
    assert brand == b"Intel(R) Xeon(R) Processor".ljust(48, b"\0")
    entries = _brand_entries()
    assert cpu.fill_brand_string(entries, brand)
    raw = b"".join(struct.pack("<4I", e.eax, e.ebx, e.ecx, e.edx) for e in entries[1:])
    assert raw == brand
    # Linux reads it as the guest's model name: the bytes up to the first NUL.
    assert raw.split(b"\0")[0].decode() == "Intel(R) Xeon(R) Processor"


def test_brand_string_kept_when_kvm_reports_one_and_absent_host_name(tmp_path):
    from stratopy.arch.x86_64 import cpu

    entries = _brand_entries(values=0x65746e49)          # KVM passed a brand through
    assert not cpu.fill_brand_string(entries, b"x" * 48)
    assert entries[1].eax == 0x65746e49 and entries[1].ebx == 0
    info = tmp_path / "cpuinfo"
    info.write_bytes(b"processor\t: 0\n")
    assert cpu.host_brand_string(str(info)) == b""
    assert not cpu.fill_brand_string(_brand_entries(), b"")
    long = tmp_path / "long"
    long.write_bytes(b"model name\t: " + b"A" * 60 + b"\n")
    assert cpu.host_brand_string(str(long)) == b"A" * 47 + b"\0"
