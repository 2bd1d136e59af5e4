"""The recipes of the text-generation tasks: causal_lm (a decoder LM) and seq2seq (an encoder–decoder).

Both train on text targets and share a tokenizer between teacher and student (`teacher.tokenizer`), may do
without a teacher model when they have no KD objectives (hard labels on text a teacher wrote), and have
`step_by_step`. Only causal_lm has KD objectives on its logits, the teacher's top-k cache, a text-only endpoint
teacher, on-policy / sequence-level generation, packing and the fused lm_head.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, field_validator

from potstill.config.common import (
    DataConfig,
    DomainWeightedData,
    NoDomains,
    NoTopKCache,
    ObjectiveConfig,
    RecipeBase,
    Strict,
    StudentConfig,
    TeacherConfig,
    TrainerConfig,
    check_domains,
    check_domains_teacher,
)
from potstill.config.paths import ModelPath, RelPath


class EndpointConfig(Strict):
    """A text-only teacher behind an OpenAI-compatible server (potstill.teachers.EndpointTeacher)."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1 (`potstill serve`) or a hosted API")
    model: str = Field(description="model name sent to the server")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key "
                                    "(never put the key in a recipe); absent or unset: no key")
    concurrency: int = Field(8, ge=1, description="requests in flight")
    timeout: float = Field(120.0, gt=0, description="seconds per request, waiting in the server's queue included")
    max_retries: int = Field(8, ge=0, description="retries on 429 / 5xx / timeouts (jittered exponential back-off)")
    requests_per_second: float | None = Field(None, gt=0, description="rate limit (null = none)")
    cache: RelPath | None = Field(None, description="response cache (SQLite); default <run>/endpoint_cache.sqlite, so "
                              "a re-run or a resumed run never asks twice")


class GenerationConfig(Strict):
    """On-policy (GKD) and sequence-level distillation: samples of the student or of the teacher."""

    lmbda: float = Field(0.0, ge=0, le=1, description="probability that a micro-batch's completions "
                         "are sampled from the student and scored by the teacher (on-policy, GKD's λ); 0 = off")
    seq_kd: StrictBool = Field(False, description="train on teacher-generated completions of the "
                         "prompts (sequence-level KD), generated once and stored with the cache or run")
    max_new_tokens: int = Field(128, ge=1, description="tokens sampled per completion")
    temperature: float = Field(0.9, ge=0, description="sampling temperature (0 = greedy)")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens (0 = all)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1.0 = off)")


class MGSRConfig(Strict):
    """MGSR (Liu et al. 2024) on top of on-policy distillation. Its token- and span-level losses are the
    objectives dac_kl and span_correlation; this block holds its sequence level."""

    scrg: StrictBool = Field(True, description="sequence correction and re-generation: each on-policy sample gets "
                             "the teacher's token at its position of largest teacher–student KL and a suffix "
                             "re-sampled by the student (potstill.data.mgsr_scrg); needs generation.lmbda > 0")


class StepByStepConfig(Strict):
    """Distilling step-by-step (Hsieh et al. 2023): each record (input, label, rationale) trains two views,
    (label_prefix + input → label) and (rationale_prefix + input → rationale); the hard-label loss is
    alpha · mean CE(label tokens) + (1 − alpha) · mean CE(rationale tokens). Inference uses label_prefix."""

    alpha: float = Field(0.5, ge=0, le=1, description="weight of the label view (1 − alpha: the rationale view); "
                         "1 = plain fine-tuning on (label_prefix + input → label), the rationales unused")
    label_prefix: str = Field("predict: ", description="text put before the input for the label view (and at "
                              "inference)")
    rationale_prefix: str = Field("explain: ", description="text put before the input for the rationale view")
    input_column: str = Field("input", description="record field holding the input text")
    label_column: str = Field("label", description="record field holding the (teacher's) label")
    rationale_column: str = Field("rationale", description="record field holding the teacher's rationale "
                                  "(needed in data.train; used in data.eval when present)")


