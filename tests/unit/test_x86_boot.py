"""x86_64 microvm boot: layout, zero page/e820, kernel/initrd loaders, MP table
(the vCPU set-up of cpu.py: test_x86_cpu.py).

Everything here is pure data (no KVM): guest RAM is anonymous memory from
``GuestMemory.anonymous``; kernels are synthetic ELF/bzImage files built by
the tests.
"""

from __future__ import annotations

import struct

import pytest

from stratopy.arch.x86_64 import boot, layout, mptable
from stratopy.arch.x86_64.boot import KernelError
from stratopy.memory import GuestMemory

MiB = 1 << 20
GiB = 1 << 30

# boot_params / setup_header offsets straight from Linux's bootparam.h and
# Documentation/arch/x86/boot.rst (deliberately not taken from boot.py).
ZP_EXT_RAMDISK_IMAGE = 0x0C0
ZP_EXT_RAMDISK_SIZE = 0x0C4
ZP_E820_ENTRIES = 0x1E8
ZP_SETUP_SECTS = 0x1F1
ZP_BOOT_FLAG = 0x1FE
ZP_JUMP = 0x200
ZP_HEADER = 0x202
ZP_VERSION = 0x206
ZP_TYPE_OF_LOADER = 0x210
ZP_LOADFLAGS = 0x211
ZP_CODE32_START = 0x214
ZP_RAMDISK_IMAGE = 0x218
ZP_RAMDISK_SIZE = 0x21C
ZP_HEAP_END_PTR = 0x224
ZP_CMD_LINE_PTR = 0x228
ZP_INITRD_ADDR_MAX = 0x22C
ZP_XLOADFLAGS = 0x236
ZP_CMDLINE_SIZE = 0x238
ZP_E820_TABLE = 0x2D0

E820_RAM = 1
E820_RESERVED = 2


def u8(b, off):
    return b[off]


def u16(b, off):
    return struct.unpack_from("<H", b, off)[0]


def u32(b, off):
    return struct.unpack_from("<I", b, off)[0]


def e820_from_zero_page(zp: bytes) -> list[tuple[int, int, int]]:
    n = zp[ZP_E820_ENTRIES]
    return [struct.unpack_from("<QQI", zp, ZP_E820_TABLE + 20 * i) for i in range(n)]


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, 64 * MiB)])
    yield m
    m.close()


# ---------------------------------------------------------------------------
# layout.ram_layout and the e820 map in the zero page

def test_ram_layout_split_around_the_hole():
    assert layout.ram_layout(256 * MiB) == [(0, 256 * MiB)]
    assert layout.ram_layout(3 * GiB) == [(0, 3 * GiB)]
    assert layout.ram_layout(3 * GiB + 4096) == [(0, 3 * GiB), (4 * GiB, 4096)]
    assert layout.ram_layout(6 * GiB) == [(0, 3 * GiB), (4 * GiB, 3 * GiB)]
    for size in (256 * MiB, 3 * GiB, 5 * GiB, 64 * GiB):
        regions = layout.ram_layout(size)
        assert sum(s for _, s in regions) == size
        for gpa, s in regions:  # nothing in the 32-bit MMIO hole
            assert gpa + s <= 3 * GiB or gpa >= 4 * GiB


def _elf_kernel() -> boot.LoadedKernel:
    return boot.LoadedKernel(entry=0x1000000, end=0x1200000, setup_header=b"")


def test_e820_in_zero_page_256m():
    zp = boot.build_zero_page(_elf_kernel(), 256 * MiB, None)
    assert len(zp) == 4096
    assert e820_from_zero_page(zp) == [
        (0, 0x9FC00, E820_RAM),
        (0x9FC00, 0x400, E820_RESERVED),
        (0xD0000, 0x30000, E820_RESERVED),
        (0x100000, 256 * MiB - 0x100000, E820_RAM),
    ]


def test_e820_in_zero_page_exactly_3g():
    zp = boot.build_zero_page(_elf_kernel(), 3 * GiB, None)
    e = e820_from_zero_page(zp)
    assert e[-1] == (0x100000, 3 * GiB - 0x100000, E820_RAM)
    assert len(e) == 4


