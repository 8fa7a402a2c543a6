"""Metrics against their references: values produced by running the reference's own code on shared inputs.

Every literal below was computed by the function named beside it, run outside this repository on the same
inputs (DExperts: alisawuffles/DExperts; Quark: GXimingLu/Quark; SimCTG: yxuansu/SimCTG; sacrebleu 2.6.0;
rouge-score 0.1.2). None of their code is copied here, only the values it produced.
"""

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from lightning_ipa.evaluation import Perplexity
from lightning_ipa.metrics import BLEU, ROUGE, CorpusDistinctN, DistinctN, Samples, distinct_ratio


def samples(groups: list[list[str]], meta=None) -> Samples:
    """Samples of the responses only: the k responses of each prompt as a group (equal k)."""
    k = len(groups[0])
    return Samples([f"p{i}" for i in range(len(groups))], [text for group in groups for text in group], {}, k, meta or [{}] * len(groups))


def value(metric, *batches: Samples) -> float:
    for batch in batches:
        metric.update(batch)
    return float(metric.compute())


# ---- distinct-n: DExperts scripts/evaluation/evaluate_generations.py `distinctness`, Quark sample.py `distinctness` ----

# 5 prompts × 2 samples: case and punctuation, an empty response and one shorter than n, leading/double/trailing
# spaces, unicode, and words holding '_' (the references join an n-gram's words with '_': "a_b c" and "a b_c" share
# the bigram "a_b_c").
GROUPS = [
    ["the dog saw the dog", "The dog ran."],
    ["", "x"],
    [" leading space", "double  space "],
    ["naïve café", "naïve café!"],
    ["a_b c", "a b_c"],
]
# DExperts `distinctness(generations_df)` (np.nanmean over prompts) on GROUPS; Quark sample.py `distinctness(responses, 2)`
# gives the same three numbers.
DEXPERTS_GROUPS = {1: 0.7892857142857143, 2: 0.41785714285714287, 3: 0.18571428571428572}
DEXPERTS_PER_GROUP = {  # the same function, one prompt at a time
    1: [0.625, 1.0, 0.5714285714285714, 0.75, 1.0],
    2: [0.625, 0.0, 0.7142857142857143, 0.5, 0.25],
    3: [0.5, 0.0, 0.42857142857142855, 0.0, 0.0],
}
# one sample per prompt: ["a b"] (the issue's example: dist-2 0.5), ["dog"], ["x y x y"], [""]
SINGLES = [["a b"], ["dog"], ["x y x y"], [""]]
DEXPERTS_SINGLES = {1: 0.875, 2: 0.25, 3: 0.125}
# Quark utils/utils.py `distinctness(generations)` (main.py's evaluation: all generations together)
QUARK_CORPUS_GROUPS = {1: 0.68, 2: 0.52, 3: 0.28}
QUARK_CORPUS_SINGLES = {1: 0.75, 2: 0.375, 3: 0.25}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_distinct_n_is_dexperts_distinctness(n):
    assert value(DistinctN(n), samples(GROUPS)) == pytest.approx(DEXPERTS_GROUPS[n], abs=1e-7)
    assert value(DistinctN(n), samples(GROUPS[:2]), samples(GROUPS[2:])) == pytest.approx(DEXPERTS_GROUPS[n], abs=1e-7)  # two batches
    for group, expected in zip(GROUPS, DEXPERTS_PER_GROUP[n]):
        assert value(DistinctN(n), samples([group])) == pytest.approx(expected, abs=1e-7), group
    assert value(DistinctN(n), samples(SINGLES)) == pytest.approx(DEXPERTS_SINGLES[n], abs=1e-7)


