"""stratopy's loggers: ``logging`` is imported only when a record is emitted.

Importing ``logging`` costs every start ~18 M instructions (~7 ms here,
docs/performance.md), and a start without ``-D`` emits nothing: its
threshold is WARNING and the start-up messages are INFO. So every module
takes its logger from here::

    from stratopy.logs import get_logger
    log = get_logger(__name__)

and ``log.info(...)`` below the threshold returns at once. The first record
at or above it imports ``logging``, runs the set-up that stratopy.cli
deferred (its stderr handler and format) and passes the record on to the
``logging.Logger`` of the same name, so from then on it is plain ``logging``:
same names, levels, handlers, formats.

Before stratopy.cli calls :func:`defer_setup` the threshold is WARNING, as an
unconfigured ``logging`` has it; once ``logging`` is imported by anyone,
the ``logging`` configuration decides (``isEnabledFor``), not this module.
"""

from __future__ import annotations

import sys
import threading

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

_threshold = WARNING
_setup = None                  # the deferred set-up: run once before the first record
_lock = threading.Lock()


def defer_setup(threshold: int, setup) -> None:
    """Records below ``threshold`` are dropped without importing ``logging``;
    ``setup()`` (which imports and configures it) runs before the first
    record that is not."""
    global _threshold, _setup
    with _lock:
        _threshold = threshold
        _setup = setup


def _materialize():
    """``logging``, with the deferred set-up done (once)."""
    global _setup
    with _lock:
        setup, _setup = _setup, None
        if setup is not None:
            setup()
    import logging

    return logging


class Logger:
    """The subset of ``logging.Logger`` stratopy uses."""

    __slots__ = ("name", "_real")

    def __init__(self, name: str):
        self.name = name
        self._real = None

    def isEnabledFor(self, level: int) -> bool:
        if self._real is None and "logging" not in sys.modules:
            return level >= _threshold
        return self._logger().isEnabledFor(level)

    def _logger(self):
        if self._real is None:
            self._real = _materialize().getLogger(self.name)
        elif _setup is not None:
            _materialize()
        return self._real

    def _log(self, level: int, msg, args, kw) -> None:
        if self.isEnabledFor(level):
            kw.setdefault("stacklevel", 3)       # the caller's file and line, not ours
            self._logger().log(level, msg, *args, **kw)

    def debug(self, msg, *args, **kw) -> None:
        self._log(DEBUG, msg, args, kw)

    def info(self, msg, *args, **kw) -> None:
        self._log(INFO, msg, args, kw)

    def warning(self, msg, *args, **kw) -> None:
        self._log(WARNING, msg, args, kw)

    def error(self, msg, *args, **kw) -> None:
        self._log(ERROR, msg, args, kw)

    def exception(self, msg, *args, exc_info=True, **kw) -> None:
        self._log(ERROR, msg, args, dict(kw, exc_info=exc_info))


_loggers: dict[str, Logger] = {}


def get_logger(name: str) -> Logger:
    """The logger ``name`` (one object per name, like ``logging.getLogger``)."""
    lg = _loggers.get(name)
    if lg is None:
        lg = _loggers.setdefault(name, Logger(name))
    return lg
