"""The release gate's policy on its own: declared use + prompt screening → release, review or block."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagegen.gate.policy import Policy, Use

POLICY = Policy.load()


def test_a_campaign_background_is_released_with_labels() -> None:
    d = POLICY.decide(Use("campaign_background"), "a red mug on a white background")
    assert d.outcome == "synthetic_labeled_preview"


@pytest.mark.parametrize(
    ("use", "prompt", "reason"),
    [
        (Use("campaign_background", claims_real_sku=True), "a red mug", "claims a real SKU"),
        (Use("lifestyle_scene", contains_logo=True), "a mug on a desk", "declares a logo"),
        (Use("product_detail_view"), "close-up of the mug handle", "asset_type product_detail_view"),
        (Use("campaign_background"), "a mug with the Nike logo", "'nike'"),
        (Use("campaign_background"), "mug, SKU 88-1234-X, studio light", "SKU-like identifier"),
        (Use("campaign_background"), "bottle labelled UPC 012345678905", "SKU-like identifier"),
        (Use("unknown_use"), "a mug", "asset_type unknown_use"),
    ],
)
def test_held_for_review(use: Use, prompt: str, reason: str) -> None:
    d = POLICY.decide(use, prompt)
    assert d.outcome == "human_review"
    assert any(reason in r for r in d.reasons), d.reasons


@pytest.mark.parametrize(
    ("use", "prompt"),
    [
        (Use("package_damage_evidence"), "a crushed cardboard box"),
        (Use("campaign_background", contains_logo=True), "a counterfeit handbag with a logo"),
    ],
)
def test_blocked(use: Use, prompt: str) -> None:
    assert POLICY.decide(use, prompt).outcome == "blocked"


def test_words_inside_other_words_do_not_trigger() -> None:
    assert POLICY.decide(Use(), "a snikers-style sneaker on a wooden table").outcome == "synthetic_labeled_preview"
    assert POLICY.decide(Use(), "a logotype-free mug").outcome == "synthetic_labeled_preview"


def test_a_policy_file_with_an_unknown_rule_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[asset_types]\ncampaign_background = "maybe"\n')
    with pytest.raises(ValueError, match="release, review or block"):
        Policy.load(path)


@pytest.mark.parametrize("prompt", ["a skull-shaped mug", "skulls on a black t-shirt", "a knitted skullcap"])
def test_words_that_start_like_sku_are_not_skus(prompt: str) -> None:
    assert POLICY.decide(Use(), prompt).outcome == "synthetic_labeled_preview"


@pytest.mark.parametrize("prompt", ["mug, SKU 88-1234-X", "SKU-ABC123 bottle", "sku: 4711 lamp", "SKU#X-1000"])
def test_identifiers_after_sku_are_held(prompt: str) -> None:
    assert POLICY.decide(Use(), prompt).outcome == "human_review"


@pytest.mark.parametrize("prompt", ["EAN 4006 3813 3393 1 on the box", "UPC 0-12345-67890-5", "GTIN: 4006.3813.3393.1"])
def test_barcodes_printed_in_groups_are_held(prompt: str) -> None:
    assert POLICY.decide(Use(), prompt).outcome == "human_review"


def test_numbers_that_are_not_barcodes_stay_released() -> None:
    assert POLICY.decide(Use(), "a mug with 3 4 5 dots, 120 ml").outcome == "synthetic_labeled_preview"


@pytest.mark.parametrize("prompt", ["a nіke mug", "ΝΙΚΕ running shoes", "сосa-cola can", "ΑDIDΑS cap"])
def test_look_alike_letters_of_other_scripts_are_read_as_latin(prompt: str) -> None:
    assert POLICY.decide(Use(), prompt).outcome == "human_review"


@pytest.mark.parametrize("prompt", ["красная кружка на белом фоне", "κόκκινη κούπα σε λευκό φόντο", "Москва mug"])
def test_text_in_other_scripts_stays_released(prompt: str) -> None:
    assert POLICY.decide(Use(), prompt).outcome == "synthetic_labeled_preview"


@pytest.mark.parametrize("prompt", ["a Nike™ running shoe", "IKEA® chair", "Gucci℠ bag", "SKU™ 12345", "ⓝⓘⓚⓔ cap",
                                    "a niкe shoe", "ɴɪᴋᴇ", "lօgօ"])  # fmt: skip
def test_symbols_glued_to_a_term_and_more_look_alikes_are_screened(prompt: str) -> None:
    assert POLICY.decide(Use(), prompt).outcome == "human_review"


def test_symbols_alone_do_not_hold() -> None:
    assert POLICY.decide(Use(), "a mug ™ with a © notice and a ® mark").outcome == "synthetic_labeled_preview"
