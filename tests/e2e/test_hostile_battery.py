"""A hostile battery over every route, against a real `python -m imagegen serve` process with API keys on.

Each family is a table of (name, request) → the statuses it may get. Whatever else happens: nothing is a 5xx,
no screened phrase gets past the gate, no uniform (non-finite) image is released, a huge body costs the server
no memory, and afterwards the service still serves and its log holds no unhandled error.
"""

from __future__ import annotations

import base64
import http.cookiejar
import io
import json
import re
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import server_process, write_key_file
from tests.postgres import postgres_server

GEN, GEN2, REV, ADMIN = "hb-shop-key", "hb-other-shop-key", "hb-reviewer-key", "hb-admin-key"
KEYS = {"shop": (GEN, ["generate"]), "other-shop": (GEN2, ["generate"]), "carol": (REV, ["review"]),
        "root": (ADMIN, ["admin"])}  # fmt: skip
CHEAP: dict[str, Any] = {"model": "tiny-eps", "prompt": "a red mug", "size": "16x16", "n": 1, "num_inference_steps": 1,
                         "seed": 7}  # fmt: skip
GENERATE = "/v1/images/generations"
JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
PNG = {"content-type": "image/png"}
ASYNC = {"Prefer": "respond-async"}
CROSS_SITE = {"Sec-Fetch-Site": "cross-site"}
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
UVICORN_REFUSAL = b"Invalid HTTP request received."  # answered by the HTTP parser: the app never saw it
MB = 1024 * 1024
HUGE = 30 * MB
SAMPLERS = ["ddim", "euler", "euler_a", "dpmpp_2m", "lcm"]
MODELS = ["tiny-eps", "tiny-v", "tiny-lcm"]
MAX_STEPS = {"lcm": 50}  # the others: IMAGEGEN_MAX_STEPS
DEFAULT_MAX_STEPS = 150
WORKERS = 4  # the server has two cores: a few requests in flight keep it busy without starving it

Body = bytes | Callable[[], Iterator[bytes]] | None


def statuses(*codes: int) -> frozenset[int]:
    return frozenset(codes)


OK, BAD, UNAUTH, FORBIDDEN, MISSING = statuses(200), statuses(400), statuses(401), statuses(403), statuses(404)
REFUSED = statuses(400, 422)  # a body the schema or the validator refuses
TOO_LARGE = statuses(413)


@dataclass(frozen=True)
class Probe:
    name: str
    method: str
    path: str
    expect: frozenset[int]
    content: Body = None
    headers: Mapping[str, str | bytes] = field(default_factory=dict)
    key: str | None = GEN  # sent as `Authorization: Bearer <key>` unless headers name one
    code: str | None = None  # the error code a refusal must carry
    raw: bool = False  # content is the whole HTTP/1.1 request, sent as is (what httpx will not send)


@dataclass(frozen=True)
class Seen:
    probe: Probe
    status: int  # 0: no HTTP answer at all
    body: bytes
    headers: httpx.Headers
    transport_error: str = ""

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def code(self) -> str | None:
        doc = self.json()
        return doc.get("error", {}).get("code") if isinstance(doc, dict) else None

    def line(self) -> str:
        p = self.probe
        answer = self.transport_error or self.body[:300].decode("utf-8", "replace")
        return f"{p.name}: {p.method} {p.path[:200]} (key {p.key!r}) -> {self.status} {answer}"


SEEN: list[Seen] = []  # every answer of the module, for the final no-5xx check


# ---- sending -------------------------------------------------------------------------------------------------


def cookie_less_jar() -> http.cookiejar.CookieJar:
    """A jar that keeps nothing: each probe carries exactly the cookies it names."""
    return http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def client_for(base: str) -> httpx.Client:
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=8)
    return httpx.Client(base_url=base, timeout=120, cookies=cookie_less_jar(), limits=limits)  # type: ignore[arg-type]


def send_raw(base: str, request: bytes) -> tuple[int, httpx.Headers, bytes]:
    url = httpx.URL(base)
    with socket.create_connection((url.host, url.port or 80), timeout=10) as sock:
        sock.sendall(request)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = httpx.Headers([tuple(line.split(": ", 1)) for line in lines if ": " in line])
    return int(status_line.split()[1]), headers, body


def exchange(client: httpx.Client, probe: Probe) -> tuple[int, httpx.Headers, bytes]:
    if probe.raw:
        assert isinstance(probe.content, bytes)
        return send_raw(str(client.base_url), probe.content)
    headers: dict[str, str | bytes] = dict(probe.headers)
    if probe.key is not None and not any(h.lower() == "authorization" for h in headers):
        headers["Authorization"] = f"Bearer {probe.key}"
    content = probe.content() if callable(probe.content) else probe.content
    r = client.request(probe.method, probe.path, content=content, headers=headers)  # type: ignore[arg-type]
    return r.status_code, r.headers, r.content


def fire(client: httpx.Client, probe: Probe) -> Seen:
    try:
        status, headers, body = exchange(client, probe)
    except httpx.LocalProtocolError:
        raise  # httpx refused to send it: the probe is wrong, not the server
    except (httpx.HTTPError, OSError) as exc:
        seen = Seen(probe, 0, b"", httpx.Headers(), f"{type(exc).__name__}: {exc}")
    else:
        seen = Seen(probe, status, body, headers)
    SEEN.append(seen)
    return seen


def battery(client: httpx.Client, probes: Iterable[Probe], workers: int = WORKERS) -> list[Seen]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: fire(client, p), probes))


def faults(seen: Seen) -> list[str]:
    """What is wrong with one answer: an unexpected status or code, another error shape, an echoed odd id."""
    found = []
    if seen.status not in seen.probe.expect:
        found.append(f"status {seen.status} not in {sorted(seen.probe.expect)}")
    elif seen.probe.code is not None and seen.status >= 400 and seen.code != seen.probe.code:
        found.append(f"code {seen.code!r} != {seen.probe.code!r}")
    if seen.status >= 400 and seen.headers.get("content-type", "").startswith("application/json"):
        error = (seen.json() or {}).get("error")
        if not isinstance(error, dict) or not {"code", "message", "param", "type"} <= error.keys():
            found.append("not the {error: {code, message, param, type}} shape")
    rid = seen.headers.get("x-request-id")
    if seen.status and UVICORN_REFUSAL not in seen.body and not (rid and SANE_REQUEST_ID.fullmatch(rid)):
        found.append(f"X-Request-ID {rid!r}")
    return found


def offenders(seen: Iterable[Seen]) -> list[str]:
    return [f"{s.line()}  [{'; '.join(f)}]" for s in seen if (f := faults(s))]


