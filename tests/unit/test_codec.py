"""Message bodies and payload values: msgpack maps, optional zstd, clear decode errors."""

from __future__ import annotations

import hashlib
import random
import struct
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import codec
from broker.codec import COMPRESS_OVER, ENC_MSGPACK, ENC_ZSTD, MAX_DECODED, DecodeError

FAST = settings(max_examples=40, deadline=None)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.binary(max_size=50)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=15,
)
bodies = st.dictionaries(st.text(max_size=12), values, max_size=4)


# ---- bodies ------------------------------------------------------------------------------------------
@FAST
@given(bodies)
def test_pack_unpack_round_trip(body: dict[str, Any]) -> None:
    assert codec.unpack(codec.pack(body)) == body


def test_str_and_bytes_stay_distinct() -> None:
    body = {"s": "abc", "b": b"abc", "nested": {"x": [b"\x00", "\x00"]}}
    out = codec.unpack(codec.pack(body))
    assert out == body
    assert isinstance(out["s"], str)
    assert isinstance(out["b"], bytes)


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing
        b"\xc1",  # the one reserved byte
        b"\x82\xa1a",  # truncated map
        b"\x80\x80",  # two values
        b"\x81\x01\x02",  # int map key (strict_map_key)
        b"\xff" * 16,
    ],
)
def test_unpack_garbage_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError, match="body is not valid msgpack") as info:
        codec.unpack(data)
    assert info.value.__cause__ is None  # suppressed: the message says it all
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("value", "kind"),
    [([1, 2], "list"), (7, "int"), ("text", "str"), (b"raw", "bytes"), (None, "NoneType"), (1.5, "float")],
)
def test_unpack_rejects_non_map_bodies(value: Any, kind: str) -> None:
    with pytest.raises(DecodeError, match=f"body must be a msgpack map, got {kind}"):
        codec.unpack(msgpack.packb(value, use_bin_type=True))


@FAST
@given(st.binary(max_size=64))
def test_unpack_never_raises_anything_but_decode_error(data: bytes) -> None:
    try:
        out = codec.unpack(data)
    except DecodeError:
        return
    assert isinstance(out, dict)


# ---- payload values --------------------------------------------------------------------------------------
def test_small_value_is_plain_msgpack() -> None:
    value = {"a": [1, 2, 3], "b": "x"}
    data, enc, size = codec.encode_value(value)
    assert enc == ENC_MSGPACK
    assert data == msgpack.packb(value, use_bin_type=True)
    assert size == len(data)
    assert codec.decode_value(data, enc) == value


def test_large_value_is_compressed() -> None:
    value = {"rows": ["the same line of text"] * 1000}
    raw = msgpack.packb(value, use_bin_type=True)
    assert len(raw) > COMPRESS_OVER
    data, enc, size = codec.encode_value(value)
    assert enc == ENC_ZSTD
    assert size == len(raw)
    assert len(data) < len(raw)
    assert zstandard.ZstdDecompressor().decompress(data) == raw
    assert codec.decode_value(data, enc) == value


def test_compression_threshold_is_strictly_greater_than() -> None:
    value = b"x" * 100  # bin8: 2 header bytes
    n = len(msgpack.packb(value, use_bin_type=True))
    assert n == 102
    assert codec.encode_value(value, compress_over=n)[1] == ENC_MSGPACK
    assert codec.encode_value(value, compress_over=n - 1)[1] == ENC_ZSTD
    # the default threshold, right at the edge
    edge = b"y" * (COMPRESS_OVER - 3)  # bin16: 3 header bytes -> exactly COMPRESS_OVER
    assert codec.encode_value(edge)[1:] == (ENC_MSGPACK, COMPRESS_OVER)
    assert codec.encode_value(edge + b"y")[1:] == (ENC_ZSTD, COMPRESS_OVER + 1)


@FAST
@given(values, st.sampled_from([0, 16, COMPRESS_OVER]))
def test_encode_decode_round_trip(value: Any, compress_over: int) -> None:
    data, enc, size = codec.encode_value(value, compress_over=compress_over)
    raw = msgpack.packb(value, use_bin_type=True)
    assert size == len(raw)
    assert enc == (ENC_ZSTD if len(raw) > compress_over else ENC_MSGPACK)
    assert codec.decode_value(data, enc) == value


