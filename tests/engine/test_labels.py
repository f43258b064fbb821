"""MODEL_LABELS files: the three shapes people have them in, and clear refusals of the rest (labels.py).

The server-level counterparts (a count that differs from the model's classes stops the start-up; labels in
every shape reach the answers) are in test_own_model.py.
"""

from pathlib import Path

import pytest

from engine.labels import MAX_LABEL_CHARS, LabelsError, read_labels


@pytest.mark.parametrize("content", [
    "cat\ndog\nbird\n",
    "\ufeffcat\r\ndog\r\nbird",  # a Windows editor's byte-order mark and line ends
    '["cat", "dog", "bird"]',
    '{"2": "bird", "0": "cat", "1": "dog"}',
    '{"0": ["n02123045", "cat"], "1": ["n02085620", "dog"], "2": "bird"}',  # TorchServe / ImageNet class index
])
def test_every_shape_gives_the_labels_in_class_order(tmp_path, content):
    path = tmp_path / "labels"
    path.write_text(content, encoding="utf-8")
    assert read_labels(path) == ("cat", "dog", "bird")


def test_labels_are_text_passed_on_as_they_are(tmp_path):
    labels = ["<script>alert(1)</script>", "Grüße 🐈", "a \"quoted\", comma'd label", "{not json}"]
    (tmp_path / "labels.txt").write_text("\n".join(labels), encoding="utf-8")
    assert read_labels(tmp_path / "labels.txt") == tuple(labels)


@pytest.mark.parametrize("content, words", [
    (b"cat\n\xff\xfe\n", "not UTF-8 text (byte 4"),
    (b"", "holds no labels"),
    (b"cat\n\ndog\n", "label of class 1 is empty"),
    (("x" * (MAX_LABEL_CHARS + 1)).encode(), f"at most {MAX_LABEL_CHARS}"),
    (b'["cat", 3]', "item 1 is 3"),
    (b'{"0": "cat", "2": "dog"}', "no class 1"),
    (b'{"0": "cat", "00": "dog"}', "class 0 is given twice"),
    (b'{"cat": "0"}', "not a class index"),
    (b'["cat", "dog"', "starts like JSON but is not"),
    (b'"cat"', None),  # not JSON-looking: one label, `"cat"` with its quotes
])
def test_a_bad_labels_file_is_refused_saying_what_is_wrong(tmp_path, content, words):
    path = tmp_path / "labels"
    path.write_bytes(content)
    if words is None:
        assert read_labels(path) == ('"cat"',)
        return
    with pytest.raises(LabelsError, match="MODEL_LABELS=") as refused:
        read_labels(path)
    assert words in str(refused.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(LabelsError, match="no such file"):
        read_labels(Path(tmp_path / "nowhere.txt"))
