"""Component state <-> plain JSON data, strictly, in both directions.

A template's ``state`` file is untrusted input, so decoding is driven by the
*type hints* of the target dataclass, never by the data: every field is
checked, nothing is guessed.

Supported field types (the hint decides; anything else is a programming
error and raises ``TypeError`` when first used):

=========================  ===================================================
hint                       plain form
=========================  ===================================================
``int``                    JSON integer, -2**63 <= x < 2**64; ``bool`` is NOT
                           an ``int`` here, in either direction
``bool``                   JSON true/false
``str``                    JSON string (at most ``MAX_STR`` characters)
``float``                  JSON number (finite; an integer is accepted and
                           becomes a float)
``bytes``                  standard base64 string (canonical, padded), at most
                           ``MAX_BYTES`` decoded bytes. The hint says it is
                           bytes, so no tag is needed.
``list[X]``                JSON array, at most ``MAX_LIST`` elements
``tuple[X, ...]``          JSON array (rebuilt as a tuple)
``dict[str, X]``           JSON object
``Optional[X]``/``X|None``  null or X
``Enum`` subclass          the member's value
nested ``@dataclass``      JSON object with exactly the dataclass's fields
``StateRecord`` subclass   JSON object with exactly its fields (``__slots__``,
                           typed by class annotations; stratopy/record.py),
                           every field required; a field named in
                           ``__tagged__`` has the class its tag field's value
                           names (imported then; an unknown tag is refused)
``Any``/``object``         plain JSON only (null/bool/int/float/str/list/dict
                           with str keys), nesting at most ``MAX_DEPTH`` deep
=========================  ===================================================

``to_plain(obj)`` encodes (a dataclass, or any supported value); values that
do not fit their hint raise ``MigrationError`` (a save that would produce a
template the loader then refuses must fail at save time instead).

``from_plain(tp, data)`` decodes and raises ``TemplateError`` naming the
dotted path of the offending field (``vcpus[1].regs``, ``devices['net0'].mac``)
for a missing field, an unknown field, a wrong type, an out-of-range integer
or an over-size bytes/list/str. A dataclass field that has a default may
be absent only when ``allow_defaults=True`` (off by default: a template is
written by the same format version that reads it, so a missing field means
damage). Hostile input never escapes as anything but ``TemplateError``
(``RecursionError``, ``MemoryError`` and friends included).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import math
import types
import typing
from typing import Any

from stratopy.errors import MigrationError, TemplateError
from stratopy.record import StateRecord

MAX_BYTES = 64 << 20          # one bytes field
MAX_LIST = 1_000_000          # elements in one list/tuple/dict
MAX_STR = 1 << 20             # characters in one str field
MAX_DEPTH = 64                # nesting of untyped (Any) plain data
INT_MIN = -(1 << 63)
INT_MAX = (1 << 64) - 1       # u64 is the widest KVM quantity

# base64 of MAX_BYTES bytes is 4 * ceil(MAX_BYTES / 3) characters
_MAX_B64 = 4 * ((MAX_BYTES + 2) // 3)

_hints_cache: dict[type, dict[str, Any]] = {}


# --------------------------------------------------------------------------
# type-hint helpers

class _Tagged:
    """The hint of a StateRecord field whose class a tag field names."""

    __slots__ = ("tag", "classes")

    def __init__(self, tag: str, classes: dict[str, str]):
        self.tag, self.classes = tag, classes

    def resolve(self, value: Any, path: str) -> type | None:
        """The class tag ``value`` names (imported now), None if it names none."""
        where = self.classes.get(value) if type(value) is str else None
        if where is None:
            return None
        module, _, name = where.partition(":")
        return getattr(__import__(module, fromlist=[name]), name)


def _field_hints(cls: type) -> dict[str, Any]:
    """{field name: resolved type hint} for the init fields of a dataclass,
    or the fields of a StateRecord (its ``__slots__``, in order)."""
    hints = _hints_cache.get(cls)
    if hints is None:
        if issubclass(cls, StateRecord):
            tagged = cls.__tagged__
            plain = {n: a for n, a in typing.get_type_hints(cls).items() if n not in tagged}
            hints = {n: (_Tagged(*tagged[n]) if n in tagged else plain[n])
                     for n in cls.__slots__}
        else:
            resolved = typing.get_type_hints(cls)
            hints = {f.name: resolved[f.name] for f in dataclasses.fields(cls)}
        _hints_cache[cls] = hints
    return hints


def _is_dataclass_type(tp: Any) -> bool:
    """A dataclass or a StateRecord: a class the codec reads field by field."""
    return isinstance(tp, type) and (issubclass(tp, StateRecord)
                                     or dataclasses.is_dataclass(tp))


def _optional_arg(tp: Any) -> tuple[bool, Any]:
    """(True, X) for Optional[X] / X | None, else (False, tp)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)) - 1 or len(args) != 1:
            raise TypeError(f"unsupported union type {tp!r}: only Optional[X] is allowed")
        return True, args[0]
    return False, tp


