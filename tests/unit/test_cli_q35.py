"""-machine q35 on the command line: PCI device names and placement (cli_pci)."""

from __future__ import annotations

import pytest

from stratopy.cli_parse import parse_args
from stratopy.errors import ConfigError

K = ["-kernel", "vmlinux", "-machine", "type=q35"]
DRIVE = ["-drive", "id=d,file=/x"]
RNG = ["-object", "rng-random,id=r,filename=/dev/urandom"]


def test_machine_q35_forms():
    assert parse_args(["-kernel", "k", "-machine", "q35"]).machine_type == "q35"
    c = parse_args(["-kernel", "k", "-machine", "type=q35,dump-guest-core=off"])
    assert c.machine_type == "q35" and not c.dump_guest_core


def test_pci_devices_with_addresses():
    c = parse_args(K + DRIVE + RNG + [
        "-device", "virtio-blk-pci,id=b,drive=d,bus=pcie.0,addr=0x3.0x0,multifunction=on",
        "-device", "virtio-rng-pci,id=r0,rng=r,bus=pcie.0,addr=0x3.0x7",
        "-device", "pcie-root-port,id=pcie.1,port=0x1,bus=pcie.0,addr=0x1f,chassis=2",
        "-device", "virtio-serial-pci,id=s,bus=pcie.1,addr=0x0",
        "-chardev", "pty,id=c", "-device", "virtconsole,id=con,chardev=c"])
    by_id = {d.id: d for d in c.devices}
    assert by_id["b"].driver == "virtio-blk-device" and by_id["b"].pci == ("pcie.0", 3, 0, True)
    assert by_id["r0"].pci == ("pcie.0", 3, 7, False)
    assert by_id["pcie.1"].root_port == (1, 2) and by_id["pcie.1"].pci == ("pcie.0", 31, 0, False)
    assert by_id["s"].pci == ("pcie.1", 0, 0, False) and by_id["s"].chardev.id == "c"
    assert [d.id for d in c.transport_devices()] == ["b", "r0", "s"]


@pytest.mark.parametrize("argv, needles", [
    (RNG + ["-device", "virtio-rng-pci,rng=r,bus=pcie.0"], ("requires addr",)),
    (RNG + ["-device", "virtio-rng-pci,rng=r,addr=0x3"], ("requires bus",)),
    (RNG + ["-device", "virtio-rng-pci,rng=r,bus=pcie.0,addr=0x20"], ("addr slot", "0x20")),
    (RNG + ["-device", "virtio-rng-pci,rng=r,bus=pcie.0,addr=0x3.0x8"], ("addr function",)),
    (RNG + ["-device", "virtio-rng-pci,rng=r,bus=pcie.0,addr=0x3.0x1.2"], ("malformed",)),
    (RNG + ["-device", "virtio-rng-pci,rng=r,bus=pcie.0,addr=0x0"], ("host bridge",)),
    (RNG + ["-device", "virtio-rng-pci,rng=r,bus=pcie.3,addr=0x3"], ("pcie.3", "does not exist")),
    (RNG + ["-device", "virtio-rng-pci,id=a,rng=r,bus=pcie.0,addr=0x3",
            "-device", "virtio-rng-pci,id=b,rng=r,bus=pcie.0,addr=0x3"], ("already used by 'a'",)),
    (RNG + ["-device", "virtio-rng-pci,id=a,rng=r,bus=pcie.0,addr=0x3",
            "-device", "virtio-rng-pci,id=b,rng=r,bus=pcie.0,addr=0x3.0x1"],
     ("multifunction=on",)),
    (RNG + ["-device", "virtio-rng-pci,id=b,rng=r,bus=pcie.0,addr=0x3.0x1"], ("no function 0",)),
    (RNG + ["-device", "pcie-root-port,id=p,port=1,bus=pcie.0,addr=0x4",
            "-device", "virtio-rng-pci,rng=r,bus=p,addr=0x1"], ("must be 0",)),
    (["-device", "pcie-root-port,id=p,port=1,bus=pcie.0,addr=0x4",
      "-device", "pcie-root-port,id=q,port=1,bus=pcie.0,addr=0x5"], ("port 0x1", "'p'")),
    (["-device", "pcie-root-port,id=p,bus=pcie.0,addr=0x4"], ("requires port",)),
    (["-device", "pcie-root-port,id=p,port=1,bus=pcie.0,addr=0x4,foo=1"], ("foo",)),
    (RNG + ["-device", "virtio-rng-device,rng=r"], ("microvm's", "-pci")),
    (["-device", "vhost-vsock-pci,id=v,guest-cid=3"], ("not supported on q35",)),
])
def test_refusals_are_one_clear_line(argv, needles):
    with pytest.raises(ConfigError) as info:
        parse_args(K + argv)
    msg = str(info.value)
    assert info.value.option == "-device", msg
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
