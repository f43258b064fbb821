"""Your own model: a fine-tuned ResNet-18 with its labels, a torchvision MobileNet, ONNX files from elsewhere
(one of them a classifier really fine-tuned here), versions, and /v1/embeddings, through real servers.

Every answer is compared with the same network run by torch in this process on torchvision's own
preprocessing (tests/own_models.py): same top-1, probabilities within 0.01, embeddings equal up to length.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from torch import nn
from torchvision.models import MobileNet_V3_Small_Weights

from client import Client
from conftest import ROOT, Server, assert_error, b64, encode, key_id, log_rows, make_key, photo, server_env
from own_models import (IMAGENET_MEAN, IMAGENET_STD, LITE0_PREPROCESS, PHOTOS, Reference, WithSoftmax, export_onnx,
                        fine_tune, held_out_crops, random_classifier, transform)
from servers import free_port

PROBABILITY_TOLERANCE = 0.01


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def labelled_version(path: Path, labels: list[str]) -> str:
    """The default version with MODEL_LABELS, as the README gives it: the weights file's SHA-256 and the labels."""
    return hashlib.sha256(json.dumps([hashlib.sha256(path.read_bytes()).hexdigest(), labels]).encode()).hexdigest()[:12]


RESNET18_LABELS = ["chat tigré 🐈", "espresso <b>doppio</b>", "Saturn V"]


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("own-models")


def post_images(server: Server, path: str, images: list[Image.Image], **options: object) -> dict:
    with server.client(make_key(server.database_url)) as client:
        response = client.post(path, json={"images": [b64(encode(image, "PNG")) for image in images], **options})
    assert response.status_code == 200, response.text
    return response.json()


def assert_agrees(result: dict, expected: np.ndarray, labels: list[str]) -> None:
    """The server's answer is torch's: the same top class, each class's probability within tolerance, each
    label the one of its index."""
    top = int(np.argmax(expected))
    assert result["predictions"][0]["class_id"] == top
    for prediction in result["predictions"]:
        assert prediction["label"] == labels[prediction["class_id"]]
        difference = abs(prediction["confidence"] - expected[prediction["class_id"]])
        assert difference < PROBABILITY_TOLERANCE, (prediction, expected[top])


# A fine-tuned ResNet-18: three classes, its labels as TorchServe's index_to_name.json.

@pytest.fixture(scope="module")
def resnet18(files: Path) -> tuple[nn.Module, Path, Path]:
    network = random_classifier("resnet18", 3, seed=0)
    torch.save(network.state_dict(), files / "resnet18-3.pth")
    labels = {"0": ["n00000001", "chat tigré 🐈"], "1": "espresso <b>doppio</b>", "2": "Saturn V"}
    (files / "index_to_name.json").write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")
    return network, files / "resnet18-3.pth", files / "index_to_name.json"


@pytest.fixture(scope="module")
def resnet18_server(tmp_path_factory: pytest.TempPathFactory, resnet18) -> Iterator[Server]:
    """The one server several tests share; the others start their own (start_server) and stop it after."""
    _, weights, labels = resnet18
    tmp = tmp_path_factory.mktemp("resnet18-server")
    running = Server(tmp, {**server_env(tmp), "MODEL_NAME": "resnet18", "MODEL_WEIGHTS": str(weights),
                           "MODEL_LABELS": str(labels)}).start()
    yield running
    running.stop()


def test_a_fine_tuned_resnet18_answers_with_its_labels_and_version(resnet18_server, resnet18):
    network, weights, _ = resnet18
    labels = RESNET18_LABELS
    version = labelled_version(weights, labels)
    reference = Reference(network, network.fc, transform(256, 224, IMAGENET_MEAN, IMAGENET_STD))
    with resnet18_server.client(make_key(resnet18_server.database_url)) as client:
        [model] = client.get("/v1/models").json()["data"]
    assert model == {**model, "id": "resnet18", "version": version, "labels": 3, "label_names": labels,
                     "input_size": 224,
                     "embedding_dimensions": 512, "weights_source": "file", "max_batch": 8,
                     "preprocessing": {"resize": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                                       "interpolation": "bilinear"}}
    pictures = [photo(name) for name in PHOTOS.values()]
    answer = post_images(resnet18_server, "/v1/classify", pictures, top_k=3)
    assert answer["model"] == "resnet18" and answer["model_version"] == version
    for result, picture in zip(answer["results"], pictures):
        assert_agrees(result, reference.run(picture)[0], labels)
    rows = log_rows(resnet18_server.database_url, "endpoint = '/v1/classify'")
    assert rows and {row["model_version"] for row in rows} == {version}


