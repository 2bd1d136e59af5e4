"""UniversalNER's conversation builder: targeted distillation of open-type entity extraction into a chat student.

Paper: Zhou et al., ICLR 2024, "UniversalNER: Targeted Distillation from Large Language Models for Open Named
Entity Recognition".

A teacher annotates unlabeled passages with (mention, type) pairs of free-form types. Each passage becomes one
multi-turn conversation (the paper's `ie_as_qa` layout):

    user:      Text: <passage>
    assistant: I've read this text.
    user:      What describes <type> in the text?      (one turn per type)
    assistant: ["mention 1", "mention 2"]               (a JSON list, mentions in order of first appearance)

Every type the teacher found in the passage gets a turn; `negatives` types it did not find are added with the answer
`[]`, drawn without replacement with probability ∝ their frequency over all passages' annotations (frequent types
are asked about most, as the paper samples them); the turns of a passage are shuffled. The student is fine-tuned on
these records (`data.format: messages`) with the loss on the assistant turns only: `potstill.data.lm_records`
renders the chat template and leaves every other token's target at -100. The paper's defaults (LLaMA-7B, 3 epochs,
lr 2e-5, cosine, 4 % warm-up, max length 1024) are for its scale; the recipe here says what it uses.

The teacher's answer is parsed by `parse_teacher_entities`: a JSON list of [mention, type] pairs (or
{"entity", "type"} objects), the format the paper prompts for; anything else is a `UserError` naming the passage.
`parse_answer` reads a student's answer to one question (a JSON list of strings; unreadable → no mentions);
`mentions_in_passage` keeps the ones that occur in the passage (`potstill.data.extractive_decoding` constrains the
decoding instead, so that only such mentions can be written).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any

from potstill.errors import UserError

QUESTION = "What describes {type} in the text?"
ACKNOWLEDGEMENT = "I've read this text."
Entities = dict[str, list[str]]


def text_turn(passage: str) -> str:
    return f"Text: {passage}"


def question_turn(entity_type: str) -> str:
    return QUESTION.format(type=entity_type)


def type_frequencies(annotations: Sequence[Mapping[str, Sequence[str]]]) -> Counter[str]:
    """In how many passages each type has at least one mention."""
    return Counter(t for entities in annotations for t, mentions in entities.items() if mentions)


def sample_negative_types(present: set[str], frequencies: Mapping[str, int], k: int, rng: random.Random) -> list[str]:
    """Up to `k` types not in `present`, without replacement, each draw ∝ the type's frequency."""
    pool = {t: n for t, n in frequencies.items() if t not in present and n > 0}
    chosen: list[str] = []
    while pool and len(chosen) < k:
        types = sorted(pool)
        pick = rng.choices(types, weights=[pool[t] for t in types])[0]
        chosen.append(pick)
        del pool[pick]
    return chosen


def conversation(passage: str, entities: Mapping[str, Sequence[str]], negative_types: Sequence[str],
                 rng: random.Random) -> dict[str, Any]:
    """One record `{"messages": [...]}`: the text turn, its acknowledgement, then one question per type (the
    passage's types with their mentions, `negative_types` with []), in a shuffled order."""
    answers = [(t, unique(m)) for t, m in entities.items() if m] + [(t, []) for t in negative_types]
    rng.shuffle(answers)
    messages = [{"role": "user", "content": text_turn(passage)}, {"role": "assistant", "content": ACKNOWLEDGEMENT}]
    for entity_type, mentions in answers:
        messages.append({"role": "user", "content": question_turn(entity_type)})
        messages.append({"role": "assistant", "content": json.dumps(mentions, ensure_ascii=False)})
    return {"messages": messages}


