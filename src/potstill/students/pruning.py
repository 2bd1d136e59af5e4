"""Structured pruning as a student's initialisation: MiniMA's prune-then-distil (`student.init: pruned`).

Paper: Zhang et al. 2023, "Towards the Law of Capacity Gap in Distilling Language Models" (MiniMA). Before
distilling, the student is cut out of the teacher: every prunable unit gets a multiplicative mask of ones —
each attention head, each FFN neuron, each hidden (residual-stream) dimension and, optionally, each layer — and a
unit's importance is the mean over a few calibration batches of |∂L/∂mask|, with L the teacher's own loss on the
recipe's data (next-token cross-entropy for a causal LM; for a sentence encoder an in-batch contrastive loss of
its mean-pooled embeddings against its own detached ones, scale 20). The most important units are kept until
the target dims are met and the weights are sliced into a plain Hugging Face model of the smaller config, which
is then saved and loaded like any student.

Choices (paper defaults where it has them):
- Heads and FFN neurons are chosen per layer (top-k within each layer), since a plain config has one head count
  and one FFN width for every layer; the paper's per-layer normalisation of the scores then changes nothing.
- Hidden dims are chosen globally; a hidden dim's mask multiplies every write to the residual stream (the
  embedding output and each attention / FFN output; for BERT the outputs of its post-sublayer LayerNorms).
- Layers (`num_hidden_layers`): a layer's mask interpolates between its output and its input
  (out = m·layer(h) + (1 − m)·h); the top layers by importance are kept in their order.
- BERT ties the head size to hidden_size / num_attention_heads, so a pruned BERT keeps that ratio; Llama has an
  explicit head_dim. With grouped key/value heads (Llama GQA) each kept key/value group keeps the same number of
  query heads; the groups kept are those with the largest summed query-head importance.
- Keeping every unit reproduces the teacher's outputs exactly (the slices are the identity).

Layouts: BERT (`BertModel` and models with a `bert.` prefix, e.g. all-MiniLM-L6-v2) and Llama (`LlamaModel`,
`LlamaForCausalLM`, e.g. SmolLM2).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from potstill.encoder_inputs import encoder_inputs_on

Batch = dict[str, torch.Tensor]
CalibrationLoss = Callable[[nn.Module, Batch], torch.Tensor]

PRUNABLE_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                   "num_hidden_layers")

# (parameter-name pattern, spaces of axis 0 and axis 1); `heads` / `kv` / `ffn` are per layer, `hidden` is global.
_BERT_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight$", (None, "hidden")),
    (r"embeddings\.LayerNorm\.(weight|bias)$", ("hidden",)),
    (r"attention\.self\.(query|key|value)\.weight$", ("heads", "hidden")),
    (r"attention\.self\.(query|key|value)\.bias$", ("heads",)),
    (r"attention\.output\.dense\.weight$", ("hidden", "heads")),
    (r"attention\.output\.dense\.bias$", ("hidden",)),
    (r"(attention\.output|\d\.output)\.LayerNorm\.(weight|bias)$", ("hidden",)),
    (r"intermediate\.dense\.weight$", ("ffn", "hidden")),
    (r"intermediate\.dense\.bias$", ("ffn",)),
    (r"\d\.output\.dense\.weight$", ("hidden", "ffn")),
    (r"\d\.output\.dense\.bias$", ("hidden",)),
    (r"pooler\.dense\.weight$", ("hidden", "hidden")),
    (r"pooler\.dense\.bias$", ("hidden",)),
]
_LLAMA_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"embed_tokens\.weight$", (None, "hidden")),
    (r"lm_head\.weight$", (None, "hidden")),
    (r"self_attn\.q_proj\.weight$", ("heads", "hidden")),
    (r"self_attn\.q_proj\.bias$", ("heads",)),
    (r"self_attn\.[kv]_proj\.weight$", ("kv", "hidden")),
    (r"self_attn\.[kv]_proj\.bias$", ("kv",)),
    (r"self_attn\.o_proj\.weight$", ("hidden", "heads")),
    (r"self_attn\.o_proj\.bias$", ("hidden",)),
    (r"mlp\.(gate|up)_proj\.weight$", ("ffn", "hidden")),
    (r"mlp\.(gate|up)_proj\.bias$", ("ffn",)),
    (r"mlp\.down_proj\.weight$", ("hidden", "ffn")),
    (r"mlp\.down_proj\.bias$", ("hidden",)),
    (r"(input_layernorm|post_attention_layernorm|norm)\.weight$", ("hidden",)),
]
_LAYER_INDEX = re.compile(r"(?:^|\.)(layer|layers)\.(\d+)\.")


@dataclass
class _Layout:
    """Where the prunable units of one architecture live."""

    kind: str                     # "bert" | "llama"
    layers: nn.ModuleList
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    hidden: int
    head_out: list[nn.Module]     # input = concatenated heads (o_proj / attention.output.dense)
    ffn_out: list[nn.Module]      # input = FFN activations (down_proj / output.dense)
    hidden_writers: list[nn.Module] = field(default_factory=list)  # outputs written to the residual stream


def _layout(model: nn.Module) -> _Layout:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "bert":
        base = getattr(model, "bert", model)
        layers = base.encoder.layer
        heads = config.num_attention_heads
        return _Layout("bert", layers, heads, heads, config.hidden_size // heads, config.intermediate_size,
                       config.hidden_size, [lay.attention.output.dense for lay in layers],
                       [lay.output.dense for lay in layers],
                       [base.embeddings] + [m for lay in layers
                                            for m in (lay.attention.output.LayerNorm, lay.output.LayerNorm)])
    if model_type == "llama":
        base = getattr(model, "model", model)
        layers = base.layers
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return _Layout("llama", layers, heads, config.num_key_value_heads, head_dim, config.intermediate_size,
                       config.hidden_size, [lay.self_attn.o_proj for lay in layers],
                       [lay.mlp.down_proj for lay in layers],
                       [base.embed_tokens] + [m for lay in layers for m in (lay.self_attn.o_proj, lay.mlp.down_proj)])
    raise ValueError(f"structured pruning supports BERT and Llama layouts, not {type(model).__name__} "
                     f"(model_type {model_type!r})")


@dataclass
class Importance:
    """Mean |∂L/∂mask| per unit: heads [L, H], ffn [L, F], hidden [D], layers [L]."""

    heads: torch.Tensor
    ffn: torch.Tensor
    hidden: torch.Tensor
    layers: torch.Tensor
    batches: int


def mask_importance(model: nn.Module, batches: Iterable[Batch], loss_fn: CalibrationLoss) -> Importance:
    """Accumulate |∂L/∂mask| for every head, FFN neuron, hidden dim and layer of `model` over `batches`.

    The model's weights are not changed and get no gradient; the masks live only during this call.
    """
    lay = _layout(model)
    n = len(lay.layers)
    device = next(model.parameters()).device
    masks = {"heads": torch.ones(n, lay.heads, device=device, requires_grad=True),
             "ffn": torch.ones(n, lay.ffn, device=device, requires_grad=True),
             "hidden": torch.ones(lay.hidden, device=device, requires_grad=True),
             "layers": torch.ones(n, device=device, requires_grad=True)}
    totals = {k: torch.zeros_like(m) for k, m in masks.items()}
    handles = []

    def head_hook(i: int) -> Callable[..., Any]:
        def hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            shaped = x.unflatten(-1, (lay.heads, lay.head_dim)) * masks["heads"][i][:, None].to(x.dtype)
            return (shaped.flatten(-2), *args[1:])
        return hook

    def ffn_hook(i: int) -> Callable[..., Any]:
        def hook(_module: nn.Module, args: tuple) -> tuple:
            return (args[0] * masks["ffn"][i].to(args[0].dtype), *args[1:])
        return hook

    def hidden_hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
        return _map_first(output, lambda t: t * masks["hidden"].to(t.dtype))

    def layer_hook(i: int) -> Callable[..., Any]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            before = args[0] if args else kwargs["hidden_states"]
            m = masks["layers"][i].to(before.dtype)
            return _map_first(output, lambda t: m * t + (1 - m) * before)
        return hook

    grad_flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for i in range(n):
            handles.append(lay.head_out[i].register_forward_pre_hook(head_hook(i)))
            handles.append(lay.ffn_out[i].register_forward_pre_hook(ffn_hook(i)))
            handles.append(lay.layers[i].register_forward_hook(layer_hook(i), with_kwargs=True))
        handles += [m.register_forward_hook(hidden_hook) for m in lay.hidden_writers]
        count = 0
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, list(masks.values()))
            for key, grad in zip(masks, grads, strict=True):
                totals[key] += grad.abs()
            count += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise ValueError("mask importance needs at least one calibration batch")
    mean = {k: (v / count).detach().cpu() for k, v in totals.items()}
    return Importance(mean["heads"], mean["ffn"], mean["hidden"], mean["layers"], count)


def _map_first(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    raise TypeError(f"cannot mask a module output of type {type(output).__name__}")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties: the earlier unit), in increasing order."""
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return torch.sort(order).values


