"""AUTOMATIC1111's web API as A1111 clients call it: txt2img, sd-models, samplers, progress, interrupt, and the PNG
``parameters`` chunk PNG-info tools read."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from imagegen.a1111 import SAMPLER_NAMES
from imagegen.gate.labels import A1111_PARAMETERS_KEY, a1111_parameters
from tests.api.conftest import REVIEWER_KEY
from tests.helpers import assert_labeled_synthetic, decode_image, png_parameters

ALICE = {"Authorization": f"Bearer {REVIEWER_KEY}"}  # another key than the client's own (ops)
BOB = {"Authorization": "Bearer other-secret"}
Response = Any  # httpx's or httpx2's, whichever the installed TestClient is built on
# A1111's own parser of its settings line (modules/infotext_utils.py: re_param_code)
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict[str, str]:
    """PNG-info text → {"Prompt", "Negative prompt", "Steps", …}, the way A1111's PNG Info tab reads it."""
    *lines, last = text.strip().split("\n")
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        else:
            (negative if negative else prompt).append(line)
    fields = {k: json.loads(v) if v.startswith('"') else v for k, v in RE_PARAM.findall(last)}
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **fields}


def txt2img(**fields: Any) -> dict[str, Any]:
    return {
        "prompt": "a red mug, studio light", "negative_prompt": "blurry", "steps": 2, "cfg_scale": 5.0, "width": 32,
        "height": 32, "seed": 7, "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1,
        "override_settings": {"sd_model_checkpoint": "tiny-eps"}, "save_images": False, "alwayson_scripts": {},
        **fields,
    }  # fmt: skip


def test_txt2img_answers_in_a1111_shape_with_labelled_images(client: TestClient) -> None:
    body = txt2img(
        sampler_name="DPM++ 2M", batch_size=2, n_iter=2, enable_hr=True, hr_scale=2, denoising_strength=0.5,
        override_settings={"sd_model_checkpoint": "tiny-v", "CLIP_stop_at_last_layers": 2},
    )  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"images", "parameters", "info"} and len(answer["images"]) == 4
    assert answer["parameters"]["override_settings"]["CLIP_stop_at_last_layers"] == 2
    info = json.loads(answer["info"])
    assert (
        info["all_seeds"] == [7, 8, 9, 10] and info["sampler_name"] == "DPM++ 2M" and info["sd_model_name"] == "tiny-v"
    )
    assert info["pending_review"] == [] and len(info["release"]) == len(info["infotexts"]) == 4
    assert any("enable_hr" in note and "hr_scale" in note for note in info["notes"])
    for i, b64 in enumerate(answer["images"]):
        image = decode_image(b64)
        assert image.size == (32, 32)
        assert_labeled_synthetic(image, "tiny-v")
        record = png_parameters(image)
        assert (record["sampler"], record["seed"], record["steps"]) == ("dpmpp_2m", 7 + i, 2)
        assert image.info[A1111_PARAMETERS_KEY] == info["infotexts"][i]
    # A1111's older API names and ours pick the same sampler; an unknown one is our 400, naming A1111's field
    for name in ("k_dpmpp_2m", "dpmpp_2m"):
        assert (
            json.loads(client.post("/sdapi/v1/txt2img", json=txt2img(sampler_name=name)).json()["info"])["sampler_name"]
            == "DPM++ 2M"
        )
    bad = client.post("/sdapi/v1/txt2img", json=txt2img(sampler_name="Heun"))
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_sampler"
    assert bad.json()["error"]["param"] == "sampler_name"
    lcm = client.post("/sdapi/v1/txt2img", json=txt2img(sampler_name="LCM"))  # tiny-eps is not distilled
    assert lcm.status_code == 400 and lcm.json()["error"]["code"] == "unsupported_sampler"
    too_big = client.post("/sdapi/v1/txt2img", json=txt2img(width=512, height=512))  # A1111's default size
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "width"
    unknown = client.post("/sdapi/v1/txt2img", json=txt2img(override_settings={"sd_model_checkpoint": "sdxl"}))
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "override_settings.sd_model_checkpoint"
    not_text = client.post("/sdapi/v1/txt2img", json=txt2img(override_settings={"sd_model_checkpoint": 5}))
    assert not_text.status_code == 400 and not_text.json()["error"]["code"] == "invalid_value"


def test_txt2img_goes_through_the_gate(client: TestClient) -> None:
    blocked = client.post("/sdapi/v1/txt2img", json=txt2img(prompt="a counterfeit watch"))
    same = client.post("/v1/images/generations", json={"prompt": "a counterfeit watch", "size": "32x32"})
    assert blocked.status_code == same.status_code >= 400 and blocked.json() == same.json()
    held = client.post("/sdapi/v1/txt2img", json=txt2img(prompt="a mug with the nike logo"))
    assert held.status_code == 200, held.text
    info = json.loads(held.json()["info"])
    assert held.json()["images"] == [] and len(info["pending_review"]) == 1 and info["pending_review"][0]


