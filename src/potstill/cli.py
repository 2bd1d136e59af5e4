"""The `potstill` command line: run, demo, eval, export, cache, objectives, recipes, methods, serve, generate,
pgkd, align, search, advise.

A user's mistake (bad recipe, missing file, malformed data line) prints one paragraph and exits with
code 2, without a traceback. A run that diverges (NaN/inf loss) exits with code 3; `generate` exits with
code 1 when some prompts still failed after their retries.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from potstill.cli_errors import disk_full, disk_full_line, error_line, interrupted, usage_errors, usage_line
from potstill.cyclealign_command import align  # typer signature only; work is imported lazily
from potstill.errors import UserError, one_line
from potstill.search.command import advise, search  # typer signatures only; work is imported lazily

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="potstill: distil a large teacher model into a small, fast student.")

SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                     help="override a recipe field, e.g. trainer.max_steps=200")]
# the teacher endpoint client's settings, shared by the commands that call one (generate, pgkd)
Concurrency = Annotated[int, typer.Option(min=1, help="requests in flight")]
MaxRetries = Annotated[int, typer.Option(min=0, help="retries per request on 429/5xx/timeouts")]
Timeout = Annotated[float, typer.Option(min=0.1, help="seconds per request (a local CPU teacher needs minutes)")]


def _console():
    from potstill.ui import console

    return console


def _results():
    from potstill.ui import result_console

    return result_console()


def _quiet_transformers() -> None:
    """transformers' per-load tqdm bars drown the run's own progress; potstill shows its own."""
    from transformers.utils import logging

    logging.disable_progress_bar()


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="recipe YAML file, or the name of a shipped recipe (see "
                                                  "`potstill recipes`)")],
        set_: SetOption = None,
        resume: Annotated[bool, typer.Option("--resume", help="continue from the run's last checkpoint")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an earlier run of the same name")] = False,
        ) -> None:
    """Run the distillation a recipe describes; output goes to <output_dir>/<name>/."""
    from potstill.config import load_recipe
    from potstill.recipes import resolve_recipe
    from potstill.train import run_recipe
    from potstill.train.launch import relaunch_as_cpu_process_group

    cfg = load_recipe(resolve_recipe(recipe), set_ or [])
    relaunch_as_cpu_process_group()
    _quiet_transformers()
    summary = run_recipe(cfg, resume=resume, overwrite=overwrite)
    _print_summary(summary, cfg.run_dir)


@app.command()
def demo(set_: SetOption = None) -> None:
    """Distil all-MiniLM-L6-v2 into a 2-layer student on general text, offline, and judge it on held-out tasks."""
    from potstill.demo import run_demo

    _quiet_transformers()
    run_demo(set_ or [])


@app.command("eval")
def eval_(run_dir: Annotated[Path, typer.Argument(help="a finished run folder (holds recipe.yaml and student/)")],
          suite: Annotated[str | None, typer.Option("--suite", help="general: score the student and teacher of an "
                                                    "embedding run on the offline general suite; writes "
                                                    "<run>/eval_general.json. lm: a causal_lm run's on the "
                                                    "held-out LM suite; writes <run>/eval_lm.json")] = None,
          ) -> None:
    """Score a run's saved student against its teacher on the recipe's held-out data (or on --suite general|lm)."""
    from potstill.report import rich_table

    _quiet_transformers()
    if suite == "lm":
        from potstill.evaluate import evaluate_lm_suite

        result = evaluate_lm_suite(run_dir)
        _console().print(rich_table(f"LM suite: {run_dir} ({result['seconds']} s)", result["table"]))
        _console().print(f"written to {run_dir / 'eval_lm.json'}", highlight=False)
        return
    if suite is not None:
        _eval_suite(run_dir, suite)
        return
    from potstill.evaluate import evaluate_run
    from potstill.io import atomic_write_json

    rows = evaluate_run(run_dir)
    _results().print(rich_table(f"evaluation of {run_dir}", rows))
    out = atomic_write_json(run_dir / "eval.json", {"table": rows})
    _console().print(f"written to {out}", highlight=False)


def _eval_suite(run_dir: Path, suite: str) -> None:
    from potstill.evaluate import evaluate_general_suite
    from potstill.report import rich_table

    if suite != "general":
        raise UserError(f"--suite: expected general or lm, got {suite!r}")
    per_task = evaluate_general_suite(run_dir)["per_task"]
    _results().print(rich_table(f"general suite: {run_dir} (average = mean over tasks)", per_task))
    _console().print(f"written to {run_dir / 'eval_general.json'}", highlight=False)


@app.command()
def export(run_dir: Annotated[Path, typer.Argument(help="a finished run folder (holds recipe.yaml and student/)")],
           int8: Annotated[bool, typer.Option("--int8", help="also write an int8 copy (ONNX Runtime dynamic "
                                              "quantisation) and measure what it costs")] = False) -> None:
    """Export a run's student to ONNX (<run>/export/), checked against PyTorch on the run's own records."""
    from potstill.export import export_run
    from potstill.report import rich_table

    _quiet_transformers()
    result = export_run(run_dir, int8=int8)
    rows = [{"model": "onnx float32", "bytes": result["bytes"]["float32"],
             "max |Δ| vs PyTorch": result["check"]["max_abs_deviation"],
             **{k: v for k, v in result["check"].items() if k.endswith("_pytorch")}}]
    if int8:
        q = result["int8"]
        rows.append({"model": "onnx int8", "bytes": result["bytes"]["int8"],
                     **{k: v for k, v in q.items() if k not in ("model", "rows_per_s")}})
        rows += [{"model": f"{name} (rows/s)", "rows/s": speed} for name, speed in q["rows_per_s"].items()]
    _results().print(rich_table(f"export of {run_dir} ({result['output']})", rows))
    _console().print(f"written to {run_dir / 'export'}", highlight=False)


@app.command()
def cache(recipe: Annotated[Path, typer.Argument(help="causal_lm recipe YAML file")],
          set_: SetOption = None,
          k: Annotated[int, typer.Option("--k", min=1, help="token ids kept per position")] = 64,
          temperature: Annotated[float, typer.Option(help="teacher logits are divided by this (the run's "
                                                     "objectives must use the same temperature)")] = 1.0,
          out: Annotated[Path | None, typer.Option(help="cache folder (default: the recipe's teacher.cache)")] = None,
          batch_size: Annotated[int, typer.Option(min=1, help="sequences per teacher forward")] = 8,
          overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing cache")] = False,
          ) -> None:
    """Run a causal_lm recipe's teacher once over its training data; store the top-k log-probs per token."""
    from potstill.config import load_recipe
    from potstill.train.cache_processes import capture_cache
    from potstill.train.launch import relaunch_as_cpu_process_group
    from potstill.ui import make_progress

    relaunch_as_cpu_process_group()  # several processes: each rank writes its own part (train.cache_processes)
    cfg = load_recipe(recipe, set_ or [])
    if cfg.task != "causal_lm":
        raise UserError(f"{recipe}: field task: `potstill cache` stores a causal LM's token log-probs; this recipe's "
                        f"task is {cfg.task}")
    target = out or (Path(cfg.teacher.cache) if cfg.teacher.cache else None)
    if target is None:
        raise UserError(f"{recipe}: say where the cache goes: --out DIR, or teacher.cache in the recipe")
    _quiet_transformers()
    if cfg.trainer.num_threads:
        import torch

        torch.set_num_threads(cfg.trainer.num_threads)
    cfg.teacher.cache = str(target)
    progress = make_progress()
    with progress:
        bar = progress.add_task("teacher top-k", total=None)
        manifest = capture_cache(cfg, target, k=k, temperature=temperature, batch_size=batch_size,
                                 overwrite=overwrite,
                                 on_batch=lambda done, total: progress.update(bar, completed=done, total=total))
    if os.environ.get("RANK", "0") == "0":
        _console().print(f"cache written to {target}: {manifest['num_records']:,} sequences, "
                         f"{manifest['num_tokens']:,} tokens, k={k}, T={temperature:g}, "
                         f"{manifest['bytes_per_token']} bytes/token, {manifest['seconds']:.1f} s")