class TextTeacherConfig(TeacherConfig):
    tokenizer: ModelPath | None = Field(None, description="tokenizer folder (or builtin:smollm2) shared by teacher "
                                        "and student; default: teacher.path. Needed with teacher.factory, and "
                                        "without a teacher unless the student is pretrained")


class Seq2SeqTeacherConfig(NoTopKCache, TextTeacherConfig):
    """The seq2seq task's teacher: a Hugging Face seq2seq model (teacher.path), or none."""


class CausalLMTeacherConfig(TextTeacherConfig):
    endpoint: EndpointConfig | None = Field(None, description="with generation.seq_kd: the teacher is a text-only "
                                            "endpoint whose completions of the prompts are the training targets "
                                            "(black-box sequence-level KD); no teacher model, no KD objectives")
    cache: RelPath | None = Field(None, description="top-k cache folder. `potstill cache RECIPE` writes the "
                                  "teacher's top-k log-probs there once; `potstill run` then reads them instead of "
                                  "running the teacher each step (sparse divergences: top-k ids + one tail bucket; "
                                  "cross-tokenizer uld / gold / first_token_kl: one row per aligned span, the tail "
                                  "spread evenly)")


class CausalLMStudentConfig(StudentConfig):
    tokenizer: ModelPath | None = Field(None, description="the student's own tokenizer when it differs from the "
                                        "teacher's (cross-tokenizer distillation, objectives uld / gold / "
                                        "first_token_kl only): a folder, or bpe:<size> (a byte-level BPE trained on "
                                        "data.train's text, kept in <run>/student_tokenizer); default: the teacher's "
                                        "(a pretrained student: its folder's)")


class Seq2SeqData(NoDomains, DataConfig):
    add_eos: StrictBool = Field(True, description="end every target with the tokenizer's EOS token (counted as a "
                                "target)")


class ICLDataConfig(Strict):
    """In-context-learning records (`data.format: icl`, BiAlign): each record is a query, its target and either a
    pool of demonstrations to draw `num_sets` sets of `shots` from, or its own `demo_sets`
    (potstill.data.icl_demos). A prompt is the demos (`demo_template`), then the query (`query_template`), joined by
    `separator`; `target_prefix` + target follows."""

    num_sets: int = Field(4, ge=2, description="M, the demonstration sets (prompt variants) per query; a micro-batch "
                          "of B queries has B·M rows")
    shots: int = Field(4, ge=1, description="demonstrations per set drawn from a record's pool (records with "
                       "demo_sets keep their own)")
    demo_template: str = Field("{input} {output}", description="how one demonstration is written")
    query_template: str = Field("{input}", description="how the query is written")
    separator: str = Field(" ", description="text between demonstrations and before the query")
    target_prefix: str = Field(" ", description="text between the prompt and the target (scored with the target)")


class CausalLMData(DomainWeightedData):
    format: Literal["auto", "text", "prompt_completion", "messages", "preference", "icl"] = Field(
        "auto", description="`text` (loss on every token), `prompt_completion` (loss on the completion only), "
        "`messages` (chat turns through the tokenizer's chat template; loss on assistant turns only), `preference` "
        "(prompt, chosen, rejected pairs for dpo_teacher_ref), `icl` (query, target and a demo pool or demo_sets, "
        "for bialign; see data.icl); auto picks from the columns: messages, else query + pool / demo_sets, else "
        "prompt + chosen + rejected, else prompt + completion, else text")
    icl: ICLDataConfig = Field(default_factory=ICLDataConfig, description="the demonstration sets of "
                               "data.format: icl")
    packing: StrictBool = Field(False, description="concatenate the tokenised records (each ending with EOS) and "
                                "cut the stream into blocks of max_length tokens, instead of one record per sequence "
                                "truncated to max_length")
    add_eos: StrictBool = Field(True, description="end every text / completion with the tokenizer's EOS token (counted "
                          "as a target)")


