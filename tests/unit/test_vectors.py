"""The shared wire-protocol vectors (clients/vectors/vectors.json) against the Python codec.

Valid vectors must decode to their ``json`` form and re-encode to the same bytes; their payloads
must decode to ``payload_value``. Lenient vectors must decode and re-encode to ``canonical_hex``.
Invalid vectors must raise ValueError (InvalidRecord or DecodeError) naming the problem. The file
itself must be exactly what clients/vectors/generate.py produces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import zstandard

from broker import blobs, codec
from broker.codec import DecodeError
from clients.vectors import generate
from fleet.core import records
from fleet.core.records import InvalidRecord, Payload, Record

VECTORS_FILE = Path(generate.__file__).resolve().parent / "vectors.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))

WIRE_RECORDS = {
    "TaskEnvelope",
    "JobSpec",
    "CancelRequest",
    "StartReport",
    "DoneReport",
    "TaskEvent",
    "JobRecord",
    "Heartbeat",
    "HeartbeatReply",
    "RetryRequest",
    "PrioritizeRequest",
    "TokenRequest",
    "TokenGrant",
    "BudgetNotice",
    "TaskRecord",
    "DeadLetter",
}


def of_kind(kind: str) -> list[Any]:
    params = []
    for v in VECTORS:
        if v["kind"] != kind:
            continue
        marks = []
        if v.get("known_gap"):
            marks.append(
                pytest.mark.xfail(
                    strict=True,
                    reason=f"known gap in the Python decoder: {v['known_gap']}. Once fixed, drop "
                    "known_gap from this vector in clients/vectors/generate.py and regenerate.",
                )
            )
        params.append(pytest.param(v, id=v["name"], marks=marks))
    return params


def from_json(value: Any) -> Any:
    """Inverse of the vectors' JSON form: ``{"$bin": "<hex>"}`` is msgpack bin (bytes)."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def assert_same(actual: Any, expected: Any, where: str = "$") -> None:
    """Equality that also tells int from float from bool and str from bytes (``1 == 1.0`` is not enough)."""
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def record_class(name: str) -> type[Record]:
    cls = getattr(records, name)
    assert isinstance(cls, type)
    assert issubclass(cls, Record)
    return cls


def dig(obj: Any, path: list[str]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


# ---- the file ---------------------------------------------------------------------------------------
def test_file_is_what_the_generator_writes() -> None:
    assert VECTORS_FILE.read_text(encoding="utf-8") == generate.render(generate.build()), (
        "clients/vectors/vectors.json is stale: run .venv/bin/python clients/vectors/generate.py"
    )


def test_generator_check_mode() -> None:
    out: list[str] = []
    assert generate.main(["--check"], write=out.append) == 0
    assert "is current" in out[0]


def test_vector_shapes() -> None:
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names)), "vector names must be unique"
    required = {
        "valid": {"name", "kind", "record", "description", "hex", "json"},
        "lenient": {"name", "kind", "record", "description", "hex", "json", "canonical_hex"},
        "invalid": {"name", "kind", "record", "description", "hex", "error"},
    }
    optional = {
        "valid": {"payload_path", "payload_value", "blob_hex"},
        "lenient": set(),
        "invalid": {"known_gap"},
    }
    for v in VECTORS:
        kind = v["kind"]
        assert required[kind] <= set(v) <= required[kind] | optional[kind], v["name"]
        assert ("payload_path" in v) == ("payload_value" in v), v["name"]
        bytes.fromhex(v["hex"])
        record_class(v["record"])


def test_every_wire_record_has_a_valid_vector() -> None:
    covered = {v["record"] for v in VECTORS if v["kind"] == "valid"}
    assert covered == WIRE_RECORDS
    declared = {cls.__name__ for cls in Record.__subclasses__() if cls.__module__ == records.__name__}
    assert declared == WIRE_RECORDS, (
        "a record was added or renamed: give it vectors in clients/vectors/generate.py"
    )


def test_payload_encodings_are_all_covered() -> None:
    payloads = []
    for v in VECTORS:
        if "payload_path" in v:
            payloads.append(dig(from_json(v["json"]), v["payload_path"]))
    kinds = {(p["enc"], "ref" if "ref" in p else "data") for p in payloads}
    assert kinds >= {("msgpack", "data"), ("msgpack+zstd", "data"), ("msgpack+zstd", "ref")}


# ---- valid ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vector", of_kind("valid"))
def test_valid_vector_round_trips(vector: dict[str, Any]) -> None:
    cls = record_class(vector["record"])
    wire = bytes.fromhex(vector["hex"])
    expected = from_json(vector["json"])
    assert_same(codec.unpack(wire), expected)
    record = cls.from_wire(wire)
    again = record.to_wire()
    assert_same(codec.unpack(again), expected)
    assert again.hex() == vector["hex"], "re-encoding must give the same bytes"
    assert cls.model_validate(expected) == record


@pytest.mark.parametrize("vector", [p for p in of_kind("valid") if "payload_path" in p.values[0]])
async def test_valid_vector_payload(vector: dict[str, Any]) -> None:
    payload = dig(codec.unpack(bytes.fromhex(vector["hex"])), vector["payload_path"])
    Payload.model_validate(payload)
    expected = from_json(vector["payload_value"])
    enc = payload["enc"]
    if "ref" in payload:
        assert "data" not in payload
        stored = bytes.fromhex(vector["blob_hex"])
        assert payload["ref"] == codec.content_ref(stored)
        assert payload["ref"].startswith("sha256:") and len(payload["ref"]) == 7 + 64
        with pytest.raises(blobs.BlobMissing):
            await blobs.load_payload(None, payload, job="j-vectors")
    else:
        stored = payload["data"]
        assert len(stored) <= blobs.DEFAULT_INLINE_LIMIT
        assert_same(await blobs.load_payload(None, payload, job="j-vectors"), expected)
    raw = zstandard.ZstdDecompressor().decompress(stored) if enc == codec.ENC_ZSTD else stored
    assert payload["size"] == len(raw)
    assert (enc == codec.ENC_ZSTD) == (payload["size"] > codec.COMPRESS_OVER)
    value = codec.decode_value(stored, enc)
    assert_same(value, expected)
    if vector["record"] == "TaskEnvelope" or vector["payload_path"][-1] == "payload":
        assert isinstance(value, dict)
        assert set(value) in ({"args", "kwargs"}, {"args", "kwargs", "items"})
        assert isinstance(value["args"], list) and isinstance(value["kwargs"], dict)
    # our encoder is deterministic: encoding the value again gives the stored bytes
    assert codec.encode_value(value) == (stored, enc, payload["size"])


# ---- lenient ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("vector", of_kind("lenient"))
def test_lenient_vector_is_accepted(vector: dict[str, Any]) -> None:
    cls = record_class(vector["record"])
    wire = bytes.fromhex(vector["hex"])
    assert_same(codec.unpack(wire), from_json(vector["json"]))
    record = cls.from_wire(wire)
    assert record.v == records.PROTOCOL_VERSION
    canonical = record.to_wire()
    assert canonical.hex() == vector["canonical_hex"]
    assert cls.from_wire(canonical) == record


# ---- invalid ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("vector", of_kind("invalid"))
def test_invalid_vector_is_rejected(vector: dict[str, Any]) -> None:
    cls = record_class(vector["record"])
    with pytest.raises(ValueError) as info:
        cls.from_wire(bytes.fromhex(vector["hex"]))
    assert isinstance(info.value, InvalidRecord | DecodeError)
    assert vector["error"] in str(info.value)
