"""C2PA Content Credentials, signed last: any byte changed afterwards breaks the manifest.

The manifest states one action, ``c2pa.created`` with the IPTC digital source type
``trainedAlgorithmicMedia``, and who made it (``claim_generator_info``); no thumbnail. An edit's manifest has the
input file as its ``parentOf`` ingredient, ``c2pa.opened`` on it, then ``c2pa.edited`` with
``compositeWithTrainedAlgorithmicMedia``; an input that carries Content Credentials of its own keeps them there.
Signing uses ES256 with a certificate chain from settings, or a development chain generated on first start (valid
signatures, but the signer is untrusted: /readyz and the logs say so).
"""

from __future__ import annotations

import datetime
import fcntl
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imagegen.gate.labels import COMPOSITE_SOURCE_TYPE, DIGITAL_SOURCE_TYPE

log = logging.getLogger(__name__)
_NO_THUMBNAIL = {"builder": {"thumbnail": {"enabled": False}}}


@dataclass(frozen=True)
class SigningIdentity:
    chain_pem: bytes  # the signing certificate first, then its issuers
    key_pem: bytes
    development: bool  # a chain this service generated for itself: no trust anchor knows it

    @property
    def subject(self) -> str:
        return x509.load_pem_x509_certificate(self.chain_pem).subject.rfc4514_string()

    @classmethod
    def from_files(cls, chain: Path, key: Path) -> SigningIdentity:
        return cls(chain.read_bytes(), key.read_bytes(), development=False)

    @classmethod
    def development_chain(cls, folder: Path) -> SigningIdentity:
        """A root CA and an ES256 signing certificate, generated once and kept in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "dev-chain.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # replicas sharing a state dir make one chain, never read half of one
            chain_path, key_path = folder / "dev-chain.pem", folder / "dev-key.pem"
            if chain_path.is_file() and key_path.is_file():
                return cls(chain_path.read_bytes(), key_path.read_bytes(), development=True)
            return cls._generate(chain_path, key_path)

    @classmethod
    def _generate(cls, chain_path: Path, key_path: Path) -> SigningIdentity:
        now = datetime.datetime.now(datetime.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                              x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imagegen development")])  # fmt: skip

        def usage(sign: bool) -> x509.KeyUsage:
            return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                                 data_encipherment=False, key_agreement=False, key_cert_sign=not sign,
                                 crl_sign=not sign, encipher_only=False, decipher_only=False)  # fmt: skip

        root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        root = (
            x509.CertificateBuilder().subject_name(name("imagegen development root"))
            .issuer_name(name("imagegen development root"))
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage(sign=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256())
        )  # fmt: skip
        leaf = (
            x509.CertificateBuilder().subject_name(name("imagegen development signer")).issuer_name(root.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(sign=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256())
        )  # fmt: skip
        chain = leaf.public_bytes(serialization.Encoding.PEM) + root.public_bytes(serialization.Encoding.PEM)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        key_path.write_bytes(pem)
        key_path.chmod(0o600)
        chain_path.write_bytes(chain)
        log.warning(
            "generated a development C2PA signing chain in %s: signatures are valid but untrusted", chain_path.parent
        )
        return cls(chain, pem, development=True)


@dataclass(frozen=True)
class Ingredient:
    """An edit's input file, as the user uploaded it."""

    data: bytes
    media_type: str
    kept_pixels: bool  # the input's pixels outside the mask were composited back


def _edit_actions(ingredient: Ingredient) -> list[dict[str, Any]]:
    generated = (
        "new pixels generated inside the mask; every pixel outside it is the input's own"
        if ingredient.kept_pixels
        else "the input re-drawn by a trained model"
    )
    return [
        {"action": "c2pa.opened", "parameters": {"ingredientIds": ["input"]}},
        {"action": "c2pa.edited", "digitalSourceType": COMPOSITE_SOURCE_TYPE, "parameters": {"description": generated}},
    ]


