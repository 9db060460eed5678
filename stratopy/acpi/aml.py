"""A small AML (ACPI Machine Language) encoder: each term is a function
returning its bytes, so a table body is plain concatenation.

Encodings follow ACPI 6.5 chapter 20 ("ACPI Machine Language
Specification"); the section of each term is named where it is built.
Terms take ``bytes`` (an already encoded term) or ``int`` (encoded with
``integer``) where the grammar wants a TermArg; names are ``str`` in ASL
spelling (``"\\_SB.VGEN"``, ``"^PWRB"``, ``"_HID"``) and go through
``name_string``. String literals are explicit (``string("ACPI0013")``) so
that a name can never be taken for a string or the reverse.

Resource descriptors (``_CRS`` buffers) live in ``aml_resources``.
"""

from __future__ import annotations

from stratopy.errors import StratoError


class AmlError(StratoError):
    """A term that AML cannot encode (bad name, out-of-range value):
    a bug in the table builder, reported with what was refused."""


# --- opcodes (ACPI 6.5 §20.3) -----------------------------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
NAME_OP = 0x08
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
VAR_PACKAGE_OP = 0x13
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
ROOT_CHAR = 0x5C        # '\'
PARENT_PREFIX = 0x5E    # '^'
LOCAL0_OP = 0x60
ARG0_OP = 0x68
STORE_OP = 0x70
ADD_OP = 0x72
SUBTRACT_OP = 0x74
SHIFT_LEFT_OP = 0x79
SHIFT_RIGHT_OP = 0x7A
AND_OP = 0x7B
OR_OP = 0x7D
NOTIFY_OP = 0x86
LAND_OP = 0x90
LOR_OP = 0x91
LNOT_OP = 0x92
LEQUAL_OP = 0x93
LGREATER_OP = 0x94
LLESS_OP = 0x95
IF_OP = 0xA0
ELSE_OP = 0xA1
RETURN_OP = 0xA4
# after EXT_OP_PREFIX
OP_REGION_OP = 0x80
FIELD_OP = 0x81
DEVICE_OP = 0x82

# OperationRegion spaces (§19.6.100)
SYSTEM_MEMORY = 0x00
SYSTEM_IO = 0x01
PCI_CONFIG = 0x02

# FieldFlags (§20.2.5.2): AccessType bits 0-3, LockRule bit 4, UpdateRule bits 5-6
ANY_ACC, BYTE_ACC, WORD_ACC, DWORD_ACC, QWORD_ACC, BUFFER_ACC = range(6)
NO_LOCK, LOCK = 0, 1
PRESERVE, WRITE_AS_ONES, WRITE_AS_ZEROS = 0, 1, 2

ZERO = bytes([ZERO_OP])
ONE = bytes([ONE_OP])
ONES = bytes([ONES_OP])   # all bits set, whatever the integer width of the table


def _length_encoding(value: int, nbytes: int) -> bytes | None:
    """``value`` in the PkgLength byte layout using ``nbytes`` bytes, or
    None if it does not fit: one byte holds 0-63 (bits 0-5); otherwise bits
    6-7 of the lead byte say how many bytes follow (1-3), the lead byte
    keeps the low nibble and the following bytes the rest, little-endian."""
    if nbytes == 1:
        return bytes([value]) if value <= 0x3F else None
    if value >= 1 << (4 + 8 * (nbytes - 1)):
        return None
    return bytes([((nbytes - 1) << 6) | (value & 0x0F)]) + (value >> 4).to_bytes(nbytes - 1, "little")


def pkg_length(content_length: int) -> bytes:
    """PkgLength (§20.2.4) for ``content_length`` bytes that follow it; the
    encoded value counts the PkgLength bytes themselves."""
    if content_length < 0:
        raise AmlError(f"PkgLength of a negative length {content_length}")
    for nbytes in (1, 2, 3, 4):
        encoded = _length_encoding(content_length + nbytes, nbytes)
        if encoded is not None:
            return encoded
    raise AmlError(f"PkgLength: {content_length} bytes exceed the 28-bit limit")


def _with_pkg_length(content: bytes) -> bytes:
    return pkg_length(len(content)) + content


_LEAD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _LEAD_CHARS | frozenset("0123456789")


def name_seg(seg: str) -> bytes:
    """NameSeg (§20.2.2): 1-4 characters, padded to 4 with '_'."""
    if not 1 <= len(seg) <= 4 or seg[0] not in _LEAD_CHARS \
            or any(c not in _NAME_CHARS for c in seg):
        raise AmlError(f"invalid ACPI name segment {seg!r} "
                       "(1-4 of A-Z 0-9 _, not starting with a digit)")
    return seg.ljust(4, "_").encode("ascii")


