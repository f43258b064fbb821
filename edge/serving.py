"""What the app changes in the uvicorn that serves it, as its start-up begins (main.py's lifespan), however uvicorn
was started (`uvicorn main:app`, `make run`, uvicorn.run, --workers N): every connection gets protocol.HttpProtocol
and its limits, uvicorn's wait for running requests at exit is bounded (SHUTDOWN_TIMEOUT_S + SHUTDOWN_GRACE_S,
unless --timeout-graceful-shutdown says otherwise), and its Server header is dropped. Uvicorn reads its protocol
class for each connection it accepts, and accepts none before start-up ends.

And `python main.py`: uvicorn on the fast layout, as many workers as serve most on the cores and memory the
process may use (settings.fast_layout_workers).
"""

import math
import os
import sys
from pathlib import Path
from typing import NoReturn

from uvicorn.config import Config
from uvicorn.lifespan.on import LifespanOn

from edge.protocol import HttpProtocol
from settings import Settings, fast_layout_workers, memory_limit_bytes, usable_cores

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


def serve_on_the_fast_layout(settings: Settings, argv: list[str]) -> NoReturn:
    """`python main.py [uvicorn's options]`: becomes `uvicorn main:app` with those options, its worker count
    (WEB_CONCURRENCY, which each worker reads to take its share of the cores) the fast layout's unless given as
    WEB_CONCURRENCY (in the environment or .env) or --workers. Exec, not uvicorn.run: the process is then just what
    `uvicorn main:app` makes, its workers spawned from uvicorn's light module rather than from this app's."""
    chosen = "web_concurrency" in settings.model_fields_set
    workers = settings.web_concurrency if chosen else fast_layout_workers(settings.max_body_memory_bytes)
    options, arguments = [], iter(argv)
    for argument in arguments:
        if argument == "--workers" or argument.startswith("--workers="):
            value = argument.partition("=")[2] if "=" in argument else next(arguments, "")
            if not value.isdigit() or int(value) < 1:
                sys.exit(f"cannot start: --workers {value!r} is not a whole number of at least 1")
            workers, chosen = int(value), True
        else:
            options.append(argument)
    if "--reload" in options and not chosen:
        workers = 1  # uvicorn runs one process under --reload, whatever the count
    print(f"python main.py: {workers} worker{'s' if workers > 1 else ''} on {usable_cores()} usable cores and "
          f"{memory_limit_bytes() / 2**30:.1f} GiB (WEB_CONCURRENCY={workers}; set it to choose)", file=sys.stderr)
    command = [sys.executable, "-m", "uvicorn", "main:app", "--app-dir", str(Path(__file__).resolve().parent.parent)]
    os.execve(sys.executable, command + options, {**os.environ, "WEB_CONCURRENCY": str(workers)})
