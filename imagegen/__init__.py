"""imagegen: a text-to-image inference service with step-level batching and a release gate."""

__version__ = "0.1.0"
