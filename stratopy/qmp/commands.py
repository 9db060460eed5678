"""The QMP command table: argument schemas, handlers, and the VM interface.

A command is a :class:`Command`: a name, a schema of :class:`Param` (name,
type, required or not), and a handler ``handler(vm, **args)``.  Arguments
are checked here, on the QMP thread, before anything touches the VM:
unknown, missing or wrong-typed arguments are GenericError replies that name
the argument.  Hyphenated QMP names become Python keywords (``node-name`` ->
``node_name``, ``read-only`` -> ``read_only``) before the handler is called.

Commands that do not depend on the VM (``qmp_capabilities``, ``query-version``,
``query-commands``, ``query-target``, ``query-kvm``, ``query-machines``,
``query-events``) are answered from static tables without dispatching.  All
others run as ``dispatch(fn)`` where ``fn`` calls the :class:`VmControl`
method on the machine thread.

Reply shapes are StratoVirt's (openeuler-mirror/stratovirt,
machine_manager/src/qmp/qmp_schema.rs and machine/src/micro_common/mod.rs);
:func:`cpu_info` and :func:`hotpluggable_cpu` build the per-vCPU entries in
exactly that shape so that the machine does not have to know it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

from stratopy.errors import QmpError, StratoError
from stratopy.logs import get_logger

from . import events as qmp_events
from .fdstore import MAX_NAMED_FDS, FdStore, close_quietly, fdname_problem
from .protocol import Request, error_reply, reply, version_info
from .schema import (P, Param, blockdev_file_problem, check_object, ifname_problem,
                     migrate_uri_problem, path_problem, pyname)

log = get_logger("stratopy.qmp")

__all__ = [
    "VmControl", "Param", "Command", "COMMANDS", "execute", "check_arguments",
    "cpu_info", "hotpluggable_cpu", "cpu_props", "query_commands_reply",
    "MACHINES", "TARGET", "KVM_INFO", "FdStore", "MAX_NAMED_FDS",
]


# --------------------------------------------------------------------------
# the VM interface


@runtime_checkable
class VmControl(Protocol):
    """What the machine implements for QMP.  Every method is called on the
    machine thread (through ``dispatch``), never on the QMP thread.

    Errors: raise :class:`stratopy.errors.QmpError` ``(desc, klass)``; any
    other :class:`StratoError` becomes a GenericError with ``str(e)``, any other
    exception a GenericError "internal error: ..." (logged with traceback).
    A method returning None replies ``{"return": {}}``.

    Events: the machine emits them with ``QmpServer.emit_event(name, data)``.
    Events emitted *while* a method runs (STOP inside ``stop()``, RESUME
    inside ``cont()``, STOP inside ``migrate()`` when it pauses a running VM,
    DEVICE_DELETED inside ``device_del()``) reach the clients before the
    command's reply, as in StratoVirt's transcript.
    """

    def query_status(self) -> dict:
        """``{"running": bool, "singlestep": False, "status": "running"|"paused"|...}``.

        ``status`` is a QEMU RunState: running, paused, inmigrate, postmigrate,
        finish-migrate, shutdown, internal-error, prelaunch, ...
        """

    def stop(self) -> None:
        """Pause all vCPUs and emit STOP.  On a VM that is not running raise
        ``QmpError("VM is already paused")`` (GenericError) and emit nothing."""

    def cont(self) -> None:
        """Resume all vCPUs and emit RESUME.  On a running VM raise
        ``QmpError("VM is already running")`` and emit nothing."""

    def quit(self) -> None:
        """Schedule the process exit and return at once.  Do not emit SHUTDOWN
        inside quit(): the reply ``{"return":{}}`` is queued when quit()
        returns; then the machine emits SHUTDOWN
        ``{"guest":false,"reason":"host-qmp-quit"}``, calls
        ``QmpServer.flush(timeout)`` and ``close()``, and exits 0."""

    def system_reset(self) -> None:
        """microvm: ends the VM like StratoVirt does (SHUTDOWN, then exit)."""

    def system_powerdown(self) -> None:
        """microvm: presses the ACPI power button when the guest's GED driver
        listens (the guest shuts down, then powers off: SHUTDOWN
        guest-shutdown, exit 0); otherwise ends the VM like StratoVirt does
        (SHUTDOWN, then exit)."""

    def query_vm_generation_id(self) -> dict:
        """``{"guid": "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"}``: the VMGenID
        the guest sees (QEMU's command); new on every warm start."""

    def query_cpus(self) -> list:
        """One :func:`cpu_info` dict per present vCPU."""

    def query_hotpluggable_cpus(self) -> list:
        """One :func:`hotpluggable_cpu` dict per possible vCPU (``maxcpus``)."""

    def migrate(self, uri: str) -> None:
        """Take a template (``file:DIR``, SPEC §4).  Raise QmpError on failure."""

    def query_migrate(self) -> dict:
        """``{"status": "none"|"setup"|"active"|"completed"|"failed"|"canceled"}``."""

    def migrate_cancel(self) -> None:
        """Cancel an ongoing migration (a no-op when none is running)."""

    def balloon(self, value: int) -> None:
        """Set the balloon so that the guest keeps ``value`` bytes of RAM;
        without an activated balloon device raise
        ``QmpError("No balloon device has been activated", "DeviceNotActive")``."""

    def query_balloon(self) -> dict:
        """``{"actual": guest RAM in bytes, minus the balloon}`` (same error)."""

    def blockdev_add(self, **args: Any) -> None:
        """``node_name`` (str), ``file`` ({"driver":"file","filename":str,...}),
        optional ``cache`` ({"direct":bool,"no-flush":bool}), ``read_only``,
        ``driver``, ``media``, ``detect_zeroes``, ``discard``, ``id``, ..."""

    def netdev_add(self, **args: Any) -> None:
        """``id`` (str), optional ``type``, ``ifname``, ``fd``/``fds`` (a
        descriptor number; a name given to ``getfd`` on the same connection
        arrives here as ``fd=<int>``, owned by the VM once netdev_add returns
        normally and closed by the command layer if it raises), ``vhost``
        (bool), ``queues``, ..."""

    def device_add(self, **args: Any) -> None:
        """``id``, ``driver`` and device options (``drive``, ``netdev``,
        ``mac``, ``serial``, ``addr``, ``bus``, ``iothread``, ...: the
        options of StratoVirt's schema, hyphens turned into underscores;
        any other option is refused before this is called)."""

    def blockdev_del(self, node_name: str) -> None:
        """Drop block node ``node_name`` (not in use by a device)."""

    def device_del(self, id: str) -> None:  # noqa: A002
        """Remove device ``id``; unknown id -> ``QmpError(..., "DeviceNotFound")``.
        Emit DEVICE_DELETED ``{"device": id, "path": id}`` when it is gone."""



@dataclass
class Command:
    """One QMP command.

    ``handler(vm, **args)`` runs on the machine thread (via dispatch) unless
    ``static``; then ``handler(None, **args)`` is answered on the QMP thread.
    Arguments not in ``params`` are refused.
    """

    name: str
    handler: Callable[..., Any]
    params: tuple = ()
    static: bool = False
    takes_fd: bool = False
    doc: str = ""

    def check(self, args: Mapping) -> dict:
        """Validate QMP arguments; return the Python keyword arguments."""
        check_object(args, self.params)
        return {pyname(k): v for k, v in args.items()}


def check_arguments(name: str, args: Mapping) -> dict:
    """Validate ``args`` for command ``name`` (QmpError when wrong)."""
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise QmpError(f"The command {name} has not been found", "CommandNotFound")
    return cmd.check(args)


# --------------------------------------------------------------------------
# static replies

TARGET = {"arch": "x86_64"}
KVM_INFO = {"enabled": True, "present": True}
#: StratoVirt's MachineInfo field order; cpu-max is stratopy's real limit.
MACHINES = [
    {"hotpluggable-cpus": False, "name": "microvm", "numa-mem-supported": False,
     "cpu-max": 254, "deprecated": False},
]


def cpu_props(socket_id: int = 0, die_id: int = 0, core_id: int = 0,
              thread_id: int = 0) -> dict:
    """StratoVirt's x86 CpuInstanceProperties, in its serialization order.

    Note ``die_id`` is spelled with an underscore by StratoVirt (QEMU says
    ``die-id``); we keep StratoVirt's spelling.
    """
    return {"socket-id": socket_id, "die_id": die_id, "thread-id": thread_id,
            "core-id": core_id}


def cpu_info(index: int, thread_id: int, *, props: Optional[dict] = None,
             halted: bool = False, current: bool = True) -> dict:
    """One query-cpus entry, StratoVirt shape::

        {"arch":"x86","current":true,"qom_path":"/machine/unattached/device[0]",
         "halted":false,"props":{...},"CPU":0,"thread_id":1234}
    """
    return {
        "arch": "x86",
        "current": current,
        "qom_path": f"/machine/unattached/device[{index}]",
        "halted": halted,
        "props": cpu_props() if props is None else props,
        "CPU": index,
        "thread_id": thread_id,
    }


def hotpluggable_cpu(index: int, *, present: bool = True,
                     props: Optional[dict] = None) -> dict:
    """One query-hotpluggable-cpus entry, StratoVirt shape::

        {"type":"host-x86-cpu","vcpus-count":1,"props":{...},
         "qom-path":"/machine/unattached/device[0]"}   # qom-path only if present
    """
    entry = {"type": "host-x86-cpu", "vcpus-count": 1,
             "props": cpu_props() if props is None else props}
    if present:
        entry["qom-path"] = f"/machine/unattached/device[{index}]"
    return entry


# --------------------------------------------------------------------------
# handlers


def _qmp_capabilities(vm: Any, enable: Optional[list] = None) -> dict:
    for cap in enable or []:
        raise QmpError(f"Capability '{cap}' not available")
    return {}


def _query_version(vm: Any) -> dict:
    return version_info()


def _query_commands(vm: Any) -> list:
    return query_commands_reply()


def _query_target(vm: Any) -> dict:
    return dict(TARGET)


def _query_kvm(vm: Any) -> dict:
    return dict(KVM_INFO)


def _query_machines(vm: Any) -> list:
    return [dict(m) for m in MACHINES]


def _query_events(vm: Any) -> list:
    return [{"name": n} for n in qmp_events.EVENTS]


def _vm(method: str, *pos: str):
    """A handler forwarding to ``vm.<method>``; ``pos`` args go positionally."""

    def handler(vm: Any, /, **kw: Any) -> Any:   # positional: an argument may be named "vm"
        if vm is None:
            raise QmpError("The VM is not ready")
        args = [kw.pop(p) for p in pos]
        return getattr(vm, method)(*args, **kw)

    handler.__name__ = f"qmp_{method}"
    return handler


def _migrate(vm: Any, uri: str, blk: bool = False, inc: bool = False,
             detach: bool = False) -> Any:
    # blk/inc (deprecated in QEMU) and detach are accepted for compatibility;
    # templates never copy disks and the command always completes before replying.
    if blk or inc:
        raise QmpError("Block migration (blk/inc) is not supported")
    if vm is None:
        raise QmpError("The VM is not ready")
    return vm.migrate(uri)


def _blockdev_add(vm: Any, **args: Any) -> Any:
    if vm is None:
        raise QmpError("The VM is not ready")
    f = args.get("file")
    if isinstance(f, str):
        # QEMU allows a node reference here; stratopy has no node graph, so a
        # string is taken as the file name of a raw file.
        args["file"] = {"driver": "file", "filename": f}
    return vm.blockdev_add(**args)


def _getfd(vm: Any, fdname: str, fd: Optional[int] = None,
           store: Optional[FdStore] = None) -> Any:
    if fd is None:
        raise QmpError("No file descriptor supplied via SCM_RIGHTS")
    if store is None:
        close_quietly(fd)
        raise QmpError("getfd: not available on this connection")
    store.put(fdname, fd)
    return {}


def _netdev_fd_name(args: dict) -> Optional[str]:
    """The getfd name netdev_add refers to, read as the machine reads it
    (``fds`` before ``fd``; of ``fds=a:b`` the last, as StratoVirt)."""
    ref = args.get("fds") if args.get("fds") is not None else args.get("fd")
    if not isinstance(ref, str):
        return None
    return ref.rsplit(":", 1)[-1]


_FILE_FIELDS = (P("driver", required=True), P("filename", required=True, valid=path_problem),
                P("aio"),
                P("locking"))
_CACHE_FIELDS = (P("direct", "bool"), P("no-flush", "bool"))

_DEVICE_PARAMS = (
    P("id", required=True), P("driver", required=True),
    P("addr"), P("bus"), P("drive"), P("netdev"), P("mac"), P("serial"),
    P("iothread"), P("chardev"), P("romfile"), P("share-rw", "str", "bool"),
    P("disable-modern", "str", "bool"), P("mq", "str", "bool"), P("vectors", "str", "int"),
    P("multifunction", "bool", "str"), P("host"), P("num-queues", "int", "str"),
    P("queue-size", "int", "str"), P("bootindex", "int", "str"),
    P("boot_index", "int", "str"), P("sysfsdev"), P("port", "str", "int"),
    P("backend"), P("path"), P("lun", "int", "str"), P("rng"),
)

_NETDEV_PARAMS = (
    P("id", required=True), P("type"), P("ifname", valid=ifname_problem),
    P("fd", "str", "int"), P("fds"),
    P("vhost", "bool"), P("vhostfd", "str", "int"), P("vhostfds"), P("queues", "int"),
    P("script"), P("downscript"), P("dnssearch"), P("chardev"), P("macnat", "bool"),
)

_BLOCKDEV_PARAMS = (
    P("node-name", required=True),
    P("file", "object", "str", required=True, fields=_FILE_FIELDS, valid=blockdev_file_problem),
    P("cache", "object", fields=_CACHE_FIELDS), P("read-only", "bool"), P("driver"),
    P("media"), P("detect-zeroes"), P("discard"), P("backing"), P("id"), P("options"),
    P("throttling.iops-total", "int"), P("l2-cache-size"), P("refcount-cache-size"),
    P("aio"),
)


def _table() -> dict:
    cmds = [
        Command("qmp_capabilities", _qmp_capabilities, (P("enable", "list"),), static=True,
                doc="Negotiate capabilities (none are offered); accepted at any time."),
        Command("quit", _vm("quit"), doc="Exit the monitor."),
        Command("stop", _vm("stop"), doc="Pause all vCPUs."),
        Command("cont", _vm("cont"), doc="Resume all vCPUs."),
        Command("system_powerdown", _vm("system_powerdown")),
        Command("system_reset", _vm("system_reset")),
        Command("device_add", _vm("device_add"), _DEVICE_PARAMS),
        Command("device_del", _vm("device_del", "id"), (P("id", required=True),)),
        Command("netdev_add", _vm("netdev_add"), _NETDEV_PARAMS),
        Command("query-hotpluggable-cpus", _vm("query_hotpluggable_cpus")),
        Command("query-cpus", _vm("query_cpus")),
        Command("query-status", _vm("query_status")),
        Command("query-vm-generation-id", _vm("query_vm_generation_id"),
                doc="The VM generation ID (VMGenID) the guest sees."),
        Command("getfd", _getfd, (P("fdname", required=True, valid=fdname_problem),),
                static=True, takes_fd=True),
        Command("blockdev-add", _blockdev_add, _BLOCKDEV_PARAMS),
        Command("blockdev-del", _vm("blockdev_del", "node_name"), (P("node-name", required=True),)),
        Command("balloon", _vm("balloon", "value"), (P("value", "int", required=True),)),
        Command("query-balloon", _vm("query_balloon")),
        Command("migrate", _migrate, (P("uri", required=True, valid=migrate_uri_problem),
                                      P("blk", "bool"),
                                      P("inc", "bool"), P("detach", "bool"))),
        Command("query-migrate", _vm("query_migrate")),
        Command("migrate_cancel", _vm("migrate_cancel")),
        Command("query-version", _query_version, static=True),
        Command("query-commands", _query_commands, static=True),
        Command("query-target", _query_target, static=True),
        Command("query-kvm", _query_kvm, static=True),
        Command("query-machines", _query_machines, static=True),
        Command("query-events", _query_events, static=True),
    ]
    return {c.name: c for c in cmds}


#: name -> Command, in StratoVirt's declaration order (query-commands order).
COMMANDS: dict[str, Command] = _table()


def query_commands_reply() -> list:
    return [{"name": n} for n in COMMANDS]


# --------------------------------------------------------------------------
# execution


def _error_of(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, QmpError):
        return exc.desc, exc.klass
    if isinstance(exc, StratoError):
        return str(exc), "GenericError"
    log.exception("QMP command failed with an unexpected error")
    return f"internal error: {type(exc).__name__}: {exc}", "GenericError"


def _call(cmd: Command, vm: Any, kwargs: dict, rid: Any) -> dict:
    try:
        result = cmd.handler(vm, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure is a reply
        desc, klass = _error_of(exc)
        return error_reply(desc, klass, rid)
    return reply(result, rid)


def execute(req: Request, vm: Any, dispatch: Optional[Callable] = None,
            fd: Optional[int] = None,
            deliver: Optional[Callable[[dict], None]] = None,
            fds: Optional[FdStore] = None) -> dict:
    """Run one request; return its reply dict (with the request's id).

    * Unknown command: CommandNotFound "The command X has not been found".
    * Arguments checked here (QMP thread); errors reply GenericError.
    * Static commands run here; the others run as ``dispatch(fn)`` where
      ``fn()`` calls the handler on the machine thread (``dispatch`` None:
      call inline).
    * ``deliver(reply)``, when given, is called exactly once with the reply.
      For dispatched commands it is called *inside* ``fn`` (on the machine
      thread, right after the handler), so every event the machine emits
      after the command finished is ordered after its reply.
    * ``fd``: the descriptor received by SCM_RIGHTS for ``getfd`` (the
      handler owns it; it is closed here if the command is refused first).
    * ``fds``: the connection's :class:`FdStore`; ``getfd`` keeps descriptors
      there and ``netdev_add fd=NAME`` takes its descriptor from there.
    """
    delivered = False

    def _done(rep: dict) -> dict:
        nonlocal delivered
        if deliver is not None and not delivered:
            delivered = True
            deliver(rep)
        return rep

    rid = req.id
    cmd = COMMANDS.get(req.name)
    try:
        if cmd is None:
            raise QmpError(f"The command {req.name} has not been found", "CommandNotFound")
        kwargs = cmd.check(req.arguments)
    except QmpError as exc:
        if fd is not None:
            close_quietly(fd)
        return _done(error_reply(exc.desc, exc.klass, rid))

    if cmd.takes_fd:
        kwargs["fd"], kwargs["store"] = fd, fds
    elif fd is not None:
        close_quietly(fd)

    if cmd.static:
        return _done(_call(cmd, None, kwargs, rid))

    # netdev_add fd=NAME: the descriptor leaves the connection's store now,
    # whatever happens next (as in QEMU); the VM gets it as a number and owns
    # it once netdev_add succeeds; on any failure it is closed below.
    handed = None
    fdname = _netdev_fd_name(kwargs) if cmd.name == "netdev_add" and fds is not None else None
    if fdname is not None:
        handed = fds.take(fdname)
        if handed is not None:
            kwargs.pop("fds", None)
            kwargs["fd"] = handed

    box: list = []

    def fn() -> None:
        rep = _call(cmd, vm, kwargs, rid)
        if handed is not None and "error" in rep:
            close_quietly(handed)
        box.append(rep)
        _done(rep)

    try:
        if dispatch is None:
            fn()
        else:
            dispatch(fn)
    except Exception as exc:  # noqa: BLE001 - the dispatcher itself failed
        if box:
            return box[0]
        if handed is not None:
            close_quietly(handed)
        desc, klass = _error_of(exc)
        return _done(error_reply(desc, klass, rid))
    if not box:
        if handed is not None:
            close_quietly(handed)
        # dispatch returned without running fn (machine shutting down)
        return _done(error_reply("The command was not executed: the VM is shutting down",
                                 "GenericError", rid))
    return box[0]
