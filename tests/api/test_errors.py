"""Every bad input gets a 4xx in one error shape, naming the field; never a 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

GOOD = {"model": "tiny-eps", "prompt": "a mug", "num_inference_steps": 2}


def assert_error(r, status: int, code: str, param: str | None) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"code", "message", "param", "type"}
    assert err["code"] == code and err["param"] == param and err["message"]
    assert r.headers["x-should-retry"] == ("true" if status in (408, 429) else "false")  # the same request fails again


@pytest.mark.parametrize(
    ("fields", "status", "code", "param"),
    [
        ({"model": "nope"}, 404, "model_not_found", "model"),
        ({"sampler": "plms"}, 400, "unknown_sampler", "sampler"),
        ({"n": 0}, 400, "invalid_n", "n"),
        ({"n": 11}, 400, "invalid_n", "n"),
        ({"num_inference_steps": 0}, 400, "invalid_steps", "num_inference_steps"),
        ({"num_inference_steps": 151}, 400, "invalid_steps", "num_inference_steps"),
        (
            {"model": "tiny-lcm", "sampler": "lcm", "num_inference_steps": 51},
            400,
            "invalid_steps",
            "num_inference_steps",
        ),
        ({"sampler": "lcm"}, 400, "unsupported_sampler", "sampler"),  # tiny-eps is not consistency-distilled
        ({"guidance_scale": -0.5}, 400, "invalid_guidance_scale", "guidance_scale"),
        ({"guidance_scale": 30.5}, 400, "invalid_guidance_scale", "guidance_scale"),
        ({"size": "big"}, 400, "invalid_size", "size"),
        ({"size": "18x16"}, 400, "size_not_supported", "size"),
        ({"size": "0x0"}, 400, "size_not_supported", "size"),
        ({"size": "128x128"}, 400, "size_not_supported", "size"),  # over max_pixels
        ({"prompt": "x" * 2001}, 400, "prompt_too_long", "prompt"),
        ({"negative_prompt": "x" * 2001}, 400, "prompt_too_long", "negative_prompt"),
        ({"prompt": "   "}, 400, "invalid_prompt", "prompt"),
        ({"response_format": "file"}, 400, "unsupported_response_format", "response_format"),
        ({"output_format": "gif"}, 400, "invalid_value", "output_format"),
        ({"output_compression": 101}, 400, "invalid_value", "output_compression"),
        ({"n": "three"}, 400, "invalid_value", "n"),
        ({"seed": -1}, 400, "invalid_value", "seed"),
        ({"seed": 2**40}, 400, "invalid_value", "seed"),
        ({"eta": 2}, 400, "invalid_value", "eta"),
        ({"guidance": 3}, 422, "unknown_field", "guidance"),
    ],
)
def test_bad_field(client: TestClient, fields: dict, status: int, code: str, param: str) -> None:
    assert_error(client.post("/v1/images/generations", json={**GOOD, **fields}), status, code, param)


def test_missing_prompt(client: TestClient) -> None:
    assert_error(client.post("/v1/images/generations", json={"model": "tiny-eps"}), 422, "missing_field", "prompt")


def test_malformed_json(client: TestClient) -> None:
    r = client.post(
        "/v1/images/generations", content=b'{"prompt": "a mug",', headers={"content-type": "application/json"}
    )
    assert_error(r, 400, "invalid_json", None)


def test_body_not_an_object(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json=["a mug"])
    assert r.status_code in (400, 422) and "error" in r.json()


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404, "not_found", None)
    assert_error(client.get("/v1/images/generations"), 405, "method_not_allowed", None)
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found", "model")


def test_service_still_serves_after_errors(client: TestClient) -> None:
    assert client.post("/v1/images/generations", json=GOOD).status_code == 200


@pytest.mark.parametrize(
    ("status", "code", "retry"),
    [(504, "deadline_exceeded", "false"), (500, "non_finite_output", "false"), (409, "job_cancelled", "false"),
     (503, "not_ready", "true"), (429, "queue_full", "true"), (500, "internal_error", "true")],
)  # fmt: skip
def test_the_retry_header_says_whether_a_retry_can_help(status: int, code: str, retry: str) -> None:
    """The official OpenAI clients retry 408, 409, 429 and 5xx unless x-should-retry says false."""
    from imagegen.api.errors import error_response

    assert error_response(status, code, "m").headers["x-should-retry"] == retry
