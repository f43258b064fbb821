"""The serving frameworks side by side: our server as `make run` starts it and in its other layouts, against
LitServe, Mosec, BentoML and a plain FastAPI app, each an idiomatic small server in bench/peers/ (laid out as its
documentation advises for 2 cores) on the same cached graph, with the same ONNX Runtime options and threads per
process and the same decoding (ours, imported: bench/peers/common.py).

    $ make bench                      # after bench.py; or, with bench/peers/.venv installed:
    $ .venv/bin/python bench/serving_frameworks.py [--seconds 20] [--rounds 3] [--only ours-default plain-fastapi]

For each model (EfficientNet-Lite0 fp32, ResNet-18 fp32 with random weights saved to a file), `--rounds` rounds,
the servers in turn within each (A B C D E F, three times): each started, checked to answer the photo with our
server's top label, warmed by 2 s of load, then `wrk` with 8 connections posting skimage's chelsea.png as a
451x300 JPEG in base64 for `--seconds`. Measured each time: 200s a second (and the answers that were not a 200,
summed over the rounds), p50 and p99 (wrk), CPU per request and
cores busy (every process of the server's tree, from /proc), and memory (the tree's proportional set size, PSS,
so that pages forked workers share count once). Ours also checks a Bearer key, admits against an exact limit and
logs every request; the others do none of that. Then the ceiling: the requests/s of a server that cost nothing
beyond the decoding and the forward pass they all do (measured in this process, one thread). Prints a table
(medians, with each round's requests/s) and writes bench/results/serving_frameworks.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import server_load  # noqa: E402
from bench import CACHE, bodies, images_per_second, machine, server_graph, serving  # noqa: E402
from engine.images import decode_base64, decode_for_model  # noqa: E402
from engine.runtimes import OnnxBackend  # noqa: E402
from inference import ModelSpec, preprocess  # noqa: E402
from settings import Settings, fast_layout_workers, usable_cores  # noqa: E402

PEERS = ROOT / "bench" / "peers"
PEERS_PYTHON = PEERS / ".venv" / "bin" / "python"
CONNECTIONS = 8
WARM_UP_S = 2
START_TIMEOUT_S = 180
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
DECODES = 100  # the ceiling's: decodings timed, and seconds of forward passes at each batch size
FORWARD_S = 2


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    command: list[str]  # a peer's, run in bench/peers with its venv; empty for ours (server_load starts it)
    env: dict[str, str]
    workers: int | None = 1  # ours: uvicorn's workers (WEB_CONCURRENCY); None: python main.py's choice


def layouts(cores: int) -> list[Layout]:
    peer = str(PEERS_PYTHON)
    return [
        Layout("ours-default", f"python main.py: {fast_layout_workers()} processes, a pass at a time on one thread "
               "each, batches of up to 8", [], {}, workers=None),
        Layout("ours-1-process", f"1 process, {cores} passes at once on one thread each, batches of up to 8", [], {}),
        Layout("ours-1-process-1-pass", f"1 process, a pass at a time on {cores} threads (PARALLEL_BATCHES=1, the "
               "default until 2026-12-07)", [], {"PARALLEL_BATCHES": "1"}),
        Layout("plain-fastapi", f"uvicorn --workers {cores}, one ONNX Runtime call a request, no batching",
               [peer, "-m", "uvicorn", "plain_fastapi:app", "--workers", str(cores), "--port", "{port}"],
               {"PEER_THREADS": "1"}),
        Layout("litserve", f"{cores} inference + {cores} API processes, batch 8, 5 ms",
               [peer, "litserve_server.py", "{port}"], {"PEER_THREADS": "1"}),
        Layout("mosec", f"Rust front, {cores} preprocess + 1 inference process, batch 8",
               [peer, "mosec_server.py", "--port", "{port}"], {"PEER_THREADS": str(cores)}),
        Layout("bentoml", f"{cores} API workers -> 1 model worker, batchable",
               [str(PEERS / ".venv" / "bin" / "bentoml"), "serve", "bentoml_service:Classify", "--port", "{port}"],
               {"PEER_THREADS": str(cores)}),
    ]


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it, now."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    seconds = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime + stime
    return seconds


def pss_mb(pids: list[int]) -> float:
    """The tree's proportional set size: each shared page counted once, split among those that share it."""
    total_kb = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total_kb += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return total_kb / 1024


