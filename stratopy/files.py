"""Opening the files a user names: never block, never read without bound,
keep what the monitor creates private.

Every open here adds ``O_NONBLOCK | O_NOCTTY | O_CLOEXEC``: a FIFO cannot
block ``open()`` (and a FIFO with no reader opened for writing fails at once
with ENXIO instead of waiting), a terminal never becomes the monitor's
controlling terminal, and no fd leaks into a child. The kind of file is then
checked on the fd (``fstat``) and that fd is what the caller reads or writes:
the path is never opened a second time, so what was checked is what is used.

- :func:`open_regular`: ``-kernel``, ``-initrd`` (read where they land in
  guest RAM, so never more than guest RAM is read; ``/dev/zero`` is refused
  for not being a regular file).
- :func:`open_entropy_source`: ``-object rng-random,filename=``: a
  character device or a regular file; the fd stays non-blocking so an empty
  source returns nothing to the guest instead of stalling the device thread.
- :func:`create_private`: ``-D LOGFILE``, ``-serial file``/``-chardev
  file`` output: appended to an existing regular file, or created 0600
  whatever the umask (guest console output and the kernel command line are
  nobody else's business). ``/dev/null`` is accepted as the one device.
- :func:`free_socket_path`: where a unix listener is about to bind (the
  vsock ``uds-path``, the template server's ``-listen``): a stale socket is
  removed; a live listener or a file of another kind is never replaced.
- :func:`sharing_conflict`: two users of one file (same device and inode,
  whatever the path, hard link or symlink) where one may write: only
  read-only users may share. Used for ``-drive`` (:func:`check_drives`) and
  meant for QMP ``blockdev-add`` as well.

Errors are :class:`~stratopy.errors.ConfigError` naming the option.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from stratopy.errors import ConfigError

OPEN_FLAGS = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
PRIVATE_MODE = 0o600
_DEV_NULL = (1, 3)        # major, minor of /dev/null (Documentation/admin-guide/devices.txt)

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


def kind(mode: int) -> str:
    """'a FIFO', 'a directory', ... for an ``st_mode``."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "an unknown kind of file"


def _open(path: str, flags: int, option: str, what: str = "") -> int:
    """``what`` names the file in errors ("cannot open log file PATH")."""
    try:
        return os.open(path, flags | OPEN_FLAGS, PRIVATE_MODE)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EISDIR, errno.ENODEV, errno.EOPNOTSUPP):
            # A FIFO without a reader, a socket, a directory or a device
            # opened for writing: say what it is.
            try:
                what = kind(os.stat(path).st_mode)
            except OSError:
                what = None
            if what is not None and what != "a regular file":
                raise ConfigError(option, f"{path} is {what}, not a regular file") from None
        named = f"{what} {path}" if what else path
        raise ConfigError(option, f"cannot open {named}: {e.strerror or e}") from None


def _fstat(fd: int, path: str, option: str) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise ConfigError(option, f"cannot stat {path}: {e.strerror or e}") from None


def open_regular(path: str, option: str) -> tuple[int, os.stat_result]:
    """Open a regular file for reading: (fd, its stat). The caller closes fd."""
    fd = _open(path, os.O_RDONLY, option)
    st = _fstat(fd, path, option)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(option, f"{path} is {kind(st.st_mode)}, not a regular file")
    return fd, st