@pytest.mark.parametrize("mem_size", [4 * GiB, 6 * GiB + 2 * MiB])
def test_e820_in_zero_page_above_4g(mem_size):
    zp = boot.build_zero_page(_elf_kernel(), mem_size, None)
    e = e820_from_zero_page(zp)
    assert e == [
        (0, 0x9FC00, E820_RAM),
        (0x9FC00, 0x400, E820_RESERVED),
        (0xD0000, 0x30000, E820_RESERVED),
        (0x100000, 3 * GiB - 0x100000, E820_RAM),
        (4 * GiB, mem_size - 3 * GiB, E820_RAM),
    ]
    # Every RAM entry is backed by a ram_layout region; none touches the hole.
    regions = layout.ram_layout(mem_size)
    for addr, size, typ in e:
        assert not (addr < 4 * GiB and addr + size > 3 * GiB)
        if typ == E820_RAM:
            assert any(g <= addr and addr + size <= g + s for g, s in regions)
    assert sum(s for _, s, t in e if t == E820_RAM) == mem_size - 0x100000 + 0x9FC00


def test_zero_page_fields_for_elf_without_initrd():
    zp = boot.build_zero_page(_elf_kernel(), 256 * MiB, None)
    assert u16(zp, ZP_BOOT_FLAG) == 0xAA55
    assert zp[ZP_HEADER:ZP_HEADER + 4] == b"HdrS"
    assert u16(zp, ZP_VERSION) >= 0x020C
    assert u8(zp, ZP_TYPE_OF_LOADER) == 0xFF
    assert u32(zp, ZP_CMD_LINE_PTR) == 0x20000
    assert u8(zp, ZP_LOADFLAGS) & 0x01          # LOADED_HIGH
    assert u8(zp, ZP_LOADFLAGS) & 0x80          # CAN_USE_HEAP
    assert u16(zp, ZP_HEAP_END_PTR) == 0xFE00
    assert u32(zp, ZP_CMDLINE_SIZE) == layout.CMDLINE_MAX - 1
    # no initrd: all ramdisk fields zero
    for off in (ZP_RAMDISK_IMAGE, ZP_RAMDISK_SIZE, ZP_EXT_RAMDISK_IMAGE, ZP_EXT_RAMDISK_SIZE):
        assert u32(zp, off) == 0


def test_zero_page_ramdisk_fields():
    zp = boot.build_zero_page(_elf_kernel(), 256 * MiB, (0x0FF00000, 0x123456))
    assert u32(zp, ZP_RAMDISK_IMAGE) == 0x0FF00000
    assert u32(zp, ZP_RAMDISK_SIZE) == 0x123456
    assert u32(zp, ZP_EXT_RAMDISK_IMAGE) == 0
    assert u32(zp, ZP_EXT_RAMDISK_SIZE) == 0
    # 64-bit values are split into the ext_ fields
    zp = boot.build_zero_page(_elf_kernel(), 8 * GiB, (0x1_2345_6000, 0x1_0000_1000))
    assert u32(zp, ZP_RAMDISK_IMAGE) == 0x2345_6000
    assert u32(zp, ZP_EXT_RAMDISK_IMAGE) == 0x1
    assert u32(zp, ZP_RAMDISK_SIZE) == 0x1000
    assert u32(zp, ZP_EXT_RAMDISK_SIZE) == 0x1


# ---------------------------------------------------------------------------
# ELF vmlinux loader

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
EM_X86_64 = 62
EM_AARCH64 = 183
PT_LOAD = 1
PT_NOTE = 4


def make_elf(segments, entry, machine=EM_X86_64, ei_class=2, ei_data=1) -> bytes:
    """segments: list of (p_type, paddr, data, memsz)."""
    ident = b"\x7fELF" + bytes([ei_class, ei_data, 1, 0]) + bytes(8)
    phoff = EHDR.size
    data_off = phoff + PHDR.size * len(segments)
    phdrs = b""
    body = b""
    for p_type, paddr, data, memsz in segments:
        off = data_off + len(body)
        phdrs += PHDR.pack(p_type, 5, off, (0xFFFFFFFF80000000 + paddr) & ((1 << 64) - 1), paddr,
                           len(data), memsz, 0x1000)
        body += data
    ehdr = EHDR.pack(ident, 2, machine, 1, entry, phoff, 0, 0, EHDR.size,
                     PHDR.size, len(segments), 0, 0, 0)
    return ehdr + phdrs + body


