import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from lightning_ipa.policy import NUCLEUS_CANDIDATES, TailoredPolicy, TokenStats, kl_divergence, truncate
from lightning_ipa.types import Responses, position_ids

PROMPTS = ["Write one sentence that uses all of these words: dog, tree, run.", "A child", "The cat sleeps on the warm roof and"]


def hf_kept(logits: torch.Tensor, top_k: int, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """The tokens transformers' warpers keep (``TopKLogitsWarper`` then ``TopPLogitsWarper``, as ``generate`` orders them)."""
    scores = logits.clone()
    if top_k:
        scores = TopKLogitsWarper(top_k, min_tokens_to_keep=min_tokens_to_keep)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p, min_tokens_to_keep=min_tokens_to_keep)(None, scores)
    return scores > float("-inf")


def kept(truncated, vocab: int) -> torch.Tensor:
    """Our kept set as a [B, V] mask."""
    finite = truncated.logprobs > float("-inf")
    return finite if truncated.ids is None else torch.zeros(len(finite), vocab, dtype=torch.bool).scatter(-1, truncated.ids, finite)


@pytest.mark.parametrize(
    "vocab,top_k,top_p,scale",
    [
        (5000, 0, 0.9, 3.0),  # nucleus inside the candidates
        (5000, 0, 0.95, 0.01),  # near-flat: nucleus wider than the candidates, full ranking
        (5000, 50, 0.8, 1.0),  # top-k then top-p
        (5000, 2000, 0.99, 0.01),  # top-k wider than the candidates
        (300, 0, 0.7, 2.0),  # vocabulary smaller than the candidate window
    ],
)
def test_truncation_keeps_exactly_the_transformers_set_and_samples_it(vocab, top_k, top_p, scale):
    torch.manual_seed(0)
    logprobs = (torch.randn(4, vocab) * scale).log_softmax(-1)
    expected = hf_kept(logprobs, top_k, top_p)
    truncated = truncate(logprobs, top_k, top_p)
    assert torch.equal(kept(truncated, vocab), expected)
    renormalised = logprobs.masked_fill(~expected, float("-inf")).log_softmax(-1)
    ours = torch.full_like(logprobs, float("-inf"))
    ours = ours.scatter(-1, truncated.ids, truncated.logprobs) if truncated.ids is not None else truncated.logprobs
    assert torch.allclose(ours.exp(), renormalised.exp(), atol=1e-6)
    draws = truncated._replace(ids=None if truncated.ids is None else truncated.ids.repeat_interleave(3000, 0),
                               logprobs=truncated.logprobs.repeat_interleave(3000, 0)).sample(torch.Generator().manual_seed(0)).view(4, 3000)
    for row in range(4):
        assert expected[row, draws[row]].all(), "sampled a token outside the kept set"
        probs = renormalised[row].exp()
        top = probs.argmax()  # the most likely kept token is drawn with its renormalised probability
        freq = (draws[row] == top).float().mean()
        assert abs(freq - probs[top]) < 4 * (probs[top] * (1 - probs[top]) / draws.shape[1]).sqrt() + 1e-3
    if scale == 0.01 and not top_k:
        assert expected.sum(-1).min() > NUCLEUS_CANDIDATES  # the wider windows were exercised
    if vocab > NUCLEUS_CANDIDATES and expected.sum(-1).max() < NUCLEUS_CANDIDATES:  # the fast path: no wider look
        assert truncated.ids.shape[-1] == max(NUCLEUS_CANDIDATES, top_k + 1)


TIES = [  # (probabilities, top_k, top_p, min_tokens_to_keep): exact binary fractions, so sums do not round
    ([0.4, 0.2, 0.2, 0.2], 2, 1.0, 1),  # transformers keeps all four: every token as likely as the 2nd
    ([0.4, 0.2, 0.2, 0.2], 0, 0.5, 1),  # the nucleus takes one 0.2: the highest id (stable ascending sort)
    ([0.2, 0.2, 0.4, 0.2], 0, 0.5, 1),
    ([0.2, 0.2, 0.4, 0.2], 0, 0.5, 3),  # min_tokens_to_keep overrides the nucleus
    ([0.5, 0.25, 0.125, 0.125], 0, 0.75, 1),  # mass before the 3rd token is exactly p: dropped
    ([0.25, 0.25, 0.25, 0.25], 3, 0.5, 1),  # top-k (all four: ties) then top-p over them
    ([0.5, 0.25, 0.125, 0.125], 1, 1.0, 2),  # min_tokens_to_keep raises k
]


