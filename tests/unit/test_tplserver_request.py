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


NET_TEMPLATE = parse_args([
    "-kernel", "/k", "-m", "64", "-serial", "stdio",
    "-netdev", "tap,id=net0,ifname=t0", "-device", "virtio-net-device,netdev=net0,id=n0",
    "-device", "virtio-serial-device,id=vser0",
    "-chardev", "socket,id=con0,path=/tpl.sock,server,nowait",
    "-device", "virtconsole,chardev=con0,id=console0"])


def test_taps_and_console_chardevs_per_clone():
    """A tap by name or by fds (a multi-queue tap's queues) for each of the
    template's netdevs, a chardev for its virtconsole: the template's
    netdev keeps its own fields (queues, vhost), the fds are indexes."""
    parts = request.parse(clone(netdevs=[{"id": "net0", "ifname": "tap7"}],
                                chardevs=[{"id": "con0", "backend": "socket", "path": "/c.sock",
                                           "server": True, "nowait": True}]), 0, NET_TEMPLATE)
    nd = parts.netdevs["net0"]
    assert (nd.ifname, nd.fd, nd.extra_fds, nd.queues) == ("tap7", None, (), 1)
    cfg, fds = parts.consoles["con0"]
    assert (cfg.id, cfg.backend, cfg.path, cfg.server, fds) == ("con0", "socket", "/c.sock",
                                                                True, (None, None))
    parts = request.parse(clone(netdevs=[{"id": "net0", "fds": [2, 0]}],
                                chardevs=[{"id": "con0", "in": 1, "out": 3}]), 4, NET_TEMPLATE)
    nd = parts.netdevs["net0"]
    assert (nd.ifname, nd.fd, nd.extra_fds) == (None, 2, (0,))
    assert parts.consoles["con0"][0].backend == "stdio" and parts.consoles["con0"][1] == (1, 3)
    # a console is optional (its output is dropped), a tap is not
    assert request.parse(clone(netdevs=[{"id": "net0", "fd": 0}]), 1,
                         NET_TEMPLATE).consoles == {}


@pytest.mark.parametrize("msg, nfds, why", [
    (clone(), 0, "netdev 'net0' is not given (each clone needs its own tap)"),
    (clone(netdevs=[{"id": "n0", "ifname": "t"}]), 0, "no netdev 'n0' (it has: net0)"),
    (clone(netdevs=[{"id": "net0"}]), 0, "netdevs[0]: give one of 'ifname', 'fd' or 'fds'"),
    (clone(netdevs=[{"id": "net0", "ifname": "t", "fd": 0}]), 1, "give one of"),
    (clone(netdevs=[{"id": "net0", "ifname": "a/b"}]), 0, "netdevs[0].ifname: not a valid"),
    (clone(netdevs=[{"id": "net0", "fds": []}]), 0, "netdevs[0].fds: must be a list"),
    (clone(netdevs=[{"id": "net0", "fds": [0, 5]}]), 1, "netdevs[0].fds[1]: fd index 5"),
    (clone(netdevs=[{"id": "net0", "fd": 0}, {"id": "net0", "fd": 1}]), 2, "given twice"),
    (clone(netdevs=[{"id": "net0", "fd": 0}], serial={"fd": 0}), 1, "one fd is given to two"),
    (clone(netdevs=[{"id": "net0", "fd": 0}], chardevs=[{"id": "con0", "fd": 0}]), 1,
     "one fd is given to two"),
    (clone(netdevs=[{"id": "net0", "fd": 0}], chardevs=[{"id": "serial_chardev", "fd": 0}]), 1,
     "no virtconsole chardev 'serial_chardev' (it has: con0)"),
    (clone(netdevs=[{"id": "net0", "fd": 0}], chardevs=[{"id": "con0", "backend": "vnc"}]), 1,
     "chardevs[0].backend: 'vnc' is not file, socket or pty"),
    (clone(netdevs=[{"id": "net0", "fd": 0}], chardevs={"id": "con0"}), 1,
     "chardevs: must be a list"),
])
def test_bad_tap_and_console_requests_name_the_field(msg, nfds, why):
    with pytest.raises(RequestError) as e:
        request.parse(msg, nfds, NET_TEMPLATE)
    assert why in str(e.value)


def test_clone_command_line_sends_taps_and_consoles():
    from stratopy.tplserver.client import build_request

    r_fd, w_fd = os.pipe()
    try:
        server, args, fds = build_request([
            "-server", "unix:/s", "-netdev", f"tap,id=net0,fds={r_fd}:{w_fd}",
            "-chardev", "stdio,id=con0", "-serial", "file,path=/log"])
    finally:
        os.close(r_fd)
        os.close(w_fd)
    assert server == "/s"
    assert args["netdevs"] == [{"id": "net0", "fds": [0, 1]}]
    assert args["chardevs"] == [{"id": "con0", "in": 2, "out": 3}]
    assert fds == [r_fd, w_fd, 0, 1]
    _, args, fds = build_request(["-server", "unix:/s", "-netdev", "tap,id=net0,ifname=tap3",
                                  "-chardev", "socket,id=con0,path=/c,server,nowait"])
    assert args == {"netdevs": [{"id": "net0", "ifname": "tap3"}],
                    "chardevs": [{"id": "con0", "backend": "socket", "path": "/c",
                                  "server": True, "nowait": True}]} and fds == []


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
      "-device", "vhost-vsock-device,id=v,guest-cid=3"], "every clone of the pool would take guest-cid 3"),
    (["-listen", "unix:/s", "-kernel", "/k", "-incoming", "file:/t", "-daemonize"],
     "not with stratopy-server"),
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


def test_preload_imports_q35s_pci_side_only_for_a_q35_template():
    """A q35 member restores virtio-pci functions and root ports: the server
    imports their modules before forking (shared, not imported in each
    member); a microvm server does not pay for them."""
    import ast
    import subprocess
    import sys

    code = ("import sys; from stratopy.tplserver import server as s; s.preload({!r}); "
            "print(sorted(m for m in s._Q35_MODULES if m in sys.modules))")
    out = {}
    for machine in ("microvm", "q35"):
        r = subprocess.run([sys.executable, "-c", code.format(machine)],
                           capture_output=True, text=True, timeout=60, check=True)
        out[machine] = ast.literal_eval(r.stdout)
    from stratopy.tplserver.server import _Q35_MODULES
    assert out["q35"] == sorted(_Q35_MODULES)
    assert "stratopy.pci.virtio_pci" not in out["microvm"]