def write_file(tmp_path, name, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_elf_loads_segments_and_zero_fills_bss(mem, tmp_path):
    text = bytes(range(256)) * 4          # 1 KiB
    rodata = b"stratopy-rodata!" * 8      # 128 bytes
    bss_paddr = 0x2000000
    # pre-dirty the bss range: the loader must zero it, not rely on fresh RAM
    mem.write(bss_paddr + 16, b"\xAA" * 0x1000)
    elf = make_elf([
        (PT_LOAD, 0x1000000, text, len(text)),
        (PT_NOTE, 0x7FFFFFFF0000, b"ignored", 7),   # not PT_LOAD: never loaded
        (PT_LOAD, bss_paddr, rodata[:16], 16 + 0x1000),
        (PT_LOAD, 0x1800000, rodata, len(rodata)),
    ], entry=0x1000000 + 0x40)
    k = boot.load_kernel(mem, write_file(tmp_path, "vmlinux", elf))
    assert k.entry == 0x1000040
    assert k.setup_header == b""
    assert k.end == bss_paddr + 16 + 0x1000
    assert mem.read(0x1000000, len(text)) == text
    assert mem.read(0x1800000, len(rodata)) == rodata
    assert mem.read(bss_paddr, 16) == rodata[:16]
    assert mem.read(bss_paddr + 16, 0x1000) == bytes(0x1000)


@pytest.mark.parametrize("paddr,memsz", [
    (63 * MiB, 2 * MiB),        # runs past the end of 64 MiB RAM
    (128 * MiB, 0x100),         # entirely outside RAM
    (0x10000, 0x100),           # below 1 MiB (would clobber the boot structures)
])
def test_elf_segment_outside_ram(mem, tmp_path, paddr, memsz):
    elf = make_elf([(PT_LOAD, paddr, b"x" * 0x100, memsz)], entry=paddr)
    with pytest.raises(KernelError):
        boot.load_kernel(mem, write_file(tmp_path, "vmlinux", elf))


def test_elf_entry_outside_ram(mem, tmp_path):
    elf = make_elf([(PT_LOAD, 0x1000000, b"x" * 16, 16)], entry=0xFFFFFFFF81000000)
    with pytest.raises(KernelError):
        boot.load_kernel(mem, write_file(tmp_path, "vmlinux", elf))


@pytest.mark.parametrize("kw", [
    {"machine": EM_AARCH64},
    {"ei_class": 1},          # ELFCLASS32
    {"ei_data": 2},           # big endian
])
def test_elf_not_x86_64(mem, tmp_path, kw):
    elf = make_elf([(PT_LOAD, 0x1000000, b"x" * 16, 16)], entry=0x1000000, **kw)
    with pytest.raises(KernelError, match="x86_64"):
        boot.load_kernel(mem, write_file(tmp_path, "vmlinux", elf))


def test_elf_without_load_segment(mem, tmp_path):
    elf = make_elf([(PT_NOTE, 0x1000000, b"x" * 16, 16)], entry=0x1000000)
    with pytest.raises(KernelError):
        boot.load_kernel(mem, write_file(tmp_path, "vmlinux", elf))


def test_elf_truncated(mem, tmp_path):
    elf = make_elf([(PT_LOAD, 0x1000000, b"x" * 4096, 4096)], entry=0x1000000)
    with pytest.raises(KernelError):
        boot.load_kernel(mem, write_file(tmp_path, "vmlinux", elf[:-100]))  # segment data cut
    with pytest.raises(KernelError):
        boot.load_kernel(mem, write_file(tmp_path, "vmlinux2", elf[:40]))   # header cut


@pytest.mark.parametrize("data", [b"", b"garbage" * 1000, bytes(8192)])
def test_garbage_kernel(mem, tmp_path, data):
    with pytest.raises(KernelError):
        boot.load_kernel(mem, write_file(tmp_path, "junk", data))


def test_missing_kernel_file(mem, tmp_path):
    with pytest.raises(KernelError):
        boot.load_kernel(mem, str(tmp_path / "nope"))


# ---------------------------------------------------------------------------
# bzImage loader

PAYLOAD = bytes((i * 7 + 3) & 0xFF for i in range(0x3000))


def make_bzimage(setup_sects=2, version=0x020F, xloadflags=0x1, code32_start=0x100000,
                 payload=PAYLOAD, jump_len=0x66) -> bytes:
    sects = setup_sects or 4
    img = bytearray((sects + 1) * 512)
    img[ZP_SETUP_SECTS] = setup_sects
    struct.pack_into("<H", img, ZP_BOOT_FLAG, 0xAA55)
    img[ZP_JUMP] = 0xEB
    img[ZP_JUMP + 1] = jump_len
    img[ZP_HEADER:ZP_HEADER + 4] = b"HdrS"
    struct.pack_into("<H", img, ZP_VERSION, version)
    img[ZP_LOADFLAGS] = 0x01
    struct.pack_into("<I", img, ZP_CODE32_START, code32_start)
    struct.pack_into("<I", img, ZP_INITRD_ADDR_MAX, 0x7FFFFFFF)
    struct.pack_into("<H", img, ZP_XLOADFLAGS, xloadflags)
    struct.pack_into("<I", img, ZP_CMDLINE_SIZE, 2047)
    # bytes just past the header (0x202 + jump_len) must NOT be copied
    end = ZP_HEADER + jump_len
    img[end:end + 8] = b"\xEE" * 8
    return bytes(img) + payload


@pytest.mark.parametrize("setup_sects", [2, 0])   # 0 means 4 (boot protocol)
def test_bzimage_payload_at_1mib(mem, tmp_path, setup_sects):
    img = make_bzimage(setup_sects=setup_sects)
    k = boot.load_kernel(mem, write_file(tmp_path, "bzImage", img))
    assert k.entry == 0x100000 + 0x200
    assert k.end == 0x100000 + len(PAYLOAD)
    assert mem.read(0x100000, len(PAYLOAD)) == PAYLOAD
    assert k.setup_header == img[0x1F1:0x202 + 0x66]


def test_bzimage_setup_header_in_zero_page(mem, tmp_path):
    img = make_bzimage()
    k = boot.load_kernel(mem, write_file(tmp_path, "bzImage", img))
    zp = boot.build_zero_page(k, 256 * MiB, (0x0F000000, 0x5000))
    # copied from the kernel
    assert zp[ZP_SETUP_SECTS] == 2
    assert u16(zp, ZP_BOOT_FLAG) == 0xAA55
    assert zp[ZP_HEADER:ZP_HEADER + 4] == b"HdrS"
    assert u16(zp, ZP_VERSION) == 0x020F
    assert u32(zp, ZP_CODE32_START) == 0x100000
    assert u32(zp, ZP_INITRD_ADDR_MAX) == 0x7FFFFFFF
    assert u16(zp, ZP_XLOADFLAGS) == 0x1
    assert u32(zp, ZP_CMDLINE_SIZE) == 2047      # the kernel's limit, not ours
    # header ends at 0x202 + byte at 0x201
    end = 0x202 + 0x66
    assert zp[end:end + 8] == bytes(8)
    # filled in by the loader
    assert zp[ZP_TYPE_OF_LOADER] == 0xFF
    assert zp[ZP_LOADFLAGS] == 0x01 | 0x80
    assert u32(zp, ZP_CMD_LINE_PTR) == 0x20000
    assert u32(zp, ZP_RAMDISK_IMAGE) == 0x0F000000
    assert u32(zp, ZP_RAMDISK_SIZE) == 0x5000
    assert len(e820_from_zero_page(zp)) == 4


@pytest.mark.parametrize("version", [0x0200, 0x020B])
def test_bzimage_too_old_protocol(mem, tmp_path, version):
    with pytest.raises(KernelError, match="too old"):
        boot.load_kernel(mem, write_file(tmp_path, "bzImage", make_bzimage(version=version)))


def test_bzimage_without_64bit_entry(mem, tmp_path):
    with pytest.raises(KernelError, match="64-bit"):
        boot.load_kernel(mem, write_file(tmp_path, "bzImage", make_bzimage(xloadflags=0)))


def test_bzimage_truncated_after_setup(mem, tmp_path):
    img = make_bzimage(payload=b"")
    with pytest.raises(KernelError):
        boot.load_kernel(mem, write_file(tmp_path, "bzImage", img))


def test_bzimage_too_big_for_ram(tmp_path):
    with GuestMemory.anonymous([(0, 2 * MiB)]) as small:
        img = make_bzimage(payload=bytes(1536 * 1024))
        with pytest.raises(KernelError):
            boot.load_kernel(small, write_file(tmp_path, "bzImage", img))


def test_bzimage_header_cut_short(mem, tmp_path):
    img = make_bzimage()[:0x210]
    with pytest.raises(KernelError):
        boot.load_kernel(mem, write_file(tmp_path, "bzImage", img))


# ---------------------------------------------------------------------------
# initrd and command line

def test_initrd_placement(mem, tmp_path):
    data = bytes((i * 13) & 0xFF for i in range(10000))   # not a page multiple
    path = write_file(tmp_path, "initrd", data)
    kernel_end = 0x100000 + 0x3000
    addr, size = boot.load_initrd(mem, path, kernel_end, 64 * MiB)
    assert size == len(data)
    assert addr % 4096 == 0
    assert addr + size <= 64 * MiB
    assert 64 * MiB - (addr + size) < 4096           # as high as possible
    assert addr >= kernel_end
    assert mem.read(addr, size) == data


def test_initrd_respects_ram_below_4g_argument(mem, tmp_path):
    path = write_file(tmp_path, "initrd", b"\x5A" * 5000)
    addr, size = boot.load_initrd(mem, path, 0x200000, 32 * MiB)
    assert addr + size <= 32 * MiB and addr % 4096 == 0
    assert mem.read(addr, size) == b"\x5A" * 5000


def test_bzimage_initrd_addr_max_caps_the_placement(tmp_path):
    """A bzImage's initrd_addr_max (0x7FFFFFFF here) bounds the initrd even
    when RAM below the MMIO gap reaches 3 GiB; an ELF states no limit."""
    big = GuestMemory.anonymous([(0, 3 * 1024 * MiB)])
    try:
        k = boot.load_kernel(big, write_file(tmp_path, "bzImage", make_bzimage()))
        assert k.initrd_addr_max == 0x7FFFFFFF
        path = write_file(tmp_path, "initrd", b"\x33" * 9000)
        addr, size = boot.load_initrd(big, path, k.end, 3 * 1024 * MiB, k.initrd_addr_max)
        assert addr + size - 1 <= 0x7FFFFFFF and 0x80000000 - (addr + size) < 4096
        assert big.read(addr, size) == b"\x33" * 9000
        addr, size = boot.load_initrd(big, path, k.end, 3 * 1024 * MiB)
        assert 3 * 1024 * MiB - (addr + size) < 4096     # no limit given: top of RAM
    finally:
        big.close()


def test_initrd_does_not_fit_above_kernel(mem, tmp_path):
    path = write_file(tmp_path, "initrd", bytes(8 * MiB))
    with pytest.raises(KernelError):
        boot.load_initrd(mem, path, 60 * MiB, 64 * MiB)


def test_initrd_bigger_than_ram(mem, tmp_path):
    path = write_file(tmp_path, "initrd", bytes(65 * MiB))
    with pytest.raises(KernelError):
        boot.load_initrd(mem, path, 0x200000, 64 * MiB)


def test_initrd_empty_or_missing(mem, tmp_path):
    with pytest.raises(KernelError):
        boot.load_initrd(mem, write_file(tmp_path, "empty", b""), 0x200000, 64 * MiB)
    with pytest.raises(KernelError):
        boot.load_initrd(mem, str(tmp_path / "missing"), 0x200000, 64 * MiB)


def test_write_cmdline(mem):
    mem.write(0x20000, b"\xFF" * 64)
    n = boot.write_cmdline(mem, "console=ttyS0 panic=1")
    assert n == len("console=ttyS0 panic=1")
    assert mem.read(0x20000, n + 1) == b"console=ttyS0 panic=1\0"


def test_write_cmdline_limit(mem):
    longest = "a" * (layout.CMDLINE_MAX - 1)
    assert boot.write_cmdline(mem, longest) == len(longest)
    assert mem.read(0x20000 + len(longest), 1) == b"\0"
    with pytest.raises(KernelError):
        boot.write_cmdline(mem, "a" * layout.CMDLINE_MAX)


# ---------------------------------------------------------------------------
# MP table

MPF = struct.Struct("<4sIBBBBBBBB")
MPC = struct.Struct("<4sHBB8s12sIHHIHBB")


def parse_mptable(base: int, blob: bytes):
    mpf = MPF.unpack_from(blob, 0)
    sig, physptr, length, spec, _checksum = mpf[:5]
    off = physptr - base
    hdr = MPC.unpack_from(blob, off)
    (csig, clen, cspec, _ck, _oem, _prod, _oemptr, _oemsize, count, lapic, *_r) = hdr
    table = blob[off:off + clen]
    entries = []
    pos = MPC.size
    for _ in range(count):
        t = table[pos]
        size = 20 if t == 0 else 8
        entries.append(table[pos:pos + size])
        pos += size
    return {
        "mpf": blob[:16], "sig": sig, "physptr": physptr, "length": length, "spec": spec,
        "csig": csig, "clen": clen, "cspec": cspec, "count": count, "lapic": lapic,
        "table": table, "entries": entries, "end": pos,
    }


@pytest.mark.parametrize("n", [1, 2, 4, 17, 254])
def test_mptable(n):
    base, blob = mptable.build(n)
    assert base == 0x9FC00
    t = parse_mptable(base, blob)
    # floating pointer
    assert t["sig"] == b"_MP_"
    assert sum(t["mpf"]) & 0xFF == 0
    assert t["length"] == 1 and t["spec"] == 4
    assert t["physptr"] == 0x9FC10
    # configuration table
    assert t["csig"] == b"PCMP"
    assert t["clen"] == len(blob) - 16 == t["end"]
    assert sum(t["table"]) & 0xFF == 0
    assert t["lapic"] == 0xFEE00000
    types = [e[0] for e in t["entries"]]
    assert types == [0] * n + [1, 2] + [3] * 24 + [4, 4]
    # processors: APIC id = index, enabled, BSP flag on cpu 0 only
    procs = [struct.unpack("<BBBBIIII", e) for e in t["entries"] if e[0] == 0]
    assert [p[1] for p in procs] == list(range(n))
    assert all(p[3] & 1 for p in procs)
    assert [bool(p[3] & 2) for p in procs] == [True] + [False] * (n - 1)
    # ISA bus
    bus = next(e for e in t["entries"] if e[0] == 1)
    assert bus[2:8] == b"ISA   "
    # IOAPIC
    ioapic = [struct.unpack("<BBBBI", e) for e in t["entries"] if e[0] == 2]
    assert len(ioapic) == 1
    _, apic_id, _ver, flags, addr = ioapic[0]
    assert apic_id == n + 1 == mptable.ioapic_id(n)
    assert apic_id not in range(n)
    assert flags & 1
    assert addr == 0xFEC00000
    # 24 I/O interrupt entries, ISA irq i -> IOAPIC pin i
    ints = [struct.unpack("<BBHBBBB", e) for e in t["entries"] if e[0] == 3]
    assert len(ints) == 24
    assert [(i[4], i[5], i[6]) for i in ints] == [(p, n + 1, p) for p in range(24)]
    assert all(i[3] == bus[1] for i in ints)           # source bus = the ISA bus id
    # local interrupts: ExtINT -> LINT0, NMI -> LINT1
    lints = [struct.unpack("<BBHBBBB", e) for e in t["entries"] if e[0] == 4]
    assert [(li[1], li[6]) for li in lints] == [(3, 0), (1, 1)]
    # below the BIOS area (e820-reserved/unlisted, never guest RAM)
    assert base + len(blob) <= 0xD0000


@pytest.mark.parametrize("n", [0, -1, 255, 1000])
def test_mptable_cpu_count_out_of_range(n):
    with pytest.raises(ValueError):
        mptable.build(n)
