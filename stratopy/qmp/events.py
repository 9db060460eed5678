"""QMP event names and the ``data`` members stratopy emits.

Emit with ``QmpServer.emit_event(name, data)``; these helpers only build the
``data`` dicts in StratoVirt's shape (machine_manager/src/qmp/qmp_schema.rs).
"""

from __future__ import annotations

SHUTDOWN = "SHUTDOWN"
RESET = "RESET"
STOP = "STOP"
RESUME = "RESUME"
POWERDOWN = "POWERDOWN"
DEVICE_DELETED = "DEVICE_DELETED"
BALLOON_CHANGED = "BALLOON_CHANGED"      # {"actual": guest RAM in bytes}

#: What query-events lists (StratoVirt's order, limited to what microvm emits).
EVENTS = (SHUTDOWN, RESET, STOP, RESUME, POWERDOWN, DEVICE_DELETED, BALLOON_CHANGED)

# SHUTDOWN reasons (QEMU's ShutdownCause spelling)
HOST_QMP_QUIT = "host-qmp-quit"
HOST_QMP_SYSTEM_RESET = "host-qmp-system-reset"
HOST_SIGNAL = "host-signal"
GUEST_SHUTDOWN = "guest-shutdown"
GUEST_RESET = "guest-reset"
GUEST_PANIC = "guest-panic"
INTERNAL_ERROR = "internal-error"


def shutdown_data(guest: bool, reason: str) -> dict:
    """``{"guest": bool, "reason": str}``, e.g. ``(False, "host-qmp-quit")``."""
    return {"guest": guest, "reason": reason}


def device_deleted_data(device: str, path: str | None = None) -> dict:
    """``{"device": ID, "path": ID}`` (microvm has no QOM path; StratoVirt uses the id)."""
    return {"device": device, "path": device if path is None else path}


def reset_data(guest: bool) -> dict:
    return {"guest": guest}
