"""The model built with torch: for a start that must export its graph (none cached yet), and for
INFERENCE_BACKEND=torch. A start that finds its graph cached never imports this module (backends.load_backend).

    load_model      the network the settings ask for, with its weights (weights.py) and preprocessing, or the
                    fallback; or MODEL_ONNX read and checked, its output on photos included (onnx_models.py)
    ImageToOutputs  the network with its input scaling and softmax: the graph that is exported, and torch's backend
    TorchBackend    INFERENCE_BACKEND=torch
    export_onnx     the graph to an ONNX file with a dynamic batch axis
"""

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights

from engine.onnx_models import OnnxModelError, check_output_kind, read_onnx_classifier
from engine.runtimes import Outputs, warn_one_at_a_time
from engine.weights import (Located, WeightsError, WeightsUnavailable, efficientnet_lite0_file, fallback_reason,
                            log_fallback, read_weights_file, remember_weights_url, torchvision_weights, under_prefix,
                            weights_misfit)
from inference import (EFFICIENTNET_LITE0, RESAMPLING, LoadedModel, ModelLoadError, ModelSpec, WeightsSource,
                       file_sha256, first_line, onnx_spec, preprocessing_overrides, with_preprocessing)
from operations.logs import printed_into_log
from settings import BackendName, Precision, Settings

logger = logging.getLogger("classify")

IMAGENET_LABELS = tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
LITE0_SPEC = ModelSpec(EFFICIENTNET_LITE0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                       interpolation=RESAMPLING["bicubic"], labels=IMAGENET_LABELS)
# Built as torchvision builds them for its ImageNet weights (transform_input: they were trained on inputs
# normalised another way, which the network redoes itself), without their auxiliary classifiers (unused at
# inference), whose weights are then dropped from the file.
BUILD_OPTIONS = {"inception_v3": {"aux_logits": False, "init_weights": False, "transform_input": True},
                 "googlenet": {"aux_logits": False, "init_weights": False, "transform_input": True}}
AUXILIARY_WEIGHTS = ("AuxLogits.", "aux1.", "aux2.")
MAX_EXPORTED_BATCH = 1024


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


def image_to_outputs(model: LoadedModel) -> ImageToOutputs:
    if model.network is None:
        raise ValueError(f"{model.spec.name} is an ONNX file: only ONNX Runtime runs it")
    return ImageToOutputs(model.network, model.head, model.spec).eval()


class TorchBackend:
    name: BackendName = "torch"
    precision: Precision = "fp32"

    def __init__(self, model: LoadedModel, threads: int) -> None:
        torch.set_num_threads(threads)
        self.graph = image_to_outputs(model)

    def run(self, x: np.ndarray) -> Outputs:
        with torch.inference_mode():
            outputs = [output.numpy() for output in self.graph(torch.from_numpy(x))]
        return Outputs(outputs[0], outputs[1] if len(outputs) > 1 else None)


def export_onnx(model: LoadedModel, path: Path) -> None:
    example = torch.zeros((2, model.spec.crop, model.spec.crop, 3), dtype=torch.uint8)  # (B, 224, 224, 3)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORTED_BATCH)
    outputs = ["probabilities", "embedding"] if model.head is not None else ["probabilities"]
    program = torch.onnx.export(image_to_outputs(model), (example,), dynamo=True, verbose=False,
                                input_names=["image"], output_names=outputs, dynamic_shapes=({0: batch},))
    program.save(path, external_data=False)  # one self-contained file


def load_model(settings: Settings, located: Located | None = None) -> LoadedModel:
    """The model the settings ask for, with its own labels and version (inference.with_settings applies the
    settings' own); ModelLoadError says what to change. `located`: what weights.locate_weights found, whose
    fallback (banner logged, download tried) is taken as it is."""
    try:
        if settings.model_onnx is not None:
            return load_onnx(settings)
        if located is not None and located.fallback_reason is not None:
            return load_efficientnet_lite0(located.fallback_reason)
        return load_network(settings)
    except (OnnxModelError, WeightsError) as exc:
        raise ModelLoadError(str(exc)) from None


def load_onnx(settings: Settings) -> LoadedModel:
    assert settings.model_onnx is not None
    onnx = read_onnx_classifier(settings.model_onnx, settings.model_crop, settings.model_output,
                                settings.model_embedding_output)
    if onnx.is_batch_fixed:
        warn_one_at_a_time(settings.model_onnx)
    spec = onnx_spec(settings)
    spec = ModelSpec(spec.name, spec.resize, spec.crop, spec.mean, spec.std, spec.interpolation, IMAGENET_LABELS)
    check_output_kind(onnx, spec)
    logger.info("loaded %s from MODEL_ONNX=%s: %d classes, embedding %s", spec.name, settings.model_onnx,
                onnx.classes, settings.model_embedding_output or "none (no MODEL_EMBEDDING_OUTPUT)")
    return LoadedModel(spec, "onnx file", onnx.file_digest, onnx.file_digest[:12], onnx.classes,
                       onnx.embedding_dimensions, onnx.is_batch_fixed, onnx=onnx)