def test_the_web_page_and_the_api_docs_do_not_call_its_labels_imagenets(resnet18_server):
    with resnet18_server.client() as client:
        page = client.get("/").text
        description = client.get("/openapi.json").json()["info"]["description"]
    assert "ImageNet" not in page and "most likely labels" in page
    assert description.startswith("Labels for your images from resnet18, 3 labels of its own"), description


def test_embeddings_are_the_unit_length_input_of_the_final_layer(resnet18_server, resnet18):
    network = resnet18[0]
    reference = Reference(network, network.fc, transform(256, 224, IMAGENET_MEAN, IMAGENET_STD))
    pictures = [photo(name) for name in PHOTOS.values()]
    answer = post_images(resnet18_server, "/v1/embeddings", pictures)
    assert {key: answer[key] for key in ("object", "model", "dimensions")} == {"object": "list", "model": "resnet18",
                                                                            "dimensions": 512}
    assert answer["id"].startswith("emb_") and answer["model_version"] == labelled_version(resnet18[1], RESNET18_LABELS)
    vectors = np.array([item["embedding"] for item in answer["data"]])
    assert [(item["object"], item["index"]) for item in answer["data"]] == [("embedding", i) for i in range(4)]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    for vector, picture in zip(vectors, pictures):
        assert np.allclose(vector, unit(reference.run(picture)[1]), atol=2e-3)
    encoded = post_images(resnet18_server, "/v1/embeddings", pictures, encoding_format="base64")
    decoded = np.array([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in encoded["data"]])
    assert np.array_equal(decoded, vectors.astype(np.float32))


def test_the_python_client_gets_the_same_embeddings(resnet18_server, files):
    paths = [files / f"{label}.png" for label in PHOTOS]
    for path, name in zip(paths, PHOTOS.values()):
        path.write_bytes(encode(photo(name), "PNG"))
    with Client(resnet18_server.url, make_key(resnet18_server.database_url)) as client:
        vectors = np.array(client.embeddings(*paths))
    answer = post_images(resnet18_server, "/v1/embeddings", [photo(name) for name in PHOTOS.values()])
    assert np.array_equal(vectors, np.array([item["embedding"] for item in answer["data"]]))


def test_embeddings_are_limited_logged_and_refused_like_classify(resnet18_server, resnet18):
    database_url = resnet18_server.database_url
    limited, other = make_key(database_url, rate_limit=3), make_key(database_url)
    cat = b64(encode(photo("chelsea.png"), "PNG"))
    with resnet18_server.client(limited) as client:
        two = client.post("/v1/embeddings", json={"images": [cat, cat]})  # each image counts one
        assert two.status_code == 200 and two.headers["X-RateLimit-Remaining"] == "1"
        uploaded = client.post("/v1/embeddings", files={"file": ("cat.png", base64.b64decode(cat))},
                               data={"encoding_format": "base64"})
        assert uploaded.status_code == 200 and isinstance(uploaded.json()["data"][0]["embedding"], str)
        assert_error(client.post("/v1/embeddings", json={"image": cat}), 429, "rate_limit_exceeded")
        assert_error(client.post("/v1/classify", json={"image": cat}), 429, "rate_limit_exceeded")
    with resnet18_server.client(other) as client:
        assert_error(client.post("/v1/embeddings", json={"image": cat, "top_k": 3}), 422)
        assert_error(client.post("/v1/embeddings", json={"image": cat, "encoding_format": "hex"}), 422)
        assert_error(client.post("/v1/embeddings", json={"image": "bm90IGFuIGltYWdl"}), 400, "not_an_image")
    rows = {key: log_rows(database_url, "key_id = :id", id=key_id(database_url, key)) for key in (limited, other)}
    assert [(row["endpoint"], row["status_code"]) for row in rows[limited]] == [
        ("/v1/embeddings", 200), ("/v1/embeddings", 200), ("/v1/embeddings", 429), ("/v1/classify", 429)]
    assert [row["status_code"] for row in rows[other]] == [422, 422, 400]
    assert {row["model_version"] for row in rows[limited] + rows[other]} == {labelled_version(resnet18[1],
                                                                                            RESNET18_LABELS)}


# A torchvision MobileNet, 1000 classes: ImageNet's labels without MODEL_LABELS; run by torch here.

@pytest.fixture(scope="module")
def mobilenet(files: Path) -> tuple[nn.Module, Path]:
    network = random_classifier("mobilenet_v3_small", 1000, seed=0)
    torch.save(network.state_dict(), files / "mobilenet_v3_small.pth")
    return network, files / "mobilenet_v3_small.pth"


