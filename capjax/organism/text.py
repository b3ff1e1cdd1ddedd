"""The organism's plain text: WikiText-2, split by article into a training part and a held-out part.

The shared data folder holds only WikiText-2's raw test split (`capjax.data.load_wikitext2_text`),
so the organism trains on its first articles and its perplexity is measured on the last
`heldout_articles` ones, which training never sees. Articles start at a top-level heading
(" = Title = ").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_ARTICLE = re.compile(r"\n\n(?= = [^=])")


def wikitext_file(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The WikiText-2 file in the data folder, or None when it is absent (no download is tried)."""
    from capjax.data.sources import WIKITEXT2_FILE, resolve_data_dir

    root = resolve_data_dir(data_dir)
    return root / WIKITEXT2_FILE if root is not None and (root / WIKITEXT2_FILE).is_file() else None


def wikitext_parts(data_dir: str | os.PathLike | None = None, heldout_articles: int = 8) -> tuple[str, str] | None:
    """(training text, held-out text), or None when the WikiText-2 file is absent."""
    from capjax.data import load_wikitext2_text

    if wikitext_file(data_dir) is None:
        return None
    articles = _ARTICLE.split(load_wikitext2_text(data_dir))
    if not 0 < heldout_articles < len(articles):
        raise ValueError(
            f"text.heldout_articles={heldout_articles}: need 1 .. {len(articles) - 1} "
            f"(WikiText-2 has {len(articles)} articles here)"
        )
    return "\n\n".join(articles[:-heldout_articles]), "\n\n".join(articles[-heldout_articles:])