def load_network(settings: Settings) -> LoadedModel:
    """MODEL_NAME with MODEL_WEIGHTS, or its own weights (torchvision's, or EfficientNet-Lite0's package), or the
    fallback; preprocessed as the architecture was trained, or as the preprocessing settings that are set say."""
    name, weights_file = settings.model_name, settings.model_weights
    if name != EFFICIENTNET_LITE0 and name not in architectures():
        raise ModelLoadError(f"MODEL_NAME={name} is not an architecture this server knows; use one of: "
                             f"{', '.join(architectures())} (or MODEL_ONNX for an ONNX file).")
    overrides = preprocessing_overrides(settings)
    spec = with_preprocessing(LITE0_SPEC if name == EFFICIENTNET_LITE0 else torchvision_spec(name), overrides)
    if weights_file is not None:
        network = fitted_network(name, read_weights_file(weights_file), f"MODEL_WEIGHTS={weights_file}")
        logger.info("loaded %s from MODEL_WEIGHTS=%s", name, weights_file)
        return from_network(spec, network, "file", file_sha256(weights_file), overrides=overrides)
    if name == EFFICIENTNET_LITE0:
        return load_efficientnet_lite0(fallback_reason=None, spec=spec, overrides=overrides)
    # So that later starts find torchvision's cached file without torchvision.
    remember_weights_url(settings.model_cache_dir, name, torchvision.models.get_model_weights(name).DEFAULT.url)
    try:
        state_dict, source, path = torchvision_weights(name)
    except WeightsUnavailable as exc:
        if not settings.model_fallback:
            raise ModelLoadError(f"{exc}. MODEL_FALLBACK=false, so the server stops here: set MODEL_WEIGHTS to a "
                                 f"{name} weights file, or allow the fallback, or set MODEL_NAME=efficientnet_lite0."
                                 ) from None
        log_fallback(name, exc)
        return load_efficientnet_lite0(fallback_reason(name, exc))
    network = fitted_network(name, state_dict, str(path))
    logger.info("loaded %s from %s", name, path)
    return from_network(spec, network, source, file_sha256(path), overrides=overrides)


def fitted_network(name: str, state_dict: dict[str, torch.Tensor], origin: str) -> nn.Module:
    """`name`'s network holding these weights: their names as a training wrapper left them (module., model....),
    and a final layer of as many classes as theirs. ModelLoadError says what does not fit."""
    if name == EFFICIENTNET_LITE0:
        from efficientnet_lite_pytorch import EfficientNet

        network = EfficientNet.from_name("efficientnet-lite0")
    else:
        network = torchvision.models.get_model(name, weights=None, **BUILD_OPTIONS.get(name, {}))
    state_dict = under_prefix(state_dict, set(network.state_dict()))
    if name in BUILD_OPTIONS:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(AUXILIARY_WEIGHTS)}
    layer_name, layer = final_layer(network)
    saved = state_dict.get(f"{layer_name}.weight")
    if saved is not None and saved.shape[0] != layer.weight.shape[0]:  # fine-tuned for N classes: a layer that fits
        network.set_submodule(layer_name, nn.Linear(layer.in_features, saved.shape[0]) if isinstance(layer, nn.Linear)
                              else nn.Conv2d(layer.in_channels, saved.shape[0], layer.kernel_size))
    if problems := weights_misfit(network, state_dict, name):
        raise ModelLoadError(f"{origin} does not hold {name} weights: {problems}.")
    return network.eval()


def load_efficientnet_lite0(fallback_reason: str | None, spec: ModelSpec = LITE0_SPEC,
                            overrides: dict[str, object] | None = None) -> LoadedModel:
    from efficientnet_lite_pytorch import EfficientNet

    path = efficientnet_lite0_file()
    with printed_into_log(logger, logging.DEBUG):  # the package prints that it loaded them: so do we, below
        network = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path))
    logger.info("loaded efficientnet_lite0 with ImageNet weights from %s", path)
    return from_network(spec, network, "fallback package", file_sha256(path), fallback_reason, overrides or {})


def from_network(spec: ModelSpec, network: nn.Module, weights_source: WeightsSource, weights_digest: str | None = None,
                 fallback_reason: str | None = None, overrides: dict[str, object] | None = None) -> LoadedModel:
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
    try:
        is_head = isinstance(layer, nn.Linear) and is_last_step(network, layer, spec.crop)
    except Exception as exc:  # a crop the architecture cannot take (a ViT's input size is fixed)
        raise ModelLoadError(f"MODEL_CROP={spec.crop}: {spec.name} cannot take {spec.crop}x{spec.crop} images "
                             f"({type(exc).__name__}: {first_line(exc)}); set MODEL_CROP to the size it was trained "
                             "at.") from None
    if is_head:
        network.set_submodule(layer_name, nn.Identity())
        head = layer
    return LoadedModel(spec, weights_source, weights_digest, weights_digest[:12], classes,
                       head.in_features if head is not None else None, fallback_reason=fallback_reason,
                       preprocessing_overrides=overrides or {}, network=network, head=head)


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
