import math
from types import SimpleNamespace

import pytest
import torch

from lightning_ipa.algorithms import PPO, RLOO, Quark
from lightning_ipa.algorithms.quark import DataPool
from lightning_ipa.algorithms.functional import (
    aggregate,
    adaptive_kl_coef,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    leave_one_out_advantages,
    reward_quantiles,
    token_rewards,
    whiten,
)
from lightning_ipa.types import Experience, PolicyOutput, Responses, Rollout


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = token_rewards(torch.tensor([1.0, 2.0]), kl, mask, 0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]]))


def test_gae_against_hand_computed_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: δ = [-0.1, -0.1, 0.7]; A2 = 0.7, A1 = -0.1 + 0.5·0.7, A0 = -0.1 + 0.5·0.25
    assert torch.allclose(advantages, torch.tensor([[0.025, 0.25, 0.7], [0.5, 1.0, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.525, 0.65, 1.0], [1.5, 2.0, 0.0]]))


def test_gae_discount():
    advantages, _ = gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0)
    assert torch.allclose(advantages, torch.tensor([[0.9, 1.0]]))


def test_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert w[0, 2] == 0
    assert abs(real.mean()) < 1e-6 and abs(real.pow(2).sum() / (len(real) - 1) - 1) < 1e-4  # unit sample variance (trl)


def test_clipped_policy_loss_against_hand_computed_values():
    mask = torch.ones(1, 2)
    positive = clipped_policy_loss(torch.tensor([[0.0, math.log(1.5)]]), torch.zeros(1, 2), torch.ones(1, 2), mask, 0.2)
    assert torch.isclose(positive.loss, torch.tensor(-1.1)) and positive.clip_fraction == 0.5
    negative = clipped_policy_loss(torch.tensor([[0.0, math.log(0.5)]]), torch.zeros(1, 2), -torch.ones(1, 2), mask, 0.2)
    assert torch.isclose(negative.loss, torch.tensor(0.9)) and negative.clip_fraction == 0.5
    padded = clipped_policy_loss(torch.tensor([[0.0, 5.0]]), torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1, 0]]), 0.2)
    assert torch.isclose(padded.loss, torch.tensor(-1.0))  # padding never counts


def test_clipped_value_loss_against_hand_computed_values():
    out = clipped_value_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 3.0]]), torch.ones(1, 2), 0.2)
    # token 0: unclipped (1-1)² = 0, clipped (0.2-1)² = 0.64; token 1: both (2-3)² = 1
    assert torch.isclose(out.loss, torch.tensor(0.5 * (0.64 + 1.0) / 2))
    assert out.clip_fraction == 0.5


def test_whiten_is_trls_masked_whiten():
    """Values of trl's ``masked_whiten`` (Bessel-corrected masked variance), run outside this repository on the same input."""
    x = torch.tensor([[1.0, 2.0, 4.0, 0.0], [3.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    trl = [[-0.41590019536600176, 0.10397504884150041, 1.143725537256505, 0.0], [0.6238502930490026, -1.4556506837810061, 0.0, 0.0]]
    assert torch.allclose(whiten(x, mask), torch.tensor(trl, dtype=torch.float64), atol=1e-12)
    assert whiten(torch.tensor([[5.0, 7.0]]), torch.tensor([[1, 0]])).tolist() == [[0.0, 0.0]]  # one entry: no n/(n − 1)


def test_leave_one_out_advantages():
    adv = leave_one_out_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]), 4)
    assert torch.allclose(adv, torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0, 0, 0, 0, 0]))


def test_adaptive_kl_coefficient():
    assert torch.isclose(adaptive_kl_coef(torch.tensor(0.1), torch.tensor(12.0), 6.0, 100, 10), torch.tensor(0.102))
    assert torch.isclose(adaptive_kl_coef(torch.tensor(0.1), torch.tensor(5.4), 6.0, 100, 10), torch.tensor(0.1 * (1 - 0.1 * 0.1)))


def fake_rollout(batch=8, length=5, vocab=11, hidden=6) -> Rollout:
    """Tokens drawn from an unfiltered policy π near a random base, with every sampling-time field."""
    torch.manual_seed(0)
    lengths = torch.randint(1, length + 1, (batch,))
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    base = torch.randn(batch, length, vocab).log_softmax(-1)
    policy = (base + 0.3 * torch.randn(batch, length, vocab)).log_softmax(-1)
    ids = torch.distributions.Categorical(logits=policy).sample()
    logprobs = policy.gather(-1, ids[..., None]).squeeze(-1) * mask
    reference = base.gather(-1, ids[..., None]).squeeze(-1) * mask
    kl = (policy.exp() * (policy - base)).sum(-1) * mask
    prompt = torch.ones(batch, 2, dtype=torch.long)
    return Rollout(prompt, prompt, ids, mask, logprobs, reference, kl, base, torch.randn(batch, length, hidden))


