"""X-Request-ID: echoed when sane, generated otherwise; on every answer, error body, log row and log line."""

import re
import sqlite3

import pytest

from conftest import ONE_PIXEL, assert_error, key_id, log_rows, make_key

GENERATED = re.compile(r"req_[0-9a-f]{32}")


def test_a_sane_client_id_is_echoed_and_lands_in_the_error_body_the_log_row_and_the_log(server):
    key = make_key(server.database_url)
    with server.client(key) as client:
        ok = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers={"X-Request-ID": "trace-42.a:b_C"})
        refused = client.post("/v1/classify", json={"image": "%%%"}, headers={"X-Request-ID": "trace-43"})
    assert ok.status_code == 200 and ok.headers["X-Request-ID"] == "trace-42.a:b_C"
    assert assert_error(refused, 400)["request_id"] == "trace-43"
    rows = log_rows(server.database_url, "key_id = :key_id", key_id=key_id(server.database_url, key))
    assert [row["request_id"] for row in rows] == ["trace-42.a:b_C", "trace-43"]
    assert re.search(r"\[trace-42\.a:b_C\]: POST /v1/classify 200", server.log())


def test_an_id_is_generated_for_every_answer_without_one(server):
    with server.client() as client:
        answers = [client.get("/healthz"), client.get("/nowhere"), client.delete("/v1/usage"),
                   client.post("/v1/classify", json={"image": ONE_PIXEL}), client.get("/")]
    ids = [answer.headers["X-Request-ID"] for answer in answers]
    assert all(GENERATED.fullmatch(request_id) for request_id in ids) and len(set(ids)) == len(ids)
    assert assert_error(answers[1], 404)["request_id"] == ids[1]
    assert assert_error(answers[2], 405)["request_id"] == ids[2]
    assert assert_error(answers[3], 401)["request_id"] == ids[3]


@pytest.mark.parametrize("sent", ["x" * 129, "has space", "<script>", "a/b", "semi;colon", ""])
def test_an_insane_client_id_is_replaced_not_echoed(server, sent):
    with server.client() as client:
        response = client.get("/v1/models", headers={"X-Request-ID": sent})
    assert GENERATED.fullmatch(response.headers["X-Request-ID"])
    assert assert_error(response, 401)["request_id"] == response.headers["X-Request-ID"]


def test_an_unexpected_failure_carries_the_id_in_its_body_and_its_logged_traceback(start_server):
    running = start_server()
    key = make_key(running.database_url)
    broken = sqlite3.connect(running.database_url.removeprefix("sqlite:///"))
    with broken:  # a window no code path writes: the limiter fails, a bug, so a 500
        broken.execute("UPDATE api_keys SET window_s = 'soon' WHERE id = ?", (key_id(running.database_url, key),))
    broken.close()
    with running.client(key) as client:
        response = client.post("/v1/classify", json={"image": ONE_PIXEL}, headers={"X-Request-ID": "boom-1"})
    assert assert_error(response, 500, "internal_error")["request_id"] == "boom-1"
    log = running.log()
    assert "[boom-1]: unexpected error on POST /v1/classify\nTraceback" in log
    assert [row["request_id"] for row in log_rows(running.database_url, "status_code = 500")] == ["boom-1"]
