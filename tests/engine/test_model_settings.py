"""Every model setting a server accepts changes what it serves (the start refuses the others: test_startup_errors):
MODEL_WEIGHTS for EfficientNet-Lite0, the preprocessing settings for a torchvision network, MODEL_OUTPUT checked
on photos, what answers call the model (MODEL_ID, the folder of an exporter's `model.onnx`), a version that
follows the ONNX file's external data, the labels and int8, and int8 calibrated on your own images
(INT8_CALIBRATION_DIR). Through real servers; answers are checked against torch running the same network on
torchvision's own transforms (tests/own_models.py), and the ONNX graphs are tiny ones built here.
"""

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_own_model import assert_agrees, post_images, unit
from torch import nn
from torchvision.transforms import v2

from conftest import CAT_LABELS, MODEL_CACHE, Server, b64, make_key, photo, photo_path
from own_models import (IMAGENET_MEAN, IMAGENET_STD, LITE0_PREPROCESS, PHOTOS, Reference, fine_tune, held_out_crops,
                        random_classifier, transform)


def refusal(server: Server) -> str:
    """The one line a start that failed said why in."""
    assert server.wait_exit() != 0
    [line] = [line for line in server.log().splitlines() if "cannot start: " in line]
    return line.split("cannot start: ", 1)[1]


# MODEL_WEIGHTS for EfficientNet-Lite0: the backbone with ImageNet weights to be had offline, so the one to
# fine-tune. It was ignored: the server served ImageNet's 1000 classes, and a missing file started too.

