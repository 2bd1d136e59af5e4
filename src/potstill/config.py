"""The recipe schema: one YAML file = one distillation run, validated by pydantic.

Every field is documented here; unknown keys are errors with a "did you mean" hint, and every error names
the recipe file, the line and the field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from potstill.errors import UserError, did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSource(_Strict):
    """Where records come from: a file (JSONL/CSV/TSV/Parquet), a `datasets` folder, or `builtin:<name>`."""

    path: str = Field(description="file, `datasets` folder, or builtin:digits / builtin:bbc / "
                      "builtin:bbc-sentences / builtin:lee; relative paths are relative to the recipe")
    split: str | None = Field(None, description="split of a DatasetDict folder or a builtin dataset")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="canonical name -> column in the file, e.g. {text: sentence}")
    limit: int | None = Field(None, ge=1, description="keep only the first N records")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class EndpointConfig(_Strict):
    """A text-only teacher behind an OpenAI-compatible server (potstill.teachers.EndpointTeacher)."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1 (`potstill serve`) or a hosted API")
    model: str = Field(description="model name sent to the server")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key "
                                    "(never put the key in a recipe); absent or unset: no key")
    concurrency: int = Field(8, ge=1, description="requests in flight")
    timeout: float = Field(120.0, gt=0, description="seconds per request, waiting in the server's queue included")
    max_retries: int = Field(8, ge=0, description="retries on 429 / 5xx / timeouts (jittered exponential back-off)")
    requests_per_second: float | None = Field(None, gt=0, description="rate limit (null = none)")
    cache: str | None = Field(None, description="response cache (SQLite); default <run>/endpoint_cache.sqlite, so "
                              "a re-run or a resumed run never asks twice")


class TeacherConfig(_Strict):
    path: str | None = Field(None, description="Hugging Face model folder or id (offline), or builtin:minilm / "
                             "builtin:smollm2")
    factory: str | None = Field(None, description="'module:function' returning a torch.nn.Module teacher")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for `factory`")
    weights: str | None = Field(None, description="optional .safetensors/.pt state dict for the factory's module")
    tokenizer: str | None = Field(None, description="causal_lm and seq2seq tasks: tokenizer folder (or "
                                  "builtin:smollm2) shared by teacher and student; default: teacher.path. Needed "
                                  "with teacher.factory, and without a teacher unless the student is pretrained")
    layers_path: str | None = Field(None, description="module path of the teacher's list of transformer blocks "
                                    "(e.g. encoder.layer), for objectives on internals; default: found from the "
                                    "config's layer count")
    endpoint: EndpointConfig | None = Field(None, description="causal_lm task with generation.seq_kd: the teacher "
                                            "is a text-only endpoint whose completions of the prompts are the "
                                            "training targets (black-box sequence-level KD); no teacher model, "
                                            "no KD objectives")
    cache: str | None = Field(None, description="causal_lm task: top-k cache folder. `potstill cache RECIPE` writes "
                              "the teacher's top-k log-probs there once; `potstill run` then reads them instead of "
                              "running the teacher each step (sparse divergences: top-k ids + one tail bucket)")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if self.path is not None and self.factory is not None:
            raise ValueError("give exactly one of teacher.path or teacher.factory")
        return self


class StudentConfig(_Strict):
    init: Literal["layers_from_teacher", "from_config", "pretrained", "factory", "static"] = Field(
        "layers_from_teacher", description="how the student is built; static (embedding task): a model2vec-style "
        "static-embedding student made from the teacher without data, config {pca_dims: 256, sif_coefficient: "
        "1e-4, normalize: true}")
    layers: list[int] | None = Field(None, description="teacher layers copied into the student (layers_from_teacher)")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="config overrides for from_config, e.g. {num_hidden_layers: 2}")
    path: str | None = Field(None, description="pretrained student folder (init: pretrained)")
    factory: str | None = Field(None, description="'module:function' returning a torch.nn.Module (init: factory)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for `factory`")
    layers_path: str | None = Field(None, description="module path of the student's list of transformer blocks, "
                                    "for objectives on internals; default: found from the config's layer count")

    @model_validator(mode="after")
    def _needs(self) -> StudentConfig:
        need = {"layers_from_teacher": "layers", "pretrained": "path", "factory": "factory"}.get(self.init)
        if need and getattr(self, need) is None:
            raise ValueError(f"student.init is {self.init!r}, which needs student.{need}")
        return self