class CausalLMTrainerConfig(TrainerConfig):
    fused_lm_head: StrictBool = Field(False, description="compute the student's logits inside the loss, a chunk of "
                                      "tokens at a time (forward and again in backward), so its full [tokens, vocab] "
                                      "logits never exist; chunk size = the objective's chunk_size (default 1024). "
                                      "For the logit divergences (not taid / sinkhorn) and the hard-label loss; needs "
                                      "a Hugging Face causal LM student")


STEP_BY_STEP_DESCRIPTION = ("distilling step-by-step, multi-task training on the teacher's labels and rationales "
                            "(records with input, label and rationale fields)")


class TextTargetsRecipe(RecipeBase):
    """What causal_lm and seq2seq share: without objectives the teacher model is optional (the targets are text a
    teacher wrote), so the student and the tokenizer must then come from elsewhere."""

    teacher: TextTeacherConfig = Field(default_factory=TextTeacherConfig, description="the teacher model (optional "
                                       "for a recipe without objectives, which trains on text the teacher wrote)")
    step_by_step: StepByStepConfig | None = Field(None, description=STEP_BY_STEP_DESCRIPTION)

    def check_teacher(self) -> None:
        if self.has_teacher_model():
            return
        if self.objectives:
            raise ValueError("give exactly one of teacher.path or teacher.factory (a recipe without objectives may "
                             "train on the teacher's text alone)")
        self.check_without_teacher()

    def check_without_teacher(self) -> None:
        """A teacher-less run (hard labels on the teacher's text): the student and the tokenizer must come from
        somewhere else."""
        init = self.student.init
        if init in ("layers_from_teacher", "pruned"):
            raise ValueError(f"student.init {init} copies a teacher's layers, and this recipe has no "
                             "teacher; use init from_config (with student.config.model_type, e.g. llama or t5), "
                             "pretrained or factory")
        if init == "from_config" and "model_type" not in self.student.config:
            raise ValueError("student.config.model_type: student.init from_config without a teacher builds the "
                             "student from transformers' config of a model type; give e.g. model_type: llama "
                             "(causal_lm) or t5 (seq2seq) with the sizes")
        if self.teacher.tokenizer is None and init != "pretrained":
            raise ValueError("teacher.tokenizer: without a teacher the tokenizer comes from teacher.tokenizer (a "
                             "tokenizer folder or builtin:smollm2) or a pretrained student's folder (student.path)")


class Seq2SeqRecipe(TextTargetsRecipe):
    """task: seq2seq: an encoder-decoder student (e.g. T5) trained on text targets (hard labels, step_by_step),
    no KD objectives."""

    task: Literal["seq2seq"]
    teacher: Seq2SeqTeacherConfig = Field(default_factory=Seq2SeqTeacherConfig, description="a Hugging Face "
                                          "seq2seq teacher (teacher.path), or none")
    data: Seq2SeqData

    @field_validator("objectives")
    @classmethod
    def _no_kd(cls, objectives: list[ObjectiveConfig]) -> list[ObjectiveConfig]:
        if objectives:
            raise ValueError(f"KD objectives ({', '.join(o.name for o in objectives)}) are not supported for seq2seq "
                             f"students; the seq2seq task trains on text targets only: remove the objectives and "
                             f"set trainer.hard_label_weight > 0")
        return objectives

    def check(self) -> None:
        super().check()
        if self.teacher.factory is not None:
            raise ValueError("teacher.factory: the seq2seq task takes a Hugging Face seq2seq teacher (teacher.path) "
                             "or none")


