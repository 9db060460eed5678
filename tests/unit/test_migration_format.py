"""codec (strict dataclass <-> JSON), the state file format, migration status."""

from __future__ import annotations

import base64
import enum
import json
import os
import re
import struct
import threading
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratopy.errors import MigrationError, TemplateError
from stratopy.migration import codec, format as fmt
from stratopy.migration.status import MigrationState, MigrationStatus


# --------------------------------------------------------------------------
# sample component states

class Mode(enum.Enum):
    A = "a"
    B = "b"


@dataclass
class Queue:
    index: int
    ready: bool
    desc: int
    avail: int = 0


@dataclass
class Vcpu:
    index: int
    regs: bytes
    msr_indices: list[int] = field(default_factory=list)
    tsc_khz: Optional[int] = None


@dataclass
class Device:
    kind: str
    id: str
    mac: str | None
    queues: list[Queue]
    config: bytes
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Machine:
    vcpus: list[Vcpu]
    devices: list[Device]
    names: list[str]
    by_id: dict[str, Queue]
    ratio: float
    mode: Mode
    sub: Optional[Queue]
    ids: tuple[int, ...] = ()


def sample() -> Machine:
    return Machine(
        vcpus=[Vcpu(0, b"\x00\x01\xff" * 50, [0x10, 0xC0000080], 2_000_000),
               Vcpu(1, b"", [], None)],
        devices=[Device("virtio-net", "net0", "52:54:00:12:34:56",
                        [Queue(0, True, 0x1000, 3), Queue(1, False, 0)], bytes(range(256)),
                        {"nested": [1, 2.5, "x", None, {"k": True}]})],
        names=["a", "β", ""],
        by_id={"q": Queue(7, True, (1 << 64) - 1)},
        ratio=0.25, mode=Mode.B, sub=None, ids=(1, 2, 3))


def plain_sample() -> dict:
    return json.loads(json.dumps(codec.to_plain(sample())))


# --------------------------------------------------------------------------
# codec: round trips

def test_codec_round_trip_nested():
    m = sample()
    plain = codec.to_plain(m)
    text = json.dumps(plain)                      # really JSON-able
    back = codec.from_plain(Machine, json.loads(text))
    assert back == m
    assert isinstance(back.vcpus[0], Vcpu) and isinstance(back.by_id["q"], Queue)
    assert back.mode is Mode.B and back.ids == (1, 2, 3)
    assert plain["vcpus"][0]["regs"] == base64.b64encode(m.vcpus[0].regs).decode()


def test_codec_list_of_dataclasses_top_level():
    vs = [Vcpu(i, bytes([i]) * 8) for i in range(3)]
    plain = codec.to_plain(vs)
    assert codec.from_plain(list[Vcpu], plain) == vs


def test_codec_float_accepts_integer():
    p = plain_sample()
    p["ratio"] = 1
    assert codec.from_plain(Machine, p).ratio == 1.0


def test_codec_defaults_only_when_allowed():
    p = codec.to_plain(Vcpu(0, b"x"))
    del p["tsc_khz"]
    with pytest.raises(TemplateError, match=r"tsc_khz: missing field"):
        codec.from_plain(Vcpu, p)
    assert codec.from_plain(Vcpu, p, allow_defaults=True).tsc_khz is None


# --------------------------------------------------------------------------
# codec: rejections (each names the dotted path)

def _mutate(fn):
    p = plain_sample()
    fn(p)
    return p


