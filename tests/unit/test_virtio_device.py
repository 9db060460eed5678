"""The helpers every virtio device shares (``VirtioDevice``): the usable-queue
lookup, marking the device broken, and the feature checks of a template."""

from __future__ import annotations

import pytest

from stratopy.devices.virtio.device import VIRTIO_F_VERSION_1, VirtioDevice
from stratopy.errors import DeviceError, TemplateError

V1 = 1 << VIRTIO_F_VERSION_1


class Q:
    def __init__(self, ready: bool = True):
        self.ready = ready


class Dev(VirtioDevice):
    queue_sizes = (8, 8)
    avail_features = 0b101
    label = "virtio-test"


def activated(*ready: bool) -> Dev:
    dev = Dev()
    dev.activate(object(), [Q(r) for r in ready], lambda q: None)
    return dev


def test_ready_queue_only_when_usable():
    dev = Dev()
    assert dev._ready_queue(0) is None                 # not activated
    dev = activated(True, False)
    assert dev._ready_queue(0) is dev.queues[0]
    assert dev._ready_queue(1) is None                 # not ready
    assert dev._ready_queue(2) is None                 # no such queue
    assert dev._ready_queue(-1) is None
    dev.broken = True
    assert dev._ready_queue(0) is None                 # broken


def test_activate_and_reset_clear_broken():
    dev = activated(True)
    dev.broken = True
    dev.reset()
    assert not dev.broken and not dev.activated and dev._ready_queue(0) is None
    dev.broken = True
    dev.activate(object(), [Q()], lambda q: None)
    assert not dev.broken and dev._ready_queue(0) is not None


def test_broke_marks_broken_and_names_the_device():
    reasons: list[str] = []
    dev = activated(True)
    dev.signal_broken = reasons.append                 # as the transport wires it
    dev._broke(DeviceError("descriptor loop"))
    assert dev.broken and dev._ready_queue(0) is None
    dev._broke(ZeroDivisionError("division by zero"))
    assert reasons == ["virtio-test: descriptor loop",
                       "virtio-test: internal error ZeroDivisionError: division by zero"]


def test_broke_without_a_transport_does_not_raise():
    dev = activated(True)
    dev._broke(RuntimeError("x"))
    assert dev.broken


@pytest.mark.parametrize("acked", [0, V1, 0b100, V1 | 0b101])
def test_check_acked_accepts_a_subset_of_the_offer(acked):
    assert Dev()._check_acked(acked, 0b101) == acked


@pytest.mark.parametrize("acked", [0b10, 1 << 40, -1, "1", 1.0, None])
def test_check_acked_rejects(acked):
    with pytest.raises(TemplateError) as ei:
        Dev()._check_acked(acked, 0b101)
    assert str(ei.value).endswith(
        f"virtio-test state field acked_features {acked!r} is not a subset of the "
        f"offered features {V1 | 0b101:#x}")


def test_check_offered():
    dev = Dev()
    assert dev._check_offered(-1, 0b111) == 0b101      # -1: this device's own offer
    assert dev._check_offered(0b110, 0b111) == 0b110
    for bad in (0b1000, -2, "1", None):
        with pytest.raises(TemplateError, match="virtio-test state field offered_features "
                                                ".* holds features this device never offers"):
            dev._check_offered(bad, 0b111)
