"""The command line of the client (`python -m client`): classify files and folders of images, or show the key's usage.

    $ python -m client --url http://127.0.0.1:8000 --key sk-... classify photos/ cat.jpg [--top-k 3] [--json]
    skipped photos/notes.txt: not an image (by its content)
    photos/cat.png: tiger cat 38.3%, Egyptian cat 36.7%, tabby 16.9%, lynx 1.3%, window screen 0.1%
    photos/broken.png: FAILED 400 corrupt_image: The image could not be decoded (Truncated File Read); it may be ...
    4 files: 2 classified, 1 failed, 1 skipped.
    $ python -m client classify photos/ --min-confidence 0.1 --concurrency 8   # only labels >= 10 %; 8 at once
    $ python -m client usage [--json] [--endpoint embeddings]   # the URL and key from CLASSIFY_URL and CLASSIFY_API_KEY

Folders are searched recursively for images by their first bytes, not their names; files named outright are
sent whatever they hold. Every other file a folder holds is named on stderr as skipped (with --json: one object
on stdout, `"skipped"` saying why), so nothing handed over disappears unsaid. Files go `--concurrency` at a
time, never more than the key's limit admits at once; 429s are waited out (client.Retries). One line per file
on stdout, in the order they finish; a progress bar on stderr when it is a terminal; last, on stderr, how many
files were classified, failed and skipped.

Exit codes:
    0  every file classified
    1  some files failed: each is named on its line, with the server's message
    2  bad arguments, a path that does not exist, no image found, no API key
    3  the server cannot be reached, or cannot answer (a wrong URL, 5xx after the retries): the run stops
    4  the server refused the key (unknown or revoked): the run stops
"""

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import httpx

from client import (DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT, DEFAULT_TOP_K, DEFAULT_URL, AsyncClient, AuthenticationError,
                    Classification, ClientError, ResponseError, Retries, ServerError, ServerUnreachable, TimedOut,
                    counted)

DEFAULT_CONCURRENCY = 4
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_ARGUMENTS, EXIT_UNREACHABLE, EXIT_KEY_REFUSED = 0, 1, 2, 3, 4


NOT_AN_IMAGE = "not an image"


def why_not_an_image(path: Path) -> str | None:
    """None for an image, judged by the file's first bytes as the server's decoder will see it, whatever its
    name says; otherwise why it is skipped."""
    try:
        with path.open("rb") as file:
            head = file.read(12)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return NOT_AN_IMAGE


def find_images(paths: list[str]) -> tuple[list[Path], dict[Path, str]]:
    """Files named outright (sent whatever they hold: the server says what is wrong with them), then the image
    files found by content under each folder, recursively; and the folders' other files, with why each is
    skipped."""
    found: list[Path] = []
    skipped: dict[Path, str] = {}
    for given in map(Path, paths):
        if given.is_dir():
            for path in sorted(p for p in given.rglob("*") if not p.is_dir()):
                if not path.is_file():
                    skipped[path] = "not a file (a broken link, a pipe or a device)"
                elif (reason := why_not_an_image(path)) is None:
                    found.append(path)
                else:
                    skipped[path] = reason
        elif given.exists():
            found.append(given)
        else:
            raise FileNotFoundError(f"{given}: no such file or folder")
    return found, skipped