@app.command()
def objectives() -> None:
    """List every objective: formula, defaults and the paper it comes from."""
    from potstill.losses import OBJECTIVES

    console = _results()
    for info in OBJECTIVES.values():
        defaults = ", ".join(f"{k}={v}" for k, v in info.defaults.items())
        console.print(f"[bold]{info.name}[/bold]  [dim]({info.kind})[/dim]", highlight=False)
        console.print(f"  {info.formula}", highlight=False, markup=False)
        console.print(f"  defaults: {defaults}", highlight=False, markup=False)
        console.print(f"  paper: {info.paper}", highlight=False, markup=False)
        if info.notes:
            console.print(f"  note: {info.notes}", highlight=False, markup=False)
        console.print()


def _print_version(value: bool) -> None:
    if value:
        from potstill import __version__

        typer.echo(f"potstill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="print potstill's version and exit")] = False) -> None:
    """The command group; `--version` is handled by its eager callback."""


@app.command()
def recipes(copy: Annotated[Path | None, typer.Option("--copy", metavar="DEST", help="copy the shipped recipes (and "
                                                      "the data they read) into the folder DEST, to edit")] = None,
            ) -> None:
    """List the shipped recipes (`potstill run NAME` runs one), or copy them all with --copy DEST."""
    from potstill.recipes import copy_recipes, packaged_recipe, packaged_recipes

    if copy is not None:
        written = copy_recipes(copy)
        _console().print(f"copied {len(written)} recipes into {copy}: run one with "
                         f"`potstill run {copy / 'digits.yaml'}`", highlight=False)
        return
    for name in packaged_recipes():  # name<TAB>path on stdout: for `cut` and `grep`
        print(f"{name}\t{packaged_recipe(name)}")


@app.command()
def methods(json_output: Annotated[bool, typer.Option("--json", help="print the catalogue as JSON")] = False) -> None:
    """List every implemented paper: what it is, its module, recipe and results row."""
    from potstill.methods import methods_command

    methods_command(json_output)


@app.command()
def generate(prompts: Annotated[Path, typer.Argument(help="prompts file: JSONL/CSV/TSV/Parquet, or .txt (one per "
                                                     "line)")],
             out: Annotated[Path, typer.Option("--out", "-o", help="dataset to write (JSONL)")],
             base_url: Annotated[str, typer.Option(help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1",
                                                   envvar="POTSTILL_BASE_URL")],
             model: Annotated[str, typer.Option(help="model name sent to the endpoint")],
             api_key_env: Annotated[str, typer.Option(help="environment variable holding the API key (never pass "
                                                      "the key itself on the command line)")] = "OPENAI_API_KEY",
             column: Annotated[str, typer.Option(help="field holding the prompt (a string or chat messages)")]
             = "prompt",
             rationale: Annotated[bool, typer.Option("--rationale", help="ask for step-by-step reasoning and a final "
                                                     "`Answer:` line; rows get input/rationale/label")] = False,
             system: Annotated[str | None, typer.Option(help="system prompt")] = None,
             max_tokens: Annotated[int, typer.Option(min=1)] = 256,
             temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
             top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
             seed: Annotated[int | None, typer.Option(help="sampling seed sent to the endpoint")] = None,
             top_logprobs: Annotated[int, typer.Option(min=0, max=20, help="store the teacher's top-k log-probs "
                                                       "per generated token")] = 0,
             filter_: Annotated[str, typer.Option("--filter", help="none | match (answer equals --reference-column) "
                                                  "| verifier (--verifier module:function) | program (run the "
                                                  "teacher's program; keep it when it gives the reference)")] = "none",
             resample: Annotated[int, typer.Option(min=0, help="--filter program: retries at temperature 0.5")] = 1,
             reference_column: Annotated[str | None, typer.Option(help="field with the expected answer")] = None,
             verifier: Annotated[str | None, typer.Option(help="'module:function' called as fn(record, answer) -> "
                                                          "bool")] = None,
             cache: Annotated[Path | None, typer.Option(help="response cache (SQLite); default <out>.cache.sqlite")]
             = None,
             concurrency: Concurrency = 8,
             requests_per_second: Annotated[float | None, typer.Option(min=0.0, help="rate limit")] = None,
             max_retries: MaxRetries = 8,
             timeout: Timeout = 60.0,
             limit: Annotated[int | None, typer.Option(min=1, help="only the first N prompts")] = None,
             ) -> None:
    """Ask a text-only teacher for every prompt; write a JSONL dataset with provenance.

    Resumable: on a re-run, answered prompts come from the response cache."""
    from functools import partial

    from potstill.generate import GenerationSettings, generate_dataset, load_prompts, sidecar
    from potstill.program_distillation import ProgramSettings, generate_programs
    from potstill.teachers.endpoint import EndpointTeacher
    from potstill.teachers.live import load_callable
    from potstill.ui import make_progress

    if filter_ not in ("none", "match", "verifier", "program"):
        raise UserError(f"--filter: expected none, match, verifier or program, got {filter_!r}")
    records = load_prompts(prompts, column)[:limit]
    check = load_callable(verifier, field="--verifier") if verifier else None
    settings = GenerationSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                  top_logprobs=top_logprobs, system=system, rationale=rationale)
    cache_path = cache or sidecar(out, "cache.sqlite")
    teacher = EndpointTeacher(base_url, model, api_key_env=api_key_env, cache=cache_path, concurrency=concurrency,
                              timeout=timeout, max_retries=max_retries, requests_per_second=requests_per_second)
    progress = make_progress()
    with teacher, progress:
        bar = progress.add_task("teacher responses", total=len(records))
        write = partial(generate_programs, program=ProgramSettings(retries=resample)) if filter_ == "program" \
            else partial(generate_dataset, filter=filter_, verifier=check)
        report = write(records, teacher, out, column=column, settings=settings, reference_column=reference_column,
                       on_progress=lambda done, total: progress.update(bar, completed=done))
    console = _console()
    console.print(f"{out}: {report.kept:,} rows kept of {report.prompts:,} prompts ({report.from_cache:,} answers "
                  f"from the cache, {report.requests:,} requests, {report.retries:,} retries, "
                  f"{report.rejected:,} rejected, {len(report.failed):,} failed) in {report.seconds:.1f} s",
                  highlight=False)
    if report.failed:
        console.print(f"{len(report.failed)} prompt(s) failed after retries (first: record "
                      f"{report.failed[0]['record']}: {report.failed[0]['error']}); run the same command again to "
                      f"ask for them only", highlight=False)
        raise typer.Exit(1)


