"""POST /v1/images/edits (the official openai client's images.edit) and AUTOMATIC1111's /sdapi/v1/img2img: the
product's pixels come back exactly (under 128 px no watermark is embedded, so exactly means bit for bit), every
edit is labelled a composite (XMP, and C2PA with the input as its parentOf ingredient), held edits keep their
input for the reviewer, and bad uploads get clear 4xx answers."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import zlib
from typing import Any

import c2pa
import numpy as np
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from PIL import Image

from imagegen.gate.c2pa_manifest import READ_SETTINGS
from imagegen.gate.labels import COMPOSITE_SOURCE_TYPE
from tests.api.conftest import ADMIN_KEY, REVIEWER_KEY
from tests.helpers import decode_image, png_parameters, xmp_of

STEPS = {"num_inference_steps": "3", "seed": "7", "model": "tiny-eps", "size": "32x32"}


def product_photo(width: int = 32, height: int = 32) -> np.ndarray:
    """A sharp-edged product on white with a texture the VAE cannot reproduce: kept pixels are checked exactly."""
    rng = np.random.default_rng(0)
    pixels = np.full((height, width, 3), 255, np.uint8)
    pixels[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = rng.integers(
        0, 255, (height // 2, width // 2, 3)
    )
    return pixels


def png(pixels: np.ndarray, alpha: np.ndarray | None = None) -> bytes:
    image = Image.fromarray(pixels) if alpha is None else Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def keep_centre_mask(width: int = 32, height: int = 32) -> tuple[bytes, np.ndarray]:
    """OpenAI's mask: alpha 0 marks what changes; here everything but the product (the centre)."""
    alpha = np.zeros((height, width), np.uint8)
    alpha[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return png(np.zeros((height, width, 3), np.uint8), alpha), alpha == 255


def openai_client(client: TestClient) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=client, max_retries=0)


def manifest(data: bytes, media_type: str = "image/png") -> tuple[str, dict[str, Any]]:
    with (
        c2pa.Context.from_dict(READ_SETTINGS) as context,
        c2pa.Reader(media_type, io.BytesIO(data), context=context) as reader,
    ):
        store = json.loads(reader.json())
        return str(reader.get_validation_state()), store["manifests"][store["active_manifest"]]


def actions_of(active: dict[str, Any]) -> list[dict[str, Any]]:
    (assertion,) = [a for a in active["assertions"] if a["label"].startswith("c2pa.actions")]
    return list(assertion["data"]["actions"])


def post_edit(client: TestClient, image: bytes, mask: bytes | None = None, **fields: str) -> Any:
    files = [("image", ("product.png", image, "image/png"))]
    if mask is not None:
        files.append(("mask", ("mask.png", mask, "image/png")))
    return client.post("/v1/images/edits", data={"prompt": "on a teal backdrop", **STEPS, **fields}, files=files)


def test_openai_client_edit_with_a_mask_keeps_the_product_and_labels_a_composite(client: TestClient) -> None:
    photo = product_photo()
    mask, kept = keep_centre_mask()
    result = openai_client(client).images.edit(
        image=("product.png", png(photo), "image/png"),
        mask=("mask.png", mask, "image/png"),
        prompt="the same product on a teal backdrop",
        n=2,
        size="32x32",
        extra_body=STEPS,
    )
    assert result.data is not None and len(result.data) == 2
    outputs = []
    for item in result.data:
        assert item.b64_json is not None
        data = base64.b64decode(item.b64_json)
        out = np.asarray(decode_image(item.b64_json).convert("RGB"))
        assert (out[kept] == photo[kept]).all()  # the product, bit for bit
        assert np.abs(out[~kept].astype(int) - photo[~kept]).mean() > 20  # the backdrop was generated
        outputs.append(out)
        extra = item.model_extra or {}
        assert extra["release"]["kept"]["pixels"] == int(kept.sum())
        assert extra["release"]["kept"]["box"] == [8, 8, 24, 24]
        assert "composite_with_input" in extra["release"]["labels"]
        assert extra["generation"]["strength"] == 1.0
        assert extra["generation"]["input_sha256"] == hashlib.sha256(png(photo)).hexdigest()
        assert COMPOSITE_SOURCE_TYPE in xmp_of(decode_image(item.b64_json))
        state, active = manifest(data)
        assert state in ("Valid", "Trusted")
        ((ingredient,)) = active["ingredients"]
        assert ingredient["relationship"] == "parentOf" and ingredient["format"] == "image/png"
        opened, edited = actions_of(active)
        assert opened["action"] == "c2pa.opened" and opened["parameters"]["ingredients"]
        assert edited["action"] == "c2pa.edited" and edited["digitalSourceType"] == COMPOSITE_SOURCE_TYPE
    assert (outputs[0] != outputs[1]).any()  # seed and seed + 1


