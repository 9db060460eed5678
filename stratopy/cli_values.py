"""Values on StratoVirt's command line, checked: the helpers every option
parser of :mod:`stratopy.cli_parse` and :mod:`stratopy.cli_devices` uses
(booleans, numbers, sizes, ids, paths, ``key=value`` lists). Pure: no file
system, no KVM. Every refusal is a :class:`~stratopy.errors.ConfigError`.
"""

from __future__ import annotations

import re

from stratopy.errors import ConfigError

MAX_ID_LEN = 255  # StratoVirt's MAX_STRING_LENGTH
MAX_PATH_LEN = 4096  # StratoVirt's MAX_PATH_LENGTH
MAX_SOCK_PATH_BYTES = 107  # sun_path is 108 bytes with the terminating NUL
MAX_BLK_SERIAL_LEN = 20  # VIRTIO_BLK_ID_BYTES
MAX_IFNAME_LEN = 15  # IFNAMSIZ - 1
MAX_NET_QUEUE_PAIRS = 16
PAGE_SIZE = 4096
MAX_U64 = (1 << 64) - 1
SERIAL_CHARDEV_ID = "serial_chardev"

_BOOL_TRUE = ("on", "true", "yes")
_BOOL_FALSE = ("off", "false", "no")
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_SIZE = re.compile(r"([0-9]+)([kKmMgG]?)", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --------------------------------------------------------------------------
# value helpers


def _bool(option: str, key: str, value: str) -> bool:
    v = value.lower()
    if v in _BOOL_TRUE:
        return True
    if v in _BOOL_FALSE:
        return False
    raise ConfigError(option, f"{key}: invalid boolean '{value}' (use on/off, true/false or yes/no)")


def _int(option: str, key: str, value: str, lo: int, hi: int) -> int:
    if not _DIGITS.fullmatch(value):
        raise ConfigError(option, f"{key}: '{value}' is not a number")
    if len(value) > 20:
        raise ConfigError(option, f"{key}: {value} is out of range {lo}..{hi}")
    n = int(value)
    if not lo <= n <= hi:
        raise ConfigError(option, f"{key}: {n} is out of range {lo}..{hi}")
    return n


def _size(option: str, value: str) -> int:
    m = _SIZE.fullmatch(value)
    if not m:
        raise ConfigError(option, f"invalid size '{value}' (use N, NK, NM or NG; no unit means MiB)")
    digits, unit = m.groups()
    if len(digits) > 20:
        raise ConfigError(option, f"size '{value}' is too large")
    shift = {"": 20, "k": 10, "m": 20, "g": 30}[unit.lower()]
    size = int(digits) << shift
    if size > MAX_U64:
        raise ConfigError(option, f"size '{value}' is too large")
    return size


def _no_control(option: str, what: str, value: str) -> None:
    """Names and paths end up in log lines and one-line errors: a newline
    would split them, a NUL cannot reach the kernel at all."""
    m = _CONTROL.search(value)
    if m:
        c = m.group()
        name = "a NUL character" if c == "\0" else f"a control character ({c!r})"
        raise ConfigError(option, f"{what} contains {name}")


def _bounded(option: str, label: str, noun: str, value: str, limit: int) -> str:
    """An id or a path: not empty, at most ``limit`` characters, no control
    characters; errors read ``<label>: <noun> ...``."""
    if not value:
        raise ConfigError(option, f"{label}: {noun} must not be empty")
    if len(value) > limit:
        raise ConfigError(option, f"{label}: {noun} is longer than {limit} characters")
    _no_control(option, f"{label}: {noun}", value)
    return value


def _id(option: str, what: str, value: str) -> str:
    return _bounded(option, what, "id", value, MAX_ID_LEN)


def _path(option: str, key: str, value: str) -> str:
    return _bounded(option, key, "path", value, MAX_PATH_LEN)


def _sock_path(option: str, key: str, value: str) -> str:
    _path(option, key, value)
    if len(value.encode("utf-8", "surrogatepass")) > MAX_SOCK_PATH_BYTES:
        raise ConfigError(option, f"{key}: unix socket path is longer than {MAX_SOCK_PATH_BYTES} bytes")
    return value


class _Props:
    """A ``key=value,...`` list.  Bare words are keys with value None.

    Consumers ``take`` what they know; ``finish`` refuses whatever is left.
    """

    def __init__(self, option: str, text: str, what: str, items: list[str]):
        self.option = option
        self.what = what
        self.known: list[str] = []
        self.d: dict[str, str | None] = {}
        for item in items:
            if item == "":
                raise ConfigError(option, f"empty item in '{text}' (stray comma?)")
            key, eq, value = item.partition("=")
            if key == "":
                raise ConfigError(option, f"'{item}' has no property name")
            if key in self.d:
                raise ConfigError(option, f"property '{key}' given twice for {what}")
            self.d[key] = value if eq else None

    def _pop(self, names: tuple[str, ...]) -> tuple[str, str | None] | None:
        self.known.append(names[0])
        found = [n for n in names if n in self.d]
        if len(found) > 1:
            raise ConfigError(self.option, f"'{found[0]}' and '{found[1]}' are the same property for {self.what}")
        if not found:
            return None
        return found[0], self.d.pop(found[0])

    def take(self, *names: str) -> str | None:
        got = self._pop(names)
        if got is None:
            return None
        key, value = got
        if value is None:
            raise ConfigError(self.option, f"property '{key}' of {self.what} needs a value ({key}=...)")
        return value

    def need(self, *names: str) -> str:
        value = self.take(*names)
        if value is None:
            raise ConfigError(self.option, f"{self.what} requires {names[0]}=")
        return value

    def take_bool(self, default: bool, *names: str) -> bool:
        got = self._pop(names)
        if got is None:
            return default
        key, value = got
        if value is None:
            raise ConfigError(self.option, f"property '{key}' of {self.what} needs a value ({key}=on|off)")
        return _bool(self.option, key, value)

    def take_flag(self, name: str) -> bool:
        """A bare word such as ``server``; ``server=on|off`` is accepted too."""
        got = self._pop((name,))
        if got is None:
            return False
        key, value = got
        return True if value is None else _bool(self.option, key, value)

    def refuse(self, name: str, reason: str) -> None:
        if name in self.d:
            raise ConfigError(self.option, f"property '{name}' of {self.what}: {reason}")

    def finish(self) -> None:
        for key in self.d:
            accepted = ", ".join(dict.fromkeys(self.known)) or "none"
            raise ConfigError(self.option, f"unknown property '{key}' for {self.what} (accepted: {accepted})")


def _split(option: str, text: str) -> list[str]:
    if text == "":
        raise ConfigError(option, "empty value")
    return text.split(",")


def _first_bare(option: str, text: str, key: str, what: str) -> _Props:
    """``-machine microvm,...``: a leading bare word is the value of ``key``."""
    items = _split(option, text)
    if "=" not in items[0] and items[0] != "":
        items[0] = f"{key}={items[0]}"
    return _Props(option, text, what, items)


def _typed(option: str, text: str, what: str) -> tuple[str, _Props]:
    """``-device DRIVER,...`` / ``-chardev BACKEND,...``: the first item is the type."""
    items = _split(option, text)
    kind = items[0]
    if kind == "" or "=" in kind:
        raise ConfigError(option, f"'{text}' must start with the {what}")
    return kind, _Props(option, text, kind, items[1:])
