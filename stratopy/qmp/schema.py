"""QMP argument schemas: types, nesting, and what a well-typed value may hold.

A command's arguments are checked on the QMP thread against a tuple of
:class:`Param` before anything touches the VM; every refusal names the
argument (``Parameter 'file.filename' ...``, ``Invalid parameter 'x'``).
Besides the type, every string is checked (no NUL, no lone surrogate) and a
Param's ``valid`` rule may refuse a value (paths, interface names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from stratopy.errors import QmpError

__all__ = ["Param", "P", "check_object", "path_problem", "pyname", "migrate_uri_problem",
           "blockdev_file_problem", "ifname_problem"]


_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "bool": "a boolean",
    "object": "an object",
    "list": "an array",
    "number": "a number",
    "any": "a value",
}


def _is_type(value: Any, typ: str) -> bool:
    if typ == "str":
        return isinstance(value, str)
    if typ == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if typ == "bool":
        return isinstance(value, bool)
    if typ == "object":
        return isinstance(value, dict)
    if typ == "list":
        return isinstance(value, list)
    if typ == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ == "any":
        return True
    raise ValueError(f"unknown schema type {typ!r}")


@dataclass(frozen=True)
class Param:
    """One argument: ``types`` is a tuple of "str", "int", "bool", "object",
    "list", "number", "any"; ``fields`` is a nested schema applied when the
    value is an object; ``valid`` returns why a value of the right type is
    still refused (or None)."""

    name: str
    types: tuple = ("str",)
    required: bool = False
    fields: tuple = ()
    valid: Optional[Callable[[Any], Optional[str]]] = None

    def expects(self) -> str:
        return " or ".join(_TYPE_WORDS[t] for t in self.types)


def P(name: str, *types: str, required: bool = False, fields: tuple = (),  # noqa: N802
      valid: Optional[Callable[[Any], Optional[str]]] = None) -> Param:
    return Param(name, tuple(types) or ("str",), required, tuple(fields), valid)


def _string_problem(text: str) -> Optional[str]:
    """Every string argument ends up in a path, a name or a C string: a NUL
    would cut it short (or make os.open raise) and a lone surrogate (which
    JSON's \\uXXXX can carry) cannot be encoded at all."""
    if "\0" in text:
        return "must not contain a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    return None


def _check_strings(value: Any, name: str) -> None:
    """Apply :func:`_string_problem` to every string inside ``value``."""
    todo = [(value, name)]
    while todo:   # iterative: the parser bounds the depth, this walk needs no stack
        v, where = todo.pop()
        if isinstance(v, str):
            problem = _string_problem(v)
            if problem:
                raise QmpError(f"Parameter '{where}' {problem}")
        elif isinstance(v, dict):
            todo.extend((item, f"{where}.{k}") for k, item in v.items())
        elif isinstance(v, list):
            todo.extend((item, f"{where}[{i}]") for i, item in enumerate(v))


def check_object(args: Mapping, params: tuple, prefix: str = "") -> None:
    """Check ``args`` against ``params``; an argument not in it is refused
    by name (as QEMU refuses it), before anything uses it as a keyword."""
    known = {p.name: p for p in params}
    for key, value in args.items():
        p = known.get(key)
        if p is None:
            raise QmpError(f"Invalid parameter '{prefix}{key}'")
        if not any(_is_type(value, t) for t in p.types):
            raise QmpError(f"Parameter '{prefix}{key}' expects {p.expects()}")
        if p.fields and isinstance(value, dict):
            check_object(value, p.fields, f"{prefix}{key}.")
        else:
            _check_strings(value, f"{prefix}{key}")
        problem = p.valid(value) if p.valid is not None else None
        if problem:
            raise QmpError(f"Parameter '{prefix}{key}' {problem}")
    for p in params:
        if p.required and p.name not in args:
            raise QmpError(f"Parameter '{prefix}{p.name}' is missing")


#: Linux: PATH_MAX (with its NUL) and NAME_MAX.
_PATH_MAX = 4096
_NAME_MAX = 255
#: Deepest path accepted; far below what Python's recursive os.makedirs can
#: create (about 900 missing levels) and far above any real template path.
_PATH_DEPTH = 256


def path_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be a file or directory path, or None."""
    raw = path.encode("utf-8", "surrogateescape")
    if not raw:
        return "is an empty path"
    if len(raw) >= _PATH_MAX:
        return f"is too long (a path has at most {_PATH_MAX - 1} bytes)"
    parts = [c for c in raw.split(b"/") if c]
    if any(len(c) > _NAME_MAX for c in parts):
        return f"has a path component longer than {_NAME_MAX} bytes"
    if len(parts) > _PATH_DEPTH:
        return f"is too deep (more than {_PATH_DEPTH} path components)"
    return None


def migrate_uri_problem(uri: str) -> Optional[str]:
    scheme, sep, rest = uri.partition(":")
    return path_problem(rest) if sep and scheme == "file" else None


def blockdev_file_problem(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return path_problem(value)
    return None   # an object: its filename member is checked by its own Param


def ifname_problem(name: str) -> Optional[str]:
    from stratopy.devices.virtio.tap import ifname_problem as tap_rule

    return tap_rule(name)


def pyname(name: str) -> str:
    return name.replace("-", "_").replace(".", "_")
