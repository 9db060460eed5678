"""The microvm's AML run by ACPICA's own interpreter (``acpiexec`` from
acpica-tools: the same table loader, AML interpreter and resource manager
Linux uses): methods return what they should, the GED's ``_EVT`` notifies
VGEN/PWRB for exactly the event bits set, and every ``_CRS`` decodes."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from stratopy.acpi import devices

pytestmark = pytest.mark.skipif(
    shutil.which("acpiexec") is None or shutil.which("iasl") is None,
    reason="acpiexec/iasl missing: tools/setup.sh installs acpica-tools")

CONFIG = devices.MicrovmAcpi(cpus=2, ioapic_id=3, ged_gsi=23,
                             vmgenid_guid_addr=0x1_2345_6780,
                             virtio=[(0xF0100000, 0x200, 5), (0xF0100200, 0x200, 6)])

# A test-only SSDT: the guest cannot write the event register (the monitor
# does), so TEVT puts the event bits in ESEL (acpiexec backs SystemMemory
# regions with a buffer) and calls _EVT as Linux's GED driver would.
TEST_SSDT = r"""
DefinitionBlock ("", "SSDT", 2, "STRATO", "TEST", 1)
{
    External (\_SB.GED.ESEL, FieldUnitObj)
    External (\_SB.GED._EVT, MethodObj)
    Method (TEVT, 1, NotSerialized)
    {
        Store (Arg0, \_SB.GED.ESEL)
        \_SB.GED._EVT (23)
    }
}
"""


@pytest.fixture(scope="module")
def table_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("acpiexec")
    layout = devices.microvm_tables(CONFIG)
    names = []
    for addr, blob in layout.blobs:
        if blob[:4] in (b"DSDT", b"FACP", b"APIC"):
            names.append(f"{blob[:4].decode()}.dat")
            (d / names[-1]).write_bytes(blob)
    (d / "test.asl").write_text(TEST_SSDT)
    subprocess.run(["iasl", "-p", "test", "test.asl"], cwd=d, check=True,
                   capture_output=True, timeout=60)
    return d, names + ["test.aml"]


def _check(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "successfully acquired and loaded" in out, out
    # ACPICA reports AML faults as AE_* exceptions and bad data with ****.
    # `resources` also tries _SRS, which fixed-resource devices do not have.
    verdicts = out.replace("AcpiSetCurrentResources failed: AE_NOT_FOUND", "")
    assert not re.search(r"\bAE_(?!OK\b)\w+|\*\*\*\*|mismatch", verdicts, re.IGNORECASE), out
    return out


def acpiexec_each(table_files, commands: list[str]) -> list[str]:
    """Each command in its own acpiexec, all at once (each run idles ~1 s
    at exit). Separate runs because Notify handlers run on acpiexec's own
    threads: in one batch a notification could print after the next command."""
    d, names = table_files
    procs = [subprocess.Popen(["acpiexec", "-b", c, *names], cwd=d, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=60)
            outs.append(_check(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def acpiexec(table_files, *commands: str) -> str:
    """One acpiexec run of ``commands``."""
    return acpiexec_each(table_files, [";".join(commands)])[0]


def per_command(out: str, marker: str, count: int) -> list[str]:
    """The output of each of ``count`` batched commands, split where ``marker`` starts a line."""
    parts = re.split(rf"^(?={re.escape(marker)})", out, flags=re.MULTILINE)[1:]
    assert len(parts) == count, out
    return parts


def notified(out: str) -> list[tuple[str, str]]:
    return re.findall(r"Received a \w+ Notify on \[(\w+)\] \S+ Value (0x[0-9A-F]+)", out)


def test_tables_load_as_hardware_reduced(table_files):
    out = acpiexec(table_files, "evaluate \\_SB.GED._HID", "evaluate \\_SB.VGEN.ADDR",
                   "evaluate \\_S5")
    assert "ACPI: FACP" in out and "ACPI: APIC" in out and "ACPI: DSDT" in out
    # a hardware-reduced FADT: ACPICA sets up no GPE blocks (there is no SCI)
    assert "Initializing General Purpose Events" not in out
    assert '[String] Length 08 = "ACPI0013"' in out
    # VGEN.ADDR: the GUID address as Package {low dword, high dword}
    assert re.search(r"\[Package\] Contains 2 Elements:\s+\[Integer\] = 0000000023456780"
                     r"\s+\[Integer\] = 0000000000000001", out), out
    # \_S5: SLP_TYPa 5, what the guest writes to the sleep control register
    assert re.search(r"Evaluation of \\_S5 returned .*\s+\[Package\] Contains 4 Elements:"
                     r"\s+\[Integer\] = 0000000000000005", out), out


EVENT_CASES = [
    (0, []),
    (1, [("VGEN", "0x80")]),
    (2, [("PWRB", "0x80")]),
    (3, [("VGEN", "0x80"), ("PWRB", "0x80")]),
    (4, []),                                  # an unknown bit notifies nobody
]


def test_ged_evt_notifies_for_exactly_the_bits_set(table_files):
    outs = acpiexec_each(table_files, [f"evaluate \\TEVT {events}" for events, _ in EVENT_CASES])
    # the handlers' threads may print in either order
    assert [sorted(notified(out)) for out in outs] == \
        [sorted(expected) for _, expected in EVENT_CASES]


def test_every_crs_decodes_in_the_resource_manager(table_files):
    ged, com1, v001 = per_command(
        acpiexec(table_files, "resources \\_SB.GED", "resources \\_SB.COM1",
                 "resources \\_SB.V001"), "Evaluating _CRS", 3)
    assert re.search(r"Extended IRQ Resource.*?Triggering : Edge.*?Polarity : ActiveHigh"
                     r".*?Dword00 : 00000017.*?\[01\] EndTag Resource", ged, re.DOTALL)
    assert re.search(r"I/O Resource.*?Address Minimum : 03F8.*?Address Length : 08", com1,
                     re.DOTALL)
    assert re.search(r"Extended IRQ Resource.*?Dword00 : 00000004.*?\[02\] EndTag", com1,
                     re.DOTALL)
    assert re.search(r"32-Bit Fixed Memory Range Resource.*?Address : F0100200"
                     r".*?Address Length : 00000200", v001, re.DOTALL)
    assert re.search(r"Extended IRQ Resource.*?Dword00 : 00000006", v001, re.DOTALL)