class ObjectiveConfig(_Strict):
    name: str = Field(description="an objective listed by `potstill objectives`")
    weight: float = Field(1.0, ge=0, description="weight of this term in the summed loss")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="keyword arguments of the loss, e.g. {temperature: 4}")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from potstill.losses import OBJECTIVES

        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}{did_you_mean(name, OBJECTIVES)}; "
                             f"valid: {', '.join(OBJECTIVES)}")
        return name


class PruneConfig(_Strict):
    """Train on a pruned share of data.train, with KD (Ben-Baruch et al. 2024, "Distilling the Knowledge in Data
    Pruning"): with a full-data teacher, random pruning is as good as a clever score, and the KD weight should
    grow as the kept fraction shrinks."""

    fraction: float = Field(gt=0, le=1, description="share of the training records kept (rounded, at least one)")
    keep: Literal["random", "hardest", "easiest"] = Field("random", description="which records: a seeded random "
                                                          "subset, or the highest / lowest score_column values")
    score_column: str | None = Field(None, description="record field with a difficulty score (higher = harder, "
                                     "e.g. EL2N or the teacher's loss); needed for keep hardest / easiest")
    tie_kd_weight: bool = Field(True, description="loss = (1 − α(f))·hard-label CE + α(f)·(the objectives), α(f) "
                                "= potstill.data.kd_weight_for_fraction(fraction) (0.5 at f = 1, 0.9 at f ≤ 0.1); "
                                "the recipe's objective weights then set the split among the KD terms and "
                                "trainer.hard_label_weight is replaced. Needs gold labels and one objective")

    @model_validator(mode="after")
    def _score_for_rank(self) -> PruneConfig:
        if self.keep != "random" and self.score_column is None:
            raise ValueError(f"data.prune.keep {self.keep!r} ranks records by a score: give data.prune.score_column")
        if self.keep == "random" and self.score_column is not None:
            raise ValueError("data.prune.score_column is only used with keep hardest / easiest")
        return self


class DomainsConfig(_Strict):
    """DDK (Liu et al. 2024): sample training batches by domain, re-weighted every `every` optimizer steps toward
    the domains where the student's perplexity is furthest above the teacher's, with a floor per domain."""

    column: str = Field("domain", description="record field naming each record's domain (data.train and data.eval)")
    every: int = Field(100, ge=1, description="optimizer steps between weight updates (the paper's K = 1,000 on "
                       "~15B tokens; smaller runs need smaller K)")
    smoothing: float = Field(0.5, ge=0, le=1, description="the paper's α: weights = α·(updated) + (1 − α)/N, so "
                             "every domain keeps at least (1 − α)/N")
    eval_records: int = Field(64, ge=1, description="data.eval records per domain used to measure the "
                              "perplexities (the first N of each domain)")


