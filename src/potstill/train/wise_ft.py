"""WiSE-FT: save a mix of the trained student and the weights it started from (`trainer.wise_ft_alpha`).

Wortsman et al. 2022, "Robust fine-tuning of zero-shot models" (CVPR; arXiv 2109.01903): fine-tuning moves a
model toward its training distribution and away from what made it general; averaging the weights of the
fine-tuned model θ₁ with the model it started from θ₀,

    θ(α) = (1 − α)·θ₀ + α·θ₁,      0 < α < 1,

keeps much of both, because both ends lie in one low-loss basin (they share the start). The paper's default is
α = 0.5. For a distilled student θ₀ is its init: the teacher's chosen layers (layer-drop), the pruned teacher,
or a random init (where the mix only shrinks the update). On the general embedding suite, α = 0.5 of the demo
student beats sentence-transformers' layer-reduction example on five of six task types (docs/results.md).

Every floating-point parameter and buffer is mixed in float32 and cast back; integer buffers (position ids) keep
the trained values. The init weights are captured when the student is built, before any step, and written to
`<run>/wise_ft_init.safetensors` (atomically), so a resumed run mixes with the same θ₀ as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

INIT_FILE = "wise_ft_init.safetensors"


def interpolate_weights(init: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """(1 − alpha)·init + alpha·trained for every floating-point tensor, in float32, cast to the trained tensor's
    dtype and device; integer tensors are taken from `trained`. Both dicts must hold the same keys and shapes."""
    if init.keys() != trained.keys():
        missing, extra = sorted(trained.keys() - init.keys()), sorted(init.keys() - trained.keys())
        raise ValueError(f"the init and the trained student have different weights (only trained: {missing[:3]}, "
                         f"only init: {extra[:3]})")
    mixed = {}
    for key, end in trained.items():
        start = init[key]
        if start.shape != end.shape:
            raise ValueError(f"weight {key}: init shape {tuple(start.shape)} vs trained {tuple(end.shape)}")
        if not end.is_floating_point():
            mixed[key] = end
            continue
        start32 = start.to(device=end.device, dtype=torch.float32)
        mixed[key] = torch.lerp(start32, end.float(), alpha).to(end.dtype)
    return mixed


class WiSEFT:
    """Keep the student's init (`capture`, or `load` on resume) and mix it into the trained student (`apply`)."""

    def __init__(self, alpha: float, run_dir: str | Path) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"WiSE-FT's alpha is the trained weights' share, in (0, 1); got {alpha}")
        self.alpha, self.path = alpha, Path(run_dir) / INIT_FILE
        self.init: dict[str, torch.Tensor] | None = None

    def capture(self, student: nn.Module, *, write: bool) -> None:
        """Copy the untrained student's weights to the CPU; `write` (the main process) also stores them."""
        from safetensors.torch import save

        from potstill.io import atomic_write_bytes

        self.init = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in student.state_dict().items()}
        if write:
            atomic_write_bytes(self.path, save(self.init))

    def load(self) -> None:
        """The init weights a resumed run stored when it started."""
        from safetensors.torch import load_file

        from potstill.errors import UserError

        if not self.path.exists():
            raise UserError(f"{self.path} is missing: trainer.wise_ft_alpha mixes the trained student with the "
                            f"weights the run started from, which the run stored there. Start the run again "
                            f"(--overwrite) or drop trainer.wise_ft_alpha")
        self.init = load_file(str(self.path))

    @torch.no_grad()
    def apply(self, student: nn.Module) -> None:
        """Replace the student's weights by (1 − alpha)·init + alpha·trained."""
        assert self.init is not None, "capture() or load() first"
        student.load_state_dict(interpolate_weights(self.init, student.state_dict(), self.alpha))
