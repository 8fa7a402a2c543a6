"""Training-free policies on IPA's protocol (``IPAModule(compare=...)``): DExperts and proxy-tuning computed as their
references compute them, decoded by the lockstep sampler, measured by ``test`` in one table with a column per policy."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import save_tiny_llama
from lightning_ipa import DExperts, LocalBase, ProxyTuning, Sampling, TailoredPolicy
from lightning_ipa.cli import DEFAULT_CONFIG, main
from test_cli import tiny_args

PROMPTS = ["The dog runs", "A child reads a book by", "Write one sentence that uses", "cat"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and two more models of its tokenizer (other seeds), with 0.15× heads: varied samples."""
    root = tmp_path_factory.mktemp("compare")
    paths = []
    for name, seed in [("base", 0), ("expert", 1), ("anti", 2)]:
        save_tiny_llama(root / name, seed=seed)
        model = AutoModelForCausalLM.from_pretrained(root / name)
        with torch.no_grad():
            model.lm_head.weight.mul_(0.15)
        model.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths


def reference_top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``top_k_top_p_filtering`` of DExperts' ``utils/generation_utils.py`` (top-p part), on a copy: sort descending,
    drop tokens once the cumulative probability before them exceeds ``top_p``."""
    logits = logits.clone()
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = 0
    logits[remove.scatter(-1, sorted_indices, remove)] = float("-inf")
    return logits


def next_logits(path: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()


def test_dexperts_and_proxy_tuning_compute_what_their_references_compute(models):
    """DExperts (``generation/dexperts_generation.py``): softmax(top-p-filtered base logits + α(expert − anti-expert)
    logits); proxy-tuning (``DExpertsLlama.generate``): softmax(base + α(tuned − untuned) logits). Both on raw logits, ours
    on log-probs: the same distribution."""
    base_path, expert, anti = models
    base = LocalBase(base_path, dtype="float32")
    prompts = base.encode(PROMPTS)
    raw = {path: next_logits(path, prompts.ids, prompts.mask) for path in models}
    sampling = Sampling(max_new_tokens=4)  # min_new_tokens 1: no stop token as the first (the protocol's ban on the base)
    banned = raw[base_path].index_fill(-1, torch.tensor(base.stop_ids), float("-inf"))
    for policy, reference in [
        (DExperts(expert, anti, alpha=2.0, dtype="float32"), reference_top_p_filter(banned, 0.9) + 2.0 * (raw[expert] - raw[anti])),
        (DExperts(None, anti, alpha=1.5, filter_p=1.0, dtype="float32"), banned + 1.5 * (raw[base_path] - raw[anti])),  # anti-only
        (ProxyTuning(expert, anti, alpha=1.0, dtype="float32"), banned + (raw[expert] - raw[anti])),
    ]:
        combined = policy.policy(base, sampling).base
        logprobs, _ = combined(prompts.ids, prompts.mask, (prompts.mask.cumsum(-1) - 1).clamp(min=0))
        assert torch.equal(logprobs.isfinite(), reference.isfinite())  # the same nucleus of the base
        torch.testing.assert_close(logprobs.exp(), reference.softmax(-1), atol=1e-6, rtol=1e-5)


def test_dexperts_at_alpha_0_and_proxy_tuning_with_equal_models_draw_what_the_base_draws(models):
    base_path, expert, anti = models
    base = LocalBase(base_path, dtype="float32")
    sampling = Sampling(max_new_tokens=12, top_p=0.9)
    alone = TailoredPolicy(base, None, sampling=sampling)
    prompts = alone.encode(PROMPTS)
    same = {"DExperts, α = 0 (the base's 0.9 nucleus, sampled whole)": DExperts(expert, anti, alpha=0.0, dtype="float32"),
            "proxy-tuning, tuned = untuned": ProxyTuning(expert, expert, dtype="float32")}
    steered = DExperts(expert, anti, alpha=2.0, dtype="float32").policy(base, sampling)
    for seed in range(5):
        drawn = alone.generate(prompts, torch.Generator().manual_seed(seed), samples_per_prompt=2)
        for name, policy in same.items():
            theirs = policy.policy(base, sampling).generate(prompts, torch.Generator().manual_seed(seed), samples_per_prompt=2)
            assert torch.equal(theirs.response_ids, drawn.response_ids), (name, seed)
        assert not torch.equal(steered.generate(prompts, torch.Generator().manual_seed(seed), samples_per_prompt=2).response_ids, drawn.response_ids)


def test_test_writes_one_table_with_a_column_per_policy(models, tmp_path):
    base_path, expert, anti = models
    compare = {"model": {"compare": [
        {"class_path": "lightning_ipa.DExperts", "init_args": {"expert": expert, "anti_expert": anti, "alpha": 0.0, "dtype": "float32"}},
        {"class_path": "lightning_ipa.ProxyTuning", "init_args": {"tuned": expert, "untuned": expert, "dtype": "float32"}},
        {"class_path": "lightning_ipa.DExperts", "init_args": {"expert": expert, "anti_expert": anti, "alpha": 2.0, "dtype": "float32",
                                                               "name": "dexperts_2"}},
    ]}}
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(compare))
    args = tiny_args(base_path, tmp_path / "runs", 2, "--model.sampling.max_new_tokens=8", "--model.base.init_args.dtype=float32",
                     "--model.evaluation.init_args.samples_per_prompt=2")
    main(["test", "--config", str(DEFAULT_CONFIG), "--config", str(tmp_path / "compare.yaml"), *args])
    run = tmp_path / "runs" / "quickstart" / "version_0"
    results = json.loads((run / "results.json").read_text())
    policies = ["base", "tailored", "dexperts", "proxy_tuning", "dexperts_2"]
    assert all(list(values) == policies for values in results["metrics"].values())
    header = (run / "results.md").read_text().splitlines()[2]
    assert header == "| metric | " + " | ".join(policies) + " | convention |"
    rows = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(set(row) == {"prompt", *policies} for row in rows)
    # the zero-initialised adapter, DExperts at α = 0 and proxy-tuning with tuned = untuned are the base: the same draws
    for name in ["tailored", "dexperts", "proxy_tuning"]:
        assert [row[name]["responses"] for row in rows] == [row["base"]["responses"] for row in rows], name
        assert results["metrics"]["reward"][name] == results["metrics"]["reward"]["base"]
    assert [row["dexperts_2"]["responses"] for row in rows] != [row["base"]["responses"] for row in rows]


def test_compare_refuses_bad_policies_before_any_work(models, tiny_gpt2_other_vocab, tmp_path):
    base_path, expert, _ = models
    args = ["test", *tiny_args(base_path, tmp_path / "runs", 2)]
    with pytest.raises(ValueError, match=r"does not share the base's vocabulary"):
        main([*args, f"--model.compare=[{{class_path: lightning_ipa.ProxyTuning, init_args: {{tuned: {tiny_gpt2_other_vocab}, untuned: {expert}}}}}]"])
    twice = "{class_path: lightning_ipa.ProxyTuning, init_args: {tuned: %s, untuned: %s}}" % (expert, expert)
    with pytest.raises(ValueError, match=r"names \['proxy_tuning', 'proxy_tuning'\] repeat"):
        main([*args, f"--model.compare=[{twice}, {twice}]"])
    for name in ["base", "tailored", "prompt", "metric", "convention", "my policy", "a/b", ""]:
        with pytest.raises(ValueError, match="is its results column and metric suffix"):
            DExperts(expert, name=name)
    assert not (tmp_path / "runs").exists()


def test_proxy_tuning_gives_a_chat_tuned_model_its_prompt_in_its_chat_format(tmp_path):
    """As proxy-tuning's ``DExpertsLlama`` does for chat experts: the tuned model reads each prompt as a user turn of its
    chat template, base and untuned model the plain prompt; all then read the same response tokens."""
    from model_families import save_tiny_qwen2

    base_path, tuned, untuned = (str(save_tiny_qwen2(tmp_path / name, seed=seed)) for name, seed in [("base", 0), ("tuned", 1), ("untuned", 2)])
    base = LocalBase(base_path, dtype="float32")
    combined = ProxyTuning(tuned, untuned, dtype="float32", tuned_chat_template=True).policy(base, Sampling(max_new_tokens=4)).base
    prompts = base.encode(["The dog runs", "A child reads a book by the"])
    positions = (prompts.mask.cumsum(-1) - 1).clamp(min=0)
    first, caches = combined(prompts.ids, prompts.mask, positions)
    token = first.argmax(-1)  # one response token, read by every model after its own prompt
    mask = torch.cat([prompts.mask, torch.ones_like(prompts.mask[:, :1])], dim=1)
    second, _ = combined(token[:, None], mask, positions[:, -1:] + 1, caches)
    chat = LocalBase(tuned, dtype="float32", chat_template=True).encode(["The dog runs", "A child reads a book by the"])
    for step, combined_logprobs in enumerate([first, second]):
        tail = token[:, None] if step else prompts.ids[:, :0]
        logits = {path: next_logits(path, torch.cat([ids, tail], 1), torch.cat([m, torch.ones_like(tail)], 1))
                  for path, (ids, m) in [(base_path, prompts), (untuned, prompts), (tuned, chat)]}
        base_logits = logits[base_path] if step else logits[base_path].index_fill(-1, torch.tensor(base.stop_ids), float("-inf"))  # min_new_tokens 1
        reference = base_logits + logits[tuned] - logits[untuned]
        torch.testing.assert_close(combined_logprobs.exp(), reference.softmax(-1), atol=1e-6, rtol=1e-5)


def test_dexperts_bans_early_stops_before_taking_the_base_nucleus(tmp_path):
    """A base sure to stop at once has a nucleus of stop tokens only: DExperts bans them first (min_new_tokens), as the
    policy does, rather than letting its ban give way and stopping where the base alone cannot."""
    from model_families import save_tiny_llama as save_family_llama

    base_path, expert, anti = (str(save_family_llama(tmp_path / name, seed=seed, best_token=token))
                               for name, seed, token in [("base", 0, "</s>"), ("expert", 1, None), ("anti", 2, None)])
    base = LocalBase(base_path, dtype="float32")
    sampling = Sampling(max_new_tokens=6, min_new_tokens=3, top_p=0.9)
    prompts = base.encode(PROMPTS)
    first, _ = base(prompts.ids, prompts.mask, (prompts.mask.cumsum(-1) - 1).clamp(min=0))
    assert (first[:, base.stop_ids].exp().sum(-1) > 0.9).all()  # the base's nucleus is its stop tokens
    for policy in [TailoredPolicy(base, None, sampling=sampling), DExperts(expert, anti, alpha=2.0, dtype="float32").policy(base, sampling)]:
        drawn = policy.generate(prompts, torch.Generator().manual_seed(0), samples_per_prompt=4)
        assert (drawn.response_mask.sum(-1) >= 3).all() and not policy.stops[drawn.response_ids[:, :2]].any()


def test_compare_policies_passed_as_objects_stay_out_of_checkpoints(models, tiny_llama):
    """A module built in Python holds its base and compare policies as objects: their weights are not pickled into the
    checkpoint's hyperparameters (the CLI saves their configuration instead)."""
    from lightning_ipa import IPAModule
    from tasks.quickstart import ConceptCoverage

    base_path, expert, anti = models
    module = IPAModule(LocalBase(base_path, dtype="float32"), ConceptCoverage(), compare=[DExperts(expert, anti, dtype="float32")])
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert "compare" not in checkpoint["hyper_parameters"] and "base" not in checkpoint["hyper_parameters"]
    assert checkpoint["hyper_parameters"]["alpha"] == 1.0 and not any(k.startswith("compare.") for k in checkpoint["state_dict"])


