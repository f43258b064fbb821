"""Whatever a client sends gets a clear 4xx in the one error shape; memory stays bounded; the server stays up."""

import json
import socket
import struct
import time
import zlib

import pytest
from PIL import Image

from conftest import ONE_MEGABYTE, assert_error, b64, encode, log_rows, make_key, many_scans_jpeg, photo, raw_http


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit grayscale PNG of width x height zeros: a few dozen KB that decode to width*height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the packed pixels
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def many_strips_tiff(height: int, strips: int) -> bytes:
    """A 1-pixel-wide 8-bit TIFF whose first directory lists `strips` strips (Pillow makes an object of each)."""
    entries = 9
    arrays_at = 8 + 2 + entries * 12 + 4
    pixels_at = arrays_at + 8 * strips
    ifd = [(256, 4, 1, 1), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
           (273, 4, strips, arrays_at), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, strips, arrays_at + 4 * strips)]
    head = b"II*\x00" + struct.pack("<IH", 8, entries) + b"".join(struct.pack("<HHII", *e) for e in ifd) + b"\x00" * 4
    offsets = struct.pack(f"<{strips}I", *(pixels_at + i % height for i in range(strips)))
    return head + offsets + struct.pack(f"<{strips}I", *([1] * strips)) + bytes(range(256)) * (height // 256 + 1)


def cat_jpeg() -> bytes:
    return encode(photo("chelsea.png").convert("RGB"), "JPEG", quality=90)


BAD_JSON_BODIES = {
    "missing image": {"top_k": 5},
    "image of wrong type": {"image": 123},
    "image as list": {"image": ["abc"]},
    "top_k as string": {"image": "aGk=", "top_k": "5"},
    "top_k zero": {"image": "aGk=", "top_k": 0},
    "top_k too big": {"image": "aGk=", "top_k": 21},
    "top_k fractional": {"image": "aGk=", "top_k": 2.5},
    "top_k boolean": {"image": "aGk=", "top_k": True},
    "unknown field": {"image": "aGk=", "images": ["aGk="]},
}


@pytest.mark.parametrize("case", BAD_JSON_BODIES)
def test_missing_or_mistyped_fields_are_422(api, case):
    error = assert_error(api.post("/v1/classify", json=BAD_JSON_BODIES[case]), 422, "invalid_request")
    assert "body" in error["message"]


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"[]", b"null", b'{"image": "aGk=",}', b"\xff\xfe"])
def test_bodies_that_are_not_a_json_object_are_422(api, raw):
    assert_error(api.post("/v1/classify", content=raw, headers={"Content-Type": "application/json"}), 422)


