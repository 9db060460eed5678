"""Record: the base of small value classes written out instead of generated.

``@dataclass`` compiles each generated method (``__init__``, ``__repr__``,
``__eq__``; three more for a frozen class) with ``exec`` when the class is
created, 2-4 M instructions per class at every start (docs/performance.md).
Classes on the start path that need none of its introspection (only the
state classes read by ``migration/codec.py`` do) write their ``__init__``
out and take equality and repr from here. A subclass lists its fields, in
order, as ``__slots__``.
"""

from __future__ import annotations


class Record:
    """Field-wise equality (same class only) and a repr over ``__slots__``;
    unhashable, as a mutable dataclass is."""

    __slots__ = ()

    def _values(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__)
        return f"{type(self).__name__}({fields})"


class StateRecord(Record):
    """A class of the snapshot schema (stratopy/state.py), written out.

    Its fields are its ``__slots__`` in order, each with a class annotation
    (``name: type``) that ``migration/codec.py`` reads exactly as it reads a
    dataclass's field hints: strict decoding, every field required. The
    ``__init__`` here takes the fields by position or keyword and refuses a
    missing or unknown one (no code is generated: nothing per class at start).

    A field whose type depends on another field (a tagged union: a virtio
    slot's device state is a BlockState or a NetState, ...) is named in
    ``__tagged__``: ``{field: (tag field, {tag value: "module:Class"})}``.
    The codec imports the class of the tag it reads, when it reads it, so
    a start only loads the state classes of the devices it has.
    """

    __slots__ = ()
    __tagged__: dict = {}

    def __init__(self, *args, **kwargs):
        names = self.__slots__
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}: {len(args)} values for "
                            f"{len(names)} fields")
        for name, value in zip(names, args):
            setattr(self, name, value)
        for name in names[len(args):]:
            if name not in kwargs:
                raise TypeError(f"{type(self).__name__}: field {name} missing")
            setattr(self, name, kwargs.pop(name))
        if kwargs:
            raise TypeError(f"{type(self).__name__}: unknown field(s) {sorted(kwargs)}")