def test_a_missing_expert_is_the_base_and_never_gives_nan(models):
    """DExperts' anti-only and expert-only variants reuse the base's own log-probs: with the early-stop ban on the base's
    nucleus, −α · (−inf) must not reach the sum (it gave NaN at the first token). Both missing: α·(base − base) = 0, the
    base's nucleus sampled whole, which is the base alone at top-p 0.9."""
    base_path, expert, anti = models
    base = LocalBase(base_path, dtype="float32")
    sampling = Sampling(max_new_tokens=8, min_new_tokens=2, top_p=0.9)
    alone = TailoredPolicy(base, None, sampling=sampling)
    prompts = alone.encode(PROMPTS)
    for policy in [DExperts(None, anti, dtype="float32"), DExperts(expert, None, dtype="float32"), DExperts(None, None, dtype="float32")]:
        steered = policy.policy(base, sampling)
        first, _ = steered.base(prompts.ids, prompts.mask, (prompts.mask.cumsum(-1) - 1).clamp(min=0))
        assert not first.isnan().any() and (first.isfinite().sum(-1) > 0).all()
        for seed in range(3):
            drawn = steered.generate(prompts, torch.Generator().manual_seed(seed), samples_per_prompt=2)
            assert (drawn.response_mask.sum(-1) >= 2).all()
            if policy.paths == [None, None]:
                assert torch.equal(drawn.response_ids, alone.generate(prompts, torch.Generator().manual_seed(seed), samples_per_prompt=2).response_ids)


