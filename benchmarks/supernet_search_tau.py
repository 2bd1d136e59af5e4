"""Kendall τ of a `potstill search` supernet study's scores against the trained suite quality that
`benchmarks/supernet_suite.py` recorded, over the candidates both hold (issue #19's proxy target: τ ≥ 0.6).

Usage: python benchmarks/supernet_search_tau.py STUDY/search.json [runs/supernet_suite/results.jsonl]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scipy.stats import kendalltau


def main() -> None:
    search = json.loads(Path(sys.argv[1]).read_text())
    suite_file = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/supernet_suite/results.jsonl")
    suite = {row["candidate"]: row for row in map(json.loads, suite_file.read_text().splitlines()) if row}
    rows = []
    for trial in search["trials"]:
        values = trial["values"]
        label = f"{values.get('depth')}L-h{values.get('width')}-ffn{values.get('ffn')}"
        if trial["state"] == "complete" and label in suite:
            rows.append((label, trial["quality"], suite[label]["supernet"], suite[label]["suite_average"],
                         trial["speedup"]))
    rows.sort(key=lambda r: -r[3])
    print("| candidate | search's supernet_loss | supernet_suite's loss | suite avg (trained) | speed-up |")
    print("|---|---|---|---|---|")
    for label, loss, bench, quality, speedup in rows:
        print(f"| {label} | {loss:.3f} | {bench:.3f} | {quality:.3f} | {speedup:.2f}× |")
    tau = kendalltau([-r[1] for r in rows], [r[3] for r in rows]).statistic
    same = kendalltau([r[1] for r in rows], [r[2] for r in rows]).statistic
    print(f"\n{len(rows)} shared candidates: Kendall τ (−supernet_loss vs trained suite average) {tau:.3f}; "
          f"τ (search's loss vs supernet_suite's) {same:.3f}")


if __name__ == "__main__":
    main()
