"""Benchmark: every model we ship, raw and served, measured in one run on one machine.

    $ make bench                      # or: .venv/bin/python bench/bench.py --seconds 20

1. For ResNet-18 (random weights, saved to a file: the speed of trained ones) and EfficientNet-Lite0 (its real
   weights), fp32 and int8, as set by default (a pass per thread at once) and with PARALLEL_BATCHES=1: one
   server process (`uvicorn main:app`) started on its cached graph (start-up time, memory at start and after
   load), `wrk` with 8 connections posting skimage's chelsea.png as a 451x300 JPEG in base64 for --seconds
   while a probe reads /v1/usage every 50 ms; CPU per
   request by thread group from /proc (server_load.py); then the server's own cached graph alone (ONNX Runtime,
   uint8 input, the server idle): images/s one pass at a time on all the server's threads at batch 1, just
   before the load and again just after (the reference: their mean), and at batch 8; at batch 1 as the server
   runs it (PARALLEL_BATCHES passes side by side, one thread each); CPU per image at the batch size the server
   formed, as it runs it; and batch 1 with ONNX Runtime's defaults, which spin.
2. Cost as the work grows, on EfficientNet-Lite0 fp32, each as CPU per image: 1,000 keys instead of 1, 16
   images per request, a 12 MP JPEG; and 8 Python (httpx) clients in the probe's process instead of wrk.
3. Worker layouts on 1 and 2 cores (`taskset`): one worker; two with all the cores each (INFERENCE_THREADS set
   to them: what `--workers 2` gave before WEB_CONCURRENCY); two with their share (WEB_CONCURRENCY=2, what
   `python main.py` starts on 2 cores); one running a batch at a time on both threads (PARALLEL_BATCHES=1).
4. Raw torch eager and ONNX Runtime for ResNet-18 and MobileNetV3-Small (random weights), int8's agreement with
   fp32 on real photos (EfficientNet-Lite0), and one image's request-path steps timed alone.

Graphs are cached in .cache/bench-models, so only the first run exports them. Needs `wrk` (Debian: apt-get
install wrk); py-spy (requirements-dev.txt) names the database's threads. Prints tables and writes the same to
bench/results/latest.json.
"""

import argparse
import base64
import io
import json
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import bench_tables  # noqa: E402
import server_load  # noqa: E402
from conftest import photo  # noqa: E402
from edge.schemas import ClassifyRequest  # noqa: E402
from engine.backends import onnx_file  # noqa: E402
from engine.graph_cache import find_cached  # noqa: E402
from engine.images import decode_base64  # noqa: E402
from engine.networks import TorchBackend, from_network, load_efficientnet_lite0, torchvision_spec  # noqa: E402
from engine.photos import photo_inputs  # noqa: E402
from engine.runtimes import Backend, OnnxBackend  # noqa: E402
from engine.weights import locate_weights  # noqa: E402
from inference import LoadedModel, preprocess  # noqa: E402
from settings import Precision, Settings, usable_cores  # noqa: E402

CACHE = ROOT / ".cache" / "bench-models"
CONNECTIONS = 8
WARM_UP_S = 2


def images_per_second(backend: Backend, batch: int, seconds: float, at_once: int = 1) -> tuple[float, float]:
    """images/s and process CPU ms per image of `backend` alone at `batch`, random pixels, run by `at_once`
    threads side by side (as the server runs PARALLEL_BATCHES)."""
    x = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)  # (B, 224, 224, 3)
    for _ in range(3):
        backend.run(x)
    done = [0] * at_once
    started, cpu_started = time.perf_counter(), time.process_time()

    def run(lane: int) -> None:
        while time.perf_counter() - started < seconds:
            backend.run(x)
            done[lane] += batch

    lanes = [threading.Thread(target=run, args=(lane,)) for lane in range(at_once)]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()
    return sum(done) / (time.perf_counter() - started), (time.process_time() - cpu_started) * 1000 / sum(done)


class SpinningBackend:
    """ONNX Runtime with its defaults (its pool spins), for comparison with the server's own session."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> object:
        return self.session.run(None, {self.input_name: x})


def settings_of(env: dict[str, str]) -> Settings:
    """The settings a server started with `env` reads."""
    return Settings(**{name.lower(): value for name, value in env.items()})


def server_graph(env: dict[str, str], precision: Precision) -> Path:
    """The graph a server started with `env` runs: found as it finds it."""
    settings = settings_of(env)
    found = find_cached(locate_weights(settings), settings)
    assert found is not None, "the server has not exported its graph"
    return found[1].graph(precision)


def reference_b1(env: dict[str, str], precision: Precision, threads: int, seconds: float) -> float:
    """The server's graph alone at batch 1, one pass at a time on every thread: images/s."""
    return images_per_second(OnnxBackend(server_graph(env, precision), precision, threads), 1, seconds)[0]


