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


def test_only_right_padding():
    assert models.only_right_padding(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not models.only_right_padding(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding
    assert not models.only_right_padding(torch.tensor([[1, 0, 1]]))  # a hole


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_right_padded_batches_score_the_same_without_a_mask(arch, tokenizer):
    """token_logprobs leaves out a mask that only pads on the right (causal attention cannot see later
    padding): the log-probs of valid tokens equal those of a forward given the mask."""
    from reinforce_lm import toy

    model = toy.make_model(arch, tokenizer).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:], mask[2, 4:] = 0, 0  # responses of different lengths
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    got = models.token_logprobs(model, ids, mask, 5)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -6:-1]
    want = logits.log_softmax(-1).gather(-1, ids[:, -5:, None]).squeeze(-1)
    valid = mask[:, -5:].bool()
    assert torch.allclose(got[valid], want[valid], atol=1e-5)
    assert models.forward_kwargs(model, mask).get("attention_mask") is None
    left = mask.flip(1)
    assert models.forward_kwargs(model, left)["attention_mask"] is left


def test_no_padding_warning_when_the_mask_is_left_out_on_purpose(tokenizer):
    """GPT-2 warns about padding ids without a mask; token_logprobs leaves the mask out deliberately for
    right padding, so that warning (and only that one) is filtered."""
    import logging

    from reinforce_lm import toy

    logger = logging.getLogger("transformers.modeling_utils")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    saved = list(logger.filters)
    for f in saved:
        logger.removeFilter(f)
    models._quiet_padding_warning.cache_clear()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # the CLI sets transformers' verbosity to errors
    try:
        model = toy.make_model("gpt2", tokenizer).eval()
        ids = torch.randint(3, 20, (2, 6))
        mask = torch.ones_like(ids)
        mask[1, 4:], ids[1, 4:] = 0, tokenizer.pad_token_id
        logging.Logger.warning_once.cache_clear()
        model(input_ids=ids)  # the control: without a mask transformers warns
        assert any("attention_mask" in m for m in seen)
        seen.clear()
        logging.Logger.warning_once.cache_clear()
        models.token_logprobs(model, ids, mask, 3)
        assert not any("attention_mask" in m for m in seen)
        logger.warning("another message")  # other warnings still pass
        assert seen == ["another message"]
    finally:
        logger.setLevel(level)
        logger.removeHandler(handler)
        for f in list(logger.filters):
            logger.removeFilter(f)
        for f in saved:
            logger.addFilter(f)
        models._quiet_padding_warning.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_keep_no_float32_copy_for_backward(dtype):
    """bf16/fp16 logits: the float32 upcast is recomputed in backward, not saved; values and gradients
    are those of the direct float32 computation."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 23, generator=g).to(dtype).requires_grad_(True)
    tokens = torch.randint(0, 23, (4, 5), generator=g)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = models.selective_log_softmax(logits, tokens)
    assert not any(d == torch.float32 and n >= logits.numel() for d, n in saved)
    want = logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-6)
    w = torch.randn(4, 5, generator=g)
    (grad_got,) = torch.autograd.grad((got * w).sum(), logits)
    (grad_want,) = torch.autograd.grad((want * w).sum(), logits)
    assert torch.allclose(grad_got.float(), grad_want.float(), atol=1e-2)