@pytest.fixture(scope="module")
def lite0_fine_tune(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    """EfficientNet-Lite0 with a head trained on four photos, saved as its state_dict, and the labels."""
    model, labels = fine_tune()
    files = tmp_path_factory.mktemp("lite0-fine-tune")
    network = model.body
    network._fc = model.head  # the fine-tune as one network: what torch.save(model.state_dict(), ...) saves
    torch.save(network.state_dict(), files / "four-photos.pth")
    (files / "four-photos.txt").write_text("\n".join(labels) + "\n")
    return model, files / "four-photos.pth", files / "four-photos.txt"


def test_a_fine_tuned_efficientnet_lite0_is_served_from_model_weights(start_server, lite0_fine_tune):
    model, weights, labels = lite0_fine_tune
    server = start_server({"MODEL_NAME": "efficientnet_lite0", "MODEL_WEIGHTS": str(weights),
                           "MODEL_LABELS": str(labels)})
    with server.client(make_key(server.database_url)) as client:
        [info] = client.get("/v1/models").json()["data"]
    assert (info["id"], info["weights_source"], info["label_names"]) == ("efficientnet_lite0", "file", list(PHOTOS))
    reference = Reference(model, model.head, LITE0_PREPROCESS)
    crops = held_out_crops()
    classified = post_images(server, "/v1/classify", [crop for _, crop in crops], top_k=4)
    embedded = post_images(server, "/v1/embeddings", [crop for _, crop in crops])
    for (label, crop), result, item in zip(crops, classified["results"], embedded["data"]):
        assert result["predictions"][0]["label"] == label
        probabilities, features = reference.run(crop)
        assert_agrees(result, probabilities, list(PHOTOS))
        assert np.allclose(item["embedding"], unit(features), atol=2e-3)

    unlabelled = start_server({"MODEL_NAME": "efficientnet_lite0", "MODEL_WEIGHTS": str(weights)}, wait=False)
    assert refusal(unlabelled) == ("efficientnet_lite0 has 4 classes, not ImageNet's 1000: set MODEL_LABELS to a "
                                   "file of its 4 labels.")


# The preprocessing settings for MODEL_NAME: a network fine-tuned at another size or normalisation. They were
# ignored: it was fed torchvision's 256/224 ImageNet preprocessing.

def test_the_preprocessing_settings_are_a_torchvision_networks_training_transforms(start_server, tmp_path):
    """Each set of settings served as set, and not as the graph cached for other settings (the cache's key)."""
    network = random_classifier("resnet18", 3, seed=5)
    torch.save(network.state_dict(), tmp_path / "resnet18-3.pth")
    (tmp_path / "three.txt").write_text("cat\nespresso\nrocket\n")
    weights = {"MODEL_NAME": "resnet18", "MODEL_WEIGHTS": str(tmp_path / "resnet18-3.pth"),
               "MODEL_LABELS": str(tmp_path / "three.txt")}
    pictures = [photo(name) for name in PHOTOS.values()]
    for settings, preprocess, shown in [
        ({"MODEL_RESIZE": "180", "MODEL_CROP": "160", "MODEL_MEAN": "0.5,0.5,0.5", "MODEL_STD": "0.5,0.5,0.5",
          "MODEL_INTERPOLATION": "bicubic"}, transform(180, 160, [0.5] * 3, [0.5] * 3, v2.InterpolationMode.BICUBIC),
         {"resize": 180, "crop": 160, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}),
        ({"MODEL_RESIZE": "200", "MODEL_CROP": "192"}, transform(200, 192, IMAGENET_MEAN, IMAGENET_STD),
         {"resize": 200, "crop": 192, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"}),
    ]:
        server = start_server({**weights, **settings})
        with server.client(make_key(server.database_url)) as client:
            [info] = client.get("/v1/models").json()["data"]
        assert info["preprocessing"] == shown and info["input_size"] == shown["crop"]
        reference = Reference(network, network.fc, preprocess)
        for result, picture in zip(post_images(server, "/v1/classify", pictures, top_k=3)["results"], pictures):
            assert_agrees(result, reference.run(picture)[0], ["cat", "espresso", "rocket"])
        server.stop()


# MODEL_OUTPUT, checked on photos before the graph is served. Probabilities served as logits were softmaxed
# again (the cat at 0.576 where it was about 1); logits served as probabilities failed every answer with a 500.

def tiny_graph(path: Path, with_softmax: bool) -> Path:
    """Four classes from the picture's mean colour times a matrix: logits, or their softmax."""
    weights = numpy_helper.from_array(np.array([[4, -4, 0, 1], [-4, 4, 0, 1], [0, 0, 4, 1]], np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"]),
             helper.make_node("MatMul", ["features", "w"], ["logits" if not with_softmax else "scores"])]
    if with_softmax:
        nodes.append(helper.make_node("Softmax", ["scores"], ["logits"], axis=1))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["batch", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.mark.parametrize("output, with_softmax, words", [
    ("probabilities", False, ["MODEL_OUTPUT=probabilities, but MODEL_ONNX=", "gives no probabilities",
                              "set MODEL_OUTPUT=logits"]),
    (None, True, ["MODEL_OUTPUT=logits (the default), but MODEL_ONNX=", "gives probabilities already",
                  "set MODEL_OUTPUT=probabilities"]),
])
def test_a_model_output_that_is_not_what_the_graph_gives_stops_the_start(start_server, tmp_path, output,
                                                                         with_softmax, words):
    (tmp_path / "four.txt").write_text("red\ngreen\nblue\ngrey\n")
    env = {"MODEL_NAME": "", "MODEL_ONNX": str(tiny_graph(tmp_path / "tiny.onnx", with_softmax)),
           "MODEL_LABELS": str(tmp_path / "four.txt"), **({"MODEL_OUTPUT": output} if output else {})}
    said = refusal(start_server(env, wait=False))
    assert all(word in said for word in words), said
    right = start_server({**env, "MODEL_OUTPUT": "probabilities" if with_softmax else "logits"})
    with right.client(make_key(right.database_url)) as client:
        answer = client.post("/v1/classify", json={"image": b64(photo_path("coffee.png").read_bytes())})
    assert answer.status_code == 200 and abs(sum(p["confidence"] for p in answer.json()["predictions"]) - 1) < 1e-4


# What answers call the model and its version.



def classifier_with_external_data(folder: Path, seed: int) -> Path:
    """`folder/model.onnx` and its weights in `folder/model.onnx.data`, as torch's exporter leaves them: four
    classes from the picture's mean colour (its embedding, (B, 3)) times a seeded matrix."""
    folder.mkdir(parents=True)
    weights = numpy_helper.from_array(np.random.default_rng(seed).normal(0, 4, (3, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"]),
             helper.make_node("MatMul", ["features", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["batch", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [weights])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path,
              save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def served_model(server) -> dict:
    with server.client(make_key(server.database_url)) as client:
        [model] = client.get("/v1/models").json()["data"]
        answer = client.post("/v1/classify", json={"image": b64(photo_path("coffee.png").read_bytes())}).json()
    assert (answer["model"], answer["model_version"]) == (model["id"], model["version"])
    return model


def test_an_exporters_model_onnx_is_named_for_its_folder_and_versioned_with_its_data_and_labels(start_server,
                                                                                               tmp_path):
    """Two fine-tunes exported as model.onnx: the same graph file, other weights in model.onnx.data. Both
    answered as "model", with one version, the .data file unhashed; and neither labels nor int8 changed it."""
    first = classifier_with_external_data(tmp_path / "flowers-v1", seed=1)
    second = classifier_with_external_data(tmp_path / "flowers-v2", seed=2)
    assert first.read_bytes() == second.read_bytes()  # only the .data files differ
    (tmp_path / "labels.txt").write_text("rose\ntulip\niris\ndaisy\n")
    (tmp_path / "relabelled.txt").write_text("rose\ntulip\niris\nbellis\n")
    models = [served_model(start_server({"MODEL_NAME": "", "MODEL_ONNX": str(path),
                                         "MODEL_LABELS": str(tmp_path / "labels.txt")})) for path in (first, second)]
    assert [model["id"] for model in models] == ["flowers-v1", "flowers-v2"]
    assert models[0]["label_names"] == ["rose", "tulip", "iris", "daisy"]
    assert models[0]["version"] != models[1]["version"]

    relabelled = served_model(start_server({"MODEL_NAME": "", "MODEL_ONNX": str(first), "MODEL_ID": "flowers",
                                            "MODEL_LABELS": str(tmp_path / "relabelled.txt"),
                                            "INFERENCE_PRECISION": "int8"}))
    assert relabelled["id"] == "flowers" and relabelled["label_names"][3] == "bellis"
    assert relabelled["precision"] == "int8" and relabelled["version"].endswith("-int8")
    assert relabelled["version"].removesuffix("-int8") != models[0]["version"]  # the labels are in it


def test_int8_is_calibrated_on_the_images_of_int8_calibration_dir(start_server, tmp_path):
    """It was always scikit-image's photos, and there was no setting for your own; the graph calibrated on them
    is cached under a name of its own (their digest), beside the fp32 graph it is made from."""
    own = tmp_path / "mine" / "cats"
    own.mkdir(parents=True)
    for name in ("chelsea.png", "coffee.png", "astronaut.png"):
        shutil.copy(photo_path(name), own / name)
    (own / "notes.txt").write_text("not an image")
    cache = tmp_path / "cache"
    cache.mkdir()
    for path in MODEL_CACHE.glob("efficientnet_lite0-*"):  # the fp32 graph other tests exported: no export here
        if not path.name.endswith(".onnx") or path.name.endswith("-fp32.onnx"):
            shutil.copy(path, cache / path.name)
    server = start_server({"INFERENCE_PRECISION": "int8", "INT8_CALIBRATION_DIR": str(tmp_path / "mine"),
                           "MODEL_CACHE_DIR": str(cache)})
    assert "calibrating on 3 of INT8_CALIBRATION_DIR's images" in server.log()
    [int8] = cache.glob("*-int8-*.onnx")
    assert re.fullmatch(r"efficientnet_lite0-[0-9a-f]{16}-v\d+-int8-[0-9a-f]{12}-ort[\d.]+\.onnx", int8.name), int8.name
    with server.client(make_key(server.database_url)) as client:
        [model] = client.get("/v1/models").json()["data"]
        cat = client.post("/v1/classify", json={"image": b64(photo_path("chelsea.png").read_bytes())}).json()
    assert model["precision"] == "int8" and cat["predictions"][0]["label"] in CAT_LABELS