def test_a_torchvision_mobilenet_gets_imagenet_labels_and_its_preprocessing(start_server, mobilenet):
    network, weights = mobilenet
    server = start_server({"MODEL_NAME": "mobilenet_v3_small", "MODEL_WEIGHTS": str(weights), "INFERENCE_BACKEND": "torch"})
    reference = Reference(network, network.classifier[3], transform(256, 224, IMAGENET_MEAN, IMAGENET_STD))
    imagenet = MobileNet_V3_Small_Weights.DEFAULT.meta["categories"]
    pictures = [photo(name) for name in PHOTOS.values()]
    classified = post_images(server, "/v1/classify", pictures)
    embedded = post_images(server, "/v1/embeddings", pictures)
    assert classified["model"] == "mobilenet_v3_small" and embedded["dimensions"] == 1024
    for result, item, picture in zip(classified["results"], embedded["data"], pictures):
        probabilities, features = reference.run(picture)
        assert_agrees(result, probabilities, imagenet)
        assert np.allclose(item["embedding"], unit(features), atol=2e-3)


# ONNX files from elsewhere.

@pytest.fixture(scope="module")
def resnet18_onnx(files: Path, resnet18) -> Path:
    """The ResNet-18 at 200x200 with a batch axis fixed to 1, as many exporters leave it."""
    return export_onnx(resnet18[0], files / "resnet18-fixed.onnx", 200, ["logits"], dynamic_batch=False)


def test_an_onnx_file_with_a_fixed_batch_is_served_one_image_at_a_time(start_server, files, resnet18, resnet18_onnx):
    (files / "labels.txt").write_text("cat\nespresso\nrocket\n")
    server = start_server({"MODEL_NAME": "", "MODEL_ONNX": str(resnet18_onnx),
                           "MODEL_LABELS": str(files / "labels.txt"),
                    "MODEL_RESIZE": "230", "MODEL_CROP": "200"})
    assert "batch axis fixed to 1" in server.log()
    reference = Reference(resnet18[0], resnet18[0].fc, transform(230, 200, IMAGENET_MEAN, IMAGENET_STD))
    with server.client(make_key(server.database_url)) as client:
        [model] = client.get("/v1/models").json()["data"]
        refused = client.post("/v1/embeddings", json={"image": b64(encode(photo("chelsea.png"), "PNG"))})
    assert model["id"] == "resnet18-fixed"
    assert model["version"] == labelled_version(resnet18_onnx, ["cat", "espresso", "rocket"])
    assert model["weights_source"] == "onnx file"
    assert (model["max_batch"], model["input_size"], model["embedding_dimensions"]) == (1, 200, None)
    assert "MODEL_EMBEDDING_OUTPUT" in assert_error(refused, 400, "embeddings_unavailable")["message"]
    pictures = [photo(name) for name in PHOTOS.values()]
    answer = post_images(server, "/v1/classify", pictures)
    for result, picture in zip(answer["results"], pictures):
        assert result["batch_size"] == 1
        assert_agrees(result, reference.run(picture)[0], ["cat", "espresso", "rocket"])


def test_an_onnx_file_that_gives_probabilities(start_server, files, mobilenet):
    network = mobilenet[0]
    path = export_onnx(WithSoftmax(network), files / "mobilenet.onnx", 224, ["probabilities"], dynamic_batch=True)
    server = start_server({"MODEL_NAME": "", "MODEL_ONNX": str(path), "MODEL_OUTPUT": "probabilities"})
    reference = Reference(network, network.classifier[3], transform(256, 224, IMAGENET_MEAN, IMAGENET_STD))
    imagenet = MobileNet_V3_Small_Weights.DEFAULT.meta["categories"]
    pictures = [photo(name) for name in PHOTOS.values()]
    for result, picture in zip(post_images(server, "/v1/classify", pictures)["results"], pictures):
        assert_agrees(result, reference.run(picture)[0], imagenet)


# A classifier fine-tuned here: EfficientNet-Lite0's features and a linear head for four photos.

@pytest.fixture(scope="module")
def fine_tuned(files: Path) -> tuple[nn.Module, Path, Path]:
    model, labels = fine_tune()
    path = export_onnx(model, files / "four-photos.onnx", 224, ["logits", "features"], dynamic_batch=True)
    (files / "four-labels.json").write_text(json.dumps(labels))
    return model, path, files / "four-labels.json"