def test_distinct_n_issue_example_and_the_reward_convention_as_a_named_variant():
    assert value(DistinctN(2), samples([["a b"]])) == 0.5  # DExperts: 1 distinct bigram ÷ 2 words
    old = DistinctN(2, variant="ngram_ratio")  # distinct n-grams ÷ n-grams of lower-cased \w+ words: the Diversity reward's
    assert value(old, samples([["a b"]])) == 1.0
    assert value(DistinctN(2, variant="ngram_ratio"), samples([["the dog saw the dog", "The dog ran."]])) == pytest.approx(4 / 6)
    assert distinct_ratio("the dog saw the dog", 2) == 3 / 4 and distinct_ratio("The dog.", 2) == 1.0  # the rewards' function: unchanged
    assert "DExperts" in DistinctN(2).convention and "2-grams ÷ 2-grams" in old.convention
    with pytest.raises(ValueError, match="n must be ≥ 1"):
        DistinctN(0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_corpus_distinct_n_is_quark_utils_distinctness(n):
    assert value(CorpusDistinctN(n), samples(GROUPS)) == pytest.approx(QUARK_CORPUS_GROUPS[n], abs=1e-7)
    assert value(CorpusDistinctN(n), samples(SINGLES)) == pytest.approx(QUARK_CORPUS_SINGLES[n], abs=1e-7)
    rank0, rank1 = CorpusDistinctN(n), CorpusDistinctN(n)  # DDP: states gathered (hashes, summed word counts), then computed once
    rank0.update(samples(GROUPS[:3]))
    rank1.update(samples(GROUPS[3:]))
    rank0.merge_state(rank1)
    assert float(rank0.compute()) == pytest.approx(QUARK_CORPUS_GROUPS[n], abs=1e-7)


def test_corpus_distinct_n_without_any_generation_is_nan():
    assert math.isnan(float(CorpusDistinctN(2).compute()))  # Quark divides by zero words


# ---- avg max toxicity / toxicity probability: Quark sample.py (inline, no function to call; DExperts' notebook the same) ----

def test_max_toxicity_and_toxicity_probability_leave_missing_scores_out():
    """Quark sample.py: ``max_tox = [[y for y in x if y is not None] ...]; [max(x) for x in max_tox if x]`` and the same for
    ``int(y > 0.5)``: a missing score is left out, and a prompt without any; here NaN is a missing score."""
    from lightning_ipa.metrics import MeanOfMax, ShareOfPromptsAbove

    nan = float("nan")
    toxicity = torch.tensor([0.2, nan, 0.7, nan, nan, nan, 0.4, 0.1, nan])  # 3 prompts × 3 samples; prompt 1 unscored
    batch = Samples(["p0", "p1", "p2"], ["r"] * 9, {"toxicity": toxicity}, 3)
    assert value(MeanOfMax("toxicity"), batch) == pytest.approx((0.7 + 0.4) / 2)  # mean([0.7, 0.4])
    assert value(ShareOfPromptsAbove("toxicity", 0.5), batch) == pytest.approx(1 / 2)  # mean([1, 0])


# ---- BLEU: sacrebleu.corpus_bleu (2.6.0; defaults: 13a tokeniser, case kept, exp smoothing), 4-grams ----

BLEU_CASES = {  # name: (hypotheses, references of each), sacrebleu corpus_bleu(...).score / 100 with smooth_method 'exp', 'none'
    "issue": (["a b c d."], [["a b c d ."]], 1.0000000000000004, 1.0000000000000004),
    "corpus": (
        ["The cat sat on the mat.", "a dog runs", "Naïve café, très bien!", "", "the the the the", "Running dogs jumped over fences."],
        [["The cat sat on a mat.", "A cat is on the mat."], ["a dog runs fast"], ["Naïve café, très bien !"], ["nothing here"],
         ["the cat", "the dog", "the end"], ["The dog runs and jumps over the fence."]],
        0.5000189956696273, 0.5000189956696273,
    ),
    "smoothing": (["the cat sat on a mat", "a dog runs"], [["the cat sat near a mat"], ["a dog runs fast"]], 0.40588416033807634, 0.0),
    "case": (["The Cat sat."], [["the cat sat."]], 0.31947155212313627, 0.0),
}


def with_refs(hypotheses: list[str], references: list[list[str]]) -> Samples:
    return Samples([f"p{i}" for i in range(len(hypotheses))], hypotheses, {}, 1, [{"references": refs} for refs in references])


@pytest.mark.parametrize("case", sorted(BLEU_CASES))
def test_bleu_is_sacrebleu_corpus_bleu(case):
    hypotheses, references, exp, none = BLEU_CASES[case]
    assert value(BLEU(), with_refs(hypotheses, references)) == pytest.approx(exp, abs=1e-6)
    assert value(BLEU(smooth_method="none"), with_refs(hypotheses, references)) == pytest.approx(none, abs=1e-6)
    half = len(hypotheses) // 2
    split = value(BLEU(), with_refs(hypotheses[:half], references[:half]), with_refs(hypotheses[half:], references[half:]))
    assert split == pytest.approx(exp, abs=1e-6)


def test_bleu_convention_and_nothing_to_score():
    assert "13a" in BLEU().convention and "exp" in BLEU().convention
    assert math.isnan(value(BLEU(), Samples(["p"], ["a b"], {}, 1, [{}])))


# ---- ROUGE: rouge_score.rouge_scorer.RougeScorer(...).score_multi(references, prediction).fmeasure, mean over samples ----

ROUGE_CASES = {  # name: (hypotheses, references) as in BLEU_CASES; {key: mean F1} without and with the Porter stemmer
    "corpus": (
        BLEU_CASES["corpus"][:2],
        {"rouge1": 0.5296092796092796, "rouge2": 0.39999999999999997, "rougeL": 0.5296092796092796},
        {"rouge1": 0.6321733821733823, "rouge2": 0.43030303030303024, "rougeL": 0.6065323565323566},
    ),
    "smoothing": (
        BLEU_CASES["smoothing"][:2],
        {"rouge1": 0.8452380952380952, "rouge2": 0.7, "rougeL": 0.8452380952380952},
        {"rouge1": 0.8452380952380952, "rouge2": 0.7, "rougeL": 0.8452380952380952},
    ),
}


@pytest.mark.parametrize("case", sorted(ROUGE_CASES))
@pytest.mark.parametrize("key", ["rouge1", "rouge2", "rougeL"])
def test_rouge_is_rouge_score_without_stemmer(case, key):
    (hypotheses, references), plain, _ = ROUGE_CASES[case]
    assert value(ROUGE(key), with_refs(hypotheses, references)) == pytest.approx(plain[key], abs=1e-6)
    half = len(hypotheses) // 2
    split = value(ROUGE(key), with_refs(hypotheses[:half], references[:half]), with_refs(hypotheses[half:], references[half:]))
    assert split == pytest.approx(plain[key], abs=1e-6)
    assert "no stemmer" in ROUGE(key).convention


@pytest.mark.parametrize("key", ["rouge1", "rouge2", "rougeL"])
def test_rouge_with_stemmer_is_rouge_score_with_stemmer(key):
    (hypotheses, references), _, stemmed = ROUGE_CASES["corpus"]
    assert value(ROUGE(key, use_stemmer=True), with_refs(hypotheses, references)) == pytest.approx(stemmed[key], abs=1e-6)


def test_rouge_without_references_is_nan_and_never_updated_computes():
    metric = ROUGE("rouge1")
    assert math.isnan(value(metric, Samples(["p"], ["a b"], {}, 1, [{}])))
    assert math.isnan(float(ROUGE("rougeL").compute()))


# ---- perplexity: DExperts scripts/evaluation/evaluate_generations.py `conditional_perplexity` (Quark perplexity.py: same) ----

PPL_CORPUS = ["The quick brown fox jumps over the lazy dog.", "A brown owl owns a broom and a brush.",
              "The dog runs to the tree and the cat sleeps on the warm roof."] * 4


def save_reference_gpt2(path: Path) -> Path:
    """A tiny GPT-2 whose weights are a fixed formula (no RNG), with a byte-level BPE whose BOS = EOS = <|endoftext|>, as GPT-2's."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(PPL_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=16, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for i, parameter in enumerate(model.parameters()):
            parameter.copy_((torch.sin(torch.arange(parameter.numel(), dtype=torch.float64) * 0.7 + i) * 0.5).reshape(parameter.shape))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference_gpt2(tmp_path_factory) -> str:
    return str(save_reference_gpt2(tmp_path_factory.mktemp("reference_gpt2")))


# (prompt, continuation) → DExperts conditional_perplexity of a one-row, one-generation frame on save_reference_gpt2's model
# (Quark's perplexity.py gives the same values).
PPL_CASES = [
    ("The quick br", "own fox", 699.6598790103869),  # tokenised together, "br" + "own" is one token: "brown"
    ("The dog runs", " to the tree.", 977.6282172029073),
    ("A brown owl", " owns a broom and a brush.", 405.49279745602985),
    ("The dog", " naïve café", 859.32679998533),  # unicode: byte-level tokens
]


def test_perplexity_is_dexperts_conditional_perplexity(reference_gpt2):
    fluency = Perplexity(reference_gpt2, dtype="float32", batch_size=3)
    prompts, continuations, expected = zip(*PPL_CASES)
    batched = fluency(list(prompts), list(continuations))
    torch.testing.assert_close(batched, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=0)
    one_by_one = torch.cat([fluency([p], [c]) for p, c in zip(prompts, continuations)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=0)  # padding changes nothing
    assert "DExperts" in fluency.convention and "no BOS" in fluency.convention


def test_perplexity_edge_cases(reference_gpt2):
    fluency = Perplexity(reference_gpt2, dtype="float32")
    tokenizer, lm = fluency.tokenizer, fluency.lm
    # no token of its own: "The quick br" + "own" is as many tokens as the prompt (DExperts: x/0 → exp(-inf) = 0.0, kept in its
    # mean), and an empty continuation (DExperts: 0/0 → NaN, dropped): NaN, left out of the mean like the reference's NaN
    values = fluency(["The quick br", "The dog", "The", ""], ["own", "", " cat sleeps", "The dog runs."])
    assert math.isnan(values[0].item()) and math.isnan(values[1].item())
    # a one-token prompt: DExperts returns NaN (HF's mean loss over the prompt's zero predicted tokens); we score the
    # continuation's tokens after it: the reference's formula with the prompt's loss 0. An empty prompt (DExperts fails
    # on it) is read after the BOS (GPT-2: <|endoftext|>, the token it saw before each document): every token is scored.
    for i, ids in ((2, tokenizer("The cat sleeps", add_special_tokens=False)["input_ids"]),
                   (3, [tokenizer.bos_token_id] + tokenizer("The dog runs.", add_special_tokens=False)["input_ids"])):
        with torch.no_grad():
            logprobs = lm(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        nll = -sum(logprobs[j - 1, ids[j]] for j in range(1, len(ids))) / (len(ids) - 1)
        assert values[i].item() == pytest.approx(math.exp(nll), rel=1e-5), i


def test_perplexity_separate_variant_keeps_the_earlier_convention(reference_gpt2):
    joint, separate = Perplexity(reference_gpt2, dtype="float32"), Perplexity(reference_gpt2, dtype="float32", variant="separate")
    tokenizer, lm = separate.tokenizer, separate.lm
    prompt, continuation = "The quick br", "own fox"
    context = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = lm(input_ids=torch.tensor([context + target])).logits[0].log_softmax(-1)
    nll = -sum(logprobs[len(context) + j - 1, t] for j, t in enumerate(target)) / len(target)
    assert separate([prompt], [continuation]).item() == pytest.approx(math.exp(nll), rel=1e-5)
    assert joint([prompt], [continuation]).item() == pytest.approx(699.6598790103869, rel=1e-5)  # what DExperts reports
    assert abs(separate([prompt], [continuation]).item() - 699.6598790103869) > 1.0  # the two conventions differ here


# ---- open-ended diversity: SimCTG simctg/evaluation.py `measure_repetition_and_diversity` (Su et al. 2022) ----

SIMCTG_TEXTS = ["The cat sat on the cat sat on the mat .", "  a b c d e  ", "the the the the the the", "Naïve café, naïve café!", "x y"]
# its `eval_one_instance` counts summed over the texts, n → (unique, total); the reference counts len − n n-grams of a
# text of len words (its loop stops one short), splits on whitespace and keeps case
SIMCTG_COUNTS = {2: (12, 18), 3: (10, 14), 4: (8, 10)}
SIMCTG_DIVERSITY = 0.38097904800000004  # measure_repetition_and_diversity(SIMCTG_TEXTS)[3]: rep-n rounded to 0.01 % first


def test_open_ended_diversity_is_simctg_measure_repetition_and_diversity():
    from tasks.open_ended.metrics import CorpusDiversity

    texts = Samples(["p"] * 5, SIMCTG_TEXTS, {}, 1, [{}] * 5)
    exact = math.prod(unique / total for unique, total in SIMCTG_COUNTS.values())
    assert value(CorpusDiversity(), texts) == pytest.approx(exact, abs=1e-7)
    assert value(CorpusDiversity(), texts) == pytest.approx(SIMCTG_DIVERSITY, abs=1e-4)  # we do not round
    first, rest = Samples(["p"] * 2, SIMCTG_TEXTS[:2], {}, 1, [{}] * 2), Samples(["p"] * 3, SIMCTG_TEXTS[2:], {}, 1, [{}] * 3)
    assert value(CorpusDiversity(), first, rest) == pytest.approx(exact, abs=1e-7)
    # "a b c d": no 4-gram counted, where SimCTG divides by zero: NaN; never updated: NaN
    assert math.isnan(value(CorpusDiversity(), Samples(["p"], ["a b c d"], {}, 1, [{}])))
    assert math.isnan(float(CorpusDiversity().compute()))
    assert "SimCTG" in CorpusDiversity().convention


# ---- results.md and results.json say which convention each number used ----

def test_test_results_write_each_metrics_convention(tmp_path):
    import json
    from types import SimpleNamespace

    from lightning_ipa.callbacks import TestResults

    metrics = {"distinct_2": DistinctN(2), "bleu": BLEU()}
    trainer = SimpleNamespace(
        log_dir=str(tmp_path), default_root_dir=str(tmp_path), world_size=1, global_rank=0, is_global_zero=True, ckpt_path=None,
        strategy=SimpleNamespace(reduce=lambda tensor, reduce_op: tensor),
        callback_metrics={f"test/{name}/{policy}": torch.tensor(0.5) for name in metrics for policy in ("base", "tailored")},
    )
    trainer.callback_metrics["test/bleu/base"] = torch.tensor(float("nan"))  # undefined (e.g. no references)
    evaluation = SimpleNamespace(
        generations=[{"prompt": "p"}], num_samples=lambda stage: 1, policies=lambda stage: ("base", "tailored"),
        stage_metrics=torch.nn.ModuleDict({f"test_{policy}": torch.nn.ModuleDict(metrics) for policy in ("base", "tailored")}),
    )
    module = SimpleNamespace(device=torch.device("cpu"), evaluation=evaluation)
    TestResults().on_test_end(trainer, module)
    def strict(constant):
        raise AssertionError(f"results.json is not standard JSON: {constant}")

    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=strict)
    assert results["metrics"]["bleu"] == {"base": None, "tailored": 0.5}  # NaN written as null
    assert results["conventions"] == {name: metric.convention for name, metric in metrics.items()}
    table = (tmp_path / "results.md").read_text()
    assert "| metric | base | tailored | convention |" in table
    assert DistinctN(2).convention.replace("|", "\\|") in table


def test_bleu_of_empty_hypotheses_is_sacrebleus_zero_not_undefined():
    """sacrebleu ``corpus_bleu(['', ''], [['a b c', 'd e f']]).score`` is 0.0: a policy that says nothing scores 0, not NaN."""
    assert value(BLEU(), samples([[""], [" "]], [{"references": ["a b c"]}, {"references": ["d e f"]}])) == 0.0
    assert math.isnan(value(BLEU(), samples([[""]], [{}])))  # no reference at all: undefined


def test_missing_scores_are_left_out_of_every_mean_and_share():
    """A NaN score is missing (np.nanmean), in the means and shares as in the max-based toxicity metrics."""
    from lightning_ipa.metrics import MeanScore, ShareOfSamplesAbove

    scored = Samples(["p", "q"], ["a", "b", "c", "d"], {"toxicity": torch.tensor([0.2, float("nan"), 0.8, 0.4])}, 2, [{}, {}])
    assert value(MeanScore("toxicity"), scored) == pytest.approx((0.2 + 0.8 + 0.4) / 3)
    assert value(ShareOfSamplesAbove("toxicity", 0.5), scored) == pytest.approx(1 / 3)
