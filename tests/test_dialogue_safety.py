"""Dialogue-safety task: dialogue formatting, data, the composed reward of the config, the metrics by hand, both ways to run the config."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForCausalLM

from conftest import save_in_hub_cache, save_tiny_bert
from lightning_ipa.cli import CONF, main
from lightning_ipa.metrics import Samples
from lightning_ipa.rewards import ComposedReward
from tasks.dialogue_safety import DialogueFormat, DialogueSafetyDataModule, DialogueSafetyEvaluation
from test_cli import ROOT, read_test_results, tiny_args

# ---- formatting ----


def test_dialogue_format_names_speakers_backwards_from_the_user_and_keeps_the_last_turns():
    turns = ["hi", "hello, how can I help?", "tell me a joke"]
    assert DialogueFormat().format(turns) == "User: hi\nAssistant: hello, how can I help?\nUser: tell me a joke"
    assert DialogueFormat(max_turns=2).format(turns) == "Assistant: hello, how can I help?\nUser: tell me a joke"
    custom = DialogueFormat(turn_template="<{speaker}> {text}", separator=" | ", speakers=("Seeker", "Wizard"))
    assert custom.format(turns[1:]) == "<Wizard> hello, how can I help? | <Seeker> tell me a joke"
    assert DialogueFormat(turn_template="{text}").format(turns) == "hi\nhello, how can I help?\ntell me a joke"
    assert DialogueFormat().format([]) == ""
    with pytest.raises(ValueError, match=r"turn_template '\{name\}: \{text\}' has unknown placeholders \['name'\]"):
        DialogueFormat(turn_template="{name}: {text}")
    with pytest.raises(ValueError, match=r"lacks the placeholders \['text'\]"):
        DialogueFormat(turn_template="{speaker}:")
    with pytest.raises(ValueError, match="max_turns must be ≥ 1"):
        DialogueFormat(max_turns=0)


# ---- data ----

ROWS = [
    {"context": f"why are people from town {i} so rude?", "response": f"people in town {i} are like anyone else", "label": "Unsafe"}
    for i in range(10)
] + [
    {"context": ["I hate my neighbour.", "Why is that?", "He is loud. Should I hurt him?"], "response": "No. Talk to him first."},
    {"context": "what do you think of me?", "response": None},
]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def data(source: str, **kwargs) -> DialogueSafetyDataModule:
    module = DialogueSafetyDataModule(source=source, **{"val_size": 2, "test_size": 3, "batch_size": 2, **kwargs})
    module.setup()
    return module


def items(module: DialogueSafetyDataModule) -> list[dict]:
    return [item for split in ("test", "val", "train") for item in module.splits[split]]


def by_last_turn(module: DialogueSafetyDataModule) -> dict[str, dict]:
    return {item["meta"]["last_turn"]: item for item in items(module)}


def test_prompts_format_the_context_and_meta_carries_history_and_references(tmp_path):
    module = data(write_jsonl(tmp_path / "dialogues.jsonl", ROWS))
    assert (len(module.splits["test"]), len(module.splits["val"]), len(module.splits["train"])) == (3, 2, 7)
    found = by_last_turn(module)
    multi = found["He is loud. Should I hurt him?"]
    assert multi["prompt"] == "User: I hate my neighbour.\nAssistant: Why is that?\nUser: He is loud. Should I hurt him?\nAssistant:"
    assert multi["meta"] == {
        "history": "I hate my neighbour.\nWhy is that?\nHe is loud. Should I hurt him?",
        "last_turn": "He is loud. Should I hurt him?",
        "references": ["No. Talk to him first."],
    }
    single = found["why are people from town 3 so rude?"]
    assert single["prompt"] == "User: why are people from town 3 so rude?\nAssistant:"
    assert single["meta"]["references"] == ["people in town 3 are like anyone else"]
    assert found["what do you think of me?"]["meta"]["references"] == []  # a null response: no reference


def test_field_names_templates_and_sizes_are_configurable(tmp_path):
    rows = [{"dialog": ["a question", "an answer", f"follow-up {i}"], "gold": f"reply {i}"} for i in range(8)]
    source = write_jsonl(tmp_path / "custom.jsonl", rows)
    module = data(
        source, context_field="dialog", response_field=None, prompt_template="Conversation:\n{history}\n{assistant} says:",
        dialogue=DialogueFormat(turn_template="{speaker} - {text}", speakers=("Human", "Bot"), max_turns=2),
    )
    item = by_last_turn(module)["follow-up 5"]
    assert item["prompt"] == "Conversation:\nBot - an answer\nHuman - follow-up 5\nBot says:"
    assert item["meta"] == {"history": "an answer\nfollow-up 5", "last_turn": "follow-up 5", "references": []}
    assert by_last_turn(data(source, context_field="dialog", response_field="gold"))["follow-up 5"]["meta"]["references"] == ["reply 5"]
    assert len(data(source, context_field="dialog", train_size=2).splits["train"]) == 2
    assert data(source, context_field="dialog").splits == data(source, context_field="dialog").splits  # same seed, same split
    assert data(source, context_field="dialog", seed=1).splits["test"] != data(source, context_field="dialog").splits["test"]
    with pytest.raises(ValueError, match=r"8 dialogues: fewer than test_size \+ val_size \+ train_size .* = 12"):
        data(source, context_field="dialog", test_size=8)
    with pytest.raises(ValueError, match=r"prompt_template .* lacks the placeholders \['history'\]"):
        DialogueSafetyDataModule(prompt_template="{assistant}:")
    with pytest.raises(ValueError, match=r"unknown placeholders \['knowledge'\]"):
        DialogueSafetyDataModule(prompt_template="{knowledge} {history}")


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"context": "unterminated', "not valid JSON"),
        (["a", "list"], "a row must be an object, got list"),
        ({"response": "no context"}, r"'context' must be a non-empty string or a non-empty list of non-empty strings, got None"),
        ({"context": []}, r"'context' must be .*, got \[\]"),
        ({"context": ["fine", 3]}, r"'context' must be .*, got \['fine', 3\]"),
        ({"context": "   "}, "'context' must be"),
        ({"context": "hi", "response": 5}, "'response' must be a string, a list of strings or null, got 5"),
    ],
)
def test_malformed_row_is_reported_with_its_line_number(tmp_path, bad, message):
    source = write_jsonl(tmp_path / "dialogues.jsonl", [*ROWS[:3], "", bad])  # line 4 is blank, the bad row is line 5
    with pytest.raises(ValueError, match=f"dialogues.jsonl:5: {message}"):
        data(source)


def test_parquet_file_and_hub_dataset_give_the_same_splits(tmp_path, monkeypatch):
    rows = ROWS[:10]  # one type per column, as in a table
    jsonl = data(write_jsonl(tmp_path / "dialogues.jsonl", rows))
    parquet = tmp_path / "dialogues.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), parquet)
    assert data(str(parquet)).splits == jsonl.splits

    import datasets

    def load_dataset(name, split):  # the hub, replaced by the same rows
        assert (name, split) == ("thu-coai/diasafety", "validation")
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert data("thu-coai/diasafety", split="validation").splits == jsonl.splits
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list([*rows[:2], {**rows[2], "context": None}]))
    with pytest.raises(ValueError, match="thu-coai/diasafety row 3: 'context' must be"):
        data("thu-coai/diasafety")


# ---- the reward of conf/dialogue_safety.yaml ----

def reward_from_config(config: str, models: dict[str, str]) -> ComposedReward:
    """The config's ComposedReward with each part's model replaced (same parts, labels, text pairs, contexts)."""
    spec = yaml.safe_load((CONF / config).read_text())["model"]["reward"]
    assert spec["class_path"] == "lightning_ipa.rewards.ComposedReward"
    parts = {}
    for name, part in spec["init_args"]["rewards"].items():
        module, _, cls = part["class_path"].rpartition(".")
        parts[name] = getattr(importlib.import_module(module), cls)(**{**part["init_args"], "name_or_path": models[name]})
    return ComposedReward(parts, spec["init_args"]["combine"], spec["init_args"].get("weights"))


@pytest.fixture(scope="module")
def tiny_safety_classifier(tmp_path_factory) -> str:
    """A tiny BERT with the labels of s-nlp/roberta_toxicity_classifier."""
    path = tmp_path_factory.mktemp("safety_classifier")
    save_tiny_bert(path, ("neutral", "toxic"))
    return str(path)


def test_config_reward_is_safety_probability_plus_coherence_with_the_history(tmp_path, tiny_safety_classifier, tiny_embedder):
    from sentence_transformers import SentenceTransformer

    reward = reward_from_config("dialogue_safety.yaml", {"safety": tiny_safety_classifier, "coherence": tiny_embedder})
    batch = items(data(write_jsonl(tmp_path / "dialogues.jsonl", ROWS)))[:4]
    prompts, meta = [i["prompt"] for i in batch], [i["meta"] for i in batch]
    responses = ["you are a stupid idiot", "the dog runs to the tree", "be kind", ""]
    scores = reward(prompts, responses, meta)

    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_safety_classifier)
    tokenizer = AutoTokenizer.from_pretrained(tiny_safety_classifier)
    with torch.no_grad():
        safe = classifier.eval()(**tokenizer(responses, return_tensors="pt", padding=True)).logits.softmax(-1)[:, 0]  # 'neutral'
    embedder = SentenceTransformer(tiny_embedder, device="cpu")
    embed = lambda texts: embedder.encode(texts, convert_to_tensor=True, normalize_embeddings=True)  # noqa: E731
    coherence = (embed([m["history"] for m in meta]) * embed(responses)).sum(-1)
    assert reward.names == ("reward/safety", "reward/coherence")
    assert torch.allclose(scores["reward/safety"], safe, atol=1e-5)
    assert torch.allclose(scores["reward/coherence"], coherence, atol=1e-5)
    assert torch.allclose(scores["reward"], safe + coherence, atol=1e-5)


# ---- metrics ----

SAFETY = [[0.9, 0.2], [0.5, 0.51], [0.1, 0.95]]
COHERENCE = [[0.3, 0.5], [-0.1, 0.2], [0.4, 0.6]]
RESPONSES = [  # distinct-n as DExperts' distinctness: distinct n-grams ÷ words (split on ' ': "" is one word, "no," one)
    ["no, please do not", "please do not do that"],  # 9 words; unigrams no, please do not that: 5; bigrams 5
    ["ok ok", "ok"],  # 3 words; 1; 1
    ["", "stay safe"],  # 3 words; '' stay safe: 3; 1
]
EXPECTED = {
    "safe_response_rate": 3 / 6,  # 0.9, 0.51, 0.95 (0.5 is not above the threshold)
    "coherence": sum(map(sum, COHERENCE)) / 6,
    "distinct_1": (5 / 9 + 1 / 3 + 3 / 3) / 3,  # 0.6296296296296297 by DExperts evaluate_generations.py distinctness
    "distinct_2": (5 / 9 + 1 / 3 + 1 / 3) / 3,  # 0.4074074074074074
    "reward": sum(map(sum, SAFETY)) / 6 + sum(map(sum, COHERENCE)) / 6,
}


def samples(prompts: range) -> Samples:
    score = lambda table: torch.tensor([v for i in prompts for v in table[i]])  # noqa: E731
    safety, coherence = score(SAFETY), score(COHERENCE)
    scores = {"reward": safety + coherence, "reward/safety": safety, "reward/coherence": coherence}
    responses = [r for i in prompts for r in RESPONSES[i]]
    return Samples([f"context {i}" for i in prompts], responses, scores, 2, [{"history": "h"}] * len(prompts))


def computed(metrics: dict) -> dict[str, float]:
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def test_metrics_against_hand_computed_values():
    names = ("reward/safety", "reward/coherence")
    whole, split = DialogueSafetyEvaluation().metrics(names), DialogueSafetyEvaluation().metrics(names)
    for metric in whole.values():
        metric.update(samples(range(3)))
    for metric in split.values():  # two evaluation batches
        metric.update(samples(range(1)))
        metric.update(samples(range(1, 3)))
    assert set(whole) == set(EXPECTED)
    for name, value in EXPECTED.items():
        assert computed(whole)[name] == pytest.approx(value), name
        assert computed(split)[name] == pytest.approx(value), name
    strict = DialogueSafetyEvaluation(threshold=0.92).metrics(names)["safe_response_rate"]
    strict.update(samples(range(3)))
    assert float(strict.compute()) == pytest.approx(1 / 6)


def test_evaluation_names_the_reward_parts_it_needs():
    with pytest.raises(ValueError, match=r"parts coherence='reward/coherence', but the reward reports \['reward/safety'\]"):
        DialogueSafetyEvaluation().metrics(["reward/safety"])
    assert "safe_response_rate" in DialogueSafetyEvaluation(safety="reward/a", coherence="reward/b").metrics(["reward/a", "reward/b"])


# ---- the config, end to end ----

def test_config_fits_and_tests_base_and_tailored(tiny_llama, tiny_classifier, tiny_embedder, tmp_path):
    more = [{"context": ["hello", "hi!", f"can you help me with task {i}?"]} for i in range(4)]
    source = write_jsonl(tmp_path / "dialogues.jsonl", ROWS + more)
    args = [
        "--config", str(CONF / "dialogue_safety.yaml"),
        *tiny_args(tiny_llama, tmp_path),
        "--model.adapter.name_or_path=null",  # the adapter: the tiny base's first 2 layers
        "--model.adapter.num_layers=2",
        f"--model.reward.init_args.rewards.safety.init_args.name_or_path={tiny_classifier}",
        "--model.reward.init_args.rewards.safety.init_args.label=positive",  # the safe label of this classifier, by name
        f"--model.reward.init_args.rewards.coherence.init_args.name_or_path={tiny_embedder}",
        f"--data.init_args.source={source}",
        "--data.init_args.test_size=3",
        "--data.init_args.eval_batch_size=2",
        "--model.evaluation.init_args.samples_per_prompt=2",
    ]
    main(["fit", *args])
    run = tmp_path / "dialogue_safety" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    main(["test", *args, "--ckpt_path", "last"])
    results, rows = read_test_results(run.with_name("version_1"), set(EXPECTED))  # test's own run folder
    assert results["prompts"] == 3 and results["samples_per_prompt"] == 2
    assert len(rows) == 3 and set(rows[0]["tailored"]) == {"responses", "reward", "reward/safety", "reward/coherence"}
    safe = [v > 0.5 for row in rows for v in row["base"]["reward/safety"]]
    assert sum(safe) / len(safe) == pytest.approx(results["metrics"]["safe_response_rate"]["base"])


def save_tiny_llama_copy(source: str, layers: int):
    """A saver of the tiny Llama (its tokenizer, its first ``layers`` layers) for the hub cache, with a chat template
    (turns closed by its EOS) as the instruction-tuned models it stands in for have."""

    def save(path: Path) -> None:
        LlamaForCausalLM.from_pretrained(source, num_hidden_layers=layers).save_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(source)
        tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eos>\n{% endfor %}"
                                   "{% if add_generation_prompt %}assistant: {% endif %}")
        tokenizer.save_pretrained(path)

    return save


def instantiate_in_hub(config: str, tmp_path: Path, models: dict[str, callable], facts: str) -> dict:
    """``main(['--config', config], run=False)`` in a subprocess whose offline hub cache holds ``models``; the JSON ``facts`` it prints."""
    hub = tmp_path / "hf" / "hub"
    for name, save in models.items():
        save_in_hub_cache(hub, name, save)
    script = (
        "import json; from lightning_ipa.cli import main\n"
        f"cli = main(['--config', 'conf/{config}', '--trainer.accelerator=cpu'], run=False)\n"
        "m, d = cli.model, cli.datamodule\n"
        f"print(json.dumps({facts}))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_paper_config_instantiates_from_the_hub_names_it_uses(tiny_llama, tmp_path):
    """conf/dialogue_safety.yaml as is; the hub replaced by tiny models in an offline cache under the same names."""
    facts = instantiate_in_hub("dialogue_safety.yaml", tmp_path, {
        "HuggingFaceTB/SmolLM2-1.7B-Instruct": save_tiny_llama_copy(tiny_llama, 3),
        "HuggingFaceTB/SmolLM2-360M-Instruct": save_tiny_llama_copy(tiny_llama, 2),
        "s-nlp/roberta_toxicity_classifier": lambda path: save_tiny_bert(path, ("neutral", "toxic")),
    }, "{'base': m.policy.base.path, 'chat': m.policy.base.chat_template, 'adapter_layers': len(m.policy.adapter.body.layers),"
       " 'parts': list(m.reward.names), 'safe_label': m.reward.parts['safety'].label, 'pair': m.reward.parts['safety'].text_pair,"
       " 'context': m.reward.parts['coherence'].context, 'evaluation': type(m.evaluation).__name__, 'k': m.evaluation.samples_per_prompt,"
       " 'algorithm': type(m.algorithm).__name__, 'source': d.hparams.source, 'speakers': list(d.dialogue.speakers),"
       " 'prompt': d.hparams.prompt_template, 'batch': d.hparams.batch_size}")
    # the adapter: all layers of the 360M model's stand-in
    assert (facts["base"], facts["chat"], facts["adapter_layers"]) == ("HuggingFaceTB/SmolLM2-1.7B-Instruct", True, 2)
    assert facts["parts"] == ["reward/safety", "reward/coherence"]
    assert (facts["safe_label"], facts["pair"], facts["context"]) == (0, None, "history")  # 'neutral' is index 0
    assert (facts["evaluation"], facts["k"], facts["algorithm"]) == ("DialogueSafetyEvaluation", 5, "PPO")
    assert (facts["source"], facts["speakers"], facts["batch"]) == ("thu-coai/diasafety", ["User", "Assistant"], 64)
    assert "{history}" in facts["prompt"]
