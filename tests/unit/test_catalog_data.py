"""The procedural catalog generator of the default model's recipe."""

from __future__ import annotations

import hashlib

import numpy as np

from models.recipes import data


def test_same_seed_same_sample_and_different_indices_differ() -> None:
    a, b = data.sample("train", 0, 7), data.sample("train", 0, 7)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    c = data.sample("train", 0, 8)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (128, 128, 3) and a.image.dtype == np.uint8
    assert not np.array_equal(a.image, data.sample("train", 1, 7).image)  # the seed matters


def test_held_out_combinations_never_reach_training() -> None:
    triples = {(s.obj, s.colour, s.background) for s in (data.sample("train", 0, i) for i in range(400))}
    assert not triples & data.HELD_OUT
    assert len({t[0] for t in triples}) == len(data.OBJECT_NAMES)  # every object is still seen
    held = data.sample("heldout", 0, 3)
    assert (held.obj, held.colour, held.background) in data.HELD_OUT


def test_vocabulary_and_captions() -> None:
    assert len(data.OBJECTS) >= 8 and len(data.COLOURS) >= 10 and len(data.BACKGROUNDS) >= 5
    s = data.sample("train", 0, 11)
    assert any(name in s.caption for name in data.OBJECTS[s.obj])
    assert any(name in s.caption for name in data.COLOURS[s.colour][1])


def test_eval_prompts_are_fixed_and_cover_held_out_combinations_and_paraphrases() -> None:
    prompts = data.eval_prompts()
    assert prompts == data.eval_prompts() and len(prompts) >= 200
    assert {p.subset for p in prompts} == {"held_out_combination", "held_out_paraphrase", "paraphrase"}
    assert {(p.obj, p.colour, p.background) for p in prompts if p.subset != "paraphrase"} == set(data.HELD_OUT)
    train_captions = {data.sample("train", 0, i).caption for i in range(300)}
    assert not train_captions & {p.prompt for p in prompts if p.subset != "held_out_combination"}


def test_eval_set_is_the_one_the_model_card_was_measured_on() -> None:
    """Adding training templates or vocabulary must not silently change the evaluation prompts."""
    lines = "\n".join(f"{p.prompt}|{p.obj}|{p.colour}|{p.background}|{p.subset}" for p in data.eval_prompts())
    assert hashlib.sha256(lines.encode()).hexdigest() == (
        "a8750f105502d08849498e6cd4531f8133103cc0036dc8b0eacf998e2f3780c5"
    )
    assert not set(data.EVAL_TEMPLATES) & set(data.TRAIN_TEMPLATES)
    assert set(data.EVAL_SEEN_TEMPLATES) <= set(data.TRAIN_TEMPLATES)
