"""Longer training text for `recipes/minilm-general.yaml` (issue #15): does a student that also reads passages
keep closer to the teacher on long held-out texts?

`builtin:general` holds sentences and passages of at most 300 characters (`potstill.data.general.MAX_CHARS`), so
no training text is as long as the suite's newsgroup bodies, the source with the lowest cosine to the teacher.
This script packs consecutive sentences of the same sources into passages of --min-chars to --max-chars: the
paragraphs of the Wikipedia dump, the Lee background documents and the BBC *train* articles, each split by
`split_sentences`; a sentence that holds wiki markup or is a suite text (`suite_exclusions`) ends the passage
being packed and is dropped. It then writes a JSONL file of `text` and `source` records: the first --limit
`builtin:general` train texts with a --share of them replaced by passages (seeded shuffle), for `data.train`.

Usage: python benchmarks/general_passages.py --out runs/general-passages.jsonl [--limit 19200] [--share 0.25]
       potstill run recipes/minilm-general.yaml --set 'data.train={path: runs/general-passages.jsonl}' ...
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def pack(sentences: list[str], *, min_chars: int, max_chars: int, excluded: set[str]) -> list[str]:
    """Consecutive sentences joined into passages of min_chars..max_chars; an excluded or markup sentence (or
    one longer than max_chars) closes the passage in progress and is dropped."""
    from potstill.data.general import has_markup, normalise

    out: list[str] = []
    current = ""
    for sentence in sentences:
        if has_markup(sentence) or normalise(sentence) in excluded or len(sentence) > max_chars:
            if len(current) >= min_chars:
                out.append(current)
            current = ""
            continue
        joined = f"{current} {sentence}".strip()
        if len(joined) <= max_chars:
            current = joined
            continue
        if len(current) >= min_chars:
            out.append(current)
        current = sentence
    if len(current) >= min_chars:
        out.append(current)
    return out


def source_paragraphs() -> dict[str, list[str]]:
    """Paragraphs per source, before any splitting: Wikipedia, Lee background documents, BBC train articles."""
    from potstill.data.general import lee_background, wiki_paragraphs
    from potstill.data.loaders import builtin_records

    return {"wikipedia": wiki_paragraphs(), "lee-background": lee_background(),
            "bbc": [r["text"] for r in builtin_records("bbc", "train")]}


def main(argv: list[str] | None = None) -> int:
    from potstill.data.general import split_sentences, suite_exclusions
    from potstill.data.loaders import builtin_records

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=19200, help="texts in all")
    parser.add_argument("--share", type=float, default=0.25, help="the share of them that are passages")
    parser.add_argument("--min-chars", type=int, default=300)
    parser.add_argument("--max-chars", type=int, default=900)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    excluded = suite_exclusions()
    passages = [{"text": text, "source": f"{name}-passage"}
                for name, paragraphs in source_paragraphs().items() for paragraph in paragraphs
                for text in pack(split_sentences(paragraph), min_chars=args.min_chars, max_chars=args.max_chars,
                                 excluded=excluded)]
    random.Random(args.seed).shuffle(passages)
    wanted = round(args.limit * args.share)
    if wanted > len(passages):
        parser.error(f"--share {args.share} of --limit {args.limit} asks for {wanted} passages; "
                     f"there are {len(passages)}")
    general = [{"text": r["text"], "source": r["source"]}
               for r in builtin_records("general", "train")[:args.limit - wanted]]
    records = general + passages[:wanted]
    random.Random(args.seed).shuffle(records)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{args.out}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(args.out)
    print(f"{args.out}: {len(records):,} texts, {wanted:,} passages of {len(passages):,}; "
          + ", ".join(f"{k} {v}" for k, v in Counter(r["source"] for r in records).most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
