"""POST /v1/classify as multipart/form-data: the same answers, limits, log rows and errors as JSON, and the
multipart parser's own attack surface (boundary, parts, part headers) bounded."""

import json

import pytest

from conftest import CAT_LABELS, ONE_MEGABYTE, assert_error, b64, log_rows, make_key, raw_http

BOUNDARY = "x7fE3kq"


def form_body(*parts: tuple[str, bytes], boundary: str = BOUNDARY, closed: bool = True) -> bytes:
    """A multipart body written by hand: (headers, data) per part, so tests can break it on purpose."""
    body = b"".join(f"--{boundary}\r\n{headers}\r\n\r\n".encode() + data + b"\r\n" for headers, data in parts)
    return body + (f"--{boundary}--\r\n".encode() if closed else b"")


def file_part(data: bytes, name: str = "file") -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"; filename="photo.png"\r\nContent-Type: image/png', data


def field_part(name: str, value: str) -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"', value.encode()


def post_form(api, body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}"):
    return api.post("/v1/classify", content=body, headers={"Content-Type": content_type})


def test_a_file_upload_gets_the_same_answer_as_json(api, cat_png):
    uploaded = api.post("/v1/classify", files={"file": ("chelsea.png", cat_png, "image/png")}, data={"top_k": "3"})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.headers["X-RateLimit-Remaining"]
    as_json = api.post("/v1/classify", json={"image": b64(cat_png), "top_k": 3}).json()
    answer = uploaded.json()
    assert answer["predictions"] == as_json["predictions"] and len(answer["predictions"]) == 3
    assert answer["predictions"][0]["label"] in CAT_LABELS
    assert len(api.post("/v1/classify", files={"file": ("c.png", cat_png)}).json()["predictions"]) == 5  # default


def test_uploads_are_limited_and_logged_like_json(server, cat_png):
    key = make_key(server.database_url, rate_limit=1, window_s=600)
    with server.client(key) as client:
        assert client.post("/v1/classify", files={"file": ("c.png", cat_png)}).status_code == 200
        refused = client.post("/v1/classify", files={"file": ("c.png", cat_png)})
    assert_error(refused, 429, "rate_limit_exceeded")
    assert int(refused.headers["Retry-After"]) >= 1
    rows = log_rows(server.database_url, "endpoint = '/v1/classify' AND key_id = (SELECT id FROM api_keys "
                                         "WHERE created_at_ms = (SELECT MAX(created_at_ms) FROM api_keys))")
    assert [row["status_code"] for row in rows][-2:] == [200, 429]


CASES = {
    "no file part": ([field_part("top_k", "3")], 422, "invalid_request", "`file` part is missing"),
    "unknown field": ([file_part(b"x"), field_part("image", "aGk=")], 422, "invalid_request", "unknown field `image`"),
    "file twice": ([file_part(b"x"), file_part(b"y")], 422, "invalid_request", "sent twice"),
    "top_k not a number": ([file_part(b"x"), field_part("top_k", "five")], 422, "invalid_request", "whole number"),
    "top_k zero": ([file_part(b"x"), field_part("top_k", "0")], 422, "invalid_request", "from 1 to 20"),
    "top_k too big": ([file_part(b"x"), field_part("top_k", "21")], 422, "invalid_request", "from 1 to 20"),
    "top_k huge": ([file_part(b"x"), field_part("top_k", "9" * 100_000)], 422, "invalid_request", "whole number"),
    "no disposition": ([("Content-Type: image/png", b"x")], 422, "invalid_request", "Content-Disposition"),
    "not form-data": ([('Content-Disposition: attachment; name="file"', b"x")], 422, "invalid_request", "form-data"),
    "too many parts": ([file_part(b"x"), field_part("top_k", "3"), field_part("min_confidence", "0.1"),
                        field_part("top_k", "4")], 422, "invalid_request", "at most 3 parts"),
    "empty file": ([file_part(b"")], 400, "empty_image", "empty"),
    "not an image": ([file_part(b"just some text, not a picture")], 400, "not_an_image", None),
    "a huge part header": ([(f'Content-Disposition: form-data; name="file"; filename="{"a" * 5000}"', b"x")],
                           400, "invalid_multipart", "cannot be read"),
    "two dispositions": ([('Content-Disposition: form-data; name="file"\r\nContent-Disposition: form-data; name="top_k"',
                           b"3")], 422, "invalid_request", "two Content-Disposition headers"),
    "too many part headers": ([(file_part(b"")[0] + "\r\nX-A: 1" * 10, b"x")], 400, "invalid_multipart", "cannot be read"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_forms_get_a_clear_4xx(api, case):
    parts, status, code, words = CASES[case]
    error = assert_error(post_form(api, form_body(*parts)), status, code)
    assert words is None or words in error["message"], error


def test_a_body_without_its_closing_boundary_is_400(api, cat_png):
    error = assert_error(post_form(api, form_body(file_part(cat_png), closed=False)), 400, "invalid_multipart")
    assert "closing boundary" in error["message"]


@pytest.mark.parametrize("content_type, status, code", [
    ("multipart/form-data", 400, "invalid_multipart"),  # no boundary
    ("multipart/form-data; boundary=" + "b" * 71, 400, "invalid_multipart"),  # RFC 2046: at most 70
    ("multipart/form-data; boundary=\"\"", 400, "invalid_multipart"),
    (f"multipart/mixed; boundary={BOUNDARY}", 415, "unsupported_media_type"),
])
def test_bad_multipart_content_types(api, content_type, status, code):
    assert_error(post_form(api, form_body(file_part(b"x")), content_type), status, code)


def test_a_long_preamble_and_epilogue_are_skipped(api, cat_png):
    """RFC 2046 allows text around the parts; the parser skips it without per-byte work (CVE-2024-53981)."""
    body = b"\r\n" * ONE_MEGABYTE + form_body(file_part(cat_png)) + b"-" * ONE_MEGABYTE
    answer = post_form(api, body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["label"] in CAT_LABELS


def test_a_streamed_oversized_upload_is_cut_off_at_the_limit(server, key):
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    first = form_body(file_part(b"\x89PNG"), closed=False)[:-2]  # the file part's data goes on and on
    chunks = [b"%x\r\n" % len(first) + first + b"\r\n"]
    chunks += [b"%x\r\n" % ONE_MEGABYTE + b"A" * ONE_MEGABYTE + b"\r\n"] * 64
    status, sent, response = raw_http(server.port, head, chunks)
    assert status == 413
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_too_large"
    assert sent < 40 * ONE_MEGABYTE  # answered near the 20 MB limit, not after all 64 MB


def test_openapi_documents_both_request_bodies(server):
    with server.client() as client:
        operation = client.get("/openapi.json").json()["paths"]["/v1/classify"]["post"]
    content = operation["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    multipart = content["multipart/form-data"]["schema"]
    assert multipart["required"] == ["file"] and multipart["properties"]["file"]["format"] == "binary"
