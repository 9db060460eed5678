"""Template facts: what a restore's command line must match (SPEC §4)."""

from __future__ import annotations

import json

import pytest

from stratopy.cli_parse import parse_args
from stratopy.config import BLK, NET
from stratopy.errors import TemplateError
from stratopy.migration.facts import compare, machine_facts

MAC = "52:54:00:12:34:56"


@pytest.fixture
def disks(tmp_path):
    a = tmp_path / "a.img"
    a.write_bytes(b"\0" * (1 << 20))   # 1 MiB
    copy = tmp_path / "copy.img"
    copy.write_bytes(b"\1" * (1 << 20))  # same size, different file and content
    small = tmp_path / "small.img"
    small.write_bytes(b"\0" * 4096)
    return {"a": str(a), "copy": str(copy), "small": str(small)}


def argv(disk, *, cpus="2", mem="512M", mac=MAC, serial="SER1", readonly="on",
         devices=("blk", "net")):
    args = ["-kernel", "/boot/vmlinux", "-smp", cpus, "-m", mem,
            "-drive", f"id=d0,file={disk},readonly={readonly},direct=off"
                      + (f",serial={serial}" if serial is not None else ""),
            "-netdev", "tap,id=n0,ifname=tap0"]
    for d in devices:
        if d == "blk":
            args += ["-device", "virtio-blk-device,drive=d0,id=blk0"]
        else:
            args += ["-device", "virtio-net-device,netdev=n0,id=net0"
                     + (f",mac={mac}" if mac is not None else "")]
    return args


def facts(disk, **kw):
    return machine_facts(parse_args(argv(disk, **kw)))


def test_machine_facts(disks):
    f = facts(disks["a"])
    assert f["cpus"] == 2
    assert f["mem_size"] == 512 << 20
    assert f["machine"] == "microvm"
    assert f["devices"] == [
        {"driver": BLK, "id": "blk0", "serial": "SER1", "readonly": True, "capacity": 1 << 20,
         "slot": 0},
        {"driver": NET, "id": "net0", "mac": MAC, "slot": 4},
    ]
    json.dumps(f)   # stored in the state file: must be plain JSON data


def test_identical_facts_accepted(disks):
    f = facts(disks["a"])
    compare(f, facts(disks["a"]))
    # as read back from the state file
    compare(json.loads(json.dumps(f)), facts(disks["a"]))


def test_drive_copy_of_the_same_size_accepted(disks):
    compare(facts(disks["a"]), facts(disks["copy"]))


def test_no_mac_no_serial_accepted(disks):
    compare(facts(disks["a"], mac=None, serial=None), facts(disks["a"], mac=None, serial=None))


def _mismatch(template, current) -> TemplateError:
    with pytest.raises(TemplateError) as ei:
        compare(template, current)
    assert ei.value.attribute is not None
    return ei.value


def test_vcpu_count_differs(disks):
    e = _mismatch(facts(disks["a"]), facts(disks["a"], cpus="4"))
    assert "vCPU count" in e.attribute
    assert (e.expected, e.found) == (2, 4)
    assert "vCPU count" in str(e)


def test_memory_size_differs(disks):
    e = _mismatch(facts(disks["a"]), facts(disks["a"], mem="1G"))
    assert "memory size" in e.attribute
    assert (e.expected, e.found) == (512 << 20, 1 << 30)


@pytest.mark.parametrize("devices", [("blk",), ("blk", "net", "net2")])
def test_number_of_devices_differs(disks, devices):
    args = argv(disks["a"], devices=[d for d in devices if d != "net2"])
    if "net2" in devices:
        args += ["-netdev", "tap,id=n1,ifname=tap1",
                 "-device", "virtio-net-device,netdev=n1,id=net1"]
    e = _mismatch(facts(disks["a"]), machine_facts(parse_args(args)))
    assert e.attribute == "number of devices"


def test_device_type_differs(disks):
    # same number of devices, the other devices in another order: the
    # virtio-mmio slot 6 holds an rng device instead of the console
    def other(order):
        args = argv(disks["a"]) + ["-object", "rng-random,id=rng0,filename=/dev/urandom"]
        for d in order:
            args += (["-device", "virtio-rng-device,rng=rng0,id=rng0"] if d == "rng" else
                     ["-device", "virtio-serial-device,id=vser0"])
        return machine_facts(parse_args(args))
    e = _mismatch(other(("serial", "rng")), other(("rng", "serial")))
    assert "type" in e.attribute and "device 2" in e.attribute
    assert (e.expected, e.found) == ("virtio-serial-device", "virtio-rng-device")


def test_blk_and_net_order_on_the_command_line_does_not_matter(disks):
    # blk and net devices fill their own reserved slots: the guest sees the
    # same machine whichever comes first on the command line
    compare(facts(disks["a"]), facts(disks["a"], devices=("net", "blk")))


def test_mac_may_differ(disks, caplog):
    # a clone's own MAC (or none on the command line: the template's, which
    # NetDevice.restore applies) is accepted; the facts still record it
    with caplog.at_level("INFO", logger="stratopy.migration.facts"):
        compare(facts(disks["a"]), facts(disks["a"], mac="52:54:00:12:34:57"))
    assert "the clone's MAC 52:54:00:12:34:57, the template's " + MAC in caplog.text
    compare(facts(disks["a"]), facts(disks["a"], mac=None))
    compare(facts(disks["a"], mac=None), facts(disks["a"]))
    assert facts(disks["a"], mac="52:54:00:12:34:57")["devices"][1]["mac"] == "52:54:00:12:34:57"
    # a changed MAC does not hide another difference of the same device list
    e = _mismatch(facts(disks["a"]), facts(disks["a"], mac="52:54:00:12:34:57", serial="SER2"))
    assert "serial" in e.attribute and (e.expected, e.found) == ("SER1", "SER2")
    e = _mismatch(facts(disks["a"]), facts(disks["a"], mac="52:54:00:12:34:57", devices=("blk",)))
    assert "number of devices" in e.attribute


def test_serial_differs(disks):
    e = _mismatch(facts(disks["a"]), facts(disks["a"], serial="SER2"))
    assert "serial" in e.attribute and "blk0" in e.attribute
    assert (e.expected, e.found) == ("SER1", "SER2")
    e = _mismatch(facts(disks["a"]), facts(disks["a"], serial=None))
    assert "serial" in e.attribute


def test_readonly_differs(disks):
    e = _mismatch(facts(disks["a"]), facts(disks["a"], readonly="off"))
    assert "readonly" in e.attribute
    assert (e.expected, e.found) == (True, False)


def test_disk_size_differs(disks):
    e = _mismatch(facts(disks["a"]), facts(disks["small"]))
    assert "disk size" in e.attribute
    assert (e.expected, e.found) == (1 << 20, 4096)


def test_missing_drive_file_differs(disks, tmp_path):
    e = _mismatch(facts(disks["a"]), facts(str(tmp_path / "gone.img")))
    assert "disk size" in e.attribute


@pytest.mark.parametrize("bad", [None, [], "x", {"machine": "microvm", "cpus": 2,
                                                    "mem_size": 512 << 20, "devices": "x"},
                                 {"machine": "microvm", "cpus": 2, "mem_size": 512 << 20,
                                  "devices": [1, 2]}])
def test_malformed_template_facts(disks, bad):
    with pytest.raises(TemplateError):
        compare(bad, facts(disks["a"]))
