"""Our AML and tables as ACPICA sees them (Debian's acpica-tools, which
tools/setup.sh installs): ``iasl -d`` must disassemble every table without
a warning or error and print what was meant, and where ASL can say the
same thing, iasl's compilation of the ASL must be byte-for-byte ours.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from stratopy.acpi import aml, devices, tables
from stratopy.acpi import aml_resources as res

pytestmark = pytest.mark.skipif(shutil.which("iasl") is None,
                                reason="iasl missing: tools/setup.sh installs acpica-tools")

# What iasl prints when a table is wrong ("Incorrect checksum", "**** Invalid
# ...", "Error 6xxx", "Warning 3xxx" ...).
TROUBLE = re.compile(r"warning|error|invalid|incorrect|\*\*\*\*|unknown", re.IGNORECASE)

MICROVM = devices.MicrovmAcpi(cpus=2, ioapic_id=3, ged_gsi=23,
                              virtio=[(0xF0100000, 0x200, 5), (0xF0100200, 0x200, 6)])


def iasl(tmp_path, *args: str) -> str:
    proc = subprocess.run(["iasl", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output


def disassemble(tmp_path, table: bytes, name: str = "table") -> str:
    (tmp_path / f"{name}.dat").write_bytes(table)
    output = iasl(tmp_path, "-d", f"{name}.dat")
    dsl = (tmp_path / f"{name}.dsl").read_text()
    # the header comment repeats our own strings; only iasl's verdicts count
    assert not TROUBLE.search(output.replace("Compiler/Disassembler", "")), output
    assert not TROUBLE.search(dsl), dsl
    return dsl


def compile_asl(tmp_path, asl: str, expected_errors: tuple[str, ...] = ()) -> bytes:
    """iasl's AML for ``asl``, with named-reference optimization off (it
    would shorten ``\\_SB.VGEN`` to a relative path where it can);
    ``expected_errors`` are iasl message ids the ASL is known to trigger."""
    (tmp_path / "expected.asl").write_text(asl)
    expect = [arg for msg in expected_errors for arg in ("-vx", msg)]
    output = iasl(tmp_path, *expect, "-on", "-p", "expected", "expected.asl")
    assert re.search(r"\b0 Errors, 0 Warnings\b", output), output
    return (tmp_path / "expected.aml").read_bytes()


def definition_block(body: str) -> str:
    return f'DefinitionBlock ("", "DSDT", 2, "STRATO", "SPVMDSDT", 1)\n{{\n{body}\n}}\n'


def test_the_scan_catches_a_bad_checksum(tmp_path):
    # the no-trouble assertion in disassemble() can fail
    table = bytearray(tables.mcfg(0xB0000000))
    table[9] ^= 1
    (tmp_path / "bad.dat").write_bytes(table)
    assert TROUBLE.search(iasl(tmp_path, "-d", "bad.dat"))


VIRTIO_ASL = r"""
        Device (V00%(index)d)
        {
            Name (_HID, "LNRO0005")
            Name (_UID, %(index)d)
            Name (_CCA, 1)
            Name (_CRS, ResourceTemplate ()
            {
                Memory32Fixed (ReadWrite, %(base)#x, 0x200, )
                Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {%(irq)d}
            })
        }
"""

MICROVM_ASL = r"""
    Name (\_S5, Package (4) { 5, 0, 0, 0 })
    Scope (\_SB)
    {
        Device (COM1)
        {
            Name (_HID, EisaId ("PNP0501"))
            Name (_UID, 0)
            Name (_DDN, "COM1")
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, )
                Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {4}
            })
        }
        Device (RTC)
        {
            Name (_HID, EisaId ("PNP0B00"))
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x0070, 0x0070, 0x01, 0x02, )
            })
        }
%(virtio)s        Device (VGEN)
        {
            Name (_HID, "QEMUVGID")
            Name (_CID, "VM_GEN_COUNTER")
            Name (_DDN, "VM_Gen_Counter")
            Method (ADDR, 0, NotSerialized)
            {
                Return (Package (2) { 0xFF000, 0 })
            }
        }
        Device (PWRB)
        {
            Name (_HID, EisaId ("PNP0C0C"))
            Name (_UID, 0)
        }
        Device (GED)
        {
            Name (_HID, "ACPI0013")
            Name (_UID, 0)
            Name (_CRS, ResourceTemplate ()
            {
                Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {23}
            })
            OperationRegion (EREG, SystemMemory, 0xFEA00000, 4)
            Field (EREG, DWordAcc, NoLock, WriteAsZeros) { ESEL, 32 }
            Method (_EVT, 1, Serialized)
            {
                Store (ESEL, Local0)
                If (LEqual (And (Local0, 1), 1)) { Notify (\_SB.VGEN, 0x80) }
                If (LEqual (And (Local0, 2), 2)) { Notify (\_SB.PWRB, 0x80) }
            }
        }
    }
