"""Knowledge-grounded dialogue task: data (FaithDial and Wizard-of-Wikipedia layouts), the critic + coherence reward of the
config, the metrics by hand, both ways to run the config."""

import math

import pyarrow
import pyarrow.parquet
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import save_tiny_bert
from lightning_ipa.cli import CONF, main
from lightning_ipa.metrics import Samples
from tasks.dialogue_safety import DialogueFormat
from tasks.knowledge_dialogue import KnowledgeDialogueDataModule, KnowledgeDialogueEvaluation
from test_cli import read_test_results, tiny_args
from test_dialogue_safety import instantiate_in_hub, reward_from_config, save_tiny_llama_copy, write_jsonl

# ---- data ----


def faithdial_row(i: int, history: list[str]) -> dict:
    """A row as McGill-NLP/FaithDial gives it: one wizard turn."""
    return {
        "dialog_idx": i, "history": history, "knowledge": f"The cat {i} sleeps on the warm roof.",
        "original_response": "", "response": f"Cat {i} sleeps on the roof, did you know?", "BEGIN": ["Entailment"], "VRM": ["Disclosure"],
    }


ROWS = [faithdial_row(i, ["Do you like cats?", "I do, they are great pets.", f"Where does cat {i} sleep?"]) for i in range(10)] + [
    faithdial_row(10, []),  # the wizard speaks first
]


def data(source: str, **kwargs) -> KnowledgeDialogueDataModule:
    module = KnowledgeDialogueDataModule(source=source, **{"val_size": 2, "test_size": 3, "batch_size": 2, **kwargs})
    module.setup()
    return module


def by_knowledge(module: KnowledgeDialogueDataModule) -> dict[str, dict]:
    return {item["meta"]["knowledge"]: item for split in ("test", "val", "train") for item in module.splits[split]}


def test_faithdial_rows_become_prompts_with_knowledge_history_and_the_gold_response(tmp_path):
    module = data(write_jsonl(tmp_path / "faithdial.jsonl", ROWS))
    assert (len(module.splits["test"]), len(module.splits["val"]), len(module.splits["train"])) == (3, 2, 6)
    found = by_knowledge(module)
    item = found["The cat 4 sleeps on the warm roof."]
    assert item["prompt"] == (
        "Knowledge: The cat 4 sleeps on the warm roof.\n"
        "User: Do you like cats?\nAssistant: I do, they are great pets.\nUser: Where does cat 4 sleep?\nAssistant:"
    )
    assert item["meta"] == {
        "knowledge": "The cat 4 sleeps on the warm roof.",
        "history": "Do you like cats?\nI do, they are great pets.\nWhere does cat 4 sleep?",
        "references": ["Cat 4 sleeps on the roof, did you know?"],
    }
    first = found["The cat 10 sleeps on the warm roof."]  # no history yet
    assert first["prompt"] == "Knowledge: The cat 10 sleeps on the warm roof.\n\nAssistant:" and first["meta"]["history"] == ""
    last_turn_only = DialogueFormat(max_turns=1, speakers=("Seeker", "Wizard"))
    template = "{history}\n[{knowledge}]\n{assistant}:"
    kept = by_knowledge(data(str(tmp_path / "faithdial.jsonl"), dialogue=last_turn_only, prompt_template=template))
    item = kept["The cat 4 sleeps on the warm roof."]
    assert item["prompt"] == "Seeker: Where does cat 4 sleep?\n[The cat 4 sleeps on the warm roof.]\nWizard:"
    assert item["meta"]["history"] == "Where does cat 4 sleep?"
    assert data(str(tmp_path / "faithdial.jsonl")).splits == module.splits  # same seed, same split
    assert data(str(tmp_path / "faithdial.jsonl"), seed=1).splits["test"] != module.splits["test"]
    assert len(data(str(tmp_path / "faithdial.jsonl"), train_size=3).splits["train"]) == 3