class DataConfig(_Strict):
    train: DataSource = Field(description="training records")
    eval: DataSource | None = Field(None, description="held-out records scored during and after training")
    collection: DataSource | None = Field(None, description="ranking task: more passages (a `passage` or `text` "
                                          "column) for the collection that negatives are mined from and the "
                                          "held-out queries are ranked over, next to the records' positives")
    max_length: int = Field(128, ge=1, description="token limit for text inputs (causal_lm: tokens per sequence)")
    format: Literal["auto", "text", "prompt_completion", "messages"] = Field(
        "auto", description="causal_lm task: `text` (loss on every token), `prompt_completion` (loss on the "
        "completion only), `messages` (chat turns through the tokenizer's chat template; loss on assistant turns "
        "only); auto picks from the columns: messages, else prompt + completion, else text")
    packing: bool = Field(False, description="causal_lm task: concatenate the tokenised records (each ending with "
                          "EOS) and cut the stream into blocks of max_length tokens, instead of one record per "
                          "sequence truncated to max_length")
    add_eos: bool = Field(True, description="causal_lm task: end every text / completion with the tokenizer's EOS "
                          "token (counted as a target)")
    prune: PruneConfig | None = Field(None, description="keep only a share of data.train (random or by a score), "
                                      "with the KD weight tied to the kept share")
    domains: DomainsConfig | None = Field(None, description="domain-weighted sampling (DDK): needs a domain column "
                                          "in data.train and data.eval; classification and causal_lm tasks")


class EvalConfig(_Strict):
    every: int = Field(0, ge=0, description="evaluate every N optimizer steps (0 = only at the end)")
    compare_before: bool = Field(True, description="also evaluate the untrained student (the 'before' row)")
    probe_train: DataSource | None = Field(None, description="embedding task: labelled texts to fit a linear probe")
    probe_test: DataSource | None = Field(None, description="embedding task: labelled texts to score the probe")
    pairs: DataSource | None = Field(None, description="embedding task: text_a/text_b/score pairs for Spearman "
                                     "(builtin:lee gives the Lee 50-document ratings)")
    throughput: bool = Field(True, description="measure teacher and student throughput (interleaved)")
    batch_size: int = Field(64, ge=1, description="batch size for evaluation and teacher caching")


class TrainerConfig(_Strict):
    epochs: float = Field(1.0, gt=0, description="passes over the training data (ignored if max_steps is set)")
    max_steps: int | None = Field(None, ge=0, description="optimizer steps; overrides epochs; 0 = no training "
                                  "(evaluate and save the student as built, e.g. a data-free static student)")
    batch_size: int = Field(32, ge=1, description="micro-batch size per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps (overrides warmup_ratio)")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="warm-up as a fraction of all steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping (null = off)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast for both models")
    log_every: int = Field(10, ge=1, description="write a metrics.jsonl line every N steps")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    hard_label_weight: float = Field(0.0, ge=0, description="weight of cross-entropy on gold labels")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    group_by_length: bool = Field(False, description="batch records of similar token length together (less "
                                  "padding): each window of 50 global micro-batches of the epoch's shuffled order "
                                  "is sorted by length, cut into batches, and the batches shuffled")
    fused_lm_head: bool = Field(False, description="causal_lm task: compute the student's logits inside the "
                                "loss, a chunk of tokens at a time (forward and again in backward), so its full "
                                "[tokens, vocab] logits never exist; chunk size = the objective's chunk_size "
                                "(default 1024). For the logit divergences (not taid / sinkhorn) and the "
                                "hard-label loss; needs a Hugging Face causal LM student")


class GenerationConfig(_Strict):
    lmbda: float = Field(0.0, ge=0, le=1, description="causal_lm task: probability that a micro-batch's completions "
                         "are sampled from the student and scored by the teacher (on-policy, GKD's λ); 0 = off")
    seq_kd: bool = Field(False, description="causal_lm task: train on teacher-generated completions of the "
                         "prompts (sequence-level KD), generated once and stored with the cache or run")
    max_new_tokens: int = Field(128, ge=1, description="tokens sampled per completion")
    temperature: float = Field(0.9, ge=0, description="sampling temperature (0 = greedy)")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens (0 = all)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1.0 = off)")


