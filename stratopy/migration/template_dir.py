"""A template directory: private creation, locking, the crash-safe commit,
and opening a template for restore.

What the user sees is ``DIR/state`` + ``DIR/memory`` (SPEC §4). Each carries
the template id (memfile.py), so a state is only ever used with *its* memory.

Writing (``save_template``), under an exclusive ``flock`` on DIR (one writer
at a time; readers hold it shared for milliseconds):

  0. leftovers of a crashed writer are dealt with (``remove_leftovers``);
  1. memory -> ``DIR/.memory-<new id>``, fsync            [step memory-written]
  2. state (records the new id) -> ``DIR/.state.tmp-*``, fsync [state-written]
  3. rename the state temp -> ``DIR/state``: THE COMMIT POINT  [committed]
  4. fsync DIR; rename ``.memory-<new id>`` -> ``DIR/memory``  [memory-renamed]
  5. fsync DIR.

Before step 3 the old pair is untouched (``state`` still names the old id,
``memory`` still is the old memory), so a failure or a crash before the
commit leaves the old template usable. After step 3 the new state names the
new id; until step 4 its memory is found under ``.memory-<id>`` (restore
looks there when ``memory`` has another id), so the new template is usable
from the commit on. The next writer removes whatever a crash left (RAM-sized
``.memory-*`` files of a template that never committed, ``.state.tmp-*``)
and finishes an interrupted step 4. A VM still running from an older
template keeps its mapping: renames never modify the inode it maps.

``STRATOPY_TEMPLATE_CRASH_AT=<step>`` makes a writer SIGKILL itself at that
step (the crash tests use it; unset, the hook is a no-op).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Callable, Iterator

from stratopy.errors import MigrationError, TemplateError
from stratopy.logs import get_logger
from stratopy.memory import GuestMemory
from stratopy.migration import format as state_format
from stratopy.migration import memfile
from stratopy.record import Record

log = get_logger(__name__)

STATE_NAME = state_format.STATE_NAME
MEMORY_NAME = memfile.MEMORY_NAME
STEPS = ("memory-written", "state-written", "committed", "memory-renamed")
LOCK_WAIT = 2.0          # seconds a writer waits for readers to let go
READ_RETRIES = 20        # a reader racing a writer's commit retries this often


def _crash_hook_from_env() -> Callable[[str], None] | None:
    at = os.environ.get("STRATOPY_TEMPLATE_CRASH_AT")
    if not at:
        return None

    def crash(step: str) -> None:
        if step == at:
            import signal
            os.kill(os.getpid(), signal.SIGKILL)
    return crash


fault_hook: Callable[[str], None] | None = _crash_hook_from_env()


def _step(name: str) -> None:
    if fault_hook is not None:
        fault_hook(name)


# --------------------------------------------------------------------------
# directory and lock

def make_private_dir(path: str) -> list[str]:
    """Create ``path`` and any missing parent, each mode 0700 whatever the
    umask (a template holds guest RAM). Returns the directories created,
    deepest last. An existing directory is left as it is."""
    missing, p = [], os.path.abspath(path)
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    made = []
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)              # 0700 & ~umask: never wider than 0700
            made.append(d)
        except FileExistsError:
            pass
        except OSError as e:
            raise MigrationError(f"cannot create {d}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise MigrationError(f"{path} is not a directory")
    return made


@contextlib.contextmanager
def writer_lock(path_dir: str, wait: float = LOCK_WAIT) -> Iterator[None]:
    """Exclusive flock on DIR while a template is written. Readers hold it
    shared only while opening a template, so waiting ``wait`` seconds is
    plenty for them; a second writer is refused (MigrationError)."""
    fd = _open_dir(path_dir, MigrationError)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise MigrationError(f"{path_dir}: another snapshot is being written "
                                         f"there") from None
                time.sleep(0.01)
            except OSError:
                break           # filesystem without flock: go on unlocked
        yield
    finally:
        os.close(fd)            # releases the lock


def _open_dir(path_dir: str, err: type) -> int:
    try:
        return os.open(path_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise err(f"cannot open {path_dir}: {e.strerror}") from None


def _fsync_dir(path_dir: str) -> None:
    fd = _open_dir(path_dir, MigrationError)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _committed_id(path_dir: str) -> str | None:
    """The memory id the current ``state`` names, or None (none/unreadable)."""
    try:
        meta, _ = state_format.read_state(os.path.join(path_dir, STATE_NAME), None, None)
        tid = meta["memory"]["template_id"]
        return tid if type(tid) is str else None
    except (TemplateError, KeyError, TypeError):
        return None


def remove_leftovers(path_dir: str) -> None:
    """Under the writer lock: delete what a crashed writer left (temp states,
    memory files no committed state names) and finish an interrupted step 4
    (the committed state's ``.memory-<id>`` becomes ``memory``)."""
    tid = _committed_id(path_dir)
    pending = memfile.pending_name(tid) if tid else None
    try:
        names = os.listdir(path_dir)
    except OSError as e:
        raise MigrationError(f"cannot list {path_dir}: {e.strerror}") from None
    for name in names:
        path = os.path.join(path_dir, name)
        if name == pending:
            try:
                os.rename(path, os.path.join(path_dir, MEMORY_NAME))
            except OSError as e:
                raise MigrationError(f"cannot rename {path}: {e.strerror}") from None
        elif name.startswith((f".{MEMORY_NAME}-", f".{MEMORY_NAME}.tmp-",
                              f".{STATE_NAME}.tmp-")):
            _unlink_quiet(path)


# --------------------------------------------------------------------------
# writing

def save_template(path_dir: str, mem: GuestMemory, meta: dict, components: dict,
                  write_state_tmp: Callable[[str, dict, dict], str] | None = None
                  ) -> memfile.MemoryImage:
    """Write a complete template to ``path_dir`` (module docstring). ``meta``
    gets ``meta["memory"] = image.record()`` (a copy is made). Returns the
    MemoryImage (``path`` is then ``DIR/memory``). Raises MigrationError;
    the old template in DIR stays usable whatever fails."""
    write_state_tmp = write_state_tmp or state_format.write_state_tmp
    make_private_dir(path_dir)
    with writer_lock(path_dir):
        remove_leftovers(path_dir)
        image = memfile.write_memory(path_dir, mem)
        try:
            _step("memory-written")
            full_meta = dict(meta)
            full_meta["memory"] = image.record()
            state_tmp = write_state_tmp(path_dir, full_meta, components)
        except BaseException:
            _unlink_quiet(image.path)
            raise
        _commit(path_dir, image, state_tmp)
    return image


def _commit(path_dir: str, image: memfile.MemoryImage, state_tmp: str) -> None:
    try:
        _step("state-written")
        os.rename(state_tmp, os.path.join(path_dir, STATE_NAME))     # the commit point
    except BaseException as e:
        _unlink_quiet(state_tmp)
        _unlink_quiet(image.path)
        if isinstance(e, OSError):
            raise MigrationError(f"cannot commit the template in {path_dir}: "
                                 f"{e.strerror or e}") from None
        raise
    # Committed: the new template is complete and usable from here on (restore
    # finds its memory under the pending name until the rename below).
    try:
        _step("committed")
        _fsync_dir(path_dir)
        memory_path = os.path.join(path_dir, MEMORY_NAME)
        os.rename(image.path, memory_path)
        image.path = memory_path
        _step("memory-renamed")
        _fsync_dir(path_dir)
    except (OSError, MigrationError) as e:
        log.warning("template in %s committed, but finishing it failed (%s); the next "
                    "snapshot into it finishes it", path_dir, getattr(e, "strerror", e))


# --------------------------------------------------------------------------
# restoring

class OpenedTemplate(Record):
    """A template opened for restore (a Record: no dataclass on the warm start)."""

    __slots__ = ("meta", "components", "record", "memory_fd", "memory_path")

    def __init__(self, meta: dict, components: dict, record: dict, memory_fd: int,
                 memory_path: str):
        self.meta = meta
        self.components = components
        self.record = record            # meta.memory, checked ("digests" as bytes)
        self.memory_fd = memory_fd      # the checked memory file: map and verify THIS
        self.memory_path = memory_path

    def close(self) -> None:
        if self.memory_fd >= 0:
            os.close(self.memory_fd)
            self.memory_fd = -1


def open_template(path_dir: str, layout: list[tuple[int, int]],
                  check_meta: Callable[[dict], None] = lambda meta: None,
                  expect_arch=state_format._HOST, expect_vendor=state_format._HOST
                  ) -> OpenedTemplate:
    """Open DIR's state and its memory once each (``open_regular``: never a
    FIFO, device or symlink, never blocking), check the state, run
    ``check_meta(meta)`` (the command-line facts), check the pairing.

    The shared flock is held meanwhile, so no writer commits between the two
    reads. If a writer holds DIR (it may take minutes) the reader does not
    wait: the ids inside the files still pair them, and a read that raced a
    commit is simply retried. Raises TemplateError."""
    state_path = os.path.join(path_dir, STATE_NAME)
    lock_fd = _open_dir(path_dir, TemplateError)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            locked = True
        except OSError:
            locked = False          # a writer is at work (or no flock here)
        for attempt in range(READ_RETRIES):
            sfd = state_format.open_regular(state_path, "template state file")
            try:
                meta, components = state_format.read_state_fd(
                    sfd, state_path, expect_arch, expect_vendor)
            finally:
                os.close(sfd)
            check_meta(meta)
            record = memfile.check_record(meta.get("memory"), state_path, layout)
            try:
                fd, path = _open_memory(path_dir, record, layout)
            except TemplateError:
                if locked or attempt == READ_RETRIES - 1:
                    raise
                time.sleep(0.05)    # a writer is between its renames: read again
                continue
            return OpenedTemplate(meta, components, record, fd, path)
        raise AssertionError("unreachable")
    finally:
        os.close(lock_fd)


def _open_memory(path_dir: str, record: dict, layout) -> tuple[int, str]:
    """``DIR/memory`` if it is the state's pair, else the committed-but-not-
    yet-renamed ``DIR/.memory-<id>`` (see the module docstring)."""
    path = os.path.join(path_dir, MEMORY_NAME)
    try:
        fd = state_format.open_regular(path, "template memory file")
    except TemplateError as e:
        first: TemplateError | None = e
        fd = -1
    else:
        try:
            memfile.check_memory_fd(fd, path, record, layout)
            return fd, path
        except TemplateError as e:
            os.close(fd)
            first = e
    pending = os.path.join(path_dir, memfile.pending_name(record["template_id"]))
    if not os.path.lexists(pending):
        raise first
    fd = state_format.open_regular(pending, "template memory file")
    try:
        memfile.check_memory_fd(fd, pending, record, layout)
    except TemplateError:
        os.close(fd)
        raise first from None
    return fd, pending


def full_check(path_dir: str, layout: list[tuple[int, int]], **kw) -> dict:
    """Open the template and verify every chunk of its memory (tools, tests)."""
    t = open_template(path_dir, layout, **kw)
    try:
        memfile.verify_chunks(t.memory_fd, t.memory_path, t.record, layout)
        return t.meta
    finally:
        t.close()