@app.command()
def pgkd(recipe: Annotated[Path, typer.Argument(help="text-classification recipe YAML (data.eval = validation)")],
         base_url: Annotated[str, typer.Option(help="OpenAI-compatible endpoint of the teacher LLM",
                                               envvar="POTSTILL_BASE_URL")],
         model: Annotated[str, typer.Option(help="model name sent to the endpoint")],
         task: Annotated[str, typer.Option("--task", help="one sentence the teacher reads: what is classified")],
         set_: SetOption = None,
         api_key_env: Annotated[str, typer.Option(help="environment variable holding the API key")]
         = "OPENAI_API_KEY",
         cycles: Annotated[int, typer.Option(min=0, help="teacher rounds at most")] = 5,
         patience: Annotated[int, typer.Option(min=1, help="stop after this many rounds without gain")] = 2,
         per_cycle: Annotated[int, typer.Option(min=1, help="new examples asked for per round")] = 24,
         weak_classes: Annotated[int, typer.Option(min=1, help="lowest-F1 classes targeted per round")] = 3,
         temperature: Annotated[float, typer.Option(min=0.0)] = 0.7,
         cache: Annotated[Path | None, typer.Option(help="response cache; default <run>/pgkd/cache.sqlite")] = None,
         resume: Annotated[bool, typer.Option("--resume", help="continue a killed loop")] = False,
         max_tokens: Annotated[int, typer.Option(min=1, help="tokens per teacher answer (one answer holds a "
                                                 "round's examples)")] = 1024,
         concurrency: Concurrency = 4, timeout: Timeout = 120.0, max_retries: MaxRetries = 8,
         ) -> None:
    """PGKD: a teacher LLM writes examples of the student classifier's weakest classes.

    Di Palo et al. 2024: train, validate, ask for examples of the lowest-F1 classes, retrain; stop when
    validation macro-F1 stops improving."""
    from potstill.config import load_recipe
    from potstill.teachers.endpoint import EndpointTeacher
    from potstill.train.pgkd_cycles import run_pgkd

    cfg = load_recipe(recipe, set_ or [])
    _quiet_transformers()
    console = _console()
    teacher = EndpointTeacher(base_url, model, api_key_env=api_key_env,
                              cache=cache or cfg.run_dir / "pgkd" / "cache.sqlite", concurrency=concurrency,
                              timeout=timeout, max_retries=max_retries)
    with teacher:
        summary = run_pgkd(cfg, teacher, task_description=task, resume=resume,
                           log=lambda msg: console.print(msg, highlight=False), max_cycles=cycles,
                           patience=patience, per_cycle=per_cycle, weak_classes=weak_classes,
                           temperature=temperature, max_tokens=max_tokens)
    console.print(f"best cycle {summary['best_cycle']}: macro-F1 {summary['best_macro_f1']:.3f} on "
                  f"{summary['train_size']:,} training examples; student: {summary['student_dir']}", highlight=False)


