"""QMP protocol and command table, without sockets: bytes in, dicts out."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stratopy
from stratopy.errors import QmpError, StratoError
from stratopy.qmp import commands as C
from stratopy.qmp import events as E
from stratopy.qmp.protocol import (
    NO_ID, ProtocolError, QmpSession, Request, encode, error_reply, event, greeting,
    reply, timestamp,
)

GREETING = ('{"QMP":{"version":{"StratoVirt":{"micro":1,"minor":0,"major":0},'
            '"qemu":{"micro":1,"minor":0,"major":5},"package":"stratopy-%s"},'
            '"capabilities":[]}}\r\n' % stratopy.__version__).encode()


class FakeVm:
    """Records calls; keeps a running/paused flag like the machine does."""

    def __init__(self):
        self.calls = []
        self.running = True
        self.migrate_status = "none"
        self.events = []

    def _rec(self, name, *a, **kw):
        self.calls.append((name, a, kw))

    def query_status(self):
        self._rec("query_status")
        return {"running": self.running, "singlestep": False,
                "status": "running" if self.running else "paused"}

    def stop(self):
        self._rec("stop")
        if not self.running:
            raise QmpError("VM is already paused")
        self.running = False
        self.events.append("STOP")

    def cont(self):
        self._rec("cont")
        if self.running:
            raise QmpError("VM is already running")
        self.running = True
        self.events.append("RESUME")

    def quit(self):
        self._rec("quit")

    def system_reset(self):
        self._rec("system_reset")

    def system_powerdown(self):
        self._rec("system_powerdown")

    def query_vm_generation_id(self):
        return {"guid": "00112233-4455-6677-8899-aabbccddeeff"}

    def query_cpus(self):
        return [C.cpu_info(0, 100), C.cpu_info(1, 101, props=C.cpu_props(core_id=1))]

    def query_hotpluggable_cpus(self):
        return [C.hotpluggable_cpu(0), C.hotpluggable_cpu(1, present=False)]

    def migrate(self, uri):
        self._rec("migrate", uri)
        if not uri.startswith("file:"):
            raise QmpError(f"Invalid migration uri {uri}")
        self.migrate_status = "completed"

    def query_migrate(self):
        return {"status": self.migrate_status}

    def migrate_cancel(self):
        self._rec("migrate_cancel")

    def balloon(self, value):
        self._rec("balloon", value)
        raise QmpError("No balloon device has been activated", "DeviceNotActive")

    def query_balloon(self):
        self._rec("query_balloon")
        return {"actual": 1 << 30}

    def blockdev_add(self, **args):
        self._rec("blockdev_add", **args)

    def netdev_add(self, **args):
        self._rec("netdev_add", **args)

    def blockdev_del(self, node_name):
        self._rec("blockdev_del", node_name)

    def device_add(self, **args):
        self._rec("device_add", **args)

    def device_del(self, id):  # noqa: A002
        self._rec("device_del", id)
        if id != "blk1":
            raise QmpError(f"Device '{id}' not found", "DeviceNotFound")



def run(vm, text, **kw):
    """Feed one request's bytes and execute it; return the reply dict."""
    s = QmpSession()
    items = s.feed(text.encode() if isinstance(text, str) else text)
    assert len(items) == 1, items
    item = items[0]
    if isinstance(item, ProtocolError):
        return item.reply
    return C.execute(item, vm, **kw)


def reqs(items):
    return [(i.name, i.arguments, i.id) if isinstance(i, Request) else ("ERR", i.desc, i.id)
            for i in items]


# --------------------------------------------------------------------------
# builders


def test_greeting_exact_bytes():
    assert encode(greeting()) == GREETING
    assert encode(greeting("9.9")).endswith(b'"package":"stratopy-9.9"},"capabilities":[]}}\r\n')


def test_encode_is_compact_and_crlf():
    assert encode({"return": {}}) == b'{"return":{}}\r\n'
    assert encode(reply({"a": 1}, "x")) == b'{"return":{"a":1},"id":"x"}\r\n'