def _fmt_path(path: str) -> str:
    return path or "<top>"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(data: Any) -> str:
    if data is None:
        return "null"
    if isinstance(data, bool):
        return "a boolean"
    if isinstance(data, int):
        return "an integer"
    if isinstance(data, float):
        return "a number"
    if isinstance(data, str):
        return "a string"
    if isinstance(data, list):
        return "a list"
    if isinstance(data, dict):
        return "an object"
    return type(data).__name__


def _hint_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


# --------------------------------------------------------------------------
# encoding

def to_plain(obj: Any, hint: Any = None) -> Any:
    """Encode ``obj`` (typically a state dataclass) as JSON-able plain data.

    With ``hint`` None the type is inferred from the value (a dataclass's own
    field hints are always used for its fields). Raises MigrationError when a
    value does not fit its hint or cannot be represented.
    """
    try:
        return _enc(obj, hint, "", 0)
    except MigrationError:
        raise
    except RecursionError:
        raise MigrationError("state: structure nested too deeply") from None


def _elem_type(hint: Any, origin: Any, default: Any) -> Any:
    """X of list[X] or tuple[X, ...] (``default`` for a bare list): the one
    place that says which sequence types a state field may have, for the
    encoder and the decoder alike."""
    args = typing.get_args(hint)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        raise TypeError(f"unsupported tuple type {hint!r}: use tuple[X, ...]")
    return args[0] if args else default


def _value_type(hint: Any, default: Any) -> Any:
    """V of dict[str, V] (``default`` for a bare dict); other keys are refused."""
    args = typing.get_args(hint)
    if args and args[0] is not str:
        raise TypeError(f"unsupported dict type {hint!r}: keys must be str")
    return args[1] if args else default


def _enc_fail(path: str, msg: str) -> MigrationError:
    return MigrationError(f"cannot save state field {_fmt_path(path)}: {msg}")


