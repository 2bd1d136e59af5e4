"""Teachers: where the signals come from. A live teacher is frozen, in eval mode, and runs under
`torch.inference_mode`."""

from potstill.teachers.live import freeze, load_callable, teacher_outputs

__all__ = ["freeze", "load_callable", "teacher_outputs"]
