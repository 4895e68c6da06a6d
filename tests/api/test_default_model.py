"""The shipped default models — the UNet teacher, its distilled student and the rectified-flow transformer —
served from ./models as `make serve` does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from imagegen.main import create_app
from imagegen.settings import Settings
from models.recipes.data import BG_BASE, COLOURS
from tests.helpers import assert_labeled_synthetic, decode_image, wait_ready

MODELS = Path(__file__).resolve().parents[2] / "models"
CASES = [  # prompt, object colour, background
    ("a red mug on a white background", "red", "white"),
    ("product photo of a blue t-shirt, black backdrop", "blue", "black"),
    ("a yellow backpack on a wooden background", "yellow", "wood"),
    ("a green bottle on a pastel blue background", "green", "blue"),
]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models_dir=MODELS))) as c:
        wait_ready(c, timeout=300)
        yield c


def generate(client: TestClient, **body: object) -> np.ndarray:
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    image = decode_image(item["b64_json"])
    assert image.size == (128, 128)
    assert_labeled_synthetic(image, str(item["generation"]["model"]))
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def follows(pixels: np.ndarray, colour: str, background: str) -> tuple[bool, bool]:
    """Background: the four 10×10 corners average near the backdrop's colour. Object: ≥ 3% of the pixels
    are near the object's colour. A model that ignores its prompt misses one or the other."""
    corners = np.concatenate([pixels[:10, :10], pixels[:10, -10:], pixels[-10:, :10], pixels[-10:, -10:]])
    bg_ok = np.linalg.norm(corners.reshape(-1, 3).mean(0) - np.array(BG_BASE[background])) < 60
    near = np.linalg.norm(pixels - np.array(COLOURS[colour][0]), axis=-1) < 80
    return bool(bg_ok), bool(near.mean() > 0.03)


def test_both_models_are_served_by_default(client: TestClient) -> None:
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert {"catalog-128", "catalog-128-lcm", "catalog-128-flow"} <= ids
    r = client.post("/v1/images/generations", json={"prompt": "a white vase on a grey background"})
    gen = r.json()["data"][0]["generation"]
    assert gen["model"] == "catalog-128" and gen["sampler"] == "ddim" and (gen["width"], gen["height"]) == (128, 128)


@pytest.mark.parametrize(("prompt", "colour", "background"), CASES)
def test_teacher_follows_colour_and_background(client: TestClient, prompt: str, colour: str, background: str) -> None:
    pixels = generate(client, model="catalog-128", prompt=prompt, seed=5)
    assert follows(pixels, colour, background) == (True, True)


@pytest.mark.parametrize(("prompt", "colour", "background"), CASES[:2])
def test_student_follows_in_four_steps(client: TestClient, prompt: str, colour: str, background: str) -> None:
    pixels = generate(client, model="catalog-128-lcm", prompt=prompt, seed=5, num_inference_steps=4)
    assert follows(pixels, colour, background) == (True, True)


def test_a_random_model_would_miss_the_floor() -> None:
    noise = np.random.default_rng(0).uniform(0, 255, (128, 128, 3)).astype(np.float32)
    assert follows(noise, "red", "white") != (True, True)


@pytest.mark.parametrize("steps", [3, 25, 61, 103])
def test_ddim_with_full_eta_is_a_picture_at_every_step_count(client: TestClient, steps: int) -> None:
    """η = 1 on a zero-terminal-SNR schedule once put NaN in the first step: a uniform black image, released."""
    rgb = generate(client, prompt="a red mug on a white background", sampler="ddim", eta=1.0,
                   num_inference_steps=steps, seed=7)  # fmt: skip
    assert rgb.std() > 20 and rgb.mean() > 40, (steps, rgb.mean(), rgb.std())


def test_the_flow_model_is_an_sd3_family_model_with_flow_euler(client: TestClient) -> None:
    model = client.get("/v1/models/catalog-128-flow").json()
    assert model["family"] == "sd3" and model["samplers"] == ["flow_euler"] and model["guidance"] == "cfg"
    assert model["defaults"]["sampler"] == "flow_euler" and model["defaults"]["steps"] <= 12


@pytest.mark.parametrize(("prompt", "colour", "background"), CASES)
def test_flow_model_follows_prompts(client: TestClient, prompt: str, colour: str, background: str) -> None:
    pixels = generate(client, model="catalog-128-flow", prompt=prompt, seed=5)
    assert follows(pixels, colour, background) == (True, True)
    again = generate(client, model="catalog-128-flow", prompt=prompt, seed=5)
    # same seed, same image: only the invisible watermark, whose payload is per image, moves a few levels
    assert np.abs(pixels - again).mean() < 2 and np.abs(pixels - again).max() <= 8
