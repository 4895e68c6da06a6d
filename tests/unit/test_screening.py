"""Prompt screening against what real tokenizers read: every obfuscation of a screened word gets the decision
its plain spelling gets, for the CLIP BPE tokenizer (SD1/SDXL) and the BERT WordPiece one (the default model)."""

from __future__ import annotations

import pytest

from imagegen.gate.policy import Outcome, Policy, Use, normalise, views
from imagegen.pipeline.components import TextEncoder
from tests.tokenizers import OBFUSCATIONS, clip_tokenizer, minilm_tokenizer, reader

POLICY = Policy.load()
RELEASED: Outcome = "synthetic_labeled_preview"
TARGETS: dict[str, tuple[str, Outcome]] = {  # name: (plain prompt, its decision)
    "brand": ("a nike mug on a desk", "human_review"),
    "denied": ("a fake receipt for a mug", "blocked"),
    "sku": ("a mug, SKU 88-1234-X, studio light", "human_review"),
}
BENIGN = [
    "a red mug on a white background",
    "a snikers-style sneaker",
    "a logotype-free mug",
    "一个红色的杯子",
    "a mug of cocoa ☕🍫 on a desk 👍🏽",
    "a fake plant next to a receipt printer",
    "ein Becher mit Straße und Ärger",
]
CASES = [(t, o) for t in TARGETS for o in OBFUSCATIONS if OBFUSCATIONS[o](TARGETS[t][0]) != TARGETS[t][0]]


@pytest.fixture(scope="module", params=["clip", "minilm"])
def encoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TextEncoder:
    if request.param == "clip":
        return reader(clip_tokenizer(tmp_path_factory.getbasetemp() / "clip-tokenizer"))
    return reader(minilm_tokenizer())


def decide(encoder: TextEncoder, prompt: str) -> Outcome:
    return POLICY.decide(Use(), prompt, [encoder.read_back(prompt)]).outcome


def test_the_clip_vocabulary_is_openai_s(tmp_path_factory: pytest.TempPathFactory) -> None:
    tokenizer = clip_tokenizer(tmp_path_factory.getbasetemp() / "clip-tokenizer")
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408


@pytest.mark.parametrize("target", TARGETS)
def test_the_plain_spelling_is_screened(encoder: TextEncoder, target: str) -> None:
    prompt, expected = TARGETS[target]
    assert decide(encoder, prompt) == expected


@pytest.mark.parametrize(("target", "obfuscation"), CASES, ids=[f"{t}-{o}" for t, o in CASES])
def test_an_obfuscated_spelling_gets_the_same_decision(encoder: TextEncoder, target: str, obfuscation: str) -> None:
    plain, expected = TARGETS[target]
    prompt = OBFUSCATIONS[obfuscation](plain)
    assert decide(encoder, prompt) == expected, (prompt, encoder.read_back(prompt))


@pytest.mark.parametrize(
    "prompt",
    ["a nike2024 mug", "a mug by Nike_Official", "a 2024nike mug", "a nıke mug", "a fake receıpt"],
)
def test_digits_underscores_and_dotless_i_around_a_screened_word(encoder: TextEncoder, prompt: str) -> None:
    """CLIP splits letters from digits and punctuation, WordPiece reads nike2024 as nike ##20 ##24."""
    assert decide(encoder, prompt) != RELEASED, encoder.read_back(prompt)


@pytest.mark.parametrize("prompt", BENIGN)
def test_benign_prompts_stay_released(encoder: TextEncoder, prompt: str) -> None:
    assert decide(encoder, prompt) == RELEASED, encoder.read_back(prompt)


@pytest.mark.parametrize(
    ("prompt", "reading"), [("A NiKe Mug", "a nike mug"), ("a fake\t\u3000 receipt", "a fake receipt")]
)
def test_both_tokenizers_fold_case_and_whitespace(encoder: TextEncoder, prompt: str, reading: str) -> None:
    assert encoder.read_back(prompt) == reading


@pytest.mark.parametrize(
    ("prompt", "reading"),
    [
        ("a ni\u00adke mug", "a nike mug"),
        ("a n\u200di\u2060ke mug", "a nike mug"),
        ("nïké", "nike"),
        ("ni\u0301ke", "nike"),
    ],
)
def test_wordpiece_reads_format_characters_and_accents_away(prompt: str, reading: str) -> None:
    assert reader(minilm_tokenizer()).read_back(prompt) == reading


def test_clip_keeps_what_it_does_not_normalise(tmp_path_factory: pytest.TempPathFactory) -> None:
    """CLIP splits a word at a format character and keeps fullwidth letters: the prompt's own normalised
    form, not the reading, is what matches there."""
    clip = reader(clip_tokenizer(tmp_path_factory.getbasetemp() / "clip-tokenizer"))
    assert clip.read_back("a ni\u00adke mug") == "a ni \u00ad ke mug"
    assert clip.read_back("ｎｉｋｅ") == "ｎｉｋｅ"
    assert clip.read_back("a nike2024 mug") == "a nike 2 0 2 4 mug"


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("ＮＩ\u00adｋé", "nike"),
        ("ni\ufe0fk\u034fe", "nike"),
        ("SKU\u00a088\u20131234\u2011X", "sku 88-1234-x"),
        ("fake \t\n\u3000 receipt", "fake receipt"),
    ],
)
def test_normalise(text: str, normalised: str) -> None:
    assert normalise(text) == normalised


def test_invisible_characters_are_read_both_as_nothing_and_as_a_space() -> None:
    assert views("a nike\u200bmug") == ("a nikemug", "a nike mug")
