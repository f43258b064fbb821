"""What an image may cost: the structures Pillow walks in Python (TIFF strips and directories, JPEG segments
and scans, PNG chunks) and the JSON tree around the images are bounded before they are built."""

import struct
import zlib

import httpx
import pytest
from PIL import Image, ImageCms, PngImagePlugin
from PIL.TiffImagePlugin import PREFIXES as TIFF_PREFIXES

from conftest import CAT_LABELS, ONE_PIXEL, assert_error, b64, encode, make_key, many_scans_jpeg, photo


def many_strips_tiff(prefix: bytes, *pages: int, filler_tags: int = 0, loops: bool = False) -> bytes:
    """8x8 grey TIFF pages, one a number in `pages`: how many strips its StripOffsets and StripByteCounts list,
    in one shared array of SHORTs (two bytes a strip; Pillow builds a tile of each), after `filler_tags`
    DocumentName tags. Laid out as Pillow reads `prefix`: byte order from its first two bytes, BigTIFF only
    when its third is 0x2B. `loops`: the last directory's next one is the first again."""
    order = "<" if prefix[:2] == b"II" else ">"
    is_big = prefix[2] == 0x2B
    offset_format, field_size = ("Q", 8) if is_big else ("I", 4)

    def entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
        return struct.pack(order + ("HHQ" if is_big else "HHI"), tag, kind, count) + value.ljust(field_size, b"\0")

    def short(value: int) -> bytes:
        return struct.pack(order + "H", value)

    def offset(value: int) -> bytes:
        return struct.pack(order + offset_format, value)

    entry_count = filler_tags + 9
    ifd_size = (16 if is_big else 6) + entry_count * (20 if is_big else 12)  # count, entries, next offset
    pixels_at = 16 if is_big else 8  # every page's strips are the same 64 pixels, right after the header
    directories_at = [pixels_at + 64]
    for strips in pages:
        directories_at.append(directories_at[-1] + ifd_size + 2 * strips)
    next_at = directories_at[1:-1] + [directories_at[0] if loops else 0]
    directories = b""
    for strips, at, following in zip(pages, directories_at, next_at):
        entries = [entry(269, 2, 4, b"doc\0")] * filler_tags + [
            entry(256, 3, 1, short(8)), entry(257, 3, 1, short(8)), entry(258, 3, 1, short(8)),
            entry(259, 3, 1, short(1)), entry(262, 3, 1, short(1)), entry(273, 3, strips, offset(at + ifd_size)),
            entry(277, 3, 1, short(1)), entry(278, 3, 1, short(1)), entry(279, 3, strips, offset(at + ifd_size))]
        directories += (struct.pack(order + ("Q" if is_big else "H"), entry_count) + b"".join(entries)
                        + offset(following) + short(pixels_at) * strips)
    header = prefix + (struct.pack(order + "HHQ", 8, 0, directories_at[0]) if is_big else offset(directories_at[0]))
    return header + bytes(range(0, 256, 4)) + directories


def as_mpo(jpeg: bytes) -> bytes:
    """`jpeg` with the MPF segment Pillow writes for a two-frame MPO put after its SOI: Pillow opens it as MPO."""
    frame = Image.new("L", (8, 8))
    mpo = encode(frame, "MPO", save_all=True, append_images=[frame])
    start = mpo.index(b"MPF\x00") - 4  # the APP2 marker and the segment's length come first
    (length,) = struct.unpack_from(">H", mpo, start + 2)
    return jpeg[:2] + mpo[start:start + 2 + length] + jpeg[2:]


def jpeg_after_segments(marker: bytes, count: int) -> bytes:
    """A 16x16 JPEG with `count` empty segments (`marker`, then a length of 2) right after its SOI."""
    jpeg = encode(Image.new("RGB", (16, 16), (200, 40, 40)), "JPEG")
    return jpeg[:2] + (marker + b"\x00\x02") * count + jpeg[2:]


def png_after_chunks(count: int, kind: bytes = b"prIv") -> bytes:
    """A 16x16 PNG with `count` empty ancillary chunks (private ones, which Pillow keeps) after its header."""
    png = encode(Image.new("RGB", (16, 16), (200, 40, 40)), "PNG")
    chunk = struct.pack(">I", 0) + kind + struct.pack(">I", zlib.crc32(kind))
    header_end = 8 + 25  # the signature, then IHDR's length, type, 13 bytes and CRC
    return png[:header_end] + chunk * count + png[header_end:]


