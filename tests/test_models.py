"""Log-probs of chosen tokens and entropies, chunked over rows: the same values and gradients as the
direct float32 computation, whether the batch goes in one chunk or several."""

from __future__ import annotations

import pytest
import torch

from reinforce_lm import models


@pytest.mark.parametrize("elements", [1 << 24, 50])  # one chunk; chunks of 1 row (3 x 17 = 51 > 50)
def test_selective_log_softmax_and_entropy_in_chunks(monkeypatch, elements):
    monkeypatch.setattr(models, "CHUNK_ELEMENTS", elements)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 17, generator=g, requires_grad=True)
    tokens = torch.randint(0, 17, (5, 3), generator=g)
    got = models.selective_log_softmax(logits, tokens)
    want = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-6)
    (grad_got,) = torch.autograd.grad(got.sum(), logits)
    (grad_want,) = torch.autograd.grad(want.sum(), logits)
    assert torch.allclose(grad_got, grad_want, atol=1e-6)
    p = logits.softmax(-1)
    assert torch.allclose(models.entropy_from_logits(logits), -(p * p.log()).sum(-1), atol=1e-5)


def test_selective_log_softmax_of_bf16_logits_is_float32():
    logits = torch.randn(4, 2, 11).bfloat16()
    tokens = torch.randint(0, 11, (4, 2))
    got = models.selective_log_softmax(logits, tokens)
    assert got.dtype == torch.float32
    want = logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-6)