@app.command()
def serve(model: Annotated[str, typer.Argument(help="Hugging Face causal LM folder, or builtin:smollm2")],
          host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")]
          = "127.0.0.1",
          port: Annotated[int, typer.Option(min=0, max=65535, help="port (0: any free port)")] = 8000,
          name: Annotated[str | None, typer.Option(help="model name clients send (default: the folder's name)")]
          = None,
          api_key_env: Annotated[str | None, typer.Option(help="environment variable holding the key clients must "
                                                          "send as 'Authorization: Bearer KEY'")] = None,
          fail_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="fraction of requests answered with "
                                                   "--fail-status (fault injection)")] = 0.0,
          fail_status: Annotated[int, typer.Option(min=400, max=599, help="status of injected failures")] = 500,
          fail_retry_after: Annotated[float | None, typer.Option(min=0.0, help="Retry-After seconds sent with "
                                                                 "injected failures")] = None,
          delay_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="fraction of requests delayed")] = 0.0,
          delay: Annotated[float, typer.Option(min=0.0, help="seconds a delayed request waits")] = 0.0,
          fault_seed: Annotated[int, typer.Option(help="seed of the fault draws")] = 0,
          request_log: Annotated[Path | None, typer.Option(help="append one JSON line per request to this file")]
          = None,
          max_tokens_limit: Annotated[int, typer.Option(min=1, help="cap on max_tokens")] = 512,
          ) -> None:
    """Serve a local causal LM as an OpenAI-compatible endpoint (/v1/chat/completions, /v1/completions)."""
    from potstill.serve import BUILTIN_SMOLLM2, FaultSettings, LocalServer, create_app, load_model

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env: the environment variable {api_key_env} is not set or empty")
    faults = FaultSettings(fail_rate=fail_rate, fail_status=fail_status, delay_rate=delay_rate, delay_s=delay,
                           seed=fault_seed, retry_after=fail_retry_after)
    _quiet_transformers()
    lm, tokenizer = load_model(model)
    served = name or ("smollm2-135m-instruct" if model == BUILTIN_SMOLLM2 else Path(model).resolve().name)
    # clients may also send the argument as typed, or a builtin's short name ("smollm2"), as the README does
    aliases = () if name else (model, model.removeprefix("builtin:"))
    app_ = create_app(lm, tokenizer, model_name=served, faults=faults, request_log=request_log, api_key=api_key,
                      max_tokens_limit=max_tokens_limit, aliases=aliases)
    server = LocalServer(app_, host=host, port=port)
    with server:
        print(f"potstill serve: {served} on {server.base_url} (Ctrl-C stops)", file=sys.stderr, flush=True)
        print(server.base_url, flush=True)
        try:
            server.wait()
        except KeyboardInterrupt:
            pass


