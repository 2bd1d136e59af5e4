"""Build students from a Hugging Face teacher: by keeping some of its layers, or from a shrunk config."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from potstill.errors import did_you_mean

# Config attributes that may hold the number of layers (transformers maps most aliases to num_hidden_layers).
_LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Config fields that hold a dropout rate, across the common architectures (BERT, Llama, GPT-2, T5, BART, ...).
DROPOUT_CONFIG_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout",
                         "hidden_dropout", "activation_dropout", "dropout", "dropout_rate", "resid_pdrop",
                         "embd_pdrop", "attn_pdrop")
# Config lists with one entry per layer, sliced along with the layers.
_PER_LAYER_LIST_ATTRS = ("layer_types", "no_rope_layers", "block_types", "attention_types_per_layer")


def _layer_count_attr(config: PretrainedConfig) -> str:
    for attr in _LAYER_COUNT_ATTRS:
        if isinstance(getattr(config, attr, None), int):
            return attr
    raise ValueError(
        f"cannot find the number of layers in {type(config).__name__} "
        f"(looked for {', '.join(_LAYER_COUNT_ATTRS)})"
    )


def _num_layers(config: PretrainedConfig) -> int:
    return int(getattr(config, _layer_count_attr(config)))


def _per_layer_lists(config: PretrainedConfig, n: int) -> list[str]:
    names = []
    for attr in _PER_LAYER_LIST_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            names.append(attr)
    return names


def _check_layers(layers: Sequence[int], n_teacher: int) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a list of teacher layer indices, got {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError(
            f"layers is empty; pick at least one of the teacher's {n_teacher} layers (0..{n_teacher - 1})"
        )
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"layers must be whole numbers, got {i!r} in {layers}")
        if not 0 <= i < n_teacher:
            raise ValueError(
                f"layer index {i} is out of range: the teacher has {n_teacher} layers (0..{n_teacher - 1})"
            )
    if len(set(layers)) != len(layers):
        dup = sorted({i for i in layers if layers.count(i) > 1})
        raise ValueError(
            f"layers {layers} repeat {dup}; each of the teacher's {n_teacher} layers can be used once"
        )
    if layers != sorted(layers):
        raise ValueError(f"layers {layers} must be increasing (teacher has {n_teacher} layers)")
    return layers


def _layer_stacks(model: nn.Module, n: int) -> list[str]:
    """Names of the nn.ModuleLists of length `n` (the layer stacks), outermost first."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    # Drop lists nested inside another candidate (e.g. a per-layer list inside one layer).
    return [name for name in names if not any(name != o and name.startswith(o + ".") for o in names)]


def _student_config(teacher_config: PretrainedConfig, layers: list[int]) -> PretrainedConfig:
    n = _num_layers(teacher_config)
    config = copy.deepcopy(teacher_config)
    setattr(config, _layer_count_attr(config), len(layers))
    for attr in _per_layer_lists(teacher_config, n):
        value = getattr(teacher_config, attr)
        setattr(config, attr, type(value)(value[i] for i in layers))
    return config


