"""Log-probs of chosen tokens and entropies, chunked over rows: the same values and gradients as the
direct float32 computation, whether the batch goes in one chunk or several."""

from __future__ import annotations

import shutil

import pytest
import torch

from reinforce_lm import logprobs, models
from reinforce_lm.errors import ConfigError


@pytest.mark.parametrize("elements", [1 << 24, 50])  # one chunk; chunks of 1 row (3 x 17 = 51 > 50)
def test_selective_log_softmax_and_entropy_in_chunks(monkeypatch, elements):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", elements)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 17, generator=g, requires_grad=True)
    tokens = torch.randint(0, 17, (5, 3), generator=g)
    got = logprobs.selective_log_softmax(logits, tokens)
    want = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-6)
    (grad_got,) = torch.autograd.grad(got.sum(), logits)
    (grad_want,) = torch.autograd.grad(want.sum(), logits)
    assert torch.allclose(grad_got, grad_want, atol=1e-6)
    p = logits.softmax(-1)
    again, ent = logprobs.selective_log_softmax(logits, tokens, entropy=True)
    assert torch.equal(again, got) and not ent.requires_grad
    assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-5)


def _spy_into_grad(monkeypatch):
    """Record what `_into_grad` answers (whether a weight gradient went straight into .grad)."""
    from reinforce_lm import chosen_logp

    answers, real = [], chosen_logp._into_grad
    monkeypatch.setattr(chosen_logp, "_into_grad", lambda p: answers.append(real(p)) or answers[-1])
    return answers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_one_piece_linear_head_consumes_its_logits_and_accumulates_in_place(
    monkeypatch, dtype, temperature
):
    """A plain linear head below the chunking threshold runs in one autograd node (`_LinearLogp`): the
    model's log-probs, entropy and gradients (hidden, weight, bias), over several micro-batches. From the
    second backward on the weight gradient is added into weight.grad itself (no [V, H] temporary), and
    the logits became their own gradient: a second backward through a graph fails instead of reading
    them. `torch.autograd.grad` and a hooked weight still get the gradient returned, .grad untouched."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 40)  # softmax chunks of 3 rows, head in one piece
    monkeypatch.setattr(logprobs, "HEAD_CHUNKS_MIN", 1 << 20)
    answers = _spy_into_grad(monkeypatch)
    torch.manual_seed(1)
    V, H = 13, 6
    head = torch.nn.Linear(H, V).to(dtype)
    copy = torch.nn.Linear(H, V).to(dtype)
    copy.load_state_dict(head.state_dict())
    hs = [torch.randn(5, 3, H, dtype=dtype) for _ in range(3)]
    toks = [torch.randint(0, V, (5, 3)) for _ in range(3)]
    g = torch.arange(15.0).view(5, 3)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    got_h, want_h = [], []
    for h, tk in zip(hs, toks, strict=True):  # three micro-batches of one step
        h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
        lp, ent = logprobs.head_logprobs(head, h1, tk, temperature, entropy=True)
        (lp * g).sum().backward()
        logits = copy(h2).float() / temperature
        want = logits.log_softmax(-1).gather(-1, tk[..., None]).squeeze(-1)
        (want * g).sum().backward()
        torch.testing.assert_close(lp, want, **tol)
        p = logits.softmax(-1)
        torch.testing.assert_close(ent, -(p * p.log()).sum(-1).detach(), **tol)
        got_h.append(h1.grad), want_h.append(h2.grad)
    assert answers == [False, True, True]  # .grad is None before the first backward
    for a, b in [
        *zip(got_h, want_h, strict=True),
        (head.weight.grad, copy.weight.grad),
        (head.bias.grad, copy.bias.grad),
    ]:
        assert a.dtype == b.dtype == dtype  # bf16: a few of its ulps at the largest value
        torch.testing.assert_close(a, b, atol=tol["atol"] * max(1.0, b.abs().max().item()), rtol=0)

    lp = logprobs.head_logprobs(head, hs[0], toks[0], temperature)
    before = head.weight.grad.clone()
    (gw,) = torch.autograd.grad(lp.sum(), head.weight, retain_graph=True)
    assert torch.equal(head.weight.grad, before) and answers[-1] is False and gw.abs().sum() > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()  # the logits were overwritten by their gradient in the first one

    seen = []
    head.weight.register_hook(lambda grad: seen.append(grad.clone()))
    lp = logprobs.head_logprobs(head, hs[0], toks[0], temperature)
    lp.sum().backward()
    assert answers[-1] is False and torch.equal(seen[0], gw)
    torch.testing.assert_close(head.weight.grad, before + gw, **tol)


def test_without_torchs_private_engine_query_the_gradient_is_returned(monkeypatch):
    """`_into_grad` leans on a private torch function; a torch without it gets the plain behaviour
    (the weight gradient returned to autograd), with the same gradients."""
    monkeypatch.setattr(logprobs, "HEAD_CHUNKS_MIN", 1 << 20)
    monkeypatch.delattr(torch._C, "_will_engine_execute_node")
    answers = _spy_into_grad(monkeypatch)
    torch.manual_seed(3)
    head, copy = torch.nn.Linear(6, 13), torch.nn.Linear(6, 13)
    copy.load_state_dict(head.state_dict())
    for _ in range(2):
        h, tk = torch.randn(4, 3, 6), torch.randint(0, 13, (4, 3))
        logprobs.head_logprobs(head, h, tk).sum().backward()
        copy(h).log_softmax(-1).gather(-1, tk[..., None]).sum().backward()
    assert answers == [False, False]
    torch.testing.assert_close(head.weight.grad, copy.weight.grad, atol=1e-5, rtol=1e-5)


def test_a_one_piece_linear_head_under_bf16_autocast(monkeypatch):
    """float32 weights under bf16 autocast: the head's matmul in bf16 as autocast runs it, log-probs in
    float32, float32 gradients returned (not added in place: the product is bf16), over two backwards."""
    monkeypatch.setattr(logprobs, "HEAD_CHUNKS_MIN", 1 << 20)
    answers = _spy_into_grad(monkeypatch)
    torch.manual_seed(2)
    head, copy = torch.nn.Linear(6, 13), torch.nn.Linear(6, 13)
    copy.load_state_dict(head.state_dict())
    for _ in range(2):
        h = torch.randn(4, 3, 6)
        tk = torch.randint(0, 13, (4, 3))
        h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = logprobs.head_logprobs(head, h1, tk, 0.8)
            want = (copy(h2).float() / 0.8).log_softmax(-1).gather(-1, tk[..., None]).squeeze(-1)
        lp.sum().backward(), want.sum().backward()
        torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
        assert h1.grad.dtype == torch.float32
        torch.testing.assert_close(h1.grad, h2.grad, atol=1e-2, rtol=1e-2)
    assert answers == [] and head.weight.grad.dtype == torch.float32
    for a, b in ((head.weight.grad, copy.weight.grad), (head.bias.grad, copy.bias.grad)):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_selective_log_softmax_of_bf16_logits_is_float32():
    logits = torch.randn(4, 2, 11).bfloat16()
    tokens = torch.randint(0, 11, (4, 2))
    got = logprobs.selective_log_softmax(logits, tokens)
    assert got.dtype == torch.float32
    want = logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("elements", [1 << 24, 40])  # one chunk; chunks of 1 row
def test_selective_log_softmax_divides_by_the_temperature_in_float32(monkeypatch, dtype, elements):
    """Log-probs, gradient and entropy at temperature 0.7 are those of float32 logits / 0.7, also for
    bf16 logits: dividing in bf16 first would round each scaled logit again (errors of ~0.02 in the
    log-probs, against none in the sampler, which divides in float32)."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", elements)
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(5, 3, 13, generator=g)).to(dtype).requires_grad_()
    tokens = torch.randint(0, 13, (5, 3), generator=g)
    got = logprobs.selective_log_softmax(logits, tokens, 0.7)
    exact = logits.float() / 0.7
    want = exact.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-6)
    (grad_got,) = torch.autograd.grad(got.sum(), logits)
    (grad_want,) = torch.autograd.grad(want.sum(), logits)
    assert grad_got.dtype == dtype
    assert torch.allclose(grad_got.float(), grad_want.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
    p = exact.softmax(-1)
    _, ent = logprobs.selective_log_softmax(logits.detach(), tokens, 0.7, entropy=True)
    assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-5)
    if dtype == torch.bfloat16:  # what dividing in bf16 gave: far from the sampler's log-probs
        rounded = (logits.detach() / 0.7).float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
        assert (rounded - want).abs().max() > 1e-3