class RankingConfig(_Strict):
    """ranking task: how teacher and student score a (query, passage) pair, and where negatives come from."""

    teacher_type: Literal["auto", "bi_encoder", "cross_encoder"] = Field(
        "auto", description="cross_encoder: a sequence classifier with one logit scores the pair; bi_encoder: "
        "pooled encoder vectors, compared by `similarity`; auto: cross_encoder when the teacher's config names a "
        "*ForSequenceClassification architecture")
    student_type: Literal["bi_encoder", "cross_encoder", "splade"] = Field(
        "bi_encoder", description="the student's kind; splade: a sparse bi-encoder whose vectors are vocabulary "
        "term weights, max over tokens of log(1 + ReLU(MLM logits)) (an MLM head is added to a plain encoder), "
        "scored by dot product; regularise it with the sparse_flops objective")
    inference_free: bool = Field(False, description="splade students: queries are not encoded; a query's "
                                 "weights are the IDF (over the collection) of its distinct tokens (Geng et al. "
                                 "2024), saved as a SparseEncoder with a static query route")
    teacher_scores: str | list[str] | None = Field(
        None, description="a file of precomputed teacher scores (potstill.teachers.ScoreFile: JSONL / CSV / TSV "
        "with query, passage, score or query_id, passage_id, score; or the 5-column triples TSV score_pos, "
        "score_neg, qid, pid_pos, pid_neg): the candidates' teacher scores come from it; teacher.path is then "
        "optional (needed only for in-batch teacher scores, mining or layers_from_teacher). Several files: "
        "an ensemble of teachers, each min–max normalised per query, then averaged (Geng et al. 2024)")
    ensemble_scale: float = Field(1.0, gt=0, description="several teacher_scores files: the ensemble's mean of "
                                  "normalised scores × this (the paper's KD demo: 30 before a softmax-KL)")
    similarity: Literal["dot", "cosine"] = Field("dot", description="bi-encoders: dot product or cosine of the "
                                                 "pooled vectors (one tower shared by queries and passages)")
    negatives: int = Field(4, ge=1, description="negatives per query mined from the collection (the records' "
                           "positives) when the records have no `negatives` column")
    mine_with: Literal["teacher", "student"] = Field(
        "teacher", description="bi-encoder that mines the negatives: the teacher's top ranks (the student "
        "before training when the teacher is a cross-encoder)")
    label_scale: float | None = Field(None, gt=0, description="hard-label loss (contrastive cross-entropy with "
                                      "the positive as the class): student scores × this; default 20 for "
                                      "cosine, 1 for dot")
    in_batch_negatives: bool = Field(False, description="hard-label loss of a bi-encoder student: the other "
                                     "queries' positives in the batch are negatives too (sentence-transformers' "
                                     "MultipleNegativesRankingLoss); passages equal to the query's own positive "
                                     "are left out")
    relevance: Literal["record", "query"] = Field(
        "record", description="which passages count as relevant to a query: record = its record's positive only; "
        "query = every positive the data gives for the same query text (several records per query act as qrels), "
        "for the metrics, the negatives miner (which then never mines one) and the in-batch mask")
    towers: Literal["shared", "separate"] = Field(
        "shared", description="bi-encoder students: one encoder for queries and passages, or two (both start "
        "from the student as built; saved as a sentence-transformers Router with query and document routes)")
    sampler: Literal["random", "tas_balanced"] = Field(
        "random", description="random: shuffled queries, each with all its negatives; tas_balanced: TAS-Balanced "
        "(Hofstätter et al. 2021): each batch's queries come from one k-means cluster of query vectors, each "
        "query with one negative drawn uniformly over bins of the teacher margin")
    tas_clusters: int | None = Field(None, ge=1, description="tas_balanced: k-means clusters of the training "
                                     "queries; default one per 200 queries (the paper's 2,000 clusters of MS "
                                     "MARCO's ~400k training queries)")
    tas_bins: int = Field(10, ge=1, description="tas_balanced: equal-width bins of the teacher margin t⁺ − t⁻ per "
                          "query (the paper's h = 10)")


class StepByStepConfig(_Strict):
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


