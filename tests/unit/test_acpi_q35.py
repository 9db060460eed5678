"""The q35's ACPI tables: every table's length and checksum, and the DSDT
and MCFG as iasl disassembles them (acpi/q35.py)."""

from __future__ import annotations

import re
import shutil
import struct

import pytest

from stratopy.acpi import q35 as acpi_q35
from stratopy.acpi import tables
from stratopy.arch.x86_64 import q35_layout
from tests.unit.test_acpi_iasl import disassemble

CONFIG = acpi_q35.Q35Acpi(cpus=2, ioapic_id=2)
needs_iasl = pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl missing")


def placed():
    return acpi_q35.q35_tables(CONFIG)


def test_every_table_has_its_length_and_checksum():
    lay = placed()
    sigs = {}
    for addr, data in lay.blobs:
        if addr == lay.rsdp_addr:
            assert data[:8] == b"RSD PTR "
            assert sum(data[:20]) & 0xFF == 0 and sum(data) & 0xFF == 0
            continue
        sig = data[:4].decode()
        assert struct.unpack_from("<I", data, 4)[0] == len(data), sig
        assert sum(data) & 0xFF == 0, sig
        sigs[sig] = addr
    assert set(sigs) == {"DSDT", "FACP", "APIC", "MCFG", "XSDT"}
    xsdt = dict((a, d) for a, d in lay.blobs)[sigs["XSDT"]]
    listed = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert sorted(listed) == sorted(sigs[s] for s in ("FACP", "APIC", "MCFG"))


def test_mcfg_points_at_the_ecam_window():
    mcfg = dict((d[:4], d) for _, d in placed().blobs)[b"MCFG"]
    base, seg, start, end = struct.unpack_from("<QHBB", mcfg, 44)
    assert (base, seg, start, end) == (q35_layout.ECAM_BASE, 0, 0, 255)


def test_fadt_says_cmos_rtc_present():
    fadt = dict((d[:4], d) for _, d in placed().blobs)[b"FACP"]
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert not boot_arch & tables.IAPC_CMOS_RTC_NOT_PRESENT


@needs_iasl
def test_dsdt_disassembles_to_the_pci_root(tmp_path):
    dsdt = dict((d[:4], d) for _, d in placed().blobs)[b"DSDT"]
    dsl = disassemble(tmp_path, dsdt, "dsdt")
    assert re.search(r'Device \(PCI0\)', dsl)
    assert 'EisaId ("PNP0A08")' in dsl and 'EisaId ("PNP0A03")' in dsl
    assert 'EisaId ("PNP0B00")' in dsl and 'EisaId ("PNP0C02")' in dsl
    assert re.search(r"WordBusNumber \(ResourceProducer.*\n.*Granularity\n\s*0x0000,.*\n\s*0x00FF,", dsl)
    assert re.search(r"0xC0000000,\s*// Range Minimum\s*\n\s*0xEFFFFFFF,", dsl)
    assert re.search(r"0x1000,\s*// Range Minimum\s*\n\s*0xFFFF,", dsl)
    assert re.search(r"Memory32Fixed \(ReadWrite,\s*\n\s*0xB0000000,.*\n\s*0x10000000,", dsl)
    # _PRT: slot 3 INTA -> GSI 19, slot 3 INTB -> 16, slot 31 INTD -> 18
    prt = re.findall(r"Package \(0x04\)\s*\{\s*(0x[0-9A-F]+),\s*(\w+),\s*(\w+),\s*(0x[0-9A-F]+|\w+)\s*\}", dsl)
    table = {(int(a, 16) >> 16, {"Zero": 0, "One": 1}.get(p, None) if not p.startswith("0x")
              else int(p, 16)): int(g, 16) for a, p, _, g in prt}
    assert len(table) == 128
    assert table[(3, 0)] == 19 and table[(3, 1)] == 16 and table[(31, 3)] == 18
    assert "Method (_OSC, 4" in dsl and "Return (Arg3)" in dsl


@needs_iasl
def test_mcfg_disassembles(tmp_path):
    mcfg = dict((d[:4], d) for _, d in placed().blobs)[b"MCFG"]
    dsl = disassemble(tmp_path, mcfg, "mcfg")
    assert re.search(r"Base Address : 00000000B0000000", dsl)
    assert re.search(r"End Bus Number : FF", dsl)


def test_e820_reserves_ecam_and_splits_ram():
    e = q35_layout.e820_map(3 << 30)
    assert (q35_layout.ECAM_BASE, q35_layout.ECAM_SIZE, 2) in e
    ram = [(a, s) for a, s, t in e if t == 1]
    assert ram[-1] == (4 << 30, 1 << 30)
    assert max(a + s for a, s in ram if a < 4 << 30) == 2 << 30
