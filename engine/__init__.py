"""The engine: from an image's bytes to the model's answer, and the model itself (inference.py, beside this
package, is the model as served: its spec, labels, version and what its outputs become).

It owns decoding and its bounds, the batches, the runtimes, and how the model is found, exported, cached and
loaded. It may import inference.py, operations/ and settings.py; it knows nothing of HTTP routes, keys or the
ledger.

    images.py       base64 -> bytes -> the upright RGB crop, with the checks that bound a decode's cost
    batching.py     the batcher: waiting images formed into batches, run on the model's threads
    runtimes.py     what runs a forward pass: ONNX Runtime's session (torch's is in networks.py)
    backends.py     the model loaded at start-up, and its runtime: a cached graph, an export, int8, or torch
    graph_cache.py  exported graphs kept in MODEL_CACHE_DIR, so a restart serves them without torch
    weights.py      where the weights come from (MODEL_WEIGHTS, torchvision's cache or download, the fallback)
    networks.py     the model built with torch: to export its graph, or to run it
    onnx_models.py  MODEL_ONNX: a user's ONNX file, checked and wrapped for serving
    labels.py       MODEL_LABELS: the classes' names
    photos.py       scikit-image's photos as model inputs: int8's calibration, an ONNX file's output check
"""