def fine_tuned_env(fine_tuned: tuple[nn.Module, Path, Path], **extra: str) -> dict[str, str]:
    return {"MODEL_NAME": "", "MODEL_ONNX": str(fine_tuned[1]), "MODEL_LABELS": str(fine_tuned[2]),
            "MODEL_EMBEDDING_OUTPUT": "features",
            "MODEL_MEAN": "0.5,0.5,0.5", "MODEL_STD": "0.5, 0.5, 0.5", "MODEL_INTERPOLATION": "bicubic", **extra}


def test_a_fine_tuned_onnx_classifier_labels_crops_it_never_saw(start_server, fine_tuned):
    model = fine_tuned[0]
    server = start_server(fine_tuned_env(fine_tuned, MODEL_VERSION="four-photos-v1"))
    reference = Reference(model, model.head, LITE0_PREPROCESS)
    crops = held_out_crops()
    classified = post_images(server, "/v1/classify", [crop for _, crop in crops], top_k=4)
    embedded = post_images(server, "/v1/embeddings", [crop for _, crop in crops])
    assert classified["model_version"] == embedded["model_version"] == "four-photos-v1"
    assert embedded["dimensions"] == 1280
    for (label, crop), result, item in zip(crops, classified["results"], embedded["data"]):
        assert result["predictions"][0]["label"] == label
        probabilities, features = reference.run(crop)
        assert_agrees(result, probabilities, list(PHOTOS))
        assert np.allclose(item["embedding"], unit(features), atol=2e-3)
    vectors = np.array([item["embedding"] for item in embedded["data"]])
    similarity = vectors @ vectors.T  # two crops of each photo, in order: near-duplicates are each other's nearest
    np.fill_diagonal(similarity, -1)
    assert list(similarity.argmax(axis=1) // 2) == [index // 2 for index in range(len(crops))]


def test_int8_serves_the_onnx_classifier_too(start_server, fine_tuned):
    server = start_server(fine_tuned_env(fine_tuned, INFERENCE_PRECISION="int8"))
    crops = held_out_crops()
    with server.client(make_key(server.database_url)) as client:
        assert client.get("/v1/models").json()["data"][0]["precision"] == "int8"
    answer = post_images(server, "/v1/classify", [crop for _, crop in crops])
    assert [result["predictions"][0]["label"] for result in answer["results"]] == [label for label, _ in crops]


# Start-up refuses what it cannot serve: one line naming the setting, no traceback.

def onnx_file(path: Path, input_shape: list[object], output_shape: list[object]) -> Path:
    """A tiny graph of the given shapes: its input averaged over the last axes."""
    axes = list(range(len(output_shape), len(input_shape)))
    node = helper.make_node("ReduceMean", ["input"], ["scores"], axes=axes, keepdims=0)
    graph = helper.make_graph([node], "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, output_shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.mark.parametrize("case", ["labels count", "onnx input rank", "onnx output shape", "weights misfit",
                                  "unknown architecture"])
def test_start_up_refuses_with_one_line_naming_the_setting(case, files, resnet18, mobilenet, tmp_path):
    (files / "four.txt").write_text("a\nb\nc\nd\n")
    env, words = {
        "labels count": ({"MODEL_WEIGHTS": str(resnet18[1]), "MODEL_LABELS": str(files / "four.txt")},
                         ["MODEL_LABELS=", "4 labels", "3 classes"]),
        "onnx input rank": ({"MODEL_NAME": "", "MODEL_ONNX": str(onnx_file(tmp_path / "rank.onnx", ["batch", 224, 224],
                                                                                   ["batch", 3]))},
                            ["MODEL_ONNX=", "(batch, 224, 224)", "(B, 3, H, W)"]),
        "onnx output shape": ({"MODEL_NAME": "", "MODEL_ONNX": str(onnx_file(tmp_path / "out.onnx",
                                                                             ["batch", 3, 224, 224], ["batch", 3, 224]))},
                              ["MODEL_ONNX=", "(batch, 3, 224)", "(B, N)"]),
        "weights misfit": ({"MODEL_WEIGHTS": str(mobilenet[1])}, ["MODEL_WEIGHTS=", "resnet18", "missing"]),
        "unknown architecture": ({"MODEL_NAME": "resnet19"}, ["MODEL_NAME=resnet19", "resnet18, resnet34"]),
    }[case]
    done = subprocess.run([sys.executable, "-m", "uvicorn", "main:app", "--port", str(free_port())], cwd=ROOT,
                          env={**os.environ, **server_env(tmp_path), "MODEL_NAME": "resnet18", **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and all(word in lines[0] for word in words), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