"""


def test_microvm_dsdt_is_what_iasl_compiles_from_the_asl(tmp_path):
    # 6035 "_HID suffix must be all hex digits": QEMU's VGEN _HID "QEMUVGID"
    # is not a well-formed ACPI id. Linux binds the device by its _CID
    # "VM_GEN_COUNTER"; the _HID only has to be there.
    virtio = "".join(VIRTIO_ASL % {"index": i, "base": base, "irq": irq}
                     for i, (base, _, irq) in enumerate(MICROVM.virtio))
    expected = compile_asl(tmp_path, definition_block(MICROVM_ASL % {"virtio": virtio}),
                           expected_errors=("6035",))
    ours = tables.dsdt(devices.microvm_dsdt_aml(MICROVM))
    assert ours[36:] == expected[36:]
    assert ours[:9] == expected[:9]          # signature, length, revision


def test_microvm_dsdt_disassembles_to_the_devices_meant(tmp_path):
    dsl = disassemble(tmp_path, tables.dsdt(devices.microvm_dsdt_aml(MICROVM)))
    flat = re.sub(r"\s+", " ", dsl)
    for text in (
        'Device (GED) { Name (_HID, "ACPI0013" /* Generic Event Device */)',
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000017, }",
        "OperationRegion (EREG, SystemMemory, 0xFEA00000, 0x04)",
        "Field (EREG, DWordAcc, NoLock, WriteAsZeros) { ESEL, 32 }",
        "Method (_EVT, 1, Serialized)",
        "Local0 = ESEL",
        "If (((Local0 & One) == One)) { Notify (\\_SB.VGEN, 0x80)",
        "If (((Local0 & 0x02) == 0x02)) { Notify (\\_SB.PWRB, 0x80)",
        'Device (VGEN) { Name (_HID, "QEMUVGID")',
        'Name (_CID, "VM_GEN_COUNTER")',
        "Method (ADDR, 0, NotSerialized) { Return (Package (0x02) { 0x000FF000, Zero })",
        'Device (PWRB) { Name (_HID, EisaId ("PNP0C0C") /* Power Button Device */)',
        'Device (COM1) { Name (_HID, EisaId ("PNP0501")',
        'Device (RTC) { Name (_HID, EisaId ("PNP0B00") /* AT Real-Time Clock */)',
        "IO (Decode16, 0x0070, // Range Minimum 0x0070, // Range Maximum 0x01, // Alignment "
        "0x02, // Length )",
        "IO (Decode16, 0x03F8, // Range Minimum 0x03F8, // Range Maximum 0x01, // Alignment "
        "0x08, // Length )",
        'Device (V001) { Name (_HID, "LNRO0005")',
        "Memory32Fixed (ReadWrite, 0xF0100200, // Address Base 0x00000200, // Address Length )",
    ):
        assert text in flat, text


def test_resource_descriptors_are_what_iasl_compiles(tmp_path):
    asl = definition_block(r"""
    Name (RES0, ResourceTemplate ()
    {
        WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
                       0x0000, 0x0000, 0x00FF, 0x0000, 0x0100, ,, )
        IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08, )
        WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                0x0000, 0x0D00, 0xFFFF, 0x0000, 0xF300, ,, , TypeStatic, DenseTranslation)
        DWordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                 0x00000000, 0x00000000, 0x00000CF7, 0x00000000, 0x00000CF8, ,, , TypeStatic, DenseTranslation)
        DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
                     0x00000000, 0xC0000000, 0xFEBFFFFF, 0x00000000, 0x3EC00000, ,, , AddressRangeMemory, TypeStatic)
        QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Prefetchable, ReadWrite,
                     0x0000000000000000, 0x0000000800000000, 0x0000000FFFFFFFFF, 0x0000000000000000,
                     0x0000000800000000, ,, , AddressRangeMemory, TypeStatic)
        Memory32Fixed (ReadOnly, 0xFED00000, 0x00000400, )
        Interrupt (ResourceConsumer, Level, ActiveLow, Shared, ,, ) {16, 17, 18}
    })
