"""`proxy: supernet` of `potstill search`: AutoDistil's weight-sharing supernet, trained once per study, scores
every candidate as a slice of its weights without training the candidate.

Xu et al. 2022, "AutoDistil: Few-shot Task-agnostic Neural Architecture Search for Distilling Large Language
Models": one copy of the teacher holds every student of an elastic space (depth × hidden width × FFN width,
`potstill.students.supernet`); it is trained with the sandwich rule (per step the largest, the smallest and
`n_random` random subnets, gradients accumulated into the shared weights) on a self-attention relation loss:
for the last layer's queries, keys and values a of a subnet S and the teacher T, split into R relation heads,

    L(S) = Σ_{a ∈ q, k, v} mean over heads and real token pairs (i, j) of (a_S,i · a_S,j − a_T,i · a_T,j)² / d_r

(d_r the relation head size). The search then ranks subnets by L on held-out texts. Defaults (`SupernetSettings`,
`benchmarks/supernet_suite.py`'s measured setting, where the ranking reached Kendall τ .667 against trained
suite quality): 240 steps of batch 8 at 32 tokens, AdamW lr 1e-4 without weight decay, 2 random subnets, R = the
teacher's head count, the recipe's training texts, the first 64 of its held-out texts.

Per study, in `<study>/supernet/`: `supernet.safetensors` (the trained weights, written atomically) and
`manifest.json` (the settings it was trained with, written last). A rerun of the search, killed or not, loads
it instead of training again; a rerun with other settings is refused. While it trains, `partial.pt` (weights,
optimizer, random states, step; atomic) is written every `SAVE_EVERY` steps, so a search killed during the
supernet's training continues it where it stopped and ends with the same weights; so does one that ran out of
`--budget` during it (the state is saved at that step and the search ends). Per trial: the quality is the
candidate's held-out relation loss (`supernet_loss`, minimized); the candidate is extracted as a standalone `BertModel`
folder `<study>/students/<label>/` (the trained supernet's slice, with the tokenizer) and its speed-up over the
teacher is measured as for the other proxies (`trial.measured_speed`). The candidate's recipe (a Pareto point's)
is the search recipe with `student: {init: pretrained, path: <that folder>}`: `potstill run` distils it further.

A subnet of depth L keeps the teacher layers `spread_layers(L, teacher layers)` (the first and the last, evenly
between), so a layer-drop choice is a subnet only when it is that spread: the space takes `depth`, not `layers`.
"""

from __future__ import annotations

import copy
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from potstill.errors import UserError
from potstill.search.space import SUPERNET_METRIC, SearchSpace, SupernetSettings, TextSource
from potstill.search.trial import BUILD_FIELDS, TrialResult, measured_speed
from potstill.students.supernet import ElasticBert, ElasticSpace, Subnet

SUPERNET_DIR = "supernet"
WEIGHTS_FILE = "supernet.safetensors"
MANIFEST_FILE = "manifest.json"
PARTIAL_FILE = "partial.pt"
SAVE_EVERY = 20  # supernet steps between the partial saves of an unfinished training
STUDENTS_DIR = "students"
HELDOUT_LIMIT = 64


def teacher_config(recipe: Any) -> Any:
    from transformers import AutoConfig

    from potstill.students.loading import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(str(recipe.teacher.path), field="teacher.path"))


def elastic_space(space: SearchSpace, config: Any) -> ElasticSpace:
    """The space's depth / width / FFN choices, sorted; a dim the space leaves out keeps the teacher's."""
    s = space.student
    return ElasticSpace(layers=tuple(sorted(set(s.depth or [config.num_hidden_layers]))),
                        hidden=tuple(sorted(set(s.width or [config.hidden_size]))),
                        ffn=tuple(sorted(set(s.ffn or [config.intermediate_size]))))


def relation_heads(space: SearchSpace, config: Any) -> int:
    return (space.supernet or SupernetSettings()).relation_heads or config.num_attention_heads