@pytest.mark.parametrize("mutate, path, what", [
    (lambda p: p["vcpus"][1].pop("regs"), r"vcpus\[1\]\.regs", "missing field"),
    (lambda p: p["vcpus"][0].update(bogus=1), r"vcpus\[0\]\.bogus", "unknown field"),
    (lambda p: p.update(extra=1), r"extra", "unknown field"),
    (lambda p: p["vcpus"][1].update(index=True), r"vcpus\[1\]\.index", "expected an integer"),
    (lambda p: p["vcpus"][1].update(index=1.0), r"vcpus\[1\]\.index", "expected an integer"),
    (lambda p: p["vcpus"][1].update(index="1"), r"vcpus\[1\]\.index", "expected an integer"),
    (lambda p: p["devices"][0]["queues"][1].update(ready=1),
     r"devices\[0\]\.queues\[1\]\.ready", "expected a boolean"),
    (lambda p: p["vcpus"][0].update(regs=[1, 2]), r"vcpus\[0\]\.regs", "expected base64"),
    (lambda p: p["vcpus"][0].update(regs="!!!!"), r"vcpus\[0\]\.regs", "invalid base64"),
    (lambda p: p["vcpus"][0].update(regs="AAE"), r"vcpus\[0\]\.regs", "invalid base64"),
    (lambda p: p["vcpus"][0].update(msr_indices=[1, "2"]),
     r"vcpus\[0\]\.msr_indices\[1\]", "expected an integer"),
    (lambda p: p["vcpus"][0].update(msr_indices=[1 << 64]),
     r"vcpus\[0\]\.msr_indices\[0\]", "64-bit range"),
    (lambda p: p["vcpus"][0].update(msr_indices={"a": 1}), r"vcpus\[0\]\.msr_indices",
     "expected a list"),
    (lambda p: p.update(vcpus=None), r"vcpus", "got null"),
    (lambda p: p["devices"][0].update(mac=5), r"devices\[0\]\.mac", "expected a string"),
    (lambda p: p["by_id"].update(q=[]), r"by_id\['q'\]", "expected an object"),
    (lambda p: p.update(ratio="x"), r"ratio", "expected a number"),
    (lambda p: p.update(ratio=True), r"ratio", "expected a number"),
    (lambda p: p.update(mode="c"), r"mode", "not a valid Mode"),
    (lambda p: p["devices"][0].update(extra={"x": {1, 2}}), r"devices\[0\]\.extra", "not plain"),
])
def test_codec_rejects(mutate, path, what):
    p = _mutate(mutate)
    with pytest.raises(TemplateError) as ei:
        codec.from_plain(Machine, p)
    msg = str(ei.value)
    assert re.search(path, msg), msg
    assert what in msg, msg


def test_codec_rejects_non_object_top():
    for bad in (None, [], "x", 1, True):
        with pytest.raises(TemplateError):
            codec.from_plain(Machine, bad)


def test_codec_size_caps(monkeypatch):
    monkeypatch.setattr(codec, "MAX_LIST", 10)
    p = plain_sample()
    p["vcpus"][0]["msr_indices"] = list(range(11))
    with pytest.raises(TemplateError, match=r"vcpus\[0\]\.msr_indices: list of 11"):
        codec.from_plain(Machine, p)


def test_codec_huge_bytes_refused_before_decoding():
    p = plain_sample()
    p["vcpus"][0]["regs"] = "A" * (codec._MAX_B64 + 4)
    with pytest.raises(TemplateError, match=r"vcpus\[0\]\.regs: bytes field larger"):
        codec.from_plain(Machine, p)


def test_codec_deep_nesting_in_any_field():
    deep: Any = 0
    for _ in range(10_000):
        deep = [deep]
    p = plain_sample()
    p["devices"][0]["extra"] = {"x": deep}
    with pytest.raises(TemplateError, match="nested deeper"):
        codec.from_plain(Machine, p)


def test_codec_encode_refuses_misfits():
    with pytest.raises(MigrationError, match=r"vcpus\[0\]\.index"):
        codec.to_plain(Machine([Vcpu(True, b"")], [], [], {}, 0.0, Mode.A, None))
    with pytest.raises(MigrationError, match="regs"):
        codec.to_plain(Vcpu(0, "not bytes"))
    with pytest.raises(MigrationError, match="finite"):
        codec.to_plain(Machine([], [], [], {}, float("nan"), Mode.A, None))
    with pytest.raises(MigrationError, match="64-bit"):
        codec.to_plain(Vcpu(1 << 70, b""))
    with pytest.raises(MigrationError, match="not plain"):
        codec.to_plain({"x": object()})


# --------------------------------------------------------------------------
# state file

META = {"arch": "x86_64", "cpu_vendor": "GenuineIntel", "kvm_api_version": 12,
        "stratopy_version": "0.1.0", "created": 1.5,
        "machine": {"vcpus": 2, "mem_size": 1 << 28,
                    "devices": [{"type": "virtio-net-device", "id": "net0",
                                 "mac": "52:54:00:12:34:56"}]}}


def _write(tmp_path) -> str:
    fmt.write_state(str(tmp_path), META, {"machine": sample(), "list": [1, 2]})
    return str(tmp_path / "state")


