"""Where a torchvision network's weights come from, and whether they fit it.

    read_weights_file    MODEL_WEIGHTS: a state_dict, a training checkpoint around one, or a whole pickled ResNet,
                         loaded without running code from the file
    torchvision_weights  the architecture's ImageNet weights from torchvision's cache, else its download
    weights_misfit       what does not fit (missing, unexpected or misshapen tensors), counted, or None

A file that cannot be used is a WeightsError naming it; no weights at all is WeightsUnavailable, the case the
fallback model is for.
"""

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from logs import printed_into_log
from schemas import WeightsSource

logger = logging.getLogger("classify")

# What a whole pickled ResNet may contain; torch.load(weights_only=True) refuses anything else.
RESNET_MODULES = [ResNet, BasicBlock, Bottleneck, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Sequential,
                  nn.AdaptiveAvgPool2d, nn.Linear]


class WeightsError(Exception):
    """The weights file cannot be used; the message names it and what is wrong."""


class WeightsUnavailable(Exception):
    """No weights anywhere: the case the fallback model is for. `summary` is fit for API clients (no paths);
    the message, for the server log, says exactly what was tried."""

    def __init__(self, message: str, summary: str) -> None:
        super().__init__(message)
        self.summary = summary


def torchvision_weights(name: str) -> tuple[dict[str, torch.Tensor], WeightsSource, Path]:
    """`name`'s default ImageNet weights from torchvision's cache, else from its download (which fills the cache)."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    source: WeightsSource = "cache" if cached.is_file() else "download"
    try:
        with printed_into_log(logger, logging.INFO):  # torchvision prints `Downloading: "<url>" to <path>`
            return weights.get_state_dict(progress=False, check_hash=True), source, cached
    except Exception as exc:  # no network (URLError), a bad hash, a corrupt cache file: no weights either way
        if source == "cache":
            raise WeightsUnavailable(f"torchvision's cache file {cached} is unreadable ({exc})",
                                     f"torchvision's cached weights are unreadable ({type(exc).__name__})") from None
        raise WeightsUnavailable(f"not in torchvision's cache ({cached}), and the download from {weights.url} "
                                 f"failed ({exc})", "no MODEL_WEIGHTS, none in torchvision's cache, and the download "
                                 f"failed ({type(exc).__name__})") from None


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file holding one, a training checkpoint around one, or a whole pickled ResNet."""
    if not path.is_file():
        problem = "a folder, not a file" if path.is_dir() else "no such file"
        raise WeightsError(f"MODEL_WEIGHTS={path}: {problem}; set it to a weights file (.pth), or unset it.")
    try:
        with torch.serialization.safe_globals(RESNET_MODULES):
            saved = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        raise WeightsError(f"MODEL_WEIGHTS={path} is not a PyTorch weights file that loads safely "
                             f"({type(exc).__name__}: {shorten(first_line, 200)}).") from None
    if isinstance(saved, nn.Module):
        saved = saved.state_dict()
    if isinstance(saved, dict):
        for wrapper_key in ("state_dict", "model_state_dict", "model"):
            if isinstance(saved.get(wrapper_key), dict):
                saved = saved[wrapper_key]
                break
    if not isinstance(saved, dict) or not saved or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise WeightsError(f"MODEL_WEIGHTS={path} holds no state_dict (a dict of tensors).")
    return {key.removeprefix("module."): value for key, value in saved.items()}  # saved from DataParallel


def weights_misfit(network: nn.Module, state_dict: dict[str, torch.Tensor], name: str) -> str | None:
    """Loads the weights; if they do not fit, what is wrong, counted and with the first example of each kind."""
    try:
        missing, unexpected = network.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # tensors of the right names and the wrong shapes
        mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        example = shorten(mismatches[0].rstrip("."), 250)
        return f"{len(mismatches)} tensors have other shapes than {name}'s, e.g. {example}"
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {name}'s tensors are missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are not {name}'s (e.g. {unexpected[0]})")
    return "; ".join(problems) or None


def shorten(text: str, length: int) -> str:
    return text if len(text) <= length else text[:length - 3] + "..."
