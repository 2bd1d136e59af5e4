"""A model's internals during its ordinary forward: the hidden state after every transformer block and the
query / key / value projections of chosen blocks, captured by forward hooks (the model is not edited).

- `transformer_layers(model)` finds the model's stack of blocks (the `nn.ModuleList` with one entry per
  layer, e.g. `encoder.layer` of BERT / MiniLM / ViT, `model.layers` of Llama, `transformer.h` of GPT-2), or
  takes it from a module path.
- `qkv_modules(layer)` finds a block's query / key / value projections: separate Linear layers
  (`query`/`key`/`value`, `q_proj`/`k_proj`/`v_proj`, `q_lin`/`k_lin`/`v_lin`) or one fused Linear whose output
  is split in three (`c_attn`, `qkv`, `qkv_proj`, `Wqkv`).
- `Capture(model, hidden=…, qkv_layers=…)` is a context manager: every forward inside it records
  `hidden_states` (index 0 = the input of block 0, i.e. the embedding output; index i + 1 = the output of
  block i) and `qkv[i] = (q, k, v)`, each `[B, T, D]` with the heads concatenated.

`Signals` is what a task hands to the objectives when some of them read internals: the task's usual signal
(`main`: logits, embeddings, …) plus the internals and the `[B, T]` token mask they are compared over.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from potstill.errors import UserError
from potstill.signals import Signals

SEPARATE = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"),
            ("q", "k", "v"), ("wq", "wk", "wv"))
FUSED = ("c_attn", "qkv", "qkv_proj", "Wqkv", "in_proj")




def _layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def transformer_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The model's blocks: the ModuleList at `path` (e.g. "encoder.layer"), else the one found by its length
    (the config's layer count) or, without a config, the longest ModuleList of modules of one type."""
    if path is not None:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            raise UserError(f"{type(model).__name__} has no module {path!r}") from None
        if not isinstance(found, nn.ModuleList):
            raise UserError(f"{type(model).__name__}.{path} is a {type(found).__name__}, not the list of layers")
        return found
    want = _layer_count(model)
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
                  and len({type(x) for x in m}) == 1]
    if want is not None:
        matching = [(name, m) for name, m in candidates if len(m) == want]
        if matching:
            return min(matching, key=lambda nm: nm[0].count("."))[1]
    if candidates:
        return max(candidates, key=lambda nm: (len(nm[1]), -nm[0].count(".")))[1]
    raise UserError(f"cannot find the transformer layers of {type(model).__name__}: no nn.ModuleList of blocks; "
                    f"give their module path")


def qkv_modules(layer: nn.Module) -> tuple[nn.Module, ...]:
    """(q, k, v) Linear modules of a block, or a 1-tuple with its fused qkv projection."""
    named = dict(layer.named_modules())
    by_leaf: dict[str, list[str]] = {}
    for name in named:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    for names in SEPARATE:
        if all(n in by_leaf for n in names):
            return tuple(named[min(by_leaf[n], key=len)] for n in names)
    for name in FUSED:
        if name in by_leaf:
            return (named[min(by_leaf[name], key=len)],)
    raise UserError(f"cannot find the query / key / value projections in {type(layer).__name__} (looked for "
                    f"{', '.join('/'.join(n) for n in SEPARATE)} or a fused {', '.join(FUSED)})")


def _output(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class StopForward(Exception):
    """Raised by a capture hook once the last layer anyone needs has run (`Capture(stop_after=…)`)."""


class Capture:
    """Records internals of every forward run inside the `with` block (see the module docstring)."""

    def __init__(self, model: nn.Module, *, hidden: bool = False, qkv_layers: list[int] | tuple[int, ...] = (),
                 layers_path: str | None = None, stop_after: int | None = None) -> None:
        self.layers = transformer_layers(model, layers_path)
        self.hidden, self.qkv_layers, self.stop_after = hidden, list(qkv_layers), stop_after
        for i in self.qkv_layers:
            if not 0 <= i < len(self.layers):
                raise UserError(f"layer {i} is out of range: {type(model).__name__} has {len(self.layers)} layers")
        self.hidden_states: list[Tensor | None] = []
        self.qkv: dict[int, list[Tensor | None]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:
        n = len(self.layers)
        if self.hidden:
            self.hidden_states = [None] * (n + 1)

            def first_input(module, args, kwargs):
                x = args[0] if args else kwargs.get("hidden_states")
                self.hidden_states[0] = x

            self._handles.append(self.layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
            for i, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_hook(self._store_hidden(i + 1)))
        if self.stop_after is not None:
            def stop(module, args, out):
                raise StopForward

            # registered last, so the layer's own captures run first
            self._handles.append(self.layers[self.stop_after].register_forward_hook(stop))
        for i in self.qkv_layers:
            modules = qkv_modules(self.layers[i])
            self.qkv[i] = [None, None, None]
            for k, module in enumerate(modules):
                self._handles.append(module.register_forward_hook(self._store_qkv(i, k, fused=len(modules) == 1)))
        return self

    def _store_hidden(self, index: int):
        def hook(module, args, out):
            self.hidden_states[index] = _output(out)

        return hook

    def _store_qkv(self, layer: int, k: int, fused: bool):
        def hook(module, args, out):
            out = _output(out)
            if fused:
                self.qkv[layer] = list(out.chunk(3, dim=-1))
            else:
                self.qkv[layer][k] = out

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def signals(self, main: Any, token_mask: Tensor | None) -> Signals:
        """The recorded internals with the task's `main` signal; `token_mask` None = every token counts."""
        hidden: tuple[Tensor, ...] | None = None
        if self.hidden:
            last = len(self.hidden_states) if self.stop_after is None else self.stop_after + 2
            if any(h is None for h in self.hidden_states[:last]):
                raise RuntimeError("the forward did not run every transformer layer; hidden states are missing")
            hidden = cast("tuple[Tensor, ...]", tuple(self.hidden_states))  # past stop_after: None, never read
        qkv = {i: cast("tuple[Tensor, Tensor, Tensor]", tuple(v)) for i, v in self.qkv.items()}
        if token_mask is None:
            first = hidden[0] if hidden else next(iter(qkv.values()))[0]
            token_mask = torch.ones(first.shape[:2], dtype=torch.bool, device=first.device)
        return Signals(main=main, token_mask=token_mask.bool(), hidden_states=hidden, qkv=qkv)


def run_with_internals(fn, model: nn.Module, needs: dict[str, Any] | None, token_mask: Tensor | None, *args: Any,
                       **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` (which runs `model`), as `Signals` with the internals `needs` asks for
    ({"hidden": bool, "qkv": [layers], "stop_after": layer or None}); just its result when `needs` is empty.
    With `stop_after` the forward ends after that layer (the main signal is then None)."""
    if not needs or not (needs.get("hidden") or needs.get("qkv")):
        return fn(*args, **kwargs)
    inner = getattr(model, "module", None)  # a DDP-wrapped model's own module
    target = inner if isinstance(inner, nn.Module) else model
    main = None
    with Capture(target, hidden=bool(needs.get("hidden")), qkv_layers=needs.get("qkv", ()),
                 layers_path=needs.get("layers_path"), stop_after=needs.get("stop_after")) as cap:
        try:
            main = fn(*args, **kwargs)
        except StopForward:
            pass
    return cap.signals(main, token_mask)


__all__ = ["Capture", "Signals", "StopForward", "qkv_modules", "run_with_internals", "transformer_layers"]
