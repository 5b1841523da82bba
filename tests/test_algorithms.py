"""The algorithm core against its definitions: hand-computed values, exact enumeration, split invariance."""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch

from reinforce_lm import algorithms as alg

F64 = torch.float64


def close(actual, expected, tol=1e-9):
    expected = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual.to(F64), expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------
# The shared small batch: 6 sequences, uneven lengths, groups of sizes 3, 2 and 1 with non-contiguous ids.
#   sample:  0  1  2  3  4  5
#   group:   7  2  7  7  2  5        group 7 = {0, 2, 3}, group 2 = {1, 4}, group 5 = {5}
#   reward:  0  1  2  4  3  5
#   length:  4  2  3  1  4  2        (16 valid tokens)
# ---------------------------------------------------------------------------------------------------------
LENGTHS = torch.tensor([4, 2, 3, 1, 4, 2])
MASK = (torch.arange(4) < LENGTHS[:, None]).to(F64)
REWARDS = torch.tensor([0.0, 1.0, 2.0, 4.0, 3.0, 5.0], dtype=F64)
GROUPS = torch.tensor([7, 2, 7, 7, 2, 5])
GREEDY = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 4.0], dtype=F64)
S2 = math.sqrt(2.0)


def advantages(estimator, **kw):
    kw.setdefault("running_mean", alg.RunningMean())
    return alg.compute_advantages(
        estimator, rewards=REWARDS, mask=MASK, group_ids=GROUPS, baseline_rewards=GREEDY, **kw
    )


def broadcast(per_seq):
    return torch.tensor(per_seq, dtype=F64)[:, None] * MASK


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("none", [0, 1, 2, 4, 3, 5]),
        # batch mean = 15 / 6 = 2.5
        ("batch_mean", [-2.5, -1.5, -0.5, 1.5, 0.5, 2.5]),
        # mean of the others: s0: 0-(2+4)/2, s2: 2-(0+4)/2, s3: 4-(0+2)/2; s1: 1-3, s4: 3-1; s5 alone: 5-0
        ("rloo", [-3, -2, 0, 3, 2, 5]),
        # group 7: mean 2, std sqrt((4+0+4)/2) = 2; group 2: mean 2, std sqrt((1+1)/1) = sqrt 2; alone: 0, 1
        ("grpo", [-1, -1 / S2, 0, 1, 1 / S2, 5]),
        ("dr_grpo", [-2, -1, 0, 2, 1, 5]),
        # r - greedy score
        ("remax", [-1, 1, 1, 3, 1, 1]),
    ],
)
def test_sequence_level_estimators_by_hand(estimator, expected):
    close(advantages(estimator, eps=0.0), broadcast(expected))


def test_grpo_adds_eps_to_std():
    adv = advantages("grpo", eps=0.5)
    close(adv[:, 0], [-2 / 2.5, -1 / (S2 + 0.5), 0, 2 / 2.5, 1 / (S2 + 0.5), 5 / 1.5])


def test_running_mean_uses_prior_baseline_then_updates():
    state = alg.RunningMean(decay=0.9)
    close(advantages("running_mean", running_mean=state), broadcast([0, 1, 2, 4, 3, 5]))  # no prior: b=0
    assert state.value == pytest.approx(2.5)  # first batch: value = its mean
    state.value = 1.0
    close(advantages("running_mean", running_mean=state), broadcast([-1, 0, 1, 3, 2, 4]))  # b = 1
    assert state.value == pytest.approx(0.9 * 1.0 + 0.1 * 2.5)  # 1.15, updated after use
    restored = alg.RunningMean(decay=0.5)
    restored.load_state_dict(state.state_dict())
    assert (restored.decay, restored.value) == (0.9, state.value)
    assert alg.RunningMean().baseline() == 0.0


def test_reinforce_pp_whitens_over_valid_tokens():
    # gamma = 1, no token rewards: G_t = r on every valid token. Tokens: 0 x4, 1 x2, 2 x3, 4 x1, 3 x4, 5 x2.
    # sum = 34, mean = 34/16 = 2.125; sum of squares = 116; ssd = 116 - 16 * 2.125^2 = 43.75; var = 43.75/15
    expected = (torch.tensor([0, 1, 2, 4, 3, 5], dtype=F64) - 2.125) / math.sqrt(43.75 / 15 + 1e-8)
    close(advantages("reinforce_pp"), broadcast(expected.tolist()))


