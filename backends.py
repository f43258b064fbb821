"""Where the forward pass runs: torch eager, or ONNX Runtime on a graph exported from the same weights.

    INFERENCE_BACKEND=onnxruntime  the loaded model is exported once to ONNX (dynamic batch axis) and cached in
                                   MODEL_CACHE_DIR under a hash of what the graph holds, so a restart loads the
                                   file instead; if export or loading fails, torch answers instead and the log
                                   says why. A MODEL_ONNX file is wrapped (onnx_models.py) and cached the same way,
                                   and runs only here.
    INFERENCE_BACKEND=torch        the torch model itself.
    INFERENCE_PRECISION=int8       ONNX Runtime only: static int8 quantization (QDQ, per channel), calibrated on
                                   the photos that ship with scikit-image, cached like the fp32 graph.

Both take (B, H, W, 3) uint8 pixels and return (B, N) probabilities and, when the model has one, (B, D)
embeddings (inference.ImageToOutputs): one forward pass for both. Beside each cached graph, a small JSON file
says what serving it needs (preprocessing, classes, labels, embedding size, where the weights came from).
"""

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import onnx
import torch

from images import decode_for_model
from inference import LoadedModel, ModelLoadError, preprocess
from onnx_models import first_line, wrap_for_serving
from settings import BackendName, Precision, Settings

logger = logging.getLogger("classify")

EXPORT_VERSION = "5"  # bump when the exported graph (or int8's calibration) changes, so cached files are not reused
MAX_PIXELS: int = Settings.model_fields["max_image_pixels"].default  # what the API allows
MAX_EXPORTED_BATCH = 1024

# Real photos (not drawings or test patterns) in scikit-image's data folder: int8's calibration (the even-numbered
# ones, zoomed and mirrored) and the set its agreement with fp32 is measured on (all of them, as served).
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
          "coins.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png",
          "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
          "retina.jpg", "rocket.jpg", "text.png")


class Outputs(NamedTuple):
    probabilities: np.ndarray  # (B, N) float32
    embeddings: np.ndarray | None  # (B, D) float32, not normalised; None if the model has no embedding


class Backend(Protocol):
    name: BackendName
    precision: Precision

    def run(self, x: np.ndarray) -> Outputs:
        """(B, 224, 224, 3) uint8 -> (B, N) probabilities and (B, D) embeddings."""
        ...


class TorchBackend:
    name: BackendName = "torch"
    precision: Precision = "fp32"

    def __init__(self, model: LoadedModel, threads: int) -> None:
        torch.set_num_threads(threads)
        self.graph = model.graph()

    def run(self, x: np.ndarray) -> Outputs:
        with torch.inference_mode():
            outputs = [output.numpy() for output in self.graph(torch.from_numpy(x))]
        return Outputs(outputs[0], outputs[1] if len(outputs) > 1 else None)


