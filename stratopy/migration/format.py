"""The self-checking template ``state`` file.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"STRATOPY"
    8       4     format version (u32), currently 5 (1: before the memory
                  file had a header page; 2: before the ACPI GED state;
                  3: before the typed machine state (machine/schema.py);
                  4: before q35 templates (PCI state, i8042, root
                  ports and PCI places in the facts); all refused, "take
                  the template again")
    12      4     header flags (u32), must be 0
    16      8     payload length (u64)
    24      32    SHA-256 over bytes [0, 24) of the header + the payload
    56      ...   payload: UTF-8 JSON {"meta": {...}, "components": {...}}

The checksum covers the header fields before it as well as the payload, so
no byte of the file can change unnoticed.

``meta`` (see ``host_meta``): ``arch`` (``uname -m``), ``cpu_vendor``
(/proc/cpuinfo vendor_id: GenuineIntel, AuthenticAMD, ...), ``kvm_api_version``,
``stratopy_version``, ``created`` (Unix time, float), plus whatever the caller
adds: ``machine`` (the command-line facts a restore must match) and
``memory`` (see memfile.py: size and identity of the paired memory file).

``components`` holds the encoded machine state (machine/schema.py
``MachineState``; ``codec.to_plain`` is applied by ``write_state``; decode
it with ``codec.from_plain``).

``read_state`` validates in this order, each failure a ``TemplateError``:
missing/unreadable file, not a regular file (a FIFO, device, directory or
symlink is refused without blocking: ``open_regular``), truncated header, wrong magic, format version newer
(or older) than supported, unknown header flags, payload length not matching
the file size (truncated or extended), payload larger than
``MAX_PAYLOAD``, checksum mismatch, invalid JSON / wrong top-level shape,
architecture differs, CPU vendor differs. Nothing else ever escapes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
import time
from typing import Any

from stratopy.errors import MigrationError, TemplateError
from stratopy.migration import codec

MAGIC = b"STRATOPY"
FORMAT_VERSION = 5
HEADER = struct.Struct("<8sIIQ32s")
HEADER_SIZE = HEADER.size            # 56
_CHECKED_PREFIX = 24                  # magic + version + flags + length
MAX_PAYLOAD = 256 << 20
STATE_NAME = "state"

_HOST = object()   # sentinel: "compare with this host"


def host_arch() -> str:
    """The machine architecture (``uname -m``: x86_64, aarch64, ...).

    ``os.uname()`` is what ``platform.machine()`` reads on Linux; the
    ``platform`` module itself is not needed on the warm-start path.
    """
    return os.uname().machine


def host_cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU vendor string (vendor_id of /proc/cpuinfo), or "unknown"."""
    try:
        with open(cpuinfo, "r", encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("vendor_id", "CPU implementer"):
                    return value.strip()
    except OSError:
        pass
    return "unknown"


def host_meta(cpu_vendor: str | None = None, kvm_api_version: int | None = None) -> dict:
    """The host facts a template records and a restore compares.

    ``cpu_vendor`` may be passed in (e.g. from CPUID leaf 0) instead of being
    read from /proc/cpuinfo.
    """
    from stratopy import __version__
    if kvm_api_version is None:
        from stratopy.kvm import uapi
        kvm_api_version = uapi.KVM_API_VERSION
    return {
        "arch": host_arch(),
        "cpu_vendor": cpu_vendor if cpu_vendor is not None else host_cpu_vendor(),
        "kvm_api_version": kvm_api_version,
        "stratopy_version": __version__,
        "created": time.time(),
    }


# --------------------------------------------------------------------------
# encoding

def encode_state(meta: dict, components: dict) -> bytes:
    """The complete state file contents. Raises MigrationError if the data
    cannot be represented."""
    if not isinstance(meta, dict) or not isinstance(components, dict):
        raise MigrationError("state: meta and components must be dicts")
    plain = {"meta": codec.to_plain(meta), "components": codec.to_plain(components)}
    try:
        payload = json.dumps(plain, ensure_ascii=False, allow_nan=False,
                             separators=(",", ":"), sort_keys=True).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as e:
        raise MigrationError(f"state: cannot encode: {e}") from None
    if len(payload) > MAX_PAYLOAD:
        raise MigrationError(f"state: {len(payload)} bytes, larger than the "
                             f"{MAX_PAYLOAD} byte limit")
    return _frame(payload)


def _frame(payload: bytes, version: int = FORMAT_VERSION, flags: int = 0) -> bytes:
    prefix = HEADER.pack(MAGIC, version, flags, len(payload), b"\0" * 32)[:_CHECKED_PREFIX]
    digest = hashlib.sha256(prefix + payload).digest()
    return prefix + digest + payload


def _fsync_dir(path_dir: str) -> None:
    fd = os.open(path_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_tmp(path_dir: str, prefix: str, data: bytes) -> str:
    """Write ``data`` to a fresh temporary file in ``path_dir``, fsync it and
    return its path. The file is removed again on any failure."""
    import secrets  # the write path only (not needed by a warm start)

    tmp = os.path.join(path_dir, f".{prefix}.tmp-{secrets.token_hex(8)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise MigrationError(f"cannot create {tmp}: {e.strerror}") from None
    try:
        try:
            view = memoryview(data)
            done = 0
            while done < len(data):
                n = os.write(fd, view[done:])
                if n <= 0:
                    raise OSError(28, "short write")
                done += n
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        _unlink_quiet(tmp)
        if isinstance(e, OSError):
            raise MigrationError(f"cannot write {tmp}: {e.strerror or e}") from None
        raise
    return tmp


def write_state_tmp(path_dir: str, meta: dict, components: dict) -> str:
    """Encode and write the state to a temp file in ``path_dir`` (fsynced);
    return its path. The caller renames it to ``state`` (see memfile)."""
    return write_file_tmp(path_dir, STATE_NAME, encode_state(meta, components))


def write_state(path_dir: str, meta: dict, components: dict) -> None:
    """Atomically (re)place ``path_dir/state``: temp file, fsync, rename,
    fsync the directory. A crash leaves the old file or the new one."""
    tmp = write_state_tmp(path_dir, meta, components)
    try:
        os.rename(tmp, os.path.join(path_dir, STATE_NAME))
        _fsync_dir(path_dir)
    except OSError as e:
        _unlink_quiet(tmp)
        raise MigrationError(f"cannot commit {path_dir}/{STATE_NAME}: {e.strerror}") from None


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# --------------------------------------------------------------------------
# decoding

def read_state(path: str, expect_arch: Any = _HOST,
               expect_vendor: Any = _HOST) -> tuple[dict, dict]:
    """Read and validate a state file; return ``(meta, components)``.

    ``path`` is the state file or the template directory. ``expect_arch`` and
    ``expect_vendor`` default to this host's values; pass a string to compare
    with something else, or None to skip that check.
    """
    if os.path.isdir(path) and os.path.exists(os.path.join(path, STATE_NAME)):
        path = os.path.join(path, STATE_NAME)
    fd = open_regular(path, "template state file")
    try:
        return read_state_fd(fd, path, expect_arch, expect_vendor)
    finally:
        os.close(fd)


def open_regular(path: str, what: str) -> int:
    """Open a template file read-only without ever blocking or following a
    symlink (O_NOFOLLOW | O_NONBLOCK: a FIFO or device there must not hang
    the monitor) and refuse anything but a regular file. Returns the fd:
    the caller reads and maps *this* file, never the path again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TemplateError(f"{path}: no {what} (file not found)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise TemplateError(f"{path}: {what} is a symbolic link (refused)") from None
        raise TemplateError(f"{path}: cannot open {what}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise TemplateError(f"{path}: cannot stat: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        from stratopy.files import kind   # only on this error path
        os.close(fd)
        raise TemplateError(f"{path}: {what} is {kind(st.st_mode)}, not a regular file")
    return fd


def read_state_fd(fd: int, path: str, expect_arch: Any = _HOST,
                  expect_vendor: Any = _HOST) -> tuple[dict, dict]:
    """``read_state`` on a file already opened with ``open_regular``."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise TemplateError(f"{path}: cannot stat: {e.strerror}") from None
    head = _read_exact(fd, 0, min(HEADER_SIZE, st.st_size), path)
    length = _check_header(head, st.st_size, path)
    payload = _read_exact(fd, HEADER_SIZE, length, path)
    if len(payload) != length:
        raise TemplateError(f"{path}: truncated while reading")
    return decode_payload(head, payload, path, expect_arch, expect_vendor)


def decode_state(blob: bytes, expect_arch: Any = _HOST, expect_vendor: Any = _HOST,
                 name: str = "state") -> tuple[dict, dict]:
    """``read_state`` for bytes already in memory (same checks, same order)."""
    blob = bytes(blob)
    _check_header(blob[:HEADER_SIZE], len(blob), name)
    return decode_payload(blob[:HEADER_SIZE], blob[HEADER_SIZE:], name,
                          expect_arch, expect_vendor)


def _check_header(head: bytes, file_size: int, name: str) -> int:
    """Validate the fixed header against the file size; return the payload length."""
    if len(head) < HEADER_SIZE:
        if len(head) >= len(MAGIC) and head[:len(MAGIC)] != MAGIC:
            raise TemplateError(f"{name}: not a stratopy template (bad magic)")
        if file_size == 0:
            raise TemplateError(f"{name}: truncated: empty file")
        raise TemplateError(f"{name}: truncated: {file_size} bytes, "
                            f"shorter than the {HEADER_SIZE} byte header")
    magic, version, flags, length, _ = HEADER.unpack(head)
    if magic != MAGIC:
        raise TemplateError(f"{name}: not a stratopy template (bad magic)")
    if version > FORMAT_VERSION:
        raise TemplateError(f"{name}: format version {version} is newer than this "
                            f"stratopy supports ({FORMAT_VERSION})")
    if version < 1:
        raise TemplateError(f"{name}: unsupported format version {version}")
    if version < FORMAT_VERSION:
        raise TemplateError(f"{name}: the template was written by an older stratopy "
                            f"(format version {version}); take the template again")
    if flags != 0:
        raise TemplateError(f"{name}: unknown header flags {flags:#x}")
    actual = file_size - HEADER_SIZE
    if actual != length:
        what = "truncated" if actual < length else "extended"
        raise TemplateError(f"{name}: {what}: header says {length} payload bytes, "
                            f"file has {actual}")
    if length > MAX_PAYLOAD:
        raise TemplateError(f"{name}: payload of {length} bytes exceeds the "
                            f"{MAX_PAYLOAD} byte limit")
    return length


def decode_payload(head: bytes, payload: bytes, name: str, expect_arch: Any,
                   expect_vendor: Any) -> tuple[dict, dict]:
    digest = head[_CHECKED_PREFIX:HEADER_SIZE]
    if hashlib.sha256(head[:_CHECKED_PREFIX] + payload).digest() != digest:
        raise TemplateError(f"{name}: corrupt: checksum mismatch")
    try:
        doc = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise TemplateError(f"{name}: invalid JSON payload (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise TemplateError(f"{name}: invalid JSON payload ({str(e)[:200]})") from None
    except MemoryError:
        raise TemplateError(f"{name}: payload too large to parse") from None
    if type(doc) is not dict or set(doc) != {"meta", "components"}:
        raise TemplateError(f"{name}: payload must be an object with exactly "
                            f"'meta' and 'components'")
    meta, components = doc["meta"], doc["components"]
    if type(meta) is not dict or type(components) is not dict:
        raise TemplateError(f"{name}: 'meta' and 'components' must be objects")
    for key in ("arch", "cpu_vendor"):
        if type(meta.get(key)) is not str:
            raise TemplateError(f"{name}: meta.{key} missing or not a string")
    host = None
    if expect_arch is _HOST or expect_vendor is _HOST:
        host = {"arch": host_arch(), "cpu_vendor": host_cpu_vendor()}
    if expect_arch is _HOST:
        expect_arch = host["arch"]
    if expect_vendor is _HOST:
        expect_vendor = host["cpu_vendor"]
    if expect_arch is not None and meta["arch"] != expect_arch:
        raise _mismatch("arch", meta["arch"], expect_arch,
                        f"{name}: taken on a {meta['arch']!r} host, this host is "
                        f"{expect_arch!r}")
    if expect_vendor is not None and meta["cpu_vendor"] != expect_vendor:
        raise _mismatch("cpu_vendor", meta["cpu_vendor"], expect_vendor,
                        f"{name}: taken on a {meta['cpu_vendor']!r} CPU, this host has "
                        f"{expect_vendor!r}")
    return meta, components


def _mismatch(attribute: str, template: object, host: object, msg: str) -> TemplateError:
    e = TemplateError(msg)
    e.attribute = attribute      # set after construction: the message says "host", not
    e.expected = template        # "command line", which TemplateError's own format uses
    e.found = host
    return e


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _read_exact(fd: int, offset: int, length: int, path: str) -> bytes:
    parts, done = [], 0
    try:
        while done < length:
            chunk = os.pread(fd, min(length - done, 16 << 20), offset + done)
            if not chunk:
                break
            parts.append(chunk)
            done += len(chunk)
    except OSError as e:
        raise TemplateError(f"{path}: cannot read: {e.strerror}") from None
    return b"".join(parts)