def name_string(name: str) -> bytes:
    """NameString (§20.2.2): optional '\\' or '^'s, then 0, 1, 2 or more
    segments (NullName, NameSeg, DualNamePrefix, MultiNamePrefix)."""
    prefix = bytearray()
    rest = name
    if rest.startswith("\\"):
        prefix.append(ROOT_CHAR)
        rest = rest[1:]
    else:
        while rest.startswith("^"):
            prefix.append(PARENT_PREFIX)
            rest = rest[1:]
    segs = rest.split(".") if rest else []
    body = b"".join(name_seg(s) for s in segs)
    if len(segs) == 0:
        return bytes(prefix) + b"\x00"
    if len(segs) == 1:
        return bytes(prefix) + body
    if len(segs) == 2:
        return bytes(prefix) + bytes([DUAL_NAME_PREFIX]) + body
    if len(segs) > 255:
        raise AmlError(f"name {name!r} has more than 255 segments")
    return bytes(prefix) + bytes([MULTI_NAME_PREFIX, len(segs)]) + body


def integer(value: int) -> bytes:
    """ComputationalData integer (§20.2.3) in its smallest encoding:
    ZeroOp, OneOp, then Byte/Word/DWord/QWord prefixes."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AmlError(f"AML integer must be an int, not {value!r}")
    if value < 0 or value >= 1 << 64:
        raise AmlError(f"AML integer {value} outside 0..2**64-1")
    if value == 0:
        return ZERO
    if value == 1:
        return ONE
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    return bytes([QWORD_PREFIX]) + value.to_bytes(8, "little")


def term(value: bytes | int) -> bytes:
    """A TermArg: an encoded term as is, an int as ``integer``."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, int):
        return integer(value)
    raise AmlError(f"not an AML term: {value!r} (use string()/path() for text)")


