"""virtio-balloon-device on the command line, QMP balloon / query-balloon
through the real command table and MachineControl (no KVM: a machine with
only what these use), and the template refusal."""

from __future__ import annotations

import json
import threading
import types

import pytest

from stratopy.cli_parse import parse_args
from stratopy.config import BALLOON
from stratopy.devices.virtio.balloon import BalloonDevice
from stratopy.errors import ConfigError
from stratopy.machine.control import MachineControl
from stratopy.machine.slots import plan_slots
from stratopy.migration.snapshot import unsupported_reason
from stratopy.qmp import commands as C
from stratopy.qmp.protocol import QmpSession
from tests.unit.virtio_driver import Driver

MiB = 1 << 20


def parse(*extra: str):
    return parse_args(["-kernel", "/dev/null", "-m", "128", *extra])


class Machine:
    """What MachineControl's balloon commands touch: the slots and the event sink."""

    def __init__(self, config, activate: bool):
        self.config = config
        self.events: list[tuple[str, dict]] = []
        self.loop = types.SimpleNamespace(device_lock=threading.RLock())
        self.slots = plan_slots(config)
        self.drivers = []
        for slot in self.slots:
            if slot.config is not None and slot.config.driver == BALLOON:
                slot.device = BalloonDevice(config.mem_size, lambda gpa, n: None)
                drv = Driver(slot.device)
                if activate:
                    drv.init()
                self.drivers.append(drv)

    def event_sink(self, name, data):
        self.events.append((name, data))


def qmp(vm, text):
    (req,) = QmpSession().feed(text.encode())
    return C.execute(req, vm)


# --- command line ------------------------------------------------------------------

def test_cli_balloon_properties_and_defaults():
    (d,) = parse("-device", "virtio-balloon-device").devices
    assert (d.driver, d.deflate_on_oom, d.free_page_reporting) == (BALLOON, False, False)
    assert d.id == "virtio-balloon-device.0"
    (d,) = parse("-device", "virtio-balloon-device,id=bl0,deflate-on-oom=true,"
                            "free-page-reporting=on").devices
    assert (d.id, d.deflate_on_oom, d.free_page_reporting) == ("bl0", True, True)
    (d,) = parse("-device", "virtio-balloon-device,deflate_on_oom=on").devices
    assert d.deflate_on_oom


@pytest.mark.parametrize("args, words", [
    (["-device", "virtio-balloon-device,deflate-on-oom=maybe"], "invalid boolean"),
    (["-device", "virtio-balloon-device,size=5"], "unknown property 'size'"),
    (["-device", "virtio-balloon-device,bus=pcie.0"], "not used on microvm"),
    (["-device", "virtio-balloon-device,id=a", "-device", "virtio-balloon-device,id=b"],
     "only one balloon device"),
])
def test_cli_balloon_refusals(args, words):
    with pytest.raises(ConfigError) as e:
        parse(*args)
    assert words in str(e.value)


def test_balloon_gets_a_slot_after_the_others():
    config = parse("-device", "virtio-balloon-device,id=bl0")
    slots = plan_slots(config)
    assert [s.config.id for s in slots if s.config is not None] == ["bl0"]
    assert slots[-1].config.id == "bl0" and slots[-1].kind == "other"


def test_template_of_a_balloon_vm_is_refused():
    assert unsupported_reason(parse()) is None
    assert unsupported_reason(parse("-device", "virtio-balloon-device,id=bl0")) == \
        "virtio-balloon-device (bl0) is not supported by snapshots"


# --- QMP -----------------------------------------------------------------------------

NOT_ACTIVE = {"class": "DeviceNotActive", "desc": "No balloon device has been activated"}


def test_without_a_balloon_both_commands_fail():
    vm = MachineControl(Machine(parse(), activate=False))
    assert qmp(vm, '{"execute":"balloon","arguments":{"value":1048576}}') == {"error": NOT_ACTIVE}
    assert qmp(vm, '{"execute":"query-balloon"}') == {"error": NOT_ACTIVE}


def test_before_the_driver_activates_it():
    m = Machine(parse("-device", "virtio-balloon-device"), activate=False)
    vm = MachineControl(m)
    assert qmp(vm, '{"execute":"query-balloon"}') == {"return": {"actual": 128 * MiB}}
    assert qmp(vm, '{"execute":"balloon","arguments":{"value":1048576}}') == {"error": NOT_ACTIVE}
    assert m.events == []


def test_balloon_sets_the_target_and_emits_balloon_changed():
    m = Machine(parse("-device", "virtio-balloon-device"), activate=True)
    vm = MachineControl(m)
    (drv,) = m.drivers
    irqs = drv.irqs
    assert qmp(vm, '{"execute":"balloon","arguments":{"value":%d}}' % (64 * MiB)) == {"return": {}}
    assert int.from_bytes(drv.config(0, 4), "little") == 64 * MiB // 4096   # num_pages
    assert drv.irqs == irqs + 1                                             # config interrupt
    assert m.events == [("BALLOON_CHANGED", {"actual": 128 * MiB})]
    drv.t.write(0x104, (16384).to_bytes(4, "little"))                       # the driver's actual
    assert qmp(vm, '{"execute":"query-balloon"}') == {"return": {"actual": 64 * MiB}}


@pytest.mark.parametrize("args, desc", [
    ("{}", "Parameter 'value' is missing"),
    ('{"value":"1G"}', "value"),
    ('{"value":-4096}', "negative"),
])
def test_balloon_argument_errors(args, desc):
    m = Machine(parse("-device", "virtio-balloon-device"), activate=True)
    rep = qmp(MachineControl(m), '{"execute":"balloon","arguments":%s}' % args)
    assert rep["error"]["class"] == "GenericError" and desc in rep["error"]["desc"], json.dumps(rep)
    assert m.slots[-1].device.num_pages == 0