def _read(path, **kw):
    kw.setdefault("expect_arch", "x86_64")
    kw.setdefault("expect_vendor", "GenuineIntel")
    return fmt.read_state(path, **kw)


def test_state_round_trip(tmp_path):
    path = _write(tmp_path)
    meta, comps = _read(path)
    assert meta == META
    assert codec.from_plain(Machine, comps["machine"]) == sample()
    assert comps["list"] == [1, 2]
    assert os.listdir(tmp_path) == ["state"]          # no temp left behind
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    # the directory itself may be given
    assert _read(str(tmp_path))[0] == META


def test_state_overwrite_is_atomic_replace(tmp_path):
    _write(tmp_path)
    meta2 = dict(META, created=2.0)
    fmt.write_state(str(tmp_path), meta2, {})
    assert _read(str(tmp_path / "state")) == (meta2, {})
    assert os.listdir(tmp_path) == ["state"]


def test_host_meta_and_default_host_check(tmp_path):
    hm = fmt.host_meta()
    assert hm["arch"] and hm["cpu_vendor"] and hm["kvm_api_version"] == 12
    assert fmt.host_meta(cpu_vendor="AuthenticAMD")["cpu_vendor"] == "AuthenticAMD"
    fmt.write_state(str(tmp_path), hm, {})
    meta, _ = fmt.read_state(str(tmp_path / "state"))   # default: compare with this host
    assert meta["arch"] == hm["arch"]


def _corrupt(path, fn):
    data = bytearray(open(path, "rb").read())
    data = fn(data)
    with open(path, "wb") as f:
        f.write(data)