class ManifestSigner:
    def __init__(
        self, identity: SigningIdentity, tsa_url: str | None = None, on_sign: Callable[[float], None] | None = None
    ) -> None:
        self.identity = identity
        self.tsa_url = tsa_url
        self.on_sign = on_sign or (lambda _: None)  # seconds per signature (the metrics' histogram)
        tsa = tsa_url.encode() if tsa_url else None
        info = c2pa.C2paSignerInfo(b"es256", identity.chain_pem, identity.key_pem, tsa)
        self._signer = c2pa.Signer.from_info(info)
        self._context = c2pa.Context(settings=c2pa.Settings.from_dict(_NO_THUMBNAIL))
        self._lock = threading.Lock()  # one native signer, shared by the release threads of every model

    def sign(
        self,
        data: bytes,
        media_type: str,
        title: str,
        generator: str,
        version: str,
        ingredient: Ingredient | None = None,
    ) -> bytes:
        actions = (
            [{"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE}]
            if ingredient is None
            else _edit_actions(ingredient)
        )
        manifest = {
            "claim_generator_info": [{"name": generator, "version": version}],
            "title": title,
            "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}}],
        }
        out = io.BytesIO()
        with self._lock:
            started = time.perf_counter()
            builder = c2pa.Builder(manifest, self._context)
            if ingredient is not None:
                extension = ingredient.media_type.rpartition("/")[2]
                spec = {"title": f"input.{extension}", "relationship": "parentOf", "label": "input"}
                builder.add_ingredient(spec, ingredient.media_type, io.BytesIO(ingredient.data))
            builder.sign(self._signer, media_type, io.BytesIO(data), out)
            self.on_sign(time.perf_counter() - started)
        return out.getvalue()


@dataclass(frozen=True)
class ManifestReport:
    state: str  # Valid | Trusted | Invalid (c2pa's own) | absent | remote_not_fetched | unreadable
    actions: tuple[dict[str, Any], ...]
    failures: tuple[str, ...]
    claim_generator: str | None = None
    thumbnail: bool = False


# An upload may name a remote manifest store, an OCSP responder or other URLs: reading it must never make
# this service fetch them (SSRF, and a slow host would hold a verify thread). The empty host list refuses
# whatever network access the two verify switches miss.
READ_SETTINGS: dict[str, Any] = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
    "core": {"allowed_network_hosts": []},
}


def _unreadable(exc: c2pa.C2paError) -> ManifestReport:
    kind, colon, _ = str(exc).partition(":")  # c2pa's messages start with their error kind
    if not colon:
        kind = type(exc).__name__
    if kind == "Remote":  # the upload holds only a URL of its manifest store, which is not fetched
        return ManifestReport("remote_not_fetched", (), ())
    return ManifestReport("unreadable", (), (kind,))


def read_manifest(data: bytes, media_type: str) -> ManifestReport:
    try:
        # a fresh context per read (well under a millisecond) shares no native state between threads
        with (
            c2pa.Context.from_dict(READ_SETTINGS) as context,
            c2pa.Reader(media_type, io.BytesIO(data), context=context) as reader,
        ):
            store = json.loads(reader.json())
            results = reader.get_validation_results() or {}
            state = reader.get_validation_state() or "absent"
    except c2pa.C2paError.ManifestNotFound:
        return ManifestReport("absent", (), ())
    except c2pa.C2paError as exc:
        return _unreadable(exc)
    # The manifest is the uploader's: every part of it may have any JSON shape.
    manifests = _dict(store.get("manifests"))
    active = _dict(manifests.get(str(store.get("active_manifest", ""))))
    actions: tuple[dict[str, Any], ...] = ()
    for assertion in _list(active.get("assertions")):
        if str(_dict(assertion).get("label", "")).startswith("c2pa.actions"):
            actions = tuple(a for a in _list(_dict(_dict(assertion).get("data")).get("actions")) if isinstance(a, dict))
    failed = _list(_dict(_dict(results).get("activeManifest")).get("failure"))
    failures = tuple(str(_dict(f).get("code", "")) for f in failed)
    info = _list(active.get("claim_generator_info")) or [{}]
    name = _dict(info[0]).get("name")
    return ManifestReport(str(state), actions, failures, None if name is None else str(name), "thumbnail" in active)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
