"""Where the weights come from: a file, torchvision's cache, its download, or the offline fallback model."""

import argparse
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import b64, make_key, photo_path
from engine.networks import load_model
from inference import ModelLoadError
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


def prefixed(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{name}": tensor for name, tensor in state_dict.items()}


@pytest.mark.parametrize("packaging", ["state_dict", "training checkpoint", "data parallel", "whole module",
                                       "lightning checkpoint", "torch.compile", "torchvision reference checkpoint"])
def test_weights_files_in_the_usual_shapes_load(tmp_path, resnet18_state_dict, packaging):
    """A LightningModule's `model.` prefix was refused ("122 tensors are not resnet18's"), and so was the
    `args` torchvision's reference training script saves beside the weights."""
    network = torchvision.models.resnet18(weights=None)
    network.load_state_dict(resnet18_state_dict)
    saved = {
        "state_dict": resnet18_state_dict,
        "training checkpoint": {"epoch": 90, "state_dict": resnet18_state_dict, "best_acc1": 0.69},
        "data parallel": prefixed(resnet18_state_dict, "module."),
        "whole module": network,
        # As Lightning saves a LightningModule whose network is `self.model`, with a loss of its own.
        "lightning checkpoint": {"epoch": 4, "global_step": 250, "pytorch-lightning_version": "2.4.0",
                                 "state_dict": {**prefixed(resnet18_state_dict, "model."),
                                                "criterion.weight": torch.ones(1000)},
                                 "loops": {"fit_loop": {"state_dict": {}}}, "callbacks": {}, "optimizer_states": [],
                                 "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.01}},
        "torch.compile": prefixed(resnet18_state_dict, "_orig_mod."),
        "torchvision reference checkpoint": {"model": resnet18_state_dict, "epoch": 89,
                                             "args": argparse.Namespace(lr=0.1, model="resnet18")},
    }[packaging]
    torch.save(saved, tmp_path / "weights.pth")
    loaded = load_model(Settings(model_name="resnet18", model_weights=tmp_path / "weights.pth"))
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
        # A wrong file is never papered over by the fallback (MODEL_FALLBACK is true by default).
        load_model(Settings(model_name="resnet18", model_weights=path))


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
    # torch.hub's `Downloading: "https://download.pytorch.org/..."` read as a download starting; none did.
    assert "Downloading" not in running.log() and "trying https://download.pytorch.org/" in running.log()
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


def weights_file(tmp_path: Path, kind: str, state_dict: dict[str, torch.Tensor]) -> Path:
    """A file someone might give as MODEL_WEIGHTS that is not one."""
    path = tmp_path / f"{kind.replace(' ', '-')}.pth"
    if kind == "pickled model":
        torch.save(torchvision.models.mobilenet_v3_small(weights=None), path)
    elif kind == "TorchScript":
        torch.jit.save(torch.jit.script(torchvision.models.resnet18(weights=None).eval()), path)
    elif kind == "cut short":
        torch.save(state_dict, path)
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:  # EfficientNet-Lite0's tensors, for MODEL_NAME=resnet18
        from efficientnet_lite_pytorch import EfficientNet

        torch.save(EfficientNet.from_name("efficientnet-lite0").state_dict(), path)
    return path


@pytest.mark.parametrize("kind, words", [
    ("pickled model", ["holds a whole pickled model (torchvision.models.mobilenetv3.", "torch.save(model, path)"]),
    ("TorchScript", ["is a TorchScript module (torch.jit.save)"]),
    ("cut short", ["is cut short or damaged"]),
    ("efficientnet_lite0's weights", ["does not hold resnet18 weights", "set MODEL_NAME=efficientnet_lite0"]),
])
def test_a_file_that_is_not_a_state_dict_is_named_for_what_it_is(start_server, tmp_path, resnet18_state_dict, kind,
                                                                words):
    """torch's own messages were passed on cut off at 200 characters, with the terminal's colour codes, and
    said what torch.load would do, not what the file is; each now ends with what to save instead (but the last:
    those are weights, of another architecture)."""
    path = weights_file(tmp_path, kind, resnet18_state_dict)
    running = start_server({"MODEL_NAME": "resnet18", "MODEL_WEIGHTS": str(path)}, wait=False)
    assert running.wait_exit() != 0
    [line] = [line for line in running.log().splitlines() if "cannot start: " in line]
    said = line.split("cannot start: ", 1)[1]
    assert said.startswith(f"MODEL_WEIGHTS={path} ") and all(word in said for word in words), said
    assert "\x1b" not in said and "..." not in said
    if kind != "efficientnet_lite0's weights":
        assert said.endswith("torch.save(model.state_dict(), path).") or "set MODEL_ONNX" in said, said
