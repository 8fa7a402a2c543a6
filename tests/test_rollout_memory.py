"""How a rollout keeps the base's distributions (``rollout_memory``): the exact modes change neither the loss's pass nor
the exact KL; 'auto' picks what fits."""

import warnings

import pytest
import torch

from lightning_ipa import Adapter, AdapterConfig, LocalBase, Sampling, TailoredPolicy
from lightning_ipa.cli import main
from tests.test_cli import scalars, tiny_args

PROMPTS = ["Write one sentence that uses all of these words: dog, tree, run.", "A child", "The cat sleeps on the warm roof and"]


def policy_over(path: str, top_k=None) -> TailoredPolicy:
    base = LocalBase(path, dtype="float32", top_k=top_k)
    adapter = Adapter.build(AdapterConfig(num_layers=2, head="pretrained"), base)
    with torch.no_grad():
        adapter.head.weight.mul_(0.5)  # an adapter that moves π away from the base
    return TailoredPolicy(base, adapter, sampling=Sampling(max_new_tokens=8, top_p=0.9, temperature=0.8, min_new_tokens=2))


def sampled(policy: TailoredPolicy, memory: str):
    return policy.sample(policy.encode(PROMPTS), torch.Generator().manual_seed(3), samples_per_prompt=2, memory=memory)


def test_every_mode_draws_the_same_rollout_and_the_exact_modes_give_the_same_loss_pass(tiny_llama):
    policy = policy_over(tiny_llama)
    full = sampled(policy, "full")
    output = policy(full, with_kl=True)
    for memory, atol in (("recompute", 1e-4), ("bfloat16", 5e-2)):
        rollout = sampled(policy, memory)
        for field in ("response_ids", "response_mask", "logprobs", "ref_logprobs", "kl"):  # sampling is unchanged
            assert torch.equal(getattr(rollout, field), getattr(full, field)), (memory, field)
        if memory == "recompute":
            assert rollout.base_distribution is None
            with pytest.raises(ValueError, match="not been read by the base"):
                policy(rollout)
            rollout = policy.read(rollout)  # one teacher-forced pass of the base, as IPAModule.experience does
        else:
            assert rollout.base_distribution.dtype == torch.bfloat16
        other = policy(rollout, with_kl=True)
        assert torch.allclose(other.logprobs, output.logprobs, atol=atol), memory
        assert torch.allclose(other.kl, output.kl, atol=atol), memory
    assert (output.kl - full.kl).abs().max() < 1e-4  # the loss's exact KL is the sampling pass's


def test_top_k_memory_is_exact_for_a_top_k_base(tiny_llama):
    policy = policy_over(tiny_llama, top_k=8)
    assert policy.rollout_memory(6) == "top_k"  # 'auto' for a top-k base
    full, sparse = sampled(policy, "full"), sampled(policy, "top_k")
    assert sparse.base_distribution.shape == (*sparse.response_ids.shape, 8) and sparse.base_support.shape == sparse.base_distribution.shape
    assert torch.equal(sparse.kl, full.kl)
    a, b = policy(full, with_kl=True), policy(sparse, with_kl=True)
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.kl, b.kl) and torch.equal(a.entropy, b.entropy)


def test_auto_keeps_what_fits_and_the_modes_are_checked(tiny_llama, monkeypatch):
    policy = policy_over(tiny_llama)
    assert policy.rollout_memory(6) == "full"
    monkeypatch.setattr("lightning_ipa.policy.ROLLOUT_MEMORY_BUDGET", 6 * 8 * policy.base.vocab_size * 4 - 1)  # one byte short
    assert policy.rollout_memory(6) == "recompute" and sampled(policy, "auto").base_distribution is None
    with pytest.raises(ValueError, match="top-k.*whole vocabulary"):
        policy.rollout_memory(6, "top_k")
    with pytest.raises(ValueError, match="unknown rollout_memory 'half'"):
        policy.rollout_memory(6, "half")


def test_a_fit_with_recomputed_distributions_trains_as_the_full_one(tiny_llama, tmp_path):
    """Through the Trainer: 'recompute' (the base reads each minibatch again just before its update) logs the losses and
    KL of 'full' (equal up to float rounding of the two base passes)."""
    runs = {}
    for memory in ("full", "recompute"):
        main(["fit", *tiny_args(tiny_llama, tmp_path / memory, 2), f"--model.rollout_memory={memory}"])
        runs[memory] = scalars(tmp_path / memory / "quickstart" / "version_0")
    for tag in ("loss/policy", "loss/kl", "train/kl", "train/reward"):
        assert runs["recompute"][tag] == pytest.approx(runs["full"][tag], abs=1e-4), tag


def test_recompute_with_a_base_not_in_float32_is_warned_about(tiny_llama):
    """The read rounds differently from the sampling pass: in bfloat16 that moves π visibly (tens of millinats)."""
    policy = policy_over(tiny_llama)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert policy.rollout_memory(6, "recompute") == "recompute"  # float32: nothing to say
    half = TailoredPolicy(LocalBase(tiny_llama, dtype="bfloat16"), None)
    with pytest.warns(UserWarning, match="rollout_memory='recompute' with a bfloat16 base.*use a float32 base"):
        half.rollout_memory(6, "recompute")


def test_top_k_memory_refuses_a_base_wider_than_its_support_size(tiny_llama, monkeypatch):
    policy = policy_over(tiny_llama, top_k=8)
    monkeypatch.setattr(LocalBase, "support_size", property(lambda self: 4))  # a base that says 4 but gives 8
    with pytest.raises(ValueError, match="more than its support_size=4 finite log-probs"):
        sampled(policy, "top_k")


def test_a_top_k_memory_for_a_full_vocabulary_base_is_refused_at_start_up(tiny_llama, tmp_path):
    """Before any work: the module refuses it when it is built, not at the first rollout."""
    with pytest.raises(ValueError, match="rollout_memory='top_k'.*whole vocabulary"):
        main(["fit", *tiny_args(tiny_llama, tmp_path, 1), "--model.rollout_memory=top_k"])
    assert not (tmp_path / "quickstart").exists()  # no run folder: nothing was started
