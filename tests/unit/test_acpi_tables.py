"""ACPI tables (stratopy/acpi/tables.py, devices.py): lengths, checksums,
the fields at the offsets ACPI 6.5 chapter 5 gives, and the pointers
``place`` fixes up between them."""

from __future__ import annotations

import struct

import pytest

from stratopy.acpi import devices, tables

MICROVM = devices.MicrovmAcpi(cpus=2, ioapic_id=3, ged_gsi=23,
                              virtio=[(0xF0100000, 0x200, 5), (0xF0100200, 0x200, 6)])

Q35_PM = tables.PmBlocks(sci_irq=9, smi_cmd=0xB2, acpi_enable=0xF1, acpi_disable=0xF0,
                         pm1a_evt=0x600, pm1a_cnt=0x604, pm_tmr=0x608, gpe0=0x620, gpe0_len=16)
Q35_FADT = tables.FadtConfig(hw_reduced=False, flags=tables.FADT_TMR_VAL_EXT,
                             iapc_boot_arch=tables.IAPC_8042, pm=Q35_PM,
                             reset=(tables.GAS_SYSTEM_IO, 0xCF9, 6))


def assert_valid_sdt(table: bytes, signature: bytes) -> None:
    assert table[:4] == signature
    assert struct.unpack_from("<I", table, 4)[0] == len(table)
    assert sum(table) % 256 == 0
    assert table[10:16] == b"STRATO"


def every_sdt():
    yield tables.dsdt(devices.microvm_dsdt_aml(MICROVM)), b"DSDT"
    yield tables.fadt(devices.microvm_fadt(MICROVM), 0xE0040), b"FACP"
    yield tables.fadt(Q35_FADT, 0xE0080, 0xE0040), b"FACP"
    yield tables.madt([0, 1, 2, 3], 5, 0xFEC00000, 0xFEE00000), b"APIC"
    yield tables.madt(list(range(300)), 0, 0xFEC00000, 0xFEE00000), b"APIC"
    yield tables.mcfg(0xB0000000), b"MCFG"
    yield tables.xsdt([0xE0100, 0xE0200]), b"XSDT"


@pytest.mark.parametrize("table, signature", list(every_sdt()))
def test_every_table_has_its_length_and_a_zero_checksum(table, signature):
    assert_valid_sdt(table, signature)


def test_rsdp_has_both_checksums_and_points_at_the_xsdt():
    raw = tables.rsdp(0x1_2345_6780)
    assert len(raw) == 36 and raw[:8] == b"RSD PTR "
    assert sum(raw[:20]) % 256 == 0          # ACPI 1.0 checksum
    assert sum(raw) % 256 == 0               # extended checksum
    revision, rsdt, length, xsdt = struct.unpack_from("<BIIQ", raw, 15)
    assert (revision, rsdt, length, xsdt) == (2, 0, 36, 0x1_2345_6780)


def test_a_corrupted_byte_breaks_the_checksum():
    # the check above can fail: one flipped byte of any table does
    table = bytearray(tables.mcfg(0xB0000000))
    table[44] ^= 0x10
    assert sum(table) % 256 != 0


def test_fadt_fields_at_their_offsets():
    f = tables.fadt(devices.microvm_fadt(), 0xE0040)
    assert len(f) == tables.FADT_SIZE == 276
    assert f[8] == 6 and f[131] == tables.FADT_MINOR_REVISION
    flags = struct.unpack_from("<I", f, 112)[0]
    assert flags & tables.FADT_HW_REDUCED_ACPI
    assert flags & tables.FADT_PWR_BUTTON and flags & tables.FADT_SLP_BUTTON
    boot_arch = struct.unpack_from("<H", f, 109)[0]
    # the CMOS RTC is present (devices/rtc.py): Linux sets its clock from it
    assert boot_arch == tables.IAPC_VGA_NOT_PRESENT
    assert struct.unpack_from("<Q", f, 140)[0] == 0xE0040       # X_DSDT
    # FIRMWARE_CTRL, DSDT (32-bit), SCI, SMI, PM blocks: all absent
    assert f[36:109] == bytes(109 - 36)
    assert f[132:140] == bytes(8) and f[148:268] == bytes(268 - 148)   # X_ blocks too


