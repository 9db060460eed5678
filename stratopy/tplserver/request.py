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
- ``netdevs``: ``[{"id": ID, "ifname": NAME} | {"id": ID, "fd": N} |
  {"id": ID, "fds": [N, M, ...]}, ...]``: a tap for each ``-netdev`` of the
  template's command line (each clone needs its own: two VMs on one tap
  would share its frames), as ``-netdev tap,id=ID,ifname=|fd=|fds=``;
- ``chardevs``: ``[{"id": ID, ...a serial's fields...}, ...]``: the chardev
  of a virtconsole of the template (its ``-chardev`` id); a console not
  given drops its output, as a serial not given does;
- ``name``: the clone's ``-name``.

``N`` indexes the fds sent with the request (SCM_RIGHTS, in order). A
request is refused with one RequestError line naming the field.
"""

from __future__ import annotations

from stratopy import config as cfgmod
from stratopy.cli_values import MAX_NET_QUEUE_PAIRS as MAX_QUEUES

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
    ``serial_fds`` (in, out) indexes, ``qmp`` a tuple of QmpConfig,
    ``netdevs`` {id: NetdevConfig} (``fd``/``extra_fds``: indexes of the
    fds sent), ``consoles`` {chardev id: (ChardevConfig, (in, out))}."""

    def __init__(self, drives, serial, serial_fds, qmp, name, netdevs=None, consoles=None):
        self.drives, self.serial, self.serial_fds = drives, serial, serial_fds
        self.qmp, self.name = qmp, name
        self.netdevs, self.consoles = netdevs or {}, consoles or {}


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
    _only("arguments", args, {"drives", "serial", "qmp", "name", "netdevs", "chardevs"})
    drives = _drives(args.get("drives", []), nfds, template)
    serial, serial_fds = _serial(args.get("serial"), nfds)
    qmp = _qmp(args.get("qmp"))
    netdevs = _netdevs(args.get("netdevs", []), nfds, template)
    consoles = _consoles(args.get("chardevs", []), nfds, template)
    name = args.get("name")
    if name is not None:
        name = _string("name", name)
    used = [i for d in drives.values() if d.file.startswith("fd:") for i in [int(d.file[3:])]]
    used += [i for i in set(serial_fds) if i is not None]
    for nd in netdevs.values():
        used += [] if nd.fd is None else [nd.fd, *nd.extra_fds]
    for _, fds in consoles.values():
        used += [i for i in set(fds) if i is not None]
    if len(set(used)) != len(used):
        raise RequestError("one fd is given to two parts")
    return CloneParts(drives, serial, serial_fds, qmp, name, netdevs, consoles)


def console_chardevs(template: cfgmod.MachineConfig) -> set:
    """The ids of the template's virtconsole chardevs (a request gives them)."""
    return {d.chardev.id for d in template.devices
            if d.driver in (cfgmod.SERIAL, cfgmod.CONSOLE) and d.chardev is not None}


def _each(field: str, items, known, what: str, keys: set | None = None):
    """(where, id, item) for each object of the list ``items``: its "id" one
    of ``known`` (the template's ``what``s), each given once; ``keys``: the
    fields it may have."""
    if not isinstance(items, list):
        raise RequestError(f"{field}: must be a list")
    seen: set = set()
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where}: must be an object")
        if keys is not None:
            _only(where, item, keys)
        item_id = item.get("id")
        if item_id not in known:
            have = ", ".join(sorted(known)) or "none"
            raise RequestError(f"{where}: the template has no {what} {item_id!r} (it has: {have})")
        if item_id in seen:
            raise RequestError(f"{where}: {what.split()[-1]} '{item_id}' is given twice")
        seen.add(item_id)
        yield where, item_id, item


def _all_given(field: str, out: dict, known, what: str, why: str) -> dict:
    missing = sorted(set(known) - set(out))
    if missing:
        raise RequestError(f"{field}: the template's {what} '{missing[0]}' is not given ({why})")
    return out


def _netdevs(items, nfds: int, template) -> dict:
    by_id = {nd.id: nd for nd in template.netdevs}
    out: dict = {}
    for where, nd_id, item in _each("netdevs", items, by_id, "netdev",
                                    {"id", "ifname", "fd", "fds"}):
        given = [k for k in ("ifname", "fd", "fds") if k in item]
        if len(given) != 1:
            raise RequestError(f"{where}: give one of 'ifname', 'fd' or 'fds'")
        if "ifname" in item:
            from stratopy.devices.virtio.tap import ifname_problem

            name = _string(f"{where}.ifname", item["ifname"])
            problem = ifname_problem(name)
            if problem:
                raise RequestError(f"{where}.ifname: not a valid interface name: it {problem}")
            out[nd_id] = by_id[nd_id].replace(ifname=name, fd=None, extra_fds=())
            continue
        if "fd" in item:
            idx = [_fd_index(f"{where}.fd", item["fd"], nfds)]
        else:
            fds = item["fds"]
            if not isinstance(fds, list) or not fds or len(fds) > MAX_QUEUES:
                raise RequestError(f"{where}.fds: must be a list of 1 to {MAX_QUEUES} fd indexes")
            idx = [_fd_index(f"{where}.fds[{j}]", x, nfds) for j, x in enumerate(fds)]
        out[nd_id] = by_id[nd_id].replace(ifname=None, fd=idx[0], extra_fds=tuple(idx[1:]))
    return _all_given("netdevs", out, by_id, "netdev", "each clone needs its own tap")


def _consoles(items, nfds: int, template) -> dict:
    out: dict = {}
    for where, ch_id, item in _each("chardevs", items, console_chardevs(template),
                                    "virtconsole chardev"):
        spec = {k: v for k, v in item.items() if k != "id"}
        cfg, fds = _serial(spec, nfds, where)
        out[ch_id] = (cfg.replace(id=ch_id), fds)
    return out


def _drives(items, nfds: int, template) -> dict:
    by_id = {d.id: d for d in template.drives}
    out: dict = {}
    for where, drive_id, item in _each("drives", items, by_id, "drive", {"id", "file", "fd"}):
        if ("file" in item) == ("fd" in item):
            raise RequestError(f"{where}: give one of 'file' or 'fd'")
        file = (_string(f"{where}.file", item["file"]) if "file" in item
                else f"fd:{_fd_index(f'{where}.fd', item['fd'], nfds)}")
        out[drive_id] = by_id[drive_id].replace(file=file)
    return _all_given("drives", out, by_id, "drive", "each clone needs its own")


def _serial(spec, nfds: int, where: str = "serial"):
    if spec is None:
        return None, (None, None)
    if not isinstance(spec, dict):
        raise RequestError(f"{where}: must be an object")
    if "fd" in spec or "in" in spec or "out" in spec:
        _only(where, spec, {"fd", "in", "out"})
        if "fd" in spec:
            if len(spec) != 1:
                raise RequestError(f"{where}: 'fd' excludes 'in' and 'out'")
            fd = _fd_index(f"{where}.fd", spec["fd"], nfds)
            fds = (fd, fd)
        else:
            fds = (_fd_index(f"{where}.in", spec.get("in"), nfds),
                   _fd_index(f"{where}.out", spec.get("out"), nfds))
        # an fd pair is a stdio chardev on those fds
        return cfgmod.ChardevConfig(id=SERIAL_ID, backend="stdio"), fds
    _only(where, spec, {"backend", "path", "server", "nowait"})
    backend = spec.get("backend")
    if backend not in ("file", "socket", "pty"):
        raise RequestError(f"{where}.backend: {backend!r} is not file, socket or pty "
                           f"(stdio: send the fds)")
    path = spec.get("path")
    if backend != "pty":
        path = _string(f"{where}.path", path)
    elif path is not None:
        raise RequestError(f"{where}.path: a pty has no path")
    server, nowait = spec.get("server", False), spec.get("nowait", False)
    if type(server) is not bool or type(nowait) is not bool:
        raise RequestError(f"{where}.server/nowait: must be true or false")
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
