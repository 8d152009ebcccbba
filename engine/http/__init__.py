"""The HTTP injection API (`[http]`): POST /api/v1/inject, GET /api/v1/campaigns/{id}.

aiohttp served inside each worker's event loop on the socket the supervisor bound for
it; bearer tokens (`tokens.py`); request and response shapes (`schema.py`, described
in docs/openapi.json); one request → one commit (`inject.py`); the envelope and trace
header of an injected message (`envelope.py`); the server itself (`server.py`).
"""