def test_reply_and_error_shapes():
    assert reply() == {"return": {}}
    assert reply(None, 5) == {"return": {}, "id": 5}
    assert reply([], None) == {"return": [], "id": None}   # a null id is still echoed
    assert error_reply("boom") == {"error": {"class": "GenericError", "desc": "boom"}}
    assert error_reply("x", "DeviceNotFound", "a") == {
        "error": {"class": "DeviceNotFound", "desc": "x"}, "id": "a"}
    assert list(error_reply("x", id=1)) == ["error", "id"]


def test_event_shape():
    ev = event("STOP", None, now=1583908726.162739)
    assert ev == {"event": "STOP", "data": {},
                  "timestamp": {"seconds": 1583908726, "microseconds": 162739}}
    assert list(ev) == ["event", "data", "timestamp"]
    ev = event(E.SHUTDOWN, E.shutdown_data(False, E.HOST_QMP_QUIT))
    assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
    ts = timestamp()
    assert set(ts) == {"seconds", "microseconds"} and 0 <= ts["microseconds"] < 1_000_000
    assert E.device_deleted_data("blk1") == {"device": "blk1", "path": "blk1"}


# --------------------------------------------------------------------------
# framing


STOP = b'{"execute":"stop"}'
CONT = b'{"execute":"cont","id":7}'


@pytest.mark.parametrize("sep", [b"", b"\n", b"\r\n", b"  \t", b"\n\n\r\n"])
def test_framing_separators(sep):
    s = QmpSession()
    items = s.feed(STOP + sep + CONT + sep)
    assert reqs(items) == [("stop", {}, NO_ID), ("cont", {}, 7)]
    assert s.idle


def test_framing_no_newline_single():
    # StratoVirt's own test client sends no newline at all
    assert reqs(QmpSession().feed(STOP)) == [("stop", {}, NO_ID)]


def test_framing_split_every_byte():
    s = QmpSession()
    data = STOP + CONT + b'\n{"execute":"migrate","arguments":{"uri":"file:/t \\"q\\" {x}"}}'
    out = []
    for i in range(len(data)):
        out += s.feed(data[i:i + 1])
    assert reqs(out) == [("stop", {}, NO_ID), ("cont", {}, 7),
                         ("migrate", {"uri": 'file:/t "q" {x}'}, NO_ID)]


def test_framing_split_object_over_chunks():
    s = QmpSession()
    assert s.feed(b'{"execute":"qu') == []
    assert not s.idle and s.buffered > 0
    assert s.feed(b'ery-status", "id": {"nested": [1, {"}": "{"}]}') == []
    assert reqs(s.feed(b'}')) == [("query-status", {}, {"nested": [1, {"}": "{"}]})]


def test_framing_multiline_value():
    text = json.dumps({"execute": "migrate", "arguments": {"uri": "file:/x"}}, indent=2)
    assert reqs(QmpSession().feed(text.encode())) == [("migrate", {"uri": "file:/x"}, NO_ID)]


def test_framing_utf8_and_escapes():
    items = QmpSession().feed('{"execute":"x","id":"é\\u00e9\\n"}'.encode())
    assert reqs(items) == [("x", {}, "éé\n")]


# --------------------------------------------------------------------------
# protocol errors: the session goes on


@pytest.mark.parametrize("text,desc", [
    (b"123\n", "QMP input must be a JSON object"),
    (b"[1, 2]", "QMP input must be a JSON object"),
    (b'"execute"\n', "QMP input must be a JSON object"),
    (b"null\n", "QMP input must be a JSON object"),
    (b'{"arguments":{}}', "QMP input lacks member 'execute'"),
    (b'{"execute":5}', "QMP input member 'execute' must be a string"),
    (b'{"execute":"stop","arguments":[]}', "QMP input member 'arguments' must be an object"),
    (b'{"execute":"stop","foo":1}', "QMP input member 'foo' is unexpected"),
])
def test_malformed_requests(text, desc):
    items = QmpSession().feed(text)
    assert len(items) == 1 and isinstance(items[0], ProtocolError)
    assert items[0].desc == desc
    assert items[0].reply == {"error": {"class": "GenericError", "desc": desc}}


