"""How far one exported model's outputs are from another's (`potstill export`), in the terms of the task's output.

Each batch gives additive parts (`batch_quality`); `summarise` turns their sums into the reported numbers. The
reference is PyTorch (the float32 ONNX check) or the float32 ONNX model (the int8 copy):

- `logits`: argmax agreement, and accuracy of both where the batch has `labels` (-100: none);
- `token_logits`: top-1 agreement on the tokens of `attention_mask`;
- `embedding`: mean and smallest cosine;
- `pixel_logits` (N, K, H, W): pixel agreement of the argmax maps, the mIoU of the other's map taking the
  reference's as the target, and where the batch has `masks`, mIoU and pixel accuracy of both (confusion
  matrices summed over every batch first, as `potstill.eval.segmentation` does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from potstill.eval.segmentation import confusion_matrix, confusion_miou


def batch_quality(kind: str, reference: torch.Tensor, other: torch.Tensor, batch: dict[str, Any]) -> dict[str, Any]:
    """The additive parts of `other`'s distance to `reference` on one batch."""
    if kind == "embedding":
        cos = nn.functional.cosine_similarity(reference, other, dim=-1)
        return {"cosine_sum": float(cos.sum()), "cosine_min": float(cos.min()), "rows": float(len(cos))}
    if kind == "token_logits":
        mask = batch["attention_mask"].bool()
        same = (reference.argmax(-1) == other.argmax(-1))[mask]
        return {"agree_sum": float(same.sum()), "rows": float(same.numel())}
    if kind == "pixel_logits":
        classes, ref_map, other_map = reference.shape[1], reference.argmax(1), other.argmax(1)
        out = {"agree_sum": float((ref_map == other_map).sum()), "rows": float(ref_map.numel()),
               "confusion_between": confusion_matrix(other_map, ref_map, classes)}
        masks = batch.get("masks")
        if masks is not None:
            out["confusion_ref"] = confusion_matrix(ref_map, masks, classes)
            out["confusion_other"] = confusion_matrix(other_map, masks, classes)
        return out
    out = {"agree_sum": float((reference.argmax(-1) == other.argmax(-1)).sum()), "rows": float(len(reference))}
    labels = batch.get("labels")
    if labels is not None:
        keep = labels != -100
        out["correct_ref"] = float((reference.argmax(-1) == labels)[keep].sum())
        out["correct_other"] = float((other.argmax(-1) == labels)[keep].sum())
        out["labelled"] = float(keep.sum())
    return out


def summarise(kind: str, parts: list[dict[str, Any]], reference: str = "float32", other: str = "int8"
              ) -> dict[str, float]:
    """The reported numbers from every batch's parts; keys name the two models (`reference`, `other`)."""
    total = {k: sum(p.get(k, 0.0) for p in parts) for k in parts[0]}
    if kind == "embedding":
        return {f"mean_cosine_to_{reference}": total["cosine_sum"] / total["rows"],
                f"min_cosine_to_{reference}": min(p["cosine_min"] for p in parts)}
    if kind == "pixel_logits":
        out = {f"pixel_agreement_with_{reference}": total["agree_sum"] / total["rows"],
               f"miou_with_{reference}": confusion_miou(total["confusion_between"])}
        for name, key in ((reference, "confusion_ref"), (other, "confusion_other")):
            if key in total:
                out[f"miou_{name}"] = confusion_miou(total[key])
                out[f"pixel_accuracy_{name}"] = float(total[key].diag().sum() / total[key].sum())
        return out
    out = {f"argmax_agreement_with_{reference}": total["agree_sum"] / total["rows"]}
    if total.get("labelled"):
        out[f"accuracy_{reference}"] = total["correct_ref"] / total["labelled"]
        out[f"accuracy_{other}"] = total["correct_other"] / total["labelled"]
    return out
