"""A start that finds its graph in MODEL_CACHE_DIR serves it without importing torch, and answers exactly as the
start that exported it: the offline fallback (what `make run` serves), a fine-tuned ResNet-18 with its labels,
an ONNX file, and int8 quantized from a cached fp32 graph."""

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper

from conftest import CAT_LABELS, Server, b64, make_key, photo_path

NO_DOWNLOAD = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}  # refused at once
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")


def torch_state(server: Server) -> str:
    """What the last start-up line says of torch ("loaded" or "not loaded"), checked against the process's
    memory map: libtorch is mapped once torch is imported."""
    said = re.findall(r"ready: .* \(torch (loaded|not loaded)\)", server.log())[-1]
    assert server.process is not None
    is_mapped = "libtorch" in Path(f"/proc/{server.process.pid}/maps").read_text()
    assert is_mapped == (said == "loaded"), said
    return said


def answers(server: Server) -> dict:
    """/v1/models, and each photo's classification and embedding, without the answers' ids."""
    with server.client(make_key(server.database_url)) as client:
        found = {"models": client.get("/v1/models").json()}
        for name in PHOTOS:
            image = b64(photo_path(name).read_bytes())
            classified = client.post("/v1/classify", json={"image": image, "top_k": 3}).json()
            embedded = client.post("/v1/embeddings", json={"image": image})
            found[name] = {key: value for key, value in classified.items() if key != "id"}
            is_embedded = embedded.status_code == 200
            found[f"{name} embedding"] = embedded.json()["data"][0]["embedding"] if is_embedded else None
    return found


def assert_same(exported: dict, cached: dict) -> None:
    assert exported["models"] == cached["models"]
    for name in PHOTOS:
        assert [p["label"] for p in exported[name]["predictions"]] == [p["label"] for p in cached[name]["predictions"]]
        assert np.allclose([p["confidence"] for p in exported[name]["predictions"]],
                           [p["confidence"] for p in cached[name]["predictions"]], atol=1e-6)
        assert exported[name]["model_version"] == cached[name]["model_version"]
        if exported[f"{name} embedding"] is not None:
            assert np.allclose(exported[f"{name} embedding"], cached[f"{name} embedding"], atol=1e-6)


def tiny_onnx(path: Path) -> Path:
    """An ONNX classifier of four classes: the picture's mean colour (its embedding, (B, 3)) times a matrix."""
    weights = numpy_helper.from_array(np.array([[4, -4, 0, 1], [-4, 4, 0, 1], [0, 0, 4, 1]], np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"]),
             helper.make_node("MatMul", ["features", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["batch", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4]),
                               helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3])],
                              [weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def model_env(case: str, tmp_path: Path) -> dict[str, str]:
    if case == "the offline fallback":
        return {"MODEL_NAME": "resnet18", "TORCH_HOME": str(tmp_path / "no-weights"), **NO_DOWNLOAD}
    if case == "a fine-tuned resnet18":
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "three.pth")
        (tmp_path / "three.txt").write_text("cat\nespresso\nrocket\n")
        return {"MODEL_NAME": "resnet18", "MODEL_WEIGHTS": str(tmp_path / "three.pth"),
                "MODEL_LABELS": str(tmp_path / "three.txt"), "MODEL_VERSION": "three-v1"}
    (tmp_path / "four.txt").write_text("red\ngreen\nblue\ngrey\n")
    return {"MODEL_NAME": "", "MODEL_ONNX": str(tiny_onnx(tmp_path / "tiny.onnx")),
            "MODEL_LABELS": str(tmp_path / "four.txt"),
            "MODEL_EMBEDDING_OUTPUT": "features", "MODEL_RESIZE": "240"}


@pytest.mark.parametrize("case", ["the offline fallback", "a fine-tuned resnet18", "an onnx file"])
def test_a_cached_graph_is_served_without_torch_and_answers_as_the_export_did(start_server, tmp_path, case):
    env = {"MODEL_CACHE_DIR": str(tmp_path / "cache"), **model_env(case, tmp_path)}
    server = start_server(env)
    assert torch_state(server) == "loaded"  # it exported the graph
    exported = answers(server)
    server.stop()
    server.start()
    assert torch_state(server) == "not loaded"
    assert_same(exported, answers(server))
    assert server.peak_rss_mb() < 400  # torch and torchvision alone are 615 MB; the export's start held a GB
    if case == "the offline fallback":  # the banner and the reason, as when torch tried the download
        assert server.log().count("FALLING BACK to EfficientNet-Lite0") == 2
        assert "resnet18 weights unavailable" in exported["models"]["data"][0]["fallback_reason"]


def test_int8_is_quantized_from_the_cached_graph_without_torch(start_server, tmp_path):
    cache = str(tmp_path / "cache")
    fp32 = start_server({"MODEL_CACHE_DIR": cache})
    fp32.stop()
    server = start_server({"MODEL_CACHE_DIR": cache, "INFERENCE_PRECISION": "int8"})
    assert "quantizing efficientnet_lite0 to int8" in server.log()
    assert torch_state(server) == "not loaded"
    with server.client(make_key(server.database_url)) as client:
        assert client.get("/v1/models").json()["data"][0]["precision"] == "int8"
        cat = client.post("/v1/classify", json={"image": b64(photo_path("chelsea.png").read_bytes())}).json()
    assert cat["predictions"][0]["label"] in CAT_LABELS


def test_a_cached_graph_onnx_runtime_cannot_load_is_made_again(start_server, tmp_path):
    cache = tmp_path / "cache"
    server = start_server({"MODEL_CACHE_DIR": str(cache)})
    server.stop()
    [graph] = cache.glob("*-fp32.onnx")
    graph.write_bytes(b"not a graph")
    server.start()
    assert "cannot serve the cached graph" in server.log()
    assert server.log().count("exporting efficientnet_lite0 to ONNX") == 2
    with server.client(make_key(server.database_url)) as client:
        cat = client.post("/v1/classify", json={"image": b64(photo_path("chelsea.png").read_bytes())}).json()
    assert cat["predictions"][0]["label"] in CAT_LABELS
