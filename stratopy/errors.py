"""One exception root for everything stratopy reports to a user.

The CLI turns any StratoError into a single stderr line and ``exit_code``.
Subclasses carry their evidence as attributes so that tests (and QMP error
replies) can inspect what went wrong without parsing messages.
"""

from __future__ import annotations


class StratoError(Exception):
    """Root of every error stratopy raises on purpose."""

    exit_code = 1


class ConfigError(StratoError):
    """A bad command line: names the option and why it is refused."""

    exit_code = 2

    def __init__(self, option: str, reason: str):
        self.option = option
        self.reason = reason
        super().__init__(f"{option}: {reason}")


class KvmError(StratoError):
    """An ioctl or KVM set-up step failed."""

    def __init__(self, op: str, errno: int = 0, detail: str = ""):
        self.op = op
        self.errno = errno
        import os

        msg = f"KVM {op} failed"
        if errno:
            msg += f": {os.strerror(errno)} (errno {errno})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class GuestMemoryError(StratoError):
    """A guest-physical access outside guest RAM (untrusted guest input)."""

    def __init__(self, gpa: int, length: int):
        self.gpa = gpa
        self.length = length
        super().__init__(f"guest memory access out of range: gpa={gpa:#x} len={length}")


class GuestError(StratoError):
    """The guest stopped in a way the monitor cannot continue from."""

    def __init__(self, reason: str, vcpu: int | None = None, rip: int | None = None,
                 insn: bytes = b""):
        self.reason = reason
        self.vcpu = vcpu
        self.rip = rip
        self.insn = insn
        where = ""
        if vcpu is not None:
            where = f" on vCPU {vcpu}"
        if rip is not None:
            where += f" at RIP {rip:#x}"
        if insn:
            where += f" (bytes {insn.hex(' ')})"
        super().__init__(f"guest {reason}{where}")


class LifecycleError(StratoError):
    """A step the VM's lifecycle does not allow now (machine/base.py VmState):
    building a VM twice, starting one not built, snapshotting a running one."""


class DeviceError(StratoError):
    """A device was misused by the guest or misconfigured (queue broken, ...)."""


class TemplateError(StratoError):
    """A template (state/memory files) is corrupt, foreign, or does not match.

    ``attribute`` names what differs, ``expected``/``found`` give both values
    when the error is a mismatch.
    """

    def __init__(self, reason: str, attribute: str | None = None,
                 expected: object = None, found: object = None):
        self.reason = reason
        self.attribute = attribute
        self.expected = expected
        self.found = found
        msg = f"template: {reason}"
        if attribute is not None:
            msg = f"template: {attribute} differs: template has {expected!r}, command line has {found!r}"
            if reason:
                msg += f" ({reason})"
        super().__init__(msg)


class MigrationError(StratoError):
    """Taking a snapshot failed; the VM is left as it was."""


class QmpError(StratoError):
    """An error reply for a QMP command: ``klass`` is the QMP error class."""

    def __init__(self, desc: str, klass: str = "GenericError"):
        self.desc = desc
        self.klass = klass
        super().__init__(desc)