@pytest.mark.parametrize("probs,top_k,top_p,min_keep", TIES)
def test_ties_at_the_boundary_keep_what_transformers_keeps(probs, top_k, top_p, min_keep):
    logprobs = torch.tensor([probs]).log()
    assert torch.equal(kept(truncate(logprobs, top_k, top_p, min_keep), 4), hf_kept(logprobs, top_k, top_p, min_keep))


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (7, 1.0), (20, 0.63)])  # no cumulative mass lands on p itself
def test_many_ties_across_the_candidate_window(monkeypatch, top_k, top_p):
    """Log-probs on a coarse grid (ties everywhere) and a candidate window that cuts through a tie.

    ``TopPLogitsWarper`` sorts with ``torch.sort``, whose order among equal values is unspecified (on CPU
    it is stable up to 16 elements and not beyond), so which of several equally likely tokens at the
    boundary it drops is an accident of the sort. We drop the lowest ids first: exactly transformers'
    set when its sort is stable, and otherwise the same number of tokens with the same probabilities.
    """
    monkeypatch.setattr("lightning_ipa.policy.NUCLEUS_CANDIDATES", 16)
    torch.manual_seed(1)
    logprobs = (torch.randint(0, 6, (64, 200)).float() * 0.5).log_softmax(-1)
    ours = kept(truncate(logprobs, top_k, top_p), 200)
    theirs = hf_kept(logprobs, top_k, top_p)
    assert torch.equal(ours.sum(-1), theirs.sum(-1))
    for row in range(len(logprobs)):
        assert torch.equal(logprobs[row][ours[row]].sort().values, logprobs[row][theirs[row]].sort().values)
    unstable_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *args, **kwargs: unstable_sort(*args, **kwargs, stable=True))
    assert torch.equal(ours, hf_kept(logprobs, top_k, top_p))  # transformers' own warpers, their sort made stable


def test_kl_divergence_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    ref = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    expected = 0.5 * math.log(2) + 2 * 0.25 * math.log(1)  # the token p never draws counts 0
    assert math.isclose(kl_divergence(p.log(), ref.log()).item(), expected, rel_tol=1e-6)
    logits = torch.tensor([[1.0, 0.0, -1.0, float("-inf")]], requires_grad=True)
    kl_divergence(logits.log_softmax(-1), ref.log()).sum().backward()
    assert torch.isfinite(logits.grad).all()  # −inf log-probs leak no NaN into the gradient


@pytest.mark.parametrize("top_p", [0.5, 1.0])
def test_rollout_kl_is_the_exact_kl_and_never_negative(policy_factory, top_p):
    """An adapter pushing away from the base (projection −0.7·I; issue 16's case at top-p 0.5).

    The sampled log-ratio log π(x) − log p_base(x) of tokens drawn through a top-p filter (what
    ``train/kl`` logged before) is negative here, although π is far from the base. ``Rollout.kl`` is the
    exact per-position KL(π ‖ base): ≥ 0, equal to what the loss computes (``policy(rollout, with_kl=True)``),
    and, for unfiltered rollouts, equal in the mean to the Monte-Carlo sequence KL (trl's k1 estimator).
    """
    policy = policy_factory(head="projection", top_p=top_p, max_new_tokens=8, min_new_tokens=8)
    with torch.no_grad():
        policy.adapter.head.projection.weight.copy_(-0.7 * torch.eye(policy.adapter.hidden_size))
    rollout = policy.sample(policy.base.encode(PROMPTS), torch.Generator().manual_seed(0), samples_per_prompt=100)
    mask = rollout.response_mask
    exact = rollout.kl.sum(-1)  # [B] what train/kl averages
    with torch.no_grad():
        assert torch.allclose(rollout.kl, policy(rollout, with_kl=True).kl, atol=1e-4)
    assert (rollout.kl >= 0).all() and exact.mean() > 5.0
    log_ratio = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(-1)  # k1
    if top_p < 1:
        assert log_ratio.mean() < 0  # the old train/kl: not a KL
    else:
        assert abs(log_ratio.mean() - exact.mean()) < 4 * (log_ratio - exact).std() / len(exact) ** 0.5


