"""From what a client sends to the picture the model sees: base64 text -> bytes -> the upright RGB centre crop.

This is where hostile input meets the parsers, so each check comes as early and as cheaply as it can: the
size and the structure that make decoding expensive (pixels, sides, JPEG scans, TIFF strips, and the
segments, chunks and blocks Pillow walks in Python) are read from the bytes before Pillow reads them, only
common photo formats are parsed at all, and every failure is an `ApiError` (4xx) whose message says what to
send instead.
"""

import base64
import binascii
import io
import logging
import math
import re
import struct
import warnings

import numpy as np
import pybase64
from PIL import Image, UnidentifiedImageError
from PIL.TiffImagePlugin import PREFIXES as PILLOW_TIFF_PREFIXES

from operations.errors import ApiError

logger = logging.getLogger("classify")

# Formats people send; never EPS (it runs Ghostscript), PSD, ICNS... each parser is attack surface.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
MAX_SIDE = 65_535  # the JPEG and GIF maximum; taller images cost Pillow bytes per row whatever their width
MAX_JPEG_SCANS = 100  # progressive JPEGs have about 10; thousands of tiny scans cost seconds each
MAX_TIFF_CHUNKS = 100_000  # strips or tiles; Pillow builds a Python object per entry when it opens the file
MAX_TIFF_ENTRIES = 65_535  # per directory: classic TIFF's most; a BigTIFF may declare billions
MAX_TIFF_DIRECTORIES = 1_000  # followed along the chain; decoding reads only the first
# JPEG segments before the image data, PNG chunks, GIF blocks before the first image, and stray bytes between
# them: Pillow goes once round a Python loop for each (and keeps JPEG's APP and COM segments, PNG's private
# chunks, GIF's comments), so millions of empty ones cost seconds and hundreds of MB. Photos have dozens; a
# 20 MB PNG in libpng's 8 KB chunks has 2,600.
MAX_PARSED_PARTS = 10_000

# How Pillow tells its parsers apart: by these first bytes, not by name (an MPO is JPEG frames; Pillow also
# opens TIFFs whose header mixes up its byte order).
TIFF_PREFIXES = tuple(PILLOW_TIFF_PREFIXES)
JPEG_START = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
TIFF_CHUNK_TAGS = (273, 279, 324, 325)  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
JPEG_MARKERS_WITHOUT_LENGTH = {0x00, 0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)}  # as Pillow's MARKER table has them

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
    # The common case, with pybase64: SIMD, 65 times binascii's speed (a 12 MP photo's 5.3 MB of base64 in 0.23
    # ms against 15), and as strict (anything but the alphabet and its due padding is an error).
    try:
        return pybase64.b64decode(text, validate=True)
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
    # Pillow turns a TIFF upright itself as it loads it, and reports its upright size
    orientation = 1 if image.format == "TIFF" else exif_orientation(image)
    width, height = image.size
    try:
        scale = resize / min(image.size)
        image.draft(None, (max(1, int(image.width * scale)), max(1, int(image.height * scale))))  # JPEG: decode at 1/2..1/8
        image.load()
        if image.mode in ("1", "P", "PA") or ("transparency" in image.info and image.mode in ("L", "RGB")):
            # resize() would use nearest-neighbour on these, or lose the transparent colour: convert them whole
            image = image.convert("L" if image.mode == "1" else "RGBA")
        # How to scale 32-bit and float pixels is read from the whole picture: resizing overshoots near edges
        highest = highest_value(image) if image.mode in ("I", "F") else 0.0
        upright_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        left, top, right, bottom = stored_box(crop_box(*upright_size, resize, crop), orientation, width, height)
        x, y = image.width / width, image.height / height  # a drafted JPEG is smaller than its header says
        small = image.resize((crop, crop), resample, box=(left * x, top * y, right * x, bottom * y))
        if orientation in UPRIGHT:
            small = small.transpose(UPRIGHT[orientation])
        return to_rgb(small, highest)
    except Exception as exc:  # Pillow's decoders raise many types on bad data; all of them mean the client's bytes
        raise corrupt(exc) from None


def highest_value(image: Image.Image) -> float:
    """The highest finite pixel value: one infinite pixel must not decide how the others are scaled."""
    highest = image.getextrema()[1]
    if not math.isfinite(highest):  # NaN (Pillow's extrema turn NaN when the first pixel is) or infinite
        pixels = np.asarray(image)
        highest = float(pixels[np.isfinite(pixels)].max(initial=0))
    return highest


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
    check_structure(data)
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
    return image


