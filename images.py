"""From what a client sends to an upright RGB picture: base64 text (or a data URL) -> bytes -> decoded image.

This is where hostile input meets the C parsers, so each step is as cheap and as early as it can be:
the pixel count is checked from the header before a pixel is decoded, only common photo formats are parsed,
and every failure is an `ApiError` (4xx) whose message says what to send instead.
"""

import base64
import binascii
import io
import logging
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import ApiError

logger = logging.getLogger("classify")

# Formats people send; never EPS (it runs Ghostscript), PSD, ICNS... each parser is attack surface.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[\w.+-]+)*(?P<base64>;base64)?,", re.IGNORECASE)
WHITESPACE = re.compile(r"\s+")
URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}

# open_image checks the pixel count itself, against a lower cap than the one Pillow only warns about.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_base64(text: str) -> bytes:
    """Bytes of a base64 string or `data:image/...;base64,` URL; tolerates line breaks, url-safe letters, no padding."""
    if text[:5].lower() == "data:":
        match = DATA_URL.match(text)
        if match is None or match["base64"] is None:
            raise ApiError(400, "invalid_data_url", "Only base64 data URLs are accepted: `data:image/png;base64,<data>`.")
        text = text[match.end():]
    if not text.strip():
        raise ApiError(400, "empty_image", "`image` holds no data: send the image file's bytes, base64-encoded.")
    try:
        return binascii.a2b_base64(text, strict_mode=True)  # the common case, at C speed
    except (binascii.Error, ValueError):
        pass
    cleaned = WHITESPACE.sub("", text).translate(URL_SAFE_TO_STANDARD)
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64",
                       "`image` is not valid base64: encode the file's bytes with base64 (e.g. `base64 -w0 photo.jpg`).") from None


def open_image(data: bytes, max_pixels: int, needed_side: int) -> Image.Image:
    """The first frame of `data` as an upright RGB image, decoded no larger than needed for a `needed_side` crop."""
    if not data:
        raise ApiError(400, "empty_image", "`image` decodes to zero bytes: send the image file's bytes, base64-encoded.")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise ApiError(400, "not_an_image",
                       "`image` is not an image this server reads: send JPEG, PNG, GIF, WEBP, BMP or TIFF.") from None
    except Image.DecompressionBombError as exc:
        raise ApiError(413, "image_too_large", f"{exc} Send a smaller image.") from None
    except Exception as exc:  # a header that starts like a known format and then breaks its parser
        raise _corrupt(exc) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(413, "image_too_large",
                       f"The image is {width}x{height} ({width * height / 1e6:.1f} MP); this server accepts up to "
                       f"{max_pixels / 1e6:.1f} MP (MAX_IMAGE_PIXELS). Downscale it before sending.")
    try:
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale when the crop needs no more (a 12 MP photo: ~10x faster).
        scale = needed_side / min(width, height)
        image.draft(None, (max(1, int(width * scale)), max(1, int(height * scale))))
        image.load()
        return to_rgb(upright(image))
    except Exception as exc:  # Pillow's decoders raise many types on bad data; all of them mean the client's bytes
        raise _corrupt(exc) from None


def _corrupt(exc: Exception) -> ApiError:
    logger.debug("image failed to decode", exc_info=exc)
    return ApiError(400, "corrupt_image",
                    f"The image could not be decoded ({exc}); it may be truncated or corrupt. Send the whole file.")


def upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block should not cost the user an otherwise good photo
        logger.debug("ignoring unreadable EXIF orientation", exc_info=exc)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for the model: transparency over white, 16- and 32-bit and float pixels scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return image.convert("RGB")


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    values = pixels.astype(np.float32)
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and values.max(initial=0) > 255):
        values = values / 257  # 0..65535 -> 0..255
    elif mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255  # float images are usually 0..1
    return np.clip(values, 0, 255).astype(np.uint8)