def test_alpha_zero_is_the_base_distribution(policy_factory):
    policy = policy_factory(alpha=0.0, head="pretrained", temperature=0.7)
    prompts = policy.base.encode(PROMPTS)
    base_lp, _ = policy.base(prompts.ids, prompts.mask, position_ids(prompts.mask))
    hidden, _ = policy.adapter(prompts.ids, prompts.mask, position_ids(prompts.mask))
    adapter_logits = policy.adapter.head(hidden[:, -1])
    assert adapter_logits.abs().max() > 0.1  # a non-trivial adapter ...
    tailored = policy.distribution(base_lp, adapter_logits, step=5)
    never = torch.zeros_like(base_lp, dtype=torch.bool)
    never[:, policy.pad_id] = True  # the one token the framework never samples
    assert torch.allclose(tailored, (base_lp.masked_fill(never, float("-inf")) / 0.7).log_softmax(-1), atol=1e-6)

    # and sampling draws the very tokens the base alone draws with the same seed
    with_adapter = policy.sample(prompts, torch.Generator().manual_seed(3))
    base_only = policy.generate(prompts, torch.Generator().manual_seed(3), use_adapter=False)
    assert torch.equal(with_adapter.response_ids, base_only.response_ids)


def test_alpha_zero_sampling_matches_hf_generate(policy_factory, tiny_llama):
    """With α = 0 and no filters, the lockstep sampler reproduces HF ``generate`` token for token."""
    policy = policy_factory(alpha=0.0, max_new_tokens=12, min_new_tokens=1)
    prompts = policy.base.encode(PROMPTS[:1])
    torch.manual_seed(11)
    ours = policy.sample(prompts).response_ids
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama)
    eos = policy.base.tokenizer.eos_token_id
    torch.manual_seed(11)
    theirs = lm.generate(
        prompts.ids, attention_mask=prompts.mask, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=12,
        min_new_tokens=1, eos_token_id=eos, pad_token_id=policy.pad_id,
        suppress_tokens=[policy.pad_id],
    )[:, prompts.ids.shape[1] :]
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)


def test_zero_head_starts_exactly_at_the_base(policy_factory):
    policy = policy_factory(alpha=1.0, head="zeros")
    prompts = policy.base.encode(PROMPTS)
    a = policy.sample(prompts, torch.Generator().manual_seed(0))
    b = TailoredPolicy(policy.base, None, sampling=policy.sampling).sample(prompts, torch.Generator().manual_seed(0))  # the base alone
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert a.kl.abs().max() < 1e-4


def test_base_runs_once_per_generated_token(policy_factory):
    policy = policy_factory(max_new_tokens=9, min_new_tokens=9)
    policy.base.forward_count = 0
    rollout = policy.sample(policy.base.encode(PROMPTS))
    assert rollout.response_ids.shape[1] == 9
    assert policy.base.forward_count == 9
    policy(rollout)  # the loss re-uses the rollout's base distributions
    assert policy.base.forward_count == 9


def test_left_padded_batch_equals_each_row_alone(policy_factory):
    policy = policy_factory(head="pretrained", top_k=1, max_new_tokens=8)  # greedy: deterministic
    with torch.no_grad():
        policy.adapter.head.weight.mul_(0.5)
    batch = policy.sample(policy.base.encode(PROMPTS))
    assert (batch.prompt_mask == 0).any()  # really padded
    evaluated = policy(batch)
    for i, prompt in enumerate(PROMPTS):
        single = policy.sample(policy.base.encode([prompt]))
        n = int(single.response_mask.sum())
        assert torch.equal(batch.response_ids[i, :n], single.response_ids[0, :n])
        assert int(batch.response_mask[i].sum()) == n
        assert torch.allclose(batch.logprobs[i, :n], single.logprobs[0, :n], atol=1e-4)
        assert torch.allclose(evaluated.logprobs[i, :n], single.logprobs[0, :n], atol=1e-4)


