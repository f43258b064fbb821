"""MODEL_ONNX: a classifier trained anywhere and exported to ONNX, checked at start-up and wrapped to be served.

    read_onnx_classifier  the file's input must be float32 (B, 3, H, W) and its class output (B, N); an
                          embedding output (MODEL_EMBEDDING_OUTPUT) may be (B, D) or (B, D, 1, 1)
    check_output_kind     the class output, run on photos, is what MODEL_OUTPUT says: probabilities lie in
                          [0, 1] and sum to 1 (a softmax over probabilities would flatten every answer)
    wrap_for_serving      the same graph behind the server's own input and outputs: (B, H, W, 3) uint8 pixels
                          in; probabilities (B, N) and, if named, the embedding (B, D) out

The server's graphs take raw pixels and normalise inside (networks.ImageToOutputs), so the request path does no
float work and the batcher, int8 quantization and the graph cache serve a user's file exactly as they serve an
exported torchvision model. Wrapping adds five nodes to the front and a softmax to the end (for logits);
the user's nodes are not touched. A fixed batch axis of 1 is allowed (the caller serves one image at a time).
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.photos import photo_inputs, photo_paths
from inference import ModelSpec, OnnxClassifier, OutputKind, first_line, onnx_digest

PREFIX = "classify_server_"  # names of the nodes and tensors added here, kept apart from the user's


class OnnxModelError(Exception):
    """The ONNX file cannot be served; the message names the setting, the shapes found and the ones needed."""


def read_onnx_classifier(path: Path, crop: int, output_kind: OutputKind,
                         embedding_output: str | None) -> OnnxClassifier:
    """The file's shapes, checked against what the server feeds it (MODEL_CROP) and needs from it."""
    where = f"MODEL_ONNX={path}"
    if not path.is_file():
        raise OnnxModelError(f"{where}: {'a folder, not a file' if path.is_dir() else 'no such file'}; set it to "
                             "an .onnx file.")
    try:
        model = onnx.load(str(path))  # external weights (a .data file beside it) load too
    except Exception as exc:  # protobuf's DecodeError, a missing external file...
        raise OnnxModelError(f"{where} is not an ONNX model that loads ({type(exc).__name__}: {first_line(exc)})."
                             ) from None
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]  # old exports list weights as inputs
    if len(inputs) != 1:
        raise OnnxModelError(f"{where} has {len(inputs)} inputs ({describe(inputs)}); the server feeds one image "
                             "input, float32 (B, 3, H, W).")
    [image] = inputs
    shape = dims(image)
    if image.type.tensor_type.elem_type != TensorProto.FLOAT or len(shape) != 4 or shape[1] != 3:
        is_channels_last = len(shape) == 4 and shape[3] == 3
        hint = " (channels last: with tf2onnx, export with --inputs-as-nchw)" if is_channels_last else ""
        raise OnnxModelError(f"{where}: its input {describe([image])} is not float32 (B, 3, H, W){hint}.")
    if any(isinstance(side, int) and side != crop for side in shape[2:]):
        raise OnnxModelError(f"{where}: its input {describe([image])} takes {shape[2]}x{shape[3]} images, but "
                             f"MODEL_CROP={crop}: set MODEL_CROP (and MODEL_RESIZE) to its size.")
    if isinstance(shape[0], int) and shape[0] != 1:
        raise OnnxModelError(f"{where}: its input {describe([image])} has a batch axis fixed to {shape[0]}; export "
                             "it with a dynamic batch axis (or a batch of 1).")
    outputs = {value.name: value for value in graph.output}
    if embedding_output is not None and embedding_output not in outputs:
        raise OnnxModelError(f"MODEL_EMBEDDING_OUTPUT={embedding_output} is not an output of {path.name}, whose "
                             f"outputs are {describe(graph.output)}.")
    class_outputs = [value for name, value in outputs.items() if name != embedding_output]
    if len(class_outputs) != 1:
        raise OnnxModelError(f"{where} has outputs {describe(graph.output)}; the server needs one (B, N) output of "
                             "class scores, and MODEL_EMBEDDING_OUTPUT must name any other.")
    [scores] = class_outputs
    classes = dims(scores)
    if len(classes) != 2 or not isinstance(classes[1], int):
        raise OnnxModelError(f"{where}: its output {describe([scores])} is not (B, N) with a fixed number N of "
                             "classes.")
    embedding_dimensions = None
    if embedding_output is not None:
        features = dims(outputs[embedding_output])
        if len(features) < 2 or not all(isinstance(side, int) for side in features[1:]):
            raise OnnxModelError(f"MODEL_EMBEDDING_OUTPUT={embedding_output}: the output "
                                 f"{describe([outputs[embedding_output]])} is not (B, D) or (B, D, 1, 1) with fixed D.")
        embedding_dimensions = int(np.prod(features[1:]))
    return OnnxClassifier(path, onnx_digest(path), image.name, scores.name, embedding_output, output_kind,
                          classes[1], embedding_dimensions, is_batch_fixed=shape[0] == 1)


PROBABILITY_TOLERANCE = 1e-3  # float32 softmaxes sum to 1 within 1e-6; a model's own rounding, within this
CHECK_PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")  # scikit-image's


