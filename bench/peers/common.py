"""What every peer server shares with ours, so that only the serving differs: the same cached graph and its
session (engine/runtimes.OnnxBackend: the same ONNX Runtime options), the same decoding (engine/images.py), the
same answer (the five most likely labels).

    PEER_GRAPH=.cache/bench-models/<graph>-fp32.onnx  the graph our server runs; its sidecar JSON beside it
    PEER_THREADS=1                                    ONNX Runtime's threads in each process that runs the graph
    PEER_PROCESSES=2                                  the cores: how many processes of each kind a peer starts

The peers import this from bench/peers/ with the project's root on PYTHONPATH (bench/serving_frameworks.py
starts them so), in a virtualenv of their own (bench/peers/requirements.txt).
"""

import json
import os
from pathlib import Path

import numpy as np

from engine.images import decode_base64, decode_for_model
from engine.runtimes import OnnxBackend
from inference import ModelSpec, preprocess, top_predictions

GRAPH = Path(os.environ["PEER_GRAPH"])
THREADS = int(os.environ.get("PEER_THREADS", "1"))
PROCESSES = int(os.environ.get("PEER_PROCESSES", "2"))  # the cores: a peer's processes of each kind
MAX_PIXELS = 25_000_000  # the server's MAX_IMAGE_PIXELS
TOP_K = 5
BATCH = 8  # what the peers that batch are given, as ours: MAX_BATCH
BATCH_WAIT_S = 0.005  # and their wait for a batch to fill (ours: a batch waits only for images on their way)


def graph_spec() -> ModelSpec:
    """The model as the graph's sidecar describes it: its preprocessing and labels."""
    sidecar = json.loads(GRAPH.with_name(GRAPH.name.replace("-fp32.onnx", ".json")).read_text())
    return ModelSpec.from_preprocessing(sidecar["model"], sidecar["preprocessing"], tuple(sidecar["labels"]))


SPEC = graph_spec()


def session() -> OnnxBackend:
    return OnnxBackend(GRAPH, "fp32", THREADS)


def image_input(image: str) -> np.ndarray:
    """The request's base64 image as the model's input: (224, 224, 3) uint8."""
    return preprocess(decode_for_model(decode_base64(image), MAX_PIXELS, SPEC.resize, SPEC.crop, SPEC.interpolation))


def answer(probabilities: np.ndarray) -> dict:
    return {"model": SPEC.name, "predictions": [prediction.model_dump()
                                                for prediction in top_predictions(probabilities, SPEC.labels, TOP_K)]}