def json_of_many_values(count: int) -> bytes:
    """`{"image": "a", "x": [{},{},...]}`: three bytes a value, each an object once parsed."""
    return b'{"image": "a", "x": [' + b"{}," * (count - 1) + b"{}]}"


def json_of_many_images(count: int) -> bytes:
    return b'{"images": [' + b'"a",' * (count - 1) + b'"a"]}'


def gif_after_comment_blocks(count: int) -> bytes:
    """A 16x16 GIF with a comment of `count` one-byte sub-blocks before its image (Pillow keeps each)."""
    gif = encode(Image.new("RGB", (16, 16), (200, 40, 40)), "GIF")
    flags = gif[10]
    image_at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    return gif[:image_at] + b"\x21\xfe" + b"\x01c" * count + b"\x00" + gif[image_at:]


def classify(api: httpx.Client, data: bytes) -> httpx.Response:
    return api.post("/v1/classify", json={"image": b64(data)})


@pytest.mark.parametrize("prefix", TIFF_PREFIXES, ids=repr)
def test_tiff_strips_are_counted_whatever_header_pillow_opens_it_by(api, prefix):
    assert classify(api, many_strips_tiff(prefix, 8)).status_code == 200
    error = assert_error(classify(api, many_strips_tiff(prefix, 200_000)), 400, "image_too_complex")
    assert "strips" in error["message"]


def test_every_entry_and_every_directory_of_a_tiff_is_read(api):
    refused = {"strips after 1,000 other tags": many_strips_tiff(b"II*\x00", 200_000, filler_tags=1000),
               "strips in the second page": many_strips_tiff(b"II*\x00", 8, 200_000),
               "a BigTIFF directory of 70,009 entries": many_strips_tiff(b"II+\x00", 8, filler_tags=70_000)}
    for case, data in refused.items():
        assert classify(api, data).status_code == 400, case
    assert classify(api, many_strips_tiff(b"MM\x00*", 8, 8, 8, loops=True)).status_code == 200  # read once round


@pytest.mark.parametrize("case", ["APP5", "COM", "fill bytes", "stray bytes"])
def test_a_jpeg_of_many_segments_before_its_image_data_is_refused(api, case):
    flood = {"APP5": b"\xff\xe5\x00\x02" * 10_001, "COM": b"\xff\xfe\x00\x02" * 10_001,
             "fill bytes": b"\xff" * 10_001, "stray bytes": b"\x00" * 10_001}[case]
    jpeg = jpeg_after_segments(b"\xff\xe5", 0)
    body = jpeg[:2] + (b"\xff\xfe\x00\x02" + flood if case == "stray bytes" else flood) + jpeg[2:]
    error = assert_error(classify(api, body), 400, "image_too_complex")
    assert "segments" in error["message"]
    assert classify(api, jpeg_after_segments(b"\xff\xe5", 9_000)).status_code == 200  # odd, but within the bound


def test_a_png_or_gif_of_many_chunks_or_blocks_is_refused(api):
    assert_error(classify(api, png_after_chunks(10_001)), 400, "image_too_complex")
    png = png_after_chunks(0)
    empty_chunk = struct.pack(">I", 0) + b"prIv" + struct.pack(">I", zlib.crc32(b"prIv"))
    after_image = png[:-12] + empty_chunk * 10_001 + png[-12:]  # before IEND: Pillow reads these as it ends
    assert_error(classify(api, after_image), 400, "image_too_complex")
    assert classify(api, png_after_chunks(9_000)).status_code == 200
    assert_error(classify(api, gif_after_comment_blocks(10_001)), 400, "image_too_complex")
    assert classify(api, gif_after_comment_blocks(9_000)).status_code == 200


def test_a_jpeg_wrapped_as_mpo_still_has_its_scans_counted(api):
    flat = Image.new("L", (64, 64), 128)  # its progressive scans are a few bytes each
    error = assert_error(classify(api, as_mpo(many_scans_jpeg(200, flat))), 400, "image_too_complex")
    assert "scans" in error["message"]
    assert classify(api, as_mpo(many_scans_jpeg(5, flat))).status_code == 200


