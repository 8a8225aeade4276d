"""Who sent a request: the client identity that the scheduler shares admissions fairly between.

In order of trust: the API key that let the request in, when the server holds several keys (one
per client; a client cannot claim another identity); else the `X-Client-Id` header; else the
OpenAI `user` field; else the peer's address (its host, not its port, so a client's many
connections are one client). A header or `user` is what the client says it is: with one shared key
or none, a client can split itself into several identities, each of which starts level with the
others and is no better placed than one honest client (core/fair_share.py). The prefixes keep the
kinds apart, so a header cannot pose as a key.
"""

from __future__ import annotations

from fastapi import Request

API_KEY_INDEX = "fuselm.api_key_index"  # ASGI scope entry: which of several API keys matched
MAX_CLIENT_ID_CHARS = 128


def client_identity(request: Request, user: str | None) -> str:
    key_index = request.scope.get(API_KEY_INDEX)
    if key_index is not None:
        return f"key:{key_index}"  # an index, never the key itself (it may reach logs and metrics)
    header = request.headers.get("x-client-id")
    if header:
        return "id:" + header[:MAX_CLIENT_ID_CHARS]
    if user:
        return "user:" + user[:MAX_CLIENT_ID_CHARS]
    peer = request.client
    return "addr:" + (peer.host if peer is not None else "unknown")
