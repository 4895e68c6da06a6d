"""Background replacement on the shipped catalog-128 through POST /v1/images/edits, as
models/recipes/evaluate_edits.py measures it (models/catalog-128/EDITS.md): a product rendered on white, a mask
that keeps it, a training-style caption asking for another backdrop. The product comes back as the input's own
pixels up to the invisible watermark, and the backdrop is the asked one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from imagegen.gate.labels import COMPOSITE_SOURCE_TYPE
from imagegen.main import create_app
from imagegen.settings import Settings
from models.recipes.data import BG_BASE
from models.recipes.evaluate_edits import (
    MAX_KEPT_DIFF,
    MIN_KEPT_PSNR,
    Product,
    caption,
    grow,
    kept_stats,
    mask_png,
    png,
    product,
)
from tests.helpers import decode_image, wait_ready, xmp_of

MODELS = Path(__file__).resolve().parents[2] / "models"
CASES = [("mug", "red", "black", 3001), ("sneaker", "orange", "wood", 3009)]  # object, colour, backdrop, seed


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """catalog-128 alone (a folder linking to the shipped one), served as `make serve` serves it."""
    models = tmp_path_factory.mktemp("models")
    (models / "catalog-128").symlink_to(MODELS / "catalog-128", target_is_directory=True)
    with TestClient(create_app(Settings(models_dir=models))) as c:
        wait_ready(c, timeout=300)
        yield c


def edit(
    client: TestClient, p: Product, backdrop: str, seed: int, **fields: str
) -> tuple[np.ndarray, dict[str, object]]:
    files = [("image", ("product.png", png(p.image), "image/png")), ("mask", ("mask.png", mask_png(p), "image/png"))]
    form = {"prompt": caption(p.obj, p.colour, backdrop), "seed": str(seed), "size": "128x128", **fields}
    r = client.post("/v1/images/edits", data=form, files=files)
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    image = decode_image(item["b64_json"])
    assert image.size == (128, 128)
    xmp = xmp_of(image)  # an edit is labelled a composite of the input and generated pixels
    assert COMPOSITE_SOURCE_TYPE in xmp and "<Iptc4xmpExt:AISystemUsed>imagegen/catalog-128<" in xmp
    return np.asarray(image.convert("RGB")), item


@pytest.mark.parametrize(("obj", "colour", "backdrop", "seed"), CASES)
def test_background_replacement_keeps_the_product_and_draws_the_asked_backdrop(
    client: TestClient, obj: str, colour: str, backdrop: str, seed: int
) -> None:
    p = product(obj, colour)
    out, item = edit(client, p, backdrop, seed)
    generation, release = item["generation"], item["release"]
    assert isinstance(generation, dict) and isinstance(release, dict)
    # the served defaults of the folder, strength 1 with a mask
    assert (generation["model"], generation["sampler"], generation["steps"]) == ("catalog-128", "ddim", 25)
    assert generation["strength"] == 1.0
    assert "composite_with_input" in release["labels"] and release["watermark_payload"]
    assert release["kept"]["pixels"] == int(p.keep.sum())

    # kept pixels: the input's, up to the watermark (≈ 44 dB over a whole image; imagegen/gate/watermark.py)
    kept = kept_stats(out, p)
    assert kept["psnr"] >= MIN_KEPT_PSNR and kept["max_abs"] <= MAX_KEPT_DIFF, kept
    assert kept["mean_abs"] < 2.5, kept

    # the backdrop (≥ 12 px from the product): near the asked backdrop's colour, nearer than to any other
    far = out[~grow(p.keep, 12)].reshape(-1, 3).astype(np.float64).mean(0)
    dist = {name: float(np.linalg.norm(far - np.array(rgb))) for name, rgb in BG_BASE.items()}
    assert min(dist, key=dist.__getitem__) == backdrop and dist[backdrop] < 40, dist
    assert dist["white"] > 100, dist  # the white product-photo backdrop is gone


def test_without_the_composite_the_bound_fails(client: TestClient) -> None:
    """preserve_unmasked=false: the product is only what the VAE and the latent blend give back, far below the
    watermark's tolerance, so the bound above is what the composite buys."""
    p = product("mug", "red")
    out, item = edit(client, p, "black", 3001, preserve_unmasked="false")
    assert item["release"]["kept"] is None  # type: ignore[index]
    assert kept_stats(out, p)["psnr"] < MIN_KEPT_PSNR - 5