class CausalLMRecipe(TextTargetsRecipe):
    """task: causal_lm: a decoder LM distilled on its token logits, or trained on text the teacher wrote."""

    task: Literal["causal_lm"]
    teacher: CausalLMTeacherConfig = Field(default_factory=CausalLMTeacherConfig, description="the teacher model, "
                                           "or a text-only endpoint (teacher.endpoint); optional for a recipe "
                                           "without objectives, which trains on text the teacher wrote")
    student: CausalLMStudentConfig = Field(description="how the student is built")
    data: CausalLMData
    trainer: CausalLMTrainerConfig = Field(default_factory=CausalLMTrainerConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig,
                                         description="on-policy and sequence-level distillation")
    mgsr: MGSRConfig | None = Field(None, description="MGSR's revision of the on-policy samples (null = off)")

    def check(self) -> None:
        self.check_loss()
        if self.data.domains is not None:
            self.check_domains()
        self.check_prune()
        if self.teacher.endpoint is not None:
            self.check_endpoint()
        self.check_teacher()
        if self.step_by_step is not None:
            self.check_step_by_step()
        if self.trainer.fused_lm_head:
            from potstill.losses.fused import FUSED_DIVERGENCES

            for objective in self.objectives:
                if objective.name not in FUSED_DIVERGENCES:
                    raise ValueError(f"trainer.fused_lm_head: objective {objective.name!r} has no fused form; use "
                                     f"{', '.join(FUSED_DIVERGENCES)}, or turn fused_lm_head off")
        if self.mgsr is not None and self.mgsr.scrg and not self.generation.lmbda:
            raise ValueError("mgsr.scrg revises the student's on-policy samples: set generation.lmbda > 0")
        if self.generation.lmbda and self.teacher.cache is not None:
            raise ValueError("generation.lmbda > 0 needs a live teacher to score the student's samples; "
                             "remove teacher.cache or set generation.lmbda: 0")

    def check_domains(self) -> None:
        check_domains(self)
        if self.data.packing:
            raise ValueError("data.domains needs one record per sequence: turn data.packing off")
        check_domains_teacher(self)
        if self.teacher.cache is not None or self.step_by_step is not None:
            raise ValueError("data.domains measures the live teacher's per-domain perplexity on data.eval: it "
                             "does not combine with teacher.cache or step_by_step")

    def check_endpoint(self) -> None:
        if self.has_teacher_model():
            raise ValueError("teacher.endpoint is the whole teacher here: remove teacher.path / teacher.factory")
        if not self.generation.seq_kd:
            raise ValueError("teacher.endpoint: a text-only teacher writes the completions of sequence-level KD; set "
                             "generation.seq_kd: true (for other uses see `potstill generate`)")
        if self.objectives:
            raise ValueError("teacher.endpoint gives text, not logits: remove the KD objectives and train on its "
                             "completions with trainer.hard_label_weight > 0")

    def check_without_teacher(self) -> None:
        super().check_without_teacher()
        if self.teacher.cache is not None:
            raise ValueError("teacher.cache holds a teacher's log-probs for KD objectives; this recipe has no "
                             "teacher and no objectives")
        if self.generation.lmbda or (self.generation.seq_kd and self.teacher.endpoint is None):
            raise ValueError("generation.lmbda and generation.seq_kd sample from a live teacher; give teacher.path "
                             "(or, for seq_kd, teacher.endpoint)")

    def check_step_by_step(self) -> None:
        if self.objectives:
            raise ValueError("step_by_step trains on the teacher's labels and rationales (text, the hard-label "
                             "loss); it does not combine with KD objectives: remove the objectives and set "
                             "trainer.hard_label_weight > 0")
        if self.data.packing:
            raise ValueError("data.packing: step_by_step needs one sequence per record and view; turn packing off")
        if self.data.format != "auto":
            raise ValueError(f"data.format {self.data.format!r}: step_by_step reads its own fields (step_by_step."
                             f"input_column, label_column, rationale_column); leave data.format at auto")
        if self.generation.lmbda or self.generation.seq_kd:
            raise ValueError("generation.lmbda / generation.seq_kd do not combine with step_by_step")
