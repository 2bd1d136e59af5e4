"""A top-k teacher cache for cross-tokenizer runs (potstill.tasks.cross_tokenizer, potstill.teachers.capture):
one row per aligned span, read back as the teacher's span signal; with k = V_t it equals the live teacher's,
with a small k its top entries do and the tail is spread evenly; caches of other data or settings are refused."""

from __future__ import annotations

import pytest
import torch
from test_causal_lm import setup_task
from test_cross_tokenizer import _task

from potstill.errors import UserError
from potstill.losses.first_token_kl import first_token_kl
from potstill.losses.sparse import TopKTeacher
from potstill.losses.uld import gold, uld
from potstill.losses.uld_topk import spread_tail
from potstill.tasks import build_task
from potstill.teachers.capture import capture_teacher_topk
from potstill.train import run_recipe


def _cached_task(tmp_path, k, objectives=({"name": "gold"},), temperature=1.0, **kw):
    """The cross-tokenizer task of test_cross_tokenizer with a cache of its teacher's span rows at k."""
    r, teacher_tok, student_tok = _task(tmp_path, list(objectives), **kw)
    cache = tmp_path / f"cache-k{k}"
    writer = build_task(r, run_dir=r.run_dir)
    writer.setup(capture=True)
    capture_teacher_topk(writer, cache, k=k, temperature=temperature, batch_size=2)
    r = r.model_copy(update={"teacher": r.teacher.model_copy(update={"cache": str(cache)})})
    return r, writer, setup_task(r), teacher_tok


def _signals(task, live, indices):
    batch = task.to_device(task.collate([task.train_records[i] for i in indices], indices))
    return batch, task.teacher_signal(batch), live.cross.teacher_signal(live.teacher, batch)


def _dense(signal) -> torch.Tensor:
    """The cached teacher's span rows as full log-probs (the tail spread evenly), without the span's factor."""
    top = signal.logits
    assert isinstance(top, TopKTeacher) and signal.vocab is not None
    return spread_tail(top.ids, top.logprobs, top.tail(), signal.vocab)


def _vocab(tmp_path) -> int:
    from test_causal_lm import make_tokenizer

    return len(make_tokenizer(chat=False))


