"""The bus: everything that touches NATS (names, codec, provisioning, the embedded server).

It knows NATS and JetStream, not scheduling policy, and imports nothing else of fleet's.
"""

from broker import names
from broker.codec import DecodeError
from broker.connection import connect
from broker.provision import BusConfig, ensure_bus, ensure_queue
from broker.publisher import Publisher, PublishError
from broker.server import EmbeddedServer, ServerError

__all__ = [
    "BusConfig",
    "DecodeError",
    "EmbeddedServer",
    "PublishError",
    "Publisher",
    "ServerError",
    "connect",
    "ensure_bus",
    "ensure_queue",
    "names",
]
