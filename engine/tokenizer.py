"""Tokenizer loading (transformers), with a clear answer for model directories that have none."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(path: str | Path):
    """The model's tokenizer, or None when the directory has no tokenizer files (token-id prompts
    only)."""
    if not has_tokenizer(path):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
