"""A small ViT classifier pre-trained with labels on scikit-learn's 8×8 digits: the frozen image tower of the
PromptKD recipe and benchmark (the stand-in for an ImageNet-pretrained ViT).

Hugging Face `ViTForImageClassification`, 8×8 inputs, 2×2 patches, 4 layers × 64, trained deterministically
(fixed seed, Adam, `steps` batches of 64 from the builtin digits train split; ~1 min on one core). The digits MAE of
`potstill.examples.digits_vit` was tried as the tower first; its CLS features hardly vary between MNIST digits, so it
gives a prompt-only student nothing to work with.
"""

from __future__ import annotations

import torch
from torch import nn


def digits_vit_classifier(steps: int = 800, seed: int = 0, hidden: int = 64, layers: int = 4) -> nn.Module:
    """The trained ViT (eval mode), for [0, 1] pixels (N, 1, 8, 8)."""
    from transformers import ViTConfig, ViTForImageClassification

    from potstill.examples.digits_vit import digit_images

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden,
                                                num_hidden_layers=layers, num_attention_heads=4,
                                                intermediate_size=2 * hidden, num_labels=10, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0))
    torch.random.set_rng_state(state)
    images, labels = digit_images("train")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(pixel_values=images[idx]).logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