def test_openai_client_edit_without_a_mask_is_img2img(client: TestClient) -> None:
    photo = product_photo()
    result = openai_client(client).images.edit(
        image=("product.png", png(photo), "image/png"), prompt="a product", size="32x32",
        extra_body={**STEPS, "strength": "0.5"},
    )  # fmt: skip
    assert result.data is not None
    item = result.data[0]
    extra = item.model_extra or {}
    assert extra["release"]["kept"] is None and "edited_input" in extra["release"]["labels"]
    assert (
        extra["generation"]["strength"] == 0.5 and png_parameters(decode_image(item.b64_json or ""))["strength"] == 0.5
    )
    assert COMPOSITE_SOURCE_TYPE in xmp_of(decode_image(item.b64_json or ""))


def test_the_same_edit_gives_the_same_pixels_and_batched_edits_equal_solo(client: TestClient) -> None:
    """Edits of several requests share forwards (the client's requests arrive together in its thread pool)."""
    from concurrent.futures import ThreadPoolExecutor

    mask, _ = keep_centre_mask()
    calls = [{"seed": str(s), "strength": str(st)} for s, st in ((7, "1.0"), (8, "0.6"), (9, "1.0"))]
    solo = [post_edit(client, png(product_photo()), mask, **c).json()["data"][0] for c in calls]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda c: post_edit(client, png(product_photo()), mask, **c).json()["data"][0], calls))
    for a, b in zip(solo, together, strict=True):
        assert np.array_equal(np.asarray(decode_image(a["b64_json"])), np.asarray(decode_image(b["b64_json"])))


def test_outpainting_places_the_image_on_a_larger_canvas(client: TestClient) -> None:
    photo = product_photo(32, 16)
    r = post_edit(client, png(photo), None, size="32x32", resize_mode="pad", image_y="0")
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    out = np.asarray(decode_image(item["b64_json"]).convert("RGB"))
    assert (out[:16] == photo).all()  # placed at the top, kept exactly
    assert item["release"]["kept"]["box"] == [0, 0, 32, 16]
    far = post_edit(client, png(photo), None, size="32x32", resize_mode="pad", image_y="17")
    assert far.status_code == 400 and far.json()["error"]["code"] == "invalid_placement"


def test_a_size_other_than_the_input_is_fitted_as_documented(client: TestClient) -> None:
    """No size: the input's aspect at the model's native area; crop (the default) covers the canvas."""
    photo = product_photo(64, 32)
    r = post_edit(client, png(photo), None, strength="0.5", size="auto")
    assert r.status_code == 200 and r.json()["size"] == "24x12"  # tiny-eps is native 16x16: 24x12 ≈ 256 px
    cropped = post_edit(client, png(photo), None, size="32x32", strength="0.5")
    assert cropped.status_code == 200 and cropped.json()["size"] == "32x32"


def test_a_held_edit_keeps_its_input_for_the_reviewer_and_is_labelled_on_approval(client: TestClient) -> None:
    photo = product_photo()
    mask, kept = keep_centre_mask()
    r = post_edit(client, png(photo), mask, asset_type="product_detail_view")
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert item["status"] == "pending_review" and item["b64_json"] is None
    review_id = item["review_id"]
    reviewer = {"Authorization": f"Bearer {REVIEWER_KEY}"}
    shown = client.get(f"/v1/reviews/{review_id}/input", headers=reviewer)
    assert shown.status_code == 200 and shown.content == png(photo) and shown.headers["content-type"] == "image/png"
    held = np.asarray(Image.open(io.BytesIO(client.get(f"/v1/reviews/{review_id}/image", headers=reviewer).content)))
    assert (held[kept] == photo[kept]).all()  # the reviewer sees the composite that would be released
    assert client.get(f"/v1/reviews/{review_id}/input", headers={"Authorization": ""}).status_code == 401
    assert client.post(f"/v1/reviews/{review_id}/approve", headers=reviewer).status_code == 200
    fetched = client.get(f"/v1/reviews/{review_id}/result").json()["data"][0]
    state, active = manifest(base64.b64decode(fetched["b64_json"]))
    assert state in ("Valid", "Trusted") and active["ingredients"][0]["relationship"] == "parentOf"
    assert [a["action"] for a in actions_of(active)] == ["c2pa.opened", "c2pa.edited"]
    events = [a["event"] for a in client.get(f"/v1/reviews/{review_id}", headers=reviewer).json()["audit"]]
    assert "viewed_input" in events


def test_an_async_edit_is_a_job(client: TestClient) -> None:
    import time

    mask, _ = keep_centre_mask()
    files = [("image", ("p.png", png(product_photo()), "image/png")), ("mask", ("m.png", mask, "image/png"))]
    r = client.post(
        "/v1/images/edits", data={"prompt": "teal", **STEPS}, files=files, headers={"Prefer": "respond-async"}
    )
    assert r.status_code == 202, r.text
    for _ in range(200):
        job = client.get(r.headers["Location"]).json()
        if job["status"] == "succeeded":
            break
        time.sleep(0.05)
    assert job["result"]["data"][0]["release"]["kept"]["pixels"] == 256
    kept = client.app.state.services.jobs.get(job["id"])  # type: ignore[attr-defined]
    assert kept.request.edit_source is None and kept.request.init_image is None  # the upload is not held


