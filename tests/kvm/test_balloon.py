"""virtio-balloon-device through the real monitor (issue 12), QMP side.

The freestanding ``counter`` guest has no virtio driver, so the balloon is
never activated: as in StratoVirt, ``query-balloon`` reports all of RAM and
``balloon`` answers DeviceNotActive. Without the device both answer it. A
template of a VM with a balloon is refused with one error and the VM runs on.
The guest driver's side is tests/e2e/test_6_balloon.py.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.kvm

TIMEOUT = 30.0
GUEST_MIB = 40
NOT_ACTIVE = {"class": "DeviceNotActive", "desc": "No balloon device has been activated"}


def boot(start_vm, guests, *extra: str):
    vm = start_vm(["-kernel", guests["counter"], "-m", str(GUEST_MIB), "-append", "poll=16",
                   *extra], qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    return vm


def test_balloon_commands_without_a_balloon_device(guests, start_vm):
    vm = boot(start_vm, guests)
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("query-balloon") == {"error": NOT_ACTIVE}
        assert q.cmd("balloon", value=16 << 20) == {"error": NOT_ACTIVE}
        assert q.cmd("query-status")["return"]["status"] == "running"
    finally:
        q.close()


def test_balloon_device_before_its_driver(guests, start_vm, tmp_path):
    vm = boot(start_vm, guests, "-device",
              "virtio-balloon-device,id=bl0,deflate-on-oom=on,free-page-reporting=on")
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("query-balloon") == {"return": {"actual": GUEST_MIB << 20}}
        assert q.cmd("balloon", value=16 << 20) == {"error": NOT_ACTIVE}
        r = q.cmd("balloon")
        assert r["error"]["class"] == "GenericError" and "value" in r["error"]["desc"], r
        assert "balloon" in [c["name"] for c in q.cmd("query-commands")["return"]]
        assert "BALLOON_CHANGED" in [e["name"] for e in q.cmd("query-events")["return"]]
        # the template is refused with one error; the VM is left as it was
        r = q.cmd("migrate", uri=f"file:{tmp_path}/tpl")
        assert r == {"error": {"class": "GenericError", "desc":
                               "virtio-balloon-device (bl0) is not supported by snapshots"}}, r
        assert not (tmp_path / "tpl").exists()
        assert q.cmd("query-status")["return"]["status"] == "running"
        assert q.cmd("query-migrate")["return"]["status"] == "failed"
    finally:
        q.close()
    mark = vm.mark()
    vm.send("x")                                      # the guest still runs and answers
    vm.wait_for(r"COUNT=0x[0-9a-fA-F]+", TIMEOUT, since=mark)