def test_ppo_experience_and_loss_at_the_sampling_policy():
    ppo = PPO(kl_coef=0.5, kl_target=1.0, kl_horizon=100)
    ppo.setup(SimpleNamespace(hidden_size=6))
    rollout = fake_rollout()
    experience = ppo.make_experience(rollout, torch.linspace(0, 1, 8))
    ppo.control_kl(rollout)
    mask = rollout.response_mask
    assert torch.allclose(experience.values, torch.zeros_like(mask, dtype=torch.float))  # zero-initialised critic
    assert (experience.advantages[mask == 0] == 0).all() and (experience.returns[mask == 0] == 0).all()
    assert ppo.kl_coef != 0.5  # adaptive coefficient moved
    out = ppo.loss(PolicyOutput(rollout.logprobs, torch.ones_like(rollout.logprobs), rollout.hidden, rollout.kl), experience)
    assert abs(out.stats["policy"]) < 1e-5  # ratio 1: −mean(whitened advantages) = 0
    assert out.stats["clip_fraction"] == 0
    returns = experience.returns[mask.bool()]
    assert torch.isclose(out.stats["value"], 0.5 * returns.pow(2).mean())


def test_rloo_experience_and_loss():
    rloo = RLOO(samples_per_prompt=4, kl_coef=0.0, kl_loss_coef=0.1)
    rollout = fake_rollout()
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    experience = rloo.make_experience(rollout, scores)
    mask = rollout.response_mask
    expected = leave_one_out_advantages(scores, 4)[:, None] * mask
    assert torch.allclose(experience.advantages, expected)
    kl = torch.rand_like(rollout.logprobs) * mask
    out = rloo.loss(PolicyOutput(rollout.logprobs, torch.zeros_like(rollout.logprobs), rollout.hidden, kl), experience)
    assert torch.isclose(out.loss, (-expected + 0.1 * kl).sum() / mask.sum())  # ratio 1: −mean(A) + β·mean(KL)
    assert torch.isclose(out.stats["kl"], kl.sum() / mask.sum())


def test_an_unknown_kl_estimator_is_refused_at_construction():
    with pytest.raises(ValueError, match="unknown kl_estimator 'k2'; choose one of"):
        RLOO(kl_estimator="k2")


@pytest.mark.parametrize("estimator", ["full", "k1"])
def test_the_exact_kl_penalty_brings_its_direct_gradient_into_the_loss(estimator):
    """With 'full', −β·KL_t in the return depends on θ itself: β·mean_t KL_t joins the loss (a sampled estimator needs none)."""
    rloo = RLOO(samples_per_prompt=4, kl_coef=0.1, kl_estimator=estimator)
    rollout = fake_rollout()
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    experience = rloo.make_experience(rollout, scores)
    mask = rollout.response_mask
    penalty = rollout.kl if estimator == "full" else rollout.logprobs - rollout.ref_logprobs
    returns = scores - 0.1 * (penalty * mask).sum(-1)
    assert torch.allclose(experience.advantages, leave_one_out_advantages(returns, 4)[:, None] * mask)
    kl = torch.rand_like(rollout.logprobs) * mask
    out = rloo.loss(PolicyOutput(rollout.logprobs, torch.zeros_like(rollout.logprobs), rollout.hidden, kl), experience)
    direct = 0.1 * kl.sum() / mask.sum() if estimator == "full" else 0.0
    assert rloo.needs_exact_kl == (estimator == "full")
    assert torch.isclose(out.loss, (-experience.advantages).sum() / mask.sum() + direct)


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        RLOO(samples_per_prompt=1)


def test_minibatches_cover_each_epoch_once():
    ppo = PPO(epochs=2, minibatch_size=3)
    ppo.setup(SimpleNamespace(hidden_size=6))
    experience = ppo.make_experience(fake_rollout(batch=8), torch.zeros(8))
    batches = list(ppo.minibatches(experience))
    assert [len(b.advantages) for b in batches] == [3, 3, 2, 3, 3, 2]
    first_epoch = torch.cat([b.samples.hidden[:, 0, 0] for b in batches[:3]])
    assert torch.allclose(first_epoch.sort().values, experience.samples.hidden[:, 0, 0].sort().values)


def test_reward_quantiles_against_hand_computed_values():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.5])
    # ranked: 0.9 (i1), 0.7 (i4), 0.5 (i2), 0.5 (i5: ties keep their order), 0.3 (i3), 0.1 (i0); ⌊6/3⌋ = 2 per quantile
    assert reward_quantiles(rewards, 3).tolist() == [2, 0, 1, 2, 0, 1]  # by index: ranks 5, 0, 2, 4, 1, 3
    # Quark's DataPool.add: ⌊7/5⌋ = 1 per quantile, the remainder in the worst (tests/test_quark_quantiles.py)
    assert reward_quantiles(torch.arange(7.0), 5).tolist() == [4, 4, 4, 3, 2, 1, 0]  # ranks 6..0


