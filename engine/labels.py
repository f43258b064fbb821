"""MODEL_LABELS: the names of a model's classes, read from the user's file, in the order of the model's outputs.

    cat                            one label per line (a trailing empty line is fine)
    ["cat", "dog"]                 a JSON list
    {"0": "cat", "1": "dog"}       a JSON object from index to label, like TorchServe's index_to_name.json;
    {"0": ["n02123045", "tabby"]}  a [synset id, label] pair means the label (ImageNet's class index files)

Labels are data from the user: any UTF-8 text up to MAX_LABEL_CHARS, passed on and never interpreted (answers
are JSON, the web page sets them as text). Every problem is a LabelsError whose message names the file and says
what to fix, and the count is checked against the model's classes by the caller, who knows that count.
"""

import json
from pathlib import Path

MAX_LABEL_CHARS = 200  # ImageNet's longest is 62; a 10 MB "label" is a mistake, not a class name
MAX_FILE_BYTES = 16 * 1024 * 1024  # 100,000 classes of 160 bytes


class LabelsError(Exception):
    """The labels file cannot be used; the message names it and what is wrong."""


def read_labels(path: Path) -> tuple[str, ...]:
    """The labels in `path`, by class index."""
    where = f"MODEL_LABELS={path}"
    if not path.is_file():
        raise LabelsError(f"{where}: {'a folder, not a file' if path.is_dir() else 'no such file'}; set it to a "
                          "labels file (one label per line, or JSON).")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise LabelsError(f"{where} is {path.stat().st_size} bytes; a labels file may have {MAX_FILE_BYTES}.")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark from a Windows editor is not a label
    except UnicodeDecodeError as exc:
        raise LabelsError(f"{where} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
                          "save it as UTF-8.") from None
    if text.lstrip()[:1] in ("[", "{"):
        labels = labels_from_json(text, where)
    else:
        labels = labels_from_lines(text)
    if not labels:
        raise LabelsError(f"{where} holds no labels.")
    for index, label in enumerate(labels):
        if not label.strip():
            raise LabelsError(f"{where}: the label of class {index} is empty.")
        if len(label) > MAX_LABEL_CHARS:
            raise LabelsError(f"{where}: the label of class {index} has {len(label)} characters; at most "
                              f"{MAX_LABEL_CHARS} are allowed.")
    return tuple(labels)


def labels_from_lines(text: str) -> list[str]:
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def labels_from_json(text: str, where: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabelsError(f"{where} starts like JSON but is not ({exc.msg} at line {exc.lineno}, column "
                          f"{exc.colno}); write a JSON list, a JSON object, or one label per line.") from None
    if isinstance(data, list):
        return [label_value(value, f"{where}: item {index}") for index, value in enumerate(data)]
    if not isinstance(data, dict):
        raise LabelsError(f"{where} is JSON but neither a list of labels nor an object from index to label.")
    by_index: dict[int, str] = {}
    for key, value in data.items():
        if not (key.isascii() and key.isdigit()):
            raise LabelsError(f"{where}: key {key[:40]!r} is not a class index (0, 1, 2, ...).")
        if int(key) in by_index:
            raise LabelsError(f"{where}: class {int(key)} is given twice.")
        by_index[int(key)] = label_value(value, f"{where}: class {key}")
    missing = sorted(set(range(len(by_index))) - by_index.keys())
    if missing:
        raise LabelsError(f"{where} has {len(by_index)} entries but no class {missing[0]}: the keys must be "
                          f"0 to {len(by_index) - 1}, each once.")
    return [by_index[index] for index in range(len(by_index))]


def label_value(value: object, where: str) -> str:
    """A label, or the second item of a [synset id, label] pair."""
    if isinstance(value, list) and len(value) == 2 and all(isinstance(item, str) for item in value):
        value = value[1]
    if not isinstance(value, str):
        raise LabelsError(f"{where} is {json.dumps(value)[:60]}; a label is a string (or an [id, label] pair).")
    return value
