"""Hostile input gets a clear 4xx with a machine-readable code, before any work and before anything is stored:
invalid Unicode in any string field, malformed sizes, sizes far past a model's native area, huge bodies."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import REVIEWER_KEY

GOOD = {"model": "tiny-eps", "prompt": "a mug", "num_inference_steps": 2}
STRING_FIELDS = ["prompt", "negative_prompt", "model", "size", "user", "sampler", "asset_type", "quality",
                 "style", "background", "moderation", "response_format"]  # fmt: skip
BAD_TEXT = {"lone high surrogate": "\\ud800", "lone low surrogate": "\\udfff", "NUL": "\\u0000",
            "non-character U+FFFE": "\\ufffe", "non-character U+FDD0": "\\ufdd0", "C1 control": "\\u0085",
            "plane-16 non-character": "\\udbff\\udfff"}  # fmt: skip


def post_raw(client: TestClient, raw: str, **headers: str) -> object:
    """JSON text as written (escapes kept), so that a lone surrogate reaches the server as JSON allows it."""
    return client.post("/v1/images/generations", content=raw.encode(), headers={"content-type": "application/json",
                                                                               **headers})  # fmt: skip


def with_field(field: str, escaped: str) -> str:
    body = json.dumps({k: v for k, v in GOOD.items() if k != field})
    return body[:-1] + f', "{field}": "a{escaped}b"}}'


@pytest.mark.parametrize("field", STRING_FIELDS)
@pytest.mark.parametrize("what", sorted(BAD_TEXT))
def test_invalid_unicode_in_any_string_field_is_400(client: TestClient, field: str, what: str) -> None:
    r = post_raw(client, with_field(field, BAD_TEXT[what]))
    assert r.status_code == 400, r.text  # type: ignore[attr-defined]
    err = r.json()["error"]  # type: ignore[attr-defined]
    assert err["code"] == "invalid_value" and err["param"] == field


def test_a_held_request_with_a_lone_surrogate_stores_nothing(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {REVIEWER_KEY}"}
    before = client.get("/v1/reviews", headers=auth).json()["data"]
    raw = json.dumps({**GOOD, "contains_logo": True})[:-1] + ', "negative_prompt": "\\ud800"}'
    assert post_raw(client, raw).status_code == 400  # type: ignore[attr-defined]
    after = client.get("/v1/reviews", headers=auth)
    assert after.status_code == 200 and after.json()["data"] == before  # nothing stored, the queue still reads


def test_a_field_named_with_a_surrogate_is_a_clean_4xx(client: TestClient) -> None:
    r = post_raw(client, json.dumps(GOOD)[:-1] + ', "\\ud800": 1}')
    assert r.status_code in (400, 422) and r.json()["error"]["code"] in ("invalid_value", "unknown_field")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "size",
    ["１６x16", "16x16\n", "16x16 ", " 16x16", "16X16", "16×16", "0x16", "-16x16", "16x", "x16", "16x16x16",
     "1" * 40 + "x16", "٣٢x32", "16.0x16"],
)  # fmt: skip
def test_sizes_are_ascii_digits_only(client: TestClient, size: str) -> None:
    r = client.post("/v1/images/generations", json={**GOOD, "size": size})
    assert r.status_code == 400 and r.json()["error"]["code"] in ("invalid_size", "size_not_supported"), size


@pytest.mark.parametrize("size", ["1024x1024", "64x64", "16x1024"])
def test_sizes_far_past_the_native_area_are_refused(client: TestClient, size: str) -> None:
    # tiny-eps is 16x16 native: 4× its area (the default IMAGEGEN_MAX_AREA_FACTOR) is 32x32
    r = client.post("/v1/images/generations", json={**GOOD, "size": size, "n": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "size_not_supported", r.text
    assert "native" in r.json()["error"]["message"] or "limit" in r.json()["error"]["message"]


def test_four_times_the_native_area_is_served(client: TestClient) -> None:
    assert client.post("/v1/images/generations", json={**GOOD, "size": "32x32"}).status_code == 200


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("field", ["guidance_scale", "guidance_rescale", "eta"])
def test_non_finite_numbers_are_400(client: TestClient, field: str, value: str) -> None:
    r = post_raw(client, json.dumps(GOOD)[:-1] + f', "{field}": {value}}}')
    assert r.status_code == 400, r.text  # type: ignore[attr-defined]


# ---- body size -------------------------------------------------------------------------------------------


def test_a_huge_json_body_is_413_before_auth_and_parsing(client: TestClient) -> None:
    huge = b'{"prompt": "' + b"a" * (30 * 1024 * 1024) + b'"}'
    r = client.post("/v1/images/generations", content=huge, headers={"content-type": "application/json",
                                                                    "Authorization": ""})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"  # not 401: nothing was read


def test_a_streamed_body_is_cut_off_at_the_limit(client: TestClient) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"prompt": "'
        for _ in range(1000):
            sent += 1
            yield b"a" * 65536
        yield b'"}'

    r = client.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_bad_content_length_is_400(client: TestClient) -> None:
    # uvicorn's h11 refuses a malformed Content-Length itself; behind another server the middleware does
    r = client.post("/v1/images/generations", content=b"{}", headers={"content-type": "application/json",
                                                                     "content-length": "2e3"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"


def test_an_upload_may_be_larger_than_a_json_body(client: TestClient) -> None:
    body = b"\x89PNG\r\n\x1a\n" + b"\0" * (200 * 1024)  # over the JSON limit, under the upload limit: read
    r = client.post("/v1/verify", content=body, headers={"content-type": "image/png"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"


def test_the_service_still_serves(client: TestClient) -> None:
    assert client.post("/v1/images/generations", json=GOOD).status_code == 200


@pytest.mark.parametrize(
    "fields",
    [{"n": True}, {"n": "1"}, {"n": 1.0}, {"num_inference_steps": "2"}, {"seed": "7"}, {"contains_logo": "no"}],
)
def test_counts_and_flags_are_typed_strictly(client: TestClient, fields: dict) -> None:
    r = client.post("/v1/images/generations", json={**GOOD, **fields})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", r.text


@pytest.mark.parametrize("raw", [b"[" * 10000 + b"]" * 10000, b'{"prompt": "a", "n": ' + b"9" * 5000 + b"}"])
def test_bodies_the_parser_cannot_take_are_invalid_json(client: TestClient, raw: bytes) -> None:
    r = client.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] in ("invalid_json", "invalid_value"), r.text
