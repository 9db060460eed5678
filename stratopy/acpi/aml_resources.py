"""Resource descriptors for _CRS/_PRS buffers (ACPI 6.5 §6.4).

Each function returns the bytes of one descriptor; ``resource_template``
wraps them into an AML Buffer ending with the End Tag. Small descriptors
are ``tag = (item name << 3) | length``; large ones are ``0x80 | name``
followed by a 16-bit length of what follows.
"""

from __future__ import annotations

import struct

from stratopy.acpi.aml import AmlError, buffer

END_TAG = 0x79           # small item 0xF, length 1
IO_TAG = 0x47            # small item 0x8, length 7
MEMORY32_FIXED = 0x86
DWORD_ADDRESS = 0x87
WORD_ADDRESS = 0x88
EXTENDED_IRQ = 0x89
QWORD_ADDRESS = 0x8A

# Address space resource types (§6.4.3.5)
MEMORY_RANGE, IO_RANGE, BUS_NUMBER_RANGE = 0, 1, 2

# Memory type-specific flags, bits 1-2 (_MEM)
NON_CACHEABLE, CACHEABLE, WRITE_COMBINING, PREFETCHABLE = 0, 1, 2, 3


def _check(value: int, bits: int, what: str) -> int:
    if not 0 <= value < 1 << bits:
        raise AmlError(f"{what} {value:#x} does not fit in {bits} bits")
    return value


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(): a Buffer of descriptors and the End Tag.

    The End Tag's checksum byte is 0, which §6.4.2.9 defines as "treat the
    checksum as valid"; iasl and QEMU write 0 too, so our buffers are
    byte-for-byte what iasl compiles from the same ASL (the tests rely on it).
    """
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))


def io(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """IO (§6.4.2.5): a 16-bit (or 10-bit) I/O port range."""
    return struct.pack("<BBHHBB", IO_TAG, 1 if decode16 else 0,
                       _check(minimum, 16, "IO minimum"), _check(maximum, 16, "IO maximum"),
                       _check(alignment, 8, "IO alignment"), _check(length, 8, "IO length"))


def memory32_fixed(base: int, length: int, read_write: bool = True) -> bytes:
    """Memory32Fixed (§6.4.3.4)."""
    return struct.pack("<BHBII", MEMORY32_FIXED, 9, 1 if read_write else 0,
                       _check(base, 32, "Memory32Fixed base"),
                       _check(length, 32, "Memory32Fixed length"))


def interrupt(*gsis: int, consumer: bool = True, edge: bool = True, active_low: bool = False,
              shared: bool = False, wake: bool = False) -> bytes:
    """Interrupt (Extended Interrupt Descriptor, §6.4.3.6): flags bit 0
    consumer, 1 edge (else level), 2 active low, 3 shared, 4 wake."""
    if not 1 <= len(gsis) <= 255:
        raise AmlError(f"Interrupt descriptor with {len(gsis)} interrupts (1-255)")
    flags = (consumer | edge << 1 | active_low << 2 | shared << 3 | wake << 4)
    body = bytes([flags, len(gsis)]) + b"".join(
        struct.pack("<I", _check(g, 32, "interrupt number")) for g in gsis)
    return struct.pack("<BH", EXTENDED_IRQ, len(body)) + body


# Address space descriptors by address width: (tag, struct format)
_ADDRESS_FORMS = {16: (WORD_ADDRESS, "H"), 32: (DWORD_ADDRESS, "I"), 64: (QWORD_ADDRESS, "Q")}


def _fixed_range(bits: int, resource_type: int, specific: int, minimum: int, maximum: int,
                 producer: bool, translation: int = 0) -> bytes:
    """An address space descriptor (§6.4.3.5) for the fixed range
    [minimum, maximum]: general flags (byte 4) = consumer (bit 0), positive
    decode, _MIF (bit 2) and _MAF (bit 3) set; granularity 0."""
    tag, fmt = _ADDRESS_FORMS[bits]
    length = maximum - minimum + 1
    for value, what in ((minimum, "minimum"), (maximum, "maximum"),
                        (translation, "translation"), (length, "length")):
        _check(value, bits, f"address range {what}")
    general = (0 if producer else 1) | 1 << 2 | 1 << 3
    body = struct.pack("<BBB" + fmt * 5, resource_type, general, specific,
                       0, minimum, maximum, translation, length)
    return struct.pack("<BH", tag, len(body)) + body


def memory_flags(read_write: bool = True, cache: int = NON_CACHEABLE) -> int:
    """Type-specific flags of a memory range: bit 0 read-write, bits 1-2 _MEM."""
    return read_write | (cache << 1)


# I/O type-specific flags: _RNG = 3, the entire range is decoded
IO_ENTIRE_RANGE = 0x03


def qword_memory(minimum: int, maximum: int, *, cache: int = NON_CACHEABLE,
                 read_write: bool = True, producer: bool = True, translation: int = 0) -> bytes:
    """QWordMemory (§6.4.3.5.1)."""
    return _fixed_range(64, MEMORY_RANGE, memory_flags(read_write, cache), minimum, maximum,
                        producer, translation)


def dword_memory(minimum: int, maximum: int, *, cache: int = NON_CACHEABLE,
                 read_write: bool = True, producer: bool = True, translation: int = 0) -> bytes:
    """DWordMemory (§6.4.3.5.2)."""
    return _fixed_range(32, MEMORY_RANGE, memory_flags(read_write, cache), minimum, maximum,
                        producer, translation)


def word_io(minimum: int, maximum: int, *, producer: bool = True) -> bytes:
    """WordIO (§6.4.3.5.3)."""
    return _fixed_range(16, IO_RANGE, IO_ENTIRE_RANGE, minimum, maximum, producer)


def dword_io(minimum: int, maximum: int, *, producer: bool = True) -> bytes:
    """DWordIO (§6.4.3.5.2)."""
    return _fixed_range(32, IO_RANGE, IO_ENTIRE_RANGE, minimum, maximum, producer)


def word_bus_number(minimum: int, maximum: int, *, producer: bool = True) -> bytes:
    """WordBusNumber (§6.4.3.5.3): the bus range a host bridge decodes."""
    return _fixed_range(16, BUS_NUMBER_RANGE, 0, minimum, maximum, producer)