def test_microvm_fadt_points_at_the_sleep_registers_in_the_ged_page():
    f = tables.fadt(devices.microvm_fadt(MICROVM), 0xE0040)
    assert struct.unpack_from("<BBBBQ", f, 244) == (0, 8, 0, 1, devices.GED_MMIO_ADDR + 4)
    assert struct.unpack_from("<BBBBQ", f, 256) == (0, 8, 0, 1, devices.GED_MMIO_ADDR + 5)
    with pytest.raises(tables.AcpiLayoutError, match="hardware-reduced"):
        tables.fadt(tables.FadtConfig(hw_reduced=False, pm=Q35_PM, sleep_registers=(1, 2)),
                    0xE0080, 0xE0040)
    assert f[268:276] == b"STRATOPY"


def test_fadt_with_fixed_hardware():
    f = tables.fadt(Q35_FADT, 0xE0080, 0xE0040)
    flags = struct.unpack_from("<I", f, 112)[0]
    assert not flags & tables.FADT_HW_REDUCED_ACPI
    assert flags & tables.FADT_RESET_REG_SUP and flags & tables.FADT_TMR_VAL_EXT
    assert struct.unpack_from("<H", f, 46)[0] == 9                          # SCI_INT
    assert struct.unpack_from("<IBB", f, 48) == (0xB2, 0xF1, 0xF0)
    assert struct.unpack_from("<I", f, 56)[0] == 0x600
    assert struct.unpack_from("<I", f, 64)[0] == 0x604
    assert struct.unpack_from("<I", f, 76)[0] == 0x608
    assert struct.unpack_from("<I", f, 80)[0] == 0x620
    assert tuple(f[88:93]) == (4, 2, 0, 4, 16)
    assert struct.unpack_from("<BBBBQ", f, 116) == (1, 8, 0, 0, 0xCF9) and f[128] == 6
    assert struct.unpack_from("<BBBBQ", f, 148) == (1, 32, 0, 0, 0x600)     # X_PM1a_EVT
    assert struct.unpack_from("<Q", f, 132)[0] == 0xE0040                   # X_FIRMWARE_CTRL


def test_fadt_refuses_mixed_configurations():
    with pytest.raises(tables.AcpiLayoutError, match="PM blocks"):
        tables.fadt(tables.FadtConfig(hw_reduced=True, pm=Q35_PM), 0xE0000)
    with pytest.raises(tables.AcpiLayoutError, match="FACS"):
        tables.fadt(Q35_FADT, 0xE0000)


def madt_entries(table: bytes) -> list[bytes]:
    out, offset = [], 44
    while offset < len(table):
        length = table[offset + 1]
        assert length > 0
        out.append(table[offset:offset + length])
        offset += length
    assert offset == len(table)
    return out


def test_madt_lists_each_cpu_the_ioapic_and_the_nmi():
    t = tables.madt([0, 1, 2], 4, 0xFEC00000, 0xFEE00000,
                    [tables.InterruptOverride(0, 2)], pcat_compat=True)
    assert struct.unpack_from("<II", t, 36) == (0xFEE00000, tables.MADT_PCAT_COMPAT)
    entries = madt_entries(t)
    assert [e[0] for e in entries] == [0, 0, 0, 1, 2, 4]
    assert [(e[2], e[3], struct.unpack_from("<I", e, 4)[0]) for e in entries[:3]] == \
        [(0, 0, 1), (1, 1, 1), (2, 2, 1)]                       # uid, apic id, enabled
    assert struct.unpack_from("<BBII", entries[3], 2) == (4, 0, 0xFEC00000, 0)
    assert struct.unpack_from("<BBIH", entries[4], 2) == (0, 0, 2, 0)
    assert struct.unpack_from("<BHB", entries[5], 2) == (0xFF, 0x5, 1)


def test_madt_switches_to_x2apic_entries_above_254():
    entries = madt_entries(tables.madt([0, 254, 255, 300], 0, 0xFEC00000, 0xFEE00000))
    assert [e[0] for e in entries] == [0, 0, 9, 9, 1, 4, 10]
    assert struct.unpack_from("<III", entries[2], 4) == (255, 1, 2)   # id, flags, uid
    assert struct.unpack_from("<HIB", entries[6], 2) == (0x5, 0xFFFFFFFF, 1)


