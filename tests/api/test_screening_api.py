"""Obfuscated prompts through the HTTP API, screened as each served model's real tokenizer reads them: the shipped
default model (BERT WordPiece) and a tiny SD model with OpenAI's CLIP BPE tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from imagegen.main import create_app
from imagegen.settings import Settings
from tests.helpers import wait_ready
from tests.tiny_models import SD15_SCHEDULER
from tests.tokenizers import OBFUSCATIONS, build_clip_tiny_model, clip_tokenizer

MODELS = Path(__file__).resolve().parents[2] / "models"
DENIED = "a fake receipt for a mug"
BRAND = "a nike mug on a desk"
REFUSED_AS_TEXT = {"delete control character"}  # the request schema refuses control characters: a 400 first
CLASSES = [o for o in OBFUSCATIONS if o not in REFUSED_AS_TEXT]
CAT_IDS = {  # "a photo of a cat" as each tokenizer's published vocabulary numbers it
    "tiny-clip": [49406, 320, 1125, 539, 320, 2368, 49407],
    "catalog-128": [101, 1037, 6302, 1997, 1037, 4937, 102],
}
Served = tuple[TestClient, str]


@pytest.fixture(scope="module", params=["catalog-128", "tiny-clip"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model = str(request.param)
    if model == "catalog-128":
        models_dir = MODELS
    else:
        models_dir = tmp_path_factory.mktemp("clip-models")
        tokenizer = clip_tokenizer(tmp_path_factory.getbasetemp() / "clip-tokenizer")
        build_clip_tiny_model(models_dir / model, SD15_SCHEDULER, tokenizer)
    settings = Settings(models_dir=models_dir, default_model=model, state_dir=tmp_path_factory.mktemp("state"))
    with TestClient(create_app(settings)) as client:
        wait_ready(client, timeout=300)
        yield client, model


def post(served: Served, prompt: str) -> dict:
    client, model = served
    r = client.post("/v1/images/generations", json={"model": model, "prompt": prompt, "num_inference_steps": 2})
    return {"status": r.status_code, **r.json()}


def test_the_served_tokenizer_is_the_real_one(served: Served) -> None:
    client, model = served
    tokenizer = client.app.state.services.models[model].family.text_encoder.tokenizer  # type: ignore[attr-defined]
    assert tokenizer("a photo of a cat")["input_ids"] == CAT_IDS[model]


def test_a_benign_prompt_is_released_with_pixels(served: Served) -> None:
    item = post(served, "a red mug on a white background")["data"][0]
    assert item["release"]["outcome"] == "synthetic_labeled_preview" and item["b64_json"]


@pytest.mark.parametrize("obfuscation", CLASSES)
def test_an_obfuscated_denied_phrase_is_refused(served: Served, obfuscation: str) -> None:
    body = post(served, OBFUSCATIONS[obfuscation](DENIED))
    assert body["status"] == 400 and body["error"]["code"] == "moderation_blocked", body
    assert "fake receipt" in body["error"]["message"]


@pytest.mark.parametrize("obfuscation", CLASSES)
def test_an_obfuscated_brand_is_held_without_pixels(served: Served, obfuscation: str) -> None:
    body = post(served, OBFUSCATIONS[obfuscation](BRAND))
    assert body["status"] == 200, body
    item = body["data"][0]
    assert item["status"] == "pending_review" and item["b64_json"] is None, item
    assert any("'nike'" in reason for reason in item["release"]["reasons"])


def test_control_characters_are_refused_as_text(served: Served) -> None:
    body = post(served, OBFUSCATIONS["delete control character"](DENIED))
    assert body["status"] == 400 and body["error"]["param"] == "prompt"