def _check_targets(lay: _Layout, n_layers: int, targets: dict[str, int]) -> dict[str, int]:
    unknown = sorted(set(targets) - set(PRUNABLE_FIELDS))
    if unknown:
        raise ValueError(f"cannot prune {', '.join(unknown)}; prunable dims: {', '.join(PRUNABLE_FIELDS)}")
    full = {"hidden_size": lay.hidden, "num_attention_heads": lay.heads, "num_key_value_heads": lay.kv_heads,
            "intermediate_size": lay.ffn, "num_hidden_layers": n_layers}
    dims = {**full, **targets}
    for name, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= full[name]:
            raise ValueError(f"{name} must be a whole number from 1 to the teacher's {full[name]}, got {value!r}")
    if lay.kind == "bert":
        if "num_key_value_heads" in targets and targets["num_key_value_heads"] != dims["num_attention_heads"]:
            raise ValueError("BERT has no grouped key/value heads: leave out num_key_value_heads")
        dims["num_key_value_heads"] = dims["num_attention_heads"]
        if dims["hidden_size"] != dims["num_attention_heads"] * lay.head_dim:
            raise ValueError(f"BERT's head size is hidden_size / num_attention_heads = {lay.head_dim}: hidden_size "
                             f"{dims['hidden_size']} needs num_attention_heads {dims['hidden_size'] / lay.head_dim:g}")
    else:
        group = lay.heads // lay.kv_heads
        kv = dims["num_key_value_heads"]
        if "num_key_value_heads" not in targets:
            kv = dims["num_key_value_heads"] = min(lay.kv_heads, dims["num_attention_heads"])
        if dims["num_attention_heads"] % kv or dims["num_attention_heads"] // kv > group:
            raise ValueError(f"num_attention_heads {dims['num_attention_heads']} must be a multiple of "
                             f"num_key_value_heads {kv}, with at most the teacher's {group} query heads per group")
    return dims