def test_k_samples_per_prompt_read_each_prompt_once(policy_factory):
    """Sharing a prompt's caches among its k samples changes nothing but the prompt forwards."""
    policy = policy_factory(head="pretrained", top_p=0.9, max_new_tokens=7, min_new_tokens=7)
    shared = policy.sample(policy.base.encode(PROMPTS), torch.Generator().manual_seed(5), samples_per_prompt=3)
    repeated = policy.sample(policy.base.encode([p for p in PROMPTS for _ in range(3)]), torch.Generator().manual_seed(5))
    assert torch.equal(shared.prompt_ids, repeated.prompt_ids) and torch.equal(shared.prompt_mask, repeated.prompt_mask)
    assert torch.equal(shared.response_ids, repeated.response_ids)
    assert torch.allclose(shared.logprobs, repeated.logprobs, atol=1e-5)
    assert torch.allclose(shared.ref_logprobs, repeated.ref_logprobs, atol=1e-5)
    assert torch.allclose(policy(shared).logprobs, shared.logprobs, atol=1e-4)
    evaluation = policy.generate(policy.base.encode(PROMPTS), torch.Generator().manual_seed(5), samples_per_prompt=3)
    assert torch.equal(evaluation.response_ids, shared.response_ids)  # the same draws, without the [B, T, V] tensors
    assert isinstance(evaluation, Responses)


@pytest.mark.parametrize("block_tokens", [None, 4])  # None: one block; 4: the loss is scored 4 tokens at a time
def test_rollout_log_probs_equal_the_training_loss_log_probs(policy_factory, monkeypatch, block_tokens):
    policy = policy_factory(head="pretrained", top_p=0.9, temperature=0.8, max_new_tokens=10, min_new_tokens=3)
    if block_tokens:
        monkeypatch.setattr("lightning_ipa.policy.EVALUATE_BLOCK", block_tokens * policy.base.vocab_size)
    rollout = policy.sample(policy.base.encode(PROMPTS), torch.Generator().manual_seed(1))
    evaluated = policy(rollout)
    assert torch.allclose(evaluated.logprobs, rollout.logprobs, atol=1e-4)
    assert torch.isfinite(evaluated.entropy).all() and (evaluated.entropy[rollout.response_mask.bool()] > 0).all()
    assert (evaluated.logprobs[~rollout.response_mask.bool()] == 0).all()


@pytest.mark.parametrize("head_std", [0.0, 5.0])  # 0: the zero head, i.e. the base itself; 5: far from it
def test_loss_kl_is_the_exact_kl_of_the_full_distributions(policy_factory, head_std):
    policy = policy_factory(head="zeros", temperature=0.8, max_new_tokens=8, min_new_tokens=3)
    nn.init.normal_(policy.adapter.head.weight, std=head_std)
    rollout = policy.sample(policy.base.encode(PROMPTS), torch.Generator().manual_seed(2))
    steps = torch.arange(rollout.response_ids.shape[1])[None]  # [1, T], broadcast over rows
    tailored = policy.distribution(rollout.base_distribution, policy.adapter.head(rollout.hidden), steps)
    base = policy.distribution(rollout.base_distribution, None, steps)
    expected = torch.where(tailored.isfinite(), tailored.exp() * (tailored - base), 0.0).sum(-1) * rollout.response_mask
    kl = policy(rollout, with_kl=True).kl
    assert policy(rollout).kl is None  # computed only when asked for
    assert torch.allclose(kl, expected, atol=1e-5)
    assert (kl >= -1e-6).all() and (kl[rollout.response_mask == 0] == 0).all()
    assert (kl.max() > 0.1) if head_std else (kl.abs().max() < 1e-6)


def test_top_p_of_one_call_samples_as_a_policy_with_that_top_p(policy_factory):
    narrow, wide = (policy_factory(head="zeros", top_p=p, max_new_tokens=8) for p in (0.3, 1.0))
    for policy in (narrow, wide):
        nn.init.normal_(policy.adapter.head.weight, std=5.0, generator=torch.Generator().manual_seed(0))
    prompts = narrow.base.encode(PROMPTS)
    overridden = narrow.sample(prompts, torch.Generator().manual_seed(5), top_p=1.0).response_ids
    assert torch.equal(overridden, wide.sample(prompts, torch.Generator().manual_seed(5)).response_ids)
    assert not torch.equal(overridden, narrow.sample(prompts, torch.Generator().manual_seed(5)).response_ids)


