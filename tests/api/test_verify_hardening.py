"""POST /v1/verify takes untrusted uploads: no network fetches, only PNG/JPEG/WebP, pixel and byte caps
before decoding, a bounded pool of its own, and the caller's quota."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import c2pa
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

from imagegen.api import routes_verify
from imagegen.gate.c2pa_manifest import READ_SETTINGS, SigningIdentity
from imagegen.gate.labels import DIGITAL_SOURCE_TYPE, MEDIA_TYPES
from imagegen.main import create_app
from imagegen.settings import Settings
from tests.helpers import write_key_file

PIL_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encoded(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, PIL_NAMES.get(fmt, fmt))
    return buf.getvalue()


def post(client: TestClient, data: bytes | Iterator[bytes], **headers: str) -> Any:
    return client.post("/v1/verify", content=data, headers={"content-type": "application/octet-stream", **headers})


def assert_error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["code"] == code, error
    return error


def make_app(tmp_path: Path, tiny_models_dir: Path, **settings: Any) -> FastAPI:
    """An app of its own, for settings the shared client lacks (run without its lifespan: no model needed)."""
    return create_app(Settings(models_dir=tiny_models_dir, state_dir=tmp_path / "state", **settings))


def app_client(tmp_path: Path, tiny_models_dir: Path, **settings: Any) -> TestClient:
    return TestClient(make_app(tmp_path, tiny_models_dir, **settings))


# --- no network: a manifest store named by URL is never fetched ---------------------------------------


class Listener:
    """A TCP port on 127.0.0.1 that counts the connections made to it (and closes each at once)."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/manifest.c2pa"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture(scope="module")
def c2pa_signer(tmp_path_factory: pytest.TempPathFactory) -> c2pa.Signer:
    identity = SigningIdentity.development_chain(tmp_path_factory.mktemp("c2pa"))
    return c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", identity.chain_pem, identity.key_pem, None))