class Recipe(_Strict):
    """A whole run. See recipes/*.yaml for examples and `potstill run --help`."""

    name: str = Field("run", description="run name: output goes to <output_dir>/<name>/")
    output_dir: str = Field("runs", description="parent folder of the run folder (relative to the cwd)")
    task: Literal["classification", "embedding", "causal_lm", "vision", "ranking", "seq2seq"] = Field(
        description="what the models do; vision = masked-image-modelling distillation of ViTs (DMAE); ranking = "
        "(query, passage) relevance scores, e.g. a cross-encoder teacher and a bi-encoder student; seq2seq = an "
        "encoder-decoder student (e.g. T5) trained on text targets (hard labels, step_by_step), no KD objectives")
    seed: int = 0
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the teacher model (required "
                                   "unless the ranking task gives ranking.teacher_scores, or a causal_lm / seq2seq "
                                   "recipe without objectives trains on text the teacher wrote)")
    student: StudentConfig = Field(description="how the student is built")
    data: DataConfig
    objectives: list[ObjectiveConfig] = Field(default_factory=list, description="weighted distillation terms")
    pooling: Literal["mean", "cls"] = Field("mean", description="embedding and ranking tasks: sentence pooling")
    ranking: RankingConfig = Field(default_factory=RankingConfig, description="ranking task: model kinds, "
                                   "similarity, negatives")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig,
                                         description="causal_lm task: on-policy and sequence-level distillation")
    step_by_step: StepByStepConfig | None = Field(None, description="causal_lm and seq2seq tasks: distilling "
                                                  "step-by-step, multi-task training on the teacher's labels and "
                                                  "rationales (records with input, label and rationale fields)")

    @field_validator("objectives")
    @classmethod
    def _no_kd_for_seq2seq(cls, objectives: list[ObjectiveConfig], info: ValidationInfo) -> list[ObjectiveConfig]:
        if objectives and info.data.get("task") == "seq2seq":
            raise ValueError(f"KD objectives ({', '.join(o.name for o in objectives)}) are not supported for seq2seq "
                             f"students; the seq2seq task trains on text targets only: remove the objectives and "
                             f"set trainer.hard_label_weight > 0")
        return objectives

    @field_validator("step_by_step")
    @classmethod
    def _step_by_step_task(cls, value: StepByStepConfig | None, info: ValidationInfo) -> StepByStepConfig | None:
        task = info.data.get("task")
        if value is not None and task is not None and task not in ("causal_lm", "seq2seq"):
            raise ValueError(f"step_by_step is for the causal_lm and seq2seq tasks, not the {task} task")
        return value

    @model_validator(mode="after")
    def _has_loss(self) -> Recipe:
        if not self.objectives and self.trainer.hard_label_weight == 0:
            raise ValueError("no loss: give at least one objective or trainer.hard_label_weight > 0")
        if self.data.domains is not None:
            if self.task not in ("classification", "causal_lm"):
                raise ValueError(f"data.domains (DDK domain weighting) is for the classification and causal_lm "
                                 f"tasks, not {self.task}")
            if self.data.eval is None:
                raise ValueError("data.domains measures each domain's student / teacher perplexity on data.eval: "
                                 "give data.eval, with the same domain column")
            if self.data.packing:
                raise ValueError("data.domains needs one record per sequence: turn data.packing off")
            if self.teacher.path is None and self.teacher.factory is None:
                raise ValueError("data.domains compares the student with a teacher model per domain: give "
                                 "teacher.path or teacher.factory")
            if self.teacher.cache is not None or self.step_by_step is not None:
                raise ValueError("data.domains measures the live teacher's per-domain perplexity on data.eval: it "
                                 "does not combine with teacher.cache or step_by_step")
        if self.data.prune is not None and self.data.prune.tie_kd_weight and not self.objectives:
            raise ValueError("data.prune.tie_kd_weight splits the loss between the hard labels and KD: give at least "
                             "one objective, or set data.prune.tie_kd_weight: false")
        if self.teacher.endpoint is not None:
            if self.teacher.path is not None or self.teacher.factory is not None:
                raise ValueError("teacher.endpoint is the whole teacher here: remove teacher.path / teacher.factory")
            if self.task != "causal_lm" or not self.generation.seq_kd:
                raise ValueError("teacher.endpoint: a text-only teacher writes the completions of sequence-level "
                                 "KD; set task: causal_lm and generation.seq_kd: true (for other uses see "
                                 "`potstill generate`)")
            if self.objectives:
                raise ValueError("teacher.endpoint gives text, not logits: remove the KD objectives and train on its "
                                 "completions with trainer.hard_label_weight > 0")
        if self.teacher.path is None and self.teacher.factory is None:
            if self.task in ("causal_lm", "seq2seq") and not self.objectives:
                self._check_without_teacher()
            elif self.task != "ranking" or self.ranking.teacher_scores is None:
                raise ValueError("give exactly one of teacher.path or teacher.factory (the ranking task may instead "
                                 "give only ranking.teacher_scores, a file of the teacher's scores; a causal_lm or "
                                 "seq2seq recipe without objectives may train on the teacher's text alone)")
        if self.task == "seq2seq" and self.teacher.factory is not None:
            raise ValueError("teacher.factory: the seq2seq task takes a Hugging Face seq2seq teacher (teacher.path) "
                             "or none")
        if self.step_by_step is not None:
            self._check_step_by_step()
        if self.student.init == "static":
            if self.task != "embedding":
                raise ValueError("student.init static (a static-embedding student) is for the embedding task")
            unknown = sorted(set(self.student.config) - {"pca_dims", "sif_coefficient", "normalize"})
            if unknown:
                raise ValueError(f"student.config for init static takes pca_dims, sif_coefficient and normalize; "
                                 f"got {', '.join(unknown)}")
        if self.task != "causal_lm":
            if self.teacher.cache is not None:
                raise ValueError("teacher.cache is for the causal_lm task")
            if self.generation.lmbda or self.generation.seq_kd:
                raise ValueError("generation (lmbda, seq_kd) is for the causal_lm task")
        if self.trainer.fused_lm_head:
            from potstill.losses.fused import FUSED_DIVERGENCES

            if self.task != "causal_lm":
                raise ValueError("trainer.fused_lm_head is for the causal_lm task")
            for objective in self.objectives:
                if objective.name not in FUSED_DIVERGENCES:
                    raise ValueError(f"trainer.fused_lm_head: objective {objective.name!r} has no fused form; use "
                                     f"{', '.join(FUSED_DIVERGENCES)}, or turn fused_lm_head off")
        if self.generation.lmbda and self.teacher.cache is not None:
            raise ValueError("generation.lmbda > 0 needs a live teacher to score the student's samples; "
                             "remove teacher.cache or set generation.lmbda: 0")
        return self

    def _check_without_teacher(self) -> None:
        """A teacher-less causal_lm / seq2seq run (hard labels on the teacher's text): the student and the
        tokenizer must come from somewhere else, and nothing may need a live teacher."""
        init = self.student.init
        if init == "layers_from_teacher":
            raise ValueError("student.init layers_from_teacher copies a teacher's layers, and this recipe has no "
                             "teacher; use init from_config (with student.config.model_type, e.g. llama or t5), "
                             "pretrained or factory")
        if init == "from_config" and "model_type" not in self.student.config:
            raise ValueError("student.config.model_type: student.init from_config without a teacher builds the "
                             "student from transformers' config of a model type; give e.g. model_type: llama "
                             "(causal_lm) or t5 (seq2seq) with the sizes")
        if self.teacher.tokenizer is None and init != "pretrained":
            raise ValueError("teacher.tokenizer: without a teacher the tokenizer comes from teacher.tokenizer (a "
                             "tokenizer folder or builtin:smollm2) or a pretrained student's folder (student.path)")
        if self.teacher.cache is not None:
            raise ValueError("teacher.cache holds a teacher's log-probs for KD objectives; this recipe has no "
                             "teacher and no objectives")
        if self.generation.lmbda or (self.generation.seq_kd and self.teacher.endpoint is None):
            raise ValueError("generation.lmbda and generation.seq_kd sample from a live teacher; give teacher.path "
                             "(or, for seq_kd, teacher.endpoint)")

    def _check_step_by_step(self) -> None:
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

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------- loading, overrides, error messages


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b=c` overrides (values parsed as YAML; list items addressed by index)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trainer.max_steps=200")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {key}: {'.'.join(parts[:i]) or 'recipe'} is a list of "
                                    f"{len(node)} items; {part!r} is not a valid index")
                part = int(part)
            elif not isinstance(node, dict):
                raise UserError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping")
            if last:
                node[part] = yaml.safe_load(value)
            else:
                if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
    return raw


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the YAML node at `loc`, or of its deepest existing parent."""
    node, line = root, None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
            if node is None:
                # the key itself may exist (error about the key, e.g. an unknown one)
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _key_line(root: yaml.Node | None, loc: tuple) -> int | None:
    parent = _line_of(root, loc[:-1]) if loc else None
    node = root
    for key in loc[:-1]:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return parent
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if k.value == str(loc[-1]):
                return k.start_mark.line + 1
    return parent


def _fields_at(loc: tuple) -> list[str]:
    """Field names allowed at `loc` (the parent of an unknown key)."""
    model: Any = Recipe
    for key in loc:
        if isinstance(key, int):
            continue
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return []
        ann = field.annotation
        for candidate in (ann, *getattr(ann, "__args__", ())):
            inner = getattr(candidate, "__args__", ())
            for c in (candidate, *inner):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    model = c
                    break
            else:
                continue
            break
    return list(getattr(model, "model_fields", {}))


def format_validation_error(err: ValidationError, source: str, root: yaml.Node | None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after", "function-before"))
        loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith("function")))
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), _fields_at(loc[:-1]))
            msg = f"unknown key {str(loc[-1])!r}{hint}"
            line = _key_line(root, loc)
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("missing", "value_error") and "input" in e:
                msg += f" (got {e['input']!r})"
            line = _line_of(root, loc) if e["type"] != "missing" else _line_of(root, loc[:-1])
        where = f"{source}, line {line}" if line else source
        lines.append(f"{where}: field {path}: {msg}")
    return "invalid recipe:\n  " + "\n  ".join(lines)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem becomes a `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping (key: value lines), got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    recipe = validate_recipe(raw, source=str(path), root=root)
    recipe_dir = path.resolve().parent
    _resolve_relative(recipe, recipe_dir)
    return recipe


def validate_recipe(raw: dict, *, source: str = "recipe", root: yaml.Node | None = None) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source, root)) from None


def _resolve_relative(recipe: Recipe, base: Path) -> None:
    """Data and weight paths in a recipe are relative to the recipe's folder."""

    def fix(p: str | None) -> str | None:
        if p is None or p.startswith("builtin:") or Path(p).is_absolute():
            return p
        candidate = base / p
        return str(candidate) if candidate.exists() or not Path(p).exists() else p

    for src in (recipe.data.train, recipe.data.eval, recipe.eval.probe_train, recipe.eval.probe_test,
                recipe.eval.pairs):
        if src is not None:
            src.path = fix(src.path)
    recipe.teacher.weights = fix(recipe.teacher.weights)
    recipe.teacher.cache = fix(recipe.teacher.cache)
    if recipe.teacher.tokenizer and (base / recipe.teacher.tokenizer).exists():
        recipe.teacher.tokenizer = str(base / recipe.teacher.tokenizer)
    if recipe.teacher.path and (base / recipe.teacher.path).exists():
        recipe.teacher.path = str(base / recipe.teacher.path)
    if recipe.student.path and (base / recipe.student.path).exists():
        recipe.student.path = str(base / recipe.student.path)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
