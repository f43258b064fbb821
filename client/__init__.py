"""A Python client and command line for the image-classification API, on httpx.

    >>> from client import Client
    >>> client = Client("localhost:8000", "sk-...")  # or from CLASSIFY_URL and CLASSIFY_API_KEY
    >>> [p.label for p in client.classify("chelsea.png", top_k=3).predictions]  # scikit-image's cat: a path or bytes
    ['tiger cat', 'Egyptian cat', 'tabby']
    >>> [p.label for p in client.classify("chelsea.png", min_confidence=0.3).predictions]  # only labels >= 30 %
    ['tiger cat', 'Egyptian cat']
    >>> [r.predictions[0].label for r in client.classify_many(["chelsea.png", "coffee.png"]).results]
    ['tiger cat', 'espresso']
    >>> client.models()[0].id, client.usage(start_time=time.time() - 3600, bucket_width="1m").total_requests
    ('efficientnet_lite0', 3)

(The labels are EfficientNet-Lite0's, the offline fallback's; ResNet-18's differ a little.)

    $ export CLASSIFY_URL=http://127.0.0.1:8000 CLASSIFY_API_KEY=sk-...
    $ python -m client classify photos/ chelsea.png [--top-k 3] [--min-confidence 0.2] [--concurrency 4] [--json]
    $ python -m client --url localhost:8000 --key sk-... usage [--json]

`AsyncClient` has the same methods, awaited. Both retry a bounded number of times (`max_attempts`): after the
`Retry-After` seconds on 409, 429 and 503, and with exponential backoff and jitter on connection errors,
timeouts and 502/503/504. Any other 4xx is the request's own fault and is raised at once. Each classify and
embeddings call sends a fresh `Idempotency-Key` (or `idempotency_key=`), the same on its retries: a retry of a
request the server did get is answered with its stored answer, neither run nor charged again.

Exceptions:

    ClientError                  anything this package raises, e.g. no API key given
    ├── ServerUnreachable        no answer: refused or reset, after the retries
    │   └── TimedOut             no answer within the timeout, after the retries
    └── ResponseError            an error answer: .status_code, and .code and .message from its body
        ├── InvalidRequest       400, 404, 408, 413, 415, 422...: fix the request, as .message says
        ├── AuthenticationError  401: the key is missing, unknown or revoked
        ├── RateLimited          429 after the retries; .retry_after_s
        └── ServerError          5xx: 500 at once (a bug), 502/503/504 after the retries

What it owns, in the order a call meets it; it imports nothing of the server's (it is what a user installs):

    client.py    Client and AsyncClient: the calls, their bodies, the retry rule
    answers.py   the answers' dataclasses and the exceptions above
    cli.py       the command line (`python -m client`, through __main__.py); its exit codes are listed there
"""
from client.answers import (AuthenticationError, ByStatus, Classification, ClientError, ImageResult, InvalidRequest,
                            Latency, ModelInfo, MultiClassification, Prediction, RateLimit, RateLimited, ResponseError,
                            ServerError, ServerUnreachable, TimedOut, Usage, UsageBucket)
from client.client import (DEFAULT_BACKOFF_S, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BACKOFF_S, DEFAULT_MAX_RETRY_AFTER_S,
                           DEFAULT_TIMEOUT, DEFAULT_TOP_K, DEFAULT_URL, AsyncClient, Client, Retries, counted)

__all__ = ["AsyncClient", "AuthenticationError", "ByStatus", "Classification", "Client", "ClientError",
           "DEFAULT_BACKOFF_S", "DEFAULT_MAX_ATTEMPTS", "DEFAULT_MAX_BACKOFF_S", "DEFAULT_MAX_RETRY_AFTER_S",
           "DEFAULT_TIMEOUT", "DEFAULT_TOP_K", "DEFAULT_URL", "ImageResult", "InvalidRequest", "Latency", "ModelInfo",
           "MultiClassification", "Prediction", "RateLimit", "RateLimited", "ResponseError", "Retries", "ServerError",
           "ServerUnreachable", "TimedOut", "Usage", "UsageBucket", "counted"]