def test_wizard_of_wikipedia_layout_through_field_names(tmp_path):
    rows = [
        {"chosen_topic": "Cat", "checked_sentence": {"checked_sentence_cat_0": "Cats are small carnivorous mammals."},
         "context": f"tell me about cats {i}", "labels": [f"Cats are small mammals that eat meat {i}.", "They are carnivores."]}
        for i in range(6)
    ] + [{"chosen_topic": "Dog", "checked_sentence": ["Dogs are", "domesticated wolves."], "context": "and dogs?", "labels": "Tame."}]
    fields = {"knowledge_field": "checked_sentence", "history_field": "context", "response_field": "labels"}
    module = data(write_jsonl(tmp_path / "wow.jsonl", rows), **fields)
    found = {item["meta"]["history"]: item for split in module.splits.values() for item in split}
    assert found["tell me about cats 2"]["meta"] == {
        "knowledge": "Cats are small carnivorous mammals.", "history": "tell me about cats 2",
        "references": ["Cats are small mammals that eat meat 2.", "They are carnivores."],
    }
    assert found["and dogs?"]["meta"]["knowledge"] == "Dogs are domesticated wolves."
    assert found["and dogs?"]["prompt"] == "Knowledge: Dogs are domesticated wolves.\nUser: and dogs?\nAssistant:"
    with pytest.raises(ValueError, match=r"prompt_template .* lacks the placeholders \['knowledge'\]"):
        KnowledgeDialogueDataModule(prompt_template="{history}")


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"knowledge": "unterminated', "not valid JSON"),
        ("3", "a row must be an object, got int"),
        ({"history": [], "response": "r"}, r"'knowledge' must be non-empty text .*, got None"),
        ({"knowledge": {"a": 1}, "history": [], "response": "r"}, r"'knowledge' must be non-empty text"),
        ({"knowledge": "k", "history": ["ok", ""], "response": "r"}, r"'history' must be a string or a list .*, got \['ok', ''\]"),
        ({"knowledge": "k", "history": "hi"}, "'response' must hold the gold response, got None"),
        ({"knowledge": "k", "history": "hi", "response": ["", " "]}, "'response' must hold the gold response"),
        ({"knowledge": "k", "history": "hi", "response": {"text": "r"}}, "'response' must be a string, a list of strings or null"),
    ],
)
def test_malformed_row_is_reported_with_its_line_number(tmp_path, bad, message):
    source = write_jsonl(tmp_path / "faithdial.jsonl", [*ROWS[:3], "", bad])  # line 4 is blank, the bad row is line 5
    with pytest.raises(ValueError, match=f"faithdial.jsonl:5: {message}"):
        data(source)


def test_parquet_file_and_hub_dataset_give_the_same_splits(tmp_path, monkeypatch):
    jsonl = data(write_jsonl(tmp_path / "faithdial.jsonl", ROWS))
    parquet = tmp_path / "faithdial.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), parquet)
    assert data(str(parquet)).splits == jsonl.splits

    import datasets

    def load_dataset(name, split):  # the hub, replaced by the same rows
        assert (name, split) == ("McGill-NLP/FaithDial", "train")
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert data("McGill-NLP/FaithDial").splits == jsonl.splits
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list([*ROWS[:2], {**ROWS[2], "knowledge": ""}]))
    with pytest.raises(ValueError, match="McGill-NLP/FaithDial row 3: 'knowledge' must be non-empty text"):
        data("McGill-NLP/FaithDial")


# ---- the reward of conf/knowledge_dialogue.yaml ----

def test_config_reward_is_the_critics_faithful_probability_plus_coherence_with_the_history(tmp_path, tiny_embedder):
    from sentence_transformers import SentenceTransformer

    critic = tmp_path / "critic"
    save_tiny_bert(critic, ("faithful", "hallucination"))
    reward = reward_from_config("knowledge_dialogue.yaml", {"faithfulness": str(critic), "coherence": tiny_embedder})
    items = [item for split in data(write_jsonl(tmp_path / "faithdial.jsonl", ROWS)).splits.values() for item in split][:4]
    prompts, meta = [i["prompt"] for i in items], [i["meta"] for i in items]
    responses = ["the cat sleeps on the roof", "you are a stupid idiot", "a child reads a book by the river", ""]
    scores = reward(prompts, responses, meta)

    classifier, tokenizer = AutoModelForSequenceClassification.from_pretrained(critic), AutoTokenizer.from_pretrained(critic)
    with torch.no_grad():  # the critic reads (knowledge, response) pairs; label 0 is faithful
        pairs = tokenizer([m["knowledge"] for m in meta], responses, return_tensors="pt", padding=True)
        faithful = classifier.eval()(**pairs).logits.softmax(-1)[:, 0]
    embedder = SentenceTransformer(tiny_embedder, device="cpu")
    embed = lambda texts: embedder.encode(texts, convert_to_tensor=True, normalize_embeddings=True)  # noqa: E731
    coherence = (embed([m["history"] for m in meta]) * embed(responses)).sum(-1)
    assert reward.names == ("reward/faithfulness", "reward/coherence")
    assert torch.allclose(scores["reward/faithfulness"], faithful, atol=1e-5)
    assert torch.allclose(scores["reward/coherence"], coherence, atol=1e-5)
    assert torch.allclose(scores["reward"], faithful + coherence, atol=1e-5)