def check_supernet_space(space: SearchSpace, recipe: Any, source: str) -> None:
    """Refuse, in one line naming `source` and the field, what the supernet cannot slice: a task other than
    embedding, a teacher that is not BERT-layout, a candidate outside the teacher's dims."""
    where = f"search space {source}"
    if recipe.task != "embedding":
        raise UserError(f"{where}: field proxy: supernet slices a BERT-layout encoder; it needs an embedding "
                        f"recipe, not {recipe.task}")
    config = teacher_config(recipe)
    if getattr(config, "model_type", None) != "bert":
        raise UserError(f"{where}: field proxy: supernet needs a BERT-layout teacher (model_type bert); "
                        f"{recipe.teacher.path} is {getattr(config, 'model_type', '?')}")
    head = config.hidden_size // config.num_attention_heads
    heads = relation_heads(space, config)
    s = space.student
    for depth in s.depth or []:
        if depth > config.num_hidden_layers:
            raise UserError(f"{where}: field student.depth: {depth} is more than the teacher's "
                            f"{config.num_hidden_layers} layers")
    for width in s.width or []:
        if width > config.hidden_size or width % head:
            raise UserError(f"{where}: field student.width: {width} must be a multiple of the teacher's head size "
                            f"{head} up to its width {config.hidden_size}")
        if width % heads:
            raise UserError(f"{where}: field student.width: {width} is not divisible by the {heads} relation heads "
                            f"(supernet.relation_heads)")
    for ffn in s.ffn or []:
        if ffn > config.intermediate_size:
            raise UserError(f"{where}: field student.ffn: {ffn} is more than the teacher's FFN width "
                            f"{config.intermediate_size}")


def subnet_of(values: dict[str, Any], elastic: ElasticSpace) -> Subnet:
    """The subnet a trial's sampled values name (a dim not sampled: the space's only choice)."""
    return Subnet(values.get("depth", elastic.layers[0]), values.get("width", elastic.hidden[0]),
                  values.get("ffn", elastic.ffn[0]))


def all_values(space: SearchSpace, elastic: ElasticSpace) -> list[dict[str, Any]]:
    """Every subnet of the space as trial values (enqueued: AutoDistil scores the whole space, it is cheap)."""
    s = space.student
    rows = []
    for subnet in elastic.all():
        row: dict[str, Any] = {"init": "supernet"}
        for field, value in (("depth", subnet.layers), ("width", subnet.hidden), ("ffn", subnet.ffn)):
            if getattr(s, field) is not None:
                row[field] = value
        rows.append(row)
    return rows


def student_folder(study_dir: Path, subnet: Subnet) -> Path:
    return (study_dir / STUDENTS_DIR / subnet.label).resolve()


def supernet_overrides(values: dict[str, Any], base: dict[str, Any], elastic: ElasticSpace,
                       study_dir: Path) -> list[str]:
    """The `--set` items that make the recipe `base` distil the candidate's extracted folder."""
    student = {k: v for k, v in (base.get("student") or {}).items() if k not in BUILD_FIELDS}
    student.update(init="pretrained", path=str(student_folder(study_dir, subnet_of(values, elastic))))
    return ["student=null", f"student={json.dumps(student)}"]


def _texts(source: TextSource) -> list[str]:
    from potstill.data.loaders import load_source

    records = load_source(source.path, split=source.split, limit=source.limit, required=("text",),
                          field="search space supernet data")
    return [r["text"] for r in records]


def _batches(tokenizer: Any, texts: list[str], size: int, max_length: int) -> list[dict[str, Any]]:
    from potstill.encoder_inputs import encoder_inputs

    return [encoder_inputs(tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=max_length,
                                     return_tensors="pt")) for i in range(0, len(texts), size)]


def training_texts(pool: list[str], count: int, seed: int) -> list[str]:
    """`count` texts drawn without replacement from `pool` (cycled through reshuffles when it is smaller)."""
    rng = random.Random(seed)
    if len(pool) >= count:
        return rng.sample(pool, count)
    out: list[str] = []
    while len(out) < count:
        out += rng.sample(pool, len(pool))
    return out[:count]


