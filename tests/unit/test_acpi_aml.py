"""AML encodings (stratopy/acpi/aml.py, aml_resources.py) against byte
strings worked out from ACPI 6.5 chapter 20 and §6.4 (and, for the
descriptors, what iasl compiles; test_acpi_iasl.py checks whole blocks)."""

from __future__ import annotations

import pytest

from stratopy.acpi import aml
from stratopy.acpi import aml_resources as res
from stratopy.errors import StratoError

H = bytes.fromhex


@pytest.mark.parametrize("content, encoded", [
    (0, "01"),
    (62, "3f"),            # 62 + 1 = 63: the last one-byte length
    (63, "4104"),          # 63 + 2 = 65 = 0x41: two bytes
    (64, "4204"),
    (4093, "4fff"),        # 4093 + 2 = 4095: the last two-byte length
    (4094, "810001"),      # 4094 + 3 = 4097 = 0x1001: three bytes
    (4095, "820001"),
    (4096, "830001"),
    ((1 << 20) - 4, "8fffff"),    # + 3 = 2**20 - 1: the last three-byte length
    ((1 << 20) - 3, "c1000001"),  # + 4 = 2**20 + 1: four bytes
    ((1 << 28) - 5, "cfffffff"),  # + 4 = 2**28 - 1: the largest
])
def test_pkg_length_boundaries(content, encoded):
    assert aml.pkg_length(content) == H(encoded)


def test_pkg_length_beyond_28_bits_is_refused():
    with pytest.raises(aml.AmlError, match="28-bit"):
        aml.pkg_length((1 << 28) - 4)


@pytest.mark.parametrize("value, encoded", [
    (0, "00"), (1, "01"), (2, "0a02"), (0xFF, "0aff"), (0x100, "0b0001"),
    (0xFFFF, "0bffff"), (0x10000, "0c00000100"), (0xFFFFFFFF, "0cffffffff"),
    (1 << 32, "0e0000000001000000"), ((1 << 64) - 1, "0effffffffffffffff"),
])
def test_integer_smallest_encoding(value, encoded):
    assert aml.integer(value) == H(encoded)


def test_ones_is_its_own_opcode():
    assert aml.ONES == H("ff")
    assert aml.term(aml.ONES) == H("ff")


@pytest.mark.parametrize("bad", [-1, 1 << 64, True, 1.0])
def test_integer_out_of_range_or_wrong_type_is_refused(bad):
    with pytest.raises(aml.AmlError):
        aml.integer(bad)


def test_aml_error_is_a_strato_error():
    assert issubclass(aml.AmlError, StratoError)


@pytest.mark.parametrize("name, encoded", [
    ("_HID", b"_HID"),
    ("GED", b"GED_"),
    ("\\", b"\\\x00"),                                   # root alone: NullName
    ("\\_SB", b"\\_SB_"),
    ("^PWRB", b"^PWRB"),
    ("^^AB", b"^^AB__"),
    ("\\_SB.VGEN", b"\\\x2e_SB_VGEN"),                   # DualNamePrefix
    ("_SB.PCI0.S08", b"\x2f\x03_SB_PCI0S08_"),           # MultiNamePrefix, count 3
])
def test_name_strings(name, encoded):
    assert aml.name_string(name) == encoded


@pytest.mark.parametrize("bad", ["", "1ABC", "ABCDE", "ab", "A-B", "\\_SB..X"])
def test_bad_names_are_refused_with_the_name(bad):
    with pytest.raises(aml.AmlError) as err:
        aml.name_string(bad) if bad else aml.name_seg(bad)
    assert "name segment" in str(err.value)


def test_string_is_nul_terminated_ascii():
    assert aml.string("ACPI0013") == b"\x0dACPI0013\x00"
    for bad in ("caf\u00e9", "a\0b"):
        with pytest.raises(aml.AmlError):
            aml.string(bad)


@pytest.mark.parametrize("text, encoded", [
    ("PNP0A08", "0c41d00a08"), ("PNP0C0C", "0c41d00c0c"), ("PNP0501", "0c41d00501"),
])
def test_eisa_id(text, encoded):
    assert aml.eisa_id(text) == H(encoded)


@pytest.mark.parametrize("bad", ["pnp0a08", "PNP0A0", "PNP0A0G", "P1P0A08"])
def test_bad_eisa_id_is_refused(bad):
    with pytest.raises(aml.AmlError, match="EISA"):
        aml.eisa_id(bad)


def test_locals_and_args():
    assert aml.local(0) == H("60") and aml.local(7) == H("67")
    assert aml.arg(0) == H("68") and aml.arg(6) == H("6e")
    with pytest.raises(aml.AmlError):
        aml.local(8)
    with pytest.raises(aml.AmlError):
        aml.arg(7)