def test_padding_gets_no_mass_and_pad_is_never_sampled(policy_factory):
    policy = policy_factory(head="zeros", max_new_tokens=16)
    pad = policy.pad_id
    assert pad != policy.base.tokenizer.eos_token_id
    direction = torch.randn(policy.adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # in about half the states the adapter wants padding most, then EOS
        policy.adapter.head.weight[pad] = 100 * direction
        policy.adapter.head.weight[policy.base.tokenizer.eos_token_id] = 50 * direction
    rollout = policy.sample(policy.base.encode(PROMPTS * 4), torch.Generator().manual_seed(0))
    real = rollout.response_mask.bool()
    assert not (rollout.response_ids[real] == pad).any()
    assert (rollout.response_ids[~real] == pad).all()
    assert (rollout.logprobs[~real] == 0).all() and (rollout.kl[~real] == 0).all()
    ended = rollout.response_mask.sum(-1) < rollout.response_ids.shape[1]
    assert ended.any()  # some rows stopped at EOS and are padded after it
    lengths = rollout.response_mask.sum(-1)
    assert (rollout.response_ids[ended, lengths[ended] - 1] == policy.base.tokenizer.eos_token_id).all()
    # the masks are prefix masks: no hole after a real token
    assert torch.equal(rollout.response_mask, rollout.response_mask.cummin(-1).values)


def test_min_new_tokens_bans_eos_in_sampling_and_loss(policy_factory):
    policy = policy_factory(head="zeros", max_new_tokens=8, min_new_tokens=4)
    direction = torch.randn(policy.adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # in about half the states the adapter wants EOS above all
        policy.adapter.head.weight[policy.base.tokenizer.eos_token_id] = 100 * direction
    rollout = policy.sample(policy.base.encode(PROMPTS * 4), torch.Generator().manual_seed(0))
    lengths = rollout.response_mask.sum(-1)
    assert lengths.min() == 5  # 4 tokens, then EOS as soon as allowed (as in HF), never before
    assert torch.allclose(policy(rollout).logprobs, rollout.logprobs, atol=1e-4)


def test_the_base_is_frozen(policy_factory):
    policy = policy_factory()
    policy.train()
    assert not any(p.requires_grad for p in policy.base.parameters())
    assert not policy.base.training and not policy.adapter.training
    assert any(p.requires_grad for p in policy.adapter.parameters())
    assert isinstance(policy.adapter.head, nn.Linear) and policy.adapter.head.weight.requires_grad


def test_position_ids_start_at_each_rows_first_token():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


@pytest.mark.parametrize("mode", ["prefix", "every_token"])
def test_control_codes_are_read_by_the_adapter_only_and_never_sampled(policy_factory, mode):
    policy = policy_factory(head="zeros", top_p=0.9, max_new_tokens=8, min_new_tokens=3)
    nn.init.normal_(policy.adapter.head.weight, std=5.0, generator=torch.Generator().manual_seed(0))
    vocabulary = len(policy.base.tokenizer)
    policy.adapter.add_controls(3, mode)
    assert len(policy.base.tokenizer) == vocabulary  # codes are embeddings, not tokens: nothing to sample
    assert policy.adapter.head(torch.zeros(policy.adapter.hidden_size)).shape[-1] == policy.base.vocab_size
    rollout = policy.sample(policy.base.encode(PROMPTS), torch.Generator().manual_seed(3))
    assert rollout.control.tolist() == [0, 0, 0]  # rollouts and inference sample with code 0
    assert (rollout.response_ids < policy.base.vocab_size).all()
    # the base's log-probs are those of prompt + response alone: it never saw the code
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.response_mask], 1)
    base_alone = policy.base.response_logprobs(ids, mask, rollout.prompt_ids.shape[1])
    real = rollout.response_mask.bool()
    assert torch.allclose(rollout.base_distribution[real], base_alone[real], atol=1e-4)
    # the adapter's cached sampling pass and its full-sequence pass agree with the code; another code differs
    assert torch.allclose(policy(rollout).logprobs, rollout.logprobs, atol=1e-4)
    other = policy(rollout._replace(control=torch.tensor([2, 2, 2]))).logprobs
    assert (other - rollout.logprobs)[real].abs().max() > 1e-3


def test_replayed_responses_are_read_by_the_base_in_one_pass(policy_factory):
    policy = policy_factory(head="zeros", max_new_tokens=8)
    nn.init.normal_(policy.adapter.head.weight, std=2.0, generator=torch.Generator().manual_seed(0))
    rollout = policy.sample(policy.base.encode(PROMPTS), torch.Generator().manual_seed(4))
    replayed = Responses(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask, rollout.control)
    with pytest.raises(ValueError, match="not been read by the base"):
        policy(replayed)
    reads, response_logprobs = [], policy.base.response_logprobs
    policy.base.response_logprobs = lambda *args: reads.append(args[0].shape) or response_logprobs(*args)
    fresh = policy(rollout, with_kl=True)
    assert reads == []  # sampled now: the rollout brings the base's distributions
    replayed = policy.read(replayed)
    assert reads == [torch.Size([3, rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1]])]  # one pass of the base
    real = rollout.response_mask.bool()
    assert torch.allclose(replayed.base_distribution[real], rollout.base_distribution[real], atol=1e-4)
    replay = policy(replayed, with_kl=True)
    assert torch.allclose(replay.logprobs, fresh.logprobs, atol=1e-4) and torch.allclose(replay.kl, fresh.kl, atol=1e-4)