def raw_server_graph(env: dict[str, str], precision: Precision, threads: int, mean_batch: float,
                     seconds: float, b1_before: float) -> dict:
    """The server's graph alone: one pass at a time on every thread (the reference: what one would run), and
    as the server runs it, PARALLEL_BATCHES passes side by side (one thread each, when more than one).

    The reference is the mean of batch 1 measured just before the server's load (`b1_before`) and just after:
    on a shared machine the raw speed moves by a third between minutes, and the two bracket the server's."""
    path = server_graph(env, precision)
    backend = OnnxBackend(path, precision, threads)
    b1_after, b1_cpu = images_per_second(backend, 1, seconds)
    b1 = (b1_before + b1_after) / 2
    b8, b8_cpu = images_per_second(backend, 8, seconds)
    served = settings_of(env)
    at_once = served.parallel_batches
    if at_once == 1:  # served as the reference runs: the reference's mean, and the CPU of the run after
        as_served, side_by_side_b1, side_by_side_cpu = backend, b1, b1_cpu
    else:
        as_served = OnnxBackend(path, precision, served.threads_per_batch)
        side_by_side_b1, side_by_side_cpu = images_per_second(as_served, 1, seconds, at_once)
    served_batch = max(1, round(mean_batch))
    _, served_cpu = images_per_second(as_served, served_batch, seconds, at_once)
    spinning_b1, spinning_cpu = images_per_second(SpinningBackend(path, threads), 1, seconds)
    return {"graph": path.name, "b1_per_s": b1, "b1_before_per_s": b1_before, "b1_after_per_s": b1_after,
            "b8_per_s": b8, "b1_cpu_ms": b1_cpu, "b8_cpu_ms": b8_cpu,
            "parallel_batches": at_once, "side_by_side_b1_per_s": side_by_side_b1,
            "side_by_side_b1_cpu_ms": side_by_side_cpu, "served_batch": served_batch,
            "served_batch_cpu_ms": served_cpu, "spinning_b1_per_s": spinning_b1, "spinning_b1_cpu_ms": spinning_cpu}


@contextmanager
def serving(tmp: Path, env: dict[str, str], workers: int | None = 1, cpus: str | None = None) -> Iterator[tuple]:
    """A server on its own database with one key (in a file, as wrk reads it), stopped after the block."""
    tmp.mkdir(parents=True, exist_ok=True)
    running = server_load.start(tmp, env, workers, cpus)
    try:
        [key] = server_load.make_keys(running.database_url, 1)
        keys = tmp / "one.keys"
        keys.write_text(key + "\n")
        yield running, key, keys
    finally:
        server_load.stop(running)


def load_row(running: server_load.Running, key: str, keys: Path, body: Path, seconds: float,
             connections: int = CONNECTIONS, images_per_request: int = 1) -> dict:
    server_load.wrk(running.url, body, keys, WARM_UP_S, connections)
    return server_load.measure(running, key, lambda: server_load.wrk(running.url, body, keys, seconds, connections),
                               images_per_request)


def model_rows(tmp: Path, models: list[tuple[str, dict[str, str], Precision]], bodies: dict[str, Path],
               threads: int, args: argparse.Namespace) -> list[dict]:
    rows = []
    for index, (label, env, precision) in enumerate(models):
        env = {**env, "MODEL_CACHE_DIR": str(CACHE), "INFERENCE_PRECISION": precision}
        with serving(tmp / f"prepare-{index}", env):
            pass  # the first start exports (and quantizes) the graph; the measured one finds it cached
        with serving(tmp / f"model-{index}", env) as (running, key, keys):
            memory_at_start = [server_load.memory_mb(pid) for pid in running.pids]
            b1_before = reference_b1(env, precision, threads, args.raw_seconds)  # the server idle meanwhile
            row = {"model": label, "precision": precision, "ready_s": running.ready_s,
                   "memory_at_start": memory_at_start, **load_row(running, key, keys, bodies["photo"], args.seconds)}
            row["raw"] = raw_server_graph(env, precision, threads, row["mean_batch"], args.raw_seconds, b1_before)
            if label == "EfficientNet-Lite0" and precision == "fp32":
                row["growing"] = growing_work(tmp, running, key, keys, bodies, args.seconds)
        rows.append(row)
        print(f"  {label}: {row['requests_per_s']:.1f} requests/s, raw b1 {row['raw']['b1_per_s']:.1f} images/s",
              file=sys.stderr)
    return rows


