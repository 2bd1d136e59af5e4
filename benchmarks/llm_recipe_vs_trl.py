"""A finished causal_lm recipe run against TRL's GKDTrainer given the same wall time (issue #16 §4).

The potstill side is a run folder made by the recipe (e.g. `potstill cache` then `potstill run` of
`recipes/smollm2-topk.yaml`). TRL's `GKDTrainer` (β = 0: forward KL(teacher ‖ student), λ = 0: off-policy)
then gets `--budget-seconds` of training wall time: pass the potstill run's training seconds plus its cache
build, so that TRL's live teacher is charged what potstill's cache cost. It trains the same student init
(the run's recipe, `teacher.cache` dropped) on the same records in potstill's epoch order, with the
recipe's AdamW and warm-up + decay schedule, the decay spread over `--horizon` steps (about the steps a
live-teacher step rate allows in the budget; training stops at the budget or the horizon, whichever is first).

Its student is saved as a run folder (`recipe.yaml`, `student/`, `summary.json`), so the same commands score
both students on the same held-out data:

    potstill eval RUN                # the recipe's held-out split (BBC validation articles)
    potstill eval RUN --suite lm     # text from other sources than the training data

Usage: python benchmarks/llm_recipe_vs_trl.py --potstill-run runs/smollm2-topk --budget-seconds 2803 \
           --horizon 600 --out runs/trl-smollm2-topk
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--potstill-run", type=Path, required=True, help="finished causal_lm run folder")
    parser.add_argument("--budget-seconds", type=float, required=True, help="TRL's training wall time")
    parser.add_argument("--horizon", type=int, required=True, help="steps the learning-rate decay spans")
    parser.add_argument("--out", type=Path, required=True, help="run folder for TRL's student")
    args = parser.parse_args(argv)

    import torch
    from _llm_common import gkd_config_kwargs, trl_gkd_inputs, trl_optimizer, trl_wall_clock
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from potstill.config.loading import dump_recipe, load_saved_recipe
    from potstill.io import atomic_write_json, atomic_write_text
    from potstill.tasks import build_task

    recipe = load_saved_recipe(args.potstill_run / "recipe.yaml")
    recipe.teacher.cache = None
    recipe.output_dir, recipe.name = str(args.out.parent), args.out.name
    cfg = recipe.trainer
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = build_task(recipe, run_dir=args.out)
    task.setup()
    dataset, collate = trl_gkd_inputs(task, seed=recipe.seed, batch_size=cfg.batch_size)
    optimizer, scheduler = trl_optimizer(task.student, cfg, horizon=args.horizon)
    clock = trl_wall_clock(args.budget_seconds)
    config = GKDConfig(**gkd_config_kwargs(out_dir=tempfile.mkdtemp(prefix="trl_gkd_"), seed=recipe.seed,
                                           max_length=recipe.data.max_length),
                       lmbda=0.0, beta=0.0, seq_kd=False, max_steps=args.horizon,
                       per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr,
                       weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
    trainer = GKDTrainer(model=task.student, teacher_model=task.teacher, args=config, train_dataset=dataset,
                         data_collator=collate, processing_class=task.tokenizer, callbacks=[clock],
                         optimizers=(optimizer, scheduler))
    started = time.perf_counter()
    trainer.train()
    student = trainer.accelerator.unwrap_model(trainer.model)
    args.out.mkdir(parents=True, exist_ok=True)
    task.save_student(student, args.out / "student")
    atomic_write_text(args.out / "recipe.yaml", dump_recipe(recipe))
    summary = {"complete": True, "steps": clock.steps, "train_seconds": clock.seconds,
               "wall_seconds": time.perf_counter() - started, "trainer": "trl GKDTrainer (beta 0, lmbda 0)",
               "budget_seconds": args.budget_seconds, "horizon": args.horizon}
    atomic_write_json(args.out / "summary.json", summary)
    print(f"TRL GKD: {clock.steps} steps in {clock.seconds:.0f} s; student in {args.out / 'student'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