def test_buffer_and_package():
    assert aml.buffer(b"\x01\x02") == H("1105" "0a02" "0102")
    assert aml.package(1, 0x1000) == H("1206" "02" "01" "0b0010")
    # more than 255 elements: VarPackage with an integer count
    big = aml.package(*([0] * 256))
    assert big[0] == aml.VAR_PACKAGE_OP
    assert big[3:6] == H("0b0001")      # after a 2-byte PkgLength: 256 as a Word


def test_named_objects():
    assert aml.name("_UID", 0) == b"\x08_UID\x00"
    assert aml.scope("\\_SB") == b"\x10\x06\\_SB_"
    assert aml.device("GED") == b"\x5b\x82\x05GED_"
    # ADDR: 4 name bytes + 1 flag byte + Return(Zero) = 7 -> PkgLength 8
    assert aml.method("ADDR", 0, aml.return_(0)) == b"\x14\x08ADDR\x00\xa4\x00"


@pytest.mark.parametrize("nargs, serialized, sync, flags", [
    (0, False, 0, 0x00), (1, True, 0, 0x09), (7, False, 0, 0x07), (2, True, 15, 0xFA),
])
def test_method_flags(nargs, serialized, sync, flags):
    encoded = aml.method("_EVT", nargs, serialized=serialized, sync_level=sync)
    assert encoded[6] == flags


def test_method_with_eight_args_is_refused():
    with pytest.raises(aml.AmlError, match="8 arguments"):
        aml.method("XX", 8)


def test_statements_and_expressions():
    assert aml.store(aml.path("ESEL"), aml.local(0)) == b"\x70ESEL\x60"
    assert aml.notify("\\_SB.VGEN", 0x80) == b"\x86\\\x2e_SB_VGEN\x0a\x80"
    assert aml.and_(aml.local(0), 1) == H("7b600100")           # NullName target
    assert aml.or_(aml.local(0), 2, aml.local(1)) == H("7d600a0261")
    assert aml.shift_left(1, 4) == H("79010a0400")
    assert aml.lequal(aml.arg(0), 5) == H("93680a05")
    assert aml.lnot(aml.arg(0)) == H("9268")
    block = aml.if_(aml.lequal(aml.arg(0), 1), aml.return_(1)) + aml.else_(aml.return_(0))
    assert block == H("a006" "936801" "a401") + H("a103" "a400")


def test_operation_region_and_field():
    assert aml.operation_region("EREG", aml.SYSTEM_MEMORY, 0xFEA00000, 4) == \
        b"\x5b\x80EREG\x00\x0c\x00\x00\xa0\xfe\x0a\x04"
    # DWordAcc (3) | NoLock | WriteAsZeros (2 << 5) = 0x43; field widths are
    # bit counts in PkgLength layout: 32 -> 0x20; 64 -> 40 04; a gap is 00 + width
    fld = aml.field("EREG", [("ESEL", 32), (None, 8), ("BIG", 64)],
                    access=aml.DWORD_ACC, update=aml.WRITE_AS_ZEROS)
    body = b"EREG\x43" + b"ESEL\x20" + b"\x00\x08" + b"BIG_\x40\x04"
    assert fld == b"\x5b\x81" + aml.pkg_length(len(body)) + body


def test_term_refuses_text():
    with pytest.raises(aml.AmlError, match="string"):
        aml.term("ESEL")


# --- resource descriptors (§6.4) -------------------------------------------------

def test_small_descriptors():
    assert res.io(0x3F8, 0x3F8, 1, 8) == H("4701f803f8030108")
    assert res.resource_template() == H("1105" "0a02" "7900")


def test_memory32_fixed():
    assert res.memory32_fixed(0xF0100000, 0x200) == H("860900" "01" "000010f0" "00020000")


def test_extended_interrupt_flags():
    assert res.interrupt(4) == H("890600" "03" "01" "04000000")   # consumer, edge, high
    assert res.interrupt(9, 10, edge=False, active_low=True, shared=True) == \
        H("890a00" "0d" "02" "09000000" "0a000000")
    with pytest.raises(aml.AmlError):
        res.interrupt()


def test_address_space_descriptors():
    bus = res.word_bus_number(0, 0xFF)
    assert bus == H("880d00" "02" "0c" "00" "0000" "0000" "ff00" "0000" "0001")
    mem = res.dword_memory(0xC0000000, 0xFEBFFFFF)
    assert mem[:6] == H("871700" "00" "0c" "01")
    assert len(mem) == 3 + 23
    qmem = res.qword_memory(1 << 35, (1 << 36) - 1, cache=res.PREFETCHABLE)
    assert qmem[:6] == H("8a2b00" "00" "0c" "07") and len(qmem) == 3 + 43


def test_descriptor_values_that_do_not_fit_are_refused():
    with pytest.raises(aml.AmlError, match="16 bits"):
        res.io(0x10000, 0x10000, 1, 8)
    with pytest.raises(aml.AmlError, match="32 bits"):
        res.memory32_fixed(1 << 32, 0x1000)
    with pytest.raises(aml.AmlError):
        res.dword_memory(0, 1 << 32)