def remote_manifest_image(signer: c2pa.Signer, fmt: str, url: str) -> bytes:
    """A signed image whose file holds no manifest store, only the URL to fetch it from."""
    manifest = {
        "claim_generator_info": [{"name": "test", "version": "1"}],
        "title": "remote",
        "assertions": [{"label": "c2pa.actions",
                        "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE}]}}],
    }  # fmt: skip
    builder = c2pa.Builder(manifest, c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
    builder.set_no_embed()
    builder.set_remote_url(url)
    out = io.BytesIO()
    builder.sign(signer, MEDIA_TYPES[fmt], io.BytesIO(encoded(fmt)), out)
    return out.getvalue()


def read_directly(data: bytes, media_type: str, context: c2pa.Context | None) -> None:
    try:
        with c2pa.Reader(media_type, io.BytesIO(data), context=context):
            pass
    except c2pa.C2paError:
        pass  # the listener answers nothing a reader could use; only the connection counts


def wait_for(listener: Listener, count: int) -> None:
    deadline = time.monotonic() + 5
    while listener.connections < count and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_verify_never_fetches_a_remote_manifest(
    client: TestClient, c2pa_signer: c2pa.Signer, listener: Listener, fmt: str
) -> None:
    data = remote_manifest_image(c2pa_signer, fmt, listener.url)
    assert listener.url.encode() in data  # the file names where its manifest store lives
    # The library's default settings do fetch it: the settings below are what keeps the service off the network.
    read_directly(data, MEDIA_TYPES[fmt], None)
    wait_for(listener, 1)
    fetched = listener.connections
    assert fetched >= 1
    r = post(client, data)
    assert r.status_code == 200, r.text
    assert r.json()["c2pa"]["state"] == "remote_not_fetched" and r.json()["format"] == fmt
    time.sleep(0.1)  # the listener thread accepts a connection within this
    assert listener.connections == fetched


@pytest.mark.parametrize(
    "settings",
    [
        {"verify": {"remote_manifest_fetch": False}},
        {"core": {"allowed_network_hosts": []}},
        READ_SETTINGS,
    ],
    ids=["remote_manifest_fetch", "allowed_network_hosts", "service"],
)
def test_each_network_setting_blocks_the_fetch_on_its_own(
    c2pa_signer: c2pa.Signer, listener: Listener, settings: dict[str, Any]
) -> None:
    data = remote_manifest_image(c2pa_signer, "png", listener.url)
    with c2pa.Context.from_dict(settings) as context:
        read_directly(data, "image/png", context)
    time.sleep(0.2)
    assert listener.connections == 0


# --- formats --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_png_jpeg_and_webp_are_read(client: TestClient, fmt: str) -> None:
    r = post(client, encoded(fmt))
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["format"] == fmt and report["size"] == [64, 64] and report["c2pa"]["state"] == "absent"


@pytest.mark.parametrize(
    "data",
    [
        encoded("GIF"),
        encoded("BMP"),
        encoded("TIFF"),
        b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
        b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(28),
        b"nope",
    ],
    ids=["gif", "bmp", "tiff", "svg", "wav", "text"],
)
def test_other_formats_are_415_before_pillow_sees_them(client: TestClient, data: bytes) -> None:
    error = assert_error(post(client, data), 415, "unsupported_media_type")
    assert all(name in error["message"] for name in ("PNG", "JPEG", "WebP"))


# --- pixel cap before decoding --------------------------------------------------------------------------


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """Signature, IHDR (8-bit RGB), an empty IDAT and IEND: 57 bytes that claim width × height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"") + png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to claim width × height."""
    data = bytearray(encoded("jpeg"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A VP8X header naming a width × height canvas (Pillow's WebP decoder allocates it when it opens)."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little")
    vp8x += (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


@pytest.fixture(scope="module")
def png_bomb() -> bytes:
    """A valid 12000×12000 grayscale PNG of one colour: well under 1 MB, 144 MB once decoded."""
    width = height = 12000
    compress, rows = zlib.compressobj(9), (b"\x00" + b"\x80" * width) * 500
    idat = b"".join(compress.compress(rows) for _ in range(height // 500)) + compress.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The sizes of the images Pillow decodes during a test."""
    seen: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spy(image: ImageFile.ImageFile) -> Any:
        seen.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return seen


@pytest.mark.parametrize(
    "data",
    [png_header_only(20000, 20000), png_header_only(5000, 5000), jpeg_claiming(5000, 5000), webp_claiming(5000, 5000)],
    ids=["png-20000", "png-5000", "jpeg-5000", "webp-5000"],
)
def test_a_header_claiming_too_many_pixels_is_413(client: TestClient, decodes: list[Any], data: bytes) -> None:
    error = assert_error(post(client, data), 413, "image_too_large")
    assert str(4096 * 4096) in error["message"] and decodes == []


def test_the_57_byte_header_is_what_it_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's own bomb check off: the header parses
    data = png_header_only(20000, 20000)
    assert len(data) == 57 and Image.open(io.BytesIO(data)).size == (20000, 20000)


def test_a_png_bomb_is_refused_before_decoding(client: TestClient, decodes: list[Any], png_bomb: bytes) -> None:
    assert len(png_bomb) < 1024 * 1024
    error = assert_error(post(client, png_bomb), 413, "image_too_large")
    assert "12000×12000" in error["message"] and decodes == []


def test_the_pixel_cap_follows_the_setting(tmp_path: Path, tiny_models_dir: Path, decodes: list[Any]) -> None:
    small = app_client(tmp_path, tiny_models_dir, max_upload_pixels=64 * 64)
    assert post(small, encoded("png", (64, 64))).status_code == 200 and set(decodes) == {(64, 64)}
    assert_error(post(small, encoded("png", (65, 64))), 413, "image_too_large")
    assert set(decodes) == {(64, 64)}


def truncated(fmt: str) -> bytes:
    noisy = Image.effect_noise((96, 96), 64).convert("RGB")  # noise: the data is most of the file
    buf = io.BytesIO()
    noisy.save(buf, PIL_NAMES[fmt])
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def corrupt_png() -> bytes:
    data = bytearray(encoded("png", (96, 96)))
    idat = data.index(b"IDAT") + 4
    data[idat : idat + 16] = b"\xff" * 16
    return bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        truncated("png"),
        truncated("jpeg"),
        truncated("webp"),
        corrupt_png(),
        b"\x89PNG\r\n\x1a\n",
        b"RIFF\0\0\0\0WEBPVP8 ",
    ],
    ids=["png-truncated", "jpeg-truncated", "webp-truncated", "png-corrupt", "png-signature-only", "webp-no-size"],
)
def test_truncated_or_corrupt_images_are_400(client: TestClient, data: bytes) -> None:
    assert_error(post(client, data), 400, "invalid_image")


# --- body size ------------------------------------------------------------------------------------------


def test_the_body_cap_follows_the_setting(tmp_path: Path, tiny_models_dir: Path) -> None:
    small = app_client(tmp_path, tiny_models_dir, max_upload_bytes=1024)
    image = encoded("png", (8, 8))
    assert len(image) <= 1024 and post(small, image).status_code == 200
    padded = image + bytes(1025 - len(image))  # a valid PNG with trailing bytes: refused for its size only
    assert_error(post(small, padded), 413, "payload_too_large")
    streamed = iter([padded[:512], padded[512:]])  # chunked: no Content-Length to check up front
    assert_error(post(small, streamed), 413, "payload_too_large")
    assert_error(post(small, b""), 400, "empty_body")


# --- the pool of its own, and the quota -----------------------------------------------------------------


class Hold:
    """Stands in for verify(): each call waits until the test lets it go."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.entered = threading.Semaphore(0)
        self.threads: list[str] = []

    def __call__(self, data: bytes, *, max_pixels: int) -> dict[str, Any]:
        self.threads.append(threading.current_thread().name)
        self.entered.release()
        assert self.go.wait(10)
        return {"format": "png", "bytes": len(data)}


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(call()))
    thread.start()
    return thread, results


def wait_until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_busy_pool_answers_429(tmp_path: Path, tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hold = Hold()
    monkeypatch.setattr(routes_verify, "verify", hold)
    app = make_app(tmp_path, tiny_models_dir, verify_workers=1)
    busy, image = TestClient(app), encoded("png")
    calls = [in_background(lambda: post(busy, image)) for _ in range(3)]  # 1 running + 2 waiting
    assert hold.entered.acquire(timeout=10)
    pool = routes_verify.verify_pool(app, 1)
    wait_until(lambda: pool.in_flight == 3)
    r = post(busy, image)
    assert_error(r, 429, "verify_busy")
    assert r.headers["Retry-After"] == "1"
    hold.go.set()
    for thread, results in calls:
        thread.join(10)
        assert results[0].status_code == 200 and results[0].json()["bytes"] == len(image)
    wait_until(lambda: pool.in_flight == 0)
    assert post(busy, image).status_code == 200
    assert len(hold.threads) == 4 and all(name.startswith("verify") for name in hold.threads)  # its own threads


def keyed_client(tmp_path: Path, tiny_models_dir: Path, **quota: float) -> TestClient:
    keys = write_key_file(tmp_path / "keys.toml", {"shop": ("shop-key", ["generate"])}, **quota)
    c = app_client(tmp_path, tiny_models_dir, api_keys_file=keys)
    c.headers["Authorization"] = "Bearer shop-key"
    return c


def test_verify_counts_against_the_rate(tmp_path: Path, tiny_models_dir: Path) -> None:
    shop = keyed_client(tmp_path, tiny_models_dir, requests_per_minute=6)  # a burst of one
    assert post(shop, encoded("png")).status_code == 200
    r = post(shop, encoded("png"))
    assert_error(r, 429, "rate_limited")
    assert int(r.headers["Retry-After"]) > 0


def test_verify_holds_a_concurrency_slot_until_done(
    tmp_path: Path, tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = keyed_client(tmp_path, tiny_models_dir, max_concurrent=1)
    # the slot comes back after a refusal and after a success alike
    assert_error(post(shop, b"nope"), 415, "unsupported_media_type")
    assert_error(post(shop, png_header_only(20000, 20000)), 413, "image_too_large")
    assert post(shop, encoded("png")).status_code == 200
    hold = Hold()
    monkeypatch.setattr(routes_verify, "verify", hold)
    thread, results = in_background(lambda: post(shop, encoded("png")))
    assert hold.entered.acquire(timeout=10)
    assert_error(post(shop, encoded("png")), 429, "too_many_concurrent_requests")
    hold.go.set()
    thread.join(10)
    assert results[0].status_code == 200
    assert post(shop, encoded("png")).status_code == 200


def test_verify_needs_a_key(tmp_path: Path, tiny_models_dir: Path) -> None:
    shop = keyed_client(tmp_path, tiny_models_dir)
    r = shop.post("/v1/verify", content=encoded("png"), headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401, "invalid_api_key")


# --- what the service releases still verifies -----------------------------------------------------------


def test_a_released_image_verifies_with_its_labels(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json={"model": "tiny-eps", "prompt": "a mug", "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    released = base64.b64decode(r.json()["data"][0]["b64_json"])
    report = post(client, released, **{"content-type": "image/png"})
    assert report.status_code == 200, report.text
    body = report.json()
    assert body["format"] == "png" and body["c2pa"]["state"] == "Valid"
    assert body["c2pa"]["actions"][0]["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert body["xmp"]["DigitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert body["xmp"]["AISystemUsed"] == "imagegen/tiny-eps"
