"""What runs a forward pass: the `Backend` both runtimes are, the `Outputs` they give, and ONNX Runtime's session
(`OnnxBackend`) as the server sets it up; torch's is networks.TorchBackend. Nothing here imports torch or onnx.

Both take (B, H, W, 3) uint8 pixels and return (B, N) probabilities and, when the model has one, (B, D)
embeddings (networks.ImageToOutputs): one forward pass for both.
"""

import ctypes
import logging
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import NamedTuple, Protocol

import numpy as np

from settings import BackendName, Precision

logger = logging.getLogger("classify")


class Outputs(NamedTuple):
    probabilities: np.ndarray  # (B, N) float32
    embeddings: np.ndarray | None  # (B, D) float32, not normalised; None if the model has no embedding


class Backend(Protocol):
    name: BackendName
    precision: Precision

    def run(self, x: np.ndarray) -> Outputs:
        """(B, 224, 224, 3) uint8 -> (B, N) probabilities and (B, D) embeddings."""
        ...


class OnnxBackend:
    name: BackendName = "onnxruntime"

    def __init__(self, path: Path, precision: Precision, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # What a session keeps is mostly the activations of its largest batch. ORT's default arena grows in powers
        # of two and, with a memory pattern planned per input shape, keeps a block for every batch size it has
        # run: EfficientNet-Lite0 held 101 MB of activations after batches of 1 to 8, against 49 MB in an arena
        # that grows by what is asked and no patterns, at the same CPU per image (10.0 ms, 1 thread, b1 and b8).
        options.enable_mem_pattern = False
        # No spinning: ORT's pool threads spin between batches, on the cores the request path needs next. With 8
        # clients (EfficientNet-Lite0 fp32, 2 cores shared with other work) the model cost 18.3 ms of CPU per image
        # spinning against 11.5 not, at the same batch sizes, and the server did 43 requests/s against 62.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.use_env_allocators", "1")
        _register_exact_arena(ort)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        release_freed_memory()  # the graph file's bytes and the unoptimised weights, freed once the session is built
        self.input_name = self.session.get_inputs()[0].name
        self.precision = precision

    def run(self, x: np.ndarray) -> Outputs:
        outputs = self.session.run(None, {self.input_name: x})
        return Outputs(outputs[0], outputs[1] if len(outputs) > 1 else None)


@cache  # once per process: ONNX Runtime refuses a second allocator for the same device
def _register_exact_arena(ort: ModuleType) -> None:
    """One CPU arena for the process's sessions, extended by exactly what is asked (kSameAsRequested)."""
    config = ort.OrtArenaCfg({"arena_extend_strategy": 1, "initial_chunk_size_bytes": 1 << 20})
    ort.create_and_register_allocator(ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                                        ort.OrtMemType.DEFAULT), config)


def release_freed_memory() -> None:
    """Hands memory the process has freed back to the OS: glibc keeps it in its heaps otherwise (25 MB after an
    EfficientNet-Lite0 session is built)."""
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to hand back this way
            pass


def warm_up(backend: Backend, side: int, max_batch: int, passes: int = 1) -> None:
    """The first pass of each batch size pays for allocation (the arena grows to it); nobody's request should.
    Later passes cost what the second does (ResNet-18, batch 8: 323 ms, then 286 to 306), so one is enough."""
    for size in sorted({1, max_batch}):
        for _ in range(passes):
            backend.run(np.zeros((size, side, side, 3), dtype=np.uint8))


def warn_one_at_a_time(path: Path) -> None:
    logger.warning("MODEL_ONNX=%s has a batch axis fixed to 1: images are served one at a time (MAX_BATCH does not "
                   "apply). Export it with a dynamic batch axis to batch them.", path)


def is_torch_loaded() -> bool:
    """Whether this process has imported torch (for the start-up line: a cached graph is served without it)."""
    return "torch" in sys.modules