def check_structure(data: bytes) -> None:
    """Refuses, from the bytes alone, a file whose structure would cost Pillow seconds or hundreds of MB to walk
    before a pixel is decoded. Each walk below stops once past its cap, so it costs little itself."""
    if data.startswith(TIFF_PREFIXES):
        entries, chunks = tiff_costs(data)
        if entries > MAX_TIFF_ENTRIES:
            raise too_complex(f"This TIFF has a directory of {entries} entries; at most {MAX_TIFF_ENTRIES} are "
                              "accepted. Save it again, or as PNG or JPEG.")
        if chunks > MAX_TIFF_CHUNKS:
            raise too_complex(f"This TIFF is split into more than {MAX_TIFF_CHUNKS} strips or tiles; "
                              "save it with larger strips, or as PNG or JPEG.")
    elif data.startswith(JPEG_START):
        if (scans := jpeg_scan_count(data)) > MAX_JPEG_SCANS:
            raise too_complex(f"This JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are accepted "
                              "(a progressive JPEG has about 10). Save it again as a baseline JPEG.")
        if jpeg_header_parts(data) > MAX_PARSED_PARTS:
            raise too_complex(f"This JPEG has more than {MAX_PARSED_PARTS} segments (or stray bytes) before its "
                              "image data; a photo has a few dozen. Save it again without the extra metadata.")
    elif data.startswith(PNG_SIGNATURE):
        if png_chunk_count(data) > MAX_PARSED_PARTS:
            raise too_complex(f"This PNG has more than {MAX_PARSED_PARTS} chunks; a photo has a few dozen. "
                              "Save it again without the extra metadata.")
    elif data.startswith(GIF_SIGNATURES):
        if gif_block_count(data) > MAX_PARSED_PARTS:
            raise too_complex(f"This GIF has more than {MAX_PARSED_PARTS} blocks before its first image; "
                              "save it again without the extra metadata.")


