"""The ``value`` encoding of the KMS wire protocol: what HELLO, READY, REQUEST and RESPONSE carry.

Theory of operation
===================

``value`` is a tiny self-describing tagged encoding (a strict subset of what msgpack does,
written here so that it is bytes-safe, dependency-free and cheap): ``None``, ``bool``, ``int``
(i64), ``float`` (f64), ``bytes`` and ``str`` (u32 length), ``list`` (u32 count) and ``dict``
with ``str8`` keys (u32 count), nested at most ``MAX_DEPTH`` deep. ``strN`` is a uN length then
UTF-8.

A value is always decoded from exactly one frame's payload, so the end of the buffer is the
end of the frame. Decoding checks every length and count against what is left of the frame
before it slices or allocates anything, so a lying count cannot make us allocate. Malformed
input raises ``ValueError`` (or ``UnicodeDecodeError``); the connections in
:mod:`.protocol` turn that into their own errors.

Both directions are on the per-frame hot path: the leaf types of a typical request or answer
(``bytes``, ``str``, ``None``, ``int`` inside a dict) are handled inline in the dict loops, without a
recursive call; only rare shapes (lists, floats, unknown tags) leave the main function.
"""

from __future__ import annotations

import struct
from typing import Any, Union

MAX_DEPTH = 8  # nesting of lists/dicts in a value: a batch is depth 3

_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")
_TAG_LEN = struct.Struct(">BI")

Value = Union[None, bool, int, float, bytes, str, "list[Value]", "dict[str, Value]"]

_T_NONE, _T_TRUE, _T_FALSE, _T_INT, _T_FLOAT, _T_BYTES, _T_STR, _T_LIST, _T_DICT = range(9)
_NONE_B = bytes([_T_NONE])
_TRUE_B = bytes([_T_TRUE])
_FALSE_B = bytes([_T_FALSE])
_TAG_I64 = struct.Struct(">Bq")
_TAG_F64 = struct.Struct(">Bd")
_KEYS: dict[str, bytes] = {}  # dict key -> its str8 encoding; keys come from our code, a small set
_MAX_CACHED_KEYS = 1024


def _key_bytes(k: object) -> bytes:
    if type(k) is not str:
        raise TypeError(f"dict keys must be str, not {type(k).__name__}")
    b = k.encode()
    if len(b) > 255:
        raise ValueError("dict keys must be at most 255 bytes")
    kb = bytes((len(b),)) + b
    if len(_KEYS) < _MAX_CACHED_KEYS:
        _KEYS[k] = kb
    return kb


def _encode_value(v: Any, out: list[bytes], depth: int = 0) -> None:
    # Hot path: the leaf types of a typical request or answer are handled inline in the dict
    # loop below (no recursive call); everything else goes through the general branches.
    t = type(v)
    if t is dict:
        if depth >= MAX_DEPTH:
            raise ValueError(f"values nest at most {MAX_DEPTH} deep")
        out.append(_TAG_LEN.pack(_T_DICT, len(v)))
        keys = _KEYS
        for k, item in v.items():
            out.append(keys.get(k) or _key_bytes(k))
            ti = type(item)
            if ti is bytes:
                out.append(_TAG_LEN.pack(_T_BYTES, len(item)))
                out.append(item)
            elif ti is str:  # a key id
                b = item.encode()
                out.append(_TAG_LEN.pack(_T_STR, len(b)))
                out.append(b)
            elif item is None:
                out.append(_NONE_B)
            elif ti is int:
                try:
                    out.append(_TAG_I64.pack(_T_INT, item))
                except struct.error:
                    raise ValueError("integers on the wire must fit in 64 bits") from None
            else:
                _encode_value(item, out, depth + 1)
    elif t is bytes:
        out.append(_TAG_LEN.pack(_T_BYTES, len(v)))
        out.append(v)
    elif t is str:
        b = v.encode()
        out.append(_TAG_LEN.pack(_T_STR, len(b)))
        out.append(b)
    elif t is int:
        try:
            out.append(_TAG_I64.pack(_T_INT, v))
        except struct.error:
            raise ValueError("integers on the wire must fit in 64 bits") from None
    elif v is None:
        out.append(_NONE_B)
    elif v is True:
        out.append(_TRUE_B)
    elif v is False:
        out.append(_FALSE_B)
    elif t is list or t is tuple:
        if depth >= MAX_DEPTH:
            raise ValueError(f"values nest at most {MAX_DEPTH} deep")
        out.append(_TAG_LEN.pack(_T_LIST, len(v)))
        for item in v:
            _encode_value(item, out, depth + 1)
    elif t is float:
        out.append(_TAG_F64.pack(_T_FLOAT, v))
    elif t is bytearray or t is memoryview:
        b = bytes(v)
        out.append(_TAG_LEN.pack(_T_BYTES, len(b)))
        out.append(b)
    else:
        raise TypeError(f"cannot encode a {t.__name__} value")