class SupernetUnfinished(Exception):
    """The search's budget ran out while the supernet trained; its state is in `partial.pt` for the rerun."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"the budget ran out while the supernet trained (step {step} of {total}, saved)")
        self.step, self.total = step, total


class SupernetProxy:
    """The study's supernet (trained or loaded on construction) and the per-trial scoring. Past `deadline`
    (a `time.perf_counter()` value) an unfinished training saves its state and raises `SupernetUnfinished`."""

    def __init__(self, recipe_path: Path, user_sets: list[str], space: SearchSpace, study_dir: Path,
                 deadline: float | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        from potstill.config import load_recipe
        from potstill.students.loading import resolve_model_path

        self.recipe_path, self.user_sets, self.study_dir = recipe_path, user_sets, study_dir
        self.deadline = deadline
        self.recipe = load_recipe(recipe_path, user_sets)
        self.settings = space.supernet or SupernetSettings()
        folder = resolve_model_path(str(self.recipe.teacher.path), field="teacher.path")
        self.teacher = AutoModel.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.space = elastic_space(space, self.teacher.config)
        self.heads = relation_heads(space, self.teacher.config)
        self.train_source = self.settings.train or TextSource(path=str(self.recipe.data.train.path),
                                                              split=self.recipe.data.train.split,
                                                              limit=self.recipe.data.train.limit)
        held = self.recipe.data.eval
        if self.settings.heldout is not None:
            self.heldout_source = self.settings.heldout
        elif held is not None:
            self.heldout_source = TextSource(path=str(held.path), split=held.split, limit=held.limit or HELDOUT_LIMIT)
        else:
            raise UserError("search space: field supernet.heldout: the recipe has no data.eval; give the held-out "
                            "texts {path, split, limit}")
        self.elastic, self.trained_now, self.train_seconds = self._load_or_train()
        held_batches = _batches(self.tokenizer, _texts(self.heldout_source), self.settings.batch_size,
                                self.settings.max_length)
        self.heldout = [(inputs, self.teacher_qkv(inputs)) for inputs in held_batches]
        self._losses: dict[Subnet, float] = {}
        self._speed_task: Any = None

    # ---- the supernet, trained once per study
    def manifest(self) -> dict[str, Any]:
        """What the stored supernet must have been trained with to be reused."""
        return {"format": 1, "teacher": str(self.recipe.teacher.path),
                "space": {"depth": list(self.space.layers), "width": list(self.space.hidden),
                          "ffn": list(self.space.ffn)}, "relation_heads": self.heads,
                "settings": self.settings.model_dump(exclude={"train", "heldout"}),
                "train": self.train_source.model_dump(), "heldout": self.heldout_source.model_dump()}

    def _load_or_train(self) -> tuple[ElasticBert, bool, float]:
        from safetensors.torch import load_file

        folder = self.study_dir / SUPERNET_DIR
        manifest_path, weights = folder / MANIFEST_FILE, folder / WEIGHTS_FILE
        wanted = self.manifest()
        supernet = copy.deepcopy(self.teacher)
        if manifest_path.is_file() and weights.is_file():
            stored = json.loads(manifest_path.read_text(encoding="utf-8"))
            if {k: stored.get(k) for k in wanted} != wanted:
                raise UserError(f"{folder}: this study's supernet was trained with other settings (teacher, space "
                                f"dims or supernet block); use another --study-dir")
            supernet.load_state_dict(load_file(str(weights)))
            return ElasticBert(supernet.eval(), self.space), False, float(stored.get("seconds", 0.0))
        start = time.perf_counter()
        elastic = ElasticBert(supernet.requires_grad_(True), self.space)
        final = self.train(elastic)
        seconds = time.perf_counter() - start
        self._save(elastic, {**wanted, "seconds": round(seconds, 1), "final_train_loss": final})
        return elastic.eval(), True, seconds

    def teacher_qkv(self, inputs: dict[str, Any]) -> list[Any]:
        import torch

        from potstill.students.supernet import last_layer_qkv

        with torch.no_grad(), last_layer_qkv(self.teacher) as qkv:
            self.teacher(**inputs)
        return [qkv[p] for p in ("query", "key", "value")]

    def train(self, elastic: ElasticBert) -> float:
        """`steps` sandwich steps (see the module docstring); returns the mean loss of the last 10 steps."""
        import torch

        from potstill.students.supernet import sandwich_step
        from potstill.ui import task_progress

        s = self.settings
        texts = training_texts(_texts(self.train_source), s.steps * s.batch_size, s.seed)
        batches = _batches(self.tokenizer, texts, s.batch_size, s.max_length)
        torch.manual_seed(s.seed)
        rng = random.Random(s.seed)
        optimizer = torch.optim.AdamW([p for p in elastic.parameters() if p.requires_grad], lr=s.lr,
                                      weight_decay=0.0)
        elastic.train()
        losses: list[float] = []
        partial = self.study_dir / SUPERNET_DIR / PARTIAL_FILE
        start = self._resume_partial(partial, elastic, optimizer, rng, losses)
        with task_progress(f"supernet: {s.steps} sandwich steps (once per study)", s.steps) as advance:
            advance(start)
            for step in range(start, len(batches)):
                inputs = batches[step]
                losses.append(sandwich_step(elastic, self.space.sample(rng, n_random=s.n_random), inputs,
                                            self.teacher_qkv(inputs), heads=self.heads))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                advance(1)
                out_of_time = self.deadline is not None and time.perf_counter() > self.deadline
                if step + 1 < len(batches) and ((step + 1) % SAVE_EVERY == 0 or out_of_time):
                    self._save_partial(partial, step + 1, elastic, optimizer, rng, losses)
                    if out_of_time:
                        raise SupernetUnfinished(step + 1, len(batches))
        return statistics.fmean(losses[-10:])

    def _save_partial(self, path: Path, step: int, elastic: ElasticBert, optimizer: Any, rng: random.Random,
                      losses: list[float]) -> None:
        import io

        import torch

        from potstill.io import atomic_write_bytes

        buffer = io.BytesIO()
        torch.save({"manifest": self.manifest(), "step": step, "supernet": elastic.state_dict(),
                    "optimizer": optimizer.state_dict(), "python_rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "losses": losses}, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def _resume_partial(self, path: Path, elastic: ElasticBert, optimizer: Any, rng: random.Random,
                        losses: list[float]) -> int:
        """The step an interrupted training of this study's supernet reached (its state restored), else 0."""
        import torch

        if not path.is_file():
            return 0
        saved = torch.load(path, map_location="cpu", weights_only=False)  # written by _save_partial above
        if saved["manifest"] != self.manifest():
            raise UserError(f"{path}: this study's unfinished supernet was trained with other settings (teacher, "
                            f"space dims or supernet block); use another --study-dir")
        elastic.load_state_dict(saved["supernet"])
        optimizer.load_state_dict(saved["optimizer"])
        rng.setstate(saved["python_rng"])
        torch.set_rng_state(saved["torch_rng"])
        losses.extend(saved["losses"])
        return int(saved["step"])

    def _save(self, elastic: ElasticBert, manifest: dict[str, Any]) -> None:
        from safetensors.torch import save

        from potstill.io import atomic_write_bytes, atomic_write_json

        folder = self.study_dir / SUPERNET_DIR
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in elastic.supernet.state_dict().items()}
        atomic_write_bytes(folder / WEIGHTS_FILE, save(state))
        atomic_write_json(folder / MANIFEST_FILE, manifest)  # last: its presence means the weights are whole
        (folder / PARTIAL_FILE).unlink(missing_ok=True)

    # ---- per trial
    def heldout_loss(self, subnet: Subnet) -> float:
        """The subnet's mean relation loss over the held-out batches (no gradients, eval mode)."""
        import torch

        from potstill.students.supernet import subnet_relation_loss

        if subnet not in self._losses:
            self.elastic.eval()
            with torch.no_grad():
                self._losses[subnet] = statistics.fmean(
                    float(subnet_relation_loss(self.elastic, subnet, inputs, target, heads=self.heads))
                    for inputs, target in self.heldout)
        return self._losses[subnet]

    def extract(self, subnet: Subnet) -> Any:
        """The subnet as a standalone `BertModel`, saved once in `<study>/students/<label>/` with the tokenizer."""
        from potstill.io import atomic_dir

        model: Any = self.elastic.extract(subnet).eval()
        folder = student_folder(self.study_dir, subnet)
        if not (folder / "config.json").is_file():
            with atomic_dir(folder) as tmp:
                model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
        return model

    def _task(self, candidate: list[str]) -> Any:
        """The recipe's task with a candidate student, built once for the speed measurements (training texts
        cut to 256: only the teacher cache reads them)."""
        if self._speed_task is None:
            from potstill.config import load_recipe
            from potstill.search.trial import share_teacher_cache
            from potstill.tasks import build_task

            sets = [*self.user_sets, *candidate, "name=speed",
                    f"output_dir={json.dumps(str(self.study_dir / 'trials'))}"]
            recipe = load_recipe(self.recipe_path, sets)
            train = recipe.data.train.model_copy(update={"limit": min(256, recipe.data.train.limit or 256)})
            recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"train": train})})
            share_teacher_cache(recipe.run_dir)
            self._speed_task = build_task(recipe, run_dir=recipe.run_dir)
            self._speed_task.setup()
        return self._speed_task

    def run_trial(self, values: dict[str, Any], candidate: list[str]) -> TrialResult:
        from potstill.eval import count_parameters

        start = time.perf_counter()
        subnet = subnet_of(values, self.space)
        self.elastic.check(subnet)
        loss = self.heldout_loss(subnet)
        student = self.extract(subnet)
        task = self._task(candidate)
        task.student = student
        speed = measured_speed(task, self.study_dir)
        metrics = {SUPERNET_METRIC: loss, "teacher_per_s": speed["teacher"], "student_per_s": speed["student"]}
        return TrialResult(quality=loss, speedup=speed["speedup"], params=count_parameters(student),
                           seconds=time.perf_counter() - start, metrics=metrics)

    def done(self, study: Any) -> bool:
        """Whether every subnet of the space has a finished trial (the search then stops: nothing is left)."""
        from optuna.trial import TrialState

        scored = {subnet_of(t.params, self.space) for t in study.get_trials(deepcopy=False,
                                                                             states=(TrialState.COMPLETE,))}
        return set(self.space.all()) <= scored

    def describe(self) -> dict[str, Any]:
        return {"folder": str(self.study_dir / SUPERNET_DIR), "trained_now": self.trained_now,
                "train_seconds": round(self.train_seconds, 1), **self.manifest()}