def report(found: list[str]) -> str:
    return f"{len(found)} offenders:\n" + "\n".join(found)


# ---- building requests -----------------------------------------------------------------------------------------


def as_json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def with_raw(body: Mapping[str, Any], name: str, raw_value: str) -> bytes:
    """``body`` with one field written as raw JSON text (escapes and literals that json.dumps will not write)."""
    rest = json.dumps({k: v for k, v in body.items() if k != name})
    return f'{rest[:-1]}, "{name}": {raw_value}}}'.encode()


def generate(**fields: Any) -> bytes:
    return as_json({**CHEAP, **fields})


def post(name: str, content: Body, expect: frozenset[int], code: str | None = None, **headers: str | bytes) -> Probe:
    """A generation request."""
    return Probe(name, "POST", GENERATE, expect, content, {**JSON, **headers}, code=code)


def raw_post(name: str, expect: frozenset[int], head: str, body: bytes = b"{}") -> Probe:
    request = (
        f"POST {GENERATE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {GEN}\r\n{head}\r\n\r\n"
    )
    return Probe(name, "POST", GENERATE, expect, request.encode("latin-1") + body, raw=True)


def form(name: str, path: str, expect: frozenset[int], body: bytes, cookie: str | bytes = "", code: str | None = None,
         extra: Mapping[str, str] | None = None) -> Probe:  # fmt: skip
    """A review page form post, as a browser sends it: no key, perhaps a cookie."""
    headers: dict[str, str | bytes] = {**FORM, **(extra or {})}
    if cookie:
        headers["cookie"] = cookie
    return Probe(name, "POST", path, expect, body, headers, key=None, code=code)


def body_of(size: int) -> bytes:
    return b'{"prompt": "' + b"a" * (size - 14) + b'"}'


def streamed(size: int, piece: int = 64 * 1024) -> Callable[[], Iterator[bytes]]:
    """A chunked body (no Content-Length) of about ``size`` bytes."""

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(size // piece):
            yield b"a" * piece
        yield b'"}'

    return chunks


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, colour: int = 0, idat: bytes = b"") -> bytes:
    """Signature, IHDR (correct CRC), one IDAT and IEND: with an empty IDAT, 57 bytes claiming any size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_of_zeros(width: int, height: int, colour: int = 0) -> bytes:
    """A real, decodable PNG of black rows compressed at level 9: a small file of many pixels."""
    squeeze, row = zlib.compressobj(9), b"\0" * (width * {0: 1, 2: 3}[colour] + 1)
    return png_header(width, height, colour, b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush())


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def with_chunk(png: bytes, chunk: bytes) -> bytes:
    return png[:33] + chunk + png[33:]  # right after IHDR


def pixels_of(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.float64)


# ---- the server --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    base: str
    pid: int
    log: Path


@contextmanager
def serve(models: Path, tmp: pytest.TempPathFactory, **extra: str) -> Iterator[Server]:
    env = {
        "IMAGEGEN_MODELS_DIR": str(models),
        "IMAGEGEN_STATE_DIR": str(tmp.mktemp("state")),
        "IMAGEGEN_API_KEYS_FILE": str(write_key_file(tmp.mktemp("keys") / "keys.toml", KEYS)),
        "IMAGEGEN_TORCH_THREADS": "1",
        "IMAGEGEN_DEFAULT_MODEL": "tiny-eps",
        "IMAGEGEN_DRAIN_SECONDS": "1",  # unfetched async results would hold the shutdown
        **extra,
    }
    with server_process(env, tmp.mktemp("server") / "server.log") as server:
        yield Server(server.base, server.proc.pid, server.log)


@pytest.fixture(scope="module")
def server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tiny_models_dir, tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with client_for(server.base) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def hold(client: httpx.Client, n: int) -> list[str]:
    """``n`` images held for review (a brand term in the prompt); their review ids."""
    r = client.post(GENERATE, json={**CHEAP, "prompt": "a mug with a logo", "n": n}, headers=auth(GEN))
    assert r.status_code == 200, r.text
    return [d["review_id"] for d in r.json()["data"]]


@pytest.fixture(scope="module")
def held(client: httpx.Client) -> list[str]:
    return hold(client, 3)


def memory_mb(pid: int) -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmHWM", "VmRSS")}


def reset_peak(pid: int) -> bool:
    """Start VmHWM afresh at the current RSS (Linux clear_refs 5), so that a peak measures only what follows."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_growth_mb(pid: int, work: Callable[[], Any]) -> tuple[float, str, Any]:
    """How far the process's peak RSS rose above its RSS while ``work`` ran; the numbers; what work returned."""
    reset = reset_peak(pid)
    before = memory_mb(pid)
    result = work()
    after = memory_mb(pid)
    base = before["VmRSS"] if reset else before["VmHWM"]  # without a reset only a new peak shows
    return after["VmHWM"] - base, f"before {before}, after {after} (MiB)", result


# ---- invalid text everywhere -------------------------------------------------------------------------------

STRING_FIELDS = ["prompt", "negative_prompt", "model", "size", "user", "sampler", "asset_type", "quality", "style",
                 "background", "moderation", "response_format"]  # fmt: skip
BAD_ESCAPES = {"lone high surrogate": "\\ud800", "lone low surrogate": "\\udfff", "NUL": "\\u0000",
               "non-character U+FFFE": "\\ufffe"}  # fmt: skip
ODD_IDS = {"surrogate bytes": "%ED%A0%80", "NUL": "%00", "invalid UTF-8": "%ff%fe", "non-character": "%EF%BF%BE",
           "long": "a" * 4000}  # fmt: skip


def odd_id_probes(what: str, raw: str) -> list[Probe]:
    j, r = f"/v1/jobs/{raw}", f"/v1/reviews/{raw}"
    return [
        Probe(f"{what} job id", "GET", j, MISSING, code="job_not_found"),
        Probe(f"{what} job id, cancel", "DELETE", j, MISSING, code="job_not_found"),
        Probe(f"{what} job id, events", "GET", f"{j}/events", MISSING, code="job_not_found"),
        Probe(f"{what} model id", "GET", f"/v1/models/{raw}", MISSING, code="model_not_found"),
        Probe(f"{what} review id", "GET", r, MISSING, key=REV, code="review_not_found"),
        Probe(f"{what} review image", "GET", f"{r}/image", MISSING, key=REV),
        Probe(f"{what} review approve", "POST", f"{r}/approve", MISSING, key=REV),
        Probe(f"{what} review reject", "POST", f"{r}/reject", MISSING, b"{}", JSON, key=REV),
        Probe(f"{what} review result", "GET", f"{r}/result", MISSING, code="review_not_found"),
    ]