def encode_value(v: Any) -> bytes:
    out: list[bytes] = []
    _encode_value(v, out)
    return b"".join(out)


_CONSTANTS: tuple[None, bool, bool] = (None, True, False)  # by tag: _T_NONE, _T_TRUE, _T_FALSE


def _decode_at(buf: bytes, p: int, depth: int) -> tuple[Value, int]:
    """The value starting at ``buf[p]`` and the offset after it (``len(buf)``: the frame's end)."""
    end = len(buf)
    if p >= end:
        raise ValueError("value runs past the end of the frame")
    tag = buf[p]
    if tag == _T_BYTES or tag == _T_STR:
        if end - p < 5:
            raise ValueError("value runs past the end of the frame")
        n = _U32.unpack_from(buf, p + 1)[0]
        p += 5
        q = p + n
        if q > end:
            raise ValueError("value runs past the end of the frame")
        return (buf[p:q] if tag == _T_BYTES else buf[p:q].decode()), q
    if tag == _T_INT:
        if end - p < 9:
            raise ValueError("value runs past the end of the frame")
        return _I64.unpack_from(buf, p + 1)[0], p + 9
    if tag <= _T_FALSE:  # None, True or False: the tag alone
        return _CONSTANTS[tag], p + 1
    if tag == _T_DICT or tag == _T_LIST:
        if depth >= MAX_DEPTH:
            raise ValueError(f"values nest at most {MAX_DEPTH} deep")
        if end - p < 5:
            raise ValueError("value runs past the end of the frame")
        n = _U32.unpack_from(buf, p + 1)[0]
        p += 5
        # every item takes at least one byte (a dict item two), so a count larger than what is
        # left is a lie: refuse it before building anything
        if n > end - p:
            raise ValueError("count runs past the end of the frame")
        depth += 1
        if tag == _T_LIST:
            return _decode_list_items(buf, p, n, depth)
        d: dict[str, Value] = {}
        for _ in range(n):
            if p >= end:
                raise ValueError("key runs past the end of the frame")
            q = p + 1 + buf[p]
            if q >= end:
                raise ValueError("key runs past the end of the frame")
            k = buf[p + 1 : q].decode()
            tag = buf[q]
            if tag == _T_BYTES and end - q >= 5:  # the common leaves, inline
                p = q + 5 + _U32.unpack_from(buf, q + 1)[0]
                if p > end:
                    raise ValueError("value runs past the end of the frame")
                d[k] = buf[q + 5 : p]
            elif tag == _T_STR and end - q >= 5:
                p = q + 5 + _U32.unpack_from(buf, q + 1)[0]
                if p > end:
                    raise ValueError("value runs past the end of the frame")
                d[k] = buf[q + 5 : p].decode()
            elif tag == _T_NONE:
                d[k] = None
                p = q + 1
            elif tag == _T_INT and end - q >= 9:
                d[k] = _I64.unpack_from(buf, q + 1)[0]
                p = q + 9
            else:
                d[k], p = _decode_at(buf, q, depth)
        return d, p
    return _decode_float(buf, p, tag)


def _decode_list_items(buf: bytes, p: int, n: int, depth: int) -> tuple[list[Value], int]:
    """The ``n`` items of a list whose header ``_decode_at`` has checked; they start at ``buf[p]``."""
    items: list[Value] = []
    for _ in range(n):
        v, p = _decode_at(buf, p, depth)
        items.append(v)
    return items, p


def _decode_float(buf: bytes, p: int, tag: int) -> tuple[float, int]:
    """The last tag ``_decode_at`` knows (a float, rare on the wire); any other tag is unknown."""
    if tag != _T_FLOAT:
        raise ValueError(f"unknown value tag {tag}")
    if len(buf) - p < 9:
        raise ValueError("value runs past the end of the frame")
    return _F64.unpack_from(buf, p + 1)[0], p + 9


def _str8_at(buf: bytes, p: int) -> tuple[str, int]:
    if p >= len(buf):
        raise ValueError("string runs past the end of the frame")
    q = p + 1 + buf[p]
    if q > len(buf):
        raise ValueError("string runs past the end of the frame")
    return buf[p + 1 : q].decode(), q


def decode_value(data: bytes) -> Value:
    """Decode exactly one value; raises ``ValueError`` (or ``UnicodeDecodeError``) if malformed."""
    v, p = _decode_at(data, 0, 0)
    if p != len(data):
        raise ValueError("trailing bytes after the value")
    return v


def _str8(s: str) -> bytes:
    b = s.encode()
    if len(b) > 255:
        raise ValueError("string too long for a str8 field")
    return bytes([len(b)]) + b