def test_reinforce_pp_baseline_by_hand():
    # r - mean_g = [-2, -1, 0, 2, 1, 5] on tokens: -2 x4, -1 x2, 0 x3, 2 x1, 1 x4, 5 x2.
    # sum = 6, mean = 0.375; sum of squares = 76; ssd = 76 - 16 * 0.375^2 = 73.75; var = 73.75/15
    expected = (torch.tensor([-2, -1, 0, 2, 1, 5], dtype=F64) - 0.375) / math.sqrt(73.75 / 15 + 1e-8)
    close(advantages("reinforce_pp_baseline"), broadcast(expected.tolist()))


# Token rewards -0.1 on valid tokens (7.0 on padding must be ignored), gamma = 0.5, score at the last token.
TOKEN_REWARDS = -0.1 * MASK + 7.0 * (1 - MASK)
# Returns G_t by hand, e.g. row 0 (r=0): G3 = -0.1, G2 = -0.1 + 0.5*-0.1 = -0.15, G1 = -0.175, G0 = -0.1875;
# row 4 (r=3): G3 = 2.9, G2 = -0.1 + 1.45 = 1.35, G1 = -0.1 + 0.675 = 0.575, G0 = -0.1 + 0.2875 = 0.1875.
RETURNS = torch.tensor(
    [
        [-0.1875, -0.175, -0.15, -0.1],
        [0.35, 0.9, 0, 0],
        [0.325, 0.85, 1.9, 0],
        [3.9, 0, 0, 0],
        [0.1875, 0.575, 1.35, 2.9],
        [2.35, 4.9, 0, 0],
    ],
    dtype=F64,
)


def test_discounted_returns_by_hand():
    scores = alg.place_at_last_token(REWARDS, MASK)
    close(alg.discounted_returns(TOKEN_REWARDS + scores, MASK, gamma=0.5), RETURNS)


def test_token_level_credit_subtracts_baseline_from_every_return():
    # rloo baselines [3, 3, 2, 1, 1, 0] subtracted from every G_t
    rloo = advantages("rloo", token_rewards=TOKEN_REWARDS, gamma=0.5)
    close(rloo, (RETURNS - torch.tensor([3.0, 3, 2, 1, 1, 0], dtype=F64)[:, None]) * MASK)
    # grpo: the normalised score r~ = (r - mean_g) / std_g is the reward at the last token, and the token
    # rewards are not divided by std_g. Group 7 (mean 2, std 2): row 0 r~ = -1 over 4 tokens, row 3 r~ = 1.
    grpo = advantages("grpo", token_rewards=TOKEN_REWARDS, gamma=0.5, eps=0.0)
    close(grpo[0], [-0.1875 - 0.125, -0.175 - 0.25, -0.15 - 0.5, -0.1 - 1])
    close(grpo[3], [-0.1 + 1, 0, 0, 0])
    close(grpo[5], RETURNS[5] * MASK[5])  # group of one: mean 0, std 1
    dr = advantages("dr_grpo", token_rewards=TOKEN_REWARDS, gamma=0.5)
    close(dr[0], [-0.1875 - 0.25, -0.175 - 0.5, -0.15 - 1, -0.1 - 2])  # r - mean_g = -2, discounted
    none = advantages("none", token_rewards=TOKEN_REWARDS, gamma=0.5)
    close(none, RETURNS)
    pp = advantages("reinforce_pp", token_rewards=TOKEN_REWARDS, gamma=0.5)
    close(pp, alg.masked_whiten(RETURNS, MASK))


def test_a_tied_group_gives_no_score_advantage_and_unscaled_token_rewards():
    """Equal scores carry no signal: 0 for every group estimator, also for float32 scores whose group mean
    rounds (float64 statistics), and the token rewards (a KL penalty) keep their own scale instead of
    being divided by a std of 0 + eps."""
    mask = torch.ones(8, 3)
    for value in (0.7, 13.7, 100.3, -2.1e4):
        tied = torch.full((8,), value)  # float32, one group of 8 (float32 mean: 1 ulp off for some values)
        for est in ("rloo", "grpo", "dr_grpo", "reinforce_pp_baseline"):
            adv = alg.compute_advantages(est, rewards=tied, mask=mask, group_ids=torch.zeros(8))
            assert adv.abs().max() < 1e-6, (est, value, adv.abs().max())
        whitened = alg.compute_advantages("reinforce_pp", rewards=tied, mask=mask)
        assert whitened.abs().max() < 1e-4, (value, whitened.abs().max())
    kl_penalty = -0.01 * torch.rand(8, 3, generator=torch.Generator().manual_seed(0))  # [B, T]
    for gamma in (1.0, 0.9):
        adv = alg.compute_advantages(
            "grpo",
            rewards=torch.ones(8),
            mask=mask,
            group_ids=torch.zeros(8),
            token_rewards=kl_penalty,
            gamma=gamma,
        )
        torch.testing.assert_close(adv, alg.discounted_returns(kl_penalty, mask, gamma))


