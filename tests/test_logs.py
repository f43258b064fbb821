"""The server's log: LOG_FORMAT=json gives one JSON object per line, with one line per request; no key, no image."""

import json
import re

from conftest import ONE_PIXEL, assert_error, b64, encode, make_key, photo


TEXT_RECORD = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ )?(DEBUG|INFO|WARNING|ERROR|CRITICAL)[: ]")


def json_lines(log: str) -> list[dict]:
    # Lines printed straight to stdout by a library (the EfficientNet package announces its weights) are not
    # records of ours; every record is one JSON object.
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_json_logs_parse_and_have_one_line_per_request_without_keys_or_images(start_server):
    running = start_server({"LOG_FORMAT": "json"})
    key = make_key(running.database_url)
    image = b64(encode(photo("chelsea.png"), "PNG"))
    with running.client(key) as client:
        ok = client.post("/v1/classify", json={"image": image}, headers={"X-Request-ID": "json-1"})
        assert ok.status_code == 200
        assert_error(client.post("/v1/classify", json={"image": "@@@"}, headers={"X-Request-ID": "json-2"}), 400)
        assert client.get("/v1/usage").status_code == 200
    running.stop()
    log = running.log()
    lines = json_lines(log)
    # Whatever else is there was printed, not logged: no line in the text format's or uvicorn's own shape.
    not_json = [line for line in log.splitlines() if line and not line.startswith("{")]
    assert not [line for line in not_json if TEXT_RECORD.match(line)], not_json
    assert all({"timestamp", "level", "logger", "message", "request_id"} <= set(line) for line in lines)
    assert any(line["logger"] == "uvicorn.error" and line["message"] == "Application startup complete." for line in lines)
    requests = [line for line in lines if line["logger"] == "classify.access"]
    by_id = {line["request_id"]: line for line in requests}
    classify = by_id["json-1"]
    assert classify["route"] == "/v1/classify" and classify["method"] == "POST" and classify["status"] == 200
    assert classify["latency_ms"] > 0 and classify["key_prefix"] == key[:11]
    assert classify["model"] == "efficientnet_lite0" and classify["batch_size"] == 1
    assert (by_id["json-2"]["status"], by_id["json-2"]["error_code"]) == (400, "invalid_base64")
    assert [line["route"] for line in requests].count("/v1/usage") == 1
    assert not any(line["logger"] == "uvicorn.access" for line in lines)  # ours replaces uvicorn's
    assert key not in log and key[11:] not in log and image[:200] not in log and ONE_PIXEL not in log


def test_text_logs_are_one_readable_line_per_request(server):
    key = make_key(server.database_url)
    with server.client(key) as client:
        client.post("/v1/classify", json={"image": ONE_PIXEL}, headers={"X-Request-ID": "text-1"})
    line = next(line for line in server.log().splitlines() if "[text-1]" in line)
    assert " INFO classify.access [text-1]: POST /v1/classify 200 " in line
    assert f"key_prefix={key[:11]} model=efficientnet_lite0 batch_size=1" in line and key not in server.log()
    assert '"GET /' not in server.log()  # no uvicorn access lines