@dataclass
class PrunePlan:
    """Which units are kept: per layer kept heads / kv groups / FFN neurons, global hidden dims, kept layers."""

    layers: list[int]
    heads: list[torch.Tensor]
    kv: list[torch.Tensor]
    ffn: list[torch.Tensor]
    hidden: torch.Tensor
    dims: dict[str, int]


def plan_pruning(model: nn.Module, importance: Importance, targets: dict[str, int],
                 layers: list[int] | None = None) -> PrunePlan:
    """Choose the units to keep for `targets` (a subset of PRUNABLE_FIELDS; missing ones keep the teacher's dim).
    `layers` keeps those teacher layers instead of choosing `num_hidden_layers` by importance."""
    lay = _layout(model)
    n = len(lay.layers)
    if layers is not None and "num_hidden_layers" in targets:
        raise ValueError("give either the layers to keep or num_hidden_layers, not both")
    dims = _check_targets(lay, n, targets)
    if layers is not None:
        kept_layers = sorted(layers)
        if len(set(kept_layers)) != len(kept_layers) or not all(0 <= i < n for i in kept_layers):
            raise ValueError(f"layers {layers} must be distinct indices 0..{n - 1}")
        dims["num_hidden_layers"] = len(kept_layers)
    else:
        kept_layers = _top(importance.layers, dims["num_hidden_layers"]).tolist()
    group = lay.heads // lay.kv_heads
    per_group = dims["num_attention_heads"] // dims["num_key_value_heads"]
    heads, kv, ffn = [], [], []
    for i in kept_layers:
        scores = importance.heads[i]
        groups = _top(scores.view(lay.kv_heads, group).sum(-1), dims["num_key_value_heads"])
        kept = [g * group + _top(scores[g * group:(g + 1) * group], per_group) for g in groups.tolist()]
        heads.append(torch.cat(kept))
        kv.append(groups)
        ffn.append(_top(importance.ffn[i], dims["intermediate_size"]))
    return PrunePlan(kept_layers, heads, kv, ffn, _top(importance.hidden, dims["hidden_size"]), dims)


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of the kept units of `size` rows each."""
    return (units[:, None] * size + torch.arange(size)[None, :]).flatten()


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A new model of the pruned config holding the kept slices of `model`'s weights (the original is untouched)."""
    lay = _layout(model)
    rules = _BERT_AXES if lay.kind == "bert" else _LLAMA_AXES
    position = {t: k for k, t in enumerate(plan.layers)}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        found = _LAYER_INDEX.search(name)
        k = None
        if found:
            t = int(found.group(2))
            if t not in position:
                continue
            k = position[t]
            name = f"{name[:found.start(2)]}{k}{name[found.end(2):]}"
        axes = next((a for pattern, a in rules if re.search(pattern, name)), None)
        if axes is None:
            if tensor.dim() == 0 or not any(lay.hidden == s for s in tensor.shape):
                state[name] = tensor.clone()
                continue
            raise ValueError(f"cannot prune {type(model).__name__}: no rule for the weight {name!r}")
        for axis, space in enumerate(axes):
            if space == "hidden":
                index = plan.hidden
            elif space in ("heads", "kv", "ffn") and k is not None:
                units = {"heads": plan.heads, "kv": plan.kv, "ffn": plan.ffn}[space][k]
                index = units if space == "ffn" else _rows(units, lay.head_dim)
            else:
                continue
            tensor = tensor.index_select(axis, index.to(tensor.device))
        state[name] = tensor.clone()

    from potstill.students.build import _student_config

    config = _student_config(model.config, plan.layers)
    for key, value in plan.dims.items():
        if key == "num_key_value_heads" and lay.kind == "bert":
            continue
        setattr(config, key, value)
    if lay.kind == "llama":
        config.head_dim = lay.head_dim
    with torch.random.fork_rng(devices=[]):
        student = type(model)(config).to(next(model.parameters()).dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or ())
    missing = [m for m in missing if m not in tied and "lm_head" not in m]
    if missing or unexpected:
        raise ValueError(f"slicing {type(model).__name__} failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(model, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(model.generation_config)
    student.train()
    return student


def prune_from_teacher(teacher: nn.Module, targets: dict[str, int], batches: Iterable[Batch],
                       loss_fn: CalibrationLoss, *, layers: list[int] | None = None) -> nn.Module:
    """MiniMA's student init: mask-gradient importance on `batches`, then the teacher sliced to `targets`."""
    importance = mask_importance(teacher, batches, loss_fn)
    return apply_plan(teacher, plan_pruning(teacher, importance, targets, layers=layers))


# ---- calibration losses: the teacher's own objective on the recipe's data

def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of `batch` (input_ids, attention_mask)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def embedding_contrastive_loss(model: nn.Module, batch: Batch, *, scale: float = 20.0) -> torch.Tensor:
    """In-batch InfoNCE of the mean-pooled, normalised embeddings against their own detached copies (scale 20, as
    sentence-transformers' MultipleNegativesRankingLoss): its gradient is not zero at the unmasked model, unlike a
    distance to the model's own output."""
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    emb = F.normalize((out * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).float()
    logits = scale * emb @ emb.detach().T
    return F.cross_entropy(logits, torch.arange(len(emb), device=emb.device))


CALIBRATION_LOSSES: dict[str, CalibrationLoss] = {"causal_lm": causal_lm_loss,
                                                 "embedding": embedding_contrastive_loss}


def calibration_batches(texts: list[str], tokenizer: Any, *, batches: int, batch_size: int, max_length: int,
                        device: torch.device | str = "cpu") -> list[Batch]:
    """The first `batches` × `batch_size` texts, tokenised (padded, truncated to max_length)."""
    texts = [t for t in texts if t and t.strip()][: batches * batch_size]
    if not texts:
        raise ValueError("no calibration text: the training data has no non-empty text")
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append(encoder_inputs_on(enc, device))
    return out


def record_text(record: dict[str, Any]) -> str:
    """The text of a training record: `text`, else prompt + completion, else the messages' contents."""
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("prompt"), str):
        return record["prompt"] + str(record.get("completion") or "")
    messages = record.get("messages")
    if isinstance(messages, list):
        return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    return ""


@dataclass
class Calibration:
    """What a task hands `build_student` for `init: pruned`: its training texts (read when needed), the
    tokenizer, the loss kind (a key of CALIBRATION_LOSSES) and the recipe's max_length."""

    texts: Callable[[], list[str]]
    tokenizer: Any
    kind: str
    max_length: int


def pruned_student(teacher: nn.Module, targets: dict[str, int], calibration: Calibration, *, batches: int,
                   batch_size: int, layers: list[int] | None = None) -> nn.Module:
    """`student.init: pruned`: the teacher pruned to `targets` with importance from the task's calibration data."""
    device = next(teacher.parameters()).device
    data = calibration_batches(calibration.texts(), calibration.tokenizer, batches=batches, batch_size=batch_size,
                               max_length=calibration.max_length, device=device)
    return prune_from_teacher(teacher, targets, data, CALIBRATION_LOSSES[calibration.kind], layers=layers)
