"""Linux x86 boot protocol: kernel loaders, boot_params (zero page), e820.

Two kernel formats are accepted (SPEC §2):
- ELF ``vmlinux``: PT_LOAD segments go to their physical addresses and the
  vCPU enters at ``e_entry`` (``phys_startup_64``) in long mode.
- ``bzImage``: the protected-mode part goes to ``code32_start`` (1 MiB) and
  the vCPU enters its 64-bit entry at +0x200, with the setup header copied
  into the zero page (Documentation/x86/boot.rst, "64-bit boot protocol").
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from stratopy import files
from stratopy.arch.x86_64 import layout
from stratopy.errors import ConfigError, StratoError
from stratopy.memory import GuestMemory

# boot_params offsets (arch/x86/include/uapi/asm/bootparam.h)
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SETUP_HEADER = 0x1F1
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128

# setup_header offsets (relative to the zero page / bzImage start)
HDR_SETUP_SECTS = 0x1F1
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_MAGIC = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_CMDLINE_SIZE = 0x238
HDR_XLOADFLAGS = 0x236

LOADFLAG_LOADED_HIGH = 0x01
LOADFLAG_CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01

E820_RAM = 1
E820_RESERVED = 2

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")


class KernelError(StratoError):
    """The -kernel/-initrd file cannot be loaded (format, size, placement)."""


@dataclass
class LoadedKernel:
    entry: int            # guest-physical 64-bit entry point
    end: int              # first byte after the loaded image
    setup_header: bytes   # bzImage setup header to copy to the zero page (b"" for ELF)
    cmdline_max: int = layout.CMDLINE_MAX - 1  # longest command line the kernel takes
    # highest address an initrd byte may have (bzImage header initrd_addr_max;
    # an ELF vmlinux states none: the 32-bit ramdisk fields are the limit)
    initrd_addr_max: int = 0xFFFFFFFF


class _Image:
    """A -kernel/-initrd file opened once (stratopy.files.open_regular: never
    a FIFO or a device) and read by offset: only the parts that land in guest
    RAM are read, so a file can never make the monitor read more than guest
    RAM, and the file read is the one that was checked."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        try:
            self.fd, st = files.open_regular(path, what)
        except ConfigError as e:
            raise KernelError(str(e)) from None
        self.size = st.st_size

    def read(self, offset: int, length: int) -> bytes:
        """At most ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        length = max(0, min(length, self.size - offset))
        try:
            return files.read_at(self.fd, offset, length, self.path, self.what)
        except ConfigError as e:
            raise KernelError(str(e)) from None

    def load(self, mem: GuestMemory, gpa: int, offset: int, length: int) -> None:
        """Copy ``length`` file bytes at ``offset`` to guest RAM at ``gpa``
        (the caller has checked both ranges)."""
        view = mem.view(gpa, length)
        try:
            files.read_into(self.fd, view, offset, self.path, self.what)
        except ConfigError as e:
            raise KernelError(str(e)) from None
        finally:
            view.release()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "_Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_kernel(mem: GuestMemory, path: str) -> LoadedKernel:
    """Load an ELF vmlinux or a bzImage into guest RAM."""
    with _Image(path, "-kernel") as img:
        head = img.read(0, HDR_CMDLINE_SIZE + 4)
        if head[:4] == ELF_MAGIC:
            return _load_elf(mem, img, head)
        if len(head) > HDR_MAGIC + 4 and head[HDR_MAGIC:HDR_MAGIC + 4] == b"HdrS":
            return _load_bzimage(mem, img, head)
    raise KernelError(f"-kernel {path}: neither an ELF vmlinux nor a bzImage")


def _load_elf(mem: GuestMemory, img: _Image, head: bytes) -> LoadedKernel:
    path, size = img.path, img.size
    if len(head) < _EHDR.size:
        raise KernelError(f"-kernel {path}: truncated ELF header")
    (ident, e_type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize,
     phentsize, phnum, *_rest) = _EHDR.unpack_from(head, 0)
    if ident[4] != 2 or ident[5] != 1 or machine != 62:
        raise KernelError(f"-kernel {path}: not a little-endian x86_64 ELF")
    if phentsize != _PHDR.size or phoff + phnum * phentsize > size:
        raise KernelError(f"-kernel {path}: bad program header table")
    phdrs = img.read(phoff, phnum * phentsize)     # phnum < 2**16: bounded
    end = 0
    loaded = False
    for i in range(phnum):
        p_type, _pf, offset, _vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            phdrs, i * phentsize)
        if p_type != PT_LOAD:
            continue
        if offset + filesz > size or filesz > memsz:
            raise KernelError(f"-kernel {path}: segment {i} lies outside the file")
        if paddr < layout.HIMEM_START or not mem.check(paddr, memsz):
            raise KernelError(f"-kernel {path}: segment {i} at {paddr:#x}+{memsz:#x} "
                              f"does not fit in guest RAM")
        img.load(mem, paddr, offset, filesz)
        if memsz > filesz:
            mem.write(paddr + filesz, bytes(memsz - filesz))
        end = max(end, paddr + memsz)
        loaded = True
    if not loaded:
        raise KernelError(f"-kernel {path}: no loadable segment")
    if not mem.check(entry, 1):
        raise KernelError(f"-kernel {path}: entry point {entry:#x} is outside guest RAM")
    return LoadedKernel(entry=entry, end=end, setup_header=b"")


def _load_bzimage(mem: GuestMemory, img: _Image, head: bytes) -> LoadedKernel:
    path = img.path
    if len(head) < HDR_CMDLINE_SIZE + 4:
        raise KernelError(f"-kernel {path}: truncated bzImage setup header")
    version = struct.unpack_from("<H", head, HDR_VERSION)[0]
    if version < 0x020C:
        raise KernelError(f"-kernel {path}: boot protocol {version >> 8}.{version & 0xff} "
                          f"is too old (need 2.12 for the 64-bit entry)")
    xloadflags = struct.unpack_from("<H", head, HDR_XLOADFLAGS)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise KernelError(f"-kernel {path}: bzImage has no 64-bit entry point")
    setup_sects = head[HDR_SETUP_SECTS] or 4
    pm_offset = (setup_sects + 1) * 512
    if pm_offset >= img.size:
        raise KernelError(f"-kernel {path}: truncated bzImage")
    code32 = struct.unpack_from("<I", head, HDR_CODE32_START)[0] or layout.HIMEM_START
    payload_size = img.size - pm_offset
    if not mem.check(code32, payload_size):
        raise KernelError(f"-kernel {path}: kernel does not fit in guest RAM")
    img.load(mem, code32, pm_offset, payload_size)
    # The setup header runs from 0x1f1 to 0x202 + the byte at 0x201.
    hdr_end = HDR_MAGIC + head[HDR_JUMP + 1]
    setup_header = head[HDR_SETUP_SECTS:hdr_end] if hdr_end <= len(head) \
        else img.read(HDR_SETUP_SECTS, hdr_end - HDR_SETUP_SECTS)
    cmdline_max = struct.unpack_from("<I", head, HDR_CMDLINE_SIZE)[0]
    # 0 means the boot protocol's historical default (Documentation/x86/boot.rst)
    initrd_max = struct.unpack_from("<I", head, HDR_INITRD_ADDR_MAX)[0] or 0x37FFFFFF
    return LoadedKernel(entry=code32 + 0x200, end=code32 + payload_size,
                        setup_header=setup_header,
                        cmdline_max=cmdline_max or 255, initrd_addr_max=initrd_max)


def load_initrd(mem: GuestMemory, path: str, kernel_end: int, ram_below_4g: int,
                addr_max: int = 0xFFFFFFFF) -> tuple[int, int]:
    """Place the initrd as high as possible below the 32-bit RAM end, with
    its last byte at or below ``addr_max`` (the kernel's initrd_addr_max).
    Its size is checked before a byte is read."""
    with _Image(path, "-initrd") as img:
        size = img.size
        top = min(ram_below_4g, 1 << 32, addr_max + 1)
        addr = (top - size) & ~(layout.INITRD_ALIGN - 1)
        if size == 0 or addr <= kernel_end or not mem.check(addr, size):
            raise KernelError(f"-initrd {path}: {size} bytes do not fit in guest RAM "
                              f"above the kernel")
        img.load(mem, addr, 0, size)
    return addr, size


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """(address, size, type) entries as SPEC §2 lays them out."""
    entries = [
        (0, layout.EBDA_START, E820_RAM),
        (layout.EBDA_START, layout.EBDA_END - layout.EBDA_START, E820_RESERVED),
        (layout.BIOS_ROM_START, layout.BIOS_ROM_END - layout.BIOS_ROM_START, E820_RESERVED),
    ]
    for gpa, size in layout.ram_layout(mem_size):
        if gpa == 0:
            entries.append((layout.HIMEM_START, size - layout.HIMEM_START, E820_RAM))
        else:
            entries.append((gpa, size, E820_RAM))
    return entries


def build_zero_page(kernel: LoadedKernel, mem_size: int,
                    initrd: tuple[int, int] | None) -> bytes:
    """The 4 KiB boot_params page for the 64-bit boot protocol."""
    zp = bytearray(4096)
    if kernel.setup_header:
        zp[BP_SETUP_HEADER:BP_SETUP_HEADER + len(kernel.setup_header)] = kernel.setup_header
    else:
        struct.pack_into("<H", zp, HDR_BOOT_FLAG, 0xAA55)
        zp[HDR_MAGIC:HDR_MAGIC + 4] = b"HdrS"
        struct.pack_into("<H", zp, HDR_VERSION, 0x020C)
        # An ELF kernel has no header of its own to say its limit: ours.
        struct.pack_into("<I", zp, HDR_CMDLINE_SIZE, layout.CMDLINE_MAX - 1)
    zp[HDR_TYPE_OF_LOADER] = 0xFF
    zp[HDR_LOADFLAGS] |= LOADFLAG_LOADED_HIGH | LOADFLAG_CAN_USE_HEAP
    struct.pack_into("<H", zp, HDR_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", zp, HDR_CMD_LINE_PTR, layout.CMDLINE_ADDR)
    if initrd:
        addr, size = initrd
        struct.pack_into("<I", zp, HDR_RAMDISK_IMAGE, addr & 0xFFFFFFFF)
        struct.pack_into("<I", zp, HDR_RAMDISK_SIZE, size & 0xFFFFFFFF)
        struct.pack_into("<I", zp, BP_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", zp, BP_EXT_RAMDISK_SIZE, size >> 32)
    entries = e820_map(mem_size)
    zp[BP_E820_ENTRIES] = len(entries)
    for i, (addr, size, typ) in enumerate(entries):
        struct.pack_into("<QQI", zp, BP_E820_TABLE + 20 * i, addr, size, typ)
    return bytes(zp)


def write_cmdline(mem: GuestMemory, cmdline: str, limit: int = layout.CMDLINE_MAX - 1) -> int:
    """Write the command line; refuse one the kernel would silently cut
    (it would lose the virtio_mmio.device= entries appended at the end)."""
    raw = cmdline.encode() + b"\0"
    limit = min(limit, layout.CMDLINE_MAX - 1)
    if len(raw) - 1 > limit:
        raise KernelError(f"-append: kernel command line is {len(raw) - 1} bytes "
                          f"with the monitor's additions, the kernel takes at most {limit}")
    mem.write(layout.CMDLINE_ADDR, raw)
    return len(raw) - 1