def check_output_kind(classifier: OnnxClassifier, spec: ModelSpec) -> None:
    """The class output on a few photos, as the served graph will be fed them, against MODEL_OUTPUT: served as
    probabilities, logits would fail every answer (confidences over 1); probabilities served as logits would be
    softmaxed again, into nearly equal confidences. Refused in one line naming MODEL_OUTPUT."""
    import onnxruntime as ort

    mean, std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)
    images = [((x / 255 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)  # (1, 3, H, W)
              for x in photo_inputs(spec, [path for path in photo_paths() if path.name in CHECK_PHOTOS])]
    try:
        session = ort.InferenceSession(str(classifier.path), providers=["CPUExecutionProvider"])
        scores = np.concatenate([session.run([classifier.class_output], {classifier.input_name: x})[0]
                                 for x in images])
    except Exception as exc:
        raise OnnxModelError(f"MODEL_ONNX={classifier.path} cannot be run by ONNX Runtime ({type(exc).__name__}: "
                             f"{first_line(exc)}).") from None
    sums = scores.sum(axis=1)
    is_probabilities = bool(scores.min() >= -PROBABILITY_TOLERANCE and scores.max() <= 1 + PROBABILITY_TOLERANCE
                            and np.abs(sums - 1).max() <= PROBABILITY_TOLERANCE)
    seen = (f"on {len(images)} photos its output '{classifier.class_output}' ranges from {scores.min():.3g} to "
            f"{scores.max():.3g}, each image's summing to {sums.min():.3g}-{sums.max():.3g}")
    if classifier.output_kind == "probabilities" and not is_probabilities:
        raise OnnxModelError(f"MODEL_OUTPUT=probabilities, but MODEL_ONNX={classifier.path} gives no probabilities: "
                             f"{seen}; set MODEL_OUTPUT=logits (the server then applies softmax).")
    if classifier.output_kind == "logits" and is_probabilities:
        raise OnnxModelError(f"MODEL_OUTPUT=logits (the default), but MODEL_ONNX={classifier.path} gives "
                             f"probabilities already: {seen}; set MODEL_OUTPUT=probabilities (a softmax over them "
                             "would make every class nearly equally likely).")


def wrap_for_serving(classifier: OnnxClassifier, crop: int, mean: tuple[float, ...],
                     std: tuple[float, ...]) -> onnx.ModelProto:
    """The user's graph behind uint8 (B, crop, crop, 3) pixels, normalised as (x / 255 - mean) / std in one
    multiply-add, with a softmax after logits: outputs probabilities, then the embedding if there is one."""
    model = onnx.load(str(classifier.path))
    graph = model.graph
    batch: int | str = 1 if classifier.is_batch_fixed else f"{PREFIX}batch"
    scale = (1 / (255 * np.array(std, dtype=np.float32))).reshape(1, 3, 1, 1)
    shift = (np.array(mean, dtype=np.float32) / np.array(std, dtype=np.float32)).reshape(1, 3, 1, 1)
    graph.initializer.extend([numpy_helper.from_array(scale.astype(np.float32), f"{PREFIX}scale"),
                              numpy_helper.from_array(shift.astype(np.float32), f"{PREFIX}shift")])
    taken = {value.name for value in graph.input} | {name for node in graph.node for name in node.output}
    pixels = "image" if "image" not in taken else f"{PREFIX}image"  # the backend asks the session for the name
    front = [
        helper.make_node("Cast", [pixels], [f"{PREFIX}float"], to=TensorProto.FLOAT, name=f"{PREFIX}cast"),
        helper.make_node("Transpose", [f"{PREFIX}float"], [f"{PREFIX}nchw"], perm=[0, 3, 1, 2], name=f"{PREFIX}nchw"),
        helper.make_node("Mul", [f"{PREFIX}nchw", f"{PREFIX}scale"], [f"{PREFIX}scaled"], name=f"{PREFIX}scale"),
        helper.make_node("Sub", [f"{PREFIX}scaled", f"{PREFIX}shift"], [classifier.input_name], name=f"{PREFIX}shift"),
    ]
    back = []
    probabilities = classifier.class_output
    if classifier.output_kind == "logits":
        probabilities = f"{PREFIX}probabilities"
        back.append(helper.make_node("Softmax", [classifier.class_output], [probabilities], axis=1,
                                     name=f"{PREFIX}softmax"))
    outputs = [helper.make_tensor_value_info(probabilities, TensorProto.FLOAT, [batch, classifier.classes])]
    if classifier.embedding_output is not None:
        back.append(helper.make_node("Flatten", [classifier.embedding_output], [f"{PREFIX}embedding"], axis=1,
                                     name=f"{PREFIX}flatten"))
        outputs.append(helper.make_tensor_value_info(f"{PREFIX}embedding", TensorProto.FLOAT,
                                                     [batch, classifier.embedding_dimensions]))
    nodes = front + list(graph.node) + back
    del graph.node[:]
    graph.node.extend(nodes)
    kept_inputs = [value for value in graph.input if value.name != classifier.input_name]
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info(pixels, TensorProto.UINT8, [batch, crop, crop, 3]), *kept_inputs])
    del graph.output[:]
    graph.output.extend(outputs)
    return model


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """A tensor's shape: fixed sides as ints, named or unknown ones as their name or "?"."""
    return [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?")
            for dim in value.type.tensor_type.shape.dim]


def describe(values: object) -> str:
    shapes = [f"'{value.name}' ({', '.join(map(str, dims(value)))})" for value in values]  # type: ignore[attr-defined]
    return ", ".join(shapes) or "none"