def test_mcfg_allocation():
    t = tables.mcfg(0xB0000000, segment=0, start_bus=0, end_bus=0x3F)
    assert len(t) == 60
    assert struct.unpack_from("<QHBB", t, 44) == (0xB0000000, 0, 0, 0x3F)
    with pytest.raises(tables.AcpiLayoutError):
        tables.mcfg(0xB0000000, start_bus=2, end_bus=1)


def blob_at(layout: tables.AcpiLayout, addr: int) -> bytes:
    return dict(layout.blobs)[addr]


def test_microvm_layout_pointers_are_fixed_up():
    layout = devices.microvm_tables(MICROVM)
    assert layout.rsdp_addr == devices.RSDP_ADDR == 0xE0000
    rsdp = blob_at(layout, 0xE0000)
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt = blob_at(layout, xsdt_addr)
    assert_valid_sdt(xsdt, b"XSDT")
    listed = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert [blob_at(layout, a)[:4] for a in listed] == [b"FACP", b"APIC"]
    fadt = blob_at(layout, listed[0])
    dsdt = blob_at(layout, struct.unpack_from("<Q", fadt, 140)[0])
    assert_valid_sdt(dsdt, b"DSDT")
    assert dsdt[36:] == devices.microvm_dsdt_aml(MICROVM)
    assert layout.addresses == {"RSDP": 0xE0000, "DSDT": layout.addresses["DSDT"],
                                "FACP": listed[0], "APIC": listed[1], "XSDT": xsdt_addr}


def test_layout_blobs_are_aligned_disjoint_and_inside_the_window():
    layout = tables.place(0xE0000, (0xE0000, 0xFF000), b"", Q35_FADT,
                          [tables.madt([0], 1, 0xFEC00000, 0xFEE00000), tables.mcfg(0xB0000000)])
    spans = sorted((a, a + len(d)) for a, d in layout.blobs)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    assert spans[0][0] >= 0xE0000 and spans[-1][1] <= 0xFF000
    assert all(a % 16 == 0 for a, _ in layout.blobs)
    facs_addr = layout.addresses["FACS"]
    assert facs_addr % 64 == 0 and blob_at(layout, facs_addr)[:4] == b"FACS"
    fadt = blob_at(layout, layout.addresses["FACP"])
    assert struct.unpack_from("<Q", fadt, 132)[0] == facs_addr
    xsdt = blob_at(layout, layout.addresses["XSDT"])
    # the XSDT lists neither the DSDT nor the FACS (the FADT points at them)
    assert struct.unpack_from("<3Q", xsdt, 36) == (
        layout.addresses["FACP"], layout.addresses["APIC"], layout.addresses["MCFG"])


def test_tables_elsewhere_than_the_rsdp():
    layout = tables.place(0xE0000, (0x9F000, 0x9FC00), b"", devices.microvm_fadt(), [])
    assert layout.addresses["DSDT"] == 0x9F000
    rsdp = blob_at(layout, 0xE0000)
    assert struct.unpack_from("<Q", rsdp, 24)[0] == layout.addresses["XSDT"] < 0x9FC00


def test_a_layout_that_does_not_fit_is_refused_in_one_line():
    with pytest.raises(tables.AcpiLayoutError) as err:
        tables.place(0xE0000, (0xE0000, 0xE0100), b"\0" * 512, devices.microvm_fadt(), [])
    assert "DSDT" in str(err.value) and "does not fit" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(tables.AcpiLayoutError, match="16-byte"):
        tables.place(0xE0008, (0xE0000, 0xFF000), b"", devices.microvm_fadt(), [])


def test_microvm_tables_for_many_cpus_fit():
    layout = devices.microvm_tables(devices.MicrovmAcpi(cpus=254, ioapic_id=255, ged_gsi=23))
    assert layout.end() <= devices.TABLES_WINDOW[1] <= devices.VMGENID_GUID_ADDR