def header_probes() -> list[Probe]:
    def models(name: str, expect: frozenset[int], **headers: str | bytes) -> Probe:
        return Probe(name, "GET", "/v1/models", expect, headers={k.replace("_", "-"): v for k, v in headers.items()})

    return [
        models("odd bytes in X-Request-ID", OK, X_Request_ID=b"\xff\xfe<script>"),
        models("10 kB X-Request-ID", OK, X_Request_ID="a" * 10_000),
        models("X-Request-ID with spaces", OK, X_Request_ID="a b; drop table"),
        models("Bearer + 10 kB", UNAUTH, Authorization="Bearer " + "k" * 10_000),
        models("non-ASCII bearer", UNAUTH, Authorization="Bearer clé".encode("latin-1")),
        models("invalid UTF-8 bearer", UNAUTH, Authorization=b"Bearer \xff\xfe\xed\xa0"),
        models("UTF-8 key bytes", UNAUTH, Authorization="Bearer ключ".encode()),
        models("Basic scheme", UNAUTH, Authorization=f"Basic {GEN}"),
        models("scheme only", UNAUTH, Authorization="Bearer"),
        models("empty Authorization", UNAUTH, Authorization=""),
        models("lower-case scheme, spaced key", OK, Authorization=f"bearer   {GEN}"),
        post("Bearer + 10 kB on generate", generate(), UNAUTH, Authorization="Bearer " + "k" * 10_000),
        post("odd bytes in Prefer", generate(), statuses(200, 202), Prefer=b"respond-async\xff"),
        post("odd charset", generate(), statuses(200, 400, 415, 422), **{"content-type": b"application/json; x=\xff"}),
    ]


def invalid_text_probes(pending: str) -> list[Probe]:
    probes = [
        post(f"{what} in {name}", with_raw(CHEAP, name, f'"a{escape}b"'), BAD, "invalid_value")
        for name in STRING_FIELDS
        for what, escape in BAD_ESCAPES.items()
    ]
    for what, escape in BAD_ESCAPES.items():
        probes.append(post(f"async: {what}", with_raw(CHEAP, "prompt", f'"a{escape}"'), BAD, "invalid_value", **ASYNC))
        note = f'{{"note": "a{escape}"}}'.encode()  # on a real pending review: a refusal must leave it pending
        probes.append(Probe(f"{what} in a note", "POST", f"/v1/reviews/{pending}/reject", BAD, note, JSON, REV,
                            "invalid_value"))  # fmt: skip
    for value in ["%ED%A0%80", "%00", "%ff", "pending%00", "pending%E2%80%8B", "a" * 5000]:
        probes.append(
            Probe(f"status={value}", "GET", f"/v1/reviews?status={value}", BAD, key=REV, code="invalid_value")
        )
    for what, raw in ODD_IDS.items():
        probes += odd_id_probes(what, raw)
    return probes + header_probes()


def test_invalid_text_everywhere_is_a_clean_4xx(client: httpx.Client, held: list[str]) -> None:
    seen = battery(client, invalid_text_probes(held[0]))
    assert not (found := offenders(seen)), report(found)
    review = client.get(f"/v1/reviews/{held[0]}", headers=auth(REV)).json()
    assert review["status"] == "pending", review  # the refused notes decided nothing


# ---- malformed JSON ----------------------------------------------------------------------------------------

RAW_BODIES = {
    "truncated": (b'{"prompt": "a', BAD), "array": (b"[]", REFUSED), "null": (b"null", REFUSED),
    "string": (b'"a mug"', REFUSED), "number": (b"42", REFUSED), "10 000 [": (b"[" * 10_000, BAD),
    "10 000 nested objects": (b'{"a":' * 10_000, BAD), "invalid UTF-8": (b'{"prompt": "a \xff mug"}', BAD),
    "UTF-8 of a surrogate": (b'{"prompt": "a \xed\xa0\x80 mug"}', BAD),
    "UTF-16": (json.dumps(CHEAP).encode("utf-16"), statuses(200, 400)),  # RFC 8259 readers may detect it
    "byte order mark": (b"\xef\xbb\xbf" + generate(), statuses(200, 400)),
    "trailing garbage": (generate() + b"}}", BAD),
    "single quotes": (b"{'prompt': 'a mug'}", BAD), "empty": (b"", REFUSED), "whitespace": (b"   \n", REFUSED),
    "duplicate keys": (b'{"prompt": "a", "prompt": "b", "size": "16x16", "num_inference_steps": 1}', OK),
    "5000-digit n": (with_raw(CHEAP, "n", "9" * 5000), BAD),
    "5000-digit seed": (with_raw(CHEAP, "seed", "9" * 5000), BAD),
}  # fmt: skip
NUMERIC_FIELDS = ["n", "num_inference_steps", "seed", "guidance_scale", "guidance_rescale", "eta", "output_compression"]
LITERALS = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity"]
FIELD_VALUES: dict[str, tuple[dict[str, Any], frozenset[int]]] = {
    "steps as a string": ({"num_inference_steps": "1"}, statuses(200, 400)),
    "guidance NaN as a string": ({"guidance_scale": "NaN"}, BAD), "seed as a float string": ({"seed": "1e3"}, BAD),
    "n=true": ({"n": True}, statuses(200, 400)), "steps=false": ({"num_inference_steps": False}, BAD),
    "n=10**30": ({"n": 10**30}, BAD), "n=0": ({"n": 0}, BAD), "n=-1": ({"n": -1}, BAD), "n=11": ({"n": 11}, BAD),
    "n=1.5": ({"n": 1.5}, BAD), "steps=-1": ({"num_inference_steps": -1}, BAD),
    "steps=10**9": ({"num_inference_steps": 10**9}, BAD),
    "steps=2.0": ({"num_inference_steps": 2.0}, statuses(200, 400)), "steps=2.5": ({"num_inference_steps": 2.5}, BAD),
    "seed=-1": ({"seed": -1}, BAD), "seed=2**32": ({"seed": 2**32}, BAD),
    "seed=2**64": ({"seed": 2**64}, BAD), "seed=2**32-1": ({"seed": 2**32 - 1}, OK),
    "guidance=-0.0": ({"guidance_scale": -0.0}, OK), "guidance=-1": ({"guidance_scale": -1}, BAD),
    "guidance=1e308": ({"guidance_scale": 1e308}, BAD), "guidance_rescale=2": ({"guidance_rescale": 2}, BAD),
    "eta=-0.5": ({"eta": -0.5}, BAD), "output_compression=101": ({"output_compression": 101}, BAD),
    "output_format=gif": ({"output_format": "gif"}, BAD), "response_format=file": ({"response_format": "file"}, BAD),
    "prompt as a number": ({"prompt": 123}, REFUSED), "prompt as a list": ({"prompt": ["a", "mug"]}, REFUSED),
    "prompt as an object": ({"prompt": {"$gt": ""}}, REFUSED), "empty prompt": ({"prompt": ""}, BAD),
    "blank prompt": ({"prompt": " \t\n "}, BAD), "2001-char prompt": ({"prompt": "a" * 2001}, BAD),
    "300-char model": ({"model": "m" * 300}, statuses(400, 404)), "path as model": ({"model": "../../etc"}, MISSING),
    "unknown field": ({"webhook": "http://169.254.169.254/"}, statuses(422)),
    "claims_real_sku as a string": ({"claims_real_sku": "maybe"}, REFUSED),
}  # fmt: skip