# ---- metrics ----

FAITHFULNESS = [[0.9, 0.1], [0.5, 0.7], [0.2, 0.4]]
RESPONSES = [["a b c d e f", "x y z w"], ["hello there friend", "hello there"], ["the cat sat", "the cat sat"]]
META = [{"references": ["a b c d e f"]}, {"references": []}, {"references": ["the cat sat down", "a dog ran"]}]  # prompt 1: no reference
# BLEU-4 over the 4 samples with references: clipped matches / n-grams per order: (6+0+3+3)/(6+4+3+3) = 12/16,
# (5+0+2+2)/(5+3+2+2) = 9/12, (4+0+1+1)/(4+2+1+1) = 6/8, (3+0+0+0)/(3+1+0+0) = 3/4; hypothesis length 16,
# closest reference lengths 6+6+3+3 = 18 (for "the cat sat": "a dog ran"), brevity penalty exp(1 − 18/16).
# ROUGE per sample (best reference), averaged: 1, 0, and for "the cat sat" vs "the cat sat down" F1 = 6/7
# (rouge1, rougeL) and 2·1·(2/3)/(1 + 2/3) = 0.8 (rouge2).
EXPECTED = {
    "faithfulness": sum(map(sum, FAITHFULNESS)) / 6,
    "bleu": math.exp(1 - 18 / 16) * 0.75,
    "rouge1": (1 + 0 + 6 / 7 + 6 / 7) / 4,
    "rouge2": (1 + 0 + 0.8 + 0.8) / 4,
    "rougeL": (1 + 0 + 6 / 7 + 6 / 7) / 4,
    "distinct_1": (10 / 10 + 3 / 5 + 3 / 6) / 3,  # DExperts distinctness: distinct n-grams ÷ words (0.7000000000000001)
    "distinct_2": (8 / 10 + 2 / 5 + 2 / 6) / 3,  # 0.5111111111111112
    "reward": sum(map(sum, FAITHFULNESS)) / 6 + 0.25,
}


def samples(prompts: range) -> Samples:
    faithfulness = torch.tensor([v for i in prompts for v in FAITHFULNESS[i]])
    scores = {"reward": faithfulness + 0.25, "reward/faithfulness": faithfulness, "reward/coherence": torch.full_like(faithfulness, 0.25)}
    return Samples([f"p{i}" for i in prompts], [r for i in prompts for r in RESPONSES[i]], scores, 2, [META[i] for i in prompts])


def test_metrics_against_hand_computed_values():
    names = ("reward/faithfulness", "reward/coherence")
    whole, split = KnowledgeDialogueEvaluation().metrics(names), KnowledgeDialogueEvaluation().metrics(names)
    for metric in whole.values():
        metric.update(samples(range(3)))
    for metric in split.values():  # two evaluation batches
        metric.update(samples(range(2)))
        metric.update(samples(range(2, 3)))
    assert set(whole) == set(EXPECTED)
    assert len(list(torch.nn.ModuleDict(whole).children())) == len(EXPECTED)  # no two metrics collide as modules (ROUGE's hash)
    for name, value in EXPECTED.items():
        assert float(whole[name].compute()) == pytest.approx(value, rel=1e-5), name
        assert float(split[name].compute()) == pytest.approx(value, rel=1e-5), name
    with pytest.raises(ValueError, match=r"parts faithfulness='reward/faithfulness', but the reward reports \['reward/coherence'\]"):
        KnowledgeDialogueEvaluation().metrics(["reward/coherence"])


