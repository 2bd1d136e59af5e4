"""Tiny masked-autoencoder ViTs on scikit-learn's 8×8 digits, for the `vision` task (DMAE) recipe and tests.

`mae_teacher` pre-trains an MAE (Hugging Face `ViTMAEForPreTraining`: 2×2 patches, 16 per image, 75% masked)
on the builtin digits train split, deterministically (fixed seed, Adam), so the recipe needs no weight file;
`mae_student` is a smaller untrained one with the same patching.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE, PATCH, CHANNELS = 8, 2, 1


def mae(hidden: int = 64, layers: int = 4, heads: int = 4, decoder_hidden: int = 32, decoder_layers: int = 1,
        mask_ratio: float = 0.75, seed: int = 0) -> nn.Module:
    """An untrained `ViTMAEForPreTraining` for 1×8×8 images (2×2 patches), seeded."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=CHANNELS, hidden_size=hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                          decoder_hidden_size=decoder_hidden, decoder_num_hidden_layers=decoder_layers,
                          decoder_num_attention_heads=2, decoder_intermediate_size=2 * decoder_hidden,
                          mask_ratio=mask_ratio, norm_pix_loss=False, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = ViTMAEForPreTraining(config)
    # Built from a config, this transformers release leaves the fixed 2-D sin-cos position embeddings (and the
    # CLS / mask tokens) at zero: its init skips them once the patch projection is initialised. Set them.
    embeddings = model.vit.embeddings
    projection = embeddings.patch_embeddings.projection
    if getattr(projection, "_is_hf_initialized", False):
        del projection._is_hf_initialized
    embeddings.initialize_weights()
    model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    torch.random.set_rng_state(state)
    return model


def digit_images(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, 8, 8] scaled to [0, 1], labels [N]) of a builtin digits split."""
    from potstill.data import builtin_records

    records = builtin_records("digits", split)
    x = torch.tensor([r["features"] for r in records], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor([r["label"] for r in records])


def mae_teacher(hidden: int = 64, layers: int = 4, steps: int = 600, lr: float = 2e-3, seed: int = 0) -> nn.Module:
    """An MAE pre-trained on the digits train split for `steps` Adam steps of 64 images (~30 s on one core)."""
    model = mae(hidden=hidden, layers=layers, seed=seed).train()
    images, _ = digit_images("train")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    patches = (IMAGE_SIZE // PATCH) ** 2
    for _ in range(steps):
        idx = torch.randint(0, len(images), (64,), generator=generator)
        noise = torch.rand(64, patches, generator=generator)
        loss = model(pixel_values=images[idx], noise=noise).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def mae_student(hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 1) -> nn.Module:
    """A smaller, untrained MAE with the teacher's patching (2 layers × 32 by default)."""
    return mae(hidden=hidden, layers=layers, heads=heads, seed=seed)
