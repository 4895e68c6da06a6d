"""Turns accepted generation requests into released images, one worker per model."""
