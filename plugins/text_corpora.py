"""Text corpora that need no download: English prose from the Python standard library.

- `prose_sentences()`: sentences of the language reference (`pydoc_data.topics`), for general
  distillation and sentence-embedding checks.
- `docstring_families()`: a labelled task, which part of the standard library a docstring
  comes from (text, files, network, data formats, numbers, concurrency).

Both are deterministic: same Python version, same texts in the same order.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")

# label -> modules whose public docstrings carry it
FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "html", "locale"),
    "files": ("os", "pathlib", "shutil", "glob", "tempfile", "io", "filecmp", "zipfile", "tarfile"),
    "network": ("socket", "http.client", "urllib.request", "email.message", "smtplib", "ftplib"),
    "data": ("json", "csv", "pickle", "sqlite3", "configparser", "plistlib", "xml.dom.minidom"),
    "numbers": ("math", "statistics", "decimal", "fractions", "random", "cmath", "numbers"),
    "concurrency": (
        "threading",
        "multiprocessing",
        "asyncio",
        "queue",
        "subprocess",
        "concurrent.futures",
        "sched",
    ),
}


def prose_paragraphs() -> list[str]:
    """Prose paragraphs of the language reference, code blocks and short lines left out."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = [ln for ln in block.splitlines() if ln.strip()]
            if not lines or any(ln.startswith(("   ", ">>>", "...")) for ln in lines):
                continue  # indented: code, grammar or a table
            text = " ".join(ln.strip() for ln in lines)
            if len(text) >= 60 and not set(text) <= set("=*-+| "):
                out.append(text)
    return out


def prose_sentences(min_chars: int = 30, max_chars: int = 300) -> list[str]:
    seen: dict[str, None] = {}
    for paragraph in prose_paragraphs():
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = sentence.strip()
            if min_chars <= len(sentence) <= max_chars:
                seen.setdefault(sentence, None)
    return list(seen)


def docstring_families(min_chars: int = 40) -> list[tuple[str, str]]:
    """(docstring's first paragraph, family) for public functions, classes and methods."""
    found: dict[str, str] = {}
    for family, modules in FAMILIES.items():
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # a Python built without that module
                continue
            for text in _docstrings(module):
                first = " ".join(text.split("\n\n")[0].split())
                if len(first) >= min_chars and first not in found:
                    found[first] = family
    return sorted(found.items())


def _docstrings(module: object) -> Iterator[str]:
    doc = inspect.getdoc(module)
    if doc:
        yield doc
    for name, value in sorted(vars(module).items()):
        owner = str(getattr(value, "__module__", None))
        if name.startswith("_") or not owner.startswith(module.__name__):  # type: ignore[attr-defined]
            continue  # private, or imported from elsewhere
        if inspect.isclass(value):
            for member_name, member in sorted(vars(value).items()):
                doc = inspect.getdoc(member) if not member_name.startswith("_") else None
                if doc:
                    yield doc
        doc = inspect.getdoc(value) if callable(value) else None
        if doc:
            yield doc