def pool_rollout(prompt: list[list[int]], response: list[list[int]]) -> Rollout:
    """A rollout of token ids only; 0 is padding (left in prompts, right in responses)."""
    prompt_ids, response_ids = torch.tensor(prompt), torch.tensor(response)
    return Rollout(prompt_ids, (prompt_ids > 0).long(), response_ids, (response_ids > 0).long(), *[None] * 5)


def test_pool_keeps_the_newest_samples_and_aligns_their_padding():
    pool = DataPool(capacity=4)
    pool.add(pool_rollout([[0, 1], [2, 3], [0, 4]], [[5, 0, 0], [6, 7, 8], [9, 0, 0]]), torch.tensor([1.0, 2.0, 3.0]))
    pool.add(pool_rollout([[11, 12, 13], [0, 0, 14]], [[15, 16], [17, 0]]), torch.tensor([4.0, 5.0]))
    assert len(pool) == 4 and pool.rewards.tolist() == [2.0, 3.0, 4.0, 5.0]  # the oldest sample was evicted
    assert pool.data["prompt_ids"].tolist() == [[0, 2, 3], [0, 0, 4], [11, 12, 13], [0, 0, 14]]  # left-padded to 3
    assert pool.data["response_ids"].tolist() == [[6, 7, 8], [9, 0, 0], [15, 16, 0], [17, 0, 0]]  # right-padded to 3
    assert torch.equal(pool.data["prompt_mask"], (pool.data["prompt_ids"] > 0).long())
    replay = pool.replay(torch.tensor([1, 3]), torch.tensor([4, 0]), torch.device("cpu"))
    assert replay.prompt_ids.tolist() == [[4], [14]] and replay.response_ids.tolist() == [[9], [17]]  # all-padding columns dropped
    assert replay.control.tolist() == [4, 0] and isinstance(replay, Responses)  # tokens only
    again = DataPool(capacity=4)
    again.load_state_dict(pool.state_dict())
    assert all(torch.equal(again.data[k], pool.data[k]) for k in pool.data) and torch.equal(again.rewards, pool.rewards)


def test_quark_experience_draws_from_the_pool_with_each_samples_quantile():
    quark = Quark(quantiles=2, pool_size=6)
    quark.pool.add(pool_rollout([[1]] * 4, [[2]] * 4), torch.tensor([0.0, 10.0, 20.0, 30.0]))
    rollout = fake_rollout(batch=4)
    experience = quark.make_experience(rollout, torch.tensor([15.0, 25.0, 5.0, 35.0]))
    assert len(quark.pool) == 6 and quark.pool.rewards.tolist() == [20.0, 30.0, 15.0, 25.0, 5.0, 35.0]
    drawn = experience.samples
    assert drawn.response_ids.shape[0] == 4  # as many pool samples as the rollout had
    expected = {20.0: 1, 30.0: 0, 15.0: 1, 25.0: 0, 5.0: 1, 35.0: 0}  # top half of the pool: quantile 0
    pool_responses = quark.pool.data["response_ids"]
    for row in range(4):
        index = next(i for i in range(6) if torch.equal(pool_responses[i, : drawn.response_ids.shape[1]], drawn.response_ids[row]))
        assert drawn.control[row] == expected[quark.pool.rewards[index].item()]
    assert quark.stats()["best_quantile_min_reward"] == 25.0


def test_quark_metrics_while_the_best_quantile_is_empty():
    quark = Quark(quantiles=5, pool_size=10)
    quark.pool.add(pool_rollout([[1], [2]], [[3], [4]]), torch.tensor([0.5, 0.7]))  # N = 2 < 5: all in the worst quantile
    assert set(quark.stats()) == {"kl_loss_coef", "pool_size"}
    quark.pool.add(pool_rollout([[1], [2], [3]], [[3], [4], [5]]), torch.tensor([0.1, 0.9, 0.2]))
    assert quark.stats()["best_quantile_min_reward"] == 0.9  # N = 5: one per quantile


