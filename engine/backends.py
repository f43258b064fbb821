"""The model loaded, and what runs its forward pass (runtimes.py): ONNX Runtime on a graph exported from the
weights, or torch eager.

    INFERENCE_BACKEND=onnxruntime  a graph cached by an earlier start (graph_cache.py) is served without importing
                                   torch: the graph, its sidecar and the weights file's digest are all it takes.
                                   Otherwise torch builds the model (networks.py) and exports it once (dynamic batch
                                   axis); a MODEL_ONNX file is wrapped (onnx_models.py) and cached the same way, and
                                   runs only here. If export or loading fails, torch answers and the log says why.
    INFERENCE_BACKEND=torch        the torch model itself (networks.TorchBackend).
    INFERENCE_PRECISION=int8       ONNX Runtime only: static int8 quantization (QDQ, per channel), calibrated on
                                   the photos that ship with scikit-image, or INT8_CALIBRATION_DIR's images,
                                   cached beside the fp32 graph; made from that graph, without torch.

torch, onnx and the quantizer are imported where they are used, so a start that finds its graph cached pays for
none of them (torch alone: 600 MB and 3 s).
"""

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.graph_cache import GraphFiles, files_of, find_cached, sidecar
from engine.images import decode_for_model
from engine.photos import MAX_PIXELS, photo_inputs, photo_paths
from engine.runtimes import Backend, OnnxBackend, warm_up, warn_one_at_a_time
from engine.weights import Located, locate_weights
from inference import LoadedModel, ModelLoadError, ModelSpec, file_sha256, first_line, with_precision, with_settings
from settings import Precision, Settings

logger = logging.getLogger("classify")

MAX_CALIBRATION_IMAGES = 100  # 400 passes of the fp32 graph: seconds for EfficientNet-Lite0 on 2 cores
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

def load_backend(settings: Settings) -> tuple[LoadedModel, Backend]:
    """The model the settings ask for, with its labels and version, and the backend that runs it, warmed up;
    ModelLoadError says what to change. A MODEL_ONNX file runs on ONNX Runtime (Settings refuses torch for it)."""
    calibration = calibration_images(settings)
    located = locate_weights(settings)
    if located is not None and (settings.inference_backend == "onnxruntime" or located.source == "onnx file"):
        if (served := serve_cached(located, settings, calibration)) is not None:
            model, backend = served
            return with_precision(model, backend.precision, settings), backend
    from engine import networks  # torch: to export the graph, or to run the model itself

    built = networks.load_model(settings, located)
    model = with_settings(built, settings)  # a labels file that does not fit stops the start before an export
    backend = built_backend(built, settings, calibration)
    return with_precision(model, backend.precision, settings), backend


@dataclass(frozen=True)
class Calibration:
    """The images int8's quantization is calibrated on."""
    paths: tuple[Path, ...]
    digest: str | None  # of INT8_CALIBRATION_DIR's images, names and bytes (it names the int8 graph); None: PHOTOS


def calibration_images(settings: Settings) -> Calibration | None:
    """INT8_CALIBRATION_DIR's images (at most MAX_CALIBRATION_IMAGES, spread over them in path order, so over
    the classes of a folder per class), or scikit-image's even-numbered photos; None for fp32."""
    if settings.inference_precision != "int8":
        return None
    folder = settings.int8_calibration_dir
    if folder is None:
        return photos_calibration()
    where = f"INT8_CALIBRATION_DIR={folder}"
    if not folder.is_dir():
        raise ModelLoadError(f"{where}: {'a file, not a folder' if folder.exists() else 'no such folder'}; set it "
                             "to a folder of images like those the model will be sent.")
    found = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not found:
        raise ModelLoadError(f"{where} holds no images (files named *{', *'.join(sorted(IMAGE_SUFFIXES))}); put "
                             "some like those the model will be sent in it, or unset it for scikit-image's photos.")
    chosen = found[::math.ceil(len(found) / MAX_CALIBRATION_IMAGES)]
    digest = hashlib.sha256()
    for path in chosen:
        digest.update(f"{path.relative_to(folder)}\n{file_sha256(path)}\n".encode())
    return Calibration(tuple(chosen), digest.hexdigest())


