"""The gate's policy: from what a request declares and what its prompt says, decide to release (labelled),
hold for human review, or block before any compute. Pure: no I/O beyond reading the policy file.

The prompt is screened as the text encoder reads it, not as bytes: each view (the prompt itself and each
loaded tokenizer's round trip of it, each again with look-alike Cyrillic and Greek letters read as Latin) is
normalised — Unicode NFKC, invisible characters (format, control, private use, default-ignorable) removed or,
in a second reading, taken as spaces, case-folded, accents and other marks stripped, dashes read as hyphens,
whitespace runs collapsed — and every rule is matched against every view. A soft hyphen, a zero-width joiner,
a tab, fullwidth letters or an accent inside a screened word still match it; so does a phrase whose words are
joined by punctuation (fake-receipt) and a word with digits glued on (nike2024), since the tokenizers split
those apart.
"""

from __future__ import annotations

import functools
import re
import tomllib
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_POLICY = Path(__file__).with_name("default_policy.toml")
Rule = Literal["release", "review", "block"]
Outcome = Literal["synthetic_labeled_preview", "human_review", "blocked"]
OUTCOME: dict[Rule, Outcome] = {"release": "synthetic_labeled_preview", "review": "human_review", "block": "blocked"}
SEVERITY: dict[Rule, int] = {"release": 0, "review": 1, "block": 2}


_SPACES = re.compile(r"\s+")
_LETTER = r"[^\W\d_]"
_WORD = re.compile(rf"{_LETTER}+|\d+")  # letter runs and digit runs: CLIP's pre-tokenizer splits them apart
_NOT_IDENTIFIER = re.compile(r"[^\w\s-]|_")  # what may stand between "SKU" and its number
_DIGIT_GAPS = re.compile(r"(?<=\d)[ .-](?=\d)")


# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): drawn as nothing. Most are format
# characters (Cf), but Hangul fillers are letters (Lo) and a few are marks or unassigned; unicodedata does not
# expose the property, so its ranges are listed here.
_IGNORABLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0000-\U000e0fff]"
)


def _kept(c: str, format_chars: str) -> str:
    """One character of an NFKD-decomposed, case-folded text, as screening sees it."""
    category = unicodedata.category(c)
    if (category[0] == "C" and not c.isspace()) or _IGNORABLE.match(c):
        return format_chars  # format, control, private use, invisible: BERT drops them, CLIP splits at them
    if category in ("Mn", "Me"):  # as BERT strips accents: every mark, variation selectors included
        return ""
    if category == "Pd" or c == "\u2212":  # en dash, non-breaking hyphen, minus: the same identifier
        return "-"
    return c


def normalise(text: str, *, format_chars: str = "", symbols_as_spaces: bool = False) -> str:
    """What a tokenizer's normaliser makes of ``text``, at its most forgiving (see the module docstring).
    ``format_chars``: what invisible characters become: nothing (``ni\u00adke`` is nike) or a space
    (``nike\u200bmug`` is two words). ``symbols_as_spaces``: symbols read as spaces before NFKC spells
    them out (``Nike™`` is nike, not ``niketm``)."""
    if symbols_as_spaces:
        text = "".join(" " if unicodedata.category(c)[0] == "S" else c for c in text)
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).casefold())
    text = unicodedata.normalize("NFKC", "".join(_kept(c, format_chars) for c in text))
    return _SPACES.sub(" ", text).strip()


