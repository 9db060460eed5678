"""Migration (snapshot) status, as ``query-migrate`` reports it.

Spelling of the cancelled state: QEMU's QAPI ``MigrationStatus`` says
``"cancelled"``; StratoVirt 2.x (and SPEC §4, which copies it) says
``"canceled"``. stratopy is driven like StratoVirt, so it reports
``"canceled"`` (the contract's spelling); ``MigrationStatus.parse`` accepts
both.

Legal transitions (anything else raises ``MigrationError``)::

    none ------------> setup
    setup -----------> active | failed | cancelled
    active ----------> completed | failed | cancelled
    completed|failed|cancelled --> setup      (a new migration)

An incoming migration (``-incoming file:DIR``) walks none -> setup ->
active -> completed the same way (start, activate, complete).

``query()`` gives the ``query-migrate`` reply body; when failed it adds
QEMU's ``error-desc`` member.
"""

from __future__ import annotations

import enum
import threading

from stratopy.errors import MigrationError


class MigrationStatus(str, enum.Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "canceled"

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        return self in (MigrationStatus.COMPLETED, MigrationStatus.FAILED,
                        MigrationStatus.CANCELLED)

    @property
    def in_progress(self) -> bool:
        return self in (MigrationStatus.SETUP, MigrationStatus.ACTIVE)

    @classmethod
    def parse(cls, text: str) -> "MigrationStatus":
        if text == "cancelled":
            return cls.CANCELLED
        return cls(text)


_S = MigrationStatus
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    _S.NONE: frozenset({_S.SETUP}),
    _S.SETUP: frozenset({_S.ACTIVE, _S.FAILED, _S.CANCELLED}),
    _S.ACTIVE: frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED}),
    _S.COMPLETED: frozenset({_S.SETUP}),
    _S.FAILED: frozenset({_S.SETUP}),
    _S.CANCELLED: frozenset({_S.SETUP}),
}


class MigrationState:
    """Thread-safe current status plus the last failure's description."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status = MigrationStatus.NONE
        self._error_desc: str | None = None

    @property
    def status(self) -> MigrationStatus:
        with self._lock:
            return self._status

    @property
    def error_desc(self) -> str | None:
        """Why the last migration failed (None unless status is failed)."""
        with self._lock:
            return self._error_desc

    def transition(self, new: MigrationStatus, error_desc: str | None = None) -> MigrationStatus:
        """Move to ``new``; return the previous status. Raises MigrationError
        for an illegal transition (the status is then unchanged)."""
        new = MigrationStatus(new)
        with self._lock:
            old = self._status
            if new not in TRANSITIONS[old]:
                raise MigrationError(f"illegal migration status change {old.value} -> {new.value}")
            self._status = new
            self._error_desc = error_desc if new is MigrationStatus.FAILED else None
            return old

    def try_transition(self, old: MigrationStatus, new: MigrationStatus) -> bool:
        """Compare-and-set: move to ``new`` only if the status is ``old``."""
        with self._lock:
            if self._status is not old or new not in TRANSITIONS[old]:
                return False
            self._status = new
            self._error_desc = None
            return True

    # convenience ---------------------------------------------------------
    def start(self) -> None:
        """Begin a migration (none/completed/failed/cancelled -> setup).
        Raises MigrationError if one is already in progress."""
        with self._lock:
            if self._status.in_progress:
                raise MigrationError("a migration is already in progress")
            self._status = MigrationStatus.SETUP
            self._error_desc = None

    def activate(self) -> None:
        self.transition(MigrationStatus.ACTIVE)

    def complete(self) -> None:
        self.transition(MigrationStatus.COMPLETED)

    def fail(self, error_desc: str) -> None:
        self.transition(MigrationStatus.FAILED, error_desc)

    def cancel(self) -> bool:
        """Cancel an in-progress migration; False if there is none."""
        with self._lock:
            if not self._status.in_progress:
                return False
            self._status = MigrationStatus.CANCELLED
            self._error_desc = None
            return True

    def query(self) -> dict:
        """The ``query-migrate`` return value."""
        with self._lock:
            out: dict = {"status": self._status.value}
            if self._status is MigrationStatus.FAILED and self._error_desc:
                out["error-desc"] = self._error_desc
            return out