def string(text: str) -> bytes:
    """String (§20.2.3): ASCII 0x01-0x7F, NUL-terminated."""
    if not text.isascii() or "\0" in text:
        raise AmlError(f"AML string {text!r} must be ASCII without NUL")
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def path(name: str) -> bytes:
    """A reference to a named object (a NameString used as a term)."""
    return name_string(name)


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0A08") (§19.6.35): three letters of 5 bits and four hex
    digits, compressed into a 32-bit value stored big-endian, as a DWord."""
    if len(text) != 7 or any(not ("A" <= c <= "Z") for c in text[:3]) \
            or any(c not in "0123456789ABCDEF" for c in text[3:]):
        raise AmlError(f"invalid EISA id {text!r} (3 capital letters then 4 hex digits)")
    value = ((ord(text[0]) - 0x40) << 26 | (ord(text[1]) - 0x40) << 21
             | (ord(text[2]) - 0x40) << 16 | int(text[3:], 16))
    return bytes([DWORD_PREFIX]) + value.to_bytes(4, "big")


def local(index: int) -> bytes:
    """Local0-Local7 (§20.2.6.2)."""
    if not 0 <= index <= 7:
        raise AmlError(f"Local{index} does not exist (Local0-Local7)")
    return bytes([LOCAL0_OP + index])


def arg(index: int) -> bytes:
    """Arg0-Arg6 (§20.2.6.1)."""
    if not 0 <= index <= 6:
        raise AmlError(f"Arg{index} does not exist (Arg0-Arg6)")
    return bytes([ARG0_OP + index])


# --- data objects ---------------------------------------------------------------

def buffer(data: bytes) -> bytes:
    """Buffer (§20.2.5.4): size as an integer, then the bytes."""
    return bytes([BUFFER_OP]) + _with_pkg_length(integer(len(data)) + bytes(data))


def package(*elements: bytes | int) -> bytes:
    """Package (§20.2.5.4) of up to 255 elements; VarPackage beyond."""
    body = b"".join(term(e) for e in elements)
    if len(elements) <= 255:
        return bytes([PACKAGE_OP]) + _with_pkg_length(bytes([len(elements)]) + body)
    return bytes([VAR_PACKAGE_OP]) + _with_pkg_length(integer(len(elements)) + body)


# --- namespace modifiers and named objects ------------------------------------------

def name(obj_name: str, value: bytes | int) -> bytes:
    """Name (§20.2.5.1): DefName := NameOp NameString DataRefObject."""
    return bytes([NAME_OP]) + name_string(obj_name) + term(value)


def scope(scope_name: str, *terms: bytes) -> bytes:
    """Scope (§20.2.5.1)."""
    return bytes([SCOPE_OP]) + _with_pkg_length(name_string(scope_name) + b"".join(terms))


def device(dev_name: str, *terms: bytes) -> bytes:
    """Device (§20.2.5.2): ExtOpPrefix DeviceOp PkgLength NameString TermList."""
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + _with_pkg_length(
        name_string(dev_name) + b"".join(terms))


def method(method_name: str, nargs: int, *terms: bytes, serialized: bool = False,
           sync_level: int = 0) -> bytes:
    """Method (§20.2.5.2): flags = ArgCount (bits 0-2), SerializeFlag
    (bit 3), SyncLevel (bits 4-7)."""
    if not 0 <= nargs <= 7:
        raise AmlError(f"method {method_name}: {nargs} arguments (0-7)")
    if not 0 <= sync_level <= 15:
        raise AmlError(f"method {method_name}: sync level {sync_level} (0-15)")
    flags = nargs | (0x08 if serialized else 0) | (sync_level << 4)
    return bytes([METHOD_OP]) + _with_pkg_length(
        name_string(method_name) + bytes([flags]) + b"".join(terms))


def operation_region(region_name: str, space: int, offset: bytes | int,
                     length: bytes | int) -> bytes:
    """OperationRegion (§20.2.5.2)."""
    if not 0 <= space <= 0xFF:
        raise AmlError(f"operation region {region_name}: space {space}")
    return (bytes([EXT_OP_PREFIX, OP_REGION_OP]) + name_string(region_name)
            + bytes([space]) + term(offset) + term(length))


def field(region_name: str, fields: list[tuple[str | None, int]], *,
          access: int = ANY_ACC, lock: int = NO_LOCK, update: int = PRESERVE) -> bytes:
    """Field (§20.2.5.2) over ``region_name``: ``fields`` are (name, bits);
    a None name is a ReservedField (an offset gap). Each element's width is
    a PkgLength-style bit count that does not count its own bytes."""
    if not (0 <= access <= 5 and lock in (0, 1) and 0 <= update <= 2):
        raise AmlError(f"field over {region_name}: bad flags")
    elements = bytearray()
    for field_name, bits in fields:
        if bits <= 0:
            raise AmlError(f"field {field_name} of {region_name}: width {bits} bits")
        elements += (b"\x00" if field_name is None else name_seg(field_name)) + _field_width(bits)
    flags = access | (lock << 4) | (update << 5)
    return bytes([EXT_OP_PREFIX, FIELD_OP]) + _with_pkg_length(
        name_string(region_name) + bytes([flags]) + bytes(elements))


def _field_width(bits: int) -> bytes:
    # A field element's width: the PkgLength byte layout, but the value is
    # the bit count itself (it does not count its own bytes).
    for nbytes in (1, 2, 3, 4):
        encoded = _length_encoding(bits, nbytes)
        if encoded is not None:
            return encoded
    raise AmlError(f"field width {bits} bits exceeds the 28-bit limit")


# --- statements and expressions (§20.2.5.3, §20.2.5.4) ---------------------------

def return_(value: bytes | int) -> bytes:
    return bytes([RETURN_OP]) + term(value)


def store(source: bytes | int, target: bytes) -> bytes:
    """Store(source, target): target = source."""
    return bytes([STORE_OP]) + term(source) + target


def notify(target: str | bytes, value: bytes | int) -> bytes:
    """Notify(target, value): ``target`` is a path or an encoded SuperName."""
    obj = name_string(target) if isinstance(target, str) else target
    return bytes([NOTIFY_OP]) + obj + term(value)


def if_(predicate: bytes, *terms: bytes) -> bytes:
    return bytes([IF_OP]) + _with_pkg_length(predicate + b"".join(terms))


def else_(*terms: bytes) -> bytes:
    """Else: must directly follow an If in the same term list."""
    return bytes([ELSE_OP]) + _with_pkg_length(b"".join(terms))


def _binary_logic(op: int, a: bytes | int, b: bytes | int) -> bytes:
    return bytes([op]) + term(a) + term(b)


def lequal(a: bytes | int, b: bytes | int) -> bytes:
    return _binary_logic(LEQUAL_OP, a, b)


def lgreater(a: bytes | int, b: bytes | int) -> bytes:
    return _binary_logic(LGREATER_OP, a, b)


def lless(a: bytes | int, b: bytes | int) -> bytes:
    return _binary_logic(LLESS_OP, a, b)


def land(a: bytes | int, b: bytes | int) -> bytes:
    return _binary_logic(LAND_OP, a, b)


def lor(a: bytes | int, b: bytes | int) -> bytes:
    return _binary_logic(LOR_OP, a, b)


def lnot(a: bytes | int) -> bytes:
    return bytes([LNOT_OP]) + term(a)


def _binary_math(op: int, a: bytes | int, b: bytes | int, target: bytes | None) -> bytes:
    # Target is a SuperName or NullName (0x00) when the result is only used
    # as the value of the expression.
    return bytes([op]) + term(a) + term(b) + (target if target is not None else b"\x00")


def and_(a: bytes | int, b: bytes | int, target: bytes | None = None) -> bytes:
    return _binary_math(AND_OP, a, b, target)


def or_(a: bytes | int, b: bytes | int, target: bytes | None = None) -> bytes:
    return _binary_math(OR_OP, a, b, target)


def add(a: bytes | int, b: bytes | int, target: bytes | None = None) -> bytes:
    return _binary_math(ADD_OP, a, b, target)


def subtract(a: bytes | int, b: bytes | int, target: bytes | None = None) -> bytes:
    return _binary_math(SUBTRACT_OP, a, b, target)


def shift_left(a: bytes | int, count: bytes | int, target: bytes | None = None) -> bytes:
    return _binary_math(SHIFT_LEFT_OP, a, count, target)


def shift_right(a: bytes | int, count: bytes | int, target: bytes | None = None) -> bytes:
    return _binary_math(SHIFT_RIGHT_OP, a, count, target)