# Cyrillic, Greek and other letters drawn like Latin ones (prototypes from Unicode's confusables, UTS #39, for
# the letters a screened term can hold), read before case folding so that capitals map to capitals: a person
# reads "nіke" (Cyrillic і) or "ΝΙΚΕ" (Greek) as nike.
_LOOKALIKES = str.maketrans(
    {
        **dict(zip("АВЕЅІЈКМНОРСТХУаеѕіјорсхуԁһӏԛԝѵ", "ABESIJKMHOPCTXYaesijopcxydhlqwv", strict=True)),
        **dict(zip("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧαικνορτυχ", "ABEZHIKMNOPTYXaikvoptux", strict=True)),
        **dict(zip("квмнт", "kbmht", strict=True)),  # lower-case Cyrillic drawn as small capitals
        **dict(zip("ᴀʙᴄᴅᴇɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢ", "abcdeghijklmnoprstuvwyz", strict=True)),  # Latin small capitals
        **dict(zip("ɑɡօոսհ", "agonuh", strict=True)),  # Latin alpha, script g; Armenian
    }
)


def views(prompt: str, readings: Iterable[str] = ()) -> tuple[str, ...]:
    """The normalised prompt and each normalised tokenizer reading of it, invisible characters read both
    ways, and each again with look-alike letters read as the Latin ones, without repeats."""
    texts = [prompt, *readings]
    texts += [t.translate(_LOOKALIKES) for t in texts]
    ways = (("", False), (" ", False), ("", True))  # (invisible characters become, symbols read as spaces)
    return tuple(dict.fromkeys(normalise(t, format_chars=f, symbols_as_spaces=sym) for t in texts for f, sym in ways))


@functools.lru_cache(maxsize=256)
def _phrase(term: str, *, whole_word: bool) -> re.Pattern[str]:
    """``term`` (normalised) with any run of spaces, punctuation or symbols between its words, as the
    tokenizers split them off (fake-receipt, fake_receipt); a whole word is bounded by anything but a letter
    (nike2024, nike_mug, not snikers). Case-insensitive as ``re`` is: nıke is nike."""
    parts: list[str] = []
    end = 0
    for m in _WORD.finditer(term):
        if parts:
            parts.append(r"[\W_]+" if m.start() > end else r"[\W_]*")
        parts.append(re.escape(m.group()))
        end = m.end()
    body = "".join(parts) or re.escape(term)
    return re.compile(rf"(?<!{_LETTER}){body}(?!{_LETTER})" if whole_word else body, re.I)


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
        return cls(
            asset_types=dict(raw.get("asset_types", {})),
            flags=dict(raw.get("flags", {})),
            brand_terms=terms,
            sku_patterns=tuple(re.compile(p, re.I) for p in screening.get("sku_patterns", ())),
            denylist=tuple(normalise(str(t)) for t in screening.get("denylist", ())),
        )

    def decide(self, use: Use, prompt: str, readings: Iterable[str] = ()) -> Decision:
        """The strictest rule that applies wins; every rule that applied is a reason. ``readings``: the prompt
        as each loaded tokenizer reads it back."""
        found: list[tuple[Rule, str]] = []
        texts = views(prompt, readings)
        for term in self.denylist:
            if any(_phrase(term, whole_word=False).search(text) for text in texts):
                found.append(("block", f"prompt contains the denied phrase {term!r}"))
        found.append((self.asset_types.get(use.asset_type, "review"), f"asset_type {use.asset_type}"))
        logo, sku = use.contains_logo, use.claims_real_sku
        reasons_logo = ["the request declares a logo"] if logo else []
        reasons_sku = ["the request claims a real SKU"] if sku else []
        brands = {t for t in self.brand_terms if any(_phrase(t, whole_word=True).search(text) for text in texts)}
        if brands:
            logo = True
            reasons_logo += [f"prompt mentions {b!r}" for b in sorted(brands)]
        spaced = [_SPACES.sub(" ", _NOT_IDENTIFIER.sub(" ", t)) for t in texts]
        # barcodes are printed in groups: "EAN 4006 3813 3393 1" is the number 4006381333931
        grouped = [_DIGIT_GAPS.sub("", t) for t in spaced]
        spaced = list(dict.fromkeys([*texts, *spaced, *grouped]))
        skus = [m.group(0) for text in spaced for p in self.sku_patterns if (m := p.search(text))]
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