def photos_calibration() -> Calibration:
    """The even-numbered photos: the odd-numbered ones measure int8's agreement with fp32."""
    return Calibration(tuple(photo_paths()[::2]), None)


def serve_cached(located: Located, settings: Settings,
                 calibration: Calibration | None) -> tuple[LoadedModel, Backend] | None:
    """The cached graph of these weights on ONNX Runtime, or None if there is none this ONNX Runtime can run."""
    found = find_cached(located, settings, calibration.digest if calibration is not None else None)
    if found is None:
        return None
    cached, files = found
    model = with_settings(cached, settings)
    path = files.graph(settings.inference_precision)
    try:
        if not path.is_file():
            assert calibration is not None  # int8
            make_int8(files, cached.spec, calibration)
        backend = OnnxBackend(path, settings.inference_precision, settings.threads_per_batch)
        warm_up(backend, model.spec.crop, model.batch_limit(settings.max_batch))
    except ModelLoadError:  # INT8_CALIBRATION_DIR's images cannot be used: nothing to make again
        raise
    except Exception:  # made by another ONNX Runtime, or damaged: made again, by torch if need be
        logger.warning("cannot serve the cached graph %s; making it again", path, exc_info=True)
        files.fp32.unlink(missing_ok=True)
        files.int8.unlink(missing_ok=True)
        return None
    logger.info("loaded %s from the cached graph %s (weights: %s)", model.spec.name, path, located.path)
    if model.is_batch_fixed:
        warn_one_at_a_time(located.path)
    return model, backend


def built_backend(model: LoadedModel, settings: Settings, calibration: Calibration | None) -> Backend:
    """The backend for a model torch built (or MODEL_ONNX as read): its graph exported and cached, or torch."""
    precision, threads, cache_dir = settings.inference_precision, settings.threads_per_batch, settings.model_cache_dir
    max_batch = model.batch_limit(settings.max_batch)
    if model.onnx is not None:
        try:
            return onnx_backend(model, precision, threads, cache_dir, max_batch, calibration)
        except Exception as exc:
            logger.debug("ONNX Runtime cannot serve %s", model.onnx.path, exc_info=True)
            raise ModelLoadError(f"MODEL_ONNX={model.onnx.path} cannot be served by ONNX Runtime ({precision}): "
                                 f"{type(exc).__name__}: {first_line(exc)}") from None
    if settings.inference_backend == "onnxruntime":  # Settings refuses int8 on torch
        try:
            return onnx_backend(model, precision, threads, cache_dir, max_batch, calibration)
        except ModelLoadError:  # INT8_CALIBRATION_DIR's images cannot be used: torch would not serve int8 either
            raise
        except Exception:
            logger.warning("ONNX Runtime is unavailable for %s (%s); torch answers instead, in fp32", model.spec.name,
                           precision, exc_info=True)
    from engine.networks import TorchBackend

    backend = TorchBackend(model, settings.inference_threads)  # one pass at a time: torch's threads are the process's
    warm_up(backend, model.spec.crop, max_batch)
    return backend


def onnx_backend(model: LoadedModel, precision: Precision, threads: int, cache_dir: Path, max_batch: int,
                 calibration: Calibration | None) -> Backend:
    path = onnx_file(model, precision, cache_dir, calibration)
    try:
        backend = OnnxBackend(path, precision, threads)
    except Exception:  # a cached file this ONNX Runtime cannot read: make it anew
        logger.warning("cannot load %s; exporting it again", path, exc_info=True)
        path.unlink()
        backend = OnnxBackend(onnx_file(model, precision, cache_dir, calibration), precision, threads)
    warm_up(backend, model.spec.crop, max_batch)  # a session that loads but cannot run falls back here too
    return backend


