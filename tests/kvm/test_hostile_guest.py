"""A hostile guest (tests/guests/hostile.S) against every virtio-mmio device:
register and config-space abuse, then malicious descriptor chains on every
queue (addresses outside RAM, loops, 4 GiB lengths, indexes beyond the queue
size, an avail index 1000 ahead, unnegotiated INDIRECT, rings outside RAM,
zero-length buffers). The monitor must survive all of it, mark the device
DEVICE_NEEDS_RESET where the chain is broken, and write nothing outside the
guest's buffers or to the disk."""

from __future__ import annotations

import hashlib
import re

import pytest

pytestmark = pytest.mark.kvm

TIMEOUT = 60.0
NCASES = 9
ZERO_LENGTH, RINGS_OUTSIDE_RAM = 8, 7
BLK, NET, CONSOLE, RNG = 2, 1, 3, 4
# queues the device fills only when host input arrives (tap frame, console
# input): a notification alone does not make it read them
HOST_INPUT_QUEUES = {(NET, 0), (CONSOLE, 0)}
QUEUES = {BLK: 1, NET: 2, CONSOLE: 2, RNG: 1}


def expect_broken(dev: int, q: int, case: int) -> bool:
    if case == RINGS_OUTSIDE_RAM:
        return True                  # refused at DRIVER_OK, whatever the queue
    if (dev, q) in HOST_INPUT_QUEUES:
        return False
    if case == ZERO_LENGTH:
        return dev == BLK            # a block request needs a status byte
    return True


def test_hostile_guest_against_every_device(guests, start_vm, tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(range(256)) * 4096)
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    # acpi=off: the guest finds the transports in the virtio_mmio.device=
    # entries, which the monitor adds only for a guest without ACPI
    vm = start_vm(["-kernel", guests["hostile"], "-m", "64", "-serial", "stdio",
                   "-append", "acpi=off",
                   "-drive", f"file={img},id=d0", "-device", "virtio-blk-device,drive=d0,id=d0",
                   "-object", "rng-random,id=rng0,filename=/dev/urandom",
                   "-device", "virtio-rng-device,rng=rng0,id=rng0",
                   "-chardev", f"socket,id=con0,path={tmp_path / 'con.sock'},server,nowait",
                   "-device", "virtio-serial-device,id=vs0",
                   "-device", "virtconsole,id=con0,chardev=con0"])
    vm.wait_for(r"HOSTILE DONE", TIMEOUT)
    assert vm.wait_exit(TIMEOUT) == 0, vm.stderr[-2000:]
    assert "Traceback" not in vm.stderr and "Stack" not in vm.stderr, vm.stderr[-2000:]
    out = vm.output.replace("\r", "")

    devices = [int(d) for d in re.findall(r"^DEV 0x[0-9a-f]+ ID=(\d+)$", out, re.M)]
    # 4 block + 2 net slots (always present), the rng, the console port
    assert sorted(devices) == sorted([BLK] * 4 + [NET] * 2 + [RNG, CONSOLE])
    assert out.count("CANARY OK") == len(devices) and "CANARY BAD" not in out

    cases = re.findall(r"^CASE ID=(\d+) Q=(\d+) C=(\d+) STATUS=([0-9a-f]{2}) USED=(\d+)$",
                       out, re.M)
    assert len(cases) == sum(QUEUES[d] * NCASES for d in devices)
    wrong = []
    for dev, q, case, status, _used in cases:
        dev, q, case, status = int(dev), int(q), int(case), int(status, 16)
        want = 0x4F if expect_broken(dev, q, case) else 0x0F   # 0x40: NEEDS_RESET
        if status != want:
            wrong.append((dev, q, case, hex(status)))
    assert not wrong, wrong
    # every malicious chain on the block device was refused before any I/O
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest
