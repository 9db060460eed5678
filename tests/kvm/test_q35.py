"""-machine q35 with the freestanding guests: the PCI bus as a guest walks
it through 0xCF8/0xCFC and through ECAM (tests/guests/pci_walk.S)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.kvm

TIMEOUT = 30.0


def q35_args(kernel: str, *extra: str) -> list[str]:
    return ["-machine", "q35", "-kernel", kernel, "-m", "256", "-serial", "stdio", *extra]


def test_pci_walk_cf8_and_ecam(guests, start_vm, tmp_path):
    """The guest finds the host bridge, a multifunction slot (blk at 03.0,
    rng at 03.2), a root port and a net-less rest of the bus; CF8 and ECAM
    read the same ids; BAR sizes come out of the sizing protocol; a write
    through CF8 is read back through ECAM."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    vm = start_vm(q35_args(
        guests["pci_walk"],
        "-drive", f"id=d,file={disk},direct=off",
        "-device", "virtio-blk-pci,id=b,drive=d,bus=pcie.0,addr=0x3,multifunction=on",
        "-object", "rng-random,id=r,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=r,bus=pcie.0,addr=0x3.0x2",
        "-device", "pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1f"))
    out = vm.wait_for(r"WALK DONE (\d+)", TIMEOUT)
    vm.wait_for("EXIT", TIMEOUT)
    assert vm.wait_exit(TIMEOUT) == 0, vm.stderr[-2000:]
    text = vm.output
    found = dict(re.findall(r"PCI (\w\w\.\w\w) ID=(\w{8}) ECAM=\w{8}", text))
    assert found == {"00.00": "29c08086", "03.00": "10421af4", "03.02": "10441af4",
                     "1f.00": "000c1b36"}, text
    for cf8, ecam in re.findall(r"ID=(\w{8}) ECAM=(\w{8})", text):
        assert cf8 == ecam
    bars = re.findall(r"BAR (\w\w) SIZE=0x(\w{16}) (\w+)", text)
    # each virtio function: MSI-X BAR 1 (4 KiB, 32-bit), BAR 4 (16 KiB, 64-bit)
    assert bars == [("01", "%016x" % 0x1000, "M32"), ("04", "%016x" % 0x4000, "M64")] * 2, text
    assert "ECAM WRITE OK" in text
    assert out.group(1) == "4"


def test_ram_split_around_the_pci_hole(guests, start_vm):
    """-m 3G on q35: RAM to 2 GiB, ECAM reserved at 0xb0000000, the last
    GiB from 4 GiB up (e820 as the guest reads it), and that RAM holds
    what the guest writes there."""
    vm = start_vm(["-machine", "q35", "-kernel", guests["memcheck"], "-m", "3G",
                   "-serial", "stdio", "-append", "base=0x100000000 mib=64"])
    vm.wait_for(r"CHECK ok=1", TIMEOUT)
    e820 = re.findall(r"E820 0x(\w+) 0x(\w+) (\d)", vm.output)
    table = [(int(a, 16), int(s, 16), int(t)) for a, s, t in e820]
    assert (0x100000, 0x80000000 - 0x100000, 1) in table
    assert (0xB0000000, 0x10000000, 2) in table
    assert (0x100000000, 0x40000000, 1) in table
    assert not any(t == 1 and a < 0x100000000 < a + s for a, s, t in table)
    vm.send("q")
    vm.wait_for("EXIT", TIMEOUT)
    assert vm.wait_exit(TIMEOUT) == 0


def test_device_add_checks_on_q35(guests, start_vm, tmp_path):
    """QMP device_add on q35 (VM paused with -S, no guest needed): the
    refusals are one clear error each; a disk goes into an empty root port
    once, not twice."""
    disk = tmp_path / "hot.img"
    disk.write_bytes(bytes(1 << 20))
    vm = start_vm(q35_args(guests["pci_walk"], "-S",
                           "-device", "pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x5"),
                  qmp=True)
    q = vm.qmp()
    try:
        def err(**kw):
            r = q.cmd("device_add", **kw)
            assert "error" in r, r
            return r["error"]["desc"]

        assert "cannot be hot-plugged on q35" in err(id="x", driver="virtio-rng-pci")
        assert "no backend 'x'" in err(id="x", driver="virtio-blk-pci", bus="pcie.1")
        r = q.cmd("blockdev-add", **{"node-name": "d0", "driver": "raw",
                                     "file": {"driver": "file", "filename": str(disk)},
                                     "cache": {"direct": False}})
        assert r == {"return": {}}, r
        assert "bus is required" in err(id="x", driver="virtio-blk-pci", drive="d0")
        assert "is not a pcie-root-port" in err(id="x", driver="virtio-blk-pci", drive="d0",
                                                bus="pcie.0", addr="0x6")
        assert "must be 0" in err(id="x", driver="virtio-blk-pci", drive="d0",
                                  bus="pcie.1", addr="0x1")
        # the serial check the microvm's hot-replace makes too (control.hot_device_config)
        assert "serial is longer than 20 characters" in err(
            id="x", driver="virtio-blk-pci", drive="d0", bus="pcie.1", serial="s" * 21)
        r = q.cmd("device_add", id="x", driver="virtio-blk-pci", drive="d0", bus="pcie.1")
        assert r == {"return": {}}, r
        assert "already in use" in err(id="x", driver="virtio-blk-pci", drive="d0", bus="pcie.1")
        # the plugged disk's file is in use: a writable second open is refused
        r = q.cmd("blockdev-add", **{"node-name": "d1", "driver": "raw",
                                     "file": {"driver": "file", "filename": str(disk)},
                                     "cache": {"direct": False}})
        assert "already in use by x" in r.get("error", {}).get("desc", ""), r
        other = tmp_path / "other.img"
        other.write_bytes(bytes(1 << 20))
        r = q.cmd("blockdev-add", **{"node-name": "d2", "driver": "raw",
                                     "file": {"driver": "file", "filename": str(other)},
                                     "cache": {"direct": False}})
        assert r == {"return": {}}, r
        assert "occupied" in err(id="y", driver="virtio-blk-pci", drive="d2", bus="pcie.1")
    finally:
        q.close()
