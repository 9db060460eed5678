"""The template server's request checks and wire framing (no KVM)."""

from __future__ import annotations

import os
import socket

import pytest

from stratopy.cli_parse import parse_args
from stratopy.tplserver import request, wire
from stratopy.tplserver.request import RequestError

TEMPLATE = parse_args(["-kernel", "/k", "-m", "64", "-drive", "id=d0,file=/t0.img",
                       "-device", "virtio-blk-device,drive=d0,id=b0",
                       "-drive", "id=d1,file=/t1.img,readonly=on",
                       "-device", "virtio-blk-device,drive=d1,id=b1"])


def clone(**arguments) -> dict:
    return {"execute": "clone", "arguments": arguments}


BOTH = [{"id": "d0", "file": "/c0.img"}, {"id": "d1", "fd": 0}]


def test_a_good_request_keeps_the_template_drive_flags():
    parts = request.parse(clone(drives=BOTH, serial={"fd": 1},
                                qmp={"kind": "unix", "path": "/q"}, name="c"), 2, TEMPLATE)
    assert parts.drives["d0"].file == "/c0.img" and not parts.drives["d0"].readonly
    assert parts.drives["d1"].file == "fd:0" and parts.drives["d1"].readonly
    assert parts.serial.backend == "stdio" and parts.serial_fds == (1, 1)
    assert parts.qmp[0].path == "/q" and parts.name == "c"


@pytest.mark.parametrize("msg, nfds, why", [
    ({"execute": "boot"}, 0, "unknown command 'boot'"),
    (clone(), 0, "drive 'd0' is not given"),
    (clone(drives=BOTH[:1]), 0, "drive 'd1' is not given"),
    (clone(drives=BOTH + [{"id": "d9", "file": "/x"}]), 1, "no drive 'd9' (it has: d0, d1)"),
    (clone(drives=BOTH + [{"id": "d0", "file": "/x"}]), 1, "drive 'd0' is given twice"),
    (clone(drives=[{"id": "d0", "file": "/a", "fd": 0}, BOTH[1]]), 1, "one of 'file' or 'fd'"),
    (clone(drives=BOTH), 0, "drives[1].fd: fd index 0 is not one of the 0 fds"),
    (clone(drives=BOTH, serial={"fd": 0}), 1, "one fd is given to two parts"),
    (clone(drives=BOTH, serial={"fd": True}), 1, "serial.fd: fd index True"),
    (clone(drives=BOTH, serial={"backend": "stdio"}), 1, "stdio: send the fds"),
    (clone(drives=BOTH, serial={"backend": "pty", "path": "/p"}), 1, "a pty has no path"),
    (clone(drives=BOTH, qmp={"kind": "tcp", "host": "::1", "port": 0}), 1, "qmp.port"),
    (clone(drives=BOTH, qmp="unix:/q"), 1, "qmp: must be an object"),
    (clone(drives=BOTH, vnc=1), 1, "arguments: unknown field 'vnc'"),
    ({"execute": "clone", "arguments": []}, 0, "arguments: must be an object"),
])
def test_bad_requests_name_the_field(msg, nfds, why):
    with pytest.raises(RequestError) as e:
        request.parse(msg, nfds, TEMPLATE)
    assert why in str(e.value)


def test_wire_keeps_fds_with_their_line_and_refuses_junk():
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        wire.send(a, {"x": 1}, [r])
        a.sendall(b'{"y"')
        reader = wire.Reader(b)
        reader.feed()
        msg, fds = reader.line()
        assert msg == {"x": 1} and len(fds) == 1
        os.write(w, b"z")
        assert os.read(fds[0], 1) == b"z"          # the same pipe, received
        os.close(fds[0])
        assert reader.line() is None               # half a line: wait for more
        a.sendall(b': 2}\n[3]\nnope\n')
        reader.feed()
        assert reader.line() == ({"y": 2}, [])
        with pytest.raises(wire.WireError, match="not a JSON object"):
            reader.line()
        with pytest.raises(wire.WireError, match="not JSON"):
            reader.line()
        a.sendall(b"x" * (wire.MAX_LINE + 1))
        while len(reader.buf) <= wire.MAX_LINE:
            reader.feed()
        with pytest.raises(wire.WireError, match="longer than"):
            reader.line()
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


def test_adopt_backend_needs_the_same_drive_and_changes_nothing_the_guest_sees(tmp_path):
    from stratopy.devices.virtio.block import BlockDevice, FileBackend
    from stratopy.errors import StratoError

    paths = {}
    for name, size in (("t", 1 << 20), ("same", 1 << 20), ("small", 1 << 16)):
        paths[name] = str(tmp_path / name)
        with open(paths[name], "wb") as f:
            f.truncate(size)
    dev = BlockDevice(FileBackend(paths["t"]))
    config = dev.read_config(0, 24)
    with pytest.raises(StratoError, match="128 sectors, the template's is 2048"):
        dev.adopt_backend(FileBackend(paths["small"]))
    with pytest.raises(StratoError, match="read-only"):
        dev.adopt_backend(FileBackend(paths["same"], readonly=True))
    new = FileBackend(paths["same"])
    dev.adopt_backend(new)
    assert dev.backend is new and dev.read_config(0, 24) == config


@pytest.mark.parametrize("argv, why", [
    (["-kernel", "/k", "-incoming", "file:/t"], "-listen: is required"),
    (["-listen", "tcp:1", "-kernel", "/k"], "use unix:PATH"),
    (["-listen", "unix:/s", "-pool", "0", "-kernel", "/k"], "from 1 to 256"),
    (["-listen", "unix:/s", "-kernel", "/k"], "-incoming: is required"),
    (["-listen", "unix:/s", "-kernel", "/k", "-incoming", "file:/t",
      "-netdev", "tap,id=n0,ifname=t0", "-device", "virtio-net-device,netdev=n0,id=n0"],
     "taps and console chardevs are not served yet"),
    (["-listen", "unix:/s", "-kernel", "/k", "-incoming", "file:/t",
      "-device", "vhost-vsock-device,id=v,guest-cid=3"], "every clone of the pool would take guest-cid 3"),
])
def test_server_command_line_refusals(argv, why):
    from stratopy.errors import ConfigError
    from stratopy.tplserver.server import parse_server_args

    with pytest.raises(ConfigError) as e:
        parse_server_args(argv)
    assert why in str(e.value)


def test_listen_socket_is_private_and_never_takes_over_a_path(tmp_path):
    # Whoever can connect can ask for clones: the socket is the owner's only,
    # whatever the umask; a live server's socket or another kind of file at
    # the path is refused, not replaced; a stale socket is.
    from stratopy.errors import ConfigError
    from stratopy.tplserver.server import Server
    from tests.unit.bounded import umask

    path = str(tmp_path / "tpl.sock")
    with umask(0):
        live = Server._listen(path)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        with pytest.raises(ConfigError, match="a listener is already there"):
            Server._listen(path)
    finally:
        live.close()
    Server._listen(path).close()                   # stale now: replaced
    other = tmp_path / "notes.txt"
    other.write_text("keep")
    with pytest.raises(ConfigError, match="it is a regular file, not a socket"):
        Server._listen(str(other))
    assert other.read_text() == "keep"
