"""Payload offload to the JetStream object store.

:func:`make_payload` turns a user value into the payload map described in :mod:`broker.codec`,
storing it in the ``fleet_blobs`` object store when it is too large to travel inline.
:func:`load_payload` reverses it. Objects are content-addressed, so the same large input
submitted twice within a job is stored once. Names are scoped to the job
(``<job>/sha256:<hex>``), so an input lives exactly as long as its job and is deleted when the job
is archived (no age limit, and no other job's lifetime to inherit).
"""

from __future__ import annotations

from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError

from broker import codec, names

DEFAULT_INLINE_LIMIT = 512 * 1024
"""Largest payload kept inline: half the server's default 1 MiB max_payload, so a report that
carries the envelope back (retries) still fits."""


class BlobMissing(LookupError):
    """An offloaded payload is referenced but absent from the object store."""


async def make_payload(
    js: JetStreamContext | None, value: Any, *, job: str, inline_limit: int = DEFAULT_INLINE_LIMIT
) -> dict[str, Any]:
    data, enc, size = codec.encode_value(value)
    if len(data) <= inline_limit:
        return {"enc": enc, "size": size, "data": data}
    if js is None:
        raise ValueError(f"payload of {len(data)} bytes exceeds the inline limit of {inline_limit} bytes")
    ref = codec.content_ref(data)
    name = names.blob_name(job, ref)
    store = await js.object_store(names.BLOBS_BUCKET)
    try:
        await store.get_info(name)
    except (ObjectNotFoundError, NotFoundError):
        await store.put(name, data)
    return {"enc": enc, "size": size, "ref": ref}


async def load_payload(js: JetStreamContext | None, payload: dict[str, Any], *, job: str) -> Any:
    enc = payload.get("enc", codec.ENC_MSGPACK)
    if payload.get("data") is not None:
        return codec.decode_value(payload["data"], enc)
    ref = payload.get("ref")
    if not ref:
        raise codec.DecodeError("payload has neither data nor ref")
    if js is None:
        raise BlobMissing(f"payload {ref} is offloaded and no JetStream context was given")
    store = await js.object_store(names.BLOBS_BUCKET)
    try:
        result = await store.get(names.blob_name(job, ref))
    except (ObjectNotFoundError, NotFoundError):
        raise BlobMissing(
            f"offloaded payload {ref} is not in the {names.BLOBS_BUCKET} object store"
        ) from None
    return codec.decode_value(result.data or b"", enc)
