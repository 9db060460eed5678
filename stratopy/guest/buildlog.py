"""Build plumbing shared by the kernel and rootfs builds: progress lines,
the per-key lock, the build log that runs each step and ends a failed build
with its tail, and the checks for the host tools a build needs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from stratopy.errors import StratoError
from stratopy.guest.cache import BUILDER_VERSION

_TAIL_LINES = 30


def _progress(msg: str) -> None:
    print(f"stratopy.guest: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _progress(f"waiting for another build (lock {path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _BuildLog:
    """Runs the steps of one build with their output appended to a log."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"\n=== stratopy.guest {what} build {time.ctime()} "
                    f"(builder {BUILDER_VERSION})\n")

    def note(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def run(self, step: str, argv: Sequence[str | os.PathLike], *,
            cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        _progress(f"{self.what}: {step}")
        argv = [os.fspath(a) for a in argv]
        with open(self.path, "a") as f:
            f.write(f"--- {step}\n$ (cd {cwd or os.getcwd()}; {shlex.join(argv)})\n")
            f.flush()
            try:
                r = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=f, stderr=subprocess.STDOUT, check=False)
            except OSError as e:
                f.write(f"cannot run {argv[0]}: {e}\n")
                rc = 127
            else:
                rc = r.returncode
        if rc != 0:
            self.fail(f"{step} failed (exit status {rc})")

    def fail(self, message: str) -> None:
        self.note(f"FAILED: {message}")
        try:
            lines = self.path.read_text(errors="replace").splitlines()[-_TAIL_LINES:]
        except OSError:
            lines = []
        if lines:
            print(f"--- last {len(lines)} lines of {self.path}:", file=sys.stderr)
            print("\n".join(lines), file=sys.stderr, flush=True)
        raise StratoError(f"guest {self.what} build: {message}; log: {self.path}")


def _require_tools(tools: dict[str, str]) -> None:
    """``tools``: executable -> Debian package. Refuse with an apt hint."""
    missing = sorted({pkg for exe, pkg in tools.items() if not _which(exe)})
    if missing:
        names = ", ".join(sorted(exe for exe, pkg in tools.items() if not _which(exe)))
        raise StratoError(f"guest build needs {names}: apt-get install {' '.join(missing)}")


def _which(exe: str) -> str | None:
    if os.path.isabs(exe):
        return exe if os.path.exists(exe) else None
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return shutil.which(exe, path=path)


def _jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
