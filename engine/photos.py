"""scikit-image's photos as the model sees them from the API: what int8 is calibrated on by default (backends.py),
and what an ONNX file's outputs are checked on (onnx_models.py)."""

from pathlib import Path

import numpy as np

from engine.images import decode_for_model
from inference import ModelSpec, preprocess
from settings import Settings

MAX_PIXELS: int = Settings.model_fields["max_image_pixels"].default  # what the API allows
# Real photos (not drawings or test patterns) in scikit-image's data folder: int8's calibration (the even-numbered
# ones, zoomed and mirrored) and the set its agreement with fp32 is measured on (all of them, as served).
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
          "coins.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png",
          "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
          "retina.jpg", "rocket.jpg", "text.png")


def photo_paths() -> list[Path]:
    import skimage

    return [Path(skimage.__file__).parent / "data" / name for name in PHOTOS]


def photo_inputs(spec: ModelSpec, paths: list[Path] | None = None, resize: int | None = None) -> list[np.ndarray]:
    """Each photo as the model sees it from the API (or zoomed to another `resize`): (224, 224, 3) uint8."""
    return [preprocess(decode_for_model(path.read_bytes(), MAX_PIXELS, resize or spec.resize, spec.crop,
                                        spec.interpolation)) for path in paths or photo_paths()]
