"""The recipes of the encoder tasks: classification, embedding, vision and ranking.

Each is a `RecipeBase` whose sections hold only the fields its task reads, so a field of another task is an
unknown key; the rules that concern one task only are that recipe's `check`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, model_validator

from potstill.config.common import (
    DataConfig,
    DataSource,
    DomainWeightedData,
    EvalConfig,
    NoDomains,
    NoTopKCache,
    RecipeBase,
    Strict,
    StudentConfig,
    TeacherConfig,
    check_domains,
    check_domains_teacher,
)
from potstill.config.paths import ModelPath, RelPath

Pooling = Literal["mean", "cls"]
POOLING_DESCRIPTION = "sentence pooling of the encoder's token vectors"


class EncoderTeacherConfig(NoTopKCache, TeacherConfig):
    """The teacher of the classification, embedding, vision and ranking tasks: the common fields."""


class EncoderData(NoDomains, DataConfig):
    """The data of the embedding and vision tasks: the common fields."""


class ClassificationRecipe(RecipeBase):
    """task: classification: a classifier (a factory model on features, or a Hugging Face sequence classifier on
    text) distilled on its logits."""

    task: Literal["classification"]
    teacher: EncoderTeacherConfig = Field(default_factory=EncoderTeacherConfig, description="the teacher model")
    data: DomainWeightedData

    def check(self) -> None:
        self.check_loss()
        if self.data.domains is not None:
            check_domains(self)
            check_domains_teacher(self)
        self.check_prune()
        self.check_teacher()


class EmbeddingStudentConfig(StudentConfig):
    """The embedding task's student: also a static-embedding student."""

    init: Literal["layers_from_teacher", "from_config", "pretrained", "factory", "pruned", "static"] = Field(
        "layers_from_teacher", description="how the student is built; pruned: the teacher cut to the dims in "
        "student.config by mask-gradient importance (MiniMA); static: a model2vec-style static-embedding "
        "student made from the teacher without data, config {pca_dims: 256, sif_coefficient: 1e-4, normalize: "
        "true}")


class WeightedTeacherSource(Strict):
    """One more teacher of a DistillWeighted embedding run: a sentence encoder and its weight."""

    path: ModelPath = Field(description="Hugging Face encoder folder or id, or builtin:minilm (its own tokenizer; "
                            "pooled as the recipe's `pooling`)")
    weight: float = Field(gt=0, description="the source's weight w_s (the weights are normalised to sum to 1); "
                          "`potstill search --teachers` writes its similarity weights here")


class EmbeddingTeacherConfig(EncoderTeacherConfig):
    """The embedding task's teacher: also DistillWeighted's sources."""

    sources: list[WeightedTeacherSource] = Field(
        default_factory=list, description="DistillWeighted (Borup et al. 2023): distil these encoders instead of "
        "teacher.path alone, loss Σ_s w_s · ‖head_s(student) − unit(source_s)‖² with one learned head per source "
        "(embedding_mse only); teacher.path still gives the student's init, tokenizer and the cosine / recall "
        "evaluation; list it here too to distil it")


class EmbeddingEvalConfig(EvalConfig):
    probe_train: DataSource | None = Field(None, description="labelled texts to fit a linear probe")
    probe_test: DataSource | None = Field(None, description="labelled texts to score the probe")
    pairs: DataSource | None = Field(None, description="text_a/text_b/score pairs for Spearman (builtin:lee "
                                     "gives the Lee 50-document ratings)")


class EmbeddingRecipe(RecipeBase):
    """task: embedding: a sentence encoder distilled on its pooled vectors."""

    task: Literal["embedding"]
    teacher: EmbeddingTeacherConfig = Field(default_factory=EmbeddingTeacherConfig, description="the teacher model")
    student: EmbeddingStudentConfig = Field(description="how the student is built")
    data: EncoderData
    pooling: Pooling = Field("mean", description=POOLING_DESCRIPTION)
    eval: EmbeddingEvalConfig = Field(default_factory=EmbeddingEvalConfig)

    def check(self) -> None:
        super().check()
        if self.student.init == "static":
            unknown = sorted(set(self.student.config) - {"pca_dims", "sif_coefficient", "normalize"})
            if unknown:
                raise ValueError(f"student.config for init static takes pca_dims, sif_coefficient and normalize; "
                                 f"got {', '.join(unknown)}")
        if self.teacher.sources:
            self._check_sources()

    def _check_sources(self) -> None:
        """DistillWeighted's sources: a teacher folder to build the student from, and embedding_mse as the only
        objective on the output vectors (the weighted per-source MSE is one MSE on a weighted concatenation)."""
        from potstill.losses import get_objective

        if self.teacher.path is None:
            raise ValueError("teacher.sources needs teacher.path (the encoder whose tokenizer and layers the student "
                             "starts from), not teacher.factory")
        if self.student.init == "static":
            raise ValueError("teacher.sources: a static student is built without training; drop the sources or use "
                             "another student.init")
        for i, objective in enumerate(self.objectives):
            if get_objective(objective.name).kind == "embedding" and objective.name != "embedding_mse":
                raise ValueError(f"objectives.{i}.name: with teacher.sources the output vectors are distilled by "
                                 f"embedding_mse (DistillWeighted's weighted per-source MSE); got {objective.name}")


