"""The reviewer page in headless Chromium (Debian's chromium + chromedriver, driven by selenium):
sign in, see the held images, approve one and reject the other, sign out."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.helpers import running_server, write_key_file

REPO = Path(__file__).resolve().parents[2]
KEY = "page-reviewer-key"
SHOP_KEY = "page-shop-key"
SHOP = {"Authorization": f"Bearer {SHOP_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys = {"carol": (KEY, ["review"]), "shop": (SHOP_KEY, ["generate"])}
    env = {
        "IMAGEGEN_MODELS_DIR": str(tiny_models_dir),
        "IMAGEGEN_STATE_DIR": str(tmp_path_factory.mktemp("state")),
        "IMAGEGEN_API_KEYS_FILE": str(write_key_file(tmp_path_factory.mktemp("keys") / "keys.toml", keys)),
        "IMAGEGEN_TORCH_THREADS": "1",
    }
    with running_server(env, tmp_path_factory.mktemp("server") / "server.log") as base:
        yield base


def gone(element: WebElement) -> Callable[[webdriver.Chrome], bool]:
    """The element's document was replaced (the form posted). Mid-navigation chromedriver may report the node
    as not in the document instead of stale: that is gone too."""

    def check(_: webdriver.Chrome) -> bool:
        try:
            element.is_enabled()
        except WebDriverException:  # StaleElementReferenceException, or the inspector's "does not belong"
            return True
        return False

    return check


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def test_approve_one_reject_another(server: str, browser: webdriver.Chrome) -> None:
    body = {"model": "tiny-eps", "prompt": "mug, SKU 88-1234-X", "num_inference_steps": 2, "n": 2, "seed": 1}
    ids = [
        d["review_id"]
        for d in httpx.post(f"{server}/v1/images/generations", json=body, timeout=60, headers=SHOP).json()["data"]
    ]
    browser.get(f"{server}/review")
    browser.find_element(By.NAME, "key").send_keys(KEY)
    browser.find_element(By.TAG_NAME, "button").click()
    WebDriverWait(browser, 20).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".item")))
    session = browser.get_cookie("imagegen_session")
    assert session is not None and KEY not in session["value"]  # a session token, never the key
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    items = browser.find_elements(By.CSS_SELECTOR, ".item")
    assert {i.get_attribute("id") for i in items} == {f"review-{x}" for x in ids}
    assert "SKU-like identifier" in browser.page_source
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    for img in browser.find_elements(By.CSS_SELECTOR, ".item img"):  # the held pixels load for the reviewer
        WebDriverWait(browser, 20).until(lambda d, img=img: d.execute_script(loaded, img) == 16)

    wait = WebDriverWait(browser, 20, ignored_exceptions=(WebDriverException,))  # transient mid-navigation
    approve = browser.find_element(By.CSS_SELECTOR, f"#review-{ids[0]} button[value=approve]")
    approve.click()
    wait.until(gone(approve))  # the form posted and the list reloaded

    def reloaded(d: webdriver.Chrome) -> bool:  # the new list, whole: not a document still being parsed
        complete = d.execute_script("return document.readyState") == "complete"
        return (
            complete
            and not d.find_elements(By.ID, f"review-{ids[0]}")
            and bool(d.find_elements(By.ID, f"review-{ids[1]}"))
        )

    wait.until(reloaded)
    browser.find_element(By.CSS_SELECTOR, f"#review-{ids[1]} input[name=note]").send_keys("real SKU shown")
    reject = browser.find_element(By.CSS_SELECTOR, f"#review-{ids[1]} button[value=reject]")
    reject.click()
    wait.until(gone(reject))
    assert wait.until(ec.presence_of_element_located((By.ID, "empty"))).text == "Nothing is waiting for review."

    approved = httpx.get(f"{server}/v1/reviews/{ids[0]}/result", headers=SHOP)
    assert approved.status_code == 200 and approved.json()["data"][0]["b64_json"]
    assert httpx.get(f"{server}/v1/reviews/{ids[1]}/result", headers=SHOP).status_code == 410
    rejected = httpx.get(f"{server}/v1/reviews/{ids[1]}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert rejected["reviewer"] == "carol" and rejected["note"] == "real SKU shown"

    sign_out = browser.find_element(By.ID, "sign-out")
    sign_out.click()
    wait.until(gone(sign_out))
    assert wait.until(ec.presence_of_element_located((By.NAME, "key")))  # back at the sign-in form
    assert browser.get_cookie("imagegen_session") is None
    replayed = httpx.get(f"{server}/v1/reviews", cookies={"imagegen_session": session["value"]})
    assert replayed.status_code == 401  # the session ended on the server, not only in this browser


def test_a_held_edit_shows_its_input_beside_the_output(server: str, browser: webdriver.Chrome) -> None:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), (200, 30, 30), np.uint8)).save(buf, format="PNG")
    fields = {"model": "tiny-eps", "prompt": "mug, SKU 88-1234-X", "num_inference_steps": "2", "size": "16x16"}
    files = {"image": ("product.png", buf.getvalue(), "image/png")}
    r = httpx.post(f"{server}/v1/images/edits", data=fields, files=files, timeout=60, headers=SHOP)
    (review_id,) = [d["review_id"] for d in r.json()["data"]]
    browser.get(f"{server}/review")
    if browser.find_elements(By.NAME, "key"):  # signed out by the test before
        browser.find_element(By.NAME, "key").send_keys(KEY)
        browser.find_element(By.TAG_NAME, "button").click()
    item = WebDriverWait(browser, 20).until(ec.presence_of_element_located((By.ID, f"review-{review_id}")))
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    source = item.find_element(By.CSS_SELECTOR, "figure.input img")
    WebDriverWait(browser, 20).until(lambda d: d.execute_script(loaded, source) == 24)  # the input, as uploaded
    output = item.find_element(By.CSS_SELECTOR, "img[alt='held image']")
    WebDriverWait(browser, 20).until(lambda d: d.execute_script(loaded, output) == 16)
    assert item.find_element(By.CSS_SELECTOR, "figure.input figcaption").text == "input"


def test_the_page_needs_a_key(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        page = client.get("/review")
        assert 'name="key"' in page.text  # the sign-in form, no items
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        assert client.post("/review/login", data={"key": "wrong", "csrf": csrf.group(1)}).status_code == 401
        assert client.post("/review/login", data={"key": KEY}).status_code == 403  # no CSRF token
        assert client.post("/review/login", content=b"key=\xff\xfe").status_code == 400
        assert client.get("/v1/reviews/whatever/image").status_code == 401