def _enc(obj: Any, hint: Any, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH * 4:
        raise _enc_fail(path, "nested too deeply")
    if hint is None or hint is Any or hint is object:
        return _enc_infer(obj, path, depth, typed=hint is None)
    optional, hint = _optional_arg(hint)
    if obj is None:
        if optional:
            return None
        raise _enc_fail(path, f"None for a {_hint_name(hint)} field")
    origin = typing.get_origin(hint)
    if origin is list or origin is tuple:
        el = _elem_type(hint, origin, None)
        if not isinstance(obj, (list, tuple)):
            raise _enc_fail(path, f"expected a list, got {type(obj).__name__}")
        if len(obj) > MAX_LIST:
            raise _enc_fail(path, f"{len(obj)} elements (limit {MAX_LIST})")
        return [_enc(v, el, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj)]
    if origin is dict:
        vt = _value_type(hint, None)
        if not isinstance(obj, dict):
            raise _enc_fail(path, f"expected a dict, got {type(obj).__name__}")
        if len(obj) > MAX_LIST:
            raise _enc_fail(path, f"{len(obj)} entries (limit {MAX_LIST})")
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise _enc_fail(path, f"dict key {k!r} is not a str")
            out[k] = _enc(v, vt, f"{path}[{k!r}]", depth + 1)
        return out
    if origin is not None:
        raise TypeError(f"unsupported type {hint!r} at {_fmt_path(path)}")
    if _is_dataclass_type(hint):
        if type(obj) is not hint:
            raise _enc_fail(path, f"expected {hint.__name__}, got {type(obj).__name__}")
        return _enc_dataclass(obj, path, depth)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if not isinstance(obj, hint):
            raise _enc_fail(path, f"expected {hint.__name__}, got {type(obj).__name__}")
        return _enc(obj.value, type(obj.value), path, depth + 1)
    if hint is bool:
        if not isinstance(obj, bool):
            raise _enc_fail(path, f"expected bool, got {type(obj).__name__}")
        return bool(obj)
    if hint is int:
        if isinstance(obj, bool) or not isinstance(obj, int):
            raise _enc_fail(path, f"expected int, got {type(obj).__name__}")
        if not INT_MIN <= obj <= INT_MAX:
            raise _enc_fail(path, "integer outside the 64-bit range")
        return int(obj)
    if hint is float:
        if isinstance(obj, bool) or not isinstance(obj, (int, float)):
            raise _enc_fail(path, f"expected float, got {type(obj).__name__}")
        f = float(obj)
        if not math.isfinite(f):
            raise _enc_fail(path, "not a finite number")
        return f
    if hint is str:
        if not isinstance(obj, str):
            raise _enc_fail(path, f"expected str, got {type(obj).__name__}")
        if len(obj) > MAX_STR:
            raise _enc_fail(path, f"string of {len(obj)} characters (limit {MAX_STR})")
        return str(obj)
    if hint is bytes:
        if not isinstance(obj, (bytes, bytearray, memoryview)):
            raise _enc_fail(path, f"expected bytes, got {type(obj).__name__}")
        raw = bytes(obj)
        if len(raw) > MAX_BYTES:
            raise _enc_fail(path, f"{len(raw)} bytes (limit {MAX_BYTES})")
        return base64.b64encode(raw).decode("ascii")
    raise TypeError(f"unsupported type {hint!r} at {_fmt_path(path)}")


def _enc_dataclass(obj: Any, path: str, depth: int) -> dict:
    hints = _field_hints(type(obj))
    out = {}
    for name, tp in hints.items():
        fpath = _join(path, name)
        if isinstance(tp, _Tagged):
            tag = getattr(obj, tp.tag)
            tp = tp.resolve(tag, fpath)
            if tp is None:
                raise _enc_fail(fpath, f"no state class for {tag!r}")
        out[name] = _enc(getattr(obj, name), tp, fpath, depth + 1)
    return out


def _enc_infer(obj: Any, path: str, depth: int, typed: bool) -> Any:
    """Encode a value without a hint. ``typed``: dataclasses/bytes/enums allowed
    (to_plain's top level and inferred containers); False inside an Any field,
    where only plain JSON can round-trip."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        if not INT_MIN <= obj <= INT_MAX:
            raise _enc_fail(path, "integer outside the 64-bit range")
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise _enc_fail(path, "not a finite number")
        return obj
    if isinstance(obj, str):
        if len(obj) > MAX_STR:
            raise _enc_fail(path, f"string of {len(obj)} characters (limit {MAX_STR})")
        return str(obj)
    if isinstance(obj, (list, tuple)):
        if len(obj) > MAX_LIST:
            raise _enc_fail(path, f"{len(obj)} elements (limit {MAX_LIST})")
        return [_enc_infer(v, f"{path}[{i}]", depth + 1, typed) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if len(obj) > MAX_LIST:
            raise _enc_fail(path, f"{len(obj)} entries (limit {MAX_LIST})")
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise _enc_fail(path, f"dict key {k!r} is not a str")
            out[k] = _enc_infer(v, f"{path}[{k!r}]", depth + 1, typed)
        return out
    if typed:
        if isinstance(obj, StateRecord) or (dataclasses.is_dataclass(obj)
                                            and not isinstance(obj, type)):
            return _enc_dataclass(obj, path, depth)
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return _enc(obj, bytes, path, depth)
        if isinstance(obj, enum.Enum):
            return _enc(obj, type(obj), path, depth)
    raise _enc_fail(path, f"{type(obj).__name__} is not plain JSON data")


# --------------------------------------------------------------------------
# decoding

def from_plain(tp: Any, data: Any, path: str = "", *, allow_defaults: bool = False) -> Any:
    """Rebuild a value of type ``tp`` (usually a dataclass) from plain data.

    ``path`` prefixes error messages (e.g. ``"vcpus[0]"``). Raises
    TemplateError for any input that does not fit ``tp`` exactly.
    """
    try:
        return _dec(tp, data, path, 0, allow_defaults)
    except (TemplateError, TypeError):
        raise
    except RecursionError:
        raise TemplateError(f"{_fmt_path(path)}: nested too deeply") from None
    except MemoryError:
        raise TemplateError(f"{_fmt_path(path)}: too large to load") from None
    except (ValueError, OverflowError, AttributeError, KeyError, IndexError) as e:
        raise TemplateError(f"{_fmt_path(path)}: invalid value ({e})") from None


def _bad(path: str, msg: str) -> TemplateError:
    return TemplateError(f"{_fmt_path(path)}: {msg}")


def _dec(tp: Any, data: Any, path: str, depth: int, dflt: bool) -> Any:
    if tp is Any or tp is object:
        _check_plain(data, path, depth)
        return data
    optional, tp = _optional_arg(tp)
    if data is None:
        if optional:
            return None
        raise _bad(path, f"expected {_hint_name(tp)}, got null")
    origin = typing.get_origin(tp)
    if origin is list or origin is tuple:
        el = _elem_type(tp, origin, Any)
        if type(data) is not list:
            raise _bad(path, f"expected a list, got {_kind(data)}")
        if len(data) > MAX_LIST:
            raise _bad(path, f"list of {len(data)} elements (limit {MAX_LIST})")
        out = [_dec(el, v, f"{path}[{i}]", depth + 1, dflt) for i, v in enumerate(data)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        vt = _value_type(tp, Any)
        if type(data) is not dict:
            raise _bad(path, f"expected an object, got {_kind(data)}")
        if len(data) > MAX_LIST:
            raise _bad(path, f"object of {len(data)} entries (limit {MAX_LIST})")
        out = {}
        for k, v in data.items():
            if type(k) is not str:
                raise _bad(path, f"key {k!r} is not a string")
            out[k] = _dec(vt, v, f"{path}[{k!r}]", depth + 1, dflt)
        return out
    if origin is not None:
        raise TypeError(f"unsupported type {tp!r} at {_fmt_path(path)}")
    if _is_dataclass_type(tp):
        return _dec_dataclass(tp, data, path, depth, dflt)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for m in tp:
            if type(m.value) is type(data) and m.value == data:
                return m
        raise _bad(path, f"{data!r} is not a valid {tp.__name__}"[:200])
    if tp is bool:
        if type(data) is not bool:
            raise _bad(path, f"expected a boolean, got {_kind(data)}")
        return data
    if tp is int:
        if type(data) is not int:
            raise _bad(path, f"expected an integer, got {_kind(data)}")
        if not INT_MIN <= data <= INT_MAX:
            raise _bad(path, "integer outside the 64-bit range")
        return data
    if tp is float:
        if type(data) is int:
            if not INT_MIN <= data <= INT_MAX:
                raise _bad(path, "number out of range")
            return float(data)
        if type(data) is not float:
            raise _bad(path, f"expected a number, got {_kind(data)}")
        if not math.isfinite(data):
            raise _bad(path, "not a finite number")
        return data
    if tp is str:
        if type(data) is not str:
            raise _bad(path, f"expected a string, got {_kind(data)}")
        if len(data) > MAX_STR:
            raise _bad(path, f"string of {len(data)} characters (limit {MAX_STR})")
        return data
    if tp is bytes:
        if type(data) is not str:
            raise _bad(path, f"expected base64 bytes, got {_kind(data)}")
        if len(data) > _MAX_B64:
            raise _bad(path, f"bytes field larger than {MAX_BYTES} bytes")
        try:
            raw = base64.b64decode(data.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise _bad(path, "invalid base64") from None
        if len(data) % 4 or base64.b64encode(raw).decode("ascii") != data:
            raise _bad(path, "invalid base64 (not canonical)")
        return raw
    raise TypeError(f"unsupported type {tp!r} at {_fmt_path(path)}")


def _dec_dataclass(cls: type, data: Any, path: str, depth: int, dflt: bool) -> Any:
    if type(data) is not dict:
        raise _bad(path, f"expected an object ({cls.__name__}), got {_kind(data)}")
    hints = _field_hints(cls)
    for k in data:
        if k not in hints:
            shown = k if type(k) is str else repr(k)
            raise _bad(_join(path, str(shown)[:80]), f"unknown field in {cls.__name__}")
    kwargs: dict[str, Any] = {}
    if issubclass(cls, StateRecord):
        # every field required; a tagged field is decoded as its tag says
        # (the tag field comes first in __slots__, so it is decoded already)
        for name, hint in hints.items():
            fpath = _join(path, name)
            if name not in data:
                raise _bad(fpath, f"missing field in {cls.__name__}")
            if isinstance(hint, _Tagged):
                tag = kwargs.get(hint.tag)
                hint = hint.resolve(tag, fpath)
                if hint is None:
                    raise _bad(_join(path, hint_tag_name(cls, name)),
                               f"{tag!r}"[:80] + f" is not a known {cls.__name__} kind")
            kwargs[name] = _dec(hint, data[name], fpath, depth + 1, dflt)
        return cls(**kwargs)
    for f in dataclasses.fields(cls):
        fpath = _join(path, f.name)
        if f.name not in data:
            has_default = (f.default is not dataclasses.MISSING
                           or f.default_factory is not dataclasses.MISSING)
            if dflt and has_default:
                continue
            raise _bad(fpath, f"missing field in {cls.__name__}")
        kwargs[f.name] = _dec(hints[f.name], data[f.name], fpath, depth + 1, dflt)
    non_init = [f.name for f in dataclasses.fields(cls) if not f.init and f.name in kwargs]
    init_kwargs = {k: v for k, v in kwargs.items() if k not in non_init}
    try:
        obj = cls(**init_kwargs)
    except TemplateError:
        raise
    except Exception as e:  # a __post_init__ refusing the values
        raise _bad(path, f"invalid {cls.__name__}: {e}") from None
    for name in non_init:
        object.__setattr__(obj, name, kwargs[name])
    return obj


def hint_tag_name(cls: type, name: str) -> str:
    """The tag field of tagged field ``name`` of StateRecord ``cls``."""
    return cls.__tagged__[name][0]


def _check_plain(data: Any, path: str, depth: int) -> None:
    """Plain JSON data only, bounded in depth and size (for Any fields)."""
    if depth > MAX_DEPTH:
        raise _bad(path, f"nested deeper than {MAX_DEPTH} levels")
    t = type(data)
    if data is None or t is bool or t is str:
        if t is str and len(data) > MAX_STR:
            raise _bad(path, f"string of {len(data)} characters (limit {MAX_STR})")
        return
    if t is int:
        if not INT_MIN <= data <= INT_MAX:
            raise _bad(path, "integer outside the 64-bit range")
        return
    if t is float:
        if not math.isfinite(data):
            raise _bad(path, "not a finite number")
        return
    if t is list:
        if len(data) > MAX_LIST:
            raise _bad(path, f"list of {len(data)} elements (limit {MAX_LIST})")
        for i, v in enumerate(data):
            _check_plain(v, f"{path}[{i}]", depth + 1)
        return
    if t is dict:
        if len(data) > MAX_LIST:
            raise _bad(path, f"object of {len(data)} entries (limit {MAX_LIST})")
        for k, v in data.items():
            if type(k) is not str:
                raise _bad(path, f"key {k!r} is not a string")
            _check_plain(v, f"{path}[{k!r}]", depth + 1)
        return
    raise _bad(path, f"{t.__name__} is not plain JSON data")
