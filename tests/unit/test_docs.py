"""The README's settings table lists exactly the settings the service reads."""

from __future__ import annotations

import re
from pathlib import Path

from imagegen.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_documents_every_setting() -> None:
    documented = set(re.findall(r"^\| `IMAGEGEN_([A-Z0-9_]+)` \|", README.read_text(), flags=re.M))
    assert documented == {name.upper() for name in Settings.model_fields}