""")
    expected = compile_asl(tmp_path, asl)
    ours = aml.name("RES0", res.resource_template(
        res.word_bus_number(0, 0xFF),
        res.io(0xCF8, 0xCF8, 1, 8),
        res.word_io(0x0D00, 0xFFFF),
        res.dword_io(0, 0xCF7),
        res.dword_memory(0xC0000000, 0xFEBFFFFF),
        res.qword_memory(0x8_0000_0000, 0xF_FFFF_FFFF, cache=res.PREFETCHABLE),
        res.memory32_fixed(0xFED00000, 0x400, read_write=False),
        res.interrupt(16, 17, 18, edge=False, active_low=True, shared=True),
    ))
    assert ours == expected[36:]


def test_pci_host_bridge_and_control_flow_are_what_iasl_compiles(tmp_path):
    # The shape q35's DSDT will need (issue 13): a PCI root with ids, a
    # method using arguments, locals, If/Else and arithmetic, a Buffer and
    # a Package of more than one kind of element.
    asl = definition_block(r"""
    Scope (\_SB)
    {
        Device (PCI0)
        {
            Name (_HID, EisaId ("PNP0A08"))
            Name (_CID, EisaId ("PNP0A03"))
            Name (_SEG, 0)
            Name (_BBN, 0)
            Name (_UID, 0)
            Name (BUF0, Buffer (3) { 0x01, 0x02, 0x03 })
            Name (PKG0, Package (3) { 0x10000, "text", 0x123456789 })
            Method (CALC, 2, Serialized, 3)
            {
                Store (ShiftLeft (Arg0, 4), Local1)
                Or (Local1, Arg1, Local2)
                If (LAnd (LGreater (Local2, 0x100), LNot (LLess (Arg1, 2))))
                {
                    Return (Add (Local2, 1))
                }
                Else
                {
                    Return (Subtract (ShiftRight (Local2, 1), 0xFFFFFFFF))
                }
            }
        }
    }
