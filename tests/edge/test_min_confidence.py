"""`min_confidence`: predictions under it are left out after `top_k`, in JSON and multipart bodies, through the
Python client and its command line; a value outside 0..1, or not a number, is a 422."""

import asyncio
import json

import pytest

from client import AsyncClient, Client
from conftest import assert_error, b64, client_cli, make_key, photo_path


def confidences(answer: dict) -> list[float]:
    return [prediction["confidence"] for prediction in answer["predictions"]]


@pytest.fixture(scope="module")
def cat_answer(server) -> dict:
    """The cat's five most likely labels with no minimum: what every filtered answer is compared with."""
    with server.client(make_key(server.database_url, rate_limit=100_000)) as client:
        response = client.post("/v1/classify", json={"image": b64(photo_path("chelsea.png").read_bytes())})
    assert response.status_code == 200, response.text
    return response.json()


def between_second_and_third(answer: dict) -> float:
    second, third = confidences(answer)[1:3]
    assert second > third, answer  # the cat's labels are not tied, or the test would say nothing
    return (second + third) / 2


def test_json_answers_keep_only_the_top_k_at_or_above_the_minimum(api, cat_png, cat_answer):
    minimum = between_second_and_third(cat_answer)
    answer = api.post("/v1/classify", json={"image": b64(cat_png), "min_confidence": minimum}).json()
    assert answer["predictions"] == cat_answer["predictions"][:2]
    assert api.post("/v1/classify", json={"image": b64(cat_png), "min_confidence": 0}).json()["predictions"] == \
        cat_answer["predictions"]
    # After top_k: the one most likely label, though three pass the minimum.
    answer = api.post("/v1/classify", json={"image": b64(cat_png), "top_k": 1, "min_confidence": minimum / 2}).json()
    assert answer["predictions"] == cat_answer["predictions"][:1]


def test_none_above_the_minimum_is_an_empty_list_and_still_a_200(api, cat_png, cat_answer):
    above_all = (confidences(cat_answer)[0] + 1) / 2
    response = api.post("/v1/classify", json={"image": b64(cat_png), "min_confidence": above_all})
    assert response.status_code == 200 and response.json()["predictions"] == [], response.text
    several = api.post("/v1/classify", json={"images": [b64(cat_png), b64(photo_path("coffee.png").read_bytes())],
                                             "min_confidence": above_all}).json()
    cat, cup = several["results"]
    assert cat["predictions"] == [] and [p["label"] for p in cup["predictions"]] == ["espresso"]  # over 90 %


def test_a_form_part_sets_it_too(api, cat_png, cat_answer):
    minimum = between_second_and_third(cat_answer)
    response = api.post("/v1/classify", files={"file": ("cat.png", cat_png)},
                        data={"min_confidence": f" {minimum!r} ", "top_k": "5"})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == cat_answer["predictions"][:2]


@pytest.mark.parametrize("value", [-0.01, 1.01, "0.5", True, None, 1e309])
def test_a_json_value_outside_0_to_1_or_not_a_number_is_422(api, value):
    body = json.dumps({"image": b64(photo_path("coffee.png").read_bytes()), "min_confidence": value})
    response = api.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
    error = assert_error(response, 422, "invalid_request")
    assert "min_confidence" in error["message"], error


def test_json_nan_is_422(api):
    body = '{"image": "' + b64(photo_path("coffee.png").read_bytes()) + '", "min_confidence": NaN}'
    error = assert_error(api.post("/v1/classify", content=body, headers={"Content-Type": "application/json"}),
                         422, "invalid_request")
    assert "min_confidence" in error["message"], error


@pytest.mark.parametrize("value", ["abc", "1.5", "-0.2", "nan", "inf", "", "0.5" * 20])
def test_a_form_value_outside_0_to_1_or_not_a_number_is_422(api, cat_png, value):
    response = api.post("/v1/classify", files={"file": ("cat.png", cat_png)}, data={"min_confidence": value})
    error = assert_error(response, 422, "invalid_request")
    assert "`min_confidence` must be a number from 0 to 1" in error["message"], error


def test_embeddings_take_no_min_confidence(api, cat_png):
    response = api.post("/v1/embeddings", json={"image": b64(cat_png), "min_confidence": 0.5})
    assert_error(response, 422, "invalid_request")


def test_the_clients_send_it(server, key, cat_answer):
    minimum = between_second_and_third(cat_answer)
    expected = [p["label"] for p in cat_answer["predictions"][:2]]
    with Client(server.url, key) as client:
        one = client.classify(photo_path("chelsea.png"), min_confidence=minimum)
        several = client.classify_many([photo_path("chelsea.png")], min_confidence=minimum)
        unfiltered = client.classify(photo_path("chelsea.png"))

    async def calls() -> list:
        async with AsyncClient(server.url, key) as client:
            return [await client.classify(photo_path("chelsea.png"), min_confidence=minimum),
                    await client.classify_many([photo_path("chelsea.png")], top_k=1, min_confidence=minimum)]

    async_one, async_several = asyncio.run(calls())
    assert [p.label for p in one.predictions] == [p.label for p in async_one.predictions] == expected
    assert [p.label for p in several.results[0].predictions] == expected
    assert [p.label for p in async_several.results[0].predictions] == expected[:1]
    assert len(unfiltered.predictions) == 5


def test_the_command_line_takes_min_confidence_and_says_when_no_label_passes(server, key, cat_answer):
    minimum = between_second_and_third(cat_answer)
    env = {"CLASSIFY_URL": server.url, "CLASSIFY_API_KEY": key}
    cat = str(photo_path("chelsea.png"))
    done = client_cli("classify", cat, "--min-confidence", str(minimum), "--json", **env)
    assert done.returncode == 0, done.stderr
    assert [p["label"] for p in json.loads(done.stdout)["predictions"]] == \
        [p["label"] for p in cat_answer["predictions"][:2]]
    none = client_cli("classify", cat, "--min-confidence", "1", **env)
    assert none.returncode == 0 and none.stdout.strip() == f"{cat}: no label at least 100.0% likely", none.stdout
    refused = client_cli("classify", cat, "--min-confidence", "2", **env)
    assert refused.returncode == 2 and "from 0 to 1" in refused.stderr