def test_malformed_request_echoes_id():
    items = QmpSession().feed(b'{"id":"abc","arguments":{}}')
    assert items[0].reply == {"error": {"class": "GenericError",
                                        "desc": "QMP input lacks member 'execute'"},
                              "id": "abc"}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(junk=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=5))
def test_random_bytes_never_raise_and_session_recovers(junk, cuts):
    s = QmpSession(max_message=128)
    points = sorted({c for c in cuts if c < len(junk)})
    prev = 0
    for p in points + [len(junk)]:
        for item in s.feed(junk[prev:p]):
            assert isinstance(item, (Request, ProtocolError))
            if isinstance(item, ProtocolError):
                assert "internal scanner error" not in item.desc
                encode(item.reply)
        prev = p
    # 0xff cannot appear in JSON outside a string, and a newline cannot appear
    # inside one: together they always end whatever partial message is pending.
    items = s.feed(b'\xff\n{"execute":"query-status","id":"after"}')
    assert items, "the valid command was not parsed"
    last = items[-1]
    assert isinstance(last, Request) and last.name == "query-status" and last.id == "after"
    assert s.idle
    rep = C.execute(last, FakeVm())
    assert rep["id"] == "after" and rep["return"]["status"] == "running"


@settings(max_examples=80, deadline=None)
@given(objs=st.lists(st.dictionaries(st.text(max_size=5),
                                     st.recursive(st.none() | st.booleans() | st.integers()
                                                  | st.text(max_size=8),
                                                  lambda ch: st.lists(ch, max_size=3)
                                                  | st.dictionaries(st.text(max_size=3), ch,
                                                                    max_size=3),
                                                  max_leaves=8),
                                     max_size=3), min_size=1, max_size=4),
       data=st.data())
