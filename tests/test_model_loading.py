"""Where the weights come from: a file, torchvision's cache, its download, or the offline fallback model."""

from pathlib import Path

import pytest
import torch
import torchvision

from conftest import b64, make_key, photo_path
from inference import ModelLoadError
from networks import load_model
from settings import Settings

NO_DOWNLOAD = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}  # refused at once, online or not


@pytest.fixture(scope="module")
def resnet18_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()  # random init: right shapes, no download


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torchvision cache and a download that cannot connect."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for name, value in NO_DOWNLOAD.items():
        monkeypatch.setenv(name, value)
    return tmp_path / "torch-home"


def test_server_runs_resnet18_from_a_weights_file(start_server, tmp_path, resnet18_state_dict):
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18_state_dict, weights)
    running = start_server({"MODEL_NAME": "resnet18", "MODEL_WEIGHTS": str(weights)})
    with running.client(make_key(running.database_url)) as client:
        [model] = client.get("/v1/models").json()["data"]
        assert (model["id"], model["weights_source"], model["labels"]) == ("resnet18", "file", 1000)
        result = client.post("/v1/classify", json={"image": b64(photo_path("chelsea.png").read_bytes())}).json()
    assert result["model"] == "resnet18"
    confidences = [p["confidence"] for p in result["predictions"]]
    assert len(confidences) == 5 and confidences == sorted(confidences, reverse=True)


@pytest.mark.parametrize("packaging", ["state_dict", "training checkpoint", "data parallel", "whole module"])
def test_weights_files_in_the_usual_shapes_load(tmp_path, resnet18_state_dict, packaging):
    network = torchvision.models.resnet18(weights=None)
    network.load_state_dict(resnet18_state_dict)
    saved = {
        "state_dict": resnet18_state_dict,
        "training checkpoint": {"epoch": 90, "state_dict": resnet18_state_dict, "best_acc1": 0.69},
        "data parallel": {f"module.{k}": v for k, v in resnet18_state_dict.items()},
        "whole module": network,
    }[packaging]
    torch.save(saved, tmp_path / "weights.pth")
    loaded = load_model(Settings(model_name="resnet18", model_weights=tmp_path / "weights.pth", model_fallback=False))
    assert (loaded.spec.name, loaded.weights_source) == ("resnet18", "file")
    assert torch.equal(loaded.head.weight, resnet18_state_dict["fc.weight"])


@pytest.mark.parametrize("content", ["missing", "text", "other architecture", "empty dict"])
def test_a_wrong_weights_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "text":
        path.write_text("these are not weights")
    elif content == "other architecture":
        torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    elif content == "empty dict":
        torch.save({}, path)
    with pytest.raises(ModelLoadError, match=f"MODEL_WEIGHTS={path}"):
        # A wrong file is never papered over by the fallback.
        load_model(Settings(model_name="resnet18", model_weights=path, model_fallback=True))


def test_torchvision_cache_is_used_before_the_download(offline, resnet18_state_dict):
    checkpoint = offline / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save(resnet18_state_dict, checkpoint)
    loaded = load_model(Settings(model_name="resnet18", model_fallback=False))
    assert (loaded.spec.name, loaded.weights_source) == ("resnet18", "cache")


def test_no_weights_anywhere_falls_back_or_stops(offline):
    loaded = load_model(Settings(model_name="resnet18", model_fallback=True))
    assert (loaded.spec.name, loaded.weights_source) == ("efficientnet_lite0", "fallback package")
    assert "download" in loaded.fallback_reason
    with pytest.raises(ModelLoadError, match="MODEL_FALLBACK=false"):
        load_model(Settings(model_name="resnet18", model_fallback=False))


def test_server_falls_back_loudly_and_says_so_in_every_answer(start_server, tmp_path):
    running = start_server({"MODEL_NAME": "resnet18", "TORCH_HOME": str(tmp_path / "empty"), **NO_DOWNLOAD})
    assert "FALLING BACK to EfficientNet-Lite0" in running.log()
    with running.client(make_key(running.database_url)) as client:
        [model] = client.get("/v1/models").json()["data"]
        result = client.post("/v1/classify", json={"image": b64(photo_path("chelsea.png").read_bytes())}).json()
    assert model["id"] == "efficientnet_lite0" and model["weights_source"] == "fallback package"
    assert "resnet18 weights unavailable" in model["fallback_reason"]
    assert result["model"] == "efficientnet_lite0"
    assert result["predictions"][0]["label"] in {"tiger cat", "tabby", "Egyptian cat"}


@pytest.mark.parametrize("case", ["bad weights file", "fallback off"])
def test_server_refuses_to_start_with_a_clear_message(start_server, tmp_path, case):
    if case == "bad weights file":
        (tmp_path / "bad.pth").write_bytes(b"\x00" * 100)
        env, message = {"MODEL_NAME": "resnet18", "MODEL_WEIGHTS": str(tmp_path / "bad.pth")}, f"MODEL_WEIGHTS={tmp_path / 'bad.pth'}"
    else:
        env, message = {"MODEL_NAME": "resnet18", "MODEL_FALLBACK": "false", "TORCH_HOME": str(tmp_path), **NO_DOWNLOAD}, "MODEL_FALLBACK=false"
    running = start_server(env, wait=False)
    assert running.wait_exit() != 0
    assert message in running.log()
    assert "cannot start" in running.log()