def test_a_full_width_cache_gives_the_live_teachers_span_signal_and_losses(tmp_path):
    r, live, task, teacher_tok = _cached_task(tmp_path, k=_vocab(tmp_path),
                                              objectives=({"name": "gold"}, {"name": "first_token_kl"}))
    vocab = len(teacher_tok)
    assert task.topk_cache is not None and task.topk_cache.num_records == len(task.train_records)
    batch, cached, direct = _signals(task, live, [2, 0, 1])
    assert cached.logits.shape == (task.count_rows(batch),) and cached.vocab == vocab
    # float16 storage: log-probs to a relative 1e-3
    torch.testing.assert_close(_dense(cached), torch.log_softmax(direct.logits.float(), -1), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(cached.log_scale, direct.log_scale, atol=5e-3, rtol=0)
    student = task.student_signal(task.student, batch)
    from potstill.train.objective import Objective

    for loss in (uld, gold):
        args = {"matched_ids": direct.matched_ids} if loss is gold else {}
        want = loss(student.logits, direct.logits, student_log_scale=student.log_scale,
                    teacher_log_scale=direct.log_scale, reduction="sum", **args)
        got = Objective.from_name(loss.__name__)(student, cached, None)  # the objective takes the top-k form
        assert got.item() == pytest.approx(want.item(), rel=2e-3)
    want = first_token_kl(student.logits, direct.logits, first_token_of=direct.first_token_of, reduction="sum")
    got = Objective.from_name("first_token_kl")(student, cached, None)
    assert cached.first_token_of is direct.first_token_of or torch.equal(cached.first_token_of, direct.first_token_of)
    assert got.item() == pytest.approx(want.item(), rel=2e-3)


def test_a_top_k_cache_keeps_each_spans_top_entries_and_its_mass(tmp_path):
    r, live, task, _ = _cached_task(tmp_path, k=4, temperature=2.0,
                                    objectives=[{"name": "uld", "params": {"temperature": 2.0}}])
    batch, cached, direct = _signals(task, live, [0, 1])
    true = torch.log_softmax(direct.logits.float() / 2.0, -1) + direct.log_scale[:, None]
    got = _dense(cached) + cached.log_scale[:, None]
    top = true.topk(4, -1)
    torch.testing.assert_close(got.gather(1, top.indices), top.values, atol=1e-2, rtol=0)
    # the rest of each span's mass is shared evenly by the other ids, and the total mass is the span's
    rest = got.exp().scatter(1, top.indices, 0.0)
    others = rest[rest > 0].reshape(len(rest), -1)
    torch.testing.assert_close(others.min(1).values, others.max(1).values)
    torch.testing.assert_close(got.exp().sum(1), true.exp().sum(1), atol=1e-3, rtol=1e-2)


def test_caches_of_other_settings_are_refused(tmp_path):
    r, _, _, _ = _cached_task(tmp_path, k=4)
    other_t = r.model_copy(update={"objectives": [type(r.objectives[0])(name="gold",
                                                                        params={"teacher_temperature": 2.0})]})
    with pytest.raises(UserError, match="teacher_temperature.*temperature 1"):
        setup_task(other_t)
    fewer = r.model_copy(update={"data": r.data.model_copy(update={"max_length": 12})})
    with pytest.raises(UserError, match="does not match this run.*alignment_sha256"):
        setup_task(fewer)
    own = {"tokenizer": None, "init": "layers_from_teacher", "layers": [0], "config": {}}
    shared = r.model_copy(update={"student": r.student.model_copy(update=own)})
    with pytest.raises(UserError, match="does not match this run"):
        setup_task(shared)


def test_a_run_from_the_cache_trains_without_running_the_teacher(tmp_path, monkeypatch):
    r, _, _, _ = _cached_task(tmp_path, k=8, objectives=[{"name": "uld"}, {"name": "gold", "weight": 0.5}])
    r = r.model_copy(update={"trainer": r.trainer.model_copy(update={"max_steps": 8, "lr": 1e-2,
                                                                    "hard_label_weight": 0.1})})
    from potstill.tasks.cross_tokenizer import CrossTokenizer

    read, live = [], []
    cached_signal, live_signal = CrossTokenizer._cached_signal, CrossTokenizer.teacher_signal
    monkeypatch.setattr(CrossTokenizer, "_cached_signal", lambda self, *a: read.append(1) or cached_signal(self, *a))
    monkeypatch.setattr(CrossTokenizer, "teacher_signal",
                        lambda self, teacher, batch, cache=None: live.append(cache is None) or live_signal(
                            self, teacher, batch, cache))
    summary = run_recipe(r)
    _, before, after = summary["table"]
    assert summary["steps"] == 8 and len(read) == 8 and not any(live)
    assert after["bits_per_byte"] < before["bits_per_byte"]


def test_the_cache_command_on_a_cross_tokenizer_recipe_writes_what_its_run_reads(tmp_path, capsys):
    import json

    import yaml

    from potstill.cli import main

    r, _, _ = _task(tmp_path, [{"name": "gold"}])
    raw = r.model_dump(mode="json", exclude_none=True)
    raw["trainer"]["max_steps"] = 3
    path = tmp_path / "cross.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["cache", str(path), "--k", "4", "--out", str(tmp_path / "cli-cache")]) == 0
    from test_causal_lm import SENTENCES

    manifest = json.loads((tmp_path / "cli-cache" / "manifest.json").read_text())
    assert manifest["num_records"] == len(SENTENCES) and manifest["k"] == 4
    assert manifest["meta"]["rows"] == "aligned spans" and "alignment_sha256" in manifest["meta"]
    raw["teacher"]["cache"] = str(tmp_path / "cli-cache")
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 0
    # a cache of other alignments (a shorter max_length cuts the spans) is refused in one line, exit code 2
    capsys.readouterr()
    assert main(["run", str(path), "--set", "data.max_length=12", "--overwrite"]) == 2
    assert "alignment_sha256" in capsys.readouterr().err
