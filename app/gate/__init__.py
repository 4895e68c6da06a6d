"""The release gate: the only way an image leaves the service."""

from app.gate.release import GenerationRecord, ReleaseDecision, ReleasedImage, release

__all__ = ["GenerationRecord", "ReleaseDecision", "ReleasedImage", "release"]