def test_automatic1111_img2img_shape(client: TestClient) -> None:
    photo = product_photo()
    white_repaints = np.where(keep_centre_mask()[1][..., None], 0, 255).repeat(3, axis=2).astype(np.uint8)
    body = {
        "init_images": [base64.b64encode(png(photo)).decode()],
        "mask": "data:image/png;base64," + base64.b64encode(png(white_repaints)).decode(),
        "prompt": "teal backdrop", "steps": 3, "cfg_scale": 5, "width": 32, "height": 32, "seed": 5,
        "sampler_name": "Euler a", "denoising_strength": 1.0, "mask_blur": 0, "batch_size": 2,
        "inpaint_full_res": True, "resize_mode": 0, "override_settings": {"sd_model_checkpoint": "tiny-eps"},
        "alwayson_scripts": {},  # one of the many UI fields A1111 clients send: ignored
    }  # fmt: skip
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert len(answer["images"]) == 2 and answer["parameters"]["steps"] == 3
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [5, 6] and info["sampler_name"] == "Euler a" and info["notes"]  # A1111's name
    kept = keep_centre_mask()[1]
    for b64 in answer["images"]:
        assert (np.asarray(decode_image(b64).convert("RGB"))[kept] == photo[kept]).all()
    blurred = client.post("/sdapi/v1/img2img", json={**body, "mask_blur": 2, "batch_size": 1})
    assert blurred.status_code == 200 and json.loads(blurred.json()["info"])["release"][0]["kept"]["blended"] > 0
    bad = client.post("/sdapi/v1/img2img", json={**body, "init_images": ["not base64!"]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"


def png_bomb(side: int) -> bytes:
    """A valid PNG header claiming ``side`` × ``side`` pixels, with a tiny compressed body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def gif() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(product_photo()).save(buf, format="GIF")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("image", "mask", "fields", "status", "code"),
    [
        (png(product_photo()), png(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), np.uint8)), {}, 400,
         "invalid_mask"),  # another size
        (png(product_photo()), png(np.zeros((32, 32, 3), np.uint8)), {}, 400, "invalid_mask"),  # no alpha
        (png(product_photo()), png(np.zeros((32, 32, 3), np.uint8), np.full((32, 32), 255, np.uint8)), {}, 400,
         "invalid_mask"),  # nothing to change
        (gif(), None, {}, 415, "unsupported_media_type"),
        (png_bomb(100_000), None, {}, 413, "image_too_large"),
        (png(product_photo())[:60], None, {}, 400, "invalid_image"),
        (png(product_photo()), None, {"strength": "0"}, 400, "invalid_value"),
        (png(product_photo()), None, {"strength": "0.01"}, 400, "invalid_strength"),
        (png(product_photo()), None, {"sampler": "lcm"}, 400, "unsupported_sampler"),
        (png(product_photo()), None, {"background": "transparent"}, 400, "unsupported_parameter"),
        (png(product_photo()), None, {"svg": "{}"}, 400, "unsupported_parameter"),
        (png(product_photo()), None, {"n": "two"}, 400, "invalid_value"),
        (png(product_photo()), None, {"strength": "NaN"}, 400, "invalid_value"),
        (png(product_photo()), None, {"colour": "teal"}, 422, "unknown_field"),
    ],
)  # fmt: skip
def test_bad_edits_get_clear_4xx(
    client: TestClient, image: bytes, mask: bytes | None, fields: dict[str, str], status: int, code: str
) -> None:
    r = post_edit(client, image, mask, **fields)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def test_malformed_edit_requests_get_clear_4xx(client: TestClient) -> None:
    photo = png(product_photo())
    none = client.post("/v1/images/edits", data={"prompt": "x"}, files=[("mask", ("m.png", photo, "image/png"))])
    assert none.status_code == 400 and none.json()["error"]["code"] == "missing_field"
    two = client.post(
        "/v1/images/edits", data={"prompt": "x"},
        files=[("image[]", ("a.png", photo, "image/png")), ("image[]", ("b.png", photo, "image/png"))],
    )  # fmt: skip
    assert two.status_code == 400 and two.json()["error"]["code"] == "unsupported_parameter"
    as_json = client.post("/v1/images/edits", json={"prompt": "x", "image": "abc"})
    assert as_json.status_code == 415 and as_json.json()["error"]["code"] == "unsupported_media_type"
    huge = client.post(
        "/v1/images/edits", data={"prompt": "x"}, files=[("image", ("a.png", b"\0" * (21 * 1024 * 1024), "image/png"))]
    )
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "payload_too_large"