""")
    expected = compile_asl(tmp_path, asl)
    ours = aml.scope("\\_SB", aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),
        aml.name("_CID", aml.eisa_id("PNP0A03")),
        aml.name("_SEG", 0),
        aml.name("_BBN", 0),
        aml.name("_UID", 0),
        aml.name("BUF0", aml.buffer(b"\x01\x02\x03")),
        aml.name("PKG0", aml.package(0x10000, aml.string("text"), 0x123456789)),
        aml.method(
            "CALC", 2,
            aml.store(aml.shift_left(aml.arg(0), 4), aml.local(1)),
            aml.or_(aml.local(1), aml.arg(1), aml.local(2)),
            aml.if_(aml.land(aml.lgreater(aml.local(2), 0x100),
                             aml.lnot(aml.lless(aml.arg(1), 2))),
                    aml.return_(aml.add(aml.local(2), 1))),
            aml.else_(aml.return_(aml.subtract(aml.shift_right(aml.local(2), 1),
                                               0xFFFFFFFF))),
            serialized=True, sync_level=3),
    ))
    assert ours == expected[36:]


def fields(dsl: str) -> dict[str, str]:
    """``[offset len] Name : value`` lines of an iasl data-table dump;
    a repeated name keeps its first value."""
    out: dict[str, str] = {}
    for m in re.finditer(r"^\[[0-9A-F]+h \d+ +\d+\] +(.+?) : (.+)$", dsl, re.MULTILINE):
        out.setdefault(m.group(1).strip(), m.group(2).strip())
    return out


def flags(dsl: str) -> dict[str, str]:
    return {m.group(1).strip(): m.group(2)
            for m in re.finditer(r"^ {8,}(\S.*?) : (\d)$", dsl, re.MULTILINE)}


def test_microvm_fadt_as_iasl_reads_it(tmp_path):
    layout = devices.microvm_tables(MICROVM)
    dsl = disassemble(tmp_path, dict(layout.blobs)[layout.addresses["FACP"]])
    f, bits = fields(dsl), flags(dsl)
    assert f["Signature"].startswith('"FACP"') and f["Revision"] == "06"
    assert f["Table Length"] == "00000114" and f["FADT Minor Revision"] == "05"
    assert f["Oem ID"] == '"STRATO"' and f["Hypervisor ID"] == "59504F5441525453"  # "STRATOPY"
    assert int(re.search(r"DSDT Address : ([0-9A-F]{16})", dsl).group(1), 16) == \
        layout.addresses["DSDT"]
    assert bits["Hardware Reduced (V5)"] == "1"
    assert bits["Control Method Power Button (V1)"] == "1"
    assert bits["VGA Not Present (V4)"] == "1" and bits["CMOS RTC Not Present (V5)"] == "0"
    assert bits["8042 Present on ports 60/64 (V2)"] == "0"
    assert f["SCI Interrupt"] == "0000"
    # the hardware-reduced sleep registers: bytes 4 and 5 of the GED page
    assert re.search(r"Sleep Control Register : \[Generic Address Structure\]\s+"
                     r".*?Space ID : 00 \[SystemMemory\]\s+.*?Bit Width : 08\s+.*?\s+"
                     r".*?Encoded Access Width : 01 \[Byte Access:8\]\s+"
                     r".*?Address : 00000000FEA00004", dsl)
    assert re.search(r"Sleep Status Register : \[Generic Address Structure\](?:\s+.*?){4}"
                     r"\s+.*?Address : 00000000FEA00005", dsl)


def test_fixed_hardware_fadt_and_facs_as_iasl_reads_them(tmp_path):
    pm = tables.PmBlocks(sci_irq=9, smi_cmd=0xB2, acpi_enable=0xF1, acpi_disable=0xF0,
                         pm1a_evt=0x600, pm1a_cnt=0x604, pm_tmr=0x608, gpe0=0x620, gpe0_len=16)
    config = tables.FadtConfig(hw_reduced=False, flags=tables.FADT_TMR_VAL_EXT,
                               iapc_boot_arch=tables.IAPC_8042, pm=pm,
                               reset=(tables.GAS_SYSTEM_IO, 0xCF9, 6))
    layout = tables.place(0xE0000, (0xE0000, 0xFF000), b"", config, [])
    blobs = dict(layout.blobs)
    f_dsl = disassemble(tmp_path, blobs[layout.addresses["FACP"]], "fadt")
    f, bits = fields(f_dsl), flags(f_dsl)
    assert f["SCI Interrupt"] == "0009" and f["SMI Command Port"] == "000000B2"
    assert f["PM1A Event Block Address"] == "00000600"
    assert f["PM Timer Block Address"] == "00000608"
    assert f["GPE0 Block Length"] == "10"
    assert f["Value to cause reset"] == "06"
    assert bits["Hardware Reduced (V5)"] == "0" and bits["Reset Register Supported (V2)"] == "1"
    assert bits["32-bit PM Timer (V1)"] == "1"
    assert int(re.search(r"FACS Address : ([0-9A-F]{16})", f_dsl).group(1), 16) == \
        layout.addresses["FACS"]
    facs = fields(disassemble(tmp_path, blobs[layout.addresses["FACS"]], "facs"))
    assert facs["Length"] == "00000040" and facs["Version"] == "02"


def test_madt_as_iasl_reads_it(tmp_path):
    dsl = disassemble(tmp_path, tables.madt([0, 1, 300], 4, 0xFEC00000, 0xFEE00000,
                                            [tables.InterruptOverride(0, 2)]))
    assert "Local Apic Address : FEE00000" in dsl
    types = re.findall(r"Subtable Type : (\w\w) \[(.+?)\]", dsl)
    assert types == [("00", "Processor Local APIC"), ("00", "Processor Local APIC"),
                     ("09", "Processor Local x2APIC"), ("01", "I/O APIC"),
                     ("02", "Interrupt Source Override"), ("04", "Local APIC NMI"),
                     ("0A", "Local x2APIC NMI")]
    assert re.findall(r"Local Apic ID : (\w+)", dsl) == ["00", "01"]
    assert "Processor x2Apic ID : 0000012C" in dsl
    assert "I/O Apic ID : 04" in dsl and "Address : FEC00000" in dsl
    assert re.search(r"Source : 00\s+\[\w+ \d+ +\d\] +Interrupt : 00000002", dsl)
    assert "Interrupt Input LINT : 01" in dsl


def test_mcfg_and_xsdt_as_iasl_reads_them(tmp_path):
    m = fields(disassemble(tmp_path, tables.mcfg(0xB0000000, 0, 0, 0x3F), "mcfg"))
    assert m["Base Address"] == "00000000B0000000" and m["Segment Group Number"] == "0000"
    assert m["Start Bus Number"] == "00" and m["End Bus Number"] == "3F"
    dsl = disassemble(tmp_path, tables.xsdt([0xE0100, 0x1_0000_0000]), "xsdt")
    assert re.findall(r"ACPI Table Address +\d+ : (\w+)", dsl) == \
        ["00000000000E0100", "0000000100000000"]