def test_a_sequence_penalty_is_folded_in_before_baselines_and_after_grpo_normalisation():
    """penalty[B] (-beta * a sequence's KL): for rloo and the others part of the score their baseline sees;
    for grpo/dr_grpo added to the normalised score, so a tied group keeps it at its own scale."""
    penalty = torch.tensor([-0.01, -0.03, 0.0, -0.02, -0.05, -0.04], dtype=F64)
    for est in ("none", "rloo", "batch_mean", "remax", "reinforce_pp", "reinforce_pp_baseline"):
        folded = alg.compute_advantages(
            est, rewards=REWARDS + penalty, mask=MASK, group_ids=GROUPS, baseline_rewards=GREEDY
        )
        close(advantages(est, penalty=penalty), folded)
    close(advantages("grpo", penalty=penalty), advantages("grpo") + penalty[:, None] * MASK)
    close(advantages("dr_grpo", penalty=penalty), advantages("dr_grpo") + penalty[:, None] * MASK)
    tied = alg.compute_advantages(
        "grpo", rewards=torch.ones(4), mask=torch.ones(4, 2), group_ids=torch.zeros(4), penalty=-penalty[:4]
    )
    torch.testing.assert_close(tied, (-penalty[:4, None] * torch.ones(4, 2)).float())


@pytest.mark.parametrize("estimator", alg.ESTIMATORS)
def test_every_estimator_is_zero_where_masked_and_detached(estimator):
    rewards = REWARDS.clone().requires_grad_(True)
    for token_rewards in (None, TOKEN_REWARDS):
        adv = alg.compute_advantages(
            estimator,
            rewards=rewards,
            mask=MASK,
            group_ids=GROUPS,
            baseline_rewards=GREEDY,
            token_rewards=token_rewards,
            running_mean=alg.RunningMean(),
            gamma=0.5,
        )
        assert adv.shape == MASK.shape and not adv.requires_grad
        assert torch.all(adv[MASK == 0] == 0)


def test_missing_inputs_and_unknown_names_raise():
    with pytest.raises(ValueError, match="grpo"):
        alg.compute_advantages("grpo", rewards=REWARDS, mask=MASK)
    with pytest.raises(ValueError, match="baseline_rewards"):
        alg.compute_advantages("remax", rewards=REWARDS, mask=MASK)
    with pytest.raises(ValueError, match="RunningMean"):
        alg.compute_advantages("running_mean", rewards=REWARDS, mask=MASK)
    with pytest.raises(ValueError, match="rloo"):  # the message lists the valid names
        alg.compute_advantages("ppo", rewards=REWARDS, mask=MASK)
    with pytest.raises(ValueError, match="k3"):
        alg.kl_divergence(REWARDS, REWARDS, "k4")
    with pytest.raises(ValueError, match="token-mean"):
        alg.aggregate_loss(MASK, MASK, "mean")
    with pytest.raises(ValueError, match="old_logp"):
        alg.policy_gradient_loss(MASK, MASK, MASK, "token-mean", clip_eps=0.2)


# --------------------------------------------------- masked statistics -----------------------------------


def test_masked_statistics_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [5.0, 9.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=F64)
    # valid: 1, 2, 3, 5 -> sum 11, mean 2.75; squared deviations 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75
    close(alg.masked_sum(x, mask), 11.0)
    close(alg.masked_sum(x, mask, dim=1), [6.0, 5.0])
    close(alg.masked_mean(x, mask), 2.75)
    close(alg.masked_mean(x, mask, dim=1), [2.0, 5.0])
    close(alg.masked_var(x, mask), 8.75 / 3)
    close(alg.masked_var(x, mask, unbiased=False), 8.75 / 4)
    white = alg.masked_whiten(x, mask, eps=0.0)
    close(white, (x - 2.75) / math.sqrt(8.75 / 3) * mask)
    close(
        alg.masked_whiten(x, mask, shift_mean=False, eps=0.0),
        ((x - 2.75) / math.sqrt(8.75 / 3) + 2.75) * mask,
    )
    close(alg.masked_mean(x, torch.zeros_like(mask), dim=1), [0.0, 0.0])  # empty rows: 0, not NaN