def growing_work(tmp: Path, running: server_load.Running, key: str, keys: Path, bodies: dict[str, Path],
                 seconds: float) -> dict[str, dict]:
    thousand = tmp / "thousand.keys"
    thousand.write_text("\n".join(server_load.make_keys(running.database_url, 1000)) + "\n")
    body = bodies["photo"].read_bytes()
    return {
        "1,000 keys": load_row(running, key, thousand, bodies["photo"], seconds),
        # 4 connections of 16 images: the 64 images MAX_QUEUE holds
        "16 images per request": load_row(running, key, keys, bodies["sixteen"], seconds, 4, 16),
        "12 MP JPEG": load_row(running, key, keys, bodies["12mp"], seconds),
        "8 Python clients": server_load.measure(running, key, lambda: server_load.python_clients(
            running.url, key, body, seconds, CONNECTIONS)),
    }


def layout_rows(tmp: Path, body: Path, seconds: float) -> list[dict]:
    """EfficientNet-Lite0 fp32 under each layout, on the first core and on the first two."""
    env = {"MODEL_NAME": "efficientnet_lite0", "MODEL_CACHE_DIR": str(CACHE)}
    layouts = [("0", "one worker", 1, {}), ("0", "two workers", 2, {})]
    if usable_cores() >= 2:
        layouts += [("0,1", "one worker, two batches at once", 1, {}), ("0,1", "two workers, all the cores each", 2,
                                                                        {"INFERENCE_THREADS": "2"}),
                    ("0,1", "two workers, their share each (WEB_CONCURRENCY=2)", 2, {}),
                    ("0,1", "one worker, a batch at a time (PARALLEL_BATCHES=1)", 1, {"PARALLEL_BATCHES": "1"})]
    rows = []
    for index, (cpus, label, workers, extra) in enumerate(layouts):
        with serving(tmp / f"layout-{index}", {**env, **extra}, workers, cpus) as (running, key, keys):
            rows.append({"cores": len(cpus.split(",")), "layout": label, "workers": workers,
                         **load_row(running, key, keys, body, seconds)})
    return rows


def raw_figures(model: LoadedModel, threads: int, seconds: float) -> dict[str, float]:
    """images/s of a model built in memory: torch eager and ONNX Runtime fp32 at batch 1 and 8, int8 at batch 1."""
    fp32 = OnnxBackend(onnx_file(model, "fp32", CACHE), "fp32", threads)
    int8 = OnnxBackend(onnx_file(model, "int8", CACHE), "int8", threads)
    return {"torch_b1": images_per_second(TorchBackend(model, threads), 1, seconds)[0],
            "torch_b8": images_per_second(TorchBackend(model, threads), 8, seconds)[0],
            "ort_fp32_b1": images_per_second(fp32, 1, seconds)[0], "ort_fp32_b8": images_per_second(fp32, 8, seconds)[0],
            "ort_int8_b1": images_per_second(int8, 1, seconds)[0]}


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
    steps = {
        "json": lambda: ClassifyRequest.model_validate_json(body),
        "base64": lambda: decode_base64(text),
        "decode": decode,
        "resize": lambda: decoded.resize((spec.crop, spec.crop), spec.interpolation,
                                         box=(left, top, left + side, top + side)),
        "to uint8": lambda: preprocess(crop),
    }
    timings = {}
    for name, step in steps.items():
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        timings[name] = (time.perf_counter() - started) / repeats * 1000
    return timings


