"""Benchmark: the raw model and the whole server, measured in one run on one machine, with ResNet-18.

    $ make bench                      # or: .venv/bin/python bench/bench.py --seconds 20

1. raw torch eager, batch 1 and 8 (images/s), on all cores;
2. raw ONNX Runtime fp32, batch 1 and 8, and int8 batch 1: the graphs the server runs, exported the same way;
   1 and 2 for MobileNetV3-Small too (MODEL_NAME=mobilenet_v3_small), the small box's model;
3. the server end to end (auth, limit, log, decode, batching, model) with `wrk`: 8 connections posting skimage's
   chelsea.png as a 451x300 JPEG in base64 for --seconds, while a probe reads /v1/usage every 50 ms; then 32
   connections (4x overload); then 8 connections on the int8 graph;
4. ratios inside this run (server / raw ORT fp32 batch 1, server / raw torch), which mean something across
   machines where absolute figures do not; and where each request's time went, from its Server-Timing header.

ResNet-18 and MobileNetV3-Small have random weights here (ResNet-18's saved to a file for the server): the speed is
the same as trained weights'.
Needs `wrk` (Debian: apt-get install wrk). Prints tables and writes the same to bench/results/latest.json.
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
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import torch
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from backends import Backend, OnnxBackend, onnx_file, photo_inputs  # noqa: E402
from conftest import Server, make_key, photo  # noqa: E402  (the tests' real-server harness)
from images import decode_base64  # noqa: E402
from inference import LoadedModel, preprocess  # noqa: E402
from networks import TorchBackend, from_network, load_efficientnet_lite0, torchvision_spec  # noqa: E402
from schemas import ClassifyRequest  # noqa: E402
from settings import Settings, usable_cores  # noqa: E402

STAGES = ("auth", "parse", "limit", "decode", "queue", "model", "log")


def images_per_second(backend: Backend, batch: int, seconds: float) -> float:
    x = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)  # (B, 224, 224, 3)
    for _ in range(3):
        backend.run(x)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        backend.run(x)
        done += batch
    return done / (time.perf_counter() - started)


def raw_figures(model: LoadedModel, threads: int, seconds: float, cache_dir: Path) -> dict[str, float]:
    """images/s of the model alone: torch eager and ONNX Runtime fp32 at batch 1 and 8, int8 at batch 1."""
    figures = {"torch_b1": images_per_second(TorchBackend(model, threads), 1, seconds),
               "torch_b8": images_per_second(TorchBackend(model, threads), 8, seconds)}
    fp32 = OnnxBackend(onnx_file(model, "fp32", cache_dir), "fp32", threads)
    int8 = OnnxBackend(onnx_file(model, "int8", cache_dir), "int8", threads)
    return {**figures, "ort_fp32_b1": images_per_second(fp32, 1, seconds),
            "ort_fp32_b8": images_per_second(fp32, 8, seconds), "ort_int8_b1": images_per_second(int8, 1, seconds)}


def request_path_ms(body: bytes, model: LoadedModel, repeats: int = 200) -> dict[str, float]:
    """Each step a request's image goes through, timed alone in this process (ms, mean of `repeats`). Decode and
    resize are split here as decode_for_model does them (draft, load, then one box resize)."""
    spec = model.spec
    text = ClassifyRequest.model_validate_json(body).image
    data = decode_base64(text)

    def decode() -> Image.Image:
        image = Image.open(io.BytesIO(data))
        scale = spec.resize / min(image.size)
        image.draft(None, (int(image.width * scale), int(image.height * scale)))
        image.load()
        return image

    decoded = decode()
    side = spec.crop * min(decoded.size) / spec.resize
    left, top = (decoded.width - side) / 2, (decoded.height - side) / 2
    crop = decoded.resize((spec.crop, spec.crop), spec.interpolation, box=(left, top, left + side, top + side))
    mean, std = np.array(spec.mean, dtype=np.float32), np.array(spec.std, dtype=np.float32)
    steps = {
        "json": lambda: ClassifyRequest.model_validate_json(body),
        "base64": lambda: decode_base64(text),
        "decode": decode,
        "resize": lambda: decoded.resize((spec.crop, spec.crop), spec.interpolation,
                                         box=(left, top, left + side, top + side)),
        "to uint8 (what the server does)": lambda: preprocess(crop),
        "float normalise (what it no longer does)": lambda: ((np.asarray(crop, dtype=np.float32) / 255 - mean) / std
                                                             ).transpose(2, 0, 1).copy(),
    }
    timings = {}
    for name, step in steps.items():
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        timings[name] = (time.perf_counter() - started) / repeats * 1000
    return timings


def int8_agreement(cache_dir: Path, threads: int) -> dict[str, float]:
    """int8 against fp32 on the 21 photos as served, with EfficientNet-Lite0's real ImageNet weights (ResNet-18's
    are not to be had here, and random weights agree on nothing): top-1 labels equal, and the top-5 sets' overlap.
    The odd-numbered photos were never seen by the calibration; they are reported on their own too."""
    model = load_efficientnet_lite0(fallback_reason=None)
    x = np.stack(photo_inputs(model.spec))  # (21, 224, 224, 3)
    fp32 = OnnxBackend(onnx_file(model, "fp32", cache_dir), "fp32", threads).run(x).probabilities
    int8 = OnnxBackend(onnx_file(model, "int8", cache_dir), "int8", threads).run(x).probabilities
    top1 = fp32.argmax(1) == int8.argmax(1)
    top5 = np.array([len(set(np.argsort(a)[-5:]) & set(np.argsort(b)[-5:])) / 5 for a, b in zip(fp32, int8)])
    return {"photos": len(x), "top1_agree": int(top1.sum()), "top5_overlap": float(top5.mean()),
            "held_out_photos": len(x[1::2]), "held_out_top1_agree": int(top1[1::2].sum()),
            "held_out_top5_overlap": float(top5[1::2].mean())}


def parse_wrk(output: str) -> dict[str, float]:
    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    percentiles = dict(re.findall(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+(?:us|ms|s))\s*$", output, re.MULTILINE))
    if set(percentiles) != {"50", "99"}:
        raise RuntimeError(f"cannot read wrk's latency percentiles from:\n{output}")
    socket_errors = re.search(r"Socket errors: (.*)", output)
    return {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1]),
            "p50_ms": ms(percentiles["50"]), "p99_ms": ms(percentiles["99"]),
            "socket_errors": socket_errors[1] if socket_errors else ""}


def read_stages(path: Path, seconds: float) -> dict:
    """The Lua script's sums -> answers by status, goodput, and mean ms per 200 for each stage."""
    totals: dict[str, float] = defaultdict(float)
    statuses: dict[str, int] = defaultdict(int)
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[0] == "status":
            statuses[parts[1]] += int(parts[2])
        else:
            totals[parts[0]] += float(parts[1])
    timed = totals.pop("timed", 0) or 1
    ok = statuses.get("200", 0)
    return {"statuses": dict(statuses), "errors": sum(statuses.values()) - ok, "goodput_per_s": ok / seconds,
            "stages_ms": {stage: totals.get(stage, 0.0) / timed for stage in STAGES}}


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


