"""The HTTP edge: a request's journey from the socket to the engine and the ledger, and its answer back.

It owns the connection's limits, the browser-facing headers, the API's schemas, the body (read, bounded, parsed)
and the one pipeline every image request takes; main.py's routes call it. It may import engine/ (with
inference.py), ledger/, operations/, db.py and settings.py; nothing below imports it.

    serving.py           what the app changes in the uvicorn that serves it (the protocol, the exit's bound)
    protocol.py          the HTTP/1.1 connection and its limits: heads, half-closes, unread answers, closing
    security_headers.py  nosniff on every answer; no-store and a deny-all CSP on the API's
    schemas.py           the API's request and answer bodies, as /openapi.json shows them
    image_requests.py    what /v1/classify and /v1/embeddings share: refusals, the body, the charge, decoding, the pass
    request_body.py      the body: its room among the bodies held at once, read, parsed, decoded to model inputs
    uploads.py           multipart/form-data bodies
    api_docs.py          /docs (Swagger UI), served by the app itself
"""