def test_place_at_last_token_ragged():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 1]], dtype=F64)
    out = alg.place_at_last_token(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64), mask)
    close(out, [[0, 1, 0], [0, 0, 2], [0, 0, 0], [0, 0, 4]])


# ------------------------------------------------- distributed invariance --------------------------------


def run_as_processes(n, fn):
    """Run fn(rank, reduce_sum) in n threads whose reduce_sum is a real all-reduce (sum) among them."""
    barrier, slots, results = threading.Barrier(n, timeout=10), [None] * n, [None] * n

    def make_reduce(rank):
        def reduce_sum(t):
            slots[rank] = t.detach().clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()  # everyone has read before the next call overwrites the slots
            return total

        return reduce_sum

    def target(rank):
        results[rank] = fn(rank, make_reduce(rank))

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


HALVES = (slice(0, 4), slice(4, 6))  # groups {7: 0,2,3; 2: 1,4} would span halves, so reorder first
ORDER = torch.tensor([0, 2, 3, 5, 1, 4])  # group 7, group 5 | group 2: groups stay on one process


@pytest.mark.parametrize("estimator", ["batch_mean", "reinforce_pp", "reinforce_pp_baseline", "rloo", "grpo"])
def test_advantages_match_across_two_processes(estimator):
    rewards, mask, groups, tok = REWARDS[ORDER], MASK[ORDER], GROUPS[ORDER], TOKEN_REWARDS[ORDER]
    full = alg.compute_advantages(estimator, rewards=rewards, mask=mask, group_ids=groups, token_rewards=tok)

    def on_rank(rank, reduce_sum):
        s = HALVES[rank]
        return alg.compute_advantages(
            estimator, rewards=rewards[s], mask=mask[s], group_ids=groups[s], token_rewards=tok[s],
            reduce_sum=reduce_sum,
        )  # fmt: skip

    close(torch.cat(run_as_processes(2, on_rank)), full)


def test_running_mean_update_is_global_across_processes():
    states = [alg.RunningMean(), alg.RunningMean()]
    run_as_processes(
        2,
        lambda rank, rs: alg.compute_advantages(
            "running_mean", rewards=REWARDS[HALVES[rank]], mask=MASK[HALVES[rank]], running_mean=states[rank],
            reduce_sum=rs,
        ),
    )  # fmt: skip
    assert states[0].value == pytest.approx(2.5) and states[1].value == pytest.approx(2.5)


def test_masked_whiten_matches_across_two_processes():
    x, mask = torch.randn(6, 5, dtype=F64), (torch.rand(6, 5) > 0.3).to(F64)
    full = alg.masked_whiten(x, mask)
    parts = run_as_processes(
        2, lambda rank, rs: alg.masked_whiten(x[HALVES[rank]], mask[HALVES[rank]], reduce_sum=rs)
    )
    close(torch.cat(parts), full)
    var = run_as_processes(
        2, lambda rank, rs: alg.masked_var(x[HALVES[rank]], mask[HALVES[rank]], reduce_sum=rs)
    )
    close(var[0], alg.masked_var(x, mask))


# ------------------------------------------------------- aggregation -------------------------------------

AGG_LOSS = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]], dtype=F64)
AGG_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=F64)  # lengths 3, 1, 0


@pytest.mark.parametrize(
    "mode, kwargs, expected",
    [
        ("token-mean", {}, 10 / 4),  # (1+2+3+4) / 4 tokens
        ("seq-mean-token-mean", {}, (2 + 4 + 0) / 3),  # token means 2, 4, (empty row) 0; 3 sequences
        ("seq-mean-token-sum", {}, (6 + 4 + 0) / 3),
        ("seq-mean-token-sum-norm", {}, 10 / (3 * 4)),  # max_len defaults to T = 4
        ("seq-mean-token-sum-norm", {"max_len": 5}, 10 / (3 * 5)),
        ("token-mean", {"normalizer": 8}, 10 / 8),
        ("seq-mean-token-sum", {"normalizer": 5}, 10 / 5),
    ],
)
def test_aggregate_loss_by_hand(mode, kwargs, expected):
    close(alg.aggregate_loss(AGG_LOSS, AGG_MASK, mode, **kwargs), expected)


