"""QMP hardening (issue 9), without sockets: hostile arguments are refused
before the VM is called, getfd descriptors are bounded per connection."""

from __future__ import annotations

import os

import pytest

from stratopy.errors import QmpError, StratoError
from stratopy.qmp import commands as C
from stratopy.qmp.protocol import QmpSession, Request
from tests.unit.test_qmp_protocol import FakeVm, run


# --------------------------------------------------------------------------
# issue 9: inputs that gave "internal error" and a traceback, or a wrong tap


class StrictVm(FakeVm):
    """Handlers with the machine's real keyword signatures (MachineControl):
    an argument named like a Python parameter used to collide with them."""

    def device_add(self, id, driver, addr=None, **_ignored):  # noqa: A002
        self._rec("device_add", id=id, driver=driver)


@pytest.mark.parametrize("text,desc", [
    ('{"execute":"device_add","arguments":{"id":"a","driver":"virtio-blk-mmio","self":1}}',
     "Invalid parameter 'self'"),
    ('{"execute":"device_add","arguments":{"id":"a","driver":"virtio-blk-mmio","vm":"x"}}',
     "Invalid parameter 'vm'"),
    ('{"execute":"blockdev-add","arguments":{"node-name":"d","file":{"driver":"file",'
     '"filename":"/tmp/a\\u0000b"}}}',
     "Parameter 'file.filename' must not contain a NUL character"),
    ('{"execute":"blockdev-add","arguments":{"node-name":"d","file":"/tmp/a\\u0000b"}}',
     "Parameter 'file' must not contain a NUL character"),
    ('{"execute":"netdev_add","arguments":{"id":"n","ifname":"a\\u0000b"}}',
     "Parameter 'ifname' must not contain a NUL character"),
    ('{"execute":"netdev_add","arguments":{"id":"n","ifname":"tap/0"}}',
     "Parameter 'ifname' cannot contain '/', ':' or a space"),
    ('{"execute":"netdev_add","arguments":{"id":"n","ifname":"tap:0"}}',
     "Parameter 'ifname' cannot contain '/', ':' or a space"),
    ('{"execute":"netdev_add","arguments":{"id":"n","ifname":"tap 0"}}',
     "Parameter 'ifname' cannot contain '/', ':' or a space"),
    ('{"execute":"netdev_add","arguments":{"id":"n","ifname":"tap\\t0"}}',
     "Parameter 'ifname' must be printable text"),
    ('{"execute":"netdev_add","arguments":{"id":"n","ifname":".."}}',
     "Parameter 'ifname' cannot be '.' or '..'"),
    ('{"execute":"netdev_add","arguments":{"id":"n","ifname":"abcdefghijklmnop"}}',
     "Parameter 'ifname' is longer than 15 bytes"),
    ('{"execute":"migrate","arguments":{"uri":"file:/tmp/' + "d/" * 3000 + '"}}',
     "Parameter 'uri' is too long (a path has at most 4095 bytes)"),
    ('{"execute":"migrate","arguments":{"uri":"file:' + "/d" * 1000 + '"}}',
     "Parameter 'uri' is too deep (more than 256 path components)"),
    ('{"execute":"migrate","arguments":{"uri":"file:/tmp/' + "x" * 256 + '"}}',
     "Parameter 'uri' has a path component longer than 255 bytes"),
    ('{"execute":"migrate","arguments":{"uri":"file:/tmp/a\\u0000"}}',
     "Parameter 'uri' must not contain a NUL character"),
], ids=lambda v: v[:60])
def test_hostile_arguments_refused_before_the_vm(text, desc):
    vm = StrictVm()
    assert run(vm, text) == {"error": {"class": "GenericError", "desc": desc}}
    assert vm.calls == []


def test_lone_surrogate_refused():
    # by the parser (as QEMU does), and by the argument check for requests
    # built another way
    assert run(FakeVm(), '{"execute":"netdev_add","arguments":{"id":"n","ifname":"\\udc80"}}') \
        == {"error": {"class": "GenericError",
                      "desc": "JSON parse error, \\udc80 is not a valid Unicode character"}}
    req = Request("netdev_add", {"id": "n", "ifname": "a\udc80"}, 1)
    vm = FakeVm()
    assert C.execute(req, vm) == {"error": {"class": "GenericError", "desc":
                                            "Parameter 'ifname' is not valid Unicode "
                                            "(a lone surrogate)"}, "id": 1}
    assert vm.calls == []


def test_valid_names_and_paths_pass():
    vm = StrictVm()
    assert run(vm, '{"execute":"netdev_add","arguments":{"id":"n","ifname":"tap-0_a.b"}}') == \
        {"return": {}}
    assert run(vm, '{"execute":"migrate","arguments":{"uri":"file:' + "/d" * 256 + '"}}') == \
        {"return": {}}
    assert run(vm, '{"execute":"device_add","arguments":{"id":"a","driver":"x",'
                   '"romfile":""}}') == {"return": {}}
    assert vm.calls[-1] == ("device_add", (), {"id": "a", "driver": "x"})


@pytest.mark.parametrize("name", ["a\0b", "a\udc80", "a/b", "x" * 16], ids=ascii)
def test_tap_refuses_bad_interface_names_before_opening(name):
    # the same rule for -netdev tap,ifname= (a NUL used to open tap "a")
    from stratopy.devices.virtio.tap import Tap

    with pytest.raises(StratoError, match="the interface name"):
        Tap(ifname=name)


