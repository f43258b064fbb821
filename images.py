"""From what a client sends to the picture the model sees: base64 text -> bytes -> the upright RGB centre crop.

This is where hostile input meets the C parsers, so each check comes as early and as cheaply as it can:
the size and the structure that make decoding expensive (pixels, sides, JPEG scans, TIFF strips) are read
from the header before a pixel is decoded, only common photo formats are parsed at all, and every failure is
an `ApiError` (4xx) whose message says what to send instead.
"""

import base64
import binascii
import io
import logging
import re
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from errors import ApiError

logger = logging.getLogger("classify")

# Formats people send; never EPS (it runs Ghostscript), PSD, ICNS... each parser is attack surface.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
MAX_SIDE = 65_535  # the JPEG and GIF maximum; taller images cost Pillow bytes per row whatever their width
MAX_JPEG_SCANS = 100  # progressive JPEGs have about 10; thousands of tiny scans cost seconds each
MAX_TIFF_CHUNKS = 100_000  # strips or tiles; Pillow builds a Python object per entry when it opens the file

DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[\w.+-]+)*(?P<base64>;base64)?,", re.IGNORECASE)
WHITESPACE = re.compile(r"\s+")
URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
# EXIF orientation -> the transpose that makes the picture upright (as in ImageOps.exif_transpose)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}

# open_checked counts pixels itself, against a lower cap than the one Pillow only warns about.
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


def decode_for_model(data: bytes, max_pixels: int, resize: int, crop: int, resample: Image.Resampling) -> Image.Image:
    """The RGB `crop` x `crop` picture the model sees: "scale the shorter side to `resize`, take the centre
    square of `crop`", done as one resize of that square's box in the original. A 1x4000 image costs a 224x224
    resize, not a 256x1024000 one; orientation and colour conversion touch only the small crop (palette, 1-bit
    and colour-keyed images excepted: resize needs them converted whole first).
    """
    image = open_checked(data, max_pixels)
    orientation = exif_orientation(image)
    width, height = image.size
    try:
        scale = resize / min(image.size)
        image.draft(None, (max(1, int(image.width * scale)), max(1, int(image.height * scale))))  # JPEG: decode at 1/2..1/8
        image.load()
        if image.mode in ("1", "P", "PA") or ("transparency" in image.info and image.mode in ("L", "RGB")):
            # resize() would use nearest-neighbour on these, or lose the transparent colour: convert them whole
            image = image.convert("L" if image.mode == "1" else "RGBA")
        upright_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        left, top, right, bottom = stored_box(crop_box(*upright_size, resize, crop), orientation, width, height)
        x, y = image.width / width, image.height / height  # a drafted JPEG is smaller than its header says
        small = image.resize((crop, crop), resample, box=(left * x, top * y, right * x, bottom * y))
        if orientation in UPRIGHT:
            small = small.transpose(UPRIGHT[orientation])
        return to_rgb(small)
    except Exception as exc:  # Pillow's decoders raise many types on bad data; all of them mean the client's bytes
        raise corrupt(exc) from None


def crop_box(width: int, height: int, resize: int, crop: int) -> tuple[float, float, float, float]:
    """The centre `crop` square of the picture scaled to a shorter side of `resize`, in the picture's own pixels.
    Rounded as torchvision rounds (Resize's whole-pixel size, CenterCrop's rounded offset), so the model sees
    what torchvision's transforms, which it was trained with, would have shown it."""
    short, long = sorted((width, height))
    scaled_long = int(resize * long / short)
    scaled_width, scaled_height = (resize, scaled_long) if width <= height else (scaled_long, resize)
    left, top = round((scaled_width - crop) / 2), round((scaled_height - crop) / 2)
    x, y = width / scaled_width, height / scaled_height
    return left * x, top * y, (left + crop) * x, (top + crop) * y


