"""The details the official openai client relies on: streamed partial images (every partial a labelled, signed
image), URL results, JPEG quality, the moderation code and the retry header, quality presets, usage, aliases."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
from typing import Any

import c2pa
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from openai import AsyncOpenAI, BadRequestError, OpenAI
from PIL import Image

from imagegen.gate.c2pa_manifest import READ_SETTINGS
from imagegen.gate.labels import COMPOSITE_SOURCE_TYPE
from tests.api.conftest import ADMIN_KEY, REVIEWER_KEY
from tests.helpers import assert_labeled_synthetic, decode_image, xmp_of

CHEAP = {"num_inference_steps": 4, "seed": 11}


def openai_client(client: TestClient, **kwargs: Any) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=client, **kwargs)


def manifest_state(data: bytes, media_type: str = "image/png") -> str:
    with (
        c2pa.Context.from_dict(READ_SETTINGS) as context,
        c2pa.Reader(media_type, io.BytesIO(data), context=context) as reader,
    ):
        return str(reader.get_validation_state())


def assert_released(b64: str, edit: bool = False) -> Image.Image:
    image = decode_image(b64)
    if edit:
        assert COMPOSITE_SOURCE_TYPE in xmp_of(image)
    else:
        assert_labeled_synthetic(image, "tiny-eps")
    assert manifest_state(base64.b64decode(b64)) in ("Valid", "Trusted")
    return image


def test_streaming_with_partial_images_sends_labelled_partials_then_each_image(client: TestClient) -> None:
    events = list(
        openai_client(client).images.generate(
            model="tiny-eps", prompt="a red mug", n=2, size="32x32", stream=True, partial_images=2, extra_body=CHEAP
        )
    )
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert len(partials) == 4 and len(completed) == 2 and events[-1].type == "image_generation.completed"
    for image_index in (0, 1):
        mine = [p for p in partials if (p.model_extra or {})["image_index"] == image_index]
        assert [p.partial_image_index for p in mine] == [0, 1]
    for event in partials:
        assert event.size == "32x32" and event.output_format == "png"
        assert "partial_image" in (event.model_extra or {})["release"]["labels"]
        assert assert_released(event.b64_json).size == (32, 32)
    finals = []
    for event in completed:
        assert event.usage.output_tokens == 2 * 16 * 16  # two images of 16×16 latent positions (a VAE factor of 2)
        assert event.usage.input_tokens_details.text_tokens == 3  # "a", "red", "mug"
        finals.append(np.asarray(assert_released(event.b64_json)))
    first_partial = np.asarray(decode_image(partials[0].b64_json)).astype(int)
    assert np.abs(first_partial - finals[(partials[0].model_extra or {})["image_index"]]).mean() > 1  # a preview
    # Streaming changes nothing of the result: the same request unstreamed gives the same pixels.
    plain = openai_client(client).images.generate(model="tiny-eps", prompt="a red mug", n=2, size="32x32",
                                                  extra_body=CHEAP)  # fmt: skip
    assert plain.data is not None
    by_index = {(e.model_extra or {})["image_index"]: e.b64_json for e in completed}
    for i, item in enumerate(plain.data):
        assert np.array_equal(np.asarray(decode_image(item.b64_json or "")), np.asarray(decode_image(by_index[i])))


def test_an_async_client_streams_an_edit(client: TestClient) -> None:
    photo = np.full((32, 32, 3), 240, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")

    async def stream() -> list[Any]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            api = AsyncOpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=http)
            events = await api.images.edit(
                image=("p.png", buf.getvalue(), "image/png"), prompt="a mug", size="32x32", stream=True,
                partial_images=1, extra_body={**CHEAP, "model": "tiny-eps", "strength": "1.0"},
            )  # fmt: skip
            return [e async for e in events]

    events = asyncio.run(stream())
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    for event in events:
        assert_released(event.b64_json, edit=True)
    assert events[-1].usage.input_tokens_details.image_tokens == 16 * 16  # the input, in latent positions


def test_a_held_request_streams_no_pixels(client: TestClient) -> None:
    r = client.post(
        "/v1/images/generations",
        json={"model": "tiny-eps", "prompt": "a mug", "contains_logo": True, "stream": True, "partial_images": 3,
              **CHEAP},
    )  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "b64_json" not in r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["image_generation.pending_review"] and events[0]["review_id"]


def test_the_job_event_stream_carries_previews_on_request(client: TestClient) -> None:
    body = {"model": "tiny-eps", "prompt": "a mug", "size": "32x32", "partial_images": 2, **CHEAP}
    r = client.post("/v1/images/generations", json=body, headers={"Prefer": "respond-async"})
    assert r.status_code == 202
    with client.stream("GET", f"{r.headers['Location']}/events?previews=true") as stream:
        text = "".join(stream.iter_text())
    kinds = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert kinds.count("partial_image") == 2 and kinds[-1] == "done"
    assert kinds.index("done") > max(i for i, k in enumerate(kinds) if k == "partial_image")
    partial = next(json.loads(line[6:]) for line in text.splitlines() if '"partial_image_index"' in line)
    assert_released(partial["b64_json"])


def test_url_results_are_served_signed_and_expire(client: TestClient) -> None:
    result = openai_client(client).images.generate(
        model="tiny-eps", prompt="a red mug", size="32x32", response_format="url", extra_body=CHEAP
    )
    assert result.data is not None
    item = result.data[0]
    assert item.b64_json is None and item.url is not None and item.url.startswith("http://testserver/v1/files/")
    fetched = client.get(item.url, headers={"Authorization": ""})  # no key: the signed URL is the capability
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert hashlib.sha256(fetched.content).hexdigest() == (item.model_extra or {})["release"]["sha256"]
    assert_released(base64.b64encode(fetched.content).decode())
    tampered = item.url.replace("expires=", "expires=9")
    assert client.get(tampered.removeprefix("http://testserver")).status_code == 404
    forged = item.url.rsplit("signature=", 1)[0] + "signature=" + "0" * 64
    assert client.get(forged.removeprefix("http://testserver")).json()["error"]["code"] == "not_found"
    store = client.app.state.services.results  # type: ignore[attr-defined]
    ttl, store.ttl_seconds = store.ttl_seconds, 1.0  # IMAGEGEN_RESULT_URL_TTL_SECONDS=1, for this one URL
    try:
        short = store.put(b"\x89PNG other bytes", "image/png")
    finally:
        store.ttl_seconds = ttl
    time.sleep(1.5)
    gone = client.get(short)
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "url_expired"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(float) - b.astype(float)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def test_output_compression_is_openai_s_100_least_compressed(client: TestClient) -> None:
    def image(**fields: Any) -> np.ndarray:
        body = {"model": "tiny-eps", "prompt": "a red mug", "size": "32x32", **CHEAP, **fields}
        return np.asarray(decode_image(client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]))

    png = image()
    best, worst = image(output_format="jpeg", output_compression=100), image(output_format="jpeg", output_compression=0)
    assert psnr(best, png) > 35 > psnr(worst, png)


def test_a_policy_block_is_moderation_blocked_and_not_retried(client: TestClient) -> None:
    sent: list[str] = []
    client.event_hooks["request"].append(lambda request: sent.append(str(request.url)))
    try:
        api = openai_client(client, max_retries=2)
        with pytest.raises(BadRequestError) as info:
            api.images.generate(model="tiny-eps", prompt="a counterfeit handbag", extra_body=CHEAP)
        assert info.value.code == "moderation_blocked" and "counterfeit" in info.value.message
        assert info.value.response.headers["x-should-retry"] == "false"
        # A 409 is one the client would retry by default: x-should-retry stops it.
        logo = {"model": "tiny-eps", "prompt": "a mug", "contains_logo": True, **CHEAP}
        held = client.post("/v1/images/generations", json=logo).json()["data"][0]["review_id"]
        reviewer = {"Authorization": f"Bearer {REVIEWER_KEY}"}
        assert client.post(f"/v1/reviews/{held}/approve", headers=reviewer).status_code == 200
        sent.clear()
        with pytest.raises(Exception) as again:
            api.post(f"/reviews/{held}/approve", cast_to=httpx.Response, options={"headers": reviewer})
        assert getattr(again.value, "status_code", None) == 409 and len(sent) == 1
    finally:
        client.event_hooks["request"].pop()


def test_quality_presets_aliases_usage_and_what_is_refused(client: TestClient) -> None:
    api = openai_client(client, max_retries=0)
    low = api.images.generate(model="gpt-image-1", prompt="a red mug", quality="low", size="16x16")
    assert low.data is not None and low.quality == "low"
    record = (low.data[0].model_extra or {})["generation"]
    assert record["model"] == "tiny-eps" and record["steps"] == 12  # half of the model's 25
    high = api.images.generate(model="dall-e-3", prompt="a red mug", quality="hd", size="16x16", extra_body={"seed": 1})
    assert high.data is not None and (high.data[0].model_extra or {})["generation"]["steps"] == 50
    assert low.usage is not None and low.usage.input_tokens_details.text_tokens == 3
    assert low.usage.output_tokens == 8 * 8 and low.usage.total_tokens == 3 + 8 * 8
    auto = api.images.generate(model="tiny-eps", prompt="a red mug", size="auto", extra_body=CHEAP)
    assert auto.size == "16x16"  # the model's native size
    for field, value, code in (("background", "transparent", "unsupported_parameter"),
                               ("svg", {"width": 10}, "unsupported_parameter"),
                               ("quality", "ultra", "invalid_value")):  # fmt: skip
        with pytest.raises(BadRequestError) as info:
            api.images.generate(model="tiny-eps", prompt="a mug", extra_body={field: value})
        assert info.value.code == code, field
