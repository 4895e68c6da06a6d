"""The release gate: the only way an image leaves the service."""

from imagegen.gate.release import GenerationRecord, ReleaseDecision, ReleasedImage, release

__all__ = ["GenerationRecord", "ReleaseDecision", "ReleasedImage", "release"]
