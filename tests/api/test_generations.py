"""POST /v1/images/generations through the ASGI app: images, labels, records, seeds."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.helpers import assert_labeled_synthetic, decode_image, png_parameters

BASE = {"model": "tiny-eps", "prompt": "a red mug on a white background", "num_inference_steps": 3, "size": "16x16"}


def generate(client: TestClient, **fields: object) -> dict:
    r = client.post("/v1/images/generations", json={**BASE, **fields})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_png_is_labeled_and_carries_its_record(client: TestClient) -> None:
    body = generate(client, seed=7, guidance_scale=4.0, negative_prompt="blurry")
    assert isinstance(body["created"], int) and body["output_format"] == "png" and body["size"] == "16x16"
    (item,) = body["data"]
    image = decode_image(item["b64_json"])
    assert image.format == "PNG" and image.size == (16, 16) and image.mode == "RGB"
    assert_labeled_synthetic(image, "tiny-eps")
    params = png_parameters(image)
    assert params["seed"] == 7 and params["steps"] == 3 and params["negative_prompt"] == "blurry"
    gen = item["generation"]
    assert gen == {
        "model": "tiny-eps",
        "sampler": "ddim",
        "steps": 3,
        "guidance_scale": 4.0,
        "guidance_rescale": 0.0,
        "seed": 7,
        "eta": 0.0,
        "width": 16,
        "height": 16,
        "negative_prompt": "blurry",
        "strength": None,  # edits only
        "input_sha256": None,
    }
    assert item["revised_prompt"] == BASE["prompt"]
    release = item["release"]
    assert release["outcome"] == "synthetic_labeled_preview" and "iptc_xmp" in release["labels"]
    import hashlib

    assert release["sha256"] == hashlib.sha256(base64.b64decode(item["b64_json"])).hexdigest()


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_jpeg_and_webp_are_labeled(client: TestClient, fmt: str) -> None:
    body = generate(client, output_format=fmt, output_compression=20, seed=1)
    image = decode_image(body["data"][0]["b64_json"])
    assert image.format == fmt.upper() and image.size == (16, 16)
    assert_labeled_synthetic(image, "tiny-eps")


def test_missing_seed_is_drawn_and_returned(client: TestClient) -> None:
    a, b = generate(client), generate(client)
    seed_a, seed_b = a["data"][0]["generation"]["seed"], b["data"][0]["generation"]["seed"]
    assert seed_a != seed_b
    again = generate(client, seed=seed_a)
    pixels = [decode_image(x["data"][0]["b64_json"]).tobytes() for x in (a, again)]
    assert pixels[0] == pixels[1]  # same pixels; the signed files differ (each manifest is unique)


def test_image_i_uses_seed_plus_i(client: TestClient) -> None:
    both = generate(client, n=2, seed=100, guidance_scale=3.0)
    assert [d["generation"]["seed"] for d in both["data"]] == [100, 101]
    second_alone = generate(client, n=1, seed=101, guidance_scale=3.0)
    pixels = [
        np.asarray(decode_image(x["b64_json"]), dtype=np.int16) for x in (both["data"][1], second_alone["data"][0])
    ]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1
    first = np.asarray(decode_image(both["data"][0]["b64_json"]), dtype=np.int16)
    assert np.abs(first - pixels[0]).max() > 1  # different seeds, different images


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m", "lcm"])
def test_every_sampler_serves(client: TestClient, sampler: str) -> None:
    model = "tiny-lcm" if sampler == "lcm" else "tiny-eps"
    body = generate(client, model=model, sampler=sampler, seed=3)
    assert body["data"][0]["generation"]["sampler"] == sampler


def test_models_list_their_family_and_samplers(client: TestClient) -> None:
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["tiny-eps"]["family"] == "sd" and models["tiny-eps"]["guidance"] == "cfg"
    assert models["tiny-eps"]["samplers"] == ["ddim", "dpmpp_2m", "euler", "euler_a"]
    assert models["tiny-lcm"]["samplers"] == ["ddim", "dpmpp_2m", "euler", "euler_a", "lcm"]
    assert models["tiny-lcm"]["guidance"] == "embedded" and models["tiny-lcm"]["defaults"]["sampler"] == "lcm"


def test_distilled_model_defaults_to_lcm(client: TestClient) -> None:
    body = generate(client, model="tiny-lcm", num_inference_steps=None)
    gen = body["data"][0]["generation"]
    assert gen["sampler"] == "lcm" and gen["steps"] == 4


def test_default_model_and_size(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json={"prompt": "a mug"})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["generation"]["model"] == "tiny-eps" and r.json()["size"] == "16x16"


def test_larger_size_is_honoured(client: TestClient) -> None:
    body = generate(client, size="32x16", seed=2)
    assert decode_image(body["data"][0]["b64_json"]).size == (32, 16)


def test_models_list_is_openai_shaped(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    ids = {m["id"] for m in body["data"]}
    assert ids == {"tiny-eps", "tiny-v", "tiny-lcm"}
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in body["data"])
    assert client.get("/v1/models/tiny-v").json()["id"] == "tiny-v"


def test_probes_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and set(ready["models"].values()) == {"ready"}
    generate(client, seed=5)
    text = client.get("/metrics").text
    assert 'imagegen_http_requests_total{method="POST",route="/v1/images/generations",status="200"}' in text
    assert "imagegen_http_request_duration_seconds_bucket" in text


@pytest.mark.parametrize(("fmt", "media_type"), [("png", "image/png"), ("jpeg", "image/jpeg")])
def test_every_image_carries_a_valid_c2pa_manifest(client: TestClient, fmt: str, media_type: str) -> None:
    from imagegen.gate.c2pa_manifest import read_manifest
    from imagegen.gate.labels import DIGITAL_SOURCE_TYPE

    item = generate(client, output_format=fmt, seed=3)["data"][0]
    report = read_manifest(base64.b64decode(item["b64_json"]), media_type)
    assert report.state == "Valid" and report.actions[0]["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    labels = item["release"]["labels"]
    assert labels[0] == "invisible_watermark_skipped_below_128px" and item["release"]["watermark_payload"] is None
    assert labels[-1] == "c2pa_manifest_untrusted_signer"
    signer = client.get("/readyz").json()["signer"]
    assert signer["trusted"] is False and "untrusted" in signer["notes"][0]


def test_verify_endpoint(client: TestClient) -> None:
    item = generate(client, seed=4)["data"][0]
    r = client.post("/v1/verify", content=base64.b64decode(item["b64_json"]), headers={"content-type": "image/png"})
    assert r.status_code == 200
    report = r.json()
    assert report["c2pa"]["state"] == "Valid" and report["watermark"]["checked"] is False
    bad = client.post("/v1/verify", content=b"nope", headers={"content-type": "image/png"})
    assert bad.status_code == 415 and bad.json()["error"]["code"] == "unsupported_media_type"
