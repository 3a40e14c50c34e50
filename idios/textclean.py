"""Text clean-up applied before tokenizing, as the model's own tokenizer did at training time."""

from __future__ import annotations

import html
from collections.abc import Callable

import ftfy


def clip_clean(text: str) -> str:
    """open_clip's SimpleTokenizer clean-up: ftfy, HTML entities (twice), collapsed whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def identity(text: str) -> str:
    """No clean-up: the tokenizer.json's own normalizer does all there is to do."""
    return text


CLEANERS: dict[str, Callable[[str], str]] = {"none": identity, "clip": clip_clean}
