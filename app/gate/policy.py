"""The gate's policy: from what a request declares and what its prompt says, decide to release (labelled),
hold for human review, or block before any compute. Pure: no I/O beyond reading the policy file.

The prompt is screened as the text encoder reads it, not as bytes: each view (the prompt itself and each
loaded tokenizer's round trip of it) is normalised — Unicode NFKC, format characters (Cf) removed,
case-folded, accents stripped, whitespace runs collapsed — and every rule is matched against every view.
A soft hyphen, a zero-width joiner, a tab, fullwidth letters or an accent inside a screened word still
match it.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_POLICY = Path(__file__).with_name("default_policy.toml")
Rule = Literal["release", "review", "block"]
Outcome = Literal["synthetic_labeled_preview", "human_review", "blocked"]
OUTCOME: dict[Rule, Outcome] = {"release": "synthetic_labeled_preview", "review": "human_review", "block": "blocked"}
SEVERITY: dict[Rule, int] = {"release": 0, "review": 1, "block": 2}


_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """What a tokenizer's normaliser makes of ``text``, at its most forgiving (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf").casefold()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def views(prompt: str, readings: Iterable[str] = ()) -> tuple[str, ...]:
    """The normalised prompt and each normalised tokenizer reading of it, without repeats."""
    return tuple(dict.fromkeys(normalise(t) for t in (prompt, *readings)))


@dataclass(frozen=True)
class Use:
    """What the requester declares about the image."""

    asset_type: str = "campaign_background"
    claims_real_sku: bool = False
    contains_logo: bool = False


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Policy:
    asset_types: dict[str, Rule]
    flags: dict[str, Rule]
    brand_terms: tuple[str, ...] = ()
    sku_patterns: tuple[re.Pattern[str], ...] = ()
    denylist: tuple[str, ...] = ()
    _brand: re.Pattern[str] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: Path = DEFAULT_POLICY) -> Policy:
        with path.open("rb") as f:
            raw = tomllib.load(f)
        rules = {**raw.get("asset_types", {}), **raw.get("flags", {})}
        bad = {k: v for k, v in rules.items() if v not in SEVERITY}
        if bad:
            raise ValueError(f"{path}: rules must be release, review or block: {bad}")
        screening = raw.get("screening", {})
        terms = tuple(normalise(str(t)) for t in screening.get("brand_terms", ()))
        brand = re.compile(r"\b(?:" + "|".join(re.escape(t) for t in terms) + r")\b", re.I) if terms else None
        return cls(
            asset_types=dict(raw.get("asset_types", {})),
            flags=dict(raw.get("flags", {})),
            brand_terms=terms,
            sku_patterns=tuple(re.compile(p, re.I) for p in screening.get("sku_patterns", ())),
            denylist=tuple(normalise(str(t)) for t in screening.get("denylist", ())),
            _brand=brand,
        )

    def decide(self, use: Use, prompt: str, readings: Iterable[str] = ()) -> Decision:
        """The strictest rule that applies wins; every rule that applied is a reason. ``readings``: the prompt
        as each loaded tokenizer reads it back."""
        found: list[tuple[Rule, str]] = []
        texts = views(prompt, readings)
        for term in self.denylist:
            if any(term in text for text in texts):
                found.append(("block", f"prompt contains the denied phrase {term!r}"))
        found.append((self.asset_types.get(use.asset_type, "review"), f"asset_type {use.asset_type}"))
        logo, sku = use.contains_logo, use.claims_real_sku
        reasons_logo = ["the request declares a logo"] if logo else []
        reasons_sku = ["the request claims a real SKU"] if sku else []
        brands = {m.group(0) for text in texts if self._brand is not None for m in self._brand.finditer(text)}
        if brands:
            logo = True
            reasons_logo += [f"prompt mentions {b!r}" for b in sorted(brands)]
        skus = [m.group(0) for text in texts for p in self.sku_patterns if (m := p.search(text))]
        if skus:
            sku = True
            reasons_sku.append(f"prompt contains the SKU-like identifier {skus[0]!r}")
        if logo:
            found += [(self.flags.get("contains_logo", "review"), r) for r in reasons_logo]
        if sku:
            found += [(self.flags.get("claims_real_sku", "review"), r) for r in reasons_sku]
        worst = max(SEVERITY[rule] for rule, _ in found)
        rule = next(r for r, s in SEVERITY.items() if s == worst)
        reasons = tuple(reason for r, reason in found if SEVERITY[r] > 0) or (f"asset_type {use.asset_type}",)
        return Decision(outcome=OUTCOME[rule], reasons=reasons)
