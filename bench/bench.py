"""Benchmark: raw model throughput and the whole server under load, measured in one run on one machine.

    $ make bench                      # or: .venv/bin/python bench/bench.py --seconds 20

1. raw torch eager, batch 1, for each model (images/s), random input, one pass at a time on all cores;
2. the server end to end (auth, limit, log, decode, model) with `wrk`, 8 connections posting skimage's
   chelsea.png as a 451x300 JPEG in base64, for --seconds; meanwhile a probe reads /v1/usage every 50 ms;
3. ratios server / raw model, which mean something across machines where absolute figures do not.

Needs `wrk` (Debian: apt-get install wrk). Prints a table and writes bench/results/latest.json.
"""

import argparse
import base64
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Server, make_key, photo  # noqa: E402  (the tests' real-server harness)
from inference import load_efficientnet_lite0  # noqa: E402
from settings import Settings  # noqa: E402


def raw_images_per_second(network: torch.nn.Module, seconds: float, batch: int = 1) -> float:
    x = torch.randn(batch, 3, 224, 224)  # (B, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(5):
            network(x)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            network(x)
            done += batch
    return done / (time.perf_counter() - started)


def parse_wrk(output: str) -> dict[str, float]:
    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.MULTILINE))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    return {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1]),
            "p50_ms": ms(percentiles["50"]), "p99_ms": ms(percentiles["99"]),
            "errors": int(non_2xx[1]) if non_2xx else 0, "socket_errors": socket_errors[1] if socket_errors else ""}


def probe_usage(url: str, key: str, stop: threading.Event) -> list[float]:
    """Latency of GET /v1/usage every 50 ms until `stop`, in ms."""
    latencies = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get("/v1/usage").raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
            stop.wait(0.05)
    return latencies


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def serve_and_load(tmp: Path, env: dict[str, str], body: Path, seconds: int, connections: int) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    server = Server(tmp, {"DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}", "LOG_LEVEL": "WARNING", **env}).start()
    try:
        key = make_key(server.database_url, rate_limit=10**9)
        idle = probe_for(server.url, key, 2.0)
        stop = threading.Event()
        probe: list[float] = []
        prober = threading.Thread(target=lambda: probe.extend(probe_usage(server.url, key, stop)))
        prober.start()
        wrk = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s",
                              str(ROOT / "bench" / "classify.lua"), f"{server.url}/v1/classify"],
                             env={**os.environ, "BENCH_BODY": str(body), "BENCH_KEY": key},
                             capture_output=True, text=True, check=True)
        stop.set()
        prober.join()
        result = parse_wrk(wrk.stdout)
        result.update(usage_idle_p50_ms=percentile(idle, 50), usage_idle_p99_ms=percentile(idle, 99),
                      usage_loaded_p50_ms=percentile(probe, 50), usage_loaded_p99_ms=percentile(probe, 99))
        return result
    finally:
        server.stop()


def probe_for(url: str, key: str, seconds: float) -> list[float]:
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    return probe_usage(url, key, stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20, help="length of each server load run")
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    settings = Settings()
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()  # random init: the same speed as trained weights
    weights = tmp / "resnet18.pth"
    torch.save(resnet.state_dict(), weights)
    models = {"efficientnet_lite0": ({"MODEL_NAME": "efficientnet_lite0"}, load_efficientnet_lite0(None).network),
              "resnet18": ({"MODEL_NAME": "resnet18", "MODEL_WEIGHTS": str(weights)}, resnet)}

    jpeg = io.BytesIO()
    photo("chelsea.png").convert("RGB").save(jpeg, "JPEG", quality=90)
    body = tmp / "body.json"
    body.write_text(json.dumps({"image": base64.b64encode(jpeg.getvalue()).decode()}))

    rows = []
    for name, (env, network) in models.items():
        raw = raw_images_per_second(network, seconds=5)
        served = serve_and_load(tmp / name, env, body, args.seconds, args.connections)
        rows.append({"model": name, "raw_torch_batch1_images_per_s": raw, **served,
                     "server_over_raw": served["requests_per_s"] / raw})

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "other"
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu, "isa": isa,
              "cores": os.cpu_count(), "model_workers": settings.model_workers,
              "torch_threads": settings.threads_per_worker, "connections": args.connections,
              "seconds": args.seconds, "rows": rows}
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "latest.json").write_text(json.dumps(report, indent=2))

    print(f"\n{report['date']}  {cpu} ({isa}), {report['cores']} cores; server: {settings.model_workers} model workers "
          f"x {settings.threads_per_worker} torch threads; wrk {args.connections} connections, {args.seconds} s, "
          "451x300 JPEG as base64")
    print("| model | raw torch b1 (img/s) | server (req/s) | p50 ms | p99 ms | errors | server / raw "
          "| /v1/usage p50 / p99 ms, idle | ... under load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['raw_torch_batch1_images_per_s']:.1f} | {r['requests_per_s']:.1f} | "
              f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | {r['server_over_raw']:.2f} | "
              f"{r['usage_idle_p50_ms']:.1f} / {r['usage_idle_p99_ms']:.1f} | "
              f"{r['usage_loaded_p50_ms']:.1f} / {r['usage_loaded_p99_ms']:.1f} |")


if __name__ == "__main__":
    main()
