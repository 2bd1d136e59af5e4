"""`potstill export`: a finished run's student as an ONNX model, checked against PyTorch, and optionally an int8 copy.

The graph computes what the task's student hands the losses, so the deployed model answers exactly what was
distilled: class logits (classification, image_classification; graph: per node from its features `x`, or per graph
from its nodes' `x` and `graph_of`), the pooled sentence embedding (embedding; L2-normalised when the saved student
ends in sentence-transformers' `Normalize`), next-token logits (causal_lm), per-pixel logits (segmentation). The
task names the inputs and their variable axes (`Task.export_inputs`) and the forward (`Task.export_output`). It
is exported with `torch.onnx.export(dynamo=True)`, then run by ONNX Runtime on held-out records of the run's data
(`task.eval_records`, else its training records) at other sizes than the trace's; the largest deviation from
PyTorch must stay within `atol + rtol·|reference|`, else the export fails with that number. The check also reports
the ONNX model's agreement with PyTorch (`export_quality`).

`--int8` adds ONNX Runtime's dynamic quantisation (int8 weights with a scale per output channel, activations
quantised per batch at run time) and reports what it costs, measured on the same records against the float32
model: argmax agreement and accuracy (logits), top-1 token agreement (token logits), cosine (embeddings), pixel
agreement and mIoU (pixel logits), plus file sizes and throughput of the three (PyTorch, ONNX float32, ONNX int8;
items per second, an item being a row of the output: a node, graph, image, sequence), measured interleaved, ONNX
Runtime on as many threads as torch. Everything lands in `<run>/export/`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.errors import UserError
from potstill.evaluate import _load_student, _saved_recipe
from potstill.export_quality import batch_quality, summarise
from potstill.io import atomic_write_json
from potstill.ui import phase

EXPORTED_TASKS = "classification, image_classification, embedding, causal_lm, graph and segmentation"
SAMPLE_RECORDS = 128  # records of the run's data used for the check and the int8 quality delta


class _ExportedStudent(nn.Module):
    """The task's deployed forward (`Task.export_output`) as a module of positional tensors, for the tracer."""

    def __init__(self, task: Any, model: nn.Module, names: list[str], normalize: bool) -> None:
        super().__init__()
        self.task, self.model, self.names, self.normalize = task, model, names, normalize

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self.task.export_output(self.model, dict(zip(self.names, tensors, strict=True)))
        return nn.functional.normalize(out, dim=-1) if self.normalize else out


def _requirements() -> Any:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter's back end)
    except ImportError as exc:
        raise UserError(f"potstill export needs onnx, onnxscript and onnxruntime ({exc.name} is missing): "
                        "pip install 'potstill[export]'") from None
    return onnxruntime


def _batches(task: Any, records: list[dict], size: int) -> list[dict[str, torch.Tensor]]:
    return [task.collate(records[i:i + size], list(range(i, min(i + size, len(records)))))
            for i in range(0, len(records), size)]


def _inputs(batch: dict[str, Any], names: list[str]) -> tuple[torch.Tensor, ...]:
    return tuple(batch[n] for n in names)