def onnx_file(model: LoadedModel, precision: Precision, cache_dir: Path,
              calibration: Calibration | None = None) -> Path:
    """The model's ONNX graph on disk, exported (and quantized: by default calibrated on scikit-image's photos)
    only if no earlier start left one there."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    if precision == "int8" and calibration is None:
        calibration = photos_calibration()
    files = files_of(model, cache_dir, calibration.digest if calibration is not None else None)
    if not files.fp32.is_file():
        with _atomic_path(files.fp32) as partial:
            if model.onnx is not None:
                import onnx

                from engine.onnx_models import wrap_for_serving

                logger.info("wrapping %s for serving: %s", model.onnx.path, files.fp32)
                onnx.save(wrap_for_serving(model.onnx, model.spec.crop, model.spec.mean, model.spec.std), partial)
            else:
                from engine.networks import export_onnx

                logger.info("exporting %s to ONNX: %s", model.spec.name, files.fp32)
                export_onnx(model, partial)
    facts = json.dumps(sidecar(model))
    if not files.sidecar.is_file() or files.sidecar.read_text() != facts:
        with _atomic_path(files.sidecar) as partial:
            partial.write_text(facts)
    if precision == "int8" and not files.int8.is_file():
        assert calibration is not None
        make_int8(files, model.spec, calibration)
    return files.graph(precision)


def make_int8(files: GraphFiles, spec: ModelSpec, calibration: Calibration) -> None:
    source = "scikit-image's" if calibration.digest is None else "INT8_CALIBRATION_DIR's"
    logger.info("quantizing %s to int8 (calibrating on %d of %s images): %s", spec.name, len(calibration.paths),
                source, files.int8)
    with _atomic_path(files.int8) as partial:
        quantize_int8(files.fp32, partial, spec, calibration)


def quantize_int8(fp32_path: Path, int8_path: Path, spec: ModelSpec, calibration: Calibration) -> None:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.inputs = ({input_name: x[None]} for x in calibration_inputs(spec, calibration.paths))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.inputs, None)

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Folds and fuses first, so fewer tensors are quantized. Without symbolic shape inference, which is for
        # transformers' dynamic sizes (ONNX's own gives these graphs every shape: EfficientNet-Lite0's int8 graph
        # came out node for node the same and answered the 21 photos identically) and would import torch.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        # Activations uint8 and weights int8 (U8S8): x86's fast int8 path. Measured on 2 cores with AVX-512 VNNI,
        # batch 1: ResNet-18 133 images/s against 43 for S8S8 and 55 for fp32; EfficientNet-Lite0 294 against 169
        # for fp32, with top-1 equal to fp32's on 19 of 21 photos (convolutions alone: 9 of 21, so the adds,
        # activations and pools are quantized too). The softmax stays float: probabilities keep their precision.
        # Without VNNI, U8S8 products can saturate unless weights use 7 bits (reduce_range), as ORT's docs say.
        quantize_static(str(prepared), str(int8_path), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=not has_vnni(),
                        op_types_to_quantize=["Conv", "Gemm", "MatMul", "Add", "Relu", "Clip", "MaxPool",
                                              "GlobalAveragePool"])


def has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX-512 or AVX), with which int8 products cannot saturate."""
    try:
        return "vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume the worst case, which costs a little accuracy, never correctness
        return False


def calibration_inputs(spec: ModelSpec, paths: tuple[Path, ...]) -> Iterator[np.ndarray]:
    """Inputs with the pixel statistics of real use: each image zoomed out and in, and mirrored (4 each). By
    default scikit-image's even-numbered photos (44 inputs), none of them an input fp32's agreement is measured
    on. An image that cannot be decoded is left out, and said so."""
    usable = []
    for path in paths:
        try:
            decode_for_model(path.read_bytes(), MAX_PIXELS, spec.resize, spec.crop, spec.interpolation)
            usable.append(path)
        except Exception as exc:  # ApiError for what is no image, OSError for what cannot be read
            logger.warning("int8 calibration: %s is left out (%s)", path, getattr(exc, "message", exc))
    if not usable:
        raise ModelLoadError(f"int8 calibration: none of the {len(paths)} images can be decoded.")
    for resize in (spec.crop, spec.resize + 64):
        for x in photo_inputs(spec, usable, resize):
            yield x
            yield x[:, ::-1].copy()


@contextmanager
def _atomic_path(final: Path) -> Iterator[Path]:
    """A scratch path beside `final`, renamed onto it on success: two servers starting at once never read a
    half-written file."""
    partial = final.with_name(f".{final.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