@pytest.mark.parametrize("mode", alg.LOSS_AGG_MODES)
def test_aggregate_loss_split_invariance(mode):
    loss, mask = (
        torch.randn(6, 5, dtype=F64),
        (torch.arange(5) < torch.tensor([5, 1, 3, 0, 4, 2])[:, None]).to(F64),
    )
    full = alg.aggregate_loss(loss, mask, mode)
    normalizer = mask.sum() if mode == "token-mean" else 6
    for cut in (1, 2, 4):
        parts = [
            alg.aggregate_loss(loss[s], mask[s], mode, normalizer=normalizer)
            for s in (slice(0, cut), slice(cut, 6))
        ]
        close(parts[0] + parts[1], full)


# ---------------------------------------------- exact enumeration on a bandit ----------------------------

ARM_REWARDS = torch.tensor([1.0, 0.0, 3.0, -1.0], dtype=F64)


def expected_gradient(estimator, k=3, **kw):
    """Probability-weighted gradient of the REINFORCE loss over all K-tuples of arms, and -grad E[r]."""
    theta = torch.tensor([0.2, -0.5, 0.3, 0.1], dtype=F64, requires_grad=True)
    logp_all = torch.log_softmax(theta, 0)
    (true_grad,) = torch.autograd.grad((logp_all.exp() * ARM_REWARDS).sum(), theta)
    total = torch.zeros(len(ARM_REWARDS), dtype=F64)
    for arms in itertools.product(range(len(ARM_REWARDS)), repeat=k):
        arms = torch.tensor(arms)
        logp = torch.log_softmax(theta, 0)[arms][:, None]  # [K, 1]: one token per sample
        mask = torch.ones(k, 1, dtype=F64)
        state = kw.get("running_mean")
        if state is not None:
            state.value = 0.7  # a fixed prior baseline, the same for every tuple
        adv = alg.compute_advantages(
            estimator, rewards=ARM_REWARDS[arms], mask=mask, group_ids=torch.zeros(k, dtype=torch.long), **kw
        )
        loss = alg.policy_gradient_loss(logp, adv, mask, "seq-mean-token-sum")
        (grad,) = torch.autograd.grad(loss, theta)
        total += logp.detach().sum().exp() * grad  # P(tuple) = prod_i pi(a_i)
    return total, -true_grad


@pytest.mark.parametrize(
    "estimator, kw",
    [
        ("none", {}),
        ("running_mean", {"running_mean": alg.RunningMean()}),
        ("rloo", {}),
        # ReMax: the greedy completion's score depends on the prompt alone (the same for every tuple)
        ("remax", {"baseline_rewards": torch.full((3,), 1.3, dtype=F64)}),
    ],
)
def test_unbiased_estimators_match_true_gradient(estimator, kw):
    got, true = expected_gradient(estimator, **kw)
    close(got, true, tol=1e-6)


# Completions of length 1 or 2 over {EOS, a, b}: the first token from softmax(theta[:3]); EOS ends the
# completion, else a second token from softmax(theta[3:]). Rewards depend on the whole completion.
TREE_REWARDS = {(0,): 0.7, (1, 0): 1.0, (1, 1): 0.2, (1, 2): 2.0, (2, 0): -1.0, (2, 1): 0.5, (2, 2): 1.5}