@settings(max_examples=15, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**32),
    st.integers(min_value=COMPRESS_OVER, max_value=3 * COMPRESS_OVER),
)
def test_round_trip_of_large_incompressible_values(seed: int, n: int) -> None:
    value = random.Random(seed).randbytes(n)
    data, enc, size = codec.encode_value(value)
    assert enc == ENC_ZSTD
    assert size == len(value) + 3
    assert codec.decode_value(data, enc) == value


def test_decode_accepts_int_map_keys_in_user_values() -> None:
    value = {1: "one", 2: "two"}
    data, enc, _ = codec.encode_value(value)
    assert codec.decode_value(data, enc) == value


@pytest.mark.parametrize("value", [object(), {1, 2}, 2**70, {"k": object()}])
def test_encode_value_rejects_unencodable(value: Any) -> None:
    with pytest.raises(TypeError, match="cannot be encoded as msgpack"):
        codec.encode_value(value)


@pytest.mark.parametrize("enc", ["json", "", "zstd", "MSGPACK", "msgpack+gzip"])
def test_decode_value_rejects_unknown_encoding(enc: str) -> None:
    with pytest.raises(DecodeError, match="unknown payload encoding") as info:
        codec.decode_value(msgpack.packb(1), enc)
    assert repr(enc) in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not zstd at all",
        b"\x28\xb5\x2f\xfd",  # magic only
        codec.encode_value(b"z" * 10_000)[0][:20],  # truncated frame
        codec.encode_value(b"z" * 10_000)[0][:-4],
    ],
)
def test_decode_value_rejects_corrupt_zstd(data: bytes) -> None:
    with pytest.raises(DecodeError, match="not a valid zstd frame"):
        codec.decode_value(data, ENC_ZSTD)


def test_decode_value_rejects_bad_msgpack_inside_valid_zstd() -> None:
    frame = zstandard.ZstdCompressor().compress(b"\xc1\xc1\xc1")
    with pytest.raises(DecodeError, match="payload is not valid msgpack"):
        codec.decode_value(frame, ENC_ZSTD)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", b"\x01\x02"])
def test_decode_value_rejects_bad_msgpack(data: bytes) -> None:
    with pytest.raises(DecodeError, match="payload is not valid msgpack"):
        codec.decode_value(data, ENC_MSGPACK)


def test_decode_value_accepts_frames_without_content_size() -> None:
    raw = msgpack.packb(list(range(5000)))
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    assert codec.decode_value(frame, ENC_ZSTD) == list(range(5000))


def _frame_declaring(size: int) -> bytes:
    """A single-segment zstd frame whose header declares ``size`` bytes, holding one raw 1-byte block."""
    return b"\x28\xb5\x2f\xfd" + b"\xe0" + struct.pack("<Q", size) + b"\x09\x00\x00" + b"\x90"


def test_decode_value_honours_declared_size() -> None:
    assert codec.decode_value(_frame_declaring(1), ENC_ZSTD) == []  # 0x90: an empty msgpack array


@pytest.mark.parametrize("size", [codec.MIN_LIMIT + 1, MAX_DECODED + 1, 1 << 40])
def test_decode_value_refuses_frames_declaring_more_than_the_limit(size: int) -> None:
    # checked before anything is allocated: a 16-byte frame must not make the decoder reserve 1 TiB
    with pytest.raises(DecodeError, match=f"declares {size} bytes uncompressed from 17: over the"):
        codec.decode_value(_frame_declaring(size), ENC_ZSTD)


def test_a_zstd_bomb_is_refused_not_inflated() -> None:
    # the fault audit's case: about 32 KB of zstd that inflates to gigabytes
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\x00" * (1 << 30))
    assert len(bomb) < 64 * 1024
    with pytest.raises(DecodeError, match="over the"):
        codec.decode_value(bomb, ENC_ZSTD)


def test_legitimate_large_payloads_still_inflate() -> None:
    data, enc, _ = codec.encode_value(list(range(300_000)))  # about 1.5 MB, compresses well
    assert enc == ENC_ZSTD and codec.decode_value(data, enc) == list(range(300_000))


# ---- content addresses ---------------------------------------------------------------------------------
@FAST
@given(st.binary(max_size=256))
def test_content_ref(data: bytes) -> None:
    ref = codec.content_ref(data)
    assert ref == "sha256:" + hashlib.sha256(data).hexdigest()
    assert len(ref) == len("sha256:") + 64
    assert codec.content_ref(data) == ref


def test_content_ref_differs_for_different_data() -> None:
    assert codec.content_ref(b"a") != codec.content_ref(b"b")