app.command()(align)
app.command()(search)
app.command()(advise)


def _print_summary(summary: dict, run_dir: Path) -> None:
    if not summary:
        return
    from potstill.report import rich_table

    results = _results()
    if summary.get("task") == "continual":  # potstill.train.continual_run
        results.print(rich_table(f"{summary['method']} on {summary['stream']}: test accuracy per stream task",
                                 summary["table"]))
        results.print(f"average accuracy {summary['average_accuracy']:.3f}, forgetting {summary['forgetting']:.3f}; "
                      f"network saved to {summary['student_dir']}", highlight=False)
        return
    results.print(rich_table("teacher / student before / student after", summary["table"]))
    results.print(f"student saved to {summary['student_dir']}; report: {run_dir / 'report.html'}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    """Console entry point, and the one error boundary: a user's mistake (a `UserError`, a usage error of typer /
    click of any version, an `OSError` such as a missing or read-only path, a file that is not UTF-8) or a full disk
    (an `OSError` or a library's own error, with how to resume) prints one line and exits with code 2; divergence
    exits with 3; Ctrl-C with 130. Any other exception is a bug and keeps its traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from potstill.train import TrainingDiverged

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=args, prog_name="potstill", standalone_mode=False)
    except UserError as exc:
        return error_line(str(exc))
    except TrainingDiverged as exc:
        print(one_line(f"potstill: training diverged: {exc}"), file=sys.stderr)
        return 3
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):  # older typer / click: Ctrl-C arrives as Abort
        return interrupted(args)
    except usage_errors() as exc:
        return error_line(usage_line(exc))
    except UnicodeDecodeError as exc:
        return error_line(f"an input is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                      f"save it as UTF-8")
    except Exception as exc:  # a full disk, whoever reports it; any other OSError: a path the user gave
        if disk_full(exc):
            return disk_full_line(args)
        if not isinstance(exc, OSError):
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return error_line(f"{where}{exc.strerror or exc}")
    if code == 130:  # typer ≥ 0.29 turns Ctrl-C into Exit(130) and returns that code
        return interrupted(args)
    code = code if isinstance(code, int) else 0
    if code == 0 and "torch.distributed" in sys.modules:  # a launched run: end its process group ourselves
        from potstill.train.precision import close_process_group

        if close_process_group():
            _exit_without_finalizing(code)
    return code


def _exit_without_finalizing(code: int) -> None:
    """Exit after the atexit handlers and a flush, but without the interpreter's finalization, where gloo's
    threads can still be freeing collectives (`close_process_group`)."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
