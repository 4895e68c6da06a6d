"""Every model family served through the HTTP API from its standard diffusers folder: listed with its family and
samplers, generating through the same engine, refusing what it cannot do with a clear 400."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagegen.main import create_app
from imagegen.settings import Settings
from tests.helpers import wait_ready
from tests.tiny_families import build_tiny_flux, build_tiny_sd3, build_tiny_sdxl
from tests.tiny_models import SD15_SCHEDULER, build_tiny_inpainting_model

FAMILY = {"tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-sd3-no-t5": "sd3", "tiny-flux-dev": "flux",
          "tiny-flux-schnell": "flux"}  # fmt: skip
INPAINTING = {"tiny-sd-inpainting": "sd"}  # a 9-channel UNet: edits with a mask only


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("families")
    build_tiny_sdxl(root / "tiny-sdxl", seed=1)
    build_tiny_sd3(root / "tiny-sd3", seed=2)
    build_tiny_sd3(root / "tiny-sd3-no-t5", seed=3, with_t5=False)
    build_tiny_flux(root / "tiny-flux-dev", seed=4)
    build_tiny_flux(root / "tiny-flux-schnell", seed=5, guidance_embeds=False)
    build_tiny_inpainting_model(root / "tiny-sd-inpainting", SD15_SCHEDULER, seed=6)
    settings = Settings(models_dir=root, default_model="tiny-sdxl", state_dir=tmp_path_factory.mktemp("state"))
    with TestClient(create_app(settings)) as c:
        wait_ready(c, timeout=120)
        yield c


def generate(client: TestClient, model: str, **fields: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": "a red mug on a white background", "size": "32x32", "seed": 7,
            "num_inference_steps": 3, **fields}  # fmt: skip
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def image(body: dict[str, Any], i: int = 0) -> np.ndarray:
    import base64

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][i]["b64_json"]))), dtype=np.int16)


def test_every_family_is_listed_with_what_it_can_run(client: TestClient) -> None:
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert {name: m["family"] for name, m in models.items()} == FAMILY | INPAINTING
    assert models["tiny-sdxl"]["samplers"] == ["ddim", "dpmpp_2m", "euler", "euler_a"]
    assert models["tiny-sdxl"]["defaults"]["sampler"] == "euler"  # its EulerDiscreteScheduler
    for name in ("tiny-sd3", "tiny-sd3-no-t5", "tiny-flux-dev", "tiny-flux-schnell"):
        assert models[name]["samplers"] == ["flow_euler"] and models[name]["defaults"]["sampler"] == "flow_euler"
    assert [models[n]["guidance"] for n in ("tiny-sdxl", "tiny-sd3", "tiny-flux-dev", "tiny-flux-schnell")] == [
        "cfg", "cfg", "embedded", "none"
    ]  # fmt: skip
    assert not models["tiny-flux-dev"]["negative_prompt"] and models["tiny-sd3"]["negative_prompt"]
    assert models["tiny-flux-schnell"]["defaults"]["steps"] == 4


@pytest.mark.parametrize("model", sorted(FAMILY))
def test_every_family_generates_through_the_api(client: TestClient, model: str) -> None:
    body = generate(client, model, n=2)
    a, b = image(body, 0), image(body, 1)
    assert a.shape == (32, 32, 3) and a.std() > 1  # an image, not a flat colour
    assert np.abs(a - b).max() > 1  # image i draws from seed + i
    assert body["data"][0]["generation"]["sampler"] == ("euler" if model == "tiny-sdxl" else "flow_euler")
    again = generate(client, model, n=1)
    assert np.abs(image(again) - a).max() <= 1  # same seed, same image


@pytest.mark.parametrize(
    ("model", "sampler"),
    [("tiny-sd3", "ddim"), ("tiny-flux-dev", "euler"), ("tiny-sdxl", "flow_euler"), ("tiny-sdxl", "lcm")],
)
def test_a_sampler_the_model_cannot_run_is_a_400(client: TestClient, model: str, sampler: str) -> None:
    r = client.post("/v1/images/generations", json={"model": model, "prompt": "a mug", "sampler": sampler})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_sampler" and err["param"] == "sampler" and sampler in err["message"]


def test_sd3_refuses_sides_past_its_position_table(client: TestClient) -> None:
    """The tiny SD3 holds 32 patches a side (2 px each, VAE factor 2): 128 px. Past it the transformer raises."""
    generate(client, "tiny-sd3", size="16x128")
    body = {"model": "tiny-sd3", "prompt": "a mug", "size": "16x256"}  # within the area bound, past the table
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "size_not_supported", r.text


def test_flux_takes_no_negative_prompt(client: TestClient) -> None:
    r = client.post(
        "/v1/images/generations", json={"model": "tiny-flux-dev", "prompt": "a mug", "negative_prompt": "x"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", r.text
    generate(client, "tiny-flux-dev", negative_prompt="")  # what A1111-style clients send by default


def test_negative_prompts_change_what_cfg_families_make(client: TestClient) -> None:
    for model in ("tiny-sdxl", "tiny-sd3"):
        plain = image(generate(client, model, guidance_scale=6.0))
        negative = image(generate(client, model, guidance_scale=6.0, negative_prompt="blurry, low quality"))
        assert np.abs(plain - negative).max() > 1, model


def test_concurrent_requests_of_every_family_all_succeed(client: TestClient) -> None:
    jobs = [(m, {"num_inference_steps": s, "guidance_scale": g}) for m in FAMILY for s, g in ((2, 1.0), (4, 5.0))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: generate(client, j[0], **j[1]), jobs))
    assert [r["data"][0]["generation"]["steps"] for r in results] == [j[1]["num_inference_steps"] for j in jobs]


def product_png(side: int = 32) -> tuple[bytes, np.ndarray, bytes, np.ndarray]:
    """A product on white, and an OpenAI mask (alpha 0 = change) that keeps it: the PNGs and the arrays."""
    photo = np.full((side, side, 3), 255, np.uint8)
    photo[8:24, 8:24] = np.random.default_rng(0).integers(0, 255, (16, 16, 3))
    keep = np.zeros((side, side), bool)
    keep[8:24, 8:24] = True
    buf, mask = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    Image.fromarray(np.dstack([photo, np.where(keep, 255, 0).astype(np.uint8)]), "RGBA").save(mask, format="PNG")
    return buf.getvalue(), photo, mask.getvalue(), keep


def edit(client: TestClient, model: str, masked: bool, **fields: str) -> dict[str, Any]:
    image, _, mask, _ = product_png()
    files = [("image", ("p.png", image, "image/png"))] + ([("mask", ("m.png", mask, "image/png"))] if masked else [])
    data = {"model": model, "prompt": "a red mug on a teal background", "size": "32x32", "seed": "7",
            "num_inference_steps": "4", **fields}  # fmt: skip
    r = client.post("/v1/images/edits", data=data, files=files)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("model", sorted(FAMILY | INPAINTING))
def test_every_family_edits_a_product_photo_and_keeps_the_product(client: TestClient, model: str) -> None:
    """Inpainting (the kept region blended in at every step; a 9-channel UNet reads the mask) on every family, and
    img2img on every family but the inpainting checkpoint, which needs a mask."""
    _, photo, _, keep = product_png()
    body = edit(client, model, masked=True)
    out = image(body)
    assert (out[keep] == photo[keep]).all() and np.abs(out[~keep] - 255).mean() > 5
    assert body["data"][0]["release"]["kept"]["pixels"] == int(keep.sum())
    again = edit(client, model, masked=True)
    assert np.array_equal(image(again), out)  # same seed, same pixels
    if model in INPAINTING:
        return
    img2img = edit(client, model, masked=False, strength="0.5")
    assert img2img["data"][0]["release"]["kept"] is None and img2img["data"][0]["generation"]["strength"] == 0.5


def test_an_inpainting_checkpoint_needs_a_mask(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json={"model": "tiny-sd-inpainting", "prompt": "a mug", "size": "32x32"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "mask_required"
    image_only, _, _, _ = product_png()
    r = client.post(
        "/v1/images/edits", data={"model": "tiny-sd-inpainting", "prompt": "a mug", "size": "32x32"},
        files=[("image", ("p.png", image_only, "image/png"))],
    )  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "mask_required"