def test_token_logprobs_of_a_bf16_model_at_a_temperature(tokenizer):
    """The one-piece head path of a bf16 model: log-probs of its logits upcast, then divided."""
    from reinforce_lm import toy

    model = toy.make_model("llama", tokenizer).to(torch.bfloat16).eval()
    ids = torch.randint(3, len(tokenizer), (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    got = logprobs.token_logprobs(model, ids, mask, 5, temperature=0.6)
    logits = model(input_ids=ids).logits[:, -6:-1].float() / 0.6
    want = logits.log_softmax(-1).gather(-1, ids[:, -5:, None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-5)


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
    got = logprobs.token_logprobs(model, ids, mask, 5)
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
        logprobs.token_logprobs(model, ids, mask, 3)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_keep_no_float32_copy_of_the_logits_for_backward(dtype):
    """The only [B, T, V] tensor saved for backward is the logits tensor itself (no float32 upcast, no
    softmax); values and gradients are those of the direct float32 computation."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 23, generator=g).to(dtype).requires_grad_(True)
    tokens = torch.randint(0, 23, (4, 5), generator=g)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = logprobs.selective_log_softmax(logits, tokens)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr()
    want = logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-6)
    w = torch.randn(4, 5, generator=g)
    (grad_got,) = torch.autograd.grad((got * w).sum(), logits)
    (grad_want,) = torch.autograd.grad((want * w).sum(), logits)
    assert grad_got.dtype == dtype
    assert torch.allclose(grad_got.float(), grad_want.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)


def _model_logprobs(model, ids, mask, n):
    """The reference computation: the model's own full logits, log-softmax in float32."""
    logits = model(input_ids=ids, **models.forward_kwargs(model, mask)).logits[:, -(n + 1) : -1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, -n:, None]).squeeze(-1), logits


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooked"])
def test_chunked_head_gives_the_models_logprobs_gradients_and_entropy(
    monkeypatch, arch, temperature, fused, tokenizer
):
    """With logits of HEAD_CHUNKS_MIN chunks or more, token_logprobs runs the LM head itself in chunks of
    tokens (no [B, T, V] tensor, each chunk recomputed in backward): the same log-probs, entropy and
    parameter gradients as the model's own logits. A plain linear head goes through one autograd node
    (`_HeadLogp`); a head with a forward hook keeps its module forward, in checkpointed chunks."""
    from reinforce_lm import toy

    model = models.disable_dropout(toy.make_model(arch, tokenizer)).train()  # GPT-2 has dropout
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    n = 6
    weights = torch.randn(3, n, generator=g)

    want, logits = _model_logprobs(model, ids, mask, n)
    want = (
        want * 1.0
        if temperature == 1.0
        else (logits / temperature).log_softmax(-1).gather(-1, ids[:, -n:, None]).squeeze(-1)
    )
    p = (logits / temperature).softmax(-1)
    want_entropy = -(p * p.log()).sum(-1)
    want_grads = torch.autograd.grad((want * weights).sum(), list(model.parameters()), allow_unused=True)

    head_inputs = []
    head = model.get_output_embeddings()
    assert logprobs._plain_head(model, ids[:1], mask[:1]) is head  # checked once per model, up front here
    if fused:  # count the chunks inside _HeadLogp (a hook on the head would turn it off)
        real = logprobs._HeadLogp._logits
        monkeypatch.setattr(
            logprobs._HeadLogp, "_logits", lambda h, *a: head_inputs.append(h.shape[0]) or real(h, *a)
        )
        handle = None
    else:
        handle = head.register_forward_hook(lambda m, a, o: head_inputs.append(a[0].shape[:-1].numel()))
    assert logprobs._linear_head(head) == fused
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 4 * V)  # 4 tokens' logits per chunk: 18 tokens -> 5
    got, entropy = logprobs.token_logprobs(model, ids, mask, n, temperature, entropy=True)
    got_grads = torch.autograd.grad((got * weights).sum(), list(model.parameters()), allow_unused=True)
    with torch.inference_mode():
        torch.testing.assert_close(logprobs.token_logprobs(model, ids, mask, n, temperature), got.detach())
    if handle is not None:
        handle.remove()

    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)
    assert not entropy.requires_grad
    for a, b in zip(got_grads, want_grads, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # The head never saw more than 4 tokens at once: the 5 chunks forward, the 5 recomputed in backward,
    # the 5 of the inference-mode pass; hooked, also the model's own 3 x 1 call (left one position) twice.
    assert max(head_inputs) <= 4 and len(head_inputs) == (15 if fused else 17)


@pytest.mark.parametrize("per_chunk,chunks", [(2, [2, 2, 2, 2, 2]), (3, [10])])
def test_chunked_head_without_gradient_and_the_one_piece_threshold(monkeypatch, tokenizer, per_chunk, chunks):
    """No gradient: chunks, no recomputation. Logits of fewer than HEAD_CHUNKS_MIN chunks (10 tokens at
    3 per chunk: 3.3 chunks) go through the head in one piece."""
    from reinforce_lm import toy

    model = toy.make_model("llama", tokenizer).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    mask = torch.ones_like(ids)
    want, _ = _model_logprobs(model, ids, mask, 5)
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", per_chunk * model.config.vocab_size)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda m, a, o: seen.append(a[0].shape[:-1].numel())
    )
    with torch.inference_mode():
        got = logprobs.token_logprobs(model, ids, mask, 5)
    handle.remove()
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    # + the once-per-model check (one position of one row) and the model's own call (one per row)
    assert seen == [1, *chunks, 2]