def stored_box(box: tuple[float, float, float, float], orientation: int, width: int,
               height: int) -> tuple[float, float, float, float]:
    """A box of the upright picture, as the box of the stored `width` x `height` one that turns (UPRIGHT) into it."""
    left, top, right, bottom = box
    return {2: (width - right, top, width - left, bottom),
            3: (width - right, height - bottom, width - left, height - top),
            4: (left, height - bottom, right, height - top),
            5: (top, left, bottom, right),
            6: (top, height - right, bottom, height - left),
            7: (width - bottom, height - right, width - top, height - left),
            8: (width - bottom, left, width - top, right)}.get(orientation, box)


def exif_orientation(image: Image.Image) -> int:
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception as exc:  # a broken EXIF block should not cost the user an otherwise good photo
        logger.debug("ignoring unreadable EXIF", exc_info=exc)
        return 1
    return orientation if isinstance(orientation, int) else 1


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read, refused if decoding it would cost too much memory or time."""
    if not data:
        raise ApiError(400, "empty_image", "`image` decodes to zero bytes: send the image file's bytes, base64-encoded.")
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+") and tiff_chunk_count(data) > MAX_TIFF_CHUNKS:
        raise ApiError(400, "image_too_complex", f"This TIFF is split into more than {MAX_TIFF_CHUNKS} strips or tiles; "
                                                 "save it with larger strips, or as PNG or JPEG.")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ApiError(400, "not_an_image",
                       "`image` is not an image this server reads: send JPEG, PNG, GIF, WEBP, BMP or TIFF.") from None
    except Image.DecompressionBombError:
        raise too_many_pixels(f"over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP", max_pixels) from None
    except Exception as exc:  # a header that starts like a known format and then breaks its parser
        raise corrupt(exc) from None
    width, height = image.size
    if width * height > max_pixels or max(width, height) > MAX_SIDE:
        raise too_many_pixels(f"{width}x{height} ({width * height / 1e6:.1f} MP)", max_pixels)
    if image.format == "JPEG" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        raise ApiError(400, "image_too_complex", f"This JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are accepted "
                                                 "(a progressive JPEG has about 10). Save it again as a baseline JPEG.")
    return image


def tiff_chunk_count(data: bytes) -> int:
    """The largest strip or tile count in a TIFF's first directory, read without Pillow (which builds them all)."""
    try:
        order = "<" if data[:2] == b"II" else ">"
        if data[2:4] in (b"*\x00", b"\x00*"):  # classic TIFF: 16-bit entry count, 12-byte entries
            (offset,) = struct.unpack_from(order + "I", data, 4)
            count_format, entry_format, entry_size = "H", "HHI", 12
        else:  # BigTIFF
            (offset,) = struct.unpack_from(order + "Q", data, 8)
            count_format, entry_format, entry_size = "Q", "HHQ", 20
        (entries,) = struct.unpack_from(order + count_format, data, offset)
        first = offset + struct.calcsize(count_format)
        counts = [struct.unpack_from(order + entry_format, data, first + i * entry_size)
                  for i in range(min(entries, 1000))]
    except struct.error:
        return 0  # too short to say: Pillow will refuse it
    return max((count for tag, _, count in counts if tag in (273, 279, 324, 325)), default=0)  # offsets, byte counts


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for the model: transparency over white, 16- and 32-bit and float pixels scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if "A" in image.getbands():
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return image.convert("RGB")


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    values = np.nan_to_num(pixels.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and values.max(initial=0) > 255):
        values = values / 257  # 0..65535 -> 0..255
    elif mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255  # float images are usually 0..1
    return np.clip(values, 0, 255).astype(np.uint8)


def too_many_pixels(size: str, max_pixels: int) -> ApiError:
    return ApiError(413, "image_too_large", f"The image is {size}; this server accepts up to {max_pixels / 1e6:.1f} MP "
                                            f"(MAX_IMAGE_PIXELS) and {MAX_SIDE} pixels a side. Downscale it before sending.")


def corrupt(exc: Exception) -> ApiError:
    logger.debug("image failed to decode", exc_info=exc)
    return ApiError(400, "corrupt_image",
                    f"The image could not be decoded ({exc}); it may be truncated or corrupt. Send the whole file.")