def universal_ner_conversations(passages: Sequence[str], annotations: Sequence[Mapping[str, Sequence[str]]], *,
                                negatives: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """One conversation per passage (`conversation`), negatives sampled by the types' frequency over
    `annotations`; seeded, so the same inputs give the same records."""
    if len(passages) != len(annotations):
        raise UserError(f"universal_ner: {len(passages)} passages but {len(annotations)} annotations; give one "
                        f"annotation ({{type: [mentions]}}) per passage")
    frequencies = type_frequencies(annotations)
    rng = random.Random(seed)
    records = []
    for passage, entities in zip(passages, annotations, strict=True):
        present = {t for t, m in entities.items() if m}
        records.append(conversation(passage, entities, sample_negative_types(present, frequencies, negatives, rng),
                                    rng))
    return records


# applied in this order: digit runs, all-caps words, lower-case words, then capitalised words (also inside a word)
FORM_RULES = ((re.compile(r"\d+"), "0"), (re.compile(r"\b[A-Z]+\b"), "A"), (re.compile(r"\b[a-z]+\b"), "a"),
              (re.compile(r"[A-Z][a-z]+"), "Aa"))


def mention_form(mention: str) -> str:
    """A mention's surface form: digit runs → "0", capitalised words → "Aa", all-caps words → "A", lower-case
    words → "a", other characters kept ("19 per cent" → "0 a a", "19%" → "0%", "Sept. 11" → "Aa. 0")."""
    for pattern, replacement in FORM_RULES:
        mention = pattern.sub(replacement, mention)
    return mention


PassageTree = dict[str, "PassageTree"] | list[int]
Rotation = deque[tuple[str, "Rotation"]] | list[int]


def _passages_in(tree: PassageTree) -> set[int]:
    return set(tree) if isinstance(tree, list) else set().union(*map(_passages_in, tree.values()))


def _rotation(tree: PassageTree) -> Rotation:
    """A tree's branches as a queue, the branch with the fewest passages first (ties by name)."""
    if isinstance(tree, list):
        return tree
    return deque((key, _rotation(branch)) for key, branch in
                 sorted(tree.items(), key=lambda kv: (len(_passages_in(kv[1])), kv[0])))


def _next_passage(rotation: Rotation, chosen: set[int]) -> int | None:
    """The next passage not chosen yet, taken from the front branch, which then goes to the back; a branch with
    none left is dropped. None when every branch is used up."""
    if isinstance(rotation, list):
        return next((k for k in rotation if k not in chosen), None)
    while rotation:
        key, branch = rotation.popleft()
        pick = _next_passage(branch, chosen)
        if pick is not None:
            rotation.append((key, branch))
            return pick
    return None


def select_passages_by_type(annotations: Sequence[Mapping[str, Sequence[str]]], n: int, *,
                            empty_share: float = 0.2, seed: int = 0, forms: bool = False,
                            mentions: bool = False) -> list[int]:
    """Indices of `n` passages of a labelled pool, chosen so that rare types are seen as often as common ones.

    Not in the paper (it annotates random passages at a scale where every type recurs): at small scale most
    passages of a random sample hold no mention and the rare types a handful, so the student learns to answer
    [] for them. Here the types take turns, rarest first: each turn picks the next passage (in a seeded shuffle)
    that holds that type and is not chosen yet, until `n` minus the empty share is reached or every type's
    passages are used up; then passages without any mention fill the rest (about `empty_share` of `n`, so the
    student still sees texts with nothing to extract). With `forms`, a type's turns go in turn to its mentions'
    surface forms (`mention_form`), rarest first, so that "19 per cent" is seen beside the common "19%". With
    `mentions`, the turns of a type (or of a form) go in turn to its distinct mention strings, rarest first, so
    that a name the pool holds four times ("Zimbabwe") is seen beside "US": the student of a teacher with a
    closed list of names can only learn the names it is shown. Returned in pool order; fewer than `n` when the
    pool is short of passages."""
    if not 0.0 <= empty_share <= 1.0:
        raise UserError(f"universal_ner: empty_share is {empty_share}; expected a fraction in [0, 1]")
    rng = random.Random(seed)
    order = list(range(len(annotations)))
    rng.shuffle(order)
    trees: dict[str, Any] = {}
    empty: list[int] = []
    for k in order:
        present = {t: m for t, m in annotations[k].items() if m}
        for t, found in present.items():
            for m in dict.fromkeys(found):
                path = [mention_form(m)] * forms + [m] * mentions
                node = trees.setdefault(t, {} if path else [])
                for depth, key in enumerate(path):
                    node = node.setdefault(key, {} if depth < len(path) - 1 else [])
                if not node or node[-1] != k:
                    node.append(k)
        if not present:
            empty.append(k)
    frequencies = type_frequencies(annotations)
    rotations = {t: _rotation(trees[t]) for t in sorted(trees, key=lambda t: (frequencies[t], t))}
    chosen: set[int] = set()
    rich = n - round(n * empty_share)
    while rotations and len(chosen) < rich:
        for t in list(rotations):
            pick = _next_passage(rotations[t], chosen)
            if pick is None:
                del rotations[t]
            elif len(chosen) < rich:
                chosen.add(pick)
    chosen.update(empty[:n - len(chosen)])
    return sorted(chosen)


def query_messages(passage: str, entity_type: str) -> list[dict[str, str]]:
    """The prompt asking a trained student for one type's mentions (the answer follows the generation prompt)."""
    return [{"role": "user", "content": text_turn(passage)}, {"role": "assistant", "content": ACKNOWLEDGEMENT},
            {"role": "user", "content": question_turn(entity_type)}]


def unique(mentions: Sequence[str]) -> list[str]:
    """Mentions without repeats, in order of first appearance."""
    return list(dict.fromkeys(m for m in mentions if m))


def parse_teacher_entities(text: str, *, where: str) -> Entities:
    """The teacher's JSON list of [mention, type] pairs (or {"entity": ..., "type": ...} objects) as
    {type: [mentions]}; a `UserError` naming `where` when it is not one."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: the teacher's answer is not JSON ({exc.msg} at character {exc.pos}); expected a "
                        f"list of [mention, type] pairs") from None
    if not isinstance(items, list):
        raise UserError(f"{where}: the teacher's answer is a JSON {type(items).__name__}; expected a list of "
                        f"[mention, type] pairs")
    out: Entities = {}
    for k, item in enumerate(items):
        if isinstance(item, dict) and {"entity", "type"} <= set(item):
            mention, entity_type = item["entity"], item["type"]
        elif isinstance(item, list) and len(item) == 2:
            mention, entity_type = item
        else:
            raise UserError(f"{where}: item {k} of the teacher's answer is {json.dumps(item)[:60]}; expected "
                            f"[mention, type] or {{\"entity\": ..., \"type\": ...}}")
        if not isinstance(mention, str) or not isinstance(entity_type, str) or not mention or not entity_type:
            raise UserError(f"{where}: item {k} of the teacher's answer needs a non-empty mention and type (strings)")
        out.setdefault(entity_type.strip().lower(), []).append(mention.strip())
    return {t: unique(m) for t, m in out.items()}


def mentions_in_passage(mentions: Sequence[str], passage: str) -> list[str]:
    """The mentions that occur verbatim in `passage`: extractive decoding's constraint applied after generation
    (not in the paper, which scores the raw answers). It drops invented or rewritten spans ("19%" for "19 per
    cent") and can drop no correct one when the reference mentions are spans of the text."""
    return [m for m in mentions if m in passage]


def parse_answer(text: str) -> list[str]:
    """A student's answer to one question: the first JSON list of strings in `text`; [] when there is none."""
    start = text.find("[")
    while start != -1:
        end = text.find("]", start)
        while end != -1:
            try:
                value = json.loads(text[start:end + 1])
            except json.JSONDecodeError:
                end = text.find("]", end + 1)
                continue
            if isinstance(value, list):
                return unique([str(v) for v in value if isinstance(v, (str, int, float))])
            break
        start = text.find("[", start + 1)
    return []