# ---- the config, end to end ----

def test_config_fits_and_tests_base_and_tailored(tiny_llama, tiny_classifier, tiny_embedder, tmp_path):
    rows = [faithdial_row(i, ["Do you like cats?", f"Where does cat {i} sleep?"]) for i in range(14)]
    source = write_jsonl(tmp_path / "faithdial.jsonl", rows)
    args = [
        "--config", str(CONF / "knowledge_dialogue.yaml"),
        *tiny_args(tiny_llama, tmp_path),
        "--model.adapter.name_or_path=null",  # the adapter: the tiny base's first 2 layers
        "--model.adapter.num_layers=2",
        f"--model.reward.init_args.rewards.faithfulness.init_args.name_or_path={tiny_classifier}",
        "--model.reward.init_args.rewards.faithfulness.init_args.label=positive",  # the faithful label of this critic, by name
        f"--model.reward.init_args.rewards.coherence.init_args.name_or_path={tiny_embedder}",
        f"--data.init_args.source={source}",
        "--data.init_args.test_size=3",
        "--data.init_args.eval_batch_size=2",
        "--model.evaluation.init_args.samples_per_prompt=2",
    ]
    main(["fit", *args])
    run = tmp_path / "knowledge_dialogue" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    main(["test", *args, "--ckpt_path", "last"])
    results, rows = read_test_results(run.with_name("version_1"), set(EXPECTED))  # test's own run folder
    assert results["prompts"] == 3 and results["samples_per_prompt"] == 2
    assert len(rows) == 3 and set(rows[0]["base"]) == {"responses", "reward", "reward/faithfulness", "reward/coherence"}
    faithfulness = [v for row in rows for v in row["tailored"]["reward/faithfulness"]]
    assert sum(faithfulness) / len(faithfulness) == pytest.approx(results["metrics"]["faithfulness"]["tailored"], rel=1e-5)


def test_paper_config_instantiates_from_the_hub_names_it_uses(tiny_llama, tmp_path):
    """conf/knowledge_dialogue.yaml as is; the hub replaced by tiny models in an offline cache under the same names."""
    facts = instantiate_in_hub("knowledge_dialogue.yaml", tmp_path, {
        "HuggingFaceTB/SmolLM2-1.7B-Instruct": save_tiny_llama_copy(tiny_llama, 3),
        "HuggingFaceTB/SmolLM2-360M-Instruct": save_tiny_llama_copy(tiny_llama, 2),
        "McGill-NLP/roberta-large-faithcritic": lambda path: save_tiny_bert(path, ("faithful", "hallucination")),
    }, "{'base': m.policy.base.path, 'chat': m.policy.base.chat_template, 'adapter_layers': len(m.policy.adapter.body.layers),"
       " 'parts': list(m.reward.names), 'label': m.reward.parts['faithfulness'].label, 'pair': m.reward.parts['faithfulness'].text_pair,"
       " 'context': m.reward.parts['coherence'].context, 'evaluation': type(m.evaluation).__name__,"
       " 'algorithm': type(m.algorithm).__name__,"
       " 'source': d.hparams.source, 'fields': [d.hparams.knowledge_field, d.hparams.history_field, d.hparams.response_field],"
       " 'max_turns': d.dialogue.max_turns, 'prompt': d.hparams.prompt_template}")
    assert (facts["base"], facts["chat"], facts["adapter_layers"]) == ("HuggingFaceTB/SmolLM2-1.7B-Instruct", True, 2)
    assert facts["parts"] == ["reward/faithfulness", "reward/coherence"]
    assert (facts["label"], facts["pair"], facts["context"]) == (0, "knowledge", "history")
    assert (facts["evaluation"], facts["algorithm"]) == ("KnowledgeDialogueEvaluation", "PPO")
    assert (facts["source"], facts["fields"], facts["max_turns"]) == ("McGill-NLP/FaithDial", ["knowledge", "history", "response"], 4)
    assert "{knowledge}" in facts["prompt"] and "{history}" in facts["prompt"]