def _onnx_feed(batch: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {n: batch[n].numpy() for n in names}


def _session(ort: Any, path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many as PyTorch, so that the speeds compare
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export(module: _ExportedStudent, example: tuple[torch.Tensor, ...], axes: dict[str, dict[int, str]],
            path: Path) -> None:
    dims = {name: torch.export.Dim(name) for per_input in axes.values() for name in per_input.values()}
    shapes = tuple({axis: dims[name] for axis, name in axes[input_name].items()} for input_name in module.names)
    # quiet: a failed first capture strategy prints its partial graph (e.g. at a data-dependent size such as
    # the graph count of graph_of) before the next one succeeds; a failure still raises
    with (warnings.catch_warnings(), _quiet_loggers("torch", "onnx_ir", "onnxscript"),
          contextlib.redirect_stderr(io.StringIO())):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=module.names, output_names=["output"],
                          dynamic_shapes=(shapes,), dynamo=True, verbose=False)  # one entry: the *tensors


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """The exporter's log warnings (missing torchvision ops, unnamed data-dependent sizes) silenced."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _deviation(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor | None) -> float:
    diff = (reference - other).abs()
    return float(diff[mask.bool()].max() if mask is not None and diff.dim() == 3 else diff.max())


def export_run(run_dir: str | Path, *, int8: bool = False, atol: float = 1e-4, rtol: float = 1e-3,
               out_dir: str | Path | None = None) -> dict[str, Any]:
    """Export `run_dir`'s saved student to `<run>/export/model.onnx` (+ `model.int8.onnx` with `int8`), check it
    against PyTorch on the run's records, and write and return `export.json`."""
    ort = _requirements()
    run_dir = Path(run_dir)
    recipe = _saved_recipe(run_dir)
    task, student = _load_student(run_dir, recipe)
    kind = getattr(task, "export_kind", None)
    if kind is None:
        raise UserError(f"{run_dir}: potstill export supports {EXPORTED_TASKS} students; this run's task is "
                        f"{recipe.task}")
    records = (task.eval_records or task.train_records)[:SAMPLE_RECORDS]
    if not records:
        raise UserError(f"{run_dir / 'recipe.yaml'}: data.eval and data.train give no records to check the export on")
    batches = _batches(task, records, max(2, min(recipe.eval.batch_size, 32)))
    axes = task.export_inputs(batches[0])
    names = list(axes)
    from potstill.students.save import normalizes_embeddings

    normalize = kind == "embedding" and normalizes_embeddings(run_dir / "student")
    module = _ExportedStudent(task, student, names, normalize).eval()
    out = Path(out_dir) if out_dir else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    onnx_path, int8_path = out / "model.onnx", out / "model.int8.onnx"
    trace = task.collate(records[:2], [0, 1])  # traced at 2 rows: every check batch has other shapes
    start = time.perf_counter()
    with phase(f"exporting the student to {onnx_path}"), torch.no_grad():
        _export(module, _inputs(trace, names), axes, onnx_path)
    export_seconds = time.perf_counter() - start

    session = _session(ort, onnx_path)
    worst, limit_hit = 0.0, None
    references, parts = [], []
    with torch.no_grad():
        for batch in batches:
            reference = module(*_inputs(batch, names))
            got = torch.from_numpy(session.run(None, _onnx_feed(batch, names))[0])
            references.append(reference)
            parts.append(batch_quality(kind, reference, got, batch))
            dev = _deviation(reference, got, batch.get("attention_mask") if kind == "token_logits" else None)
            allowed = atol + rtol * float(reference.abs().max())
            worst = max(worst, dev)
            if dev > allowed and limit_hit is None:
                limit_hit = (dev, allowed)
    if limit_hit is not None:
        raise UserError(f"{onnx_path}: the ONNX model's outputs differ from PyTorch's by {limit_hit[0]:.3g} "
                        f"(allowed {limit_hit[1]:.3g}); the export is kept for inspection")
    tokenizer_files = _copy_tokenizer(run_dir / "student", out)
    result: dict[str, Any] = {
        "task": recipe.task, "output": kind, "inputs": names, "normalized": normalize, "model": onnx_path.name,
        "check": {"records": len(records), "max_abs_deviation": worst, "atol": atol, "rtol": rtol,
                  **summarise(kind, parts, reference="pytorch", other="onnx")},
        "export_seconds": export_seconds, "bytes": {"float32": _onnx_bytes(onnx_path)},
        "tokenizer_files": tokenizer_files,
    }
    if int8:
        with phase("int8: quantising, scoring against float32 and timing"):
            result["int8"] = _quantize(ort, onnx_path, int8_path, kind, batches, names, references, module)
        result["bytes"]["int8"] = _onnx_bytes(int8_path)
    atomic_write_json(out / "export.json", result)
    return result


def _onnx_bytes(path: Path) -> int:
    """Size of an ONNX model with its external weights file (`<name>.data`, written beside large graphs)."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.is_file())


def _copy_tokenizer(student_dir: Path, out: Path) -> list[str]:
    """The student's tokenizer files beside the ONNX model (a deployment needs both)."""
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt",
             "vocab.json", "sentencepiece.bpe.model", "tokenizer.model"]
    copied = []
    for name in names:
        if (student_dir / name).is_file():
            shutil.copy2(student_dir / name, out / name)
            copied.append(name)
    return copied


def _quantize(ort: Any, onnx_path: Path, int8_path: Path, kind: str, batches: list[dict[str, Any]], names: list[str],
              references: list[torch.Tensor], module: nn.Module) -> dict[str, Any]:
    """ONNX Runtime dynamic int8 quantisation, and its cost against the float32 outputs (`references`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from potstill.eval import compare_throughput

    # per-channel weight scales: one scale per output row keeps a MiniLM student's embeddings at cosine 0.996 to
    # float32, against 0.95 with one scale per tensor (ONNX Runtime's default)
    quantize_dynamic(str(onnx_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True)
    fp32, q8 = _session(ort, onnx_path), _session(ort, int8_path)
    parts = [batch_quality(kind, ref, torch.from_numpy(q8.run(None, _onnx_feed(batch, names))[0]), batch)
             for batch, ref in zip(batches, references, strict=True)]

    def runner(fn: Any) -> Any:
        return lambda chunk: [fn(batch) for batch in chunk]

    def torch_run(batch: dict[str, Any]) -> Any:
        with torch.no_grad():
            return module(*_inputs(batch, names))

    speed = compare_throughput({"pytorch": runner(torch_run),
                                "onnx_float32": runner(lambda b: fp32.run(None, _onnx_feed(b, names))),
                                "onnx_int8": runner(lambda b: q8.run(None, _onnx_feed(b, names)))},
                               batches, batch_size=1, rounds=3, min_seconds=0.5)
    rows = sum(len(ref) for ref in references) / len(batches)  # items per batch: rows of the output
    return {"model": int8_path.name, **summarise(kind, parts),
            "rows_per_s": {name: value * rows for name, value in speed.items()}}