def expected_gradient_variable_length(estimator, mode, k=2):
    theta = torch.tensor([0.3, -0.2, 0.5, 0.1, 0.4, -0.6], dtype=F64, requires_grad=True)
    first, second = theta[:3].log_softmax(0), theta[3:].log_softmax(0)

    def token_logp(c):  # [2], 0 past the end
        return torch.stack([first[c[0]], second[c[1]] if len(c) > 1 else torch.zeros((), dtype=F64)])

    completions = list(TREE_REWARDS)
    prob = {c: token_logp(c).sum().exp() for c in completions}
    (true,) = torch.autograd.grad(sum(prob[c] * r for c, r in TREE_REWARDS.items()), theta, retain_graph=True)
    total = torch.zeros_like(theta)
    for cs in itertools.product(completions, repeat=k):
        logp = torch.stack([token_logp(c) for c in cs])  # [K, 2]
        mask = torch.tensor([[1.0, float(len(c) > 1)] for c in cs], dtype=F64)
        rewards = torch.tensor([TREE_REWARDS[c] for c in cs], dtype=F64)
        adv = alg.compute_advantages(estimator, rewards=rewards, mask=mask, group_ids=torch.zeros(k))
        loss = alg.policy_gradient_loss(logp, adv, mask, mode, max_len=2)
        (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
        total += math.prod(prob[c].item() for c in cs) * grad
    return total, -true


@pytest.mark.parametrize("estimator", ["none", "rloo"])
def test_unbiased_with_variable_lengths_only_with_a_sample_independent_normaliser(estimator):
    """With completions of different lengths, `seq-mean-token-sum` (sequence log-probs, Ahmadian et al.
    2024) and `seq-mean-token-sum-norm` (a constant, Dr. GRPO) give E[grad] = c * grad E[r]; `token-mean`
    and `seq-mean-token-mean` divide by lengths that depend on the sample: another direction (Liu et al.
    2025)."""
    for mode, scale in (("seq-mean-token-sum", 1.0), ("seq-mean-token-sum-norm", 0.5)):
        got, true = expected_gradient_variable_length(estimator, mode)
        close(got, scale * true, tol=1e-9)
    for mode in ("token-mean", "seq-mean-token-mean"):
        got, true = expected_gradient_variable_length(estimator, mode)
        off_line = got - (got @ true) / (true @ true) * true
        assert off_line.norm() > 0.02 * got.norm()  # 6-44% of its norm here


def test_biased_estimators_differ_from_true_gradient():
    _, true = expected_gradient("none")
    grpo, _ = expected_gradient("grpo")
    assert (grpo - true).norm() > 0.25 * true.norm()  # about 0.6 here
    # the batch mean includes the sample itself: E[grad] = (K - 1)/K * true gradient, exactly
    batch_mean, _ = expected_gradient("batch_mean")
    close(batch_mean, true * 2 / 3, tol=1e-9)


# -------------------------------------------------- policy-gradient loss ---------------------------------


@pytest.mark.parametrize("ratio_form", [False, True])
def test_baseline_is_detached_gradient_is_minus_a_over_normalizer(ratio_form):
    logp = torch.randn(6, 4, dtype=F64, requires_grad=True)
    w = torch.tensor(2.0, dtype=F64, requires_grad=True)
    adv = advantages("rloo") * w  # carries a graph: must be cut inside
    old = logp.detach() if ratio_form else None
    loss = alg.policy_gradient_loss(logp, adv, MASK, "token-mean", old_logp=old)
    loss.backward()
    close(logp.grad, -adv.detach() * MASK / 16)
    assert w.grad is None


def test_clipped_surrogate_by_hand():
    # eps 0.2; per token: -A*ratio vs -A*clip(ratio): take the max
    #   A=+1 r=1.5: -1.5 vs -1.2 -> -1.2 (clipped)   A=+1 r=0.9: -0.9 (inside)
    #   A=-1 r=0.5:  0.5 vs  0.8 ->  0.8 (clipped)   A=-1 r=1.1:  1.1 (inside)
    #   A=+1 r=0.5: -0.5 vs -0.8 -> -0.5 (unclipped) A=-1 r=1.5:  1.5 vs 1.2 -> 1.5 (unclipped)
    ratio = torch.tensor([[1.5, 0.9, 0.5, 1.1, 0.5, 1.5]], dtype=F64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0]], dtype=F64)
    logp = ratio.log().requires_grad_(True)
    old, mask = torch.zeros_like(ratio), torch.ones_like(ratio)
    loss = alg.policy_gradient_loss(logp, adv, mask, "token-mean", old_logp=old, clip_eps=0.2)
    close(loss, (-1.2 - 0.9 + 0.8 + 1.1 - 0.5 + 1.5) / 6)
    loss.backward()  # d(-A ratio)/d logp = -A ratio where the unclipped term is active, else 0
    close(logp.grad, [[0.0, -0.9 / 6, 0.0, 1.1 / 6, -0.5 / 6, 1.5 / 6]])
    close(alg.clip_fraction(logp.detach(), old, mask, 0.2), 4 / 6)
    unclipped = alg.policy_gradient_loss(logp, adv, mask, "token-mean", old_logp=old)
    close(unclipped, (-1.5 - 0.9 + 0.5 + 1.1 - 0.5 + 1.5) / 6)