REAL_WITH_METADATA = {
    "jpeg, ICC profile in 47 APP2 segments": lambda cat: encode(cat, "JPEG", icc_profile=SRGB + bytes(3_000_000)),
    "progressive jpeg with EXIF": lambda cat: encode(cat, "JPEG", progressive=True, exif=camera_exif()),
    "two-frame MPO": lambda cat: encode(cat, "MPO", save_all=True, append_images=[cat.rotate(90)]),
    "png with 100 text chunks and an ICC profile": lambda cat: encode(cat, "PNG", pnginfo=text_chunks(), icc_profile=SRGB),
    "animated png of 20 frames": lambda cat: encode(cat, "PNG", save_all=True, append_images=[cat.rotate(90)] * 19),
    "gif with a 200 KB comment": lambda cat: encode(cat, "GIF", comment=b"c" * 200_000),
    "tiff of 20 pages": lambda cat: encode(cat, "TIFF", save_all=True, append_images=[cat.rotate(90)] * 19),
}


@pytest.mark.parametrize("case", REAL_WITH_METADATA)
def test_real_photos_with_plenty_of_metadata_pass_the_bounds(api, case):
    cat = photo("chelsea.png").convert("RGB")
    response = classify(api, REAL_WITH_METADATA[case](cat))
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] in CAT_LABELS


def test_a_json_body_with_more_values_than_a_request_can_hold_is_refused_unparsed(api):
    for body in (json_of_many_values(1000), json_of_many_images(600), b"[" * 600 + b"]" * 600):
        error = assert_error(api.post("/v1/classify", content=body, headers={"Content-Type": "application/json"}),
                             422, "invalid_request")
        assert "commas and brackets" in error["message"]
    # The most a valid body holds: 256 images (the schema's cap), each a data URL with a comma of its own
    fullest = {"images": ["data:image/png;base64," + ONE_PIXEL] * 256, "top_k": 5}
    assert "MAX_IMAGES_PER_REQUEST" in assert_error(api.post("/v1/classify", json=fullest), 422, "too_many_images")["message"]


def test_the_reviews_reproductions_cost_little_memory_before_their_4xx(start_server):
    """Each of these held 130 MB to 1 GB of the server (and up to 30 s) before its answer; now each is refused
    from its bytes, and what it costs is about its own body, a few times over."""
    fresh = start_server()
    key = make_key(fresh.database_url)
    flat = Image.new("L", (5000, 5000), 128)
    reproductions = {
        "tiff 'MM*\\0', 3,000,000 strips": (b64_body(many_strips_tiff(b"MM\x2a\x00", 3_000_000)), 400),
        "tiff, 1,000,000 strips after 1,000 tags": (b64_body(many_strips_tiff(b"II*\x00", 1_000_000, filler_tags=1000)), 400),
        "mpo of 1,000 scans": (b64_body(as_mpo(many_scans_jpeg(1000, flat))), 400),
        "jpeg after 3,750,000 APP5": (b64_body(jpeg_after_segments(b"\xff\xe5", 3_750_000)), 400),
        "jpeg after 3,750,000 COM": (b64_body(jpeg_after_segments(b"\xff\xfe", 3_750_000)), 400),
        "png after 1,250,000 chunks": (b64_body(png_after_chunks(1_250_000)), 400),
        "20 MB of JSON objects": (json_of_many_values(6_600_000), 422),
        "5,000,000 images": (json_of_many_images(5_000_000), 422),
    }
    with fresh.client(key) as client:
        client.post("/v1/classify", json={"image": ONE_PIXEL}).raise_for_status()
        for case, (body, status) in reproductions.items():
            before = fresh.peak_rss_mb()
            response = client.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == status, (case, response.text)
            assert fresh.peak_rss_mb() - before < 100, case  # each held 186 to 983 MB more before
    assert "Traceback" not in fresh.log()


def b64_body(image: bytes) -> bytes:
    return b'{"image": "' + b64(image).encode() + b'"}'


SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def camera_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0132] = "Camera maker", "Camera model", "2026:11:26 10:00:00"
    return exif


def text_chunks() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for index in range(50):
        info.add_text(f"note {index}", "words " * 200)
        info.add_text(f"compressed note {index}", "words " * 1000, zip=True)
    return info
