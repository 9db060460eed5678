"""A clone request, checked against the template's command line (pure).

``{"execute": "clone", "arguments": {...}}``, arguments:

- ``drives``: ``[{"id": ID, "file": PATH} | {"id": ID, "fd": N}, ...]``:
  exactly the drives of the template's command line, each a file of the
  template drive's size (its flags, readonly/direct, are the template's);
- ``serial``: ``{"fd": N}`` (input and output; or ``{"in": N, "out": M}``)
  or a chardev: ``{"backend": "file"|"socket"|"pty", "path": P,
  "server": bool, "nowait": bool}``; absent: the serial output is dropped;
- ``qmp``: ``{"kind": "unix", "path": P}`` or ``{"kind": "tcp", "host": H,
  "port": N}`` (listening, as ``-qmp ...,server,nowait``); absent: none;
- ``name``: the clone's ``-name``.

``N`` indexes the fds sent with the request (SCM_RIGHTS, in order). A
request is refused with one RequestError line naming the field.
"""

from __future__ import annotations

from stratopy import config as cfgmod

SERIAL_ID = "serial_chardev"          # the chardev -serial creates (StratoVirt's id)


def unix_path_option(option: str, value: str | None) -> str:
    """PATH of a ``unix:PATH`` option value (-listen, -server); ConfigError."""
    from stratopy.errors import ConfigError

    if value is None:
        raise ConfigError(option, "needs a value")
    if not value.startswith("unix:") or len(value) == 5:
        raise ConfigError(option, f"'{value}': use unix:PATH")
    return value[5:]


class RequestError(Exception):
    """The request cannot be served; the message is the one-line reply."""


class CloneParts:
    """What a pool member needs to become a clone: ``drives`` {id: DriveConfig}
    (``file`` may be ``fd:N``), ``serial`` a ChardevConfig or None with
    ``serial_fds`` (in, out) indexes, ``qmp`` a tuple of QmpConfig."""

    def __init__(self, drives, serial, serial_fds, qmp, name):
        self.drives, self.serial, self.serial_fds = drives, serial, serial_fds
        self.qmp, self.name = qmp, name


def _fd_index(where: str, value, nfds: int) -> int:
    if type(value) is not int or not 0 <= value < nfds:
        raise RequestError(f"{where}: fd index {value!r} is not one of the {nfds} fds sent")
    return value


def _string(where: str, value) -> str:
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        raise RequestError(f"{where}: must be a non-empty string")
    return value


def _only(where: str, obj: dict, keys: set) -> None:
    extra = sorted(set(obj) - keys)
    if extra:
        raise RequestError(f"{where}: unknown field '{extra[0]}'")


def parse(msg: dict, nfds: int, template: cfgmod.MachineConfig) -> CloneParts:
    if msg.get("execute") != "clone":
        raise RequestError(f"unknown command {msg.get('execute')!r} (clone or query-pool)")
    _only("request", msg, {"execute", "arguments", "id"})
    args = msg.get("arguments", {})
    if not isinstance(args, dict):
        raise RequestError("arguments: must be an object")
    _only("arguments", args, {"drives", "serial", "qmp", "name"})
    drives = _drives(args.get("drives", []), nfds, template)
    serial, serial_fds = _serial(args.get("serial"), nfds)
    qmp = _qmp(args.get("qmp"))
    name = args.get("name")
    if name is not None:
        name = _string("name", name)
    used = [i for d in drives.values() if d.file.startswith("fd:") for i in [int(d.file[3:])]]
    used += [i for i in set(serial_fds) if i is not None]
    if len(set(used)) != len(used):
        raise RequestError("one fd is given to two parts")
    return CloneParts(drives, serial, serial_fds, qmp, name)


def _drives(items, nfds: int, template) -> dict:
    if not isinstance(items, list):
        raise RequestError("drives: must be a list")
    by_id = {d.id: d for d in template.drives}
    out: dict = {}
    for i, item in enumerate(items):
        where = f"drives[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where}: must be an object")
        _only(where, item, {"id", "file", "fd"})
        drive_id = item.get("id")
        if drive_id not in by_id:
            have = ", ".join(sorted(by_id)) or "none"
            raise RequestError(f"{where}: the template has no drive {drive_id!r} (it has: {have})")
        if drive_id in out:
            raise RequestError(f"{where}: drive '{drive_id}' is given twice")
        if ("file" in item) == ("fd" in item):
            raise RequestError(f"{where}: give one of 'file' or 'fd'")
        file = (_string(f"{where}.file", item["file"]) if "file" in item
                else f"fd:{_fd_index(f'{where}.fd', item['fd'], nfds)}")
        out[drive_id] = by_id[drive_id].replace(file=file)
    missing = sorted(set(by_id) - set(out))
    if missing:
        raise RequestError(f"drives: the template's drive '{missing[0]}' is not given "
                           f"(each clone needs its own)")
    return out


def _serial(spec, nfds: int):
    if spec is None:
        return None, (None, None)
    if not isinstance(spec, dict):
        raise RequestError("serial: must be an object")
    if "fd" in spec or "in" in spec or "out" in spec:
        _only("serial", spec, {"fd", "in", "out"})
        if "fd" in spec:
            if len(spec) != 1:
                raise RequestError("serial: 'fd' excludes 'in' and 'out'")
            fd = _fd_index("serial.fd", spec["fd"], nfds)
            fds = (fd, fd)
        else:
            fds = (_fd_index("serial.in", spec.get("in"), nfds),
                   _fd_index("serial.out", spec.get("out"), nfds))
        # an fd pair is a stdio chardev on those fds
        return cfgmod.ChardevConfig(id=SERIAL_ID, backend="stdio"), fds
    _only("serial", spec, {"backend", "path", "server", "nowait"})
    backend = spec.get("backend")
    if backend not in ("file", "socket", "pty"):
        raise RequestError(f"serial.backend: {backend!r} is not file, socket or pty "
                           f"(stdio: send the fds)")
    path = spec.get("path")
    if backend != "pty":
        path = _string("serial.path", path)
    elif path is not None:
        raise RequestError("serial.path: a pty has no path")
    server, nowait = spec.get("server", False), spec.get("nowait", False)
    if type(server) is not bool or type(nowait) is not bool:
        raise RequestError("serial.server/nowait: must be true or false")
    return cfgmod.ChardevConfig(id=SERIAL_ID, backend=backend, path=path, server=server,
                                nowait=nowait), (None, None)


def _qmp(spec) -> tuple:
    if spec is None:
        return ()
    if not isinstance(spec, dict):
        raise RequestError("qmp: must be an object")
    kind = spec.get("kind")
    if kind == "unix":
        _only("qmp", spec, {"kind", "path"})
        return (cfgmod.QmpConfig(kind="unix", path=_string("qmp.path", spec.get("path"))),)
    if kind == "tcp":
        _only("qmp", spec, {"kind", "host", "port"})
        port = spec.get("port")
        if type(port) is not int or not 0 < port < 65536:
            raise RequestError("qmp.port: must be 1-65535")
        return (cfgmod.QmpConfig(kind="tcp", host=_string("qmp.host", spec.get("host")),
                                 port=port),)
    raise RequestError(f"qmp.kind: {kind!r} is not unix or tcp")
