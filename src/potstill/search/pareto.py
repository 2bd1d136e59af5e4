"""The outputs of `potstill search`, rewritten after every trial (atomically, so a killed search leaves them whole):

- `search.json`: the search's settings and every trial (sampled values, overrides, quality, speed-up, parameters,
  seconds, metrics, error), with the Pareto front's trial numbers (the log `potstill advise` and the recommender
  read);
- `pareto.md`: the front as a table, best quality first;
- `pareto/<recipe name>-trial-NNNN.yaml`: per front point the full recipe (the trial budget left out) that
  `potstill run` accepts;
- `pareto.png` (at the end): quality against speed-up over the teacher, every trial grey, the front in colour.

A trial is on the front when no other finished trial is at least as good on both quality (in the space's
direction) and speed-up, and better on one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from potstill.io import atomic_write_json, atomic_write_text


def pareto_front(points: list[tuple[float, float]], maximize_quality: bool = True) -> list[int]:
    """Indices of the non-dominated (quality, speed-up) points, speed-up always maximised; NaNs never on it."""
    sign = 1.0 if maximize_quality else -1.0
    keyed = [(sign * q, s) for q, s in points]
    front = []
    for i, (q, s) in enumerate(keyed):
        if not (math.isfinite(q) and math.isfinite(s)):
            continue
        dominated = any(math.isfinite(q2) and math.isfinite(s2) and q2 >= q and s2 >= s and (q2 > q or s2 > s)
                        for j, (q2, s2) in enumerate(keyed) if j != i)
        if not dominated:
            front.append(i)
    return front


def trial_records(study: Any) -> list[dict[str, Any]]:
    """Every trial of the study as a plain record (search.json's `trials`)."""
    records = []
    for t in study.trials:
        attrs = t.user_attrs
        values = t.values or [float("nan"), float("nan")]
        records.append({"number": t.number, "state": t.state.name.lower(), "label": attrs.get("label", ""),
                        "values": dict(t.params), "overrides": attrs.get("overrides", []),
                        "quality": values[0], "speedup": values[1], "params": attrs.get("params"),
                        "seconds": attrs.get("seconds"), "metrics": attrs.get("metrics", {}),
                        "error": attrs.get("error")})
    return records


def write_outputs(study: Any, settings: Any, meta: dict[str, Any], *, final: bool = False) -> dict[str, Any]:
    from potstill.search.trial import candidate_recipe_text

    study_dir = Path(settings.study_dir)
    records = trial_records(study)
    done = [r for r in records if r["state"] == "complete"]
    maximize = meta["direction"] == "maximize"
    front = [done[i] for i in pareto_front([(r["quality"], r["speedup"]) for r in done], maximize)]
    front.sort(key=lambda r: -r["quality"] if maximize else r["quality"])
    recipes_dir = study_dir / "pareto"
    recipes_dir.mkdir(parents=True, exist_ok=True)
    base_name = Path(meta["recipe"]).stem
    wanted = set()
    for r in front:
        name = f"{base_name}-trial-{r['number']:04d}"
        path = recipes_dir / f"{name}.yaml"
        wanted.add(path.name)
        r["recipe"] = str(path)
        if not path.exists():
            text = candidate_recipe_text(settings.recipe_path, settings.user_sets, r["overrides"], name)
            atomic_write_text(path, f"# potstill search {meta['study']}, trial {r['number']}: {r['label']}\n"
                                    f"# {meta['metric']} {r['quality']:.4f}, {r['speedup']:.2f}× the teacher "
                                    f"(proxy {meta['proxy']})\n{text}")
    for stale in recipes_dir.glob("*.yaml"):
        if stale.name not in wanted:
            stale.unlink()
    on_front = {r["number"] for r in front}
    for r in records:
        r["pareto"] = r["number"] in on_front
    result = {**meta, "trials": records, "pareto": [r["number"] for r in front],
              "finished": len(done), "failed": sum(r["state"] == "fail" for r in records)}
    atomic_write_json(study_dir / "search.json", result)
    atomic_write_text(study_dir / "pareto.md", front_table(front, meta["metric"]) + "\n")
    if final and done:
        plot_front(done, front, meta, study_dir / "pareto.png")
    return result


def front_table(front: list[dict[str, Any]], metric: str) -> str:
    lines = [f"| trial | candidate | {metric} | speed-up | params | recipe |", "|---|---|---|---|---|---|"]
    for r in front:
        params = f"{r['params'] / 1e6:.2f} M" if r.get("params") else "?"
        lines.append(f"| {r['number']} | {r['label']} | {r['quality']:.4f} | {r['speedup']:.2f}× | {params} | "
                     f"{Path(r['recipe']).name} |")
    return "\n".join(lines)


def front_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The front of a search.json as table rows (for `report.rich_table`)."""
    by_number = {r["number"]: r for r in result["trials"]}
    return [{"trial": n, "candidate": by_number[n]["label"], result["metric"]: round(by_number[n]["quality"], 4),
             "speed-up": round(by_number[n]["speedup"], 2), "params (M)": round((by_number[n]["params"] or 0) / 1e6, 2),
             "recipe": Path(by_number[n]["recipe"]).name} for n in result["pareto"]]


def plot_front(done: list[dict[str, Any]], front: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["speedup"] for r in done], [r["quality"] for r in done], color="0.7", label="trials")
    ordered = sorted(front, key=lambda r: r["speedup"])
    ax.plot([r["speedup"] for r in ordered], [r["quality"] for r in ordered], "o-", color="tab:red",
            label="Pareto front")
    for r in ordered:
        ax.annotate(str(r["number"]), (r["speedup"], r["quality"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("speed-up over the teacher (×)")
    ax.set_ylabel(f"{meta['metric']} ({meta['direction']})")
    ax.set_title(f"potstill search: {meta['study']}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