class Progress:
    """`[#####.....] 3/10` on stderr, redrawn in place; only when stderr is a terminal."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.is_shown = stream.isatty()

    def print(self, line: str) -> None:
        """A result line on stdout, with the bar taken away and redrawn below it."""
        self.clear()
        print(line, flush=True)
        self.draw()

    def advance(self) -> None:
        self.done += 1
        self.draw()

    def draw(self) -> None:
        if self.is_shown:
            filled = 30 * self.done // max(1, self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}")
            self.stream.flush()

    def clear(self) -> None:
        if self.is_shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def skipped_line(path: Path, reason: str, as_json: bool) -> str:
    if as_json:
        return json.dumps({"path": str(path), "ok": False, "skipped": reason})
    return f"skipped {path}: {reason}{' (by its content)' if reason == NOT_AN_IMAGE else ''}"


def result_line(path: Path, outcome: Classification | ClientError, as_json: bool, min_confidence: float = 0) -> str:
    if isinstance(outcome, Classification):
        if as_json:
            return json.dumps({"path": str(path), "ok": True, **asdict(outcome)})
        if not outcome.predictions:
            return f"{path}: no label at least {min_confidence:.1%} likely"
        return f"{path}: " + ", ".join(f"{p.label} {p.confidence:.1%}" for p in outcome.predictions)
    if isinstance(outcome, ResponseError):
        status, code, message = outcome.status_code, outcome.code, outcome.message
    else:
        code = {TimedOut: "timeout", ServerUnreachable: "unreachable"}.get(type(outcome), "unreadable")
        status, message = None, str(outcome)
    if as_json:
        return json.dumps({"path": str(path), "ok": False, "status": status, "code": code, "message": message})
    return f"{path}: FAILED {'' if status is None else f'{status} '}{code}: {message}"


async def classify_files(client: AsyncClient, files: list[Path], top_k: int, min_confidence: float | None,
                         concurrency: int,
                         show: Callable[[Path, Classification | ClientError], None]) -> ClientError | None:
    """Sends the files `concurrency` at a time, showing each outcome as it comes. A file the server refuses
    does not stop the others; an unreachable server or a refused key does: the error that stopped the run."""
    pending = iter(files)
    stopped: list[ClientError] = []

    async def worker() -> None:
        for path in pending:  # one shared iterator: each file is taken by exactly one worker
            if stopped:
                return
            try:
                show(path, await client.classify(path, top_k, min_confidence=min_confidence))
            except (ServerUnreachable, AuthenticationError, ServerError) as exc:  # no other file would fare better
                stopped.append(exc)
                show(path, exc)
            except ResponseError as exc:
                show(path, exc)
            except OSError as exc:
                show(path, ClientError(f"cannot read the file: {exc.strerror or exc}"))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return stopped[0] if stopped else None


async def run_classify(client: AsyncClient, args: argparse.Namespace) -> int:
    files, skipped = find_images(args.paths)
    for path, reason in skipped.items():  # first: they are known before anything is sent
        print(skipped_line(path, reason, args.json), file=sys.stdout if args.json else sys.stderr, flush=True)
    if not files:
        print("No image found in " + " ".join(args.paths) + ".", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    limit = (await client.usage()).limit  # also checks the server and the key before any file is sent
    concurrency = max(1, min(args.concurrency, limit, len(files)))  # more at once than the key admits only waits
    progress = Progress(len(files))
    failed: list[Path] = []

    def show(path: Path, outcome: Classification | ClientError) -> None:
        if not isinstance(outcome, Classification):
            failed.append(path)
        progress.print(result_line(path, outcome, args.json, args.min_confidence or 0))
        progress.advance()

    progress.draw()
    stopped = await classify_files(client, files, args.top_k, args.min_confidence, concurrency, show)
    progress.clear()
    unsent = len(files) - progress.done
    print(f"{counted(len(files) + len(skipped), 'file')}: {len(files) - len(failed) - unsent} classified, "
          f"{len(failed)} failed, {len(skipped)} skipped" + (f", {unsent} not sent." if unsent else "."),
          file=sys.stderr)
    if stopped is not None:
        raise stopped
    return EXIT_SOME_FAILED if failed else EXIT_OK


async def run_usage(client: AsyncClient, args: argparse.Namespace) -> int:
    usage = await client.usage(endpoint=args.endpoint)
    if args.json:
        print(json.dumps(asdict(usage)))
        return EXIT_OK
    print(f"Key {usage.key_prefix}...: {counted(usage.total_requests, usage.endpoint + ' request')}, {usage.successful_requests} "
          f"successful ({usage.success_rate:g} %), {usage.avg_response_time_ms:g} ms on average.")
    status, latency = usage.by_status, usage.latency_ms
    print(f"Images: {usage.images}. Answers: {status.succeeded} succeeded, {status.client_errors} client errors, "
          f"{status.rate_limited} rate limited, {status.server_errors} server errors.")
    if latency.p50 is not None:
        print(f"Latency: p50 {latency.p50:g} ms, p95 {latency.p95:g} ms, p99 {latency.p99:g} ms.")
    if usage.covered_from:  # 0: every request the key made is counted
        print(f"Counted from {datetime.fromtimestamp(usage.covered_from, timezone.utc):%Y-%m-%d %H:%M} UTC on; "
              "older requests have passed the server's retention, or are still being counted after an upgrade.")
    print(f"Limit: {counted(usage.limit, 'request')} per {usage.window_seconds} s; {usage.remaining} left now"
          + (f", one more in {usage.reset_seconds} s." if usage.reset_seconds else "."))
    return EXIT_OK


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description="Classify images with the API.")
    parser.add_argument("--url", help=f"the server, e.g. localhost:8000 (default: CLASSIFY_URL, else {DEFAULT_URL})")
    parser.add_argument("--key", help="your API key (default: CLASSIFY_API_KEY)")
    parser.add_argument("--timeout", type=seconds, default=60.0, help="seconds to wait for each answer (default 60)")
    parser.add_argument("--max-attempts", type=int_between(1, 100), default=DEFAULT_MAX_ATTEMPTS,
                        help="tries per request, retries included (default 5)")
    commands = parser.add_subparsers(dest="command", required=True)
    classify = commands.add_parser("classify", help="classify image files, and the images in folders")
    classify.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders to search for images")
    classify.add_argument("--top-k", type=int_between(1, 20), default=DEFAULT_TOP_K, metavar="N",
                          help="labels per image, 1..20 (default 5)")
    classify.add_argument("--min-confidence", type=fraction, metavar="P",
                          help="only labels at least this likely, 0..1 (default: all top-k)")
    classify.add_argument("--concurrency", type=int_between(1, 64), default=DEFAULT_CONCURRENCY, metavar="N",
                          help="requests at once (default 4; never more than the key's limit)")
    classify.add_argument("--json", action="store_true", help="one JSON object per file")
    classify.set_defaults(run=run_classify)
    usage = commands.add_parser("usage", help="this key's usage and rate limit")
    usage.add_argument("--json", action="store_true", help="as one JSON object")
    usage.add_argument("--endpoint", choices=("classify", "embeddings"), default="classify",
                       help="whose requests to count (default classify; the limit is shared)")
    usage.set_defaults(run=run_usage)
    return parser.parse_args(argv)


def int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not (text.strip().isascii() and text.strip().isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}")
        return int(text)

    return parse


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:  # NaN fails both comparisons
        raise argparse.ArgumentTypeError("must be a number from 0 to 1, such as 0.2")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a number of seconds above 0")
    return value


async def run(args: argparse.Namespace) -> int:
    retries = Retries(max_attempts=args.max_attempts)
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, DEFAULT_TIMEOUT.connect or args.timeout))
    async with AsyncClient(args.url, args.key, timeout=timeout, retries=retries) as client:
        return await args.run(client, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    except AuthenticationError as exc:
        print(f"Stopped: the server refused the key: {exc.message}", file=sys.stderr)
        return EXIT_KEY_REFUSED
    except (ServerUnreachable, ResponseError) as exc:
        print(f"Stopped: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ClientError as exc:  # before any request: no key
        print(exc, file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
