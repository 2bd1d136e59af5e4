"""Trap 15: how far the digits teacher's and student's throughput moves between repeated measurements.

Builds the digits recipe's two models (the 2×256 MLP teacher, trained here in ~2 s, and the 1×16 MLP student),
then measures both `--measurements` times in a row with `potstill.eval.compare_throughput`, as the end of a
`potstill run digits` does (records collated into a float tensor, batches of 64 of the 360 test digits). Prints
one row per measurement and the spread across them: max / min of each model's samples/s, and of the
student ÷ teacher ratio, the number a report calls the speed-up.

    PYTHONPATH=src python benchmarks/throughput_noise.py --measurements 8

Point PYTHONPATH at another checkout's src to compare its measurement with this one's (before this change the
task measured with --rounds 3 --min-seconds 0.5).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from potstill.data import builtin_records
from potstill.eval import compare_throughput
from potstill.examples.digits import mlp, trained_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measurements", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the classification task's 7)")
    parser.add_argument("--min-seconds", type=float, default=0.25, help="seconds per timed round (task: 0.25)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = builtin_records("digits", "test")
    models = {"teacher": trained_teacher(hidden=256, depth=2).eval(), "student": mlp(hidden=16, depth=1).eval()}

    def runner(model: torch.nn.Module):
        return lambda chunk: model(torch.tensor([r["features"] for r in chunk], dtype=torch.float32))

    rows = []
    for i in range(args.measurements):
        rates = compare_throughput({name: runner(m) for name, m in models.items()}, records,
                                   batch_size=args.batch_size, rounds=args.rounds, min_seconds=args.min_seconds)
        rows.append((rates["teacher"], rates["student"], rates["student"] / rates["teacher"]))
        print(f"| {i + 1} | {rates['teacher']:,.0f} | {rates['student']:,.0f} | {rows[-1][2]:.2f} |", flush=True)
    print(f"torch threads: {torch.get_num_threads()}")
    for col, name in enumerate(("teacher samples/s", "student samples/s", "student ÷ teacher")):
        values = [row[col] for row in rows]
        print(f"{name}: min {min(values):,.2f}  median {statistics.median(values):,.2f}  max {max(values):,.2f}  "
              f"max/min {max(values) / min(values):.2f}")


if __name__ == "__main__":
    main()
