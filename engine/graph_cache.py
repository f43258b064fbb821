"""The graphs exported for ONNX Runtime, kept in MODEL_CACHE_DIR, and what serving one takes besides the graph:
enough that a start which finds its graph here serves it without importing torch.

    <name>-<key>-v<EXPORT_VERSION>-fp32.onnx             (B, H, W, 3) uint8 pixels in; probabilities (B, N) and
                                                         the embedding (B, D), if any, out
    <name>-<key>-v<EXPORT_VERSION>-int8-ort<version>.onnx  its int8 quantization, by that ONNX Runtime's quantizer
                                                         (-int8-<images>-ort...: calibrated on INT8_CALIBRATION_DIR)
    <name>-<key>-v<EXPORT_VERSION>.json                  the sidecar: preprocessing, classes, the model's own
                                                         labels, embedding size, batch axis, the weights' SHA-256
    <name>.torchvision-<version>.url                     where torchvision gets an architecture's weights (weights.py)

The key hashes what decides the function the graph computes, all of it known without torch: the weights (or
ONNX) file's SHA-256 (an ONNX file's with its external data) and the architecture, i.e. its name and the version
of the package that defines it and its preprocessing (torchvision, or efficientnet-lite-pytorch), and the
preprocessing settings that replace the architecture's; for MODEL_ONNX, the preprocessing and output settings.
Not torch's version: another exporter writes the same function in other nodes, and a graph this ONNX Runtime
cannot load is made again (backends.py). The int8 file is named for ONNX Runtime's version, whose quantizer chose
its scales, and for the images it was calibrated on when they are the user's.

Each start decides the rest itself: where the weights were found and any fallback (weights.locate_weights: the
same file may be MODEL_WEIGHTS today and torchvision's cache tomorrow), MODEL_LABELS and MODEL_VERSION
(inference.with_settings).
"""

import hashlib
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from engine.weights import Located
from inference import (EFFICIENTNET_LITE0, LoadedModel, ModelSpec, file_sha256, onnx_digest, onnx_spec,
                       preprocessing_overrides)
from settings import Precision, Settings

logger = logging.getLogger("classify")

EXPORT_VERSION = "6"  # bump when the exported graph, its sidecar or int8's calibration changes


@dataclass(frozen=True)
class GraphFiles:
    fp32: Path
    int8: Path
    sidecar: Path

    def graph(self, precision: Precision) -> Path:
        return self.fp32 if precision == "fp32" else self.int8


def graph_files(cache_dir: Path, model_name: str, weights_digest: str, onnx_options: dict | None,
                preprocessing: dict[str, object], calibration: str | None) -> GraphFiles:
    """Where the graph of these weights is cached. `onnx_options`: MODEL_ONNX's preprocessing and outputs;
    `preprocessing`: for MODEL_NAME, the settings that replace its own; `calibration`: the digest of int8's own
    calibration images (None: scikit-image's photos)."""
    if onnx_options is None:
        package = "efficientnet-lite-pytorch" if model_name == EFFICIENTNET_LITE0 else "torchvision"
        defined_by: object = [package, importlib.metadata.version(package)]
        if preprocessing:  # none: the key of the graphs cached before they could be set
            defined_by = [*defined_by, preprocessing]  # type: ignore[misc]
    else:
        defined_by = onnx_options
    key = hashlib.sha256(json.dumps([model_name, weights_digest, defined_by], sort_keys=True).encode()).hexdigest()
    stem = f"{model_name}-{key[:16]}-v{EXPORT_VERSION}"
    calibrated_on = f"-{calibration[:12]}" if calibration is not None else ""
    return GraphFiles(cache_dir / f"{stem}-fp32.onnx",
                      cache_dir / f"{stem}-int8{calibrated_on}-ort{importlib.metadata.version('onnxruntime')}.onnx",
                      cache_dir / f"{stem}.json")


def onnx_options(spec: ModelSpec, output_kind: str, embedding_output: str | None) -> dict:
    return {"preprocessing": spec.preprocessing(), "output": output_kind, "embedding_output": embedding_output}


def files_of(model: LoadedModel, cache_dir: Path, calibration: str | None) -> GraphFiles:
    """Where a model built with torch (or MODEL_ONNX as read) has its graph cached."""
    options = None
    if model.onnx is not None:
        options = onnx_options(model.spec, model.onnx.output_kind, model.onnx.embedding_output)
    return graph_files(cache_dir, model.spec.name, model.weights_digest, options, model.preprocessing_overrides,
                       calibration)


def sidecar(model: LoadedModel) -> dict[str, object]:
    """What serving the graph takes besides the graph: the model as exported, before this start's settings. Its
    labels are ImageNet's or the architecture's; none for a fine-tune of other classes (MODEL_LABELS names them)."""
    labels = list(model.spec.labels) if len(model.spec.labels) == model.classes else []
    return {"model": model.spec.name, "weights_digest": model.weights_digest, "version": model.weights_digest[:12],
            "preprocessing": model.spec.preprocessing(), "classes": model.classes, "labels": labels,
            "embedding_dimensions": model.embedding_dimensions, "is_batch_fixed": model.is_batch_fixed,
            "export_version": EXPORT_VERSION}


def find_cached(located: Located, settings: Settings,
                calibration: str | None = None) -> tuple[LoadedModel, GraphFiles] | None:
    """The model as its sidecar describes it, and its files, if an earlier start exported the graph of exactly
    these weights; None otherwise (or if the sidecar is unreadable: the torch path writes it anew)."""
    options, overrides = None, {}
    try:
        if located.source == "onnx file":
            digest = onnx_digest(located.path)
            options = onnx_options(onnx_spec(settings), settings.model_output, settings.model_embedding_output)
        else:
            digest = file_sha256(located.path)
            if located.fallback_reason is None:  # the fallback is preprocessed as it was trained
                overrides = preprocessing_overrides(settings)
    except Exception:  # unreadable: the torch path says so, in the words of the setting that named it
        return None
    files = graph_files(settings.model_cache_dir, located.model_name, digest, options, overrides, calibration)
    if not (files.fp32.is_file() and files.sidecar.is_file()):
        return None
    try:
        facts = json.loads(files.sidecar.read_text())
        labels = tuple(facts["labels"])
        spec = ModelSpec.from_preprocessing(located.model_name, facts["preprocessing"], labels)
        model = LoadedModel(spec, located.source, digest, digest[:12], int(facts["classes"]),
                            facts["embedding_dimensions"], bool(facts["is_batch_fixed"]), located.fallback_reason,
                            overrides)
        is_ours = (facts["model"], facts["weights_digest"], facts["export_version"]) == (located.model_name, digest,
                                                                                         EXPORT_VERSION)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("cannot read %s (%s); the graph's sidecar is written again", files.sidecar, exc)
        return None
    return (model, files) if is_ours else None
