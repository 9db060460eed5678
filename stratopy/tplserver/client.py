"""``stratopy-clone``: ask a template server for a clone, print its pid.

    stratopy-clone -server unix:PATH [-drive id=ID,file=PATH ...]
                   [-serial stdio|file,path=P|socket,path=P[,server,nowait]|pty]
                   [-netdev tap,id=ID,ifname=NAME|fd=N|fds=N:M... ...]
                   [-chardev BACKEND,id=ID[,path=P][,server,nowait] ...]
                   [-qmp unix:PATH,server,nowait] [-name NAME]

The options are the per-VM ones of the stratopy (StratoVirt) command line
the clone replaces, with the same syntax; everything else is the
template's. ``-serial stdio`` (and ``-chardev stdio``) hands the client's
own stdin/stdout to the clone, ``-netdev tap,fd=N`` the client's fd N
(SCM_RIGHTS). ``-netdev`` names a netdev of the template (each needs its
tap), ``-chardev`` the chardev of one of its virtconsoles. Exit 0 and the clone's pid on stdout, or one error
line on stderr and exit 1 (2 for a bad command line).
"""

from __future__ import annotations

import socket
import sys

from stratopy.errors import ConfigError, StratoError
from stratopy.tplserver import wire
from stratopy.tplserver.request import unix_path_option

USAGE = ("usage: stratopy-clone -server unix:PATH [-drive id=ID,file=PATH]... "
         "[-serial SPEC] [-netdev tap,id=ID,ifname=NAME|fd=N|fds=N:M...]... "
         "[-chardev BACKEND,id=ID,...]... [-qmp unix:PATH,server,nowait] [-name NAME]")


class CloneError(StratoError):
    """The server refused the request (its one-line reason)."""


def call(server: str, msg: dict, fds: list[int] = (), timeout: float = 30.0) -> dict:
    """Send one message to the server at ``server``; its reply, or CloneError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(server)
            wire.send(s, msg, list(fds))
            reader = wire.Reader(s)
            got = None
            while got is None and not reader.eof:
                reader.feed()
                got = reader.line()
        except (OSError, wire.WireError) as e:
            raise CloneError(f"template server {server}: {e}") from None
        if got is None:
            raise CloneError(f"template server {server} closed the connection")
        reply, extra = got
        wire.close_fds(extra)
        if "error" in reply:
            raise CloneError(str(reply["error"].get("desc", reply["error"])))
        return reply
    finally:
        s.close()


def request_clone(server: str, arguments: dict, fds: list[int] = (),
                  timeout: float = 30.0) -> int:
    """Send one clone request; the clone's pid, or CloneError."""
    reply = call(server, {"execute": "clone", "arguments": arguments}, fds, timeout)
    pid = reply.get("return", {}).get("pid") if isinstance(reply.get("return"), dict) else None
    if type(pid) is not int:
        raise CloneError(f"template server {server}: unexpected reply {reply!r}")
    return pid


def build_request(argv: list[str]) -> tuple[str, dict, list[int]]:
    """(server path, arguments, fds) from a command line (ConfigError)."""
    from stratopy.cli_parse import (_parse_chardev, _parse_drive, _parse_netdev, _parse_qmp,
                                    _parse_serial)

    server, args, fds = None, {}, []

    def chardev_args(spec) -> dict:
        if spec.backend == "stdio":
            fds.extend([0, 1])
            return {"in": len(fds) - 2, "out": len(fds) - 1}
        return {"backend": spec.backend, "path": spec.path, "server": spec.server,
                "nowait": spec.nowait}

    it = iter(argv)
    for opt in it:
        if opt not in ("-server", "-drive", "-serial", "-qmp", "-name", "-netdev", "-chardev"):
            raise ConfigError(opt, "unknown option (" + USAGE[7:] + ")")
        value = next(it, None)
        if opt == "-server":
            server = unix_path_option(opt, value)
        elif value is None:
            raise ConfigError(opt, "needs a value")
        elif opt == "-drive":
            d = _parse_drive(value)
            args.setdefault("drives", []).append({"id": d.id, "file": d.file})
        elif opt == "-serial":
            spec = _parse_serial(value)
            if spec is None:
                continue
            if isinstance(spec, str):
                raise ConfigError(opt, "chardev:ID is not available here")
            args["serial"] = chardev_args(spec)
        elif opt == "-netdev":
            nd = _parse_netdev(value)
            item: dict = {"id": nd.id}
            if nd.ifname is not None:
                item["ifname"] = nd.ifname
            else:
                item["fds"] = list(range(len(fds), len(fds) + 1 + len(nd.extra_fds)))
                fds.extend([nd.fd, *nd.extra_fds])
            args.setdefault("netdevs", []).append(item)
        elif opt == "-chardev":
            ch = _parse_chardev(value)
            args.setdefault("chardevs", []).append(dict(chardev_args(ch), id=ch.id))
        elif opt == "-qmp":
            q = _parse_qmp(value)
            args["qmp"] = ({"kind": "unix", "path": q.path} if q.kind == "unix"
                           else {"kind": "tcp", "host": q.host, "port": q.port})
        else:
            args["name"] = value
    if server is None:
        raise ConfigError("-server", "is required (-server unix:PATH)")
    return server, args, fds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"], ["-help"]):
        print(USAGE)
        return 0
    try:
        server, args, fds = build_request(argv)
        pid = request_clone(server, args, fds)
    except StratoError as e:
        print(f"stratopy-clone: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    print(pid, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
