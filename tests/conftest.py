"""Fixtures: real uvicorn servers on loopback, real SQLite files, real PostgreSQL and Redis servers
(tests/servers.py), real photos from scikit-image.

Servers are started the way users start them (`uvicorn main:app` with `make run`'s `--http`, settings in env
vars) and talked to over HTTP with httpx. Keys are made by the same code the CLI uses, straight into the server's database.
`backend_server` runs a test on each of SQLite and PostgreSQL, with and without Redis.
"""

import asyncio
import base64
import io
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import skimage
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.pool import NullPool

from servers import PostgresServer, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from db import make_engine, make_sessionmaker, migrate  # noqa: E402
from ledger.keys import create_key, hash_key  # noqa: E402
from settings import fast_layout_workers  # noqa: E402

PHOTOS = Path(skimage.__file__).parent / "data"
CAT_LABELS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}  # ImageNet's cats
START_TIMEOUT_S = 120
MODEL_CACHE = ROOT / ".cache" / "test-models"  # exported ONNX graphs, kept between runs like a user's cache
ONE_MEGABYTE = 1024 * 1024


def thread_names(pid: int) -> list[str]:
    """The names of the process's threads, as the OS shows them."""
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that has just ended
            pass
    return names


def workers_of(pid: int) -> list[int]:
    """uvicorn's workers: the supervisor's children that multiprocessing spawned (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def photo_path(name: str) -> Path:
    return PHOTOS / name


def photo(name: str) -> Image.Image:
    return Image.open(photo_path(name))


def encode(image: Image.Image, format: str, **save_options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


ONE_PIXEL = b64(encode(Image.new("RGB", (1, 1)), "PNG"))  # the cheapest valid image


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "code", "message", "request_id"}, body
    assert body["error"]["message"]
    assert body["error"]["request_id"] == response.headers["X-Request-ID"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def raw_http(port: int, head: bytes, body_chunks: list[bytes] | None = None, timeout: float = 15) -> tuple[int, int, bytes]:
    """Sends `head`, then chunks until the server answers; returns (status, body bytes sent, response)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        sent = 0
        for chunk in body_chunks or []:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered: stop sending
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        response = read_response(sock)
    return int(response.split(b" ", 2)[1]), sent, response


def read_response(sock: socket.socket) -> bytes:
    """One answer's head and its Content-Length body (the connection may stay open after it)."""
    response = b""
    while b"\r\n\r\n" not in response or len(response.split(b"\r\n\r\n", 1)[1]) < content_length(response):
        data = sock.recv(65536)
        if not data:
            break
        response += data
    return response


def content_length(response: bytes) -> int:
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