def read_into(fd: int, view: memoryview, offset: int, path: str, option: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a short file is an error
    (the file shrank since its size was checked, or a header lies)."""
    done, total = 0, len(view)
    while done < total:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except InterruptedError:
            continue
        except OSError as e:
            raise ConfigError(option, f"cannot read {path}: {e.strerror or e}") from None
        if n == 0:
            raise ConfigError(option, f"{path} ends at byte {offset + done}, "
                                      f"expected {offset + total} (changed while read?)")
        done += n


def read_at(fd: int, offset: int, length: int, path: str, option: str) -> bytes:
    """``length`` bytes at ``offset`` (the caller bounds ``length``)."""
    buf = bytearray(length)
    with memoryview(buf) as view:
        read_into(fd, view, offset, path, option)
    return bytes(buf)


def open_entropy_source(path: str, option: str) -> int:
    """An fd for ``rng-random,filename=``: a character device (/dev/urandom,
    /dev/random, /dev/hwrng) or a regular file. A FIFO is refused (it would
    stall the guest's reads while its writer is idle), as is a directory.
    The fd stays non-blocking: an empty source gives the guest 0 bytes."""
    fd = _open(path, os.O_RDONLY, option)
    st = _fstat(fd, path, option)
    if not (stat.S_ISCHR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        os.close(fd)
        raise ConfigError(option, f"{path} is {kind(st.st_mode)}, not a character "
                                  f"device or a regular file")
    return fd


def _is_dev_null(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == _DEV_NULL


def create_private(path: str, option: str, what: str = "") -> int:
    """A blocking, append-only fd on a regular file, created 0600 if missing
    (an existing file keeps its mode and content). A FIFO, directory, socket
    or device is refused, except /dev/null. The caller closes fd."""
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, option, what)
    st = _fstat(fd, path, option)
    if not (stat.S_ISREG(st.st_mode) or _is_dev_null(st)):
        os.close(fd)
        raise ConfigError(option, f"{path} is {kind(st.st_mode)}, not a regular file")
    os.set_blocking(fd, True)        # writes to a regular file never wait anyway
    return fd


# ---------------------------------------------------------------------------
# files shared between users (drives)

def free_socket_path(path: str) -> None:
    """Make ``path`` free for a new unix listener: nothing there, or a stale
    socket (nobody accepts on it), which is removed. A live listener there
    (another VM's or server's) or a file of another kind is an OSError that
    says so: a listener never takes over what is not its own."""
    import socket

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        # bind() would say only "Address already in use"
        raise OSError(errno.EEXIST, f"it is {kind(mode)}, not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                          | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)               # stale: its listener is gone
        return
    except BlockingIOError:
        pass                              # alive, its backlog is full
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a listener is already there")


def identity(st: os.stat_result) -> tuple[int, int]:
    """What makes two paths the same file: (device, inode)."""
    return st.st_dev, st.st_ino


def remove_if_same(path: str, ident: tuple[int, int] | None, *,
                   follow_symlinks: bool = True) -> None:
    """Remove ``path`` if it is still the file ``ident`` (:func:`identity`)
    names: another process may have put its own file there since (a socket
    or pidfile of ours is only ever removed by us). Errors are ignored: this
    is clean-up at exit."""
    try:
        if identity(os.stat(path, follow_symlinks=follow_symlinks)) == ident:
            os.unlink(path)
    except OSError:
        pass


def sharing_conflict(ident: tuple[int, int], readonly: bool,
                     users: list[tuple[str, tuple[int, int], bool]]) -> str | None:
    """The name of the first user in ``users`` (name, identity, readonly) that
    cannot share the file ``ident`` with a new user (``readonly``): only
    read-only users may share a file, as QEMU's image locking enforces."""
    for name, other, other_ro in users:
        if other == ident and not (readonly and other_ro):
            return name
    return None


def check_drives(drives) -> None:
    """Refuse a ``-drive`` that is not a regular file or block device (a FIFO
    would block the open), and two ``-drive``s on one file unless both are
    read-only.

    A drive whose file cannot be stat'ed is skipped here: opening it later
    reports why, with the drive's option."""
    users: list[tuple[str, tuple[int, int], bool]] = []
    for d in drives:
        try:
            st = os.stat(d.file)
        except OSError:
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ConfigError("-drive", f"drive '{d.id}': {d.file} is {kind(st.st_mode)}, "
                                        f"not a regular file or block device")
        other = sharing_conflict(identity(st), d.readonly, users)
        if other is not None:
            raise ConfigError("-drive", f"drive '{d.id}': {d.file} is the file of drive "
                                        f"'{other}' too (only read-only drives may share a file)")
        users.append((d.id, identity(st), d.readonly))