def test_value_loss_by_hand():
    v = torch.tensor([[1.0, 2.0, 0.0, 7.0]], dtype=F64)
    old = torch.tensor([[0.5, 1.0, 0.2, 0.0]], dtype=F64)
    ret = torch.tensor([[2.0, 0.0, 1.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64)
    # unclipped (V-R)^2 = 1, 4, 1; clipped V = 0.7, 1.2, 0.0 -> (V-R)^2 = 1.69, 1.44, 1; max: 1.69, 4, 1
    close(alg.value_loss(v, old, ret, mask, clip_eps=0.2), 0.5 * (1.69 + 4 + 1) / 3)
    close(alg.value_loss(v, old, ret, mask), 0.5 * (1 + 4 + 1) / 3)
    close(alg.value_loss(v, old, ret, mask, mode="seq-mean-token-sum"), 0.5 * (1 + 4 + 1))


# ------------------------------------------------------------ KL -----------------------------------------


def test_kl_estimators_by_hand():
    logp = torch.zeros(1, 5, dtype=F64)
    d = torch.tensor([[math.log(2), 0.0, -math.log(2), 20.0, -20.0]], dtype=F64)  # d = ref_logp - logp
    ln2 = math.log(2)
    close(alg.kl_divergence(logp, d, "k1"), [[-ln2, 0, ln2, -20, 20]])
    close(alg.kl_divergence(logp, d, "k2"), [[ln2**2 / 2, 0, ln2**2 / 2, 200, 200]])
    # exp(d) - d - 1 while it is at most 10: 2 - ln2 - 1, 0, 0.5 + ln2 - 1, exp(-20) + 19; at a log-ratio of
    # -20 (d = 20) it is past 10 and follows the tangent at the knee x0 (k3(x0) = 10, slope 1 - e^-x0)
    x0 = alg._K3_KNEE
    assert math.exp(-x0) + x0 - 1 == pytest.approx(10.0)
    tangent = 10 + (-20 - x0) * (1 - math.exp(-x0))
    k3 = [[1 - ln2, 0, ln2 - 0.5, tangent, math.exp(-20) + 19]]
    close(alg.kl_divergence(logp, d, "k3"), k3, tol=1e-9)
    # float32, far out: no overflow, no NaN; the gradient is 1 - e^-x, bounded by the knee's slope below it
    far = torch.tensor([[30.0, -30.0, 100.0, -100.0, -2.0]], requires_grad=True)  # exp(100) = inf
    out = alg.kl_divergence(far, torch.zeros(1, 5), "k3")
    out.sum().backward()
    assert torch.isfinite(out).all() and (out >= 0).all()
    slope = 1 - math.exp(-x0)  # -12.61
    close(far.grad, [[1.0, slope, 1.0, slope, 1 - math.exp(2.0)]], tol=1e-5)


def test_kl_gradients_by_exact_enumeration():
    """What each estimator's gradient is, with a softmax policy over 4 arms (Tang & Munos 2025): in the
    loss (pathwise, E_pi[grad k(a)]) k2 gives grad KL(pi || ref), k3 grad KL(ref || pi), k1 zero; in the
    reward (detached, score function E_pi[k(a) grad log pi(a)]) k1 gives grad KL(pi || ref), and k2 and
    k3 neither direction's gradient."""
    theta = torch.tensor([0.3, -1.2, 0.8, 0.1], dtype=F64, requires_grad=True)
    ref_logp = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64).log()

    def grad(f):
        (g,) = torch.autograd.grad(f(theta.log_softmax(-1)), theta)
        return g

    forward_kl = grad(lambda lp: (lp.exp() * (lp - ref_logp)).sum())  # KL(pi || ref)
    reverse_kl = grad(lambda lp: (ref_logp.exp() * (ref_logp - lp)).sum())  # KL(ref || pi)

    def in_loss(k):
        return grad(lambda lp: (lp.exp().detach() * alg.kl_divergence(lp, ref_logp, k)).sum())

    close(in_loss("k2"), forward_kl, tol=1e-12)
    close(in_loss("k3"), reverse_kl, tol=1e-12)
    close(in_loss("k1"), torch.zeros(4), tol=1e-12)
    k1_reward = grad(
        lambda lp: (lp.exp().detach() * alg.kl_divergence(lp, ref_logp, "k1").detach() * lp).sum()
    )
    close(k1_reward, forward_kl, tol=1e-12)
    assert (forward_kl - reverse_kl).abs().max() > 0.05  # the two directions differ here
    for k in ("k2", "k3"):  # in the reward, neither direction's gradient (nor a multiple of one)
        g = grad(lambda lp, k=k: (lp.exp().detach() * alg.kl_divergence(lp, ref_logp, k).detach() * lp).sum())
        for kl in (forward_kl, reverse_kl):
            assert (g - (g @ kl) / (kl @ kl) * kl).norm() > 0.05 * g.norm()


def test_k1_and_k3_are_unbiased_and_k3_nonnegative():
    pi = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    ref = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=F64)
    exact = (pi * (pi.log() - ref.log())).sum()
    for k in ("k1", "k3"):
        close((pi * alg.kl_divergence(pi.log(), ref.log(), k)).sum(), exact, tol=1e-12)
    logp, ref_logp = 3 * torch.randn(1000, dtype=F64), 3 * torch.randn(1000, dtype=F64)
    assert (alg.kl_divergence(logp, ref_logp, "k3") >= 0).all()
    logp.requires_grad_(True)
    alg.kl_divergence(logp, ref_logp, "k2").sum().backward()  # differentiable: d/dlogp = logp - ref
    close(logp.grad, (logp - ref_logp).detach())


