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


def _general_flags(producer: bool, min_fixed: bool, max_fixed: bool, subtractive: bool) -> int:
    # §6.4.3.5.1 byte 4: bit 0 consumer, 1 subtractive decode, 2 _MIF, 3 _MAF
    return (0 if producer else 1) | subtractive << 1 | min_fixed << 2 | max_fixed << 3


def _address_space(tag: int, fmt: str, bits: int, resource_type: int, general: int,
                   specific: int, granularity: int, minimum: int, maximum: int,
                   translation: int, length: int) -> bytes:
    for value, what in ((granularity, "granularity"), (minimum, "minimum"),
                        (maximum, "maximum"), (translation, "translation"),
                        (length, "length")):
        _check(value, bits, f"address space {what}")
    if length and maximum - minimum + 1 != length and general & 0x0C == 0x0C:
        raise AmlError(f"fixed address range {minimum:#x}-{maximum:#x} "
                       f"is not {length:#x} bytes long")
    body = struct.pack("<BBB" + fmt * 5, resource_type, general, specific,
                       granularity, minimum, maximum, translation, length)
    return struct.pack("<BH", tag, len(body)) + body


def memory_flags(read_write: bool = True, cache: int = NON_CACHEABLE) -> int:
    """Type-specific flags of a memory range: bit 0 read-write, bits 1-2 _MEM."""
    return read_write | (cache << 1)


def qword_memory(minimum: int, maximum: int, *, cache: int = NON_CACHEABLE,
                 read_write: bool = True, producer: bool = True, translation: int = 0) -> bytes:
    """QWordMemory (§6.4.3.5.1), fixed range [minimum, maximum]."""
    return _address_space(QWORD_ADDRESS, "Q", 64, MEMORY_RANGE,
                          _general_flags(producer, True, True, False),
                          memory_flags(read_write, cache), 0, minimum, maximum,
                          translation, maximum - minimum + 1)


def dword_memory(minimum: int, maximum: int, *, cache: int = NON_CACHEABLE,
                 read_write: bool = True, producer: bool = True, translation: int = 0) -> bytes:
    """DWordMemory (§6.4.3.5.2), fixed range [minimum, maximum]."""
    return _address_space(DWORD_ADDRESS, "I", 32, MEMORY_RANGE,
                          _general_flags(producer, True, True, False),
                          memory_flags(read_write, cache), 0, minimum, maximum,
                          translation, maximum - minimum + 1)


def word_io(minimum: int, maximum: int, *, producer: bool = True) -> bytes:
    """WordIO (§6.4.3.5.3), fixed range, entire range decoded (_RNG = 3)."""
    return _address_space(WORD_ADDRESS, "H", 16, IO_RANGE,
                          _general_flags(producer, True, True, False),
                          0x03, 0, minimum, maximum, 0, maximum - minimum + 1)


def dword_io(minimum: int, maximum: int, *, producer: bool = True) -> bytes:
    """DWordIO (§6.4.3.5.2), fixed range, entire range decoded."""
    return _address_space(DWORD_ADDRESS, "I", 32, IO_RANGE,
                          _general_flags(producer, True, True, False),
                          0x03, 0, minimum, maximum, 0, maximum - minimum + 1)


def word_bus_number(minimum: int, maximum: int, *, producer: bool = True) -> bytes:
    """WordBusNumber (§6.4.3.5.3): the bus range a host bridge decodes."""
    return _address_space(WORD_ADDRESS, "H", 16, BUS_NUMBER_RANGE,
                          _general_flags(producer, True, True, False),
                          0, 0, minimum, maximum, 0, maximum - minimum + 1)
