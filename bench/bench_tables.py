"""bench.py's tables, from its report (bench/results/latest.json): `python bench/bench_tables.py` prints them
again."""

import json
import sys
from pathlib import Path

GROUPS = ("event loop", "decode", "database", "model", "other")


def table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def memory(row: dict) -> str:
    """RSS at start / after load, MB, of the (largest) serving process."""
    start = max(process["rss_mb"] for process in row["memory_at_start"])
    after = max(process["rss_mb"] for process in row["memory_after"])
    return f"{start:.0f} / {after:.0f}"


def cpu(row: dict, per: str = "cpu_ms_per_request") -> list[str]:
    return [f"{row[per][group]:.2f}" for group in GROUPS] + [f"{sum(row[per].values()):.2f}"]


def raw_b1(raw: dict) -> str:
    """The reference: the mean of batch 1 just before the server's load and just after (older reports: one)."""
    if "b1_before_per_s" not in raw:
        return f"{raw['b1_per_s']:.1f}"
    return f"{raw['b1_per_s']:.1f} ({raw['b1_before_per_s']:.0f}, {raw['b1_after_per_s']:.0f})"


def print_tables(report: dict) -> None:
    print(f"\n{report['date']}  {report['cpu']} ({report['isa']}), {report['cores']} cores, load average "
          f"{report['load_average']} at the end; {report['inference_threads']} inference threads; wrk "
          f"{report['seconds']:g} s a row, 8 connections, the 451x300 photo as a base64 JPEG\n")
    models = report["models"]
    table(["model", "raw ORT b1 (before, after) / b8 (img/s)", "raw b1, spinning", "raw b1, as served",
           "server (req/s)", "p50 / p99 ms", "server / raw b1", "/v1/usage p50 / p99 ms", "start s", "RSS start / after MB"],
          [[f"{row['model']} {row['precision']}", f"{raw_b1(row['raw'])} / {row['raw']['b8_per_s']:.1f}",
            f"{row['raw']['spinning_b1_per_s']:.1f}",
            f"{row['raw']['side_by_side_b1_per_s']:.1f} ({row['raw']['parallel_batches']} at once)",
            f"{row['requests_per_s']:.1f}",
            f"{row['p50_ms']:.0f} / {row['p99_ms']:.0f}", f"{row['requests_per_s'] / row['raw']['b1_per_s']:.2f}x",
            f"{row['usage_p50_ms']:.1f} / {row['usage_p99_ms']:.1f}", f"{row['ready_s']:.2f}", memory(row)]
           for row in models])
    print("CPU per request by thread group (ms), and the model alone at the batch size the server formed:\n")
    table(["model", *GROUPS, "total", "request path", "mean batch", "raw model / image", "model inside / raw"],
          [[f"{row['model']} {row['precision']}", *cpu(row),
            f"{sum(row['cpu_ms_per_request'].values()) - row['cpu_ms_per_request']['model']:.2f}",
            f"{row['mean_batch']:.1f}", f"{row['raw']['served_batch_cpu_ms']:.2f} (b{row['raw']['served_batch']})",
            f"{row['cpu_ms_per_image']['model'] / row['raw']['served_batch_cpu_ms']:.2f}x"] for row in models])
    growing = next(row for row in models if "growing" in row)
    print("As the work grows (EfficientNet-Lite0 fp32), CPU per image by thread group (ms):\n")
    rows = [("451x300 photo, 1 key", growing)] + list(growing["growing"].items())
    table(["load", *GROUPS, "total", "req/s", "p99 ms", "/v1/usage p99 ms"],
          [[name, *cpu(row, "cpu_ms_per_image"), f"{row['requests_per_s']:.1f}", f"{row['p99_ms']:.0f}",
            f"{row['usage_p99_ms']:.1f}"] for name, row in rows])
    print("Worker layouts (EfficientNet-Lite0 fp32), on the first core or the first two (taskset):\n")
    table(["cores", "layout", "req/s", "p50 / p99 ms", "CPU per request ms", "/v1/usage p99 ms", "RSS per worker MB"],
          [[str(row["cores"]), row["layout"], f"{row['requests_per_s']:.1f}",
            f"{row['p50_ms']:.0f} / {row['p99_ms']:.0f}", f"{sum(row['cpu_ms_per_request'].values()):.2f}",
            f"{row['usage_p99_ms']:.1f}", " / ".join(f"{p['rss_mb']:.0f}" for p in row["memory_after"])]
           for row in report["layouts"]])
    table(["raw model (images/s)", "torch b1", "torch b8", "ORT fp32 b1", "ORT fp32 b8", "ORT int8 b1"],
          [[name, *(f"{figures[key]:.1f}" for key in ("torch_b1", "torch_b8", "ort_fp32_b1", "ort_fp32_b8",
                                                       "ort_int8_b1"))]
           for name, figures in (("ResNet-18", report["raw_images_per_s"]),
                                 ("MobileNetV3-Small", report["raw_images_per_s_mobilenet_v3_small"]))])
    steps = report["request_path_steps_ms"]
    print("One image's request-path steps, alone (ms): " + ", ".join(f"{name} {ms:.3f}" for name, ms in steps.items()))
    agreement = report["int8_agreement"]
    print(f"int8 against fp32 (EfficientNet-Lite0, real weights): top-1 equal on {agreement['top1_agree']} of "
          f"{agreement['photos']} photos, top-5 overlap {agreement['top5_overlap']:.0%}; on the "
          f"{agreement['held_out_photos']} the calibration never saw: {agreement['held_out_top1_agree']} of "
          f"{agreement['held_out_photos']}, {agreement['held_out_top5_overlap']:.0%}")
    named = [(f"{row['model']} {row['precision']}", row) for row in models]
    named += [(f"{name}", row) for name, row in growing["growing"].items()]
    named += [(f"{row['layout']} on {row['cores']} cores", row) for row in report["layouts"]]
    for name, row in named:
        if set(row["statuses"]) != {"200"}:
            print(f"(answers other than 200 in {name}: {row['statuses']})")
    print(f"The whole run took {report['took_s'] / 60:.1f} minutes.")


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "latest.json"
    print_tables(json.loads(path.read_text()))