def test_models_that_reshape_their_logits_keep_their_own_logits(monkeypatch, tokenizer):
    """Gemma 2 soft-caps its logits after the head: the check finds that the logits are not the head's
    output, and token_logprobs uses the model's logits (with the cap), not the head's."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 2 * config.vocab_size)
    assert logprobs._plain_head(model, ids[:1], mask[:1]) is None
    want, _ = _model_logprobs(model, ids, mask, 4)
    got = logprobs.token_logprobs(model, ids, mask, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_model_without_a_usable_head_is_scored_from_its_logits(monkeypatch, tokenizer):
    """get_output_embeddings raising (as some remote-code models do) or a head the forward never calls:
    no chunked head, the model's own logits, the same log-probs."""
    from reinforce_lm import toy

    class NoHead(type(toy.make_model("llama", tokenizer))):
        def get_output_embeddings(self):
            raise NotImplementedError

    class UnusedHead(type(toy.make_model("llama", tokenizer))):
        def get_output_embeddings(self):
            return torch.nn.Linear(4, 4)  # not the module the forward calls

    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 8)
    for cls in (NoHead, UnusedHead):
        model = cls(toy.make_model("llama", tokenizer).config).eval()
        ids = torch.randint(3, model.config.vocab_size, (2, 6))
        mask = torch.ones_like(ids)
        assert logprobs._plain_head(model, ids[:1], mask[:1]) is None
        want, _ = _model_logprobs(model, ids, mask, 3)
        torch.testing.assert_close(logprobs.token_logprobs(model, ids, mask, 3), want, atol=1e-5, rtol=1e-5)