def malformed_json_probes() -> list[Probe]:
    probes = [post(name, body, expect) for name, (body, expect) in RAW_BODIES.items()]
    probes += [post(f"{n}={lit}", with_raw(CHEAP, n, lit), BAD) for n in NUMERIC_FIELDS for lit in LITERALS]
    probes += [post(name, generate(**fields), expect) for name, (fields, expect) in FIELD_VALUES.items()]
    multipart = b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n--x--\r\n'
    reject = "/v1/reviews/nope/reject"
    probes += [
        Probe("no content type", "POST", GENERATE, statuses(200, 400, 415, 422), generate()),
        post("text/plain", generate(), statuses(200, 400, 415, 422), **{"content-type": "text/plain"}),
        Probe("form body", "POST", GENERATE, statuses(400, 415, 422), b"prompt=a+mug", FORM),
        post("multipart", multipart, statuses(400, 415, 422), **{"content-type": "multipart/form-data; boundary=x"}),
        post("async: truncated", b'{"prompt": "a', BAD, **ASYNC),
        post("async: n=10**30", generate(n=10**30), BAD, **ASYNC),
        post("async: NaN guidance", with_raw(CHEAP, "guidance_scale", "NaN"), BAD, **ASYNC),
        Probe("reject body null", "POST", reject, MISSING, b"null", JSON, REV),
        Probe("reject body []", "POST", reject, REFUSED, b"[]", JSON, REV),
        Probe("reject note as a number", "POST", reject, REFUSED, b'{"note": 5}', JSON, REV),
        Probe("reject note of 2001 chars", "POST", reject, REFUSED, as_json({"note": "n" * 2001}), JSON, REV),
        Probe("reject truncated", "POST", reject, BAD, b'{"note": "', JSON, REV),
    ]
    return probes


def test_malformed_json_is_a_clean_4xx(client: httpx.Client) -> None:
    seen = battery(client, malformed_json_probes())
    assert not (found := offenders(seen)), report(found)


# ---- sizes, samplers and step counts -----------------------------------------------------------------------

SIZES = {"invalid_size": ["１２８x128", "128x128\n", "16x16 ", "16 x 16", "16X16", "16×16", "٣٢x32", "16.0x16",
                          "1e2x16", "-16x16", "16x16x16", "", "1" * 40 + "x16"],
         "size_not_supported": ["0x0", "2x2", "17x16", "99999x99999", "1024x1024", "64x64", "16x1024"]}  # fmt: skip


def step_probes() -> list[Probe]:
    probes = [post(f"size {s!r}", generate(size=s), BAD, code) for code, sizes in SIZES.items() for s in sizes]
    probes += [post("size auto", generate(size="auto"), OK), post("size 32x32 (4x native)", generate(size="32x32"), OK)]
    for model in MODELS:
        for sampler in SAMPLERS:
            top = MAX_STEPS.get(sampler, DEFAULT_MAX_STEPS)
            for steps, expect in ((0, BAD), (1, OK), (2, OK), (top, OK), (top + 1, BAD)):
                body = generate(model=model, sampler=sampler, num_inference_steps=steps)
                if sampler == "lcm" and model != "tiny-lcm":  # LCM needs a consistency-distilled UNet
                    probes.append(post(f"{model} {sampler} {steps} steps", body, BAD, "unsupported_sampler"))
                    continue
                probes.append(post(f"{model} {sampler} {steps} steps", body, expect, "invalid_steps"))
    for steps in (1, 2, 3, 10, 25, 50, 150):  # zero terminal SNR: ᾱ_T = 0, where DDIM η=1 once made a NaN
        body = generate(model="tiny-v", sampler="ddim", eta=1, num_inference_steps=steps)
        probes.append(post(f"tiny-v ddim eta=1 {steps} steps", body, OK))
    probes += [
        post("tiny-eps ddim eta=1 150 steps", generate(sampler="ddim", eta=1, num_inference_steps=150), OK),
        post("guidance 30, rescale 1 on tiny-v", generate(model="tiny-v", guidance_scale=30, guidance_rescale=1), OK),
        post("guidance 0, rescale 1", generate(guidance_scale=0, guidance_rescale=1), OK),
        post("lcm model, guidance 30", generate(model="tiny-lcm", guidance_scale=30, num_inference_steps=4), OK),
        post("n=10", generate(n=10), OK),
        post("jpeg, compression 0", generate(output_format="jpeg", output_compression=0), OK),
        post("webp, compression 100", generate(output_format="webp", output_compression=100), OK),
    ]
    return probes


def uniform_images(seen: Iterable[Seen]) -> list[str]:
    """Released images whose pixels are all one value: what a NaN latent decodes to."""
    found = []
    # JPEG at quality 0 (output_compression 0) may flatten a small image to one colour by request: not a NaN
    for s in (s for s in seen if s.status == 200 and "compression 0" not in s.probe.name):
        for i, item in enumerate(s.json()["data"]):
            pixels = pixels_of(item["b64_json"])
            if not np.isfinite(pixels).all() or float(np.std(pixels)) == 0.0:
                found.append(f"{s.probe.name}: image {i} is uniform (std {np.std(pixels)})")
    return found


def test_every_sampler_and_step_edge_is_200_or_400(client: httpx.Client) -> None:
    seen = battery(client, step_probes())
    assert not (found := offenders(seen)), report(found)
    assert not (uniform := uniform_images(seen)), report(uniform)  # no non-finite image released


# ---- huge bodies and memory --------------------------------------------------------------------------------


def huge_body_probes() -> list[Probe]:
    big = body_of(HUGE)
    declared = [post(f"30 MB with Content-Length #{i}", big, TOO_LARGE, "payload_too_large") for i in range(5)]
    chunked = [post(f"30 MB chunked #{i}", streamed(HUGE), TOO_LARGE, "payload_too_large") for i in range(5)]
    return declared + chunked