# --------------------------------------------------------------------------
# getfd


class PipeProbe:
    """A pipe whose read end is handed out; the kept write end tells whether
    any copy of the read end is still open (EPIPE once the last one closed),
    which descriptor numbers, reused at once, cannot tell."""

    def __init__(self):
        self.r, self.w = os.pipe()

    @property
    def reader_open(self):
        try:
            os.write(self.w, b"x")
        except BrokenPipeError:
            return False
        return True

    def close(self):
        os.close(self.w)


def test_getfd_without_fd_and_fd_closed_on_errors():
    vm, store = FakeVm(), C.FdStore()
    assert run(vm, '{"execute":"getfd","arguments":{"fdname":"f"}}', fds=store) == {
        "error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}}
    req = QmpSession().feed(b'{"execute":"getfd","arguments":{"fdname":"f"}}')[0]
    kept, refused, stray = PipeProbe(), PipeProbe(), PipeProbe()
    assert C.execute(req, vm, fd=kept.r, fds=store) == {"return": {}}
    assert len(store) == 1 and kept.reader_open   # the connection's store owns it
    assert vm.calls == []                         # getfd never reaches the VM
    # QEMU's name rule
    bad = QmpSession().feed(b'{"execute":"getfd","arguments":{"fdname":"1f"}}')[0]
    assert C.execute(bad, vm, fd=refused.r, fds=store)["error"]["desc"] == \
        "Parameter 'fdname' expects a name not starting with a digit"
    assert not refused.reader_open
    # an fd sent with a command that is not getfd is closed
    C.execute(QmpSession().feed(b'{"execute":"stop"}')[0], vm, fd=stray.r, fds=store)
    assert not stray.reader_open
    store.close()
    assert not kept.reader_open
    for p in (kept, refused, stray):
        p.close()


def test_getfd_bounded_per_connection_and_replaced_by_name():
    # issue 9: 2,000 getfd calls left the monitor holding 2,024 descriptors
    store, vm = C.FdStore(), FakeVm()
    probes = [PipeProbe() for _ in range(200)]
    for i, p in enumerate(probes):
        req = QmpSession().feed(b'{"execute":"getfd","arguments":{"fdname":"n%d"}}' % i)[0]
        rep = C.execute(req, vm, fd=p.r, fds=store)
        if i < C.MAX_NAMED_FDS:
            assert rep == {"return": {}}
        else:
            assert rep["error"]["desc"].startswith("getfd: this connection already holds 64")
    assert len(store) == C.MAX_NAMED_FDS
    assert [p.reader_open for p in probes] == [True] * 64 + [False] * 136
    # the same name again replaces (and closes) the old descriptor, as QEMU
    again = [PipeProbe() for _ in range(50)]
    for p in again:
        req = QmpSession().feed(b'{"execute":"getfd","arguments":{"fdname":"n0"}}')[0]
        assert C.execute(req, vm, fd=p.r, fds=store) == {"return": {}}
    assert not probes[0].reader_open and probes[1].reader_open
    assert [p.reader_open for p in again] == [False] * 49 + [True]
    assert len(store) == C.MAX_NAMED_FDS
    store.close()
    assert not any(p.reader_open for p in probes + again)
    # after close, a late getfd (queued before the hang-up) closes its fd
    late = PipeProbe()
    req = QmpSession().feed(b'{"execute":"getfd","arguments":{"fdname":"x"}}')[0]
    assert "closed" in C.execute(req, vm, fd=late.r, fds=store)["error"]["desc"]
    assert not late.reader_open
    for p in probes + again + [late]:
        p.close()


def test_netdev_add_takes_the_named_fd():
    store = C.FdStore()

    class NetVm(FakeVm):
        def __init__(self, fail):
            super().__init__()
            self.fail = fail

        def netdev_add(self, **args):
            self._rec("netdev_add", **args)
            if self.fail:
                raise QmpError("netdev_add: no")

    ok, fail = NetVm(False), NetVm(True)
    p1, p2 = PipeProbe(), PipeProbe()
    store.put("tapfd", p1.r)
    rep = run(ok, '{"execute":"netdev_add","arguments":{"id":"n","fds":"x:tapfd"}}', fds=store)
    assert rep == {"return": {}}
    assert ok.calls == [("netdev_add", (), {"id": "n", "fd": p1.r})]
    assert len(store) == 0 and p1.reader_open      # the VM owns it now
    os.close(p1.r)
    # refused by the VM: the descriptor is gone from the store and closed
    store.put("tapfd", p2.r)
    rep = run(fail, '{"execute":"netdev_add","arguments":{"id":"n","fd":"tapfd"}}', fds=store)
    assert rep["error"]["desc"] == "netdev_add: no"
    assert len(store) == 0 and not p2.reader_open
    # a name the connection never gave is passed on unchanged
    run(ok, '{"execute":"netdev_add","arguments":{"id":"m","fd":"other"}}', fds=store)
    assert ok.calls[-1] == ("netdev_add", (), {"id": "m", "fd": "other"})
    p1.close()
    p2.close()