def test_sd_models_and_samplers(client: TestClient) -> None:
    models = client.get("/sdapi/v1/sd-models").json()
    by_name = {m["model_name"]: m for m in models}
    assert set(by_name) == {"tiny-eps", "tiny-v", "tiny-lcm"}
    for name, m in by_name.items():
        assert set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert re.fullmatch(r"[0-9a-f]{10}", m["hash"]) and m["title"] == f"{name} [{m['hash']}]"
        assert m["filename"] == name and m["config"] is None
    assert len({m["hash"] for m in models}) == 3 and client.get("/sdapi/v1/sd-models").json() == models  # stable
    # clients send the title back as the checkpoint
    r = client.post(
        "/sdapi/v1/txt2img", json=txt2img(override_settings={"sd_model_checkpoint": by_name["tiny-v"]["title"]})
    )
    assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "tiny-v"
    samplers = client.get("/sdapi/v1/samplers", headers=ALICE).json()  # any valid key
    names = [s["name"] for s in samplers]
    assert set(names) == {"Euler a", "Euler", "DPM++ 2M", "DDIM", "LCM"}  # no flow model loaded: no flow_euler
    for s in samplers:
        assert set(s) == {"name", "aliases", "options"} and SAMPLER_NAMES[s["name"].lower()] in s["aliases"]
    assert client.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer nope"}).status_code == 401


def progress(client: TestClient, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = client.get("/sdapi/v1/progress", headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


def start_long_txt2img(client: TestClient, steps: int) -> tuple[threading.Thread, list[Response]]:
    """A request that takes a while (150 steps take about 2 s), answered into the returned list."""
    out: list[Response] = []
    body = txt2img(steps=steps, sampler_name="Euler", seed=3)
    thread = threading.Thread(target=lambda: out.append(client.post("/sdapi/v1/txt2img", json=body)), daemon=True)
    thread.start()
    return thread, out


def wait_for_progress(client: TestClient, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = progress(client)
        if p["progress"] > 0:
            return p
        time.sleep(0.01)
    raise AssertionError("the request never made progress")


def assert_idle(p: dict[str, Any]) -> None:
    assert p["progress"] == 0 and p["state"]["job_count"] == 0 and p["state"]["job"] == "" and p["textinfo"] is None


def test_progress_of_the_callers_request_then_idle(client: TestClient) -> None:
    assert_idle(progress(client))
    thread, out = start_long_txt2img(client, steps=150)
    running = wait_for_progress(client)
    assert 0 < running["progress"] < 1 and running["eta_relative"] > 0
    state = running["state"]
    assert state["job_count"] == 1 and state["sampling_steps"] == 150 and 0 < state["sampling_step"] < 150
    assert state["job"] and not state["interrupted"] and running["textinfo"].startswith("step ")
    assert_idle(progress(client, ALICE))  # another key does not see it
    deadline = time.monotonic() + 30
    while (shown := progress(client))["current_image"] is None and shown["progress"] > 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert shown["current_image"] is not None, "the request ended before its first preview"
    preview = decode_image(shown["current_image"])  # a released partial: labelled like any image
    assert_labeled_synthetic(preview, "tiny-eps")
    assert preview.size == (32, 32)
    thread.join(60)
    assert out[0].status_code == 200, out[0].text
    assert_idle(progress(client))


def test_interrupt_cancels_only_the_callers_request(client: TestClient) -> None:
    thread, out = start_long_txt2img(client, steps=150)
    before = wait_for_progress(client)
    assert client.post("/sdapi/v1/interrupt", headers=BOB).json() == {"interrupted": 0}  # not bob's to stop
    time.sleep(0.2)
    later = progress(client)
    assert later["state"]["job"] == before["state"]["job"] and later["progress"] > before["progress"]
    assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": 1}
    thread.join(30)
    assert not thread.is_alive()
    assert out[0].status_code == 409 and out[0].json()["error"]["code"] == "job_cancelled"
    assert_idle(progress(client))
    assert client.post("/sdapi/v1/skip").json() == {"interrupted": 0}  # nothing left to stop


def test_png_parameters_chunk_reads_back_as_the_request(client: TestClient) -> None:
    body = txt2img(prompt="a red mug, studio light\non oak", negative_prompt="blurry, dark", seed=41, cfg_scale=4.5)
    answer = client.post("/sdapi/v1/txt2img", json=body).json()
    read = parse_a1111(decode_image(answer["images"][0]).info[A1111_PARAMETERS_KEY])
    assert read == {
        "Prompt": "a red mug, studio light\non oak", "Negative prompt": "blurry, dark", "Steps": "2",
        "Sampler": "Euler a", "CFG scale": "4.5", "Seed": "41", "Size": "32x32", "Model": "tiny-eps",
    }  # fmt: skip
    # an edit adds its denoising strength
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(buf, format="PNG")
    edit = {**txt2img(seed=5), "init_images": [base64.b64encode(buf.getvalue()).decode()], "denoising_strength": 0.5}
    r = client.post("/sdapi/v1/img2img", json=edit)
    assert r.status_code == 200, r.text
    read = parse_a1111(decode_image(r.json()["images"][0]).info[A1111_PARAMETERS_KEY])
    assert read["Denoising strength"] == "0.5" and read["Seed"] == "5" and read["Prompt"] == "a red mug, studio light"
    # values that hold A1111's separators are quoted, so that they read back whole
    record = {"prompt": "p", "negative_prompt": "", "sampler": "flow_euler", "steps": 4, "guidance_scale": 1.0,
              "seed": 1, "width": 8, "height": 8, "model": "odd, name: v2"}  # fmt: skip
    assert parse_a1111(a1111_parameters(record))["Model"] == "odd, name: v2"
    assert "Negative prompt" not in a1111_parameters(record)
