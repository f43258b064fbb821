"""The server's log: LOG_FORMAT=json gives one JSON object per line, with one line per request; no key, no image."""

import json

from conftest import ONE_PIXEL, assert_error, b64, encode, make_key, photo

NO_DOWNLOAD = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}  # refused at once


def json_lines(log: str) -> list[dict]:
    """Every line of the server's stdout and stderr, each of which must be one JSON object."""
    return [json.loads(line) for line in log.splitlines()]


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


def test_a_first_start_that_falls_back_and_quantizes_logs_one_json_record_per_event(start_server, tmp_path):
    """No ResNet-18 weights (the server says it tries to download them), the fallback's banner, an ONNX
    export and an int8 quantization with a fresh cache: every line is JSON, the banner one record, the libraries'
    progress notes (ONNX passes; the quantizer's `Increased scale[...]` on the root logger) not at INFO."""
    running = start_server({"LOG_FORMAT": "json", "MODEL_NAME": "resnet18", "TORCH_HOME": str(tmp_path / "torch"),
                            "INFERENCE_PRECISION": "int8", "MODEL_CACHE_DIR": str(tmp_path / "models"), **NO_DOWNLOAD})
    with running.client(make_key(running.database_url)) as client:
        assert client.get("/v1/models").json()["data"][0]["precision"] == "int8"
    running.stop()
    lines = json_lines(running.log())
    messages = [line["message"] for line in lines]
    banner = [message for message in messages if "FALLING BACK" in message]
    assert len(banner) == 1 and "MODEL_FALLBACK=false" in banner[0] and not any(m.startswith("===") for m in messages)
    # Said as tried, not as torch.hub's `Downloading: "https://download.pytorch.org/..."` (none began).
    assert any("trying https://download.pytorch.org/" in message for message in messages)
    assert not any(message.startswith("Downloading") for message in messages)
    assert any(message.startswith("quantizing efficientnet_lite0 to int8") for message in messages)
    assert not [m for m in messages if "Increased scale" in m or "Loaded pretrained weights" in m]
    chatty = {"root", "onnx_ir", "onnxscript", "onnxruntime"}
    assert not [line for line in lines if line["logger"].split(".")[0] in chatty]
    assert any(line["message"] == "Application startup complete." for line in lines)


def test_text_logs_are_one_readable_line_per_request(server):
    key = make_key(server.database_url)
    with server.client(key) as client:
        client.post("/v1/classify", json={"image": ONE_PIXEL}, headers={"X-Request-ID": "text-1"})
    line = next(line for line in server.log().splitlines() if "[text-1]" in line)
    assert " INFO classify.access [text-1]: POST /v1/classify 200 " in line
    assert f"key_prefix={key[:11]} model=efficientnet_lite0 batch_size=1" in line and key not in server.log()
    assert '"GET /' not in server.log()  # no uvicorn access lines
