"""Causal language modelling: teacher and student predict the next token; the signals are logits `[B, T, V]`.

This adapter wires the language-model pieces into the loop; each method lives in its own module:

- records → token sequences (`text`, `prompt_completion`, chat `messages`; loss masks, packing, add_eos):
  `potstill.data.lm_records`. `train_records[i]` is example i, ``{"input_ids": [...], "targets": [...]}``
  where ``targets[j]`` is the token to predict at position j or -100; the rows of example i are its
  positions j with ``targets[j] != -100``, ascending. Without packing example i is data record i.
- distilling step-by-step (label and rationale views, α-mixed loss): `potstill.data.step_by_step`;
- sequence-level KD (the teacher's completions, generated once): `potstill.teachers.seq_kd`;
- on-policy distillation (GKD's λ, the student's own samples): `potstill.data.on_policy`; MGSR's correction and
  re-generation of those samples (`mgsr.scrg`): `potstill.data.mgsr_scrg`;
- preference distillation (`data.format: preference`, DPO with the teacher as reference): pairs in
  `potstill.data.preference`, their batches and objectives in `potstill.tasks.preference`;
- BiAlign on in-context-learning records (`data.format: icl`, M demonstration sets per query): the records in
  `potstill.data.icl_demos`, their batches, signals, objectives and metrics in `potstill.tasks.causal_lm_icl`;
- a mixture-of-experts student and its router auxiliary loss (`moe_router_aux`): `potstill.tasks.moe`;
- the top-k teacher cache (`teacher.cache`, written by `potstill cache`): `potstill.teachers.capture`;
- tokenizer, student, forward and fused lm_head: `potstill.tasks.lm_models`;
- a student with its own tokenizer (cross-tokenizer uld / gold on aligned spans): `potstill.tasks.cross_tokenizer`;
- metrics (perplexity, token_accuracy, token_agreement, kl_to_teacher, label_accuracy): `potstill.eval.lm`.

A black-box step-by-step run needs no teacher model: without objectives the recipe may leave teacher.path out
and take the tokenizer from teacher.tokenizer (or a pretrained student's folder); `student.init: from_config`
then builds `student.config.model_type` from scratch.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.config import DataSource
from potstill.data.lm_records import FORMAT_FIELDS, LMRecordEncoder, infer_format, prompt_of, with_completion
from potstill.data.on_policy import on_policy_batch
from potstill.data.preference import pair_rows, preference_examples
from potstill.data.sampling import sampling_settings
from potstill.data.step_by_step import (
    causal_lm_views,
    count_label_tokens,
    required_columns,
    step_by_step_loss,
    step_by_step_rows,
)
from potstill.errors import UserError
from potstill.eval.lm import causal_label_accuracy, length_batches, token_metrics, token_stats
from potstill.losses.fused import LMHeadInputs
from potstill.students.pruning import Calibration, record_text
from potstill.tasks.base import Task
from potstill.tasks.causal_lm_icl import (
    ICL_FIELDS,
    DemoSetLogits,
    adapt_icl_objective,
    check_icl_objectives,
    check_icl_recipe,
    flat_rows,
    icl_examples,
    icl_lengths,
    icl_metrics,
    icl_rows,
    is_icl_record,
    teacher_demo_sets,
)
from potstill.tasks.lm_models import (
    build_text_student,
    causal_logits,
    check_fused_head,
    check_vocab,
    fused_chunk_size,
    lm_head_inputs,
    pad_id_of,
    resolve_builtin_paths,
    text_tokenizer,
    token_ce_sum,
)
from potstill.tasks.models import load_factory_teacher, load_hf_teacher
from potstill.tasks.moe import check_router_student, router_objective_params, router_signals, teacher_signals
from potstill.tasks.preference import (
    PairLogits,
    adapt_preference_objective,
    check_preference_objectives,
    check_preference_recipe,
    chosen_ce_sum,
)


class CausalLMTask(Task):
    export_kind = "token_logits"
    signal_kind = "logits"
    extra_objective_kinds = ("preference", "router", "demo_sets")
    name = "causal_lm"
    metric_names = ("perplexity", "token_accuracy", "token_agreement", "kl_to_teacher", "label_accuracy",
                    "rationale_perplexity", "bits_per_byte", "answer_accuracy", "demo_set_tau")
    cross: Any = None  # the cross-tokenizer set-up (`potstill.tasks.cross_tokenizer`), when tokenizers differ
    router_aux = False  # an MoE student whose router logits an objective reads (`potstill.tasks.moe`)

    # ------------------------------------------------------------------ set-up
    def setup(self, *, is_main: bool = True, barrier=lambda: None, capture: bool = False) -> None:
        """Load models and data. `capture=True` is `potstill cache` writing `teacher.cache` (not reading it)."""
        from transformers import AutoModelForCausalLM

        r = self.recipe
        resolve_builtin_paths(r, is_main=is_main, barrier=barrier)
        if r.teacher.path is not None:
            # with teacher.tokenizer the teacher's folder may hold only config + weights
            self.teacher, self.tokenizer = load_hf_teacher(r.teacher.path, AutoModelForCausalLM,
                                                           tokenizer=not r.teacher.tokenizer)
        elif r.teacher.factory is not None:
            self.teacher, self.tokenizer = load_factory_teacher(r.teacher), None
        else:  # black-box methods (step-by-step): the teacher's text is the data
            self.teacher, self.tokenizer = None, None
        self.tokenizer = text_tokenizer(r, self.tokenizer, task=self.name)
        if self.teacher is not None:
            self.teacher.to(self.device)
        from potstill.data.cross_tokenizer import record_texts
        from potstill.tasks.cross_tokenizer import cross_tokenizer_for

        self.cross = cross_tokenizer_for(r, self.tokenizer, self.device, run_dir=self.run_dir,  # None: shared
                                         train_texts=lambda: record_texts(self.load(r.data.train)))
        tokenizers = {"teacher": self.tokenizer, "student": self.tokenizer}
        if self.cross is not None:
            self.tokenizer = tokenizers["student"] = self.cross.student_tokenizer
            self.student = self.cross.build_student(self.teacher, AutoModelForCausalLM)
        else:
            self.student = build_text_student(r, self.teacher, self.tokenizer, AutoModelForCausalLM,
                                              calibration=self._calibration())
        self.router_aux = bool(router_objective_params(r))
        if self.router_aux:
            check_router_student(r, self.student)
        self.vocab_size, self.pad_id = len(self.tokenizer), pad_id_of(self.tokenizer)
        for model, role in ((self.teacher, "teacher"), (self.student, "student")):
            if model is not None:
                check_vocab(model, role, tokenizer=tokenizers[role], pad_id=pad_id_of(tokenizers[role]),
                            raw_logits=self._raw_logits)
        if r.trainer.fused_lm_head:
            check_fused_head(self.student, self.vocab_size, self._raw_logits)
        self.encoder = LMRecordEncoder(self.tokenizer, max_length=r.data.max_length, add_eos=r.data.add_eos)
        self.train_records = self._examples(r.data.train, "data.train", is_main=is_main)
        self.eval_records = self._examples(r.data.eval, "data.eval", is_main=is_main) if r.data.eval else []
        gen = r.generation
        if (gen.lmbda or gen.seq_kd) and (r.data.packing or self.train_format == "text"):
            raise UserError("generation.lmbda and generation.seq_kd sample completions after each record's prompt: "
                            "they need prompt/completion or messages records, without data.packing")
        cache = None
        check_preference_objectives(r.objectives, pairs=self.train_format == "preference")
        if self.train_format == "preference":
            check_preference_recipe(r)
        check_icl_objectives(r.objectives, icl=self.train_format == "icl")
        if self.train_format == "icl":
            check_icl_recipe(r)
        if r.teacher.cache and not capture:
            from potstill.teachers.cache import TopKCache

            cache = TopKCache(r.teacher.cache)
        self.seq_kd_file: dict[str, Any] | None = None
        if gen.seq_kd:
            self.train_records = self._seq_kd_examples(cache, is_main=is_main, barrier=barrier, capture=capture)
        self.topk_cache = None
        if cache is not None:
            from potstill.teachers.capture import check_objectives_for_cache, expected_cache_meta

            cache.check_expect(expected_cache_meta(self))
            if self.cross is not None:
                self.cross.check_cache(cache)
            else:
                check_objectives_for_cache(r.objectives, cache)
            self.topk_cache = cache
        rows = flat_rows(self.train_records) if self.train_format == "icl" else self.train_records
        if not any(t != -100 for ex in rows for t in ex["targets"]):
            raise UserError("data.train: no token is counted in any record (prompts longer than data.max_length, "
                            "or no assistant turns); raise data.max_length or check data.format")

    def _calibration(self) -> Calibration:
        """The training texts `student.init: pruned` measures importance on (read only when it is used)."""
        r = self.recipe
        n = r.student.calibration_batches * r.student.calibration_batch_size
        source = r.data.train.model_copy(update={"limit": min(n, r.data.train.limit or n)})
        return Calibration(lambda: [record_text(rec) for rec in self.load(source)], self.tokenizer, "causal_lm",
                           r.data.max_length)

    def _examples(self, source: DataSource, field: str, *, is_main: bool) -> list[dict[str, Any]]:
        r = self.recipe
        if r.step_by_step is not None:  # distilling step-by-step: a label view and a rationale view per record
            records = self.load(source, required=required_columns(r.step_by_step, train=field == "data.train"))
            if field == "data.train":
                self.train_format = "step_by_step"
            return causal_lm_views(records, r.step_by_step, field, self.encoder, is_main=is_main)
        fmt = r.data.format
        if fmt == "auto":
            first = self.load(DataSource(path=source.path, split=source.split, columns=source.columns, limit=1))[0]
            fmt = "icl" if is_icl_record(first) else infer_format(first, field=field)
        for special in ("preference", "icl"):
            if field == "data.eval" and (fmt == special) != (self.train_format == special):
                raise UserError(f"data.eval: its records are {fmt}, data.train's {self.train_format}; {special} "
                                f"records are evaluated on {special} records")
        records = self.load(source, required=ICL_FIELDS if fmt == "icl" else FORMAT_FIELDS[fmt])
        if field == "data.train":
            self.train_format = fmt
        if fmt == "icl":
            return icl_examples(records, r.data.icl, self.tokenizer, seed=r.seed, max_length=r.data.max_length,
                                field=field)
        if self.cross is not None:
            return self.cross.encoder.examples(records, fmt, field)
        if fmt == "preference":
            return preference_examples(records, self.encoder, field, is_main=is_main)
        if r.data.domains is not None:  # one example per record (no packing): domains line up
            self._domain_sources = {**getattr(self, "_domain_sources", {}), field: records}
        return self.encoder.examples(records, fmt, field, packing=r.data.packing, is_main=is_main)

    def _seq_kd_examples(self, cache: Any, *, is_main: bool, barrier, capture: bool) -> list[dict[str, list[int]]]:
        """Training examples whose completions are the teacher's (`potstill.teachers.seq_kd`)."""
        from potstill.teachers.seq_kd import recipe_completions

        prompts = [prompt_of(ex) for ex in self.train_records]
        self.seq_kd_file = recipe_completions(self.recipe, prompts, teacher=self.teacher, tokenizer=self.tokenizer,
                                              pad_id=self.pad_id, cache=cache, run_dir=self.run_dir,
                                              capture=capture, is_main=is_main, barrier=barrier)
        return [with_completion(p, c, self.recipe.data.max_length)
                for p, c in zip(prompts, self.seq_kd_file["completions"], strict=True)]

    def record_lengths(self) -> list[int]:
        if self.train_format == "icl":
            return icl_lengths(self.train_records)
        return [max(len(ex["input_ids"]), len(ex.get("rationale", ex.get("rejected", ex))["input_ids"]))
                for ex in self.train_records]

    def domain_records(self, split: str) -> list[dict]:
        return self._domain_sources["data.train" if split == "train" else "data.eval"]

    # ------------------------------------------------------------------ batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        """Right-padded rows. Step-by-step records with a rationale view give 2B rows: the B label views, then
        the B rationale views in the same order, and `view` [2B] says which (0 label, 1 rationale). Preference
        pairs also give 2B rows: the chosen sequences, then the rejected ones; ICL records B·M rows, each record's
        M demo-set prompts in turn."""
        views = step_by_step_rows(records)
        rows = records if views is None else views[0]
        rows = pair_rows(records) or icl_rows(records) or rows
        width = max(len(ex["input_ids"]) for ex in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, ex in enumerate(rows):
            n = len(ex["input_ids"])
            ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            targets[b, :n] = torch.tensor(ex["targets"], dtype=torch.long)
            mask[b, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "targets": targets, "index": torch.tensor(indices)}
        if views is not None:
            batch["view"] = views[1]
        if self.cross is not None:
            batch.update(self.cross.collate(rows, width))
        return batch

    def count_rows(self, batch: dict[str, Any]) -> int:
        """Counted target tokens; with step-by-step views, those of the label view only (the loop's divisor:
        see `potstill.data.step_by_step.step_by_step_sum`); cross-tokenizer: the aligned spans; with preference
        pairs, the pairs."""
        if self.cross is not None:
            return self.cross.count_rows(batch)
        if self.train_format == "preference":
            return batch["input_ids"].shape[0] // 2
        return count_label_tokens(batch["targets"], batch.get("view"))

    def prepare_batch(self, batch: dict[str, Any], student: nn.Module, micro_batch: int) -> dict[str, Any]:
        """On-policy distillation: with probability generation.lmbda the student's own completions
        (`potstill.data.on_policy`)."""
        r = self.recipe
        if not r.generation.lmbda:
            return batch
        settings, eos_id = sampling_settings(r.generation), self.tokenizer.eos_token_id
        revise = None
        if r.mgsr is not None and r.mgsr.scrg:  # MGSR's sequence correction and re-generation
            from potstill.data.mgsr_scrg import scrg_reviser

            revise = scrg_reviser(self.teacher, student, settings=settings, pad_id=self.pad_id, eos_id=eos_id,
                                  logits=lambda m, ids, mask: self.logits(m, self.to_device(
                                      {"input_ids": ids, "attention_mask": mask})))
        return on_policy_batch(batch, student, micro_batch, lmbda=r.generation.lmbda, seed=r.seed,
                               examples=self.train_records, settings=settings, pad_id=self.pad_id, eos_id=eos_id,
                               max_length=r.data.max_length, collate=self._device_batch, revise=revise)

    def _device_batch(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        return self.to_device(self.collate(records, indices))

    # ------------------------------------------------------------------ signals and loss
    def _raw_logits(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return causal_logits(model, ids, mask)

    def logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """`[B, T, V]` next-token logits over the tokenizer's ids (a padded vocabulary is cut off)."""
        logits = self._raw_logits(model, batch["input_ids"], batch["attention_mask"])
        return logits[..., :self.vocab_size] if logits.shape[-1] != self.vocab_size else logits

    def teacher_signal(self, batch: dict[str, Any]) -> Any:
        """The live teacher's logits `[B, T, V]`, or with `teacher.cache` its cached top-k (`TopKTeacher`);
        cross-tokenizer: its `SpanLogits`."""
        if self.cross is not None:
            return self.cross.teacher_signal(self.teacher, batch, cache=self.topk_cache)
        if self.topk_cache is not None:
            lengths = batch["attention_mask"].sum(1).tolist()
            cached = self.topk_cache.get(batch["index"].tolist(), length=batch["input_ids"].shape[1],
                                         expect_lengths=lengths).to(self.device)
            return teacher_signals(cached, batch) if self.router_aux else cached
        from potstill.teachers import teacher_outputs

        if self.train_format == "preference":
            return PairLogits(teacher_outputs(self.logits, self.teacher, batch), batch["targets"])
        if self.train_format == "icl":  # with the teacher's demo-set scores
            return teacher_demo_sets(teacher_outputs(self.logits, self.teacher, batch), batch["targets"],
                                     self.recipe.data.icl.num_sets)
        if self.router_aux:
            return teacher_signals(teacher_outputs(self.logits, self.teacher, batch), batch)
        return teacher_outputs(self.with_internals, "teacher", self.logits, self.teacher, batch)

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        """The student's logits; with trainer.fused_lm_head its last hidden states and lm_head instead (as
        `Signals` with the internals, when objectives read them); cross-tokenizer: its `SpanLogits`."""
        if self.cross is not None:
            return self.cross.student_signal(self.logits(model, batch), batch)
        if self.train_format == "preference":
            return PairLogits(self.logits(model, batch), batch["targets"])
        if self.train_format == "icl":
            return DemoSetLogits(self.logits(model, batch), batch["targets"], self.recipe.data.icl.num_sets)
        if self.router_aux:
            return router_signals(model, batch, self.vocab_size)
        fn = self.head_inputs if self.recipe.trainer.fused_lm_head else self.logits
        return self.with_internals("student", fn, model, batch)

    def adapt_objective(self, name: str, fn: Any) -> Any:
        """Logit divergences and preference objectives, ready for pair batches (`potstill.tasks.preference`), or
        with ICL records, logit divergences and bialign for demo-set batches (`potstill.tasks.causal_lm_icl`)."""
        return adapt_icl_objective(name, adapt_preference_objective(name, fn))

    def head_inputs(self, model: nn.Module, batch: dict[str, Any]) -> LMHeadInputs:
        """The student run up to its lm_head (`potstill.tasks.lm_models.lm_head_inputs`)."""
        return lm_head_inputs(model, lambda: self._raw_logits(model, batch["input_ids"], batch["attention_mask"]),
                              self.vocab_size)

    def signal_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["targets"] != -100

    def hard_label_loss(self, student_signal: torch.Tensor | LMHeadInputs, batch: dict[str, Any]) -> torch.Tensor:
        """Summed token cross-entropy (float32) of the student on the targets; with step-by-step views, the
        α-mix of the label view's and the rationale view's (`potstill.data.step_by_step`)."""
        view, targets = batch.get("view"), batch["targets"]
        if self.cross is not None:  # the student's SpanLogits, with its token logits
            return token_ce_sum(student_signal.token_logits, targets) * self.cross.hard_label_scale(batch)
        if isinstance(student_signal, PairLogits):  # preference pairs: CE on the chosen completions
            return chosen_ce_sum(student_signal, token_ce_sum)
        if isinstance(student_signal, DemoSetLogits):  # every demo-set prompt's target
            return token_ce_sum(student_signal.logits, targets)
        ce_sum = partial(token_ce_sum, student_signal, chunk_size=fused_chunk_size(self.recipe))
        if view is None:
            return ce_sum(targets)
        fused = isinstance(student_signal, LMHeadInputs)
        return step_by_step_loss(student_signal, targets, view, self.recipe.step_by_step.alpha,
                                 ce_sum=ce_sum if fused else None)

    # ------------------------------------------------------------------ evaluation
    def token_stats(self, model: nn.Module, examples: list[dict], *, teacher: nn.Module | None = None,
                    batch_of=None, logits=None) -> dict[str, float]:
        """`potstill.eval.lm.token_stats` of `model` (and `teacher`) on `examples` (other batches / logits: a
        cross-tokenizer teacher's)."""
        device_batch = self._device_batch if batch_of is None else (lambda rows, idx: self.to_device(
            batch_of(rows, idx)))
        return token_stats(model, examples, length_batches(examples, self.recipe.eval.batch_size),
                           batch_of=device_batch, logits=logits or self.logits, teacher=teacher)

    def eval_loss(self, model: nn.Module, indices: list[int]) -> float:
        """Mean per-token cross-entropy of `model` on the held-out sequences `indices` (DDK's perplexities)."""
        sums = self.token_stats(model, [self.eval_records[i] for i in indices])
        if not sums["tokens"]:
            raise UserError("data.domains: a domain's data.eval records hold no counted token")
        return sums["nll"] / sums["tokens"]

    def evaluate(self, model: nn.Module | None, *, role: str = "student") -> dict[str, float]:
        """Token metrics on data.eval (None → {}: a run without a teacher). With step_by_step they are on the
        label view, plus `label_accuracy` and, when the eval records have rationales, `rationale_perplexity`."""
        if not self.eval_records or model is None:
            return {}
        if self.cross is not None:  # each model on its own tokens, and bits per byte
            return self.cross.evaluate(self.token_stats, model, self.eval_records,
                                       teacher_role=role == "teacher" or model is self.teacher)
        teacher = None if role == "teacher" or model is self.teacher else self.teacher
        if self.train_format == "preference":
            return self._preference_metrics(model, teacher)
        if self.train_format == "icl":
            return {**token_metrics(self.token_stats(model, flat_rows(self.eval_records), teacher=teacher)),
                    **icl_metrics(model, teacher, self.eval_records, num_sets=self.recipe.data.icl.num_sets,
                                  batch_size=self.recipe.eval.batch_size, batch_of=self._device_batch,
                                  logits=self.logits)}
        sbs = self.recipe.step_by_step is not None
        labels = [{"input_ids": ex["input_ids"], "targets": ex["targets"]} for ex in self.eval_records]
        metrics = token_metrics(self.token_stats(model, labels if sbs else self.eval_records, teacher=teacher))
        if sbs:
            metrics["label_accuracy"] = causal_label_accuracy(
                model, labels, tokenizer=self.tokenizer, pad_id=self.pad_id, batch_size=self.recipe.eval.batch_size)
            rationales = [ex["rationale"] for ex in self.eval_records if "rationale" in ex]
            if rationales:
                metrics["rationale_perplexity"] = token_metrics(self.token_stats(model, rationales))["perplexity"]
        return metrics

    def _preference_metrics(self, model: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
        """Token metrics on the chosen completions and `potstill.eval.preference`'s pair accuracies."""
        from potstill.eval.preference import pair_logps, preference_metrics

        chosen = [{"input_ids": ex["input_ids"], "targets": ex["targets"]} for ex in self.eval_records]
        metrics = token_metrics(self.token_stats(model, chosen, teacher=teacher))
        logps = partial(pair_logps, examples=self.eval_records, batch_size=self.recipe.eval.batch_size,
                        batch_of=self._device_batch, logits=self.logits)
        return {**metrics, **preference_metrics(logps(model), None if teacher is None else logps(teacher))}

    def measure(self, student: nn.Module) -> dict[str, dict[str, float]]:
        examples = (self.eval_records or self.train_records)[:8]
        if self.train_format == "icl":
            examples = flat_rows(examples)[:8]
        mean_tokens = sum(len(ex["input_ids"]) for ex in examples) / len(examples)

        def runner(model: nn.Module):
            return lambda chunk: self.logits(model, self._device_batch(chunk, list(range(len(chunk)))))

        return self.compare_speed(student, examples, runner, unit="tokens_per_s", per_item=mean_tokens,
                                  batch_size=min(4, self.recipe.eval.batch_size), rounds=4)

    # ------------------------------------------------------------------ output
    def export_output(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self.logits(model, batch)

    def save_student(self, model: nn.Module, path: Path) -> None:
        """`save_pretrained` + tokenizer (loads with AutoModelForCausalLM, no potstill); else a state dict."""
        if hasattr(model, "save_pretrained"):
            from potstill.students import save_hf_student

            save_hf_student(model, self.tokenizer, path)
            return
        from potstill.students.save import save_factory_student

        save_factory_student(model, path, factory=self.recipe.student.factory, kwargs=self.recipe.student.kwargs,
                             tokenizer=self.tokenizer)