# ------------------------------------------------------------ GAE ----------------------------------------


def test_gae_by_hand_with_ragged_mask():
    # gamma 0.9, lam 0.8 (gamma*lam = 0.72). Row 0 (len 3): r = 0, 0, 1; V = 0.5, 0.6, 0.7
    #   d2 = 1 - 0.7 = 0.3; d1 = 0.9*0.7 - 0.6 = 0.03; d0 = 0.9*0.6 - 0.5 = 0.04
    #   A2 = 0.3; A1 = 0.03 + 0.72*0.3 = 0.246; A0 = 0.04 + 0.72*0.246 = 0.21712
    # Row 1 (len 2; 9s are padding): r = 0.5, 2; V = 1, 0.5
    #   d1 = 2 - 0.5 = 1.5; d0 = 0.5 + 0.9*0.5 - 1 = -0.05; A1 = 1.5; A0 = -0.05 + 0.72*1.5 = 1.03
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=F64)
    adv, ret = alg.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0.21712, 0.246, 0.3], [1.03, 1.5, 0.0]])
    close(ret, [[0.71712, 0.846, 1.0], [2.03, 2.0, 0.0]])


def test_gae_with_lam_one_is_discounted_return_minus_value():
    rewards, values = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    mask = (torch.arange(5) < torch.tensor([5, 2, 4])[:, None]).to(F64)
    adv, ret = alg.gae(rewards, values, mask, gamma=0.7, lam=1.0)
    close(ret, alg.discounted_returns(rewards, mask, gamma=0.7))
    close(adv, (ret - values) * mask)


# ------------------------------------------------------- Bradley-Terry -----------------------------------


def test_bradley_terry_by_hand():
    chosen = torch.tensor([2.0, 0.0, -1.0], dtype=F64)
    rejected = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    # -log sigmoid(d) = log(1 + exp(-d))
    # d = 1, 0, -2: 0.3132616875182228, 0.6931471805599453, 2.1269280110429727
    close(
        alg.bradley_terry_loss(chosen, rejected),
        (0.3132616875182228 + 0.6931471805599453 + 2.1269280110429727) / 3,
    )
    # margin 0, 1, 0 -> d = 1, -1, -2: log(1 + e) = 1.3132616875182228
    margin = torch.tensor([0.0, 1.0, 0.0], dtype=F64)
    close(
        alg.bradley_terry_loss(chosen, rejected, margin),
        (0.3132616875182228 + 1.3132616875182228 + 2.1269280110429727) / 3,
    )
    big = torch.tensor([1000.0], dtype=F64)
    close(alg.bradley_terry_loss(big, -big), 0.0)  # stable: no overflow
    close(alg.bradley_terry_loss(-big, big), 2000.0)