def tiff_costs(data: bytes) -> tuple[int, int]:
    """(the most entries a directory declares, the most strips or tiles one lists), over every directory Pillow
    may read: the chain of next-directory offsets from the header, read by Pillow's rules (byte order from the
    first two bytes, BigTIFF only when the third is 0x2B, every entry of a directory, a directory cut short by
    the end of the file ends the chain, and so does a loop)."""
    order = "<" if data[:2] == b"II" else ">"
    is_big = data[2] == 0x2B
    count_format, offset_format = ("Q", "Q") if is_big else ("H", "I")
    entry = np.dtype([("tag", order + "u2"), ("type", order + "u2"), ("count", order + ("u8" if is_big else "u4")),
                      ("value", "V8" if is_big else "V4")])
    most_entries = most_chunks = 0
    seen: set[int] = set()
    try:
        (offset,) = struct.unpack_from(order + offset_format, data, 8 if is_big else 4)
        while offset and offset not in seen and len(seen) < MAX_TIFF_DIRECTORIES:
            seen.add(offset)
            (declared,) = struct.unpack_from(order + count_format, data, offset)
            most_entries = max(most_entries, declared)
            first = offset + struct.calcsize(count_format)
            present = min(declared, MAX_TIFF_ENTRIES, max(0, len(data) - first) // entry.itemsize)
            if present:
                entries = np.frombuffer(data, entry, count=present, offset=first)
                chunks = entries["count"][np.isin(entries["tag"], TIFF_CHUNK_TAGS)]
                most_chunks = max(most_chunks, int(chunks.max(initial=0)))
            if present < declared:
                break
            (offset,) = struct.unpack_from(order + offset_format, data, first + declared * entry.itemsize)
    except struct.error:
        pass  # the file ends before the next directory: so does Pillow's reading
    return most_entries, most_chunks


def jpeg_scan_count(data: bytes) -> int:
    """Start-of-scan markers (0xFF 0xDA) anywhere in the file, counted as bytes.count would: numpy's way, the
    0xFF bytes found first, took 0.14 ms for a 12 MP photo's 0.8 MB where bytes.count took 0.73."""
    file_bytes = np.frombuffer(data, np.uint8)
    marker_starts = np.flatnonzero(file_bytes[:-1] == 0xFF)
    return int(np.count_nonzero(file_bytes[marker_starts + 1] == 0xDA))


def jpeg_header_parts(data: bytes) -> int:
    """How often Pillow's JPEG parser goes round its Python loop before the first scan (once per segment,
    fill byte or stray byte, as `JpegImageFile._open` walks them), counted up to just past the cap. After the
    first scan libjpeg reads the file, in C."""
    parts, at = 0, 2  # Pillow starts at the 0xFF after the SOI marker
    while parts <= MAX_PARSED_PARTS and at + 1 < len(data):
        if data[at] != 0xFF:  # stray bytes, skipped one at a time
            next_marker = data.find(b"\xff", at)
            if next_marker < 0:
                return parts + len(data) - at
            parts, at = parts + next_marker - at, next_marker
            continue
        parts += 1
        marker = data[at + 1]
        if marker == 0xDA:  # start of scan
            break
        if marker == 0xFF:  # a fill byte
            at += 1
        elif marker in JPEG_MARKERS_WITHOUT_LENGTH:
            at += 2
        elif marker >= 0xC0:
            at += 2 + max(2, int.from_bytes(data[at + 2:at + 4], "big"))
        else:
            break  # not a marker: Pillow gives up here
    return parts


def png_chunk_count(data: bytes) -> int:
    """The chunks Pillow reads, each in Python, to decode the first frame: up to IEND, or to the next frame's
    fcTL in an animated PNG. Counted up to just past the cap."""
    chunks, at, is_animated, has_image_data = 0, len(PNG_SIGNATURE), False, False
    while chunks <= MAX_PARSED_PARTS and at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        chunks += 1
        if kind == b"IEND" or (kind == b"fcTL" and is_animated and has_image_data):
            break
        if kind == b"acTL":
            is_animated = int.from_bytes(data[at + 8:at + 12], "big") > 1  # Pillow's rule: more than one frame
        has_image_data = has_image_data or kind == b"IDAT"
        at += 12 + length  # length, type, data, CRC
    return chunks


def gif_block_count(data: bytes) -> int:
    """The blocks Pillow reads, each in Python, before the first image: extensions, each of their sub-blocks,
    and stray bytes. Counted up to just past the cap; the image's own data is read in C."""
    flags = data[10] if len(data) > 10 else 0
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the screen descriptor and global palette
    blocks = 0
    while blocks <= MAX_PARSED_PARTS and at < len(data):
        blocks += 1
        if data[at] in b",;":  # the first image, or the end
            break
        if data[at] != ord("!"):  # a stray byte
            at += 1
            continue
        at += 2  # the extension's introducer and label, then its sub-blocks up to an empty one
        while blocks <= MAX_PARSED_PARTS and at < len(data):
            blocks += 1
            size = data[at]
            at += 1 + size
            if size == 0:
                break
    return blocks


def to_rgb(image: Image.Image, highest: float) -> Image.Image:
    """RGB for the model: transparency over white, 16- and 32-bit and float pixels scaled to 8 bits (32-bit and
    float ones by the whole picture's `highest` value)."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), image.mode, highest)).convert("RGB")
    if image.has_transparency_data:  # not "A" in its bands: CIELab's A is a colour
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return image.convert("RGB")


def _to_uint8(pixels: np.ndarray, mode: str, highest: float) -> np.ndarray:
    values = np.nan_to_num(pixels.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and highest > 255):
        values = values / 257  # 0..65535 -> 0..255
    elif mode == "F" and highest <= 1.0:
        values = values * 255  # float images are usually 0..1
    return np.clip(values, 0, 255).astype(np.uint8)


def too_complex(message: str) -> ApiError:
    return ApiError(400, "image_too_complex", message)


def too_many_pixels(size: str, max_pixels: int) -> ApiError:
    return ApiError(413, "image_too_large", f"The image is {size}; this server accepts up to {max_pixels / 1e6:.1f} MP "
                                            f"(MAX_IMAGE_PIXELS) and {MAX_SIDE} pixels a side. Downscale it before sending.")


def corrupt(exc: Exception) -> ApiError:
    logger.debug("image failed to decode", exc_info=exc)
    return ApiError(400, "corrupt_image",
                    f"The image could not be decoded ({exc}); it may be truncated or corrupt. Send the whole file.")