def autograd_stats(scores: torch.Tensor, tokens: torch.Tensor, ref_logprobs):
    """log π(y), entropy and exact KL as autograd differentiates them without ``TokenStats`` (the loss's code before it)."""
    logprobs = scores.log_softmax(-1)
    lowest = torch.finfo(torch.float32).min
    entropy = -(logprobs.exp() * logprobs.clamp(min=lowest)).sum(-1)
    kl = kl_divergence(logprobs, ref_logprobs) if ref_logprobs is not None else torch.zeros_like(entropy)
    return logprobs.gather(-1, tokens[:, None]).squeeze(-1), entropy, kl


@pytest.mark.parametrize("support", [None, 5])  # the whole vocabulary, or a top-5 base (−inf elsewhere)
@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_stats_has_autograds_values_and_gradients(support, with_kl, temperature):
    g = torch.Generator().manual_seed(0)
    n, vocab = 8, 64
    base = (3 * torch.randn(n, vocab, generator=g)).log_softmax(-1)
    if support:
        base = base.masked_fill(base < base.topk(support, -1).values[:, -1:], float("-inf"))
    banned = torch.zeros(vocab, dtype=torch.bool)
    banned[[0, 7]] = True  # padding, an early stop token
    adapter = torch.randn(n, vocab, generator=g, requires_grad=True)

    def scores(weight):
        return (base + 1.5 * weight).masked_fill(banned, float("-inf")) / temperature

    ref = (base.masked_fill(banned, float("-inf")) / temperature).log_softmax(-1) if with_kl else None
    tokens = torch.multinomial(scores(adapter).detach().softmax(-1), 1, generator=g).squeeze(-1)

    def run(stats, upstream):
        out = stats(scores(adapter), tokens, ref)
        (grad,) = torch.autograd.grad(sum((w * o).sum() for w, o in zip(upstream, out)), adapter)
        return [o.detach() for o in out], grad

    upstream = 2 * torch.rand(3, n, generator=g) - 1  # loss weights as RL's are: a coefficient over a token count
    (fused, fused_grad), (plain, plain_grad) = run(TokenStats.apply, upstream), run(autograd_stats, upstream)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))  # the same forward computation
    assert torch.allclose(fused_grad, plain_grad, rtol=1e-5, atol=1e-6) and (fused_grad[:, banned] == 0).all()
    # weights ≥ 1 on the entropy: autograd's backward of exp(log π)·clamp(log π) meets (w·lowest = −inf)·0 at tokens of
    # probability 0 and gives NaN; the closed form reads 0 there
    _, plain_grad = run(autograd_stats, 100 * upstream)
    _, fused_grad = run(TokenStats.apply, 100 * upstream)
    assert plain_grad.isnan().any() and fused_grad.isfinite().all()


def test_the_loss_pass_keeps_a_few_bytes_per_token_and_vocabulary_entry(policy_factory):
    """Memory of the update: what autograd keeps for backward over the vocabulary, per real token (Llama-3 scale: V = 128k)."""
    policy = policy_factory(head="zeros", max_new_tokens=6)
    rollout = policy.sample(policy.base.encode(PROMPTS), torch.Generator().manual_seed(0))
    vocab, kept = policy.base.vocab_size, {}
    weights = {p.untyped_storage().data_ptr() for p in policy.parameters()}  # the head's [H, V]: not per token

    def pack(t):
        if t.shape[-1] == vocab and t.untyped_storage().data_ptr() not in weights:  # [n, V] blocks, once per storage
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for with_kl, most in ((True, 9), (False, 5)):  # float32 log π (+ the reference) and the bans' bool mask
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            policy(rollout, with_kl=with_kl)
        assert sum(kept.values()) <= most * int(rollout.response_mask.sum()) * vocab
