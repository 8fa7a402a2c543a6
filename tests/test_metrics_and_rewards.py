import json
import math

import pytest
import torch

from lightning_ipa import IPAModule, LocalBase
from lightning_ipa.metrics import BLEU, ROUGE, CorpusDistinctN, DistinctN, Samples, ShareOfSamplesAbove, distinct_ratio
from lightning_ipa.rewards import ClassifierReward, CoherenceReward, ComposedReward, PerplexityFluency, Reward
from tasks.concepts import coverage
from tasks.quickstart import ConceptCoverage, ConceptsDataModule


def texts(*responses: str, k: int = 1) -> Samples:
    """Samples of responses only, k per prompt."""
    return Samples([f"p{i}" for i in range(len(responses) // k)], list(responses), {}, k)


def test_distinct_n():
    # the rewards' distinct_ratio: distinct n-grams ÷ n-grams of lower-cased \w+ words (1 − rep-n), unchanged
    assert distinct_ratio("the dog saw the dog", 2) == 3 / 4  # bigrams: the dog ×2, dog saw, saw the
    assert distinct_ratio("The dog.", 2) == 1.0
    assert distinct_ratio("dog", 2) == 0.0
    # DistinctN: DExperts' distinctness (split on ' ', case kept, distinct n-grams ÷ words); tests/test_metric_references.py pins it
    metric = DistinctN(2)
    metric.update(texts("the dog saw the dog", "a b c"))
    metric.update(texts("x"))
    assert torch.isclose(metric.compute(), torch.tensor((3 / 5 + 2 / 3 + 0 / 1) / 3))
    grouped = DistinctN(2)  # k samples of a prompt count together: 5 distinct bigrams ("The dog" ≠ "the dog") over 8 words
    grouped.update(texts("the dog saw the dog", "The dog ran.", k=2))
    assert grouped.compute() == pytest.approx(5 / 8)


def test_corpus_distinct_n_sees_a_shared_template():
    metric = CorpusDistinctN(2)
    metric.update(texts("the dog saw the dog", "The dog ran."))
    assert metric.compute() == pytest.approx(5 / 8)  # the dog, dog saw, saw the, The dog, dog ran. ÷ 8 words
    template = texts("Three words: dog, run and tree.", "Three words: cat, sit and mat.")
    per_text, corpus = DistinctN(2), CorpusDistinctN(2)
    per_text.update(template)
    corpus.update(template)
    assert per_text.compute() == pytest.approx(5 / 6) and corpus.compute() == pytest.approx(9 / 12)  # "Three words:" twice
    rank0, rank1 = CorpusDistinctN(2), CorpusDistinctN(2)  # DDP: states are gathered, then computed once
    rank0.update(texts("the dog saw the dog"))
    rank1.update(texts("The dog ran."))
    rank0.merge_state(rank1)
    assert rank0.compute() == pytest.approx(5 / 8)


def test_coverage_matches_lemmas():
    assert coverage(["run", "dog", "apple"], "The dogs ran past an apple tree.") == 1.0
    assert coverage(["run", "dog", "apple"], "A dog sat.") == pytest.approx(1 / 3)
    assert coverage(["mouse", "swim"], "Two mice were swimming.") == 1.0
    assert coverage(["tree"], "Streets everywhere.") == 0.0  # whole words only


def test_reward_punishes_repetition():
    reward = ConceptCoverage()
    meta = [{"concepts": ["dog", "run", "tree"]}] * 2
    scores = reward(["p", "p"], ["The dog runs to a tree.", "dog run tree dog run tree dog run tree"], meta)
    assert scores["coverage"].tolist() == [1.0, 1.0]
    assert scores["reward"][0] == 1.0
    assert torch.isclose(scores["reward"][1], torch.tensor(3 / 8))  # 8 bigrams, 3 distinct
    penalised = ConceptCoverage(repetition_power=2, repetition_penalty=0.5)
    scores = penalised(["p"] * 3, ["The dog runs to a tree.", "dog run tree dog run tree dog run tree", "the cat saw the cat"], meta[:1] * 3)
    expected = [1.0, (3 / 8) ** 2 - 0.5 * (5 / 8), 0.0 - 0.5 * (1 / 4)]  # the last covers nothing and still pays
    torch.testing.assert_close(scores["reward"], torch.tensor(expected))


def test_concept_splits_are_disjoint_and_seeded():
    dm = ConceptsDataModule(train_size=300, val_size=40, seed=3)
    dm.setup()
    train = {tuple(sorted(i["meta"]["concepts"])) for i in dm.splits["train"]}
    val = {tuple(sorted(i["meta"]["concepts"])) for i in dm.splits["val"]}
    assert len(train) == 300 and len(val) == 40 and not train & val
    again = ConceptsDataModule(train_size=300, val_size=40, seed=3)
    again.setup()
    assert again.splits == dm.splits
    assert "dog" in ConceptsDataModule().item(["dog", "tree"])["prompt"]


def test_predict_file_and_malformed_rows(tmp_path):
    good = tmp_path / "concepts.jsonl"
    good.write_text(json.dumps({"concepts": ["cat", "sing"]}) + "\n\nboat river sail\n")
    dm = ConceptsDataModule(predict_file=str(good))
    dm.setup()
    assert [i["meta"]["concepts"] for i in dm.splits["predict"]] == [["cat", "sing"], ["boat", "river", "sail"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('boat river\n{"concept": ["x"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        ConceptsDataModule(predict_file=str(bad)).setup()
    with pytest.raises(ValueError, match="template must contain"):
        ConceptsDataModule(template="no placeholder")


def test_missing_eos_penalty_lowers_the_training_reward_of_unfinished_responses(tiny_llama):
    module = IPAModule(LocalBase(tiny_llama, dtype="float32"), ConceptCoverage(), missing_eos_penalty=0.5)
    eos, pad, word = module.policy.base.tokenizer.eos_token_id, module.policy.pad_id, 5
    rollout = module.policy.sample(module.policy.base.encode(["a", "b"]), torch.Generator().manual_seed(0))
    rollout = rollout._replace(response_ids=torch.tensor([[word, eos, pad], [word, word, word]]), response_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert module.ended(rollout).tolist() == [True, False]
    torch.testing.assert_close(module.shaped_reward(rollout, torch.tensor([0.8, 0.8])), torch.tensor([0.8, 0.3]))


# ---- generic rewards and reference metrics (used by several tasks) ----

class Fixed(Reward):
    """A reward with known scores, and one part."""

    names = ("part",)

    def __init__(self, values: list[float]):
        self.values = torch.tensor(values)

    def __call__(self, prompts, responses, meta):
        return {"reward": self.values, "part": self.values * 10}


def test_composed_reward_sums_or_multiplies_named_parts_and_reports_each():
    parts = {"a": Fixed([0.5, 1.0]), "b": Fixed([0.2, 0.4])}
    summed = ComposedReward(parts, "sum", {"a": 2.0})
    scores = summed(["p", "p"], ["x", "y"], [{}, {}])
    assert summed.names == ("reward/a", "reward/a/part", "reward/b", "reward/b/part")
    assert torch.allclose(scores["reward"], torch.tensor([2 * 0.5 + 0.2, 2 * 1.0 + 0.4]))
    assert torch.allclose(scores["reward/b"], torch.tensor([0.2, 0.4])) and torch.allclose(scores["reward/a/part"], torch.tensor([5.0, 10.0]))
    product = ComposedReward(parts, "product", {"b": 0.5})
    assert torch.allclose(product(["p", "p"], ["x", "y"], [{}, {}])["reward"], torch.tensor([0.5 * 0.2**0.5, 1.0 * 0.4**0.5]))
    with pytest.raises(ValueError, match=r"weights for unknown rewards \['c'\]"):
        ComposedReward(parts, weights={"c": 1.0})


def test_classifier_reward_is_the_probability_of_the_chosen_label(tiny_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(tiny_classifier), AutoTokenizer.from_pretrained(tiny_classifier)
    prompts, responses, meta = ["the dog runs", "a child reads"], ["you are nice", "the cat sleeps"], [{"knowledge": "a cat"}, {"knowledge": "a book"}]
    with torch.no_grad():
        alone = model(**tokenizer(responses, return_tensors="pt", padding=True)).logits.softmax(-1)
        paired = model(**tokenizer([m["knowledge"] for m in meta], responses, return_tensors="pt", padding=True)).logits.softmax(-1)
    by_name = ClassifierReward(tiny_classifier, label="positive", batch_size=1)
    assert torch.allclose(by_name(prompts, responses, meta)["reward"], alone[:, 1], atol=1e-6)
    assert torch.allclose(ClassifierReward(tiny_classifier, label=0)(prompts, responses, meta)["reward"], alone[:, 0], atol=1e-6)
    with_knowledge = ClassifierReward(tiny_classifier, label="positive", text_pair="knowledge")
    assert torch.allclose(with_knowledge(prompts, responses, meta)["reward"], paired[:, 1], atol=1e-6)
    assert not any(p.requires_grad for p in by_name.parameters())
    with pytest.raises(ValueError, match=r"label 'safe' is not one of .* labels \['negative', 'positive'\]"):
        ClassifierReward(tiny_classifier, label="safe")
    with pytest.raises(ValueError, match="label index 2 is out of range"):
        ClassifierReward(tiny_classifier, label=2)


def test_coherence_reward_is_the_cosine_of_sentence_embeddings(tiny_embedder):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_embedder, device="cpu")
    prompts, responses, meta = ["the dog runs", "a child reads a book"], ["the dog sleeps", "the river"], [{"history": "a cat"}, {"history": "the tree"}]
    cosine = lambda a, b: torch.nn.functional.cosine_similarity(model.encode(a, convert_to_tensor=True), model.encode(b, convert_to_tensor=True))  # noqa: E731
    assert torch.allclose(CoherenceReward(tiny_embedder)(prompts, responses, meta)["reward"], cosine(prompts, responses), atol=1e-5)
    with_history = CoherenceReward(tiny_embedder, context="history")(prompts, responses, meta)["reward"]
    assert torch.allclose(with_history, cosine([m["history"] for m in meta], responses), atol=1e-5)


def test_bleu_and_rouge_against_references_skip_prompts_without_them():
    from torchmetrics.functional.text import bleu_score, rouge_score

    references = [{"references": ["the cat sat on a mat", "a cat on the mat"]}, {}, {"references": "a dog runs"}]
    batch = Samples(["p0", "p1", "p2"], ["the cat sat on the mat", "a cat", "x", "y", "dog runs", "the dog ran"], {}, 2, references)
    kept, refs = ["the cat sat on the mat", "a cat", "dog runs", "the dog ran"], [references[0]["references"]] * 2 + [["a dog runs"]] * 2
    bleu = BLEU(n_gram=2)
    bleu.update(batch)
    assert bleu.compute() == pytest.approx(float(bleu_score(kept, refs, n_gram=2)))
    for key in ("rouge1", "rouge2", "rougeL"):
        rouge = ROUGE(key)
        rouge.update(batch)
        assert rouge.compute() == pytest.approx(float(rouge_score(kept, refs, rouge_keys=key)[f"{key}_fmeasure"]))
    no_references = BLEU()
    no_references.update(Samples(["p"], ["a b c d"], {}, 1, [{}]))
    assert torch.isnan(no_references.compute())
    rouges = torch.nn.ModuleDict({key: ROUGE(key) for key in ("rouge1", "rouge2", "rougeL")})
    assert len(list(rouges.modules())) == 4  # three distinct modules (torchmetrics' own hash made them one)
    share = ShareOfSamplesAbove("safe", 0.5)
    share.update(Samples(["p"], ["a", "b", "c", "d"], {"safe": torch.tensor([0.9, 0.5, 0.6, 0.1])}, 4))
    assert share.compute() == pytest.approx(0.5)


def test_perplexity_fluency_maps_log_perplexity_to_zero_one(tiny_llama):
    fluency = PerplexityFluency(tiny_llama, max_perplexity=100.0, dtype="float32")
    prompts, responses = ["The dog runs", "The cat", "A child"], [" to the tree.", "", " reads a book by the river."]
    perplexity = fluency.perplexity(prompts, responses)
    scores = fluency(prompts, responses, [{}] * 3)
    expected = (1 - perplexity.log() / math.log(100.0)).clamp(0, 1)
    assert torch.allclose(scores["reward"][[0, 2]], expected[[0, 2]]) and scores["reward"][1] == 0  # empty: 0
    assert torch.allclose(scores["perplexity"][[0, 2]], perplexity[[0, 2]])
    with pytest.raises(ValueError, match="max_perplexity must be > 1"):
        PerplexityFluency(tiny_llama, max_perplexity=1.0)


def test_evaluations_expose_the_metric_conventions_as_options():
    """The second conventions (``DistinctN`` variant, ROUGE's stemmer) are reachable from YAML through each task's evaluation."""
    from lightning_ipa.evaluation import Evaluation
    from tasks.commongen.metrics import CommonGenEvaluation
    from tasks.dialogue_safety.metrics import DialogueSafetyEvaluation
    from tasks.knowledge_dialogue.metrics import KnowledgeDialogueEvaluation
    from tasks.toxicity.metrics import ToxicityEvaluation

    assert Evaluation().metrics(())["distinct_2"].variant == "dexperts"
    assert Evaluation(distinct_variant="ngram_ratio").metrics(())["distinct_2"].variant == "ngram_ratio"
    toxicity = ToxicityEvaluation(distinct_variant="ngram_ratio").metrics(("toxicity",))
    assert {toxicity[f"distinct_{n}"].variant for n in (1, 2, 3)} == {"ngram_ratio"}
    safety = DialogueSafetyEvaluation(distinct_variant="ngram_ratio").metrics(("reward/safety", "reward/coherence"))
    assert safety["distinct_2"].variant == "ngram_ratio"
    commongen = CommonGenEvaluation(rouge_stemmer=True).metrics(("reward/coverage", "reward/fluency"))
    assert commongen["rougeL"].use_stemmer and "Porter stemmer" in commongen["rougeL"].convention
    dialogue = KnowledgeDialogueEvaluation(rouge_stemmer=True, distinct_variant="ngram_ratio").metrics(("reward/faithfulness",))
    assert dialogue["rouge1"].use_stemmer and dialogue["distinct_1"].variant == "ngram_ratio"
    assert not CommonGenEvaluation().metrics(("reward/coverage", "reward/fluency"))["rouge2"].use_stemmer