def load(server: Server, key: str, body: Path, seconds: int, connections: int) -> dict:
    """wrk against /v1/classify, with the /v1/usage probe running alongside."""
    stages = server.tmp / f"stages-{connections}.txt"
    stop = threading.Event()
    probe: list[float] = []
    prober = threading.Thread(target=lambda: probe.extend(probe_usage(server.url, key, stop)))
    prober.start()
    wrk = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "--latency",
                          "-s", str(ROOT / "bench" / "classify.lua"), f"{server.url}/v1/classify"],
                         env={**os.environ, "BENCH_BODY": str(body), "BENCH_KEY": key, "BENCH_STAGES": str(stages)},
                         capture_output=True, text=True, check=True)
    stop.set()
    prober.join()
    return {"connections": connections, **parse_wrk(wrk.stdout), **read_stages(stages, seconds),
            "usage_p50_ms": percentile(probe, 50), "usage_p99_ms": percentile(probe, 99)}


def serve(tmp: Path, env: dict[str, str], body: Path, seconds: int, connection_counts: list[int]) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    server = Server(tmp, {"DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}", "LOG_LEVEL": "WARNING",
                          "MODEL_CACHE_DIR": str(tmp.parent / "models"), **env}).start()
    try:
        key = make_key(server.database_url, rate_limit=10**9)
        return [load(server, key, body, seconds, connections) for connections in connection_counts]
    finally:
        server.stop()