def test_quark_loss_against_hand_computed_values():
    quark = Quark(kl_loss_coef=0.05, entropy_coef=0.06)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    entropy = torch.tensor([[2.0, 4.0, 9.0], [3.0, 9.0, 9.0]])
    kl = torch.tensor([[0.3, 0.6, 9.0], [0.9, 9.0, 9.0]])
    experience = Experience(pool_rollout([[1], [1]], [[1, 1, 0], [1, 0, 0]]))
    out = quark.loss(PolicyOutput(logprobs, entropy, torch.zeros(2, 3, 6), kl), experience)
    # over the 3 real tokens: NLL 6/3 = 2, KL 1.8/3 = 0.6, entropy 9/3 = 3
    assert torch.isclose(out.loss, torch.tensor(2.0 + 0.05 * 0.6 - 0.06 * 3.0))
    assert {k: round(v.item(), 6) for k, v in out.stats.items()} == {"nll": 2.0, "kl": 0.6, "entropy": 3.0}
    assert quark.needs_exact_kl


def test_loss_aggregation_modes_against_verl_agg_loss():
    """``aggregate`` is verl's ``agg_loss`` (verl/trainer/ppo/core_algos.py): token-mean, seq-mean-token-mean,
    seq-mean-token-sum, computed by hand on two responses of 2 and 1 tokens."""
    values = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(values, mask, "token-mean") == 6.0 / 3  # every token weighs the same
    assert aggregate(values, mask, "seq-mean-token-mean") == (1.5 + 3.0) / 2  # every response weighs the same
    assert aggregate(values, mask, "seq-mean-token-sum") == (3.0 + 3.0) / 2
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'sum'"):
        aggregate(values, mask, "sum")
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'seq-mean'"):
        RLOO(loss_agg_mode="seq-mean")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_every_loss_term_is_aggregated_by_the_setting(mode):
    """RLOO's policy, entropy and KL terms and Quark's NLL are each aggregated by ``loss_agg_mode``."""
    rollout = fake_rollout()
    rloo = RLOO(samples_per_prompt=4, kl_coef=0.0, kl_loss_coef=0.1, entropy_coef=0.01, loss_agg_mode=mode)
    experience = rloo.make_experience(rollout, torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0]))
    mask, entropy = rollout.response_mask, torch.rand_like(rollout.logprobs)
    out = rloo.loss(PolicyOutput(rollout.logprobs, entropy, rollout.hidden, rollout.kl), experience)
    policy = aggregate(-experience.advantages, mask, mode)  # ratio 1: the surrogate is −A per token
    expected = policy - 0.01 * aggregate(entropy, mask, mode) + 0.1 * aggregate(rollout.kl, mask, mode)
    assert torch.isclose(out.loss, expected, atol=1e-6)
    quark = Quark(loss_agg_mode=mode)
    out = quark.loss(PolicyOutput(rollout.logprobs, entropy, rollout.hidden, rollout.kl), Experience(rollout))
    assert torch.isclose(out.stats["nll"], aggregate(-rollout.logprobs, mask, mode))


def test_quark_names_its_kl_term_and_refuses_a_reward_penalty():
    """Every algorithm: ``kl_coef`` is the KL penalty in the reward, ``kl_loss_coef`` the KL term in the loss. Quark has
    no return: its KL is the loss term, and ``kl_target`` adapts that one."""
    quark = Quark(kl_loss_coef=0.05, kl_target=0.01, kl_horizon=10)
    assert quark.kl_coef == 0 and quark.kl_loss_coef == 0.05 and quark.needs_exact_kl
    rollout = fake_rollout(batch=4)
    quark.control_kl(rollout)  # the rollout's KL is above the target: the loss term's weight rises
    assert quark.kl_loss_coef > 0.05 and quark.kl_coef == 0
    with pytest.raises(TypeError, match="Quark got kl_coef: it has no return"):
        Quark(kl_coef=0.05)


def test_checkpoints_from_before_kl_loss_coef_are_upgraded():
    """Up to c8754c5 only ``kl_coef`` was checkpointed, and Quark's was its KL loss weight: ``upgrade_checkpoint`` adds
    the configured ``kl_loss_coef`` (RLOO, PPO) or moves Quark's adapted weight to it, so that such checkpoints load."""
    old = {"algorithm.kl_coef": torch.tensor(0.07)}
    RLOO(kl_loss_coef=0.1).upgrade_checkpoint(old, "algorithm.")
    assert old["algorithm.kl_coef"] == 0.07 and torch.isclose(old["algorithm.kl_loss_coef"], torch.tensor(0.1))
    old = {"algorithm.kl_coef": torch.tensor(0.07)}
    Quark().upgrade_checkpoint(old, "algorithm.")
    assert old["algorithm.kl_loss_coef"] == 0.07 and old["algorithm.kl_coef"] == 0
    new = {"algorithm.kl_coef": torch.tensor(0.0), "algorithm.kl_loss_coef": torch.tensor(0.03)}
    Quark().upgrade_checkpoint(new, "algorithm.")
    assert new["algorithm.kl_loss_coef"] == 0.03  # a current checkpoint stays as it is
