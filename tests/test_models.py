"""ResNet18 under autocast: the convolutions in bfloat16, the embedding head and the
classifier in float32 (CPU autocast stands in for the GPU's)."""

from __future__ import annotations

import torch

from dlops.models import ResNet18


def test_head_and_classifier_stay_float32_under_autocast() -> None:
    torch.manual_seed(0)
    model = ResNet18(200, 3, 8, embedding_dim=16, embedding_bn=True).eval()
    x = torch.randn(6, 3, 16, 16)
    seen: dict[str, torch.Tensor] = {}

    def keep(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        seen["stages"] = output

    model.stages.register_forward_hook(keep)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        embedding, logits = model(x)
    assert seen["stages"].dtype == torch.bfloat16  # autocast ran the convolutions in bfloat16
    assert embedding.dtype == torch.float32 and logits.dtype == torch.float32
    with torch.no_grad():  # the same head on the same (bfloat16) features, in float32 outside autocast
        pooled = torch.nn.functional.adaptive_avg_pool2d(seen["stages"], 1).flatten(1).float()
        want = model.head(pooled)
        torch.testing.assert_close(embedding, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits, model.fc(want), rtol=1e-5, atol=1e-6)
    # a bfloat16 classifier would round the scores to 8 bits of mantissa: distinct here
    assert len(set(logits[0].tolist())) == 200