def machine() -> dict[str, str | int]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor())
    isa = "AVX-512 VNNI" if "avx512_vnni" in cpuinfo else "AVX2" if "avx2" in cpuinfo else "other"
    return {"cpu": cpu, "isa": isa, "cores": usable_cores()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20, help="length of each server load run")
    parser.add_argument("--raw-seconds", type=float, default=5, help="length of each raw model measurement")
    args = parser.parse_args()
    threads = Settings().inference_threads
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))

    torch.manual_seed(0)
    network = torchvision.models.resnet18(weights=None).eval()  # random init: the same speed as trained weights
    weights = tmp / "resnet18.pth"
    torch.save(network.state_dict(), weights)
    model = from_network(torchvision_spec("resnet18"), network, "file")

    raw = raw_figures(model, threads, args.raw_seconds, tmp / "models")
    torch.manual_seed(0)
    mobilenet = from_network(torchvision_spec("mobilenet_v3_small"),
                             torchvision.models.mobilenet_v3_small(weights=None), "file")
    raw_mobilenet = raw_figures(mobilenet, threads, args.raw_seconds, tmp / "models")
    agreement = int8_agreement(tmp / "models", threads)

    jpeg = io.BytesIO()
    photo("chelsea.png").convert("RGB").save(jpeg, "JPEG", quality=90)
    body = tmp / "body.json"
    body.write_text(json.dumps({"image": base64.b64encode(jpeg.getvalue()).decode()}))
    steps = request_path_ms(body.read_bytes(), model)
    env = {"MODEL_NAME": "resnet18", "MODEL_WEIGHTS": str(weights)}
    fp32_runs = serve(tmp / "fp32", env, body, args.seconds, [8, 32])
    int8_runs = serve(tmp / "int8", {**env, "INFERENCE_PRECISION": "int8"}, body, args.seconds, [8])
    runs = [{"server": "fp32", **run} for run in fp32_runs] + [{"server": "int8", **run} for run in int8_runs]
    capacity = fp32_runs[0]["goodput_per_s"]
    ratios = {"int8_over_fp32_raw_b1": raw["ort_int8_b1"] / raw["ort_fp32_b1"],
              "server_over_raw_ort_fp32_b1": capacity / raw["ort_fp32_b1"],
              "server_over_raw_torch_b1": capacity / raw["torch_b1"],
              "overload_goodput_over_capacity": fp32_runs[1]["goodput_per_s"] / capacity,
              "int8_server_over_raw_ort_int8_b1": int8_runs[0]["goodput_per_s"] / raw["ort_int8_b1"]}

    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **machine(),
              "inference_threads": threads, "seconds": args.seconds, "raw_images_per_s": raw,
              "raw_images_per_s_mobilenet_v3_small": raw_mobilenet, "server": runs,
              "request_path_steps_ms": steps, "int8_agreement": agreement, "ratios": ratios}
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "latest.json").write_text(json.dumps(report, indent=2))
    print_tables(report)


def print_tables(report: dict) -> None:
    raw = report["raw_images_per_s"]
    print(f"\n{report['date']}  {report['cpu']} ({report['isa']}), {report['cores']} cores, "
          f"{report['inference_threads']} inference threads; ResNet-18; wrk {report['seconds']} s per row, "
          "451x300 JPEG as base64\n")
    print("| raw model (images/s) | torch b1 | torch b8 | ORT fp32 b1 | ORT fp32 b8 | ORT int8 b1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, figures in (("ResNet-18", raw), ("MobileNetV3-Small", report["raw_images_per_s_mobilenet_v3_small"])):
        print(f"| {name} | {figures['torch_b1']:.1f} | {figures['torch_b8']:.1f} | {figures['ort_fp32_b1']:.1f} | "
              f"{figures['ort_fp32_b8']:.1f} | {figures['ort_int8_b1']:.1f} |")
    print()
    print("| server | clients | req/s | goodput (200/s) | p50 ms | p99 ms | non-200 | /v1/usage p50 / p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in report["server"]:
        print(f"| {run['server']} | {run['connections']} | {run['requests_per_s']:.1f} | {run['goodput_per_s']:.1f} | "
              f"{run['p50_ms']:.0f} | {run['p99_ms']:.0f} | {run['errors']} | "
              f"{run['usage_p50_ms']:.1f} / {run['usage_p99_ms']:.1f} |")
    print("\n| where a request's time went (ms, mean per 200) | clients | " + " | ".join(STAGES) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in STAGES) + " |")
    for run in report["server"]:
        print(f"| {run['server']} | {run['connections']} | "
              + " | ".join(f"{run['stages_ms'][stage]:.2f}" for stage in STAGES) + " |")
    print("\n| one image's steps, alone (ms) | " + " | ".join(report["request_path_steps_ms"]) + " |")
    print("| --- | " + " | ".join("---" for _ in report["request_path_steps_ms"]) + " |")
    print("| 451x300 JPEG | " + " | ".join(f"{ms:.3f}" for ms in report["request_path_steps_ms"].values()) + " |")
    agreement = report["int8_agreement"]
    print(f"\nint8 against fp32 (EfficientNet-Lite0, real weights): top-1 equal on {agreement['top1_agree']} of "
          f"{agreement['photos']} photos, top-5 overlap {agreement['top5_overlap']:.0%}; on the "
          f"{agreement['held_out_photos']} the calibration never saw: {agreement['held_out_top1_agree']} of "
          f"{agreement['held_out_photos']}, {agreement['held_out_top5_overlap']:.0%}")
    if any(run["errors"] for run in report["server"]):
        print("(rows with non-200 answers: wrk's p50/p99 include those answers too)")
    print("\n| ratio | value |\n| --- | --- |")
    for name, value in report["ratios"].items():
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
