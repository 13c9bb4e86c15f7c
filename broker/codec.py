"""Byte-level encoding shared by every fleet message.

A fleet message body is one msgpack map (``use_bin_type``: str and bytes stay distinct). User
values (task arguments, results) travel inside it as a *payload*::

    {"enc": "msgpack",      "size": n, "data": <bin>}          # small: inline msgpack
    {"enc": "msgpack+zstd", "size": n, "data": <bin>}          # over COMPRESS_OVER bytes: zstd frame
    {"enc": "msgpack+zstd", "size": n, "ref": "sha256:<hex>"}  # too big to inline: in the object store

``size`` is the length of the uncompressed msgpack bytes. Offloading is done by
:mod:`broker.blobs`; this module is pure and synchronous.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgpack
import zstandard

Encoding = Literal["msgpack", "msgpack+zstd"]
ENC_MSGPACK: Encoding = "msgpack"
ENC_ZSTD: Encoding = "msgpack+zstd"

COMPRESS_OVER = 4096
"""Payloads whose msgpack form is larger than this many bytes are zstd-compressed."""

MAX_DECODED = 1 << 30
"""Never inflate a payload past 1 GiB."""
MAX_RATIO = 200
"""...nor past 200 times its compressed size (at least 16 MiB): zstd can turn a few kilobytes into
gigabytes, and a hostile or corrupt frame must not take a worker's memory with it."""
MIN_LIMIT = 16 << 20


def inflate_limit(compressed: int) -> int:
    return min(MAX_DECODED, max(MIN_LIMIT, MAX_RATIO * compressed))


_ZSTD_LEVEL = 3


class DecodeError(ValueError):
    """Bytes that are not a valid fleet message or payload."""


def pack(record: dict[str, Any]) -> bytes:
    """Encode one message body (a map) as msgpack."""
    return msgpack.packb(record, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    """Decode one message body; raise :class:`DecodeError` naming the problem."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"body is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"body must be a msgpack map, got {type(obj).__name__}")
    return obj


def encode_value(value: Any, *, compress_over: int = COMPRESS_OVER) -> tuple[bytes, Encoding, int]:
    """Serialise a user value: ``(bytes, encoding, uncompressed size)``."""
    try:
        raw = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"value cannot be encoded as msgpack: {exc}") from None
    if len(raw) > compress_over:
        return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw), ENC_ZSTD, len(raw)
    return raw, ENC_MSGPACK, len(raw)


def decode_value(data: bytes, enc: str) -> Any:
    """Inverse of :func:`encode_value`."""
    if enc == ENC_ZSTD:
        declared, limit = _frame_size(data), inflate_limit(len(data))
        if declared > limit:
            raise DecodeError(
                f"payload declares {declared} bytes uncompressed from {len(data)}: over the {limit}-byte limit"
            )
        try:
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
        except zstandard.ZstdError as exc:
            raise DecodeError(f"payload is not a valid zstd frame: {exc}") from None
    elif enc != ENC_MSGPACK:
        raise DecodeError(f"unknown payload encoding {enc!r}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise DecodeError(f"payload is not valid msgpack ({type(exc).__name__}: {exc})") from None


def _frame_size(data: bytes) -> int:
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"payload is not a valid zstd frame: {exc}") from None
    return int(size) if size is not None and size >= 0 else 0


def content_ref(data: bytes) -> str:
    """Content address of an offloaded payload (also its object-store name)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