def other_body_probes() -> list[Probe]:
    big, code = body_of(HUGE), "payload_too_large"
    bad_lengths = ("abc", "-1", "2e3", "0x10", "1 2", "9" * 30)
    both = "Content-Length: 2\r\nTransfer-Encoding: chunked"  # chunked wins (RFC 9112); a proxy must agree
    return [
        post("just over 64 kB", body_of(64 * 1024 + 1), TOO_LARGE, code),
        Probe("30 MB without a key", "POST", GENERATE, TOO_LARGE, big, JSON, None, code),
        Probe("30 MB with a wrong key", "POST", GENERATE, TOO_LARGE, big, JSON, "wrong", code),
        post("30 MB async", big, TOO_LARGE, code, **ASYNC),
        Probe("30 MB review note", "POST", "/v1/reviews/x/reject", TOO_LARGE, big, JSON, REV, code),
        form("30 MB sign-in form", "/review/login", TOO_LARGE, b"key=" + big),
        Probe("30 MB chunked sign-in form", "POST", "/review/login", TOO_LARGE, streamed(HUGE), FORM, None),
        form("30 MB decision form", "/review/x/approve", statuses(401, 413), big),
        Probe("30 MB upload", "POST", "/v1/verify", TOO_LARGE, b"\x89PNG\r\n\x1a\n" + big, PNG, code=code),
        Probe("30 MB chunked upload", "POST", "/v1/verify", TOO_LARGE, streamed(HUGE), PNG, code=code),
        Probe("30 MB to /healthz", "POST", "/healthz", statuses(405, 413), big, JSON, None),
        *(
            raw_post(f"Content-Length {n}", BAD, f"Content-Type: application/json\r\nContent-Length: {n}")
            for n in bad_lengths
        ),
        raw_post("two Content-Lengths", BAD, "Content-Length: 2\r\nContent-Length: 3"),
        raw_post("Content-Length and chunked", REFUSED, both, b"2\r\n{}\r\n0\r\n\r\n"),
        raw_post("bad chunk size", BAD, "Transfer-Encoding: chunked", b"zz\r\n{}\r\n0\r\n\r\n"),
        raw_post("30 MB declared, 2 B sent", TOO_LARGE, f"Content-Length: {HUGE}"),
    ]


def test_huge_bodies_are_413_and_cost_no_memory(client: httpx.Client, server: Server) -> None:
    probes = huge_body_probes()  # all at once
    growth, numbers, seen = peak_growth_mb(server.pid, lambda: battery(client, probes, workers=len(probes)))
    found = offenders(seen) + offenders(battery(client, other_body_probes()))
    assert not found, report(found)
    assert growth < 64, f"peak RSS grew {growth:.0f} MiB over 10 concurrent 30 MB bodies: {numbers}"


# ---- uploads to /v1/verify ---------------------------------------------------------------------------------


