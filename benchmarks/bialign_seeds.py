"""BiAlign against KD alone on `recipes/bialign-toy.yaml`, paired over seeds (issue #21 §5).

Every run is `python -m potstill run recipes/bialign-toy.yaml --set seed=S --set
objectives.0.params.rank_weight=μ` in a fresh process; μ = 0 is KD alone (forward KL on every prompt's answer).
A seed fixes the demonstration sets drawn per query, the student's initialisation and the data order, and the
teacher (pretrained at load from its own fixed seed) is the same in every run, so the rows of one seed differ only
in μ: the comparison is paired. For each μ > 0 and each metric (answer_accuracy, demo_set_tau, kl_to_teacher on
the held-out queries) the script prints the per-seed values, the mean paired difference to μ = 0 with a 95 %
Student-t interval and its p-value, and a two-sided sign test over the seeds that differ (scipy).

`--extra field=value` adds the same `--set` to every row (e.g. `trainer.max_steps=400`); rows with other extras
are other rows. Results: one JSON line per run in `<runs>/results.jsonl`; a run already there is not run again,
so a killed study resumes. The tables cover the runs in the file of `--seeds` with these extras, old and new.

Usage: python benchmarks/bialign_seeds.py --seeds 0 1 2 3 4 5 6 7 8 9 --mu 0 0.03 [--jobs 2] [--extra …]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _llm_common import fmt_mean_std
from study_runs import REPO, run_potstill

RECIPE = REPO / "recipes" / "bialign-toy.yaml"
METRICS = ("answer_accuracy", "demo_set_tau", "kl_to_teacher")


def row_key(mu: float, extra: list[str]) -> str:
    """The row a run belongs to: its μ and any extra overrides."""
    return " ".join([f"mu={mu:g}", *extra])


def run_one(mu: float, seed: int, extra: list[str], runs: Path) -> dict:
    """One recipe run; its held-out metrics after training."""
    tag = "-".join(item.replace("=", "").replace(".", "_").replace("/", "_") for item in extra)
    name = f"mu{mu:g}-s{seed}" + (f"-{tag}" if tag else "")
    sets = [f"name={name}", f"output_dir={runs}", f"seed={seed}", f"objectives.0.params.rank_weight={mu}", *extra]
    summary, seconds = run_potstill(RECIPE, sets, label=name)
    after = next(row for row in summary["table"] if row["model"] == "student (after)")
    return {"row": row_key(mu, extra), "mu": mu, "seed": seed, "extra": extra, "seconds": round(seconds, 1),
            "train_seconds": summary.get("train_seconds"), **{m: after[m] for m in METRICS}}


def paired(treated: list[float], baseline: list[float]) -> dict:
    """Mean of treated − baseline with a 95 % Student-t interval and p-value, and the sign test's counts and
    two-sided p (ties dropped)."""
    from scipy import stats

    diffs = [t - b for t, b in zip(treated, baseline, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    out = {"n": n, "mean": mean, "low": float("nan"), "high": float("nan"), "t_p": float("nan")}
    if n > 1 and statistics.stdev(diffs) > 0:
        half = stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / n ** 0.5
        out.update(low=mean - half, high=mean + half, t_p=float(stats.ttest_rel(treated, baseline).pvalue))
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    out.update(wins=wins, losses=losses,
               sign_p=float(stats.binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0)
    return out


def tables(results: list[dict], baseline: str) -> str:
    """Per-seed values of every row, then each row's paired comparison with `baseline`."""
    by_row: dict[str, dict[int, dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], {})[r["seed"]] = r
    rows = sorted(by_row, key=lambda k: (k != baseline, k))
    seeds = sorted({s for runs in by_row.values() for s in runs})
    lines = []
    for metric in METRICS:
        lines += [f"\n{metric} per seed", "| seed | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
        for seed in seeds:
            cells = [f"{by_row[k][seed][metric]:.3f}" if seed in by_row[k] else "—" for k in rows]
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
        lines.append("| mean ± std | " + " | ".join(
            fmt_mean_std([r[metric] for r in by_row[k].values()], 3) for k in rows) + " |")
    if baseline not in by_row:
        return "\n".join(lines)
    lines += [f"\npaired against {baseline} (row − baseline, seeds run in both)",
              "| row | metric | seeds | mean diff | 95 % t interval | t-test p | wins / losses | sign-test p |",
              "|---|---|---|---|---|---|---|---|"]
    for k in rows:
        if k == baseline:
            continue
        common = sorted(set(by_row[k]) & set(by_row[baseline]))
        for metric in METRICS:
            p = paired([by_row[k][s][metric] for s in common], [by_row[baseline][s][metric] for s in common])
            lines.append(f"| {k} | {metric} | {p['n']} | {p['mean']:+.4f} | [{p['low']:+.4f}, {p['high']:+.4f}] | "
                         f"{p['t_p']:.3f} | {p['wins']} / {p['losses']} | {p['sign_p']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--mu", type=float, nargs="+", default=[0.0, 0.03],
                        help="rank_weight values; 0 = KD alone, the baseline of the paired tests")
    parser.add_argument("--extra", nargs="*", default=[], help="--set field=value added to every row")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (one thread each)")
    parser.add_argument("--runs", default=str(REPO / "runs" / "bialign_seeds"))
    parser.add_argument("--table-only", action="store_true",
                        help="print the tables of the runs already done (of --seeds and --extra)")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    out = runs / "results.jsonl"
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    have = {(r["row"], r["seed"]) for r in done}
    todo = [] if args.table_only else [(mu, seed) for seed in args.seeds for mu in args.mu
                                       if (row_key(mu, args.extra), seed) not in have]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, mu, seed, args.extra, runs) for mu, seed in todo]
        for future in futures:
            result = future.result()
            print(f"{result['row']:30s} seed {result['seed']}: " + "  ".join(
                f"{m} {result[m]:.4f}" for m in METRICS) + f"  ({result['seconds']:.0f} s)", flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
            done.append(result)
    shown = [r for r in done if r["seed"] in args.seeds and r["extra"] == args.extra]
    print(tables(shown, row_key(0.0, args.extra)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