def test_flipped_byte_anywhere_in_payload(tmp_path):
    path = _write(tmp_path)
    good = open(path, "rb").read()
    n = len(good)
    step = max(1, (n - fmt.HEADER_SIZE) // 97)
    for off in range(fmt.HEADER_SIZE, n, step):
        bad = bytearray(good)
        bad[off] ^= 0x01
        open(path, "wb").write(bad)
        with pytest.raises(TemplateError, match="corrupt: checksum mismatch"):
            _read(path)


def test_flipped_checksum_field(tmp_path):
    path = _write(tmp_path)
    for off in (24, 40, 55):
        _corrupt(path, lambda d, o=off: d[:o] + bytes([d[o] ^ 0x80]) + d[o + 1:])
        with pytest.raises(TemplateError, match="corrupt: checksum mismatch"):
            _read(path)
        _corrupt(path, lambda d, o=off: d[:o] + bytes([d[o] ^ 0x80]) + d[o + 1:])
    _read(path)  # flipped back: fine again


@pytest.mark.parametrize("keep, msg", [
    (0, "truncated: empty file"),
    (4, "truncated"),
    (8, "truncated"),
    (30, "truncated"),
    (fmt.HEADER_SIZE, "truncated: header says"),
    (fmt.HEADER_SIZE + 10, "truncated: header says"),
    (-1, "truncated: header says"),
])
def test_truncation(tmp_path, keep, msg):
    path = _write(tmp_path)
    _corrupt(path, lambda d: d[:keep])
    with pytest.raises(TemplateError, match=msg):
        _read(path)


def test_extended_file(tmp_path):
    path = _write(tmp_path)
    _corrupt(path, lambda d: d + b"\0")
    with pytest.raises(TemplateError, match="extended"):
        _read(path)


def test_wrong_magic(tmp_path):
    path = _write(tmp_path)
    _corrupt(path, lambda d: b"QEVM" + d[4:])
    with pytest.raises(TemplateError, match="not a stratopy template"):
        _read(path)
    open(path, "wb").write(b"hello world, a short text file\n")
    with pytest.raises(TemplateError, match="not a stratopy template"):
        _read(path)


def test_newer_version(tmp_path):
    path = _write(tmp_path)
    _corrupt(path, lambda d: d[:8] + struct.pack("<I", 6) + d[12:])
    with pytest.raises(TemplateError,
                       match=r"format version 6 is newer than this stratopy supports \(5\)"):
        _read(path)
    # version 1 (memory file without a header page) is refused as older
    _corrupt(path, lambda d: d[:8] + struct.pack("<I", 1) + d[12:])
    with pytest.raises(TemplateError, match=r"written by an older stratopy \(format "
                                            r"version 1\); take the template again"):
        _read(path)
    # version 2 (before the ACPI GED state) too
    _corrupt(path, lambda d: d[:8] + struct.pack("<I", 2) + d[12:])
    with pytest.raises(TemplateError, match=r"written by an older stratopy \(format "
                                            r"version 2\); take the template again"):
        _read(path)
    # version 3 (before the typed machine state, machine/schema.py) too
    _corrupt(path, lambda d: d[:8] + struct.pack("<I", 3) + d[12:])
    with pytest.raises(TemplateError, match=r"written by an older stratopy \(format "
                                            r"version 3\); take the template again"):
        _read(path)
    # version 4 (before q35 templates: PCI state, i8042) too
    _corrupt(path, lambda d: d[:8] + struct.pack("<I", 4) + d[12:])
    with pytest.raises(TemplateError, match=r"written by an older stratopy \(format "
                                            r"version 4\); take the template again"):
        _read(path)
    _corrupt(path, lambda d: d[:8] + struct.pack("<I", 0) + d[12:])
    with pytest.raises(TemplateError, match="unsupported format version 0"):
        _read(path)


def test_unknown_flags_and_length_field(tmp_path):
    path = _write(tmp_path)
    _corrupt(path, lambda d: d[:12] + struct.pack("<I", 4) + d[16:])
    with pytest.raises(TemplateError, match="unknown header flags"):
        _read(path)
    path = _write(tmp_path)
    _corrupt(path, lambda d: d[:16] + struct.pack("<Q", 1 << 62) + d[24:])
    with pytest.raises(TemplateError, match="truncated: header says"):
        _read(path)


def test_payload_cap_refused_before_reading(tmp_path, monkeypatch):
    path = _write(tmp_path)
    monkeypatch.setattr(fmt, "MAX_PAYLOAD", 10)
    reads = []
    real = fmt._read_exact
    monkeypatch.setattr(fmt, "_read_exact", lambda fd, off, n, p: reads.append(n) or real(fd, off, n, p))
    with pytest.raises(TemplateError, match="exceeds"):
        _read(path)
    assert reads == [fmt.HEADER_SIZE]


def _frame(payload: bytes) -> bytes:
    return fmt._frame(payload)


@pytest.mark.parametrize("payload, msg", [
    (b"{not json", "invalid JSON"),
    (b"\xff\xfe", "invalid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
    (b'{"meta": {"arch": "x86_64", "cpu_vendor": "GenuineIntel", "x": NaN}, "components": {}}',
     "invalid JSON"),
    (b"[]", "exactly 'meta' and 'components'"),
    (b'{"meta": {}, "components": {}, "x": 1}', "exactly"),
    (b'{"meta": [], "components": {}}', "must be objects"),
    (b'{"meta": {"cpu_vendor": "GenuineIntel"}, "components": {}}', "meta.arch missing"),
])
def test_bad_payloads(tmp_path, payload, msg):
    path = tmp_path / "state"
    path.write_bytes(_frame(payload))
    with pytest.raises(TemplateError, match=msg):
        _read(str(path))


def test_foreign_arch_and_vendor(tmp_path):
    path = _write(tmp_path)
    with pytest.raises(TemplateError, match="'x86_64' host, this host is 'aarch64'") as ei:
        _read(path, expect_arch="aarch64")
    assert (ei.value.attribute, ei.value.expected, ei.value.found) == \
        ("arch", "x86_64", "aarch64")
    with pytest.raises(TemplateError, match="'GenuineIntel' CPU, this host has "
                                            "'AuthenticAMD'") as ei:
        _read(path, expect_vendor="AuthenticAMD")
    assert ei.value.attribute == "cpu_vendor"
    # None skips a check
    _read(path, expect_arch=None, expect_vendor=None)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(TemplateError, match="not found"):
        _read(str(tmp_path / "nope"))
    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(TemplateError, match="is a directory"):
        _read(str(d))


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-fifo", "device", "symlink"])
def test_state_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    """A FIFO (or device, or symlink) as DIR/state must not block the reader:
    opened O_NONBLOCK|O_NOFOLLOW, refused in one line naming what it is."""
    import threading
    path = tmp_path / "state"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-to-fifo":
        os.mkfifo(tmp_path / "fifo")
        os.symlink(tmp_path / "fifo", path)
    elif kind == "device":
        os.symlink("/dev/null", path)
    else:
        (tmp_path / "real").mkdir()
        real = _write(tmp_path / "real")
        os.symlink(real, path)
    result = []
    t = threading.Thread(target=lambda: result.append(_catch(str(path))), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "reading the state blocked"
    msg = result[0]
    assert msg and "\n" not in msg
    assert ("FIFO" in msg) if kind == "fifo" else ("symbolic link" in msg)


def _catch(path):
    try:
        _read(path)
    except TemplateError as e:
        return str(e)
    return None


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads anything")
    path = _write(tmp_path)
    os.chmod(path, 0)
    with pytest.raises(TemplateError, match="cannot open"):
        _read(path)


def test_write_state_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(fmt.os, "fsync", boom)
    with pytest.raises(MigrationError, match="No space left"):
        fmt.write_state(str(tmp_path), META, {})
    assert os.listdir(tmp_path) == []


def test_write_state_refuses_unencodable(tmp_path):
    with pytest.raises(MigrationError):
        fmt.write_state(str(tmp_path), META, {"x": object()})
    assert os.listdir(tmp_path) == []


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_only_template_error(tmp_path, data):
    path = tmp_path / "state"
    path.write_bytes(data)
    with pytest.raises(TemplateError):
        _read(str(path))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_mutations_only_template_error(data):
    good = fmt.encode_state(META, {"machine": sample()})
    blob = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    if bytes(blob) == good:
        return
    with pytest.raises(TemplateError):
        fmt.decode_state(bytes(blob), expect_arch="x86_64", expect_vendor="GenuineIntel")


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text()
                    | st.binary(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c,
                                                                        max_size=4),
                    max_leaves=20))
def test_codec_hostile_plain_only_template_error(value):
    """Any JSON-ish (and not-so-JSON) value into from_plain: a Machine or a TemplateError."""
    try:
        codec.from_plain(Machine, value)
    except TemplateError:
        pass
    try:
        codec.from_plain(Machine, {**plain_sample(), "vcpus": [value]})
    except TemplateError:
        pass


# --------------------------------------------------------------------------
# migration status

def test_status_values():
    assert [s.value for s in MigrationStatus] == \
        ["none", "setup", "active", "completed", "failed", "canceled"]
    assert MigrationStatus.parse("canceled") is MigrationStatus.CANCELLED
    assert MigrationStatus.parse("active") is MigrationStatus.ACTIVE
    assert str(MigrationStatus.SETUP) == "setup"


def test_status_transitions():
    s = MigrationState()
    assert s.query() == {"status": "none"}
    with pytest.raises(MigrationError, match="none -> completed"):
        s.complete()
    with pytest.raises(MigrationError):
        s.activate()
    s.start()
    with pytest.raises(MigrationError, match="in progress"):
        s.start()
    s.activate()
    s.complete()
    assert s.status is MigrationStatus.COMPLETED
    with pytest.raises(MigrationError):
        s.fail("late")
    s.start()
    s.fail("disk full")
    assert s.query() == {"status": "failed", "error-desc": "disk full"}
    assert s.error_desc == "disk full"
    s.start()
    assert s.error_desc is None
    assert s.cancel() and s.status is MigrationStatus.CANCELLED
    assert not s.cancel()
    s.start()
    assert s.try_transition(MigrationStatus.SETUP, MigrationStatus.ACTIVE)
    assert not s.try_transition(MigrationStatus.SETUP, MigrationStatus.ACTIVE)


def test_status_thread_safe_start():
    s = MigrationState()
    wins = []

    def worker():
        try:
            s.start()
            wins.append(1)
        except MigrationError:
            pass

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins == [1] and s.status is MigrationStatus.SETUP


@pytest.mark.parametrize("hint", [tuple[int, int], tuple[int], dict[int, str]])
def test_unsupported_container_types_are_refused_both_ways(hint):
    """The encoder and the decoder accept the same container types (one rule,
    codec._elem_type/_value_type): a fixed tuple or non-str keys are a
    programming error in a state class, refused in both directions."""
    value = {1: "a"} if typing.get_origin(hint) is dict else (1, 2)
    with pytest.raises(TypeError, match="unsupported"):
        codec.to_plain(value, hint)
    with pytest.raises(TypeError, match="unsupported"):
        codec.from_plain(hint, {"1": "a"} if isinstance(value, dict) else [1, 2])
