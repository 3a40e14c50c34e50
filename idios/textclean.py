"""Text clean-up applied before tokenizing, as the model's own tokenizer did at training time.

The names are open_clip's (`tokenizer_kwargs.clean` in a model's config): `lower` (its SimpleTokenizer's, here
also called `clip`), `whitespace` (its Hugging Face tokenizers' default) and `canonicalize` (SigLIP's). `none`
leaves the text to the tokenizer.json's own normalizer (M-CLIP's text towers were trained that way)."""

from __future__ import annotations

import html
import string
from collections.abc import Callable

import ftfy

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def basic_clean(text: str) -> str:
    """ftfy, then HTML entities (twice), then stripped: the first step of every open_clip clean-up."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clip_clean(text: str) -> str:
    """open_clip's `lower`: basic clean-up, collapsed whitespace, lower case."""
    return " ".join(basic_clean(text).split()).lower()


def whitespace_clean(text: str) -> str:
    """open_clip's `whitespace`: basic clean-up and collapsed whitespace, case kept."""
    return " ".join(basic_clean(text).split())


def canonicalize(text: str) -> str:
    """open_clip's `canonicalize`: basic clean-up, `_` as a space, no punctuation, lower case, collapsed spaces."""
    text = basic_clean(text).replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split())


def identity(text: str) -> str:
    """No clean-up: the tokenizer.json's own normalizer does all there is to do."""
    return text


CLEANERS: dict[str, Callable[[str], str]] = {
    "none": identity, "clip": clip_clean, "lower": clip_clean, "whitespace": whitespace_clean,
    "canonicalize": canonicalize,
}