def _new_model_like(model_cls: type[PreTrainedModel], config: PretrainedConfig, dtype: torch.dtype) -> Any:
    """Instantiate `model_cls(config)` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        model = model_cls(config)
    return model.to(dtype)


def spread_layers(depth: int, n_teacher: int) -> list[int]:
    """`depth` teacher layers spread evenly from the first to the last (depth 1: the first)."""
    if depth >= n_teacher:
        return list(range(n_teacher))
    if depth == 1:
        return [0]
    return sorted({round(i * (n_teacher - 1) / (depth - 1)) for i in range(depth)})


def layers_from_teacher(teacher: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A student of the teacher's class keeping the teacher layers `layers` (DistilBERT-style init).

    Student layer k is a copy of teacher layer ``layers[k]``; every other weight (embeddings, pooler, final
    norm, heads) is copied from the teacher. The student shares no storage with the teacher, has the
    teacher's dtype, and is in train mode.
    """
    n_teacher = _num_layers(teacher.config)
    layers = _check_layers(layers, n_teacher)
    stacks = _layer_stacks(teacher, n_teacher)
    if not stacks:
        raise ValueError(
            f"cannot find the layer stack of {type(teacher).__name__}: no nn.ModuleList of length {n_teacher}"
        )

    config = _student_config(teacher.config, layers)
    student = _new_model_like(type(teacher), config, teacher.dtype)
    student_modules = dict(student.named_modules())
    stacks = [s for s in stacks if isinstance(student_modules.get(s), nn.ModuleList)]
    for s in stacks:
        if len(student_modules[s]) != len(layers):
            raise ValueError(
                f"{type(teacher).__name__}: the student's {s!r} has {len(student_modules[s])} entries, "
                f"expected {len(layers)}"
            )

    patterns = [(re.compile(rf"^{re.escape(s)}\.(\d+)\.(.*)$" if s else r"^(\d+)\.(.*)$"), s) for s in stacks]
    inverse = {teacher_idx: k for k, teacher_idx in enumerate(layers)}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in teacher.state_dict().items():
        for pattern, stack in patterns:
            match = pattern.match(key)
            if match:
                t_idx = int(match.group(1))
                if t_idx in inverse:
                    prefix = f"{stack}." if stack else ""
                    state[f"{prefix}{inverse[t_idx]}.{match.group(2)}"] = tensor
                break
        else:
            state[key] = tensor

    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not _is_tied(student, k)]
    if missing or unexpected:
        raise ValueError(
            f"copying {type(teacher).__name__} weights into the student failed: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.train()
    return student


def set_dropout(model: nn.Module, p: float) -> int:
    """Set every dropout rate of `model` to `p` in place; return how many modules and config fields changed.

    Covers `nn.Dropout`-style modules (BERT and GPT-2 read their attention dropout from one), float
    `attention_dropout` attributes (Llama-style attention reads that instead), and the config fields of
    DROPOUT_CONFIG_FIELDS, so that a saved student records the rate it trained with. A LoRA adapter's own
    dropout is added later and is not touched.
    """
    if not 0 <= p < 1:
        raise ValueError(f"a dropout rate is in [0, 1), got {p}")
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p, changed = p, changed + 1
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout, changed = p, changed + 1
    config = getattr(model, "config", None)
    for name in DROPOUT_CONFIG_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(config, name, p)
            changed += 1
    return changed


def _is_tied(model: nn.Module, key: str) -> bool:
    """Whether the parameter `key` shares storage with another (tied embeddings are saved once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    ptr = params[key].data_ptr()
    return any(other != key and p.data_ptr() == ptr for other, p in params.items())


def _config_keys(config: PretrainedConfig) -> list[str]:
    keys = set(config.to_dict())
    keys.update(getattr(config, "attribute_map", {}) or {})
    return sorted(keys)


def from_config(
    teacher_or_config: PreTrainedModel | PretrainedConfig, *, seed: int = 0, **overrides: Any
) -> PreTrainedModel:
    """A randomly initialised model from the teacher's (or the given) config with `overrides` applied.

    E.g. ``from_config(teacher, num_hidden_layers=2, hidden_size=128, intermediate_size=512,
    num_attention_heads=2)``. Weights are drawn under ``torch.manual_seed(seed)``; the global RNG state is
    restored afterwards. Given a model, the student has its class and dtype; given a config, it is
    ``AutoModel.from_config``.
    """
    if isinstance(teacher_or_config, PreTrainedModel):
        teacher: PreTrainedModel | None = teacher_or_config
        base = teacher_or_config.config
    elif isinstance(teacher_or_config, PretrainedConfig):
        teacher, base = None, teacher_or_config
    else:
        raise TypeError(
            f"from_config needs a PreTrainedModel or a PretrainedConfig, got {type(teacher_or_config)}"
        )

    known = _config_keys(base)
    for key in overrides:
        settable = not key.startswith("_") and hasattr(base, key) and not callable(getattr(base, key))
        if key not in known and not settable:
            hint = did_you_mean(key, known)
            raise ValueError(f"unknown config field {key!r} for {type(base).__name__}{hint}")

    config = copy.deepcopy(base)
    old_layers = _num_layers(base) if any(hasattr(base, a) for a in _LAYER_COUNT_ATTRS) else None
    old_heads = getattr(base, "num_attention_heads", None)
    old_hidden = getattr(base, "hidden_size", None)
    for key, value in overrides.items():
        setattr(config, key, value)

    # Keep derived fields consistent with the overrides unless they were overridden too.
    new_heads = getattr(config, "num_attention_heads", None)
    new_hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(base, "head_dim", None)
    if "head_dim" not in overrides and isinstance(head_dim, int) and old_heads and old_hidden:
        if head_dim == old_hidden // old_heads and (new_heads, new_hidden) != (old_heads, old_hidden):
            config.head_dim = new_hidden // new_heads
    if "num_key_value_heads" not in overrides and isinstance(getattr(base, "num_key_value_heads", None), int):
        if base.num_key_value_heads == old_heads or base.num_key_value_heads > (new_heads or 0):
            config.num_key_value_heads = new_heads
    if old_layers is not None:
        new_layers = _num_layers(config)
        if new_layers != old_layers:
            for attr in _per_layer_lists(base, old_layers):
                if attr in overrides:
                    continue
                value = list(getattr(base, attr))
                grown = (value * (new_layers // len(value) + 1))[:new_layers]
                setattr(config, attr, type(getattr(base, attr))(grown))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if teacher is not None:
            model = type(teacher)(config).to(teacher.dtype)
        else:
            model = AutoModel.from_config(config)
    if teacher is not None and getattr(teacher, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(teacher.generation_config)
    model.train()
    return model


def from_model_type(model_type: str, auto_cls: Any, *, seed: int = 0, defaults: dict[str, Any] | None = None,
                    **fields: Any) -> PreTrainedModel:
    """A randomly initialised `auto_cls` model (e.g. AutoModelForCausalLM) of `model_type`, with no teacher.

    The config is transformers' `AutoConfig.for_model(model_type, **defaults, **fields)`, so fields derived in
    the config's constructor follow the given ones (T5's num_decoder_layers = num_layers, Llama's head_dim and
    key/value heads). `defaults` (e.g. the tokenizer's vocabulary size and special ids) give way to `fields`;
    a field the config does not know is a ValueError with a "did you mean". Weights are drawn under
    ``torch.manual_seed(seed)``; the global RNG state is restored afterwards.
    """
    from transformers import AutoConfig

    try:
        known = _config_keys(AutoConfig.for_model(model_type))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"unknown model_type {model_type!r} ({exc})") from None
    for key in fields:
        if key not in known:
            raise ValueError(f"unknown config field {key!r} for model_type {model_type!r}{did_you_mean(key, known)}")
    config = AutoConfig.for_model(model_type, **{**(defaults or {}), **fields})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_cls.from_config(config)
    model.train()
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def shrink_report(teacher: nn.Module, student: nn.Module) -> dict:
    """Parameter counts of teacher and student and the compression ratio (teacher / student)."""
    t, s = count_parameters(teacher), count_parameters(student)
    report: dict[str, Any] = {
        "teacher_params": t,
        "student_params": s,
        "ratio": t / s if s else float("inf"),
        "student_fraction": s / t if t else float("nan"),
    }
    for name, model in (("teacher", teacher), ("student", student)):
        config = getattr(model, "config", None)
        if config is not None and any(hasattr(config, a) for a in _LAYER_COUNT_ATTRS):
            report[f"{name}_layers"] = _num_layers(config)
    return report