BAD_IMAGES = {
    "not base64": ("!!! this is not base64 !!!", 400, "invalid_base64"),
    "base64 of text": (b64(b"hello, I am not an image"), 400, "not_an_image"),
    "empty": ("", 400, "empty_image"),
    "whitespace only": ("   \n  ", 400, "empty_image"),
    "empty data url": ("data:image/png;base64,", 400, "empty_image"),
    "data url without base64": ("data:image/png,rawbytes", 400, "invalid_data_url"),
    "png signature then garbage": (b64(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50), 400, None),
    "postscript (never parsed)": (b64(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n"), 400, "not_an_image"),
    "bomb: 20000x20000 png": (b64(png_bomb(20_000, 20_000)), 413, "image_too_large"),
    "65535x1 png": (b64(png_bomb(65_535, 1)), 200, None),  # wide but few pixels: a real answer
    "1x100000 png": (b64(png_bomb(1, 100_000)), 413, "image_too_large"),  # few pixels, but Pillow pays per row
    "jpeg of 2000 scans": (b64(many_scans_jpeg(2000)), 400, "image_too_complex"),
    "jpeg of 20 scans": (b64(many_scans_jpeg(10)), 200, None),
    "tiff of 200000 strips": (b64(many_strips_tiff(1000, 200_000)), 400, "image_too_complex"),
    "tiff of 1000 strips": (b64(many_strips_tiff(1000, 1000)), 200, None),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_images_get_a_clear_4xx(api, case):
    image, status, code = BAD_IMAGES[case]
    response = api.post("/v1/classify", json={"image": image})
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        assert_error(response, status, code)


def test_an_empty_image_is_the_documented_empty_image_and_counts_like_any_refused_body(server):
    key = make_key(server.database_url, rate_limit=5)
    with server.client(key) as client:
        empty = client.post("/v1/classify", json={"image": ""})
        assert "no data" in assert_error(empty, 400, "empty_image")["message"]
        assert empty.headers["X-RateLimit-Remaining"] == "4"
        in_a_list = client.post("/v1/classify", json={"images": [b64(cat_jpeg()), ""]})
        assert assert_error(in_a_list, 400, "empty_image")["message"].startswith("images[1]: ")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_images_are_400_or_answered_never_500(api, fmt, keep):
    whole = encode(photo("chelsea.png").convert("RGB"), fmt)
    response = api.post("/v1/classify", json={"image": b64(whole[: int(len(whole) * keep)])})
    if response.status_code != 200:
        assert_error(response, 400)


def test_pixel_limit_is_checked_from_the_header(start_server):
    small_limit = start_server({"MAX_IMAGE_PIXELS": "10000"})
    key = make_key(small_limit.database_url)
    with small_limit.client(key) as client:
        assert client.post("/v1/classify", json={"image": b64(encode(Image.new("RGB", (100, 100)), "PNG"))}).status_code == 200
        error = assert_error(client.post("/v1/classify", json={"image": b64(encode(Image.new("RGB", (101, 100)), "PNG"))}),
                             413, "image_too_large")
        assert "MAX_IMAGE_PIXELS" in error["message"]


def test_declared_oversized_body_is_413_before_it_is_sent(server, key):
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {64 * ONE_MEGABYTE}\r\n\r\n").encode()
    status, _, response = raw_http(server.port, head)  # not one body byte sent: the server must not wait for them
    assert status == 413
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_too_large"


def test_streamed_oversized_body_is_cut_off_at_the_limit(server, key):
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"%x\r\n" % ONE_MEGABYTE + b"A" * ONE_MEGABYTE + b"\r\n"
    status, sent, _ = raw_http(server.port, head, [chunk] * 64)
    assert status == 413
    assert sent < 40 * ONE_MEGABYTE  # answered near the 20 MB limit, not after all 64 MB


def test_memory_stays_bounded_whatever_arrives(start_server):
    """A bomb is refused from its header, extreme shapes are resized from a box, big JPEGs are decoded small, and
    no full-size copy is made for orientation or colour: each grows the process by little more than its pixels."""
    fresh = start_server()
    key = make_key(fresh.database_url)
    with fresh.client(key) as client:
        def growth_mb(image: bytes, status: int = 200) -> float:
            before = fresh.peak_rss_mb()
            assert client.post("/v1/classify", json={"image": b64(image)}).status_code == status
            return fresh.peak_rss_mb() - before

        client.post("/v1/classify", json={"image": b64(cat_jpeg())}).raise_for_status()
        assert growth_mb(png_bomb(20_000, 20_000), 413) < 20
        assert growth_mb(encode(Image.new("L", (1, 60_000), 128), "PNG")) < 40
        assert growth_mb(encode(Image.new("L", (60_000, 1), 128), "PNG")) < 40
        assert growth_mb(encode(Image.new("RGB", (5000, 5000), (90, 120, 200)), "JPEG")) < 40  # 25 MP, drafted to 1/8
        exif = Image.Exif()
        exif[0x0112] = 6
        rgba = Image.new("RGBA", (5000, 5000), (90, 120, 200, 128))
        assert growth_mb(encode(rgba, "PNG", exif=exif, compress_level=1)) < 2.5 * 100  # 100 MB of RGBA pixels


def test_a_slow_or_vanishing_body_is_ended_and_logged(start_server):
    running = start_server({"BODY_TIMEOUT_S": "1"})
    key = make_key(running.database_url)
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"image\": ").encode()
    status, _, response = raw_http(running.port, head)  # then silence
    assert status == 408 and b"body_timeout" in response
    with socket.create_connection(("127.0.0.1", running.port)) as sock:
        sock.sendall(head)  # then hang up
    deadline = time.monotonic() + 10
    while len(rows := log_rows(running.database_url, "endpoint = '/v1/classify'")) < 2:
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    assert [(row["status_code"], row["error_code"]) for row in rows] == [
        (408, "body_timeout"), (499, "client_closed_request")]
    assert "Traceback" not in running.log()


def test_unknown_paths_and_methods_get_the_one_error_shape(server):
    with server.client() as client:
        assert_error(client.get("/v1/nothing-here"), 404, "not_found")
        assert_error(client.get("/nowhere"), 404, "not_found")
        not_allowed = assert_error(client.delete("/v1/classify"), 405, "method_not_allowed")
        assert "POST" in not_allowed["message"]


@pytest.mark.parametrize("case", ["an unknown field named by 1 MiB", "a path of 15 KiB", "a method of 8 KiB"])
def test_an_error_quotes_little_of_what_it_was_sent(api, case):
    """A 422 for an unknown field echoed its name whole: a key of 15 MiB made a 15 MiB error body."""
    if case.startswith("an unknown field"):
        response = api.post("/v1/classify", json={"image": b64(b"x"), "x" * ONE_MEGABYTE: 1})
        status = 422
    elif case.startswith("a path"):
        response = api.get("/v1/" + "p" * 15 * 1024)
        status = 404
    else:
        response = api.request("X" * 8 * 1024, "/v1/classify")
        status = 405
    error = assert_error(response, status)
    assert len(response.content) < 1000, len(response.content)
    assert "characters)" in error["message"]  # it says how long what it cut was


def test_health_checks_answer_head(server):
    with server.client() as client:
        assert client.head("/healthz").status_code == 200
        assert client.head("/readyz").status_code == 200


def test_server_stays_healthy_after_all_of_it(api, server, cat_png):
    assert api.get("/readyz").status_code == 200
    assert api.post("/v1/classify", json={"image": b64(cat_png)}).status_code == 200
    assert "Traceback" not in server.log()