def test_logprobs_of_a_sliced_logits_view_backpropagate_into_the_full_tensor():
    """The model-logits path slices out.logits[:, -(T+1):-1] (a non-contiguous view): the gradient
    reaches the full tensor as that of the direct computation, zero at the positions left out."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 4), generator=g)
    w = torch.randn(3, 4, generator=g)
    got = logprobs.selective_log_softmax(full[:, 2:-1], tokens)
    (grad_got,) = torch.autograd.grad((got * w).sum(), full)
    want = full[:, 2:-1].log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    (grad_want,) = torch.autograd.grad((want * w).sum(), full)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_got, grad_want)
    assert grad_got[:, :2].abs().max() == 0 and grad_got[:, -1].abs().max() == 0


# ---------------------------------------------------------------------------------------------
# Model paths: a local typo fails at once, and a directory without a model says what is missing.
# ---------------------------------------------------------------------------------------------
def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    with pytest.raises(
        ConfigError, match=r"runs/sftt does not exist \(runs/ exists; did you mean runs/sft\?\)"
    ):
        models.resolve_model_path("runs/sftt")  # "org/name"-shaped, but runs/ is a local directory
    for path in ("./sftt", "../nowhere/x", "/nowhere/x", "~/nowhere/x", "a/b/c", "org/"):
        with pytest.raises(ConfigError, match="does not exist"):
            models.resolve_model_path(path)
    # hub ids pass through untouched (only transformers can tell whether they exist)
    assert models.resolve_model_path("org/name") == "org/name"
    assert models.resolve_model_path("gpt2") == "gpt2"


@pytest.mark.parametrize("kind", ["empty", "tokenizer only", "run without a checkpoint", "a file"])
@pytest.mark.parametrize("load", [models.load_tokenizer, models.load_causal_lm])
def test_a_local_directory_without_a_model_is_named(tmp_path, llama_dir, kind, load):
    path = tmp_path / "m"
    path.mkdir()
    if kind == "tokenizer only":
        shutil.copy(llama_dir / "tokenizer.json", path)
        shutil.copy(llama_dir / "tokenizer_config.json", path)
    elif kind == "run without a checkpoint":  # a run that crashed before its first checkpoint
        (path / "run_config.json").write_text("{}")
        (path / "metrics.jsonl").write_text("")
    elif kind == "a file":
        path = llama_dir / "config.json"
    with pytest.raises(ConfigError, match="is a file" if kind == "a file" else "no config.json") as e:
        load(str(path))
    assert str(path) in str(e.value)


def test_a_model_without_a_tokenizer_is_named(tmp_path, llama_dir):
    path = tmp_path / "m"
    path.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(llama_dir / name, path)
    models.load_causal_lm(str(path))
    with pytest.raises(ConfigError, match="holds a model but no tokenizer"):
        models.load_tokenizer(str(path))


def test_truncated_weights_are_a_config_error_naming_the_directory(tmp_path, llama_dir):
    path = tmp_path / "m"
    shutil.copytree(llama_dir, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy or a download cut short
    with pytest.raises(ConfigError, match="cannot load a causal LM") as e:
        models.load_causal_lm(str(path))
    assert str(path) in str(e.value)


def test_a_run_directory_stands_for_its_newest_complete_checkpoint(tmp_path, llama_dir):
    """`--model OUT` follows `latest` only to a complete checkpoint, as resume does."""
    from reinforce_lm.checkpoint import STATE_FILE

    run = tmp_path / "run"
    shutil.copytree(llama_dir, run / "checkpoint-2")
    (run / "checkpoint-2" / STATE_FILE).write_bytes(b"")
    (run / "checkpoint-400").mkdir()  # a partial copy: no trainer state
    shutil.copy(llama_dir / "config.json", run / "checkpoint-400")
    for latest in ("checkpoint-400", "checkpoint-999"):
        (run / "latest").write_text(latest)
        assert models.resolve_model_path(str(run)) == str(run / "checkpoint-2")
    models.load_tokenizer(str(run))
    shutil.rmtree(run / "checkpoint-2")
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        models.resolve_model_path(str(run))


def test_positions_of_a_config():
    from transformers import GPT2Config, LlamaConfig, RobertaConfig

    assert models.positions(LlamaConfig(max_position_embeddings=4096)) == 4096
    assert models.positions(GPT2Config(n_positions=1024)) == 1024
    assert models.positions(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # offset ids


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_head_with_bias_autocast_and_a_frozen_weight_equals_the_checkpointed_chunks(
    monkeypatch, autocast
):
    """`_HeadLogp` (a plain nn.Linear head) against the module-forward path (the same head with a hook):
    a bias, bf16 autocast (matmuls in bf16, log-softmax in float32, float32 weight gradients) and a
    frozen weight (gradients for the hidden states and the bias only)."""
    torch.manual_seed(0)
    V, H = 40, 8
    head = torch.nn.Linear(H, V, bias=True)
    hidden = torch.randn(3, 5, H, requires_grad=True)
    tokens = torch.randint(0, V, (3, 5))
    g = torch.randn(3, 5)
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 2 * V)  # 2 tokens per chunk
    for frozen in (False, True):
        head.weight.requires_grad_(not frozen)
        params = [hidden, head.bias] if frozen else [hidden, head.weight, head.bias]
        out = {}
        for fused in (True, False):
            handle = None if fused else head.register_forward_hook(lambda m, a, o: None)
            assert logprobs._linear_head(head) == fused
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                lp = logprobs.head_logprobs(head, hidden, tokens, 0.9)
            assert lp.dtype == torch.float32
            out[fused] = (lp, *torch.autograd.grad((lp * g).sum(), params))
            if handle is not None:
                handle.remove()
        for a, b in zip(out[True], out[False], strict=True):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=1e-2 if autocast else 1e-5, rtol=1e-2 if autocast else 1e-5)


def test_chunk_weight_gradients_are_summed_in_float32():
    """bf16 chunk products go into the float32 sum unrounded: ~1e-6 relative error, not bf16's ~4e-3."""
    torch.manual_seed(0)
    a, b = torch.randn(64, 40, dtype=torch.bfloat16), torch.randn(40, 16, dtype=torch.bfloat16)
    acc = torch.zeros(64, 16)
    for i in range(0, 40, 8):  # five chunks of the inner dimension, as five chunks of tokens
        logprobs._add_matmul(acc, a[:, i : i + 8], b[i : i + 8])
    exact = a.double() @ b.double()
    assert ((acc.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5
    rounded = sum((a[:, i : i + 8] @ b[i : i + 8]).float() for i in range(0, 40, 8))
    assert ((rounded.double() - exact).abs().max() / exact.abs().max()).item() > 1e-4  # what it avoids


def test_only_a_plain_unhooked_linear_head_takes_the_fused_path():
    """Anything that the module's forward would run besides the matmul keeps the module path: a patched
    forward, any hook on the head (token_logprobs' own pre-hook excepted), a hook on every module."""
    head = torch.nn.Linear(4, 6)
    assert logprobs._linear_head(head)
    own = head.register_forward_pre_hook(lambda m, a: None)
    assert logprobs._linear_head(head, own_hook=own.id) and not logprobs._linear_head(head)
    own.remove()
    for add in (
        lambda: head.register_full_backward_hook(lambda m, gi, go: None),
        lambda: head.register_forward_hook(lambda m, a, o: None),
        lambda: torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: None),
    ):
        handle = add()
        assert not logprobs._linear_head(head)
        handle.remove()
        assert logprobs._linear_head(head)
    head.forward = lambda x: 2 * torch.nn.functional.linear(x, head.weight, head.bias)
    assert not logprobs._linear_head(head)


def test_a_float64_head_under_autocast_stays_float64():
    """Autocast leaves float64 alone, and so does the fused head: float64 matmuls, float64 gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 40, dtype=torch.float64)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 40, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logprobs.head_logprobs(head, hidden, tokens)  # one piece: the head module itself
    want = torch.log_softmax(head(hidden), -1).gather(-1, tokens[..., None]).squeeze(-1)
    old = logprobs.CHUNK_ELEMENTS
    try:
        logprobs.CHUNK_ELEMENTS = 2 * 40  # 2 tokens a chunk: the fused path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = logprobs.head_logprobs(head, hidden, tokens)
    finally:
        logprobs.CHUNK_ELEMENTS = old
    assert (got - want).abs().max() < 1e-6
    assert (fused - want).abs().max() < 1e-6  # bf16 matmuls would be ~1e-3 off
    (g,) = torch.autograd.grad(fused.sum(), hidden)
    assert g.dtype == torch.float64


def _arch_config(name: str, V: int):
    """Tiny configs of architectures beyond the toy ones, with the head shapes that differ between them."""
    import transformers as T

    small = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return {
        "phi": lambda: T.PhiConfig(**small),  # an LM head with a bias
        "opt_proj": lambda: T.OPTConfig(  # the head sees project_out's 16-wide output, not the hidden 32
            vocab_size=V, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64,
        ),
        "gpt_neox": lambda: T.GPTNeoXConfig(**small),  # the head is `embed_out`
        "bloom": lambda: T.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4),  # tied, ALiBi
        "mixtral": lambda: T.MixtralConfig(**small, num_key_value_heads=2, num_local_experts=4),
        "gemma": lambda: T.GemmaConfig(**small, num_key_value_heads=1, head_dim=8),  # scaled embeddings
        "gemma2_softcap": lambda: T.Gemma2Config(  # soft-capped logits: the model's own path
            **small, num_key_value_heads=1, head_dim=8, final_logit_softcapping=5.0
        ),
        "falcon": lambda: T.FalconConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            new_decoder_architecture=True, num_kv_heads=2,
        ),
        "gptj": lambda: T.GPTJConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
        "phi3": lambda: T.Phi3Config(**small),
        "gpt_bigcode": lambda: T.GPTBigCodeConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4),
        "granite": lambda: T.GraniteConfig(**small, logits_scaling=2.0),  # scaled logits: own path
        "qwen3_moe": lambda: T.Qwen3MoeConfig(
            **small, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8
        ),
        "falcon_h1": lambda: T.FalconH1Config(  # attention and Mamba-2 in every layer: conv states
            **small, num_key_value_heads=2, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
            mamba_d_state=4, mamba_n_groups=1,
        ),
        "qwen3_next": lambda: T.Qwen3NextConfig(  # linear-attention and full-attention layers
            **small, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16, shared_expert_intermediate_size=16, linear_num_value_heads=4,
            linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"],
        ),
        "jamba": lambda: T.JambaConfig(  # attention and Mamba layers in one cache
            **small, num_key_value_heads=2, num_experts=2, attn_layer_period=2, attn_layer_offset=1,
            expert_layer_period=2, mamba_d_state=4, use_mamba_kernels=False,
        ),
        "phimoe": lambda: T.PhimoeConfig(  # its router draws experts in train mode (sparsemixer)
            **small, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            router_jitter_noise=0.5,  # 0.01 in real checkpoints: a wider mask, so draws differ at once
        ),
        "gemma3n": lambda: T.Gemma3nTextConfig(  # its pad token's embedding row is zero (padding_idx)
            **small, num_key_value_heads=2, head_dim=8, sliding_window=4, num_kv_shared_layers=0,
            layer_types=["sliding_attention", "full_attention"], laurel_rank=4, altup_num_inputs=2,
            activation_sparsity_pattern=[0.0, 0.0], hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=V,
        ),
    }[name]()  # fmt: skip


@pytest.mark.parametrize(
    "arch", ["phi", "opt_proj", "gpt_neox", "bloom", "mixtral", "gemma", "gemma2_softcap"]
)
@pytest.mark.parametrize("chunked", [True, False], ids=["chunks", "one-piece"])
def test_the_head_paths_on_other_architectures(monkeypatch, arch, chunked):
    """token_logprobs with the head in chunks or in one piece, on heads with a bias, a projection before
    them, another name, tied weights, MoE layers, or soft-capped logits: the log-probs of the model's own
    logits, and over two micro-batches' `.backward()` (the second adds the head's weight gradient into
    .grad in place, next to a tied embedding's) the summed gradients of the model's own logits."""
    from transformers import AutoModelForCausalLM

    V = 61
    torch.manual_seed(0)
    model = models.disable_dropout(AutoModelForCausalLM.from_config(_arch_config(arch, V))).train()
    params = list(model.parameters())
    batches = []
    for _ in range(2):
        ids = torch.randint(1, V, (3, 9))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        batches.append((ids, mask, torch.randn(3, 5)))
    n, want_grads = 5, [0.0] * len(params)
    for ids, mask, weights in batches:
        want, _ = _model_logprobs(model, ids, mask, n)
        grads = torch.autograd.grad((want * weights).sum(), params, allow_unused=True)
        want_grads = [a + b if b is not None else a for a, b in zip(want_grads, grads, strict=True)]
    if chunked:
        monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 2 * V)  # 2 tokens a chunk
    answers = _spy_into_grad(monkeypatch)
    plain = logprobs._plain_head(model, ids[:1], mask[:1])
    assert (plain is None) == (arch == "gemma2_softcap")
    for ids, mask, weights in batches:
        got = logprobs.token_logprobs(model, ids, mask, n)
        torch.testing.assert_close(got, _model_logprobs(model, ids, mask, n)[0], atol=1e-5, rtol=1e-5)
        (got * weights).sum().backward()
    assert answers == ([] if plain is None else [False, True])
    for p, b in zip(params, want_grads, strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, b, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_on_a_model_without_support_is_a_config_error():
    import transformers as T

    config = T.JetMoeConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
        intermediate_size=64, num_local_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    model = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ConfigError, match="--gradient-checkpointing: JetMoeForCausalLM does not support it"):
        models.enable_activation_checkpointing(model)


def test_disable_dropout_reaches_float_probabilities_in_modules():
    """OPT keeps its dropout (0.1 by default) as float attributes of its layers and calls F.dropout with
    them: after disable_dropout, a train-mode forward is the eval-mode forward (the sampler's policy)."""
    import transformers as T

    torch.manual_seed(0)
    config = T.OPTConfig(
        vocab_size=61, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
    )  # fmt: skip
    model = T.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(1, 61, (2, 7))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
        models.disable_dropout(model).train()
        assert torch.equal(model(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize(
    "arch",
    ["phi", "opt_proj", "gpt_neox", "bloom", "mixtral", "gemma", "gemma2_softcap"]
    + ["falcon", "gptj", "phi3", "gpt_bigcode", "granite", "qwen3_moe", "jamba", "falcon_h1", "qwen3_next"]
    + ["gemma3n", "phimoe"],
)
def test_the_sampler_and_the_update_score_the_same_tokens_alike(arch, tokenizer):
    """What the sampler records for each token (its log-prob under the policy, left-padded prompts of
    different lengths) is what the update computes from the finished sequences: otherwise on-policy
    ratios, KL-in-reward and the sampler's old log-probs are off, for that architecture only."""
    from transformers import AutoModelForCausalLM

    from reinforce_lm.rollout import Sampler, row_seeds

    config = _arch_config(arch, len(tokenizer))
    config.update(dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    torch.manual_seed(0)
    model = models.disable_dropout(AutoModelForCausalLM.from_config(config)).train()
    prompts, g = ["a?", "bcd+1=", "j?", "0123456789?"], torch.arange(4)
    r = Sampler(tokenizer, max_new_tokens=7).sample(model, prompts, g, 2, row_seeds(0, 0, g, 2))
    got = logprobs.token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    torch.testing.assert_close(got * r.response_mask, r.logp, atol=1e-5, rtol=1e-5)


def test_left_padded_prompts_give_finite_gradients_with_a_zero_pad_embedding(tokenizer):
    """Gemma 3n's pad row is zero: pad ids left of a prompt ran through its layers as exact zeros and
    made every gradient NaN (0 * inf). The sampler pads with each row's first id instead (masked out
    all the same), and the log-probs equal those of each prompt sampled alone."""
    from transformers import AutoModelForCausalLM

    from reinforce_lm.rollout import Sampler, row_seeds

    config = _arch_config("gemma3n", len(tokenizer))
    config.update(dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    torch.manual_seed(0)
    model = models.disable_dropout(AutoModelForCausalLM.from_config(config)).train()
    assert not model.get_input_embeddings().weight[tokenizer.pad_token_id].any()
    prompts, g = ["a?", "bcd+1=", "0123456789?"], torch.arange(3)
    r = Sampler(tokenizer, max_new_tokens=5).sample(model, prompts, g, 1, row_seeds(0, 0, g, 1))
    assert (r.attention_mask == 0).any()  # left padding
    got = logprobs.token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    (got * r.response_mask).sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    alone = Sampler(tokenizer, max_new_tokens=5).sample(
        model, prompts[:1], g[:1], 1, row_seeds(0, 0, g[:1], 1)
    )
    n = alone.response_ids.shape[1]
    torch.testing.assert_close(r.logp[0, :n], alone.logp[0], atol=1e-5, rtol=1e-5)


_TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def test_a_cache_that_cannot_be_repeated_is_prefilled_per_sample(tokenizer):
    """Mamba's cache has `batch_repeat_interleave` but its layers do not: the sampler prefills each of
    the K samples instead, and records the log-probs the update computes, prompts of different lengths
    too (its decode steps take no attention mask: transformers' Mamba misreads one as long as the
    sequence)."""
    import transformers as T

    from reinforce_lm.rollout import Sampler, row_seeds

    config = T.MambaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2)
    config.update(dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    torch.manual_seed(0)
    model = models.disable_dropout(T.AutoModelForCausalLM.from_config(config)).train()
    g = torch.arange(2)
    r = Sampler(tokenizer, max_new_tokens=6).sample(model, ["ab?", "c+de?"], g, 3, row_seeds(0, 0, g, 3))
    assert len(r.completions) == 6
    got = logprobs.token_logprobs(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    torch.testing.assert_close(got * r.response_mask, r.logp, atol=1e-5, rtol=1e-5)
    # nor can rows be dropped from it once they finish: they are decoded on, as padding
    from reinforce_lm.kv_cache import can_select

    ids = torch.randint(1, len(tokenizer), (2, 4))
    assert not can_select(model(input_ids=ids, use_cache=True).cache_params)
    llama = T.AutoModelForCausalLM.from_config(T.LlamaConfig(**_TINY_LLAMA, vocab_size=len(tokenizer)))
    assert can_select(llama(input_ids=ids, use_cache=True).past_key_values)


def test_a_model_whose_forward_returns_no_cache_samples_with_generate(tokenizer):
    """RecurrentGemma keeps its recurrent state inside the model and returns no cache: the native
    sampler hands it to `generate()` (with a warning), and the rollout has no sampler log-probs."""
    import warnings

    import transformers as T

    from reinforce_lm.rollout import Sampler

    config = T.RecurrentGemmaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, lru_width=32,
        intermediate_size=64, attention_window_size=16, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = models.disable_dropout(T.AutoModelForCausalLM.from_config(config))
    sampler = Sampler(tokenizer, max_new_tokens=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = sampler.sample(model, ["a?", "bcd+1="], torch.arange(2), 2)
        sampler.sample(model, ["a?"], torch.arange(1), 2)
    assert len(r.completions) == 4 and r.logp is None
    assert sum("returns no KV cache" in str(w.message) for w in caught) == 1