def test_split_anywhere_gives_same_messages(objs, data):
    wire = b"".join(json.dumps({"execute": "x", "id": o}, ensure_ascii=data.draw(st.booleans()))
                    .encode() + data.draw(st.sampled_from([b"", b"\n", b" ", b"\r\n"]))
                    for o in objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    s = QmpSession()
    out, prev = [], 0
    for c in cuts + [len(wire)]:
        out += s.feed(wire[prev:c])
        prev = c
    assert [(i.name, i.id) for i in out] == [("x", o) for o in objs]


# --------------------------------------------------------------------------
# command table


def test_ids_echoed_on_every_reply():
    vm = FakeVm()
    for text in [
        '{"execute":"qmp_capabilities","id":"c1"}',
        '{"execute":"query-status","id":"c1"}',
        '{"execute":"query-version","id":"c1"}',
        '{"execute":"stop","id":"c1"}',
        '{"execute":"stop","id":"c1"}',                          # error from the VM
        '{"execute":"nope","id":"c1"}',                          # unknown command
        '{"execute":"migrate","arguments":{},"id":"c1"}',        # missing arg
        '{"execute":"migrate","arguments":{"uri":1},"id":"c1"}',  # wrong type
        '{"execute":"stop","arguments":{"x":1},"id":"c1"}',      # extra arg
        '{"execute":"device_del","arguments":{"id":"zz"},"id":"c1"}',
        '{"arguments":{},"id":"c1"}',                            # protocol error
    ]:
        rep = run(vm, text)
        assert rep["id"] == "c1", (text, rep)
    # and no id key when the request had none
    assert "id" not in run(vm, '{"execute":"qmp_capabilities"}')
    # any JSON value is a valid id
    assert run(vm, '{"execute":"query-kvm","id":{"a":[1]}}')["id"] == {"a": [1]}


def test_qmp_capabilities_any_time():
    vm = FakeVm()
    assert run(vm, '{"execute":"qmp_capabilities"}') == {"return": {}}
    assert run(vm, '{"execute":"qmp_capabilities","arguments":{}}') == {"return": {}}
    assert run(vm, '{"execute":"qmp_capabilities","arguments":{"enable":[]}}') == {"return": {}}
    rep = run(vm, '{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
    assert rep["error"]["desc"] == "Capability 'oob' not available"


def test_unknown_command():
    assert run(FakeVm(), '{"execute":"query-foo"}') == {
        "error": {"class": "CommandNotFound", "desc": "The command query-foo has not been found"}}


@pytest.mark.parametrize("text,desc", [
    ('{"execute":"migrate"}', "Parameter 'uri' is missing"),
    ('{"execute":"migrate","arguments":{"uri":5}}', "Parameter 'uri' expects a string"),
    ('{"execute":"migrate","arguments":{"uri":"file:/x","foo":1}}', "Invalid parameter 'foo'"),
    ('{"execute":"migrate","arguments":{"uri":"file:/x","detach":"yes"}}',
     "Parameter 'detach' expects a boolean"),
    ('{"execute":"stop","arguments":{"force":true}}', "Invalid parameter 'force'"),
    ('{"execute":"query-status","arguments":{"x":1}}', "Invalid parameter 'x'"),
    ('{"execute":"device_del"}', "Parameter 'id' is missing"),
    ('{"execute":"device_del","arguments":{"id":null}}', "Parameter 'id' expects a string"),
    ('{"execute":"device_add","arguments":{"id":"a"}}', "Parameter 'driver' is missing"),
    ('{"execute":"device_add","arguments":{"id":"a","driver":"x","opts":{}}}',
     "Invalid parameter 'opts'"),
    ('{"execute":"blockdev-add","arguments":{"node-name":"d"}}', "Parameter 'file' is missing"),
    ('{"execute":"blockdev-add","arguments":{"node-name":"d","file":{"driver":"file"}}}',
     "Parameter 'file.filename' is missing"),
    ('{"execute":"blockdev-add","arguments":{"node-name":"d","file":"/x","cache":{"direct":1}}}',
     "Parameter 'cache.direct' expects a boolean"),
    ('{"execute":"blockdev-add","arguments":{"node-name":"d","file":"/x","cache":{"zz":true}}}',
     "Invalid parameter 'cache.zz'"),
    ('{"execute":"blockdev-add","arguments":{"node-name":"d","file":5}}',
     "Parameter 'file' expects an object or a string"),
    ('{"execute":"netdev_add","arguments":{"id":"n","vhost":"on"}}',
     "Parameter 'vhost' expects a boolean"),
    ('{"execute":"netdev_add","arguments":{"id":"n","queues":true}}',
     "Parameter 'queues' expects an integer"),
    ('{"execute":"getfd","arguments":{}}', "Parameter 'fdname' is missing"),
])
def test_argument_errors(text, desc):
    vm = FakeVm()
    assert run(vm, text) == {"error": {"class": "GenericError", "desc": desc}}
    assert vm.calls == [], "the VM must not be called when arguments are wrong"


def test_stop_cont_state_errors():
    vm = FakeVm()
    assert run(vm, '{"execute":"stop"}') == {"return": {}}
    assert run(vm, '{"execute":"stop"}') == {
        "error": {"class": "GenericError", "desc": "VM is already paused"}}
    assert vm.events == ["STOP"]
    assert run(vm, '{"execute":"query-status"}') == {
        "return": {"running": False, "singlestep": False, "status": "paused"}}
    assert run(vm, '{"execute":"cont"}') == {"return": {}}
    assert run(vm, '{"execute":"cont"}')["error"]["desc"] == "VM is already running"
    assert vm.events == ["STOP", "RESUME"]


def test_vm_commands_forward_arguments():
    vm = FakeVm()
    run(vm, '{"execute":"migrate","arguments":{"uri":"file:/tmp/t","detach":true}}')
    run(vm, '{"execute":"device_add","arguments":{"id":"blk1","driver":"virtio-blk-device",'
            '"drive":"d1","serial":"s","num-queues":2,"share-rw":"on"}}')
    run(vm, '{"execute":"blockdev-add","arguments":{"node-name":"d1","file":{"driver":"file",'
            '"filename":"/img"},"cache":{"direct":true},"read-only":true}}')
    run(vm, '{"execute":"blockdev-add","arguments":{"node-name":"d2","file":"/img2"}}')
    run(vm, '{"execute":"netdev_add","arguments":{"id":"n1","ifname":"tap0","fd":"fd1"}}')
    run(vm, '{"execute":"device_del","arguments":{"id":"blk1"}}')
    run(vm, '{"execute":"system_reset"}')
    run(vm, '{"execute":"system_powerdown"}')
    run(vm, '{"execute":"migrate_cancel"}')
    run(vm, '{"execute":"quit"}')
    assert vm.calls == [
        ("migrate", ("file:/tmp/t",), {}),
        ("device_add", (), {"id": "blk1", "driver": "virtio-blk-device", "drive": "d1",
                            "serial": "s", "num_queues": 2, "share_rw": "on"}),
        ("blockdev_add", (), {"node_name": "d1", "file": {"driver": "file", "filename": "/img"},
                              "cache": {"direct": True}, "read_only": True}),
        ("blockdev_add", (), {"node_name": "d2",
                              "file": {"driver": "file", "filename": "/img2"}}),
        ("netdev_add", (), {"id": "n1", "ifname": "tap0", "fd": "fd1"}),
        ("device_del", ("blk1",), {}),
        ("system_reset", (), {}),
        ("system_powerdown", (), {}),
        ("migrate_cancel", (), {}),
        ("quit", (), {}),
    ]


def test_vm_error_classes_and_failures():
    vm = FakeVm()
    assert run(vm, '{"execute":"device_del","arguments":{"id":"zz"}}') == {
        "error": {"class": "DeviceNotFound", "desc": "Device 'zz' not found"}}
    assert run(vm, '{"execute":"migrate","arguments":{"uri":"tcp:0:1"}}')["error"]["desc"] == \
        "Invalid migration uri tcp:0:1"
    assert run(vm, '{"execute":"query-migrate"}') == {"return": {"status": "none"}}
    run(vm, '{"execute":"migrate","arguments":{"uri":"file:/t"}}')
    assert run(vm, '{"execute":"query-migrate"}') == {"return": {"status": "completed"}}

    class Broken(FakeVm):
        def stop(self):
            raise RuntimeError("kaput")

        def cont(self):
            raise StratoError("vcpu thread gone")

    assert run(Broken(), '{"execute":"stop","id":1}') == {
        "error": {"class": "GenericError", "desc": "internal error: RuntimeError: kaput"},
        "id": 1}
    assert run(Broken(), '{"execute":"cont"}') == {
        "error": {"class": "GenericError", "desc": "vcpu thread gone"}}
    assert run(None, '{"execute":"stop"}') == {
        "error": {"class": "GenericError", "desc": "The VM is not ready"}}


def test_static_commands():
    vm = FakeVm()
    v = run(vm, '{"execute":"query-version"}')["return"]
    assert v == {"StratoVirt": {"micro": 1, "minor": 0, "major": 0},
                 "qemu": {"micro": 1, "minor": 0, "major": 5},
                 "package": f"stratopy-{stratopy.__version__}"}
    assert v == greeting()["QMP"]["version"]
    assert run(vm, '{"execute":"query-target"}') == {"return": {"arch": "x86_64"}}
    assert run(vm, '{"execute":"query-kvm"}') == {"return": {"enabled": True, "present": True}}
    machines = run(vm, '{"execute":"query-machines"}')["return"]
    assert [m["name"] for m in machines] == ["microvm"]
    assert set(machines[0]) == {"hotpluggable-cpus", "name", "numa-mem-supported", "cpu-max",
                                "deprecated"}
    names = [e["name"] for e in run(vm, '{"execute":"query-events"}')["return"]]
    assert {"SHUTDOWN", "STOP", "RESUME", "DEVICE_DELETED"} <= set(names)
    cmds = [c["name"] for c in run(vm, '{"execute":"query-commands"}')["return"]]
    for name in ["qmp_capabilities", "stop", "cont", "quit", "query-status", "query-cpus",
                 "query-hotpluggable-cpus", "query-version", "query-commands", "query-target",
                 "query-kvm", "query-machines", "query-events", "system_reset",
                 "system_powerdown", "migrate", "query-migrate", "migrate_cancel",
                 "blockdev-add", "netdev_add", "device_add", "device_del", "getfd",
                 "query-vm-generation-id"]:
        assert name in cmds
    assert vm.calls == []


def test_query_vm_generation_id_returns_the_vm_guid():
    vm = FakeVm()
    reply = run(vm, '{"execute":"query-vm-generation-id"}')
    assert reply == {"return": {"guid": "00112233-4455-6677-8899-aabbccddeeff"}}
    err = run(vm, '{"execute":"query-vm-generation-id","arguments":{"x":1}}')
    assert "error" in err


def test_cpu_reply_shapes():
    vm = FakeVm()
    cpus = run(vm, '{"execute":"query-cpus"}')["return"]
    assert cpus[0] == {"arch": "x86", "current": True,
                       "qom_path": "/machine/unattached/device[0]", "halted": False,
                       "props": {"socket-id": 0, "die_id": 0, "thread-id": 0, "core-id": 0},
                       "CPU": 0, "thread_id": 100}
    assert list(cpus[0]) == ["arch", "current", "qom_path", "halted", "props", "CPU",
                             "thread_id"]
    hp = run(vm, '{"execute":"query-hotpluggable-cpus"}')["return"]
    assert hp[0] == {"type": "host-x86-cpu", "vcpus-count": 1,
                     "props": {"socket-id": 0, "die_id": 0, "thread-id": 0, "core-id": 0},
                     "qom-path": "/machine/unattached/device[0]"}
    assert "qom-path" not in hp[1]


def test_dispatch_used_only_for_vm_commands():
    vm, seen = FakeVm(), []

    def dispatch(fn):
        seen.append(fn)
        return fn()

    for text in ['{"execute":"query-version"}', '{"execute":"qmp_capabilities"}',
                 '{"execute":"nope"}', '{"execute":"migrate"}']:
        run(vm, text, dispatch=dispatch)
    assert seen == []
    assert run(vm, '{"execute":"query-status"}', dispatch=dispatch)["return"]["running"]
    assert len(seen) == 1


def test_dispatch_failure_is_an_error_reply():
    def dispatch(fn):
        raise StratoError("machine thread gone")

    assert run(FakeVm(), '{"execute":"stop","id":3}', dispatch=dispatch) == {
        "error": {"class": "GenericError", "desc": "machine thread gone"}, "id": 3}

    def lazy(fn):  # returns without running fn
        return None

    rep = run(FakeVm(), '{"execute":"stop"}', dispatch=lazy)
    assert "shutting down" in rep["error"]["desc"]


def test_deliver_called_once_inside_dispatch():
    vm, log = FakeVm(), []

    def dispatch(fn):
        log.append("enter")
        fn()
        log.append("leave")

    req = QmpSession().feed(b'{"execute":"stop","id":1}')[0]
    rep = C.execute(req, vm, dispatch, deliver=lambda r: log.append(r))
    assert log == ["enter", {"return": {}, "id": 1}, "leave"]
    assert rep == {"return": {}, "id": 1}
    log.clear()
    req = QmpSession().feed(b'{"execute":"nope"}')[0]
    C.execute(req, vm, dispatch, deliver=lambda r: log.append(r))
    assert log == [{"error": {"class": "CommandNotFound",
                              "desc": "The command nope has not been found"}}]


def test_check_arguments_helper():
    assert C.check_arguments("migrate", {"uri": "file:/x"}) == {"uri": "file:/x"}
    with pytest.raises(QmpError) as ei:
        C.check_arguments("nope", {})
    assert ei.value.klass == "CommandNotFound"


def test_vmcontrol_protocol_is_satisfied_by_fake():
    assert isinstance(FakeVm(), C.VmControl)