def verify_cases(released: bytes) -> dict[str, tuple[bytes, frozenset[int], str | None]]:
    small = encoded(Image.new("RGB", (16, 16), (200, 30, 30)))
    bomb = zlib.compress(b"\0" * 50 * MB, 9)  # 50 kB that inflate to 50 MB
    xmp = b"XML:com.adobe.xmp\0\1\0\0\0"  # an iTXt keyword, compressed
    jpeg_frame = b"\xff\xd8\xff\xc0\x00\x11\x08\xea\x60\xea\x60\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01\xff\xd9"
    webp_canvas = b"RIFF" + struct.pack("<I", 22) + b"WEBPVP8X" + struct.pack("<I", 10) + b"\0" * 4 + b"\xff\x3f\0" * 2
    read_or_refused, too_large, unsupported = statuses(200, 400), statuses(413), statuses(415)
    return {
        "57-byte header of 20000x20000": (png_header(20000, 20000), too_large, "image_too_large"),
        "12000x12000 of zeros at level 9": (png_of_zeros(12000, 12000), too_large, "image_too_large"),
        "4096x4097 header": (png_header(4096, 4097), too_large, "image_too_large"),
        "JPEG frame of 60000x60000": (jpeg_frame, too_large, "image_too_large"),
        "WebP canvas of 16384x16384": (webp_canvas, too_large, "image_too_large"),
        "zTXt bomb": (with_chunk(small, png_chunk(b"zTXt", b"Comment\0\0" + bomb)), read_or_refused, None),
        "iTXt XMP bomb": (with_chunk(small, png_chunk(b"iTXt", xmp + bomb)), read_or_refused, None),
        "iCCP bomb": (with_chunk(small, png_chunk(b"iCCP", b"icc\0\0" + bomb)), read_or_refused, None),
        "5 MB junk caBX": (with_chunk(small, png_chunk(b"caBX", b"\xff" * 5 * MB)), read_or_refused, None),
        "bad IHDR CRC": (small[:29] + b"\0\0\0\0" + small[33:], read_or_refused, None),
        "0x0 header": (png_header(0, 0), BAD, "invalid_image"),
        "signature only": (b"\x89PNG\r\n\x1a\n", BAD, "invalid_image"),
        "truncated PNG": (small[: len(small) // 2], BAD, "invalid_image"),
        "RIFF WEBP with no chunk": (b"RIFF\0\0\0\0WEBP", BAD, "invalid_image"),
        "1x1 PNG": (encoded(Image.new("RGB", (1, 1))), OK, None),
        "1x4096 PNG": (encoded(Image.new("L", (1, 4096))), OK, None),
        "16-bit PNG": (encoded(Image.new("I;16", (130, 130))), OK, None),
        "palette PNG": (encoded(Image.new("P", (130, 130))), OK, None),
        "CMYK JPEG": (encoded(Image.new("CMYK", (130, 130)), "JPEG"), OK, None),
        "GIF": (encoded(Image.new("RGB", (16, 16)), "GIF"), unsupported, "unsupported_media_type"),
        "BMP": (encoded(Image.new("RGB", (16, 16)), "BMP"), unsupported, "unsupported_media_type"),
        "SVG": (b'<svg xmlns="http://www.w3.org/2000/svg" width="20000" height="20000"/>', unsupported, None),
        "text": (b"hello", unsupported, "unsupported_media_type"),
        "JSON": (generate(), unsupported, "unsupported_media_type"),
        "URL to fetch": (b"http://169.254.169.254/latest/meta-data/", unsupported, "unsupported_media_type"),
        "empty": (b"", BAD, "empty_body"),
        "a released image": (released, OK, None),
    }


def verify_probes(released: bytes) -> list[Probe]:
    cases = verify_cases(released).items()
    probes = [Probe(name, "POST", "/v1/verify", expect, body, PNG, code=code) for name, (body, expect, code) in cases]
    probes.append(Probe("no key", "POST", "/v1/verify", UNAUTH, released, PNG, None))
    probes.append(Probe("review key", "POST", "/v1/verify", OK, released, PNG, REV))
    return probes


def released_png(client: httpx.Client) -> bytes:
    r = client.post(GENERATE, json={**CHEAP, "size": "32x32"}, headers=auth(GEN))
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["data"][0]["b64_json"])


def test_verify_refuses_bombs_and_other_formats(client: httpx.Client) -> None:
    seen = battery(client, verify_probes(released_png(client)), workers=2)  # 2 verify workers: more may be 429
    assert not (found := offenders(seen)), report(found)
    ours = next(s for s in seen if s.probe.name == "a released image").json()
    assert ours["c2pa"]["state"] != "absent" and ours["xmp"], ours


def test_an_upload_at_the_pixel_cap_costs_bounded_memory(client: httpx.Client, server: Server) -> None:
    """4096x4096 is the default IMAGEGEN_MAX_UPLOAD_PIXELS: accepted and decoded. Its RGB is 48 MiB, so a few
    times that is fair; the upload itself is 49 kB."""
    upload = png_of_zeros(4096, 4096, colour=2)
    probe = Probe("4096x4096 RGB of zeros", "POST", "/v1/verify", OK, upload, PNG)
    started = time.monotonic()
    growth, numbers, seen = peak_growth_mb(server.pid, lambda: fire(client, probe))
    seconds = time.monotonic() - started
    assert not (found := offenders([seen])), report(found)
    assert growth < 256, f"a {len(upload)} B upload raised peak RSS by {growth:.0f} MiB in {seconds:.1f}s: {numbers}"


# ---- screening -----------------------------------------------------------------------------------------------

DENIED = {
    "plain": "fake receipt", "soft hyphen": "fa\u00adke re\u00adceipt", "zero-width space": "fake\u200breceipt",
    "zero-width space in word": "fa\u200bke receipt", "zero-width joiner": "fa\u200dke rec\u200deipt",
    "zero-width non-joiner": "fake\u200c receipt", "word joiner": "fake\u2060receipt", "BOM": "fake\ufeffreceipt",
    "tab": "fake\treceipt", "two spaces": "fake  receipt", "newline": "fake\nreceipt",
    "no-break space": "fake\u00a0receipt", "ideographic space": "fake\u3000receipt",
    "fullwidth": "ｆａｋｅ ｒｅｃｅｉｐｔ",
    "upper case": "FAKE RECEIPT", "accents": "fäké rëcëipt", "combining accents": "fa\u0301ke rece\u0301ipt",
    "hyphen": "fake-receipt", "underscore": "fake_receipt", "dot": "fake.receipt", "em dash": "fake\u2014receipt",
    "slash": "fake/receipt", "tag space": "fake\U000e0020receipt", "line separator": "fake\u2028receipt",
    "mixed": "ＦＡ\u00adＫÉ\t\u200dRÉCEIPT", "counterfeit fullwidth": "ｃｏｕｎｔｅｒｆｅｉｔ",
    "counterfeit soft hyphen": "counter\u00adfeit", "counterfeit digits": "counterfeit2024",
    "Hangul filler before": "\u3164fake receipt", "replica of, zero-width": "replica\u200bof",
}  # fmt: skip
HELD = {  # brand terms and SKU-like identifiers: generated, but held for review
    "plain": "nike", "soft hyphen": "ni\u00adke", "zero-width space": "ni\u200bke", "zero-width joiner": "ni\u200dke",
    "fullwidth": "ｎｉｋｅ", "accents": "nïké", "upper case": "NIKE", "digits": "Nike2024", "underscore": "nike_mug",
    "dotless i": "n\u0131ke", "mathematical bold": "\U0001d427\U0001d422\U0001d424\U0001d41e",
    "circled": "\u24dd\u24d8\u24da\u24d4", "variation selector": "ni\ufe0fke", "grapheme joiner": "ni\u034fke",
    "logo, soft hyphen": "lo\u00adgo", "brand name, tab": "brand\tname", "brand name, hyphen": "brand-name",
    "coca-cola spaced": "coca cola", "gucci fullwidth": "ｇｕｃｃｉ", "adidas ZWNJ": "adi\u200cdas",
    "mixed": "Ｎ\u00adÏ\u200dＫé", "samsung, accent and tab": "sämsung\t",
    # Hangul fillers are invisible (Default_Ignorable) letters: glued to a word they hide it from a whole-word
    # match, yet CLIP's BPE still reads the word's own token (a filler before nike leaves nike</w>).
    "Hangul filler before": "\u3164nike", "Hangul filler after": "nike\u3164",
    "halfwidth Hangul filler before": "\uffa0nike", "Hangul filler before logo": "\u3164logo",
    "SKU": "SKU 88-1234-X", "SKU fullwidth": "ＳＫＵ ８８-１２３４-Ｘ", "SKU soft hyphen": "S\u00adKU 88-1234-X",
    "SKU zero-width space": "SKU 88\u200b-1234", "SKU non-breaking hyphen": "AB\u201112345",
    "SKU, Hangul filler after": "SKU\u3164 88-1234-X",
}  # fmt: skip


def screening_probes() -> list[Probe]:
    def prompt(text: str) -> bytes:
        return generate(prompt=f"a mug {text} on a table")

    denied = [post(f"denied: {name}", prompt(text), BAD, "moderation_blocked") for name, text in DENIED.items()]
    denied.append(post("denied: async", prompt("fa\u00adke receipt"), BAD, "moderation_blocked", **ASYNC))
    return denied + [post(f"held: {name}", prompt(text), OK) for name, text in HELD.items()]


def bypasses(seen: Iterable[Seen]) -> list[str]:
    """A denied phrase that was not blocked, or a held term whose image came back with pixels."""
    found = []
    for s in seen:
        if s.probe.name.startswith("denied") and (s.status != 400 or s.json()["error"]["code"] != "moderation_blocked"):
            found.append(s.line())
        elif s.probe.name.startswith("held") and s.status == 200:
            items = s.json()["data"]
            if any(i["status"] != "pending_review" or i["b64_json"] is not None for i in items):
                found.append(f"{s.probe.name}: {[(i['status'], i['release']['outcome']) for i in items]}")
    return found


def test_screening_has_no_bypass(client: httpx.Client) -> None:
    seen = battery(client, screening_probes())
    assert not (found := bypasses(seen)), f"{len(found)} bypasses:\n" + "\n".join(found)
    assert not (found := offenders(seen)), report(found)


# ---- keys and roles ----------------------------------------------------------------------------------------


def finished_job(client: httpx.Client) -> str:
    r = client.post(GENERATE, json=CHEAP, headers={**auth(GEN), **ASYNC})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while (job := client.get(r.headers["location"], headers=auth(GEN)).json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "succeeded", job
    return str(job["id"])


def approved(client: httpx.Client, review_id: str) -> str:
    r = client.post(f"/v1/reviews/{review_id}/approve", headers=auth(REV))
    assert r.status_code == 200, r.text
    return review_id


def auth_probes(job: str, pending: str, done: str) -> list[Probe]:
    j, p, a = f"/v1/jobs/{job}", f"/v1/reviews/{pending}", f"/v1/reviews/{done}"
    mine = [("GET", j, None), ("DELETE", j, None), ("GET", f"{j}/events", None), ("GET", f"{a}/result", None),
            ("POST", GENERATE, generate())]  # fmt: skip
    reviewers = [("GET", "/v1/reviews", None), ("GET", p, None), ("GET", f"{p}/image", None),
                 ("POST", f"{p}/approve", None), ("POST", f"{p}/reject", b"{}")]  # fmt: skip
    anyone = [("GET", "/v1/models", None), ("GET", "/v1/models/tiny-eps", None), ("POST", "/v1/verify", b"\x89PNG")]
    probes = []
    for method, path, body in mine + reviewers + anyone:
        for who, key in (("no key", None), ("wrong key", "nope"), ("a revoked-looking key", GEN + "x")):
            probes.append(Probe(f"{who}: {method} {path}", method, path, UNAUTH, body, JSON, key, "invalid_api_key"))
    for method, path, body in reviewers:
        probes.append(Probe(f"generate key: {method} {path}", method, path, FORBIDDEN, body, JSON, GEN,
                            "insufficient_role"))  # fmt: skip
    for method, path, body in mine:
        probes.append(Probe(f"review key: {method} {path}", method, path, FORBIDDEN, body, JSON, REV,
                            "insufficient_role"))  # fmt: skip
    probes += [
        post("review key, async", generate(), FORBIDDEN, "insufficient_role", **ASYNC, Authorization=f"Bearer {REV}"),
        Probe("another key's job", "GET", j, MISSING, key=GEN2, code="job_not_found"),
        Probe("another key's job, cancel", "DELETE", j, MISSING, key=GEN2, code="job_not_found"),
        Probe("another key's job, events", "GET", f"{j}/events", MISSING, key=GEN2, code="job_not_found"),
        Probe("another key's approved result", "GET", f"{a}/result", MISSING, key=GEN2, code="review_not_found"),
        Probe("another key's pending result", "GET", f"{p}/result", MISSING, key=GEN2, code="review_not_found"),
        Probe("own job", "GET", j, OK),
        Probe("own job, events", "GET", f"{j}/events", OK),
        Probe("own result", "GET", f"{a}/result", OK),
        Probe("own pending result", "GET", f"{p}/result", statuses(409), code="review_pending"),
        Probe("admin: the job", "GET", j, OK, key=ADMIN),
        Probe("admin: the result", "GET", f"{a}/result", OK, key=ADMIN),
        Probe("admin: the queue", "GET", "/v1/reviews", OK, key=ADMIN),
        Probe("review key: models", "GET", "/v1/models", OK, key=REV),
        Probe("approve twice", "POST", f"{a}/approve", statuses(409), key=REV, code="review_decided"),
        Probe("docs off with keys", "GET", "/docs", MISSING, key=None),
        Probe("openapi off with keys", "GET", "/openapi.json", MISSING, key=None),
        Probe("healthz without a key", "GET", "/healthz", OK, key=None),
        Probe("readyz without a key", "GET", "/readyz", OK, key=None),
        Probe("metrics without a key", "GET", "/metrics", OK, key=None),
        Probe("metrics, odd query", "GET", "/metrics?name[]=%ff%00&" + "x=1&" * 500, OK, key=None),
        Probe("POST metrics", "POST", "/metrics", statuses(405), b"x", key=None),
        Probe("TRACE models", "TRACE", "/v1/models", statuses(405)),
        Probe("PUT generations", "PUT", GENERATE, statuses(405), generate(), JSON),
        Probe("dot segments", "GET", "/v1/../../etc/passwd", MISSING),
        Probe("made-up method", "FOO", "/v1/models", statuses(400, 405)),
    ]
    return probes


def test_keys_and_roles_hold(client: httpx.Client, held: list[str]) -> None:
    seen = battery(client, auth_probes(finished_job(client), held[1], approved(client, held[2])))
    assert not (found := offenders(seen)), report(found)
    events = next(s for s in seen if s.probe.name == "own job, events")
    assert b"event: done" in events.body, events.body[-300:]


# ---- the review page ---------------------------------------------------------------------------------------

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass(frozen=True)
class PageSession:
    cookie: str  # the signed-in session's cookie value
    csrf: str  # the signed-in page's forms' token


def sign_in(base: str) -> PageSession:
    with httpx.Client(base_url=base) as browser:
        login_csrf = CSRF.findall(browser.get("/review").text)[0]
        signed = browser.post("/review/login", data={"key": REV, "csrf": login_csrf})
        assert signed.status_code == 303, signed.text
        return PageSession(browser.cookies["imagegen_session"], CSRF.findall(browser.get("/review").text)[0])


def login_token(base: str) -> str:
    """The sign-in form's CSRF token (its cookie holds the same value)."""
    with httpx.Client(base_url=base) as browser:
        return CSRF.findall(browser.get("/review").text)[0]


def login_probes(token: str) -> list[Probe]:
    cookie, login = f"imagegen_login_csrf={token}", "/review/login"
    good, accented = f"key={REV}&csrf={token}".encode(), f"key={REV}&csrf=%C3%A9".encode()
    evil = {"Origin": "http://evil.example"}
    undecodable = {
        "%ff%fe": b"key=%ff%fe",
        "raw \\xff": b"key=\xff",
        "surrogate bytes": b"key=%ED%A0%80",
        "raw surrogate bytes": b"key=\xed\xa0\x80",
        "11 fields": b"&".join(b"f%d=1" % i for i in range(11)),
    }
    probes = [form(f"login, {name}", login, BAD, body + f"&csrf={token}".encode(), cookie, "invalid_value")
              for name, body in undecodable.items()]  # fmt: skip
    probes += [
        form("login without CSRF", login, FORBIDDEN, f"key={REV}".encode(), cookie, "csrf_failed"),
        form("login, CSRF without its cookie", login, FORBIDDEN, good, code="csrf_failed"),
        form("login, non-ASCII CSRF", login, FORBIDDEN, accented, b"imagegen_login_csrf=\xff\xfe", "csrf_failed"),
        form("login cross-site", login, FORBIDDEN, good, cookie, "cross_origin_form", CROSS_SITE),
        form("login same-site", login, FORBIDDEN, good, cookie, "cross_origin_form", {"Sec-Fetch-Site": "same-site"}),
        form("login from another origin", login, FORBIDDEN, good, cookie, "cross_origin_form", evil),
        form("login, wrong key", login, UNAUTH, f"key=nope&csrf={token}".encode(), cookie),
        form("login, a generate key", login, UNAUTH, f"key={GEN}&csrf={token}".encode(), cookie),
        form("login, NUL key", login, UNAUTH, f"key=%00&csrf={token}".encode(), cookie),
    ]
    return probes


def decision_probes(token: str, session: PageSession, pending: list[str]) -> list[Probe]:
    """Forms that must decide nothing; ``pending[1]`` gets a note the JSON route would refuse."""
    signed, decide = f"imagegen_session={session.cookie}", f"csrf={session.csrf}".encode()
    approve, reject = f"/review/{pending[0]}/approve", f"/review/{pending[0]}/reject"
    api, session_only = f"/v1/reviews/{pending[0]}", {"cookie": signed}
    garbage = "imagegen_session=%00%ff; imagegen_login_csrf=" + "x" * 5000
    return [
        form("decision without a session", approve, UNAUTH, decide),
        form("decision, forged session", approve, UNAUTH, decide, "imagegen_session=" + "A" * 43),
        Probe("decision, a key but no session", "POST", approve, UNAUTH, decide, FORM, REV),
        form("decision without CSRF", approve, FORBIDDEN, b"", signed, "csrf_failed"),
        form("decision, the login token", approve, FORBIDDEN, f"csrf={token}".encode(), signed, "csrf_failed"),
        form("decision cross-site", approve, FORBIDDEN, decide, signed, "cross_origin_form", CROSS_SITE),
        form("decision, Origin null", reject, FORBIDDEN, decide, signed, "cross_origin_form", {"Origin": "null"}),
        form("decision on a NUL id", "/review/%00/approve", MISSING, decide, signed),
        form("decision on an odd id", "/review/%ED%A0%80/reject", MISSING, decide, signed),
        form("unknown decision", f"/review/{pending[0]}/publish", MISSING, decide, signed),
        form("decision, invalid UTF-8 form", reject, BAD, decide + b"&note=\xff", signed),
        form("decision, 2001-char note", reject, BAD, decide + b"&note=" + b"n" * 2001, signed),
        # the JSON route refuses these notes (invalid text): the form must too, or the store holds what JSON may not
        form("decision, NUL in the note", f"/review/{pending[1]}/reject", BAD, decide + b"&note=a%00b", signed),
        # the cookie signs in reads only: a state change needs the key or the page's own form
        Probe("session cookie posts to the API", "POST", f"{api}/approve", UNAUTH, None, session_only, None),
        Probe("session cookie reads the image", "GET", f"{api}/image", OK, None, session_only, None),
        Probe("page, garbage cookies", "GET", "/review", OK, None, {"cookie": garbage}, None),
        Probe("page, quoted NUL cookie", "GET", "/review", OK, None, {"cookie": 'imagegen_session="a\\000b"'}, None),
        form("logout without a session", "/review/logout", statuses(303), b""),
        form("logout without CSRF", "/review/logout", FORBIDDEN, b"", signed, "csrf_failed"),
        form("logout cross-site", "/review/logout", FORBIDDEN, decide, signed, "cross_origin_form", CROSS_SITE),
    ]


def test_the_review_page_refuses_forgeries(client: httpx.Client, server: Server) -> None:
    pending, session = hold(client, 2), sign_in(server.base)
    token = login_token(server.base)
    seen = battery(client, login_probes(token) + decision_probes(token, session, pending))
    assert not (found := offenders(seen)), report(found)
    still = client.get(f"/v1/reviews/{pending[0]}", headers=auth(REV)).json()
    assert still["status"] == "pending", still  # no refused form decided anything
    assert client.get("/review", headers={"cookie": f"imagegen_session={session.cookie}"}).status_code == 200


# ---- the review store on PostgreSQL ------------------------------------------------------------------------


def nul_probes(pending: str, session: PageSession) -> list[Probe]:
    signed, decide = f"imagegen_session={session.cookie}", f"csrf={session.csrf}".encode()
    r = "/v1/reviews/a%00b"
    return [
        Probe("NUL review id", "GET", r, MISSING, key=REV),
        Probe("NUL review image", "GET", f"{r}/image", MISSING, key=REV),
        Probe("NUL review approve", "POST", f"{r}/approve", MISSING, key=REV),
        Probe("NUL review reject", "POST", f"{r}/reject", MISSING, b"{}", JSON, REV),
        Probe("NUL review result", "GET", f"{r}/result", MISSING),
        form("NUL id on the page", "/review/a%00b/approve", MISSING, decide, signed),
        form("NUL in the page's note", f"/review/{pending}/reject", BAD, decide + b"&note=a%00b", signed),
    ]


def test_odd_review_ids_and_notes_on_postgresql(
    tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """PostgreSQL text cannot hold NUL: an id or a note carrying one is refused before the database sees it."""
    with (
        postgres_server() as url,
        serve(tiny_models_dir, tmp_path_factory, IMAGEGEN_DATABASE_URL=url) as pg,
        client_for(pg.base) as c,
    ):
        seen = battery(c, nul_probes(hold(c, 1)[0], sign_in(pg.base)), workers=1)
        assert not (found := offenders(seen)), report(found) + "\n" + "\n".join(unhandled_errors(pg.log))
        assert c.get("/readyz").status_code == 200
        assert not (errors := unhandled_errors(pg.log)), "\n".join(errors)


# ---- still serving -----------------------------------------------------------------------------------------


def unhandled_errors(log: Path) -> list[str]:
    """ERROR lines of the server's JSON log, each with the last line of its traceback."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"level": "ERROR"' in line:
            entry = json.loads(line)
            last = (entry.get("exc_info") or "").strip().splitlines()[-1:]
            found.append(f"{entry.get('logger')}: {entry.get('message')} {entry.get('request_id')} {last}")
    return found


def test_the_service_still_serves(client: httpx.Client, server: Server) -> None:
    five_xx = [s.line() for s in SEEN if s.status >= 500 or s.status == 0]
    assert not five_xx, f"{len(five_xx)} of {len(SEEN)} answers were 5xx or none:\n" + "\n".join(five_xx)
    assert client.get("/readyz").status_code == 200
    r = client.post(GENERATE, json={**CHEAP, "num_inference_steps": 4}, headers=auth(GEN))
    assert r.status_code == 200, r.text
    assert base64.b64decode(r.json()["data"][0]["b64_json"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert not (errors := unhandled_errors(server.log)), "\n".join(errors)