def test_a_chat_formatted_model_bounds_the_prompts_by_its_own_count(tmp_path):
    """A tuned model reading the prompt in its chat format reads more tokens than the base: its window, less the
    template's tokens, bounds the prompts (``max_positions``); a prompt that still overflows is refused by name."""
    from model_families import save_tiny_qwen2

    base_path, tuned = (str(save_tiny_qwen2(tmp_path / name, seed=seed, context=context)) for name, seed, context in [("base", 0, 256), ("tuned", 1, 48)])
    base = LocalBase(base_path, dtype="float32")
    proxy = ProxyTuning(tuned, tuned, dtype="float32", tuned_chat_template=True)
    overhead = len(LocalBase(tuned, dtype="float32", chat_template=True).encode([""]).ids[0])
    assert overhead > 2 and proxy.max_positions == min(48 - overhead, 48)
    sampling = Sampling(max_new_tokens=8)
    words = "the cat sleeps on the warm roof " * 6
    with pytest.raises(ValueError, match=r"takes \d+ tokens in the chat format of .* leaves less than max_new_tokens=8 of its 48-token window"):
        proxy.policy(base, sampling).generate(base.encode([words]), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="already does"):
        ProxyTuning(tuned, tuned, dtype="float32", tuned_chat_template=True).check(LocalBase(base_path, dtype="float32", chat_template=True))


def test_a_base_whose_head_is_padded_past_its_tokenizer_steers_with_narrower_models(models, tmp_path):
    """Qwen2.5-7B's head has 152,064 rows, its 0.5B sibling's 151,936, one tokenizer: a model whose head lacks the base's
    padding rows adds 0 there (those ids are no token)."""
    base_path, expert, anti = models
    wide = AutoModelForCausalLM.from_pretrained(base_path)
    wide.resize_token_embeddings(wide.config.vocab_size + 8)
    wide.save_pretrained(tmp_path / "wide")
    AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp_path / "wide")
    base = LocalBase(str(tmp_path / "wide"), dtype="float32")
    proxy = ProxyTuning(expert, anti, dtype="float32")
    proxy.check(base)
    policy = proxy.policy(base, Sampling(max_new_tokens=4))
    drawn = policy.generate(policy.encode(PROMPTS), torch.Generator().manual_seed(0))
    assert drawn.response_mask.sum() > 0