class VisionRecipe(RecipeBase):
    """task: vision: masked-image-modelling distillation of ViTs (DMAE)."""

    task: Literal["vision"]
    teacher: EncoderTeacherConfig = Field(default_factory=EncoderTeacherConfig, description="the teacher model")
    data: EncoderData


class RankingConfig(Strict):
    """ranking task: how teacher and student score a (query, passage) pair, and where negatives come from."""

    teacher_type: Literal["auto", "bi_encoder", "cross_encoder"] = Field(
        "auto", description="cross_encoder: a sequence classifier with one logit scores the pair; bi_encoder: "
        "pooled encoder vectors, compared by `similarity`; auto: cross_encoder when the teacher's config names a "
        "*ForSequenceClassification architecture")
    student_type: Literal["bi_encoder", "cross_encoder", "splade"] = Field(
        "bi_encoder", description="the student's kind; splade: a sparse bi-encoder whose vectors are vocabulary "
        "term weights, max over tokens of log(1 + ReLU(MLM logits)) (an MLM head is added to a plain encoder), "
        "scored by dot product; regularise it with the sparse_flops objective")
    inference_free: StrictBool = Field(False, description="splade students: queries are not encoded; a query's "
                                 "weights are the IDF (over the collection) of its distinct tokens (Geng et al. "
                                 "2024), saved as a SparseEncoder with a static query route")
    teacher_scores: RelPath | list[RelPath] | None = Field(
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
    in_batch_negatives: StrictBool = Field(False, description="hard-label loss of a bi-encoder student: the other "
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


class RankingData(NoDomains, DataConfig):
    collection: DataSource | None = Field(None, description="more passages (a `passage` or `text` column) for the "
                                          "collection that negatives are mined from and the held-out queries are "
                                          "ranked over, next to the records' positives")


class RankingRecipe(RecipeBase):
    """task: ranking: (query, passage) relevance scores, e.g. a cross-encoder teacher and a bi-encoder student."""

    task: Literal["ranking"]
    teacher: EncoderTeacherConfig = Field(default_factory=EncoderTeacherConfig, description="the teacher model "
                                          "(optional when ranking.teacher_scores gives its scores)")
    data: RankingData
    pooling: Pooling = Field("mean", description=POOLING_DESCRIPTION)
    ranking: RankingConfig = Field(default_factory=RankingConfig, description="model kinds, similarity, negatives")

    def check_teacher(self) -> None:
        if not self.has_teacher_model() and self.ranking.teacher_scores is None:
            raise ValueError("give exactly one of teacher.path or teacher.factory (or only ranking.teacher_scores, "
                             "a file of the teacher's scores)")


class MaskingConfig(Strict):
    """masked_lm task: BERT / RoBERTa-style token masking (transformers' DataCollatorForLanguageModeling)."""

    mlm_probability: float = Field(0.15, gt=0, lt=1, description="share of the real tokens the MLM loss predicts")
    mask_replace_prob: float = Field(0.8, ge=0, le=1, description="of the chosen tokens, the share replaced by "
                                     "the mask token")
    random_replace_prob: float = Field(0.1, ge=0, le=1, description="of the chosen tokens, the share replaced by "
                                       "a random token (the rest stay as they are)")

    @model_validator(mode="after")
    def _shares(self) -> MaskingConfig:
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError(f"masking.mask_replace_prob + masking.random_replace_prob must be ≤ 1, got "
                             f"{self.mask_replace_prob} + {self.random_replace_prob}")
        return self


class MaskedLMEvalConfig(EvalConfig):
    probe_train: DataSource | None = Field(None, description="labelled texts (text, label) to fit a linear probe "
                                           "on the frozen final-layer [CLS] vectors")
    probe_test: DataSource | None = Field(None, description="labelled texts to score the probe")


class MaskedLMRecipe(RecipeBase):
    """task: masked_lm: (further) pre-training of a BERT-layout encoder with its masked-language-model loss
    (trainer.hard_label_weight), optionally pulled towards a teacher's [CLS] vectors (further_pretraining_sd)."""

    task: Literal["masked_lm"]
    teacher: EncoderTeacherConfig = Field(default_factory=EncoderTeacherConfig, description="the teacher model "
                                          "(an encoder; only its [CLS] vectors are read, by the objectives)")
    data: EncoderData
    masking: MaskingConfig = Field(default_factory=MaskingConfig, description="which tokens the MLM loss predicts")
    eval: MaskedLMEvalConfig = Field(default_factory=MaskedLMEvalConfig)