class OnnxBackend:
    name: BackendName = "onnxruntime"

    def __init__(self, path: Path, precision: Precision, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.precision = precision

    def run(self, x: np.ndarray) -> Outputs:
        outputs = self.session.run(None, {self.input_name: x})
        return Outputs(outputs[0], outputs[1] if len(outputs) > 1 else None)


def load_backend(model: LoadedModel, name: BackendName, precision: Precision, threads: int, cache_dir: Path,
                 max_batch: int) -> Backend:
    """The backend asked for, warmed up; torch if ONNX Runtime cannot be had, with a warning that says why.
    A MODEL_ONNX file runs on ONNX Runtime whatever INFERENCE_BACKEND says (there is no torch network)."""
    if model.onnx is not None:
        if name == "torch":
            logger.warning("MODEL_ONNX runs on ONNX Runtime; INFERENCE_BACKEND=torch does not apply to it")
        try:
            return onnx_backend(model, precision, threads, cache_dir, max_batch)
        except Exception as exc:
            logger.debug("ONNX Runtime cannot serve %s", model.onnx.path, exc_info=True)
            raise ModelLoadError(f"MODEL_ONNX={model.onnx.path} cannot be served by ONNX Runtime ({precision}): "
                                 f"{type(exc).__name__}: {first_line(exc)}") from None
    if name == "onnxruntime":
        try:
            return onnx_backend(model, precision, threads, cache_dir, max_batch)
        except Exception:
            logger.warning("ONNX Runtime is unavailable for %s (%s); torch answers instead", model.spec.name,
                           precision, exc_info=True)
    elif precision != "fp32":
        logger.warning("INFERENCE_PRECISION=%s needs ONNX Runtime; torch runs fp32", precision)
    backend = TorchBackend(model, threads)
    warm_up(backend, model.spec.crop, max_batch)
    return backend


def onnx_backend(model: LoadedModel, precision: Precision, threads: int, cache_dir: Path, max_batch: int) -> Backend:
    path = onnx_file(model, precision, cache_dir)
    try:
        backend = OnnxBackend(path, precision, threads)
    except Exception:  # a cached file this ONNX Runtime cannot read (another version made it?): make it anew
        logger.warning("cannot load %s; exporting it again", path, exc_info=True)
        path.unlink()
        backend = OnnxBackend(onnx_file(model, precision, cache_dir), precision, threads)
    warm_up(backend, model.spec.crop, max_batch)  # a session that loads but cannot run falls back here too
    return backend


def warm_up(backend: Backend, side: int, max_batch: int, passes: int = 3) -> None:
    """The first passes of each batch size pay for allocation and kernel selection; nobody's request should."""
    for size in sorted({1, max_batch}):
        for _ in range(passes):
            backend.run(np.zeros((size, side, side, 3), dtype=np.uint8))


def onnx_file(model: LoadedModel, precision: Precision, cache_dir: Path) -> Path:
    """The model's ONNX graph on disk, exported (and quantized) only if no earlier start left one there."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{model.spec.name}-{model.graph_key()[:16]}-torch{torch.__version__}-v{EXPORT_VERSION}"
    fp32_path = cache_dir / f"{stem}-fp32.onnx"
    if not fp32_path.is_file():
        with _atomic_path(fp32_path) as partial:
            if model.onnx is not None:
                logger.info("wrapping %s for serving: %s", model.onnx.path, fp32_path)
                onnx.save(wrap_for_serving(model.onnx, model.spec.crop, model.spec.mean, model.spec.std), partial)
            else:
                logger.info("exporting %s to ONNX: %s", model.spec.name, fp32_path)
                export_onnx(model, partial)
    facts = json.dumps(serving_facts(model))
    facts_path = cache_dir / f"{stem}.json"
    if not facts_path.is_file() or facts_path.read_text() != facts:  # labels and version may change between starts
        with _atomic_path(facts_path) as partial:
            partial.write_text(facts)
    if precision == "fp32":
        return fp32_path
    int8_path = cache_dir / f"{stem}-int8.onnx"
    if not int8_path.is_file():
        logger.info("quantizing %s to int8 (calibrating on %d photos): %s", model.spec.name, len(PHOTOS), int8_path)
        with _atomic_path(int8_path) as partial:
            quantize_int8(fp32_path, partial, model)
    return int8_path


def export_onnx(model: LoadedModel, path: Path) -> None:
    example = torch.zeros((2, model.spec.crop, model.spec.crop, 3), dtype=torch.uint8)  # (B, 224, 224, 3)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORTED_BATCH)
    outputs = ["probabilities", "embedding"] if model.head is not None else ["probabilities"]
    program = torch.onnx.export(model.graph(), (example,), dynamo=True, verbose=False, input_names=["image"],
                                output_names=outputs, dynamic_shapes=({0: batch},))
    program.save(path, external_data=False)  # one self-contained file


def serving_facts(model: LoadedModel) -> dict[str, object]:
    """What serving the cached graph needs besides the graph, as this start serves it (labels, version)."""
    return {"model": model.spec.name, "version": model.version, "weights_digest": model.weights_digest,
            "weights_source": model.weights_source, "preprocessing": model.spec.preprocessing(),
            "classes": model.classes, "labels": list(model.spec.labels),
            "embedding_dimensions": model.embedding_dimensions,
            "max_batch": model.max_batch, "export_version": EXPORT_VERSION}


def quantize_int8(fp32_path: Path, int8_path: Path, model: LoadedModel) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.inputs = ({input_name: x[None]} for x in calibration_inputs(model))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.inputs, None)

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # folds and fuses first, so fewer tensors are quantized
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


def photo_paths() -> list[Path]:
    import skimage

    return [Path(skimage.__file__).parent / "data" / name for name in PHOTOS]


def photo_inputs(model: LoadedModel, paths: list[Path] | None = None, resize: int | None = None) -> list[np.ndarray]:
    """Each photo as the model sees it from the API (or zoomed to another `resize`): (224, 224, 3) uint8."""
    spec = model.spec
    return [preprocess(decode_for_model(path.read_bytes(), MAX_PIXELS, resize or spec.resize, spec.crop,
                                        spec.interpolation)) for path in paths or photo_paths()]


def calibration_inputs(model: LoadedModel) -> Iterator[np.ndarray]:
    """44 inputs with the pixel statistics of real use, none of them an input the agreement is measured on: the
    even-numbered photos zoomed out and in, and mirrored (the odd-numbered ones are never seen)."""
    calibration_photos = photo_paths()[::2]
    for resize in (model.spec.crop, model.spec.resize + 64):
        for x in photo_inputs(model, calibration_photos, resize):
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
