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
