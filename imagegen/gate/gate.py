"""The release gate as one facade: ``screen`` before compute, ``finish`` after, ``approve``/``reject`` for reviewers.

The API asks ``screen`` and refuses what it blocks; the engine hands ``finish`` the finished pixels of a job and
gets back what may leave (``ReleasedImage``) or a review id (``HeldForReview``); reviewers decide through
``approve`` and ``reject``. The policy, the signer and the review store sit behind it: nothing else decides,
labels or writes the review queue.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from imagegen.gate.c2pa_manifest import ManifestSigner
from imagegen.gate.composite import composite
from imagegen.gate.policy import Policy, Use
from imagegen.gate.release import EditInput, GenerationRecord, HeldForReview, ReleasedImage, release
from imagegen.state.reviews import Review, ReviewError, ReviewStatus, ReviewStore

if TYPE_CHECKING:
    from imagegen.engine.request import GenerationRequest

Verdict = Literal["release", "hold", "block"]
VERDICT: dict[str, Verdict] = {"synthetic_labeled_preview": "release", "human_review": "hold", "blocked": "block"}


@dataclass(frozen=True)
class Screening:
    """The gate's decision on a request, carried with it to ``finish``."""

    verdict: Verdict
    reasons: tuple[str, ...]
    use: Use
    requester: str  # the API key's name (``anonymous`` without keys): recorded with every release and hold


class GateClosed(RuntimeError):
    """A held image cannot be kept: no review store is open."""


def image_record(req: GenerationRequest, image_index: int) -> GenerationRecord:
    """Image i of a request is reproduced alone by the same request with n=1 and seed + i."""
    return GenerationRecord(
        model=req.model,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt or "",
        sampler=req.sampler,
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        guidance_rescale=req.guidance_rescale,
        seed=req.seed + image_index,
        eta=req.eta,
        width=req.width,
        height=req.height,
        strength=None if req.init_image is None else req.strength,
        input_sha256=None if req.edit_source is None else hashlib.sha256(req.edit_source.data).hexdigest(),
    )


def edit_inputs(req: GenerationRequest, pixels: np.ndarray) -> tuple[np.ndarray, list[EditInput | None]]:
    """An edit's outputs with the input's kept pixels put back (``preserve_unmasked``), and what each kept."""
    if req.edit_source is None:
        return pixels, [None] * len(pixels)
    if not (req.preserve_unmasked and req.mask is not None and req.init_image is not None):
        return pixels, [EditInput(req.edit_source.data, req.edit_source.media_type, None)] * len(pixels)
    out, edits = [], list[EditInput | None]()
    for generated in pixels:
        kept_pixels, kept = composite(generated, req.init_image, req.mask)
        out.append(kept_pixels)
        edits.append(EditInput(req.edit_source.data, req.edit_source.media_type, kept))
    return np.stack(out), edits


class Gate:
    def __init__(
        self,
        policy: Policy,
        signer: ManifestSigner | None = None,
        reviews: ReviewStore | None = None,
        on_decision: Callable[[Verdict], None] = lambda _: None,
    ) -> None:
        self.policy = policy
        self.signer = signer
        self.reviews = reviews
        self.on_decision = on_decision

    def screen(self, use: Use, prompt: str, requester: str, readings: Iterable[str] = ()) -> Screening:
        """Before any compute. ``readings``: the prompt as each loaded tokenizer reads it back."""
        decision = self.policy.decide(use, prompt, readings)
        verdict = VERDICT[decision.outcome]
        self.on_decision(verdict)
        return Screening(verdict, decision.reasons, use, requester)

    def finish(self, req: GenerationRequest, pixels: np.ndarray) -> list[ReleasedImage | HeldForReview]:
        """A job's finished pixels (n, H, W, 3) uint8 → what its response may carry, per image. A request's
        images are held, or released and audited, together: all of them or none."""
        screening = req.screening
        if screening is None or screening.verdict == "block":
            raise GateClosed("the request was not screened")  # a bug upstream: never release unscreened work
        records = [image_record(req, i) for i in range(req.n)]
        pixels, edits = edit_inputs(req, pixels)  # before any label: the kept pixels are the user's own
        fmt, compression = req.output.format, req.output.compression
        if screening.verdict == "hold":
            if self.reviews is None:
                raise GateClosed("the policy held an image but no review store is open")
            use = asdict(screening.use)
            ids = self.reviews.hold(
                list(zip(pixels, records, strict=True)),
                screening.reasons,
                use,
                fmt,
                compression,
                screening.requester,
                edits,
            )
            return [HeldForReview(i, r, screening.reasons) for i, r in zip(ids, records, strict=True)]
        images = [
            release(p, r, fmt, compression, self.signer, e) for p, r, e in zip(pixels, records, edits, strict=True)
        ]
        if self.reviews is not None:
            self.reviews.record_releases(images, screening.requester)
        return list(images)

    def partial(
        self, req: GenerationRequest, pixels: np.ndarray, image_index: int, partial_index: int
    ) -> ReleasedImage:
        """A preview (H, W, 3) of image ``image_index`` while it forms: released like any image (an edit's kept
        pixels put back, watermark, XMP, C2PA signed) and audited. Only requests the policy releases have them."""
        screening = req.screening
        if screening is None or screening.verdict != "release":
            raise GateClosed("only requests the policy releases show partial images")
        composited, edits = edit_inputs(req, pixels[None])
        record = image_record(req, image_index)
        fmt, compression = req.output.format, req.output.compression
        image = release(composited[0], record, fmt, compression, self.signer, edits[0], partial=partial_index)
        if self.reviews is not None:
            self.reviews.record_releases([image], screening.requester)
        return image

    def _store(self) -> ReviewStore:
        if self.reviews is None:
            raise ReviewError("review_unavailable", "the review store is not open")
        return self.reviews

    def approve(self, review_id: str, reviewer: str) -> Review:
        """Label and sign a held image now; the store records it only if nobody decided meanwhile."""
        reviews = self._store()
        review, pixels, edit = reviews.pending(review_id)
        # Signing (maybe against a remote time-stamp authority) holds no lock of the store.
        image = release(pixels, review.record, review.format, review.compression, self.signer, edit)
        return reviews.mark_approved(review_id, reviewer, image)

    def reject(self, review_id: str, reviewer: str, note: str = "") -> Review:
        return self._store().reject(review_id, reviewer, note)

    def find(self, status: ReviewStatus) -> list[Review]:
        return self._store().find(status)

    def review(self, review_id: str) -> tuple[Review, list[dict[str, Any]]]:
        """A review and its audit trail."""
        store = self._store()
        return store.get(review_id), store.audit(review_id)

    def held_image(self, review_id: str, viewer: str) -> bytes:
        return self._store().held_pixels(review_id, viewer)

    def held_input(self, review_id: str, viewer: str) -> tuple[bytes, str]:
        return self._store().held_input(review_id, viewer)

    def result(self, review_id: str, fetcher: str, owner_only: bool) -> tuple[Review, bytes]:
        return self._store().released(review_id, fetcher, owner_only)
