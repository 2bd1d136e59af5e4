"""SwiftKV: SingleInputKV (and AcrossKV) for Llama-layout causal LMs, distilled from the model itself.

Paper: Qiao et al. 2024 (Snowflake), "SwiftKV: Fast Prefill-Optimized Inference with Knowledge-Preserving Model
Transformation".

The transform. Let x_l be the hidden state that enters decoder layer l (the cut layer). In every layer i ≥ l the
keys and values of every token are computed from x_l instead of from layer i's own input:

    K_i = RoPE(W'_k,g(i) · n(x_l)),   V_i = W'_v,g(i) · n(x_l),   Q_i = RoPE(W'_q,i · norm_i(h_i))

with n a new RMSNorm and g(i) the AcrossKV group of layer i (`across_kv` adjacent layers share one K/V; 1 = every
layer its own). Everything else (embeddings, layers < l, o_proj, MLPs, norms, lm_head) is the original model's and
stays frozen. The prompt's keys and values of the later layers thus need only layers < l; the later layers run for
the last prompt token only (`prefill`), which cuts prefill compute by about (L - l) / L. Decoding runs every layer
for each new token, its later-layer K/V again from its own x_l.

Initialisation (the paper copies q/k/v and averages k/v over an AcrossKV group). Here the new norm starts at
weight 1 and each copy of W_k, W_v has layer i's own input-norm gain folded in (W · diag(γ_i)), so at
initialisation layer i's keys are exactly its original key function applied to x_l instead of h_i.

Knowledge-preserving distillation: the teacher is the same model with the transform off (`SwiftKVForCausalLM.base`,
the very same modules: no second copy of the weights), the student the transform on; only the new q/k/v
projections and the new norm train, on KL(teacher ‖ student) of next-token distributions (the paper: τ² · KL at
τ = 2.0, lr 2e-4, 5 % warm-up, no weight decay; cut at half the depth). In a recipe: `student.init: swiftkv` with
`student.config: {cut_layer: l, across_kv: 1}` and a causal_lm KL objective (recipes/smollm2-swiftkv.yaml).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from potstill.errors import UserError

SWIFTKV_FIELDS = ("cut_layer", "across_kv")
SWIFTKV_FILE = "swiftkv.safetensors"
SWIFTKV_CONFIG = "swiftkv.json"
LLAMA_LAYOUTS = ("llama",)


@dataclass
class SwiftKVOutput:
    """What the forward returns: `.logits` [B, T, V] like a Hugging Face causal LM output."""

    logits: torch.Tensor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of `x` [B, heads, T, d] with `cos`/`sin` [B, T, d]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class _RMSNorm(nn.Module):
    """RMSNorm computed as Llama's (float32 statistics, weight applied in the input's dtype)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SwiftKVForCausalLM(nn.Module):
    """A Llama-layout `*ForCausalLM` (`base`, shared, frozen) with SingleInputKV from `cut_layer` on and AcrossKV
    groups of `across_kv` layers. `cut_layer == num_hidden_layers` is the original model (the forward is `base`'s).
    """

    def __init__(self, base: nn.Module, cut_layer: int, across_kv: int = 1) -> None:
        super().__init__()
        cfg = base.config
        if getattr(cfg, "model_type", None) not in LLAMA_LAYOUTS:
            kind = getattr(cfg, "model_type", type(base).__name__)
            raise UserError(f"field student.init: swiftkv: the teacher is a {kind!r} model; the SwiftKV transform "
                            f"is built for the Llama layout ({', '.join(LLAMA_LAYOUTS)})")
        n_layers = cfg.num_hidden_layers
        if not isinstance(cut_layer, int) or not 1 <= cut_layer <= n_layers:
            raise UserError(f"field student.config.cut_layer: expected an integer from 1 to {n_layers} (the "
                            f"teacher's layers), got {cut_layer!r}")
        if not isinstance(across_kv, int) or across_kv < 1:
            raise UserError(f"field student.config.across_kv: expected an integer ≥ 1 (layers sharing one K/V), "
                            f"got {across_kv!r}")
        self.base = base
        self.config = cfg
        self.cut_layer, self.across_kv = cut_layer, across_kv
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        later = list(range(cut_layer, n_layers))
        self.groups = [later[i:i + across_kv] for i in range(0, len(later), across_kv)]
        layers = base.model.layers
        self.kv_norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if later else None
        self.q_proj = nn.ModuleList(_copy_linear(layers[i].self_attn.q_proj) for i in later)
        self.k_proj = nn.ModuleList(_group_linear(layers, g, "k_proj") for g in self.groups)
        self.v_proj = nn.ModuleList(_group_linear(layers, g, "v_proj") for g in self.groups)
        for p in base.parameters():
            p.requires_grad_(False)
        base.eval()

    # ------------------------------------------------------------------ nn.Module plumbing
    def train(self, mode: bool = True) -> SwiftKVForCausalLM:
        """Train mode for the new weights only; the shared original model (the teacher) stays in eval mode."""
        self.training = mode
        for name, child in self.named_children():
            if name != "base":
                child.train(mode)
        return self

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def new_parameters(self) -> list[nn.Parameter]:
        """The weights SwiftKV adds (and trains): kv_norm, q_proj, k_proj, v_proj."""
        return [p for name, p in self.named_parameters() if not name.startswith("base.")]

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> Any:
        """Logits [B, T, V] at every position with the transform on (training / evaluation path)."""
        if self.cut_layer == self.config.num_hidden_layers:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        h, cos, sin, allowed = self._embed(input_ids, attention_mask)
        for i in range(self.cut_layer):
            h = self._layer(i, h, self._own_kv(i, h, cos, sin), cos, sin, allowed)
        shared = self._shared_kv(h, cos, sin)
        for j, i in enumerate(range(self.cut_layer, self.config.num_hidden_layers)):
            h = self._layer(i, h, shared[j // self.across_kv], cos, sin, allowed, q_proj=self.q_proj[j])
        return SwiftKVOutput(self.base.lm_head(self.base.model.norm(h)))

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Next-token logits [B, V] after each row's last prompt token, and the KV cache (per layer below the cut,
        then per AcrossKV group). Layers ≥ cut run for the last prompt token only."""
        h, cos, sin, allowed = self._embed(input_ids, attention_mask)
        last = (allowed.shape[-1] - 1 if attention_mask is None else attention_mask.sum(1) - 1)
        last = torch.as_tensor(last, device=h.device).expand(h.shape[0])
        cache = []
        for i in range(self.cut_layer):
            kv = self._own_kv(i, h, cos, sin)
            cache.append(kv)
            h = self._layer(i, h, kv, cos, sin, allowed)
        rows = torch.arange(h.shape[0], device=h.device)
        shared = self._shared_kv(h, cos, sin)
        cache.extend(shared)
        h = h[rows, last][:, None]
        cos1, sin1, allowed1 = cos[rows, last][:, None], sin[rows, last][:, None], allowed[rows, :, last][:, :, None]
        for j, i in enumerate(range(self.cut_layer, self.config.num_hidden_layers)):
            h = self._layer(i, h, shared[j // self.across_kv], cos1, sin1, allowed1, q_proj=self.q_proj[j])
        return self.base.lm_head(self.base.model.norm(h))[:, 0], cache

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation of unpadded prompts `input_ids` [B, T]: prefill, then one token at a time with the
        cache (every layer runs for the new token; its later-layer K/V come from its own x_l)."""
        logits, cache = self.prefill(input_ids)
        out = [logits.argmax(-1)]
        for _ in range(max_new_tokens - 1):
            logits = self._decode(out[-1], input_ids.shape[1] + len(out) - 1, cache)
            out.append(logits.argmax(-1))
        return torch.stack(out, 1)

    def _decode(self, token: torch.Tensor, position: int, cache: list[tuple[torch.Tensor, torch.Tensor]]
                ) -> torch.Tensor:
        pos = torch.full((token.shape[0], 1), position, device=token.device)
        h = self.base.model.embed_tokens(token[:, None])
        cos, sin = self.base.model.rotary_emb(h, position_ids=pos)
        allowed = torch.ones(token.shape[0], 1, 1, position + 1, dtype=torch.bool, device=h.device)

        def extend(slot: int, kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            cache[slot] = (torch.cat([cache[slot][0], kv[0]], 2), torch.cat([cache[slot][1], kv[1]], 2))
            return cache[slot]

        for i in range(self.cut_layer):
            h = self._layer(i, h, extend(i, self._own_kv(i, h, cos, sin)), cos, sin, allowed)
        shared = [extend(self.cut_layer + g, kv) for g, kv in enumerate(self._shared_kv(h, cos, sin))]
        for j, i in enumerate(range(self.cut_layer, self.config.num_hidden_layers)):
            h = self._layer(i, h, shared[j // self.across_kv], cos, sin, allowed, q_proj=self.q_proj[j])
        return self.base.lm_head(self.base.model.norm(h))[:, 0]

    # ------------------------------------------------------------------ pieces
    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings, RoPE tables, and `allowed` [B, 1, T, T]: causal, padded keys off (the diagonal kept, so a
        padded query attends to itself and no row is empty)."""
        b, t = input_ids.shape
        h = self.base.model.embed_tokens(input_ids)
        pos = torch.arange(t, device=h.device)[None].expand(b, t)
        cos, sin = self.base.model.rotary_emb(h, position_ids=pos)
        eye = torch.eye(t, dtype=torch.bool, device=h.device)
        allowed = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()[None, None].expand(b, 1, t, t)
        if attention_mask is not None:
            allowed = (allowed & attention_mask.bool()[:, None, None, :]) | eye
        return h, cos, sin, allowed

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)

    def _own_kv(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.base.model.layers[i]
        x = layer.input_layernorm(h)
        return _rope(self._heads(layer.self_attn.k_proj(x)), cos, sin), self._heads(layer.self_attn.v_proj(x))

    def _shared_kv(self, x_cut: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of every AcrossKV group, all from the cut layer's input x_l."""
        if self.kv_norm is None:
            return []
        x = self.kv_norm(x_cut)
        return [(_rope(self._heads(k(x)), cos, sin), self._heads(v(x))) for k, v in zip(self.k_proj, self.v_proj,
                                                                                         strict=True)]

    def _layer(self, i: int, h: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], cos: torch.Tensor,
               sin: torch.Tensor, allowed: torch.Tensor, q_proj: nn.Module | None = None) -> torch.Tensor:
        """Decoder layer i on queries `h` [B, Tq, H] against keys / values `kv` [B, kv_heads, Tk, d]."""
        layer = self.base.model.layers[i]
        attn = layer.self_attn
        q = _rope(self._heads((q_proj or attn.q_proj)(layer.input_layernorm(h))), cos, sin)
        k, v = kv
        rep = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                             attn_mask=allowed, scale=attn.scaling)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(*h.shape[:2], -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """The original model's folder (loads with AutoModelForCausalLM: the transform off) plus
        `swiftkv.safetensors` (the new weights) and `swiftkv.json` (cut_layer, across_kv)."""
        from safetensors.torch import save_file

        folder = Path(path)
        self.base.save_pretrained(folder, **kwargs)
        new = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("base.")}
        save_file(new, str(folder / SWIFTKV_FILE))
        (folder / SWIFTKV_CONFIG).write_text(json.dumps({"cut_layer": self.cut_layer, "across_kv": self.across_kv}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SwiftKVForCausalLM:
        """A folder written by `save_pretrained`, rebuilt."""
        from transformers import AutoModelForCausalLM

        folder = Path(path)
        if not (folder / SWIFTKV_CONFIG).is_file():
            raise UserError(f"{folder}: not a saved SwiftKV model (expected {SWIFTKV_CONFIG} inside)")
        spec = json.loads((folder / SWIFTKV_CONFIG).read_text())
        model = cls(AutoModelForCausalLM.from_pretrained(folder), **spec)
        load_swiftkv_weights(model, folder)
        return model


def load_swiftkv_weights(model: SwiftKVForCausalLM, folder: str | Path) -> None:
    """Load the new weights of a folder written by `save_pretrained` (`swiftkv.safetensors`) into `model`, whose
    base (the original model) is already in place; a file that does not fit its cut is a UserError."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not isinstance(model, SwiftKVForCausalLM) or not (folder / SWIFTKV_FILE).is_file():
        raise UserError(f"{folder}: not a saved SwiftKV student (expected {SWIFTKV_FILE} inside)")
    missing, unexpected = model.load_state_dict(load_file(str(folder / SWIFTKV_FILE)), strict=False)
    if unexpected or any(not k.startswith("base.") for k in missing):
        raise UserError(f"{folder / SWIFTKV_FILE}: does not match the student's cut (cut_layer {model.cut_layer}, "
                        f"across_kv {model.across_kv})")


def _copy_linear(src: nn.Linear, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> nn.Linear:
    out = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None,
                    device=src.weight.device, dtype=src.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(src.weight if weight is None else weight)
        if out.bias is not None:
            out.bias.copy_(src.bias if bias is None else bias)
    return out


def _group_linear(layers: nn.ModuleList, group: list[int], name: str) -> nn.Linear:
    """One K (or V) projection for an AcrossKV group: the mean over its layers of W · diag(γ_i), γ_i layer i's
    input-norm gain."""
    mods = [getattr(layers[i].self_attn, name) for i in group]
    weight = torch.stack([m.weight * layers[i].input_layernorm.weight[None, :] for m, i in
                          zip(mods, group, strict=True)]).mean(0)
    bias = torch.stack([m.bias for m in mods]).mean(0) if mods[0].bias is not None else None
    return _copy_linear(mods[0], weight.detach(), None if bias is None else bias.detach())


def swiftkv_student(teacher: nn.Module, config: dict[str, Any]) -> SwiftKVForCausalLM:
    """`student.init: swiftkv`: the teacher itself with the transform on (`student.config`: cut_layer, default
    half the depth; across_kv, default 1). Only the new weights train."""
    unknown = sorted(set(config) - set(SWIFTKV_FIELDS))
    if unknown:
        raise UserError(f"field student.config: init swiftkv takes {', '.join(SWIFTKV_FIELDS)}; got "
                        f"{', '.join(unknown)}")
    depth = getattr(getattr(teacher, "config", None), "num_hidden_layers", None)
    if depth is None:
        raise UserError("field student.init: swiftkv needs a Hugging Face Llama-layout causal LM teacher")
    model = SwiftKVForCausalLM(teacher, int(config.get("cut_layer", depth // 2)), int(config.get("across_kv", 1)))
    model.train()
    return model


def prefill_flops(config: Any, prompt_tokens: int, cut_layer: int | None = None, across_kv: int = 1) -> int:
    """Multiply-adds × 2 of one prompt's prefill up to the next-token logits (last token only through lm_head),
    counted from the shapes: projections, attention scores and weighted sums (causal: token t sees t + 1 keys),
    MLP, final head. `cut_layer` None: the original model."""
    h, n = config.hidden_size, config.num_hidden_layers
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_dim, kv_dim, inner = config.num_attention_heads * d, config.num_key_value_heads * d, config.intermediate_size
    cut = n if cut_layer is None else cut_layer
    t = prompt_tokens
    pairs = t * (t + 1) // 2  # (query, key) pairs of a causal prompt
    per_token = 2 * (h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * inner)
    attention_all = 2 * 2 * pairs * q_dim
    full_layers = cut * (t * per_token + attention_all)
    later = n - cut
    groups = -(-later // across_kv)
    kv_later = groups * t * 2 * (2 * h * kv_dim)
    last_token = later * (2 * (h * q_dim + q_dim * h + 3 * h * inner) + 2 * 2 * t * q_dim)
    return full_layers + kv_later + last_token + 2 * h * config.vocab_size
