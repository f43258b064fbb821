"""What the app changes in the uvicorn that serves it, as its start-up begins (main.py's lifespan), however uvicorn
was started (`uvicorn main:app`, `make run`, uvicorn.run, --workers N): every connection gets protocol.HttpProtocol
and its limits, uvicorn's wait for running requests at exit is bounded (SHUTDOWN_TIMEOUT_S + SHUTDOWN_GRACE_S,
unless --timeout-graceful-shutdown says otherwise), and its Server header is dropped. Uvicorn reads its protocol
class for each connection it accepts, and accepts none before start-up ends.
"""

import math
import sys

from uvicorn.config import Config
from uvicorn.lifespan.on import LifespanOn

from edge.protocol import HttpProtocol
from settings import Settings

# Past SHUTDOWN_TIMEOUT_S, uvicorn gives running requests this long more, then cancels them: a row that finds the
# database locked at the deadline still gets written.
SHUTDOWN_GRACE_S = 5.0


def running_uvicorn_config() -> Config | None:
    """The config of the uvicorn server whose lifespan is running this call, found up the call's frames (uvicorn
    hands its config to no app); None under another server."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, LifespanOn):
            return owner.config
        frame = frame.f_back
    return None


def adopt_running_server(settings: Settings) -> bool:
    """Makes the uvicorn server that runs this app's start-up serve its connections with HttpProtocol, with
    `settings`' limits, and bounds its wait for running requests at exit; False if no uvicorn runs it."""
    HttpProtocol.settings = settings
    config = running_uvicorn_config()
    if config is None:
        return False
    if not (isinstance(config.http_protocol_class, type) and issubclass(config.http_protocol_class, HttpProtocol)):
        config.http_protocol_class = HttpProtocol
    if config.timeout_graceful_shutdown is None:
        config.timeout_graceful_shutdown = math.ceil(settings.shutdown_timeout_s + SHUTDOWN_GRACE_S)
    # The Server header names the software to whoever scans for its known holes, and tells a client nothing.
    config.encoded_headers = [header for header in config.encoded_headers if header[0] != b"server"]
    return True
