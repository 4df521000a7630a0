"""sol's Python client (sync: client.Client; asyncio: client.aio.AsyncClient) and CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client.client import Client
    from client.types import SolError


def __getattr__(name: str):
    # Lazy, so `sol --help` does not import grpc.
    if name == "Client":
        from client.client import Client

        return Client
    if name == "SolError":
        from client.types import SolError

        return SolError
    raise AttributeError(name)


__all__ = ["Client", "SolError"]