class Server:
    """One `uvicorn main:app` subprocess (what `make run`'s `python main.py` becomes on 2 cores, or with `launcher`
    main.py itself, behind `prefix`); its stdout+stderr go to `log_path`."""

    def __init__(self, tmp: Path, env: dict[str, str], workers: int = 1, args: tuple[str, ...] = (),
                 launcher: tuple[str, ...] = ("-m", "uvicorn", "main:app"), prefix: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = env["DATABASE_URL"]
        self.backend_env = {name: env[name] for name in ("DATABASE_URL", "REDIS_URL", "REDIS_KEY_PREFIX") if name in env}
        self.log_path = tmp / f"server-{self.port}.log"
        self.env = {**os.environ, "LOG_LEVEL": "INFO", **env}
        self.workers = workers
        self.args = args  # more of uvicorn's options
        self.command = [*prefix, sys.executable, *launcher]
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Server":
        command = [*self.command, "--host", "127.0.0.1", "--port", str(self.port)]
        if self.workers > 1:  # as `make run WORKERS=N` asks for them: uvicorn and each worker read it
            self.env["WEB_CONCURRENCY"] = str(self.workers)
        command += self.args
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n{self.log()}")

    def wait_exit(self, timeout: float = START_TIMEOUT_S) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def peak_rss_mb(self) -> float:
        """VmHWM of the serving process: the most memory it ever held."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def client(self, key: str | None = None, **options: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **options)


def sync_engine(database_url: str) -> Engine:
    """A plain synchronous engine on the server's database (SQLite or PostgreSQL), for the tests' own reads."""
    url = make_url(database_url)
    url = url.set(drivername="postgresql+psycopg" if url.get_backend_name() == "postgresql" else "sqlite")
    return create_engine(url, poolclass=NullPool)


def query(database_url: str, sql: str, **params: object) -> list[dict]:
    """Runs `sql` (`:name` parameters) on the server's database, SQLite or PostgreSQL, in its own transaction."""
    engine = sync_engine(database_url)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(sql), params)
            return [dict(row._mapping) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def log_rows(database_url: str, where: str, **params: object) -> list[dict]:
    """The request log's rows that match `where` (`:name` parameters), oldest first."""
    return query(database_url, f"SELECT * FROM request_log WHERE {where} ORDER BY id", **params)


def key_id(database_url: str, key: str) -> int:
    return query(database_url, "SELECT id FROM api_keys WHERE key_hash = :hash", hash=hash_key(key))[0]["id"]


def make_key(database_url: str, rate_limit: int = 1000, window_s: int = 60, email: str = "test@example.com") -> str:
    async def create() -> str:
        engine = make_engine(database_url, timeout_s=10)
        try:
            await migrate(engine)
            async with make_sessionmaker(engine)() as session:
                key, _ = await create_key(session, email, rate_limit, window_s)
                await session.commit()
                return key
        finally:
            await engine.dispose()

    return asyncio.run(create())


def run_cli(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` as a user runs it, against `database_url`, with only the env it needs."""
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "DATABASE_URL": database_url, **env})


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database: a SQLite file, then a PostgreSQL database (the tests' own server)."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres").create_database()
    return f"sqlite:///{tmp_path / 'classify.db'}"


def server_env(tmp: Path, **settings: str) -> dict[str, str]:
    """Env for a server on its own SQLite file, running the offline model unless told otherwise."""
    return {"DATABASE_URL": f"sqlite:///{tmp / 'classify.db'}", "MODEL_NAME": "efficientnet_lite0",
            "MODEL_CACHE_DIR": str(MODEL_CACHE), **settings}


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session; each test server gets a database of its own on it."""
    running = PostgresServer().start()
    yield running
    running.remove()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis for the session; each test server gets a key prefix of its own on it."""
    running = RedisServer().start()
    yield running
    running.remove()


BACKENDS = ["sqlite", "sqlite+redis", "postgresql", "postgresql+redis"]
# The shared servers' tests (the limit's exactness, /v1/usage against what clients got) also run against `make run`'s
# `python main.py`: the fast layout, a worker per core on these machines (tests/edge/test_fast_layout.py).
FAST_LAYOUT = "sqlite, python main.py"


def backend_env(request: pytest.FixtureRequest, backend: str, tmp: Path) -> dict[str, str]:
    """Settings for a server on `backend`: a fresh SQLite file or PostgreSQL database, and Redis if named."""
    env = server_env(tmp)
    if backend.startswith("postgresql"):
        env["DATABASE_URL"] = request.getfixturevalue("postgres").create_database()
    if backend.endswith("+redis"):
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
        env["REDIS_KEY_PREFIX"] = f"test-{tmp.name}"
    return env


@pytest.fixture(scope="session", params=[*BACKENDS, FAST_LAYOUT])
def backend_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A shared server on each backend in turn (SQLite alone is the `server` fixture), and as `make run` starts it."""
    if request.param == "sqlite":
        yield request.getfixturevalue("server")
        return
    if request.param == FAST_LAYOUT:
        tmp = tmp_path_factory.mktemp("fast-layout")
        running = Server(tmp, server_env(tmp), launcher=("main.py",)).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while running.log().count("Application startup complete") < fast_layout_workers():  # every worker accepting
            assert time.monotonic() < deadline, running.log()
            time.sleep(0.2)
        yield running
        running.stop()
        return
    tmp = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    running = Server(tmp, backend_env(request, request.param, tmp)).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared server: EfficientNet-Lite0 (offline weights), default settings, its own database."""
    tmp = tmp_path_factory.mktemp("server")
    running = Server(tmp, server_env(tmp)).start()
    yield running
    running.stop()


@pytest.fixture
def key(server: Server) -> str:
    """A fresh key with a limit no test reaches."""
    return make_key(server.database_url, rate_limit=100_000)


@pytest.fixture
def api(server: Server, key: str) -> Iterator[httpx.Client]:
    with server.client(key) as client:
        yield client


@pytest.fixture(scope="session")
def cat_png() -> bytes:
    return photo_path("chelsea.png").read_bytes()


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Starts servers with other settings; stops them when the test ends."""
    started: list[Server] = []

    def start(env: dict[str, str] | None = None, workers: int = 1, wait: bool = True, tmp: Path | None = None,
              args: tuple[str, ...] = (), **command: tuple[str, ...]) -> Server:
        tmp = tmp or tmp_path_factory.mktemp("extra")
        running = Server(tmp, {**server_env(tmp), **(env or {})}, workers=workers, args=args, **command)
        started.append(running)
        return running.start(wait=wait)

    yield start
    for running in started:
        running.stop()


Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def client_cli(*args: str, stderr: int = subprocess.PIPE, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr,
                          text=True, timeout=300, env={"PATH": os.environ["PATH"], **env})


def many_scans_jpeg(extra_scans: int, image: Image.Image | None = None) -> bytes:
    """A progressive JPEG (of the grey cat, by default) whose last scan is repeated: each costs libjpeg a pass
    over every block, and on a flat image that scan is a few bytes."""
    data = encode(image or photo("chelsea.png").convert("L"), "JPEG", progressive=True)
    last_scan = data[data.rindex(b"\xff\xda"):-2]  # up to the end-of-image marker
    return data[:-2] + last_scan * extra_scans + b"\xff\xd9"