def int8_agreement(threads: int) -> dict[str, float]:
    """int8 against fp32 on the 21 photos as served, with EfficientNet-Lite0's real ImageNet weights (ResNet-18's
    are not to be had here, and random weights agree on nothing): top-1 labels equal, and the top-5 sets' overlap.
    The odd-numbered photos were never seen by the calibration; they are reported on their own too."""
    model = load_efficientnet_lite0(fallback_reason=None)
    x = np.stack(photo_inputs(model.spec))  # (21, 224, 224, 3)
    fp32 = OnnxBackend(onnx_file(model, "fp32", CACHE), "fp32", threads).run(x).probabilities
    int8 = OnnxBackend(onnx_file(model, "int8", CACHE), "int8", threads).run(x).probabilities
    top1 = fp32.argmax(1) == int8.argmax(1)
    top5 = np.array([len(set(np.argsort(a)[-5:]) & set(np.argsort(b)[-5:])) / 5 for a, b in zip(fp32, int8)])
    return {"photos": len(x), "top1_agree": int(top1.sum()), "top5_overlap": float(top5.mean()),
            "held_out_photos": len(x[1::2]), "held_out_top1_agree": int(top1[1::2].sum()),
            "held_out_top5_overlap": float(top5[1::2].mean())}


def bodies(tmp: Path) -> dict[str, Path]:
    """The request bodies: the 451x300 photo as a JPEG, 16 of it, and the photo at 12 MP (4000x3000)."""
    cat = photo("chelsea.png").convert("RGB")
    encoded = {}
    for name, image in (("photo", cat), ("12mp", cat.resize((4000, 3000), Image.Resampling.BICUBIC))):
        jpeg = io.BytesIO()
        image.save(jpeg, "JPEG", quality=90)
        encoded[name] = base64.b64encode(jpeg.getvalue()).decode()
    paths = {"photo": tmp / "photo.json", "sixteen": tmp / "sixteen.json", "12mp": tmp / "12mp.json"}
    paths["photo"].write_text(json.dumps({"image": encoded["photo"]}))
    paths["sixteen"].write_text(json.dumps({"images": [encoded["photo"]] * 16}))
    paths["12mp"].write_text(json.dumps({"image": encoded["12mp"]}))
    return paths


def machine() -> dict[str, str | int]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor())
    isa = "AVX-512 VNNI" if "avx512_vnni" in cpuinfo else "AVX2" if "avx2" in cpuinfo else "other"
    return {"cpu": cpu, "isa": isa, "cores": usable_cores(), "load_average": Path("/proc/loadavg").read_text()[:14]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20, help="length of each server load run")
    parser.add_argument("--raw-seconds", type=float, default=3, help="length of each raw model measurement")
    args = parser.parse_args()
    threads = Settings().inference_threads
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    torch.manual_seed(0)
    resnet18 = torchvision.models.resnet18(weights=None).eval()  # random init: the same speed as trained weights
    weights = CACHE / "resnet18-random.pth"
    if not weights.is_file():  # kept, so its graph stays cached between runs
        torch.save(resnet18.state_dict(), weights)
    resnet18_env = {"MODEL_NAME": "resnet18", "MODEL_WEIGHTS": str(weights)}
    lite0_env = {"MODEL_NAME": "efficientnet_lite0"}
    models: list[tuple[str, dict[str, str], Precision]] = [
        ("ResNet-18", resnet18_env, "fp32"), ("ResNet-18", resnet18_env, "int8"),
        ("EfficientNet-Lite0", lite0_env, "fp32"), ("EfficientNet-Lite0", lite0_env, "int8")]
    models += [(f"{label}, 1 at a time", {**env, "PARALLEL_BATCHES": "1"}, precision)  # a lone request's setting
               for label, env, precision in list(models)]
    request_bodies = bodies(tmp)
    rows = model_rows(tmp, models, request_bodies, threads, args)
    layouts = layout_rows(tmp, request_bodies["photo"], args.seconds)

    raw = raw_figures(from_network(torchvision_spec("resnet18"), resnet18, "file"), threads, args.raw_seconds)
    torch.manual_seed(0)
    mobilenet = from_network(torchvision_spec("mobilenet_v3_small"),
                             torchvision.models.mobilenet_v3_small(weights=None), "file")
    raw_mobilenet = raw_figures(mobilenet, threads, args.raw_seconds)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **machine(),
              "inference_threads": threads, "seconds": args.seconds, "models": rows, "layouts": layouts,
              "raw_images_per_s": raw, "raw_images_per_s_mobilenet_v3_small": raw_mobilenet,
              "request_path_steps_ms": request_path_ms(request_bodies["photo"].read_bytes(),
                                                       load_efficientnet_lite0(None)),
              "int8_agreement": int8_agreement(threads), "took_s": time.monotonic() - started}
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "latest.json").write_text(json.dumps(report, indent=2))
    bench_tables.print_tables(report)


if __name__ == "__main__":
    main()
