"""Shared wire-protocol test vectors (see ``clients/PROTOCOL.md``, "Test vectors")."""