def classify(url: str, body: bytes, key: str) -> dict:
    response = httpx.post(url + "/v1/classify", content=body, timeout=30,
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    response.raise_for_status()
    return response.json()


def start_peer(layout: Layout, graph: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = server_load.free_port()
    command = [part.replace("{port}", str(port)) for part in layout.command]
    env = {**os.environ, **layout.env, "PEER_GRAPH": str(graph), "PYTHONPATH": str(ROOT),
           "PEER_PROCESSES": str(usable_cores()), "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    process = subprocess.Popen(command, cwd=PEERS, env=env, stdout=open(tmp / f"{layout.name}.log", "ab"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def wait_answering(process: subprocess.Popen, url: str, body: bytes, log: Path) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not start: {log.read_text()[-3000:]}")
        try:
            return classify(url, body, "-")
        except httpx.HTTPError:
            time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 15)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


def measure(url: str, root: int, body_path: Path, keys: Path, seconds: float) -> dict:
    server_load.wrk(url, body_path, keys, WARM_UP_S, CONNECTIONS)
    tree = process_tree(root)
    before, started = cpu_seconds(tree), time.monotonic()
    result = server_load.wrk(url, body_path, keys, seconds, CONNECTIONS)
    elapsed = time.monotonic() - started
    after = cpu_seconds(process_tree(root))
    spent = sum(seconds_now - before.get(pid, 0.0) for pid, seconds_now in after.items())
    ok = result["statuses"].get("200", 0)
    # Answered with a 200, a second: wrk's own rate counts errors and timeouts as requests too
    return {"requests_per_s": result["requests_per_s"] * ok / max(1, result["requests"]), "p50_ms": result["p50_ms"],
            "p99_ms": result["p99_ms"], "requests": result["requests"], "non_200": result["requests"] - ok,
            "cpu_ms_per_request": spent * 1000 / max(1, result["requests"]),
            "cores_busy": spent / elapsed, "pss_mb": pss_mb(process_tree(root))}


def run_layout(layout: Layout, env: dict[str, str], graph: Path, body_path: Path, expected: str, tmp: Path,
               seconds: float) -> dict:
    body = body_path.read_bytes()
    if not layout.command:  # ours (server_load.start: uvicorn main:app, or python main.py)
        with serving(tmp / layout.name, {**env, **layout.env}, layout.workers) as (running, key, keys):
            top = classify(running.url, body, key)["predictions"][0]["label"]
            row = measure(running.url, running.process.pid, body_path, keys, seconds)
    else:
        process, url = start_peer(layout, graph, tmp)
        try:
            top = wait_answering(process, url, body, tmp / f"{layout.name}.log")["predictions"][0]["label"]
            keys = tmp / "none.keys"
            keys.write_text("-\n")
            row = measure(url, process.pid, body_path, keys, seconds)
        finally:
            stop(process)
    assert top == expected, f"{layout.name} answered {top}, ours {expected}"
    return row


def ceiling(graph: Path, body_path: Path, cores: int) -> dict:
    """What a server that cost nothing beyond the work every one of these servers does could answer: the body's
    JSON, base64 and image decoded and cropped, and the forward pass on one thread, at batch 1 and 8, in CPU time
    per request (this process's, one thread at a time), `cores` of them side by side."""
    sidecar = json.loads(graph.with_name(graph.name.replace("-fp32.onnx", ".json")).read_text())
    spec = ModelSpec.from_preprocessing(sidecar["model"], sidecar["preprocessing"], tuple(sidecar["labels"]))
    body, max_pixels = body_path.read_bytes(), Settings().max_image_pixels

    def model_input() -> np.ndarray:
        image = decode_base64(json.loads(body)["image"])
        return preprocess(decode_for_model(image, max_pixels, spec.resize, spec.crop, spec.interpolation))

    model_input()
    started = time.thread_time()
    for _ in range(DECODES):
        model_input()
    decode_ms = (time.thread_time() - started) * 1000 / DECODES
    backend = OnnxBackend(graph, "fp32", 1)
    forward_ms = {batch: images_per_second(backend, batch, FORWARD_S)[1] for batch in (1, 8)}  # CPU ms an image
    per_request = decode_ms + min(forward_ms.values())
    return {"decode_ms": decode_ms, "forward_ms_batch_1": forward_ms[1], "forward_ms_batch_8": forward_ms[8],
            "requests_per_s": cores * 1000 / per_request}


def median_row(rounds: list[dict]) -> dict:
    return {name: statistics.median(row[name] for row in rounds) for name in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20, help="length of each load run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="these layouts only (by name)")
    args = parser.parse_args()
    if not PEERS_PYTHON.is_file():
        sys.exit("bench/peers/.venv is missing: make bench installs it (pip install -r bench/peers/requirements.txt)")
    cores = machine()["cores"]
    chosen = [layout for layout in layouts(int(cores)) if not args.only or layout.name in args.only]
    tmp = Path(tempfile.mkdtemp(prefix="frameworks-"))
    CACHE.mkdir(parents=True, exist_ok=True)
    body_path = bodies(tmp)["photo"]
    torch.manual_seed(0)
    weights = CACHE / "resnet18-random.pth"  # bench.py's: the same graph stays cached
    if not weights.is_file():
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    models = {"EfficientNet-Lite0 fp32": {"MODEL_NAME": "efficientnet_lite0"},
              "ResNet-18 fp32": {"MODEL_NAME": "resnet18", "MODEL_WEIGHTS": str(weights)}}
    started = time.monotonic()
    report: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **machine(),
                    "seconds": args.seconds, "rounds": args.rounds, "models": {}, "ceilings": {}}
    for label, model_env in models.items():
        env = {**model_env, "MODEL_CACHE_DIR": str(CACHE)}
        with serving(tmp / f"export-{label}", env) as (running, key, _):  # exports the graph on a first run
            expected = classify(running.url, body_path.read_bytes(), key)["predictions"][0]["label"]
        graph = server_graph(env, "fp32")
        rounds: dict[str, list[dict]] = {layout.name: [] for layout in chosen}
        for round_index in range(args.rounds):
            for layout in chosen:
                row = run_layout(layout, env, graph, body_path, expected, tmp / f"{label}-{round_index}", args.seconds)
                rounds[layout.name].append(row)
                print(f"  {label}, round {round_index + 1}, {layout.name}: {row['requests_per_s']:.1f} requests/s",
                      file=sys.stderr)
        report["models"][label] = {layout.name: {"description": layout.description, "rounds": rounds[layout.name],
                                                 "median": median_row(rounds[layout.name])} for layout in chosen}
        report["ceilings"][label] = ceiling(graph, body_path, int(cores))
    report["took_s"] = time.monotonic() - started
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "serving_frameworks.json").write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\nThe serving frameworks ({report['date']}, {report['cpu']}, {report['isa']}, {report['cores']} cores; "
          f"wrk {CONNECTIONS} connections, {report['seconds']:g} s, {report['rounds']} rounds interleaved; medians)")
    for label, rows in report["models"].items():
        best_peer = max((row["median"]["requests_per_s"] for name, row in rows.items() if not name.startswith("ours")),
                        default=float("nan"))  # --only ours-...: no peer to compare with
        print(f"\n{label}\n")
        print("| server | layout | req/s (each round) | median | vs best peer | p50 / p99 ms | CPU ms a request | "
              "cores busy | PSS MB | not 200 |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, row in rows.items():
            median = row["median"]
            each = " / ".join(f"{one['requests_per_s']:.1f}" for one in row["rounds"])
            cpu = [one["cpu_ms_per_request"] for one in row["rounds"]]
            busy = [one["cores_busy"] for one in row["rounds"]]
            print(f"| {name} | {row['description']} | {each} | {median['requests_per_s']:.1f} | "
                  f"{median['requests_per_s'] / best_peer:.2f}x | {median['p50_ms']:.0f} / {median['p99_ms']:.0f} | "
                  f"{min(cpu):.1f}-{max(cpu):.1f} | {min(busy):.2f}-{max(busy):.2f} | {median['pss_mb']:.0f} | "
                  f"{sum(one['non_200'] for one in row['rounds'])} |")
        top = report["ceilings"][label]
        print(f"\nThe ceiling: decoding {top['decode_ms']:.2f} ms and a forward pass "
              f"{top['forward_ms_batch_1']:.2f} ms "
              f"(batch 1) or {top['forward_ms_batch_8']:.2f} ms an image (batch 8) of CPU on one thread: "
              f"{top['requests_per_s']:.0f} requests/s on {report['cores']} cores for a server that cost nothing "
              f"more, {top['requests_per_s'] / best_peer:.2f}x the best peer.")


if __name__ == "__main__":
    main()
