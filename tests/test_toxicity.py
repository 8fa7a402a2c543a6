"""Toxicity task: data, rewards, the evaluation protocol's metrics (also under DDP) and both configs."""

import json
import math
import os
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from conftest import save_in_hub_cache, save_tiny_bert, tiny_gpt2_saver, train_tokenizer
from lightning_ipa.cli import CONF, main
from lightning_ipa.evaluation import Perplexity
from lightning_ipa.metrics import Samples
from tasks.toxicity import DetoxifyReward, ProfanityReward, RealToxicityPromptsDataModule, ToxicityEvaluation
from test_cli import ROOT, read_test_results, tiny_args

# 3 prompts × 4 samples with known scores
TOXICITY = [[0.1, 0.6, 0.2, 0.3], [0.05, 0.1, 0.2, 0.4], [0.9, 0.95, 0.2, 0.1]]
PERPLEXITY = [[10.0, 20.0, 1e4, float("nan")], [30.0, 40.0, 2e4, 50.0], [60.0, 70.0, 80.0, 90.0]]
RESPONSES = [  # distinct-n as DExperts' distinctness: distinct n-grams ÷ words (split on ' ': "" is one word)
    ["a b", "a b", "a c", "d"],  # 7 words; unigrams a b c d: 4; bigrams a b, a c: 2; no trigram
    ["x y z", "x y z", "x y z", "x y z"],  # 12 words; 3; 2; 1
    ["", "q", "q r", "r q"],  # 6 words; unigrams '' q r: 3; bigrams q r, r q: 2; no trigram
]
EXPECTED = {
    "avg_max_toxicity": (0.6 + 0.4 + 0.95) / 3,
    "toxicity_probability": 2 / 3,  # prompts 1 and 3 have a sample above 0.5
    "toxicity": sum(map(sum, TOXICITY)) / 12,
    "reward": 1 - sum(map(sum, TOXICITY)) / 12,
    "distinct_1": (4 / 7 + 3 / 12 + 3 / 6) / 3,  # 0.44047619047619047, DExperts evaluate_generations.py distinctness
    "distinct_2": (2 / 7 + 2 / 12 + 2 / 6) / 3,  # 0.26190476190476186
    "distinct_3": (0 + 1 / 12 + 0) / 3,  # 0.027777777777777776: a prompt without trigrams counts 0
    "perplexity": (10 + 20 + 30 + 40 + 50 + 60 + 70 + 80 + 90) / 9,  # ≥ 1e4 and NaN left out
}


def samples(prompts: range) -> Samples:
    """The known samples of some of the 3 prompts."""
    score = lambda table: torch.tensor([v for i in prompts for v in table[i]])  # noqa: E731
    toxicity = score(TOXICITY)
    return Samples([f"prompt {i}" for i in prompts], [r for i in prompts for r in RESPONSES[i]],
                   {"toxicity": toxicity, "reward": 1 - toxicity, "perplexity": score(PERPLEXITY)}, 4)


def toxicity_metrics() -> dict:
    evaluation = ToxicityEvaluation()
    evaluation.fluency = torch.nn.Identity()  # only the metric's presence matters here, not the LM
    return evaluation.metrics(["toxicity"])


def computed(metrics: dict) -> dict[str, float]:
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def test_toxicity_metrics_against_hand_computed_values():
    whole, split = toxicity_metrics(), toxicity_metrics()
    for metric in whole.values():
        metric.update(samples(range(3)))
    for metric in split.values():  # two evaluation batches: prompt 0, then prompts 1 and 2
        metric.update(samples(range(1)))
        metric.update(samples(range(1, 3)))
    assert set(whole) == set(EXPECTED)
    for name, value in EXPECTED.items():
        assert computed(whole)[name] == pytest.approx(value), name
        assert computed(split)[name] == pytest.approx(value), name


def ddp_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    metrics = toxicity_metrics()
    for metric in metrics.values():  # rank 0 sees prompt 0, rank 1 prompts 1 and 2
        metric.update(samples(range(1) if rank == 0 else range(1, 3)))
    values = computed(metrics)  # compute() gathers the states of both ranks
    Path(out).with_suffix(f".{rank}.json").write_text(json.dumps(values))
    dist.destroy_process_group()


def test_metrics_synced_over_two_processes_equal_the_single_process_result(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(port, str(tmp_path / "values")), nprocs=2)
    single = toxicity_metrics()
    for metric in single.values():
        metric.update(samples(range(3)))
    for rank in (0, 1):
        synced = json.loads((tmp_path / f"values.{rank}.json").read_text())
        assert synced == pytest.approx(computed(single)), rank


def test_toxicity_evaluation_needs_a_toxicity_score():
    with pytest.raises(ValueError, match="reports 'toxicity'"):
        ToxicityEvaluation().metrics(["coverage"])


# ---- data ----

def rtp_row(text: str, toxicity, challenging: bool = False) -> dict:
    return {"filename": "x", "begin": 0, "end": 1, "challenging": challenging, "prompt": {"text": text, "toxicity": toxicity, "profanity": 0.1}}


ROWS = [rtp_row(f"clean {i}", 0.1) for i in range(10)] + [
    rtp_row("toxic", 0.7), rtp_row("borderline", 0.5), rtp_row("unscored", None), rtp_row("hard 1", 0.2, True), rtp_row("hard 2", 0.9, True),
]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def data(source: str, **kwargs) -> RealToxicityPromptsDataModule:
    module = RealToxicityPromptsDataModule(source=source, **{"val_size": 2, "test_size": 3, "batch_size": 2, **kwargs})
    module.setup()
    return module


def texts(module, split: str) -> list[str]:
    return [item["prompt"] for item in module.splits[split]]


def test_data_filters_and_seeded_splits(tmp_path):
    source = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    nontoxic = data(source)  # default: toxicity < 0.5, unscored prompts dropped
    kept = [t for split in ("test", "val", "train") for t in texts(nontoxic, split)]
    assert sorted(kept) == sorted([f"clean {i}" for i in range(10)] + ["hard 1"])
    assert (len(nontoxic.splits["test"]), len(nontoxic.splits["val"]), len(nontoxic.splits["train"])) == (3, 2, 6)
    assert nontoxic.splits["test"][0]["meta"].keys() == {"prompt_toxicity", "challenging"}
    assert texts(data(source), "test") == texts(nontoxic, "test")  # same seed, same split
    assert texts(data(source, seed=1), "test") != texts(nontoxic, "test")
    assert len(data(source, train_size=4).splits["train"]) == 4
    everything = data(source, max_prompt_toxicity=None)
    assert len(everything.splits["train"]) == len(ROWS) - 5
    hard = data(source, max_prompt_toxicity=None, challenging_only=True, val_size=0, test_size=0)
    assert sorted(texts(hard, "train")) == ["hard 1", "hard 2"]
    with pytest.raises(ValueError, match="11 of 15 prompts pass the filters.*: fewer than"):
        data(source, test_size=10)


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"prompt": {"text": "unterminated"', "not valid JSON"),
        ({"prompt": "just a string"}, "'prompt' must be an object with a non-empty 'text'"),
        ({"prompt": {"text": "t", "toxicity": 3}}, r"'prompt.toxicity' must be a number in \[0, 1\]"),
        ({"prompt": {"text": "t", "toxicity": 0.1}, "challenging": "yes"}, "'challenging' must be true or false"),
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
        assert (name, split) == ("allenai/real-toxicity-prompts", "train")
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert data("allenai/real-toxicity-prompts").splits == jsonl.splits

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="could not load the hub dataset 'allenai/real-toxicity-prompts'.*--data.init_args.source PATH"):
        data("allenai/real-toxicity-prompts")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([*ROWS[:2], {"prompt": {"text": "", "toxicity": 0.1}}]), parquet)
    with pytest.raises(ValueError, match="prompts.parquet row 3: 'prompt' must be"):
        data(str(parquet))
    with pytest.raises(ValueError, match="expected a .jsonl, .json .* or .parquet file, or a hub dataset name"):
        data(str(tmp_path / "prompts.csv"))


# ---- rewards ----

def save_tiny_detoxify(folder: Path, classes=("toxic", "severe_toxic", "insult"), model_type: str | None = None) -> Path:
    """A tiny random BERT in Detoxify's checkpoint format; the folder holds its config and tokenizer."""
    model = save_tiny_bert(folder, classes)
    arch = {"model_type": model_type or str(folder), "model_name": "BertForSequenceClassification", "tokenizer_name": "BertTokenizer", "num_classes": len(classes)}
    checkpoint = folder / "detoxify.ckpt"
    torch.save({"config": {"arch": {"args": arch}, "dataset": {"args": {"classes": list(classes)}}}, "state_dict": model.state_dict()}, checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory) -> Path:
    return save_tiny_detoxify(tmp_path_factory.mktemp("detoxify"))


def test_detoxify_reward_scores_with_the_chosen_head(tiny_detoxify):
    texts = ["you are a stupid idiot", "have a great day", ""]
    reward = DetoxifyReward(checkpoint=str(tiny_detoxify), huggingface_config_path=str(tiny_detoxify.parent), batch_size=2)
    classifier = BertForSequenceClassification(BertConfig.from_pretrained(tiny_detoxify.parent))
    classifier.load_state_dict(torch.load(tiny_detoxify)["state_dict"])
    tokenizer = BertTokenizer.from_pretrained(tiny_detoxify.parent)
    with torch.no_grad():
        logits = classifier.eval()(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    scores = reward(["p"] * 3, texts, [{}] * 3)
    assert torch.allclose(scores["toxicity"], logits[:, 0].sigmoid(), atol=1e-6)  # 'toxic' is renamed 'toxicity'
    assert torch.allclose(scores["reward"], 1 - scores["toxicity"])
    insult = DetoxifyReward(checkpoint=str(tiny_detoxify), huggingface_config_path=str(tiny_detoxify.parent), head="insult")
    assert torch.allclose(insult(["p"] * 3, texts, [{}] * 3)["toxicity"], logits[:, 2].sigmoid(), atol=1e-6)
    assert not any(p.requires_grad for p in reward.parameters()) and not reward.train().training
    with pytest.raises(ValueError, match=r"head 'obscene' is not an output.*\['toxicity', 'severe_toxicity', 'insult'\]"):
        DetoxifyReward(checkpoint=str(tiny_detoxify), huggingface_config_path=str(tiny_detoxify.parent), head="obscene")


def test_detoxify_reward_offline_says_how_to_pass_a_local_checkpoint(monkeypatch, tmp_path):
    def no_network(url, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(RuntimeError, match="Detoxify's released 'unbiased' weights.*checkpoint=FILE.*huggingface_config_path=DIR"):
        DetoxifyReward("unbiased")
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.ckpt"):
        DetoxifyReward(checkpoint=str(tmp_path / "missing.ckpt"))


def test_profanity_reward_uses_the_shipped_model():
    scores = ProfanityReward()(["p", "p"], ["you are a fucking idiot", "have a nice day"], [{}, {}])
    assert scores["toxicity"][0] > 0.9 and scores["toxicity"][1] < 0.5
    assert torch.allclose(scores["reward"], 1 - scores["toxicity"])


def test_perplexity_of_the_continuation_given_the_prompt(tiny_llama):
    fluency = Perplexity(tiny_llama, dtype="float32", batch_size=2)
    prompts, continuations = ["The dog runs", "A child reads a book by", "The cat"], [" to the tree.", " the river.", ""]
    batched = fluency(prompts, continuations)
    tok, lm = fluency.tokenizer, fluency.lm
    for i in range(2):  # by hand, one at a time: exp(mean NLL of the continuation's tokens)
        context, target = tok(prompts[i], add_special_tokens=False)["input_ids"], tok(continuations[i], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + target])
        with torch.no_grad():
            logprobs = lm(input_ids=ids).logits[0].log_softmax(-1)
        nll = -sum(logprobs[len(context) + j - 1, t] for j, t in enumerate(target)) / len(target)
        assert batched[i].item() == pytest.approx(math.exp(nll), rel=1e-4)
    assert math.isnan(batched[2].item())  # nothing to score


# ---- configs ----

def test_offline_config_fits_and_tests_base_and_tailored(tiny_llama, tiny_detoxify, tmp_path):
    args = [
        "--config", str(CONF / "toxicity_offline.yaml"),
        *tiny_args(tiny_llama, tmp_path),
        "--model.sampling.min_new_tokens=6",
        "--data.init_args.source", str(ROOT / "tasks" / "toxicity" / "offline_prompts.jsonl"),
        "--data.init_args.test_size=5",
        "--data.init_args.eval_batch_size=2",
        "--model.evaluation.init_args.samples_per_prompt=3",
        f"--model.evaluation.init_args.fluency.name_or_path={tiny_llama}",
        "--model.reward=tasks.toxicity.DetoxifyReward",
        f"--model.reward.checkpoint={tiny_detoxify}",
        f"--model.reward.huggingface_config_path={tiny_detoxify.parent}",
    ]
    main(["fit", *args])
    run = tmp_path / "toxicity_offline"
    checkpoint = torch.load(run / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(k.startswith(("reward.", "evaluation.", "policy.base.")) for k in checkpoint["state_dict"])
    main(["test", *args, "--ckpt_path", "last"])
    results, rows = read_test_results(run / "version_1", set(EXPECTED))  # test's own run folder
    assert results["prompts"] == 5 and results["samples_per_prompt"] == 3
    assert "| avg_max_toxicity |" in (run / "version_1" / "results.md").read_text()
    assert len(rows) == 5 and set(rows[0]) == {"prompt", "tailored", "base"}
    assert set(rows[0]["base"]) == {"responses", "reward", "toxicity", "perplexity"} and len(rows[0]["base"]["responses"]) == 3
    # the file's per-prompt maxima give the logged average max toxicity
    maxima = sum(max(row["tailored"]["toxicity"]) for row in rows) / len(rows)
    assert maxima == pytest.approx(results["metrics"]["avg_max_toxicity"]["tailored"], rel=1e-5)


def serve_paper_models(tmp_path: Path, tokenizer) -> dict[str, str]:
    """The environment in which conf/toxicity.yaml's downloads come from local caches: tiny GPT-2s (``tokenizer``) under
    the hub names it uses, a tiny Detoxify checkpoint where torch.hub keeps the released one."""
    hub, torch_home = tmp_path / "hf" / "hub", tmp_path / "torch"
    for name, layers in [("gpt2-large", 3), ("gpt2", 2), ("gpt2-xl", 1)]:
        save_in_hub_cache(hub, name, tiny_gpt2_saver(tokenizer, layers, n_positions=64))
    save_in_hub_cache(hub, "bert-base-uncased", lambda path: save_tiny_detoxify(path))
    released = torch_home / "hub" / "checkpoints" / "toxic_original-c1212f89.ckpt"  # where torch.hub keeps the download
    released.parent.mkdir(parents=True)
    (hub / "models--bert-base-uncased" / "snapshots" / ("0" * 40) / "detoxify.ckpt").rename(released)
    checkpoint = torch.load(released, weights_only=False)
    checkpoint["config"]["arch"]["args"]["model_type"] = "bert-base-uncased"  # as in the released file: a hub name
    torch.save(checkpoint, released)
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(torch_home)}


def printed_facts(script: str, cwd: Path, env: dict[str, str]) -> dict:
    """Run ``script`` in a fresh Python (in ``cwd``, with ``env``) and read the JSON it prints last."""
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_paper_config_instantiates_with_downloads_served_from_local_caches(tmp_path):
    """conf/toxicity.yaml as is; the hub and Detoxify's download replaced by tiny models already in their caches."""
    env = serve_paper_models(tmp_path, train_tokenizer(300, ["<eos>", "<pad>"]))
    script = (
        "import json; from lightning_ipa.cli import main\n"
        "cli = main(['--config', 'conf/toxicity.yaml', '--trainer.accelerator=cpu'], run=False)\n"
        "m, d = cli.model, cli.datamodule\n"
        "print(json.dumps({'base': m.policy.base.path, 'base_layers': m.policy.base.lm.config.n_layer, 'adapter_layers': len(m.policy.adapter.body.h),"
        " 'reward': type(m.reward).__name__, 'heads': m.reward.head_index, 'fluency': m.evaluation.fluency.lm.config.n_layer,"
        " 'k': m.evaluation.samples_per_prompt, 'algorithm': type(m.algorithm).__name__, 'kl': round(float(m.algorithm.kl_loss_coef), 6),"
        " 'source': d.hparams.source, 'batch': d.hparams.batch_size, 'top_p': m.hparams.rollout_top_p, 'lr': m.hparams.lr}))\n"
    )
    facts = printed_facts(script, ROOT, env)
    assert (facts["base"], facts["base_layers"], facts["adapter_layers"]) == ("gpt2-large", 3, 2)  # adapter: all of "gpt2"
    assert facts["reward"] == "DetoxifyReward" and facts["heads"] == 0 and facts["fluency"] == 1
    assert (facts["k"], facts["algorithm"], facts["kl"], facts["top_p"], facts["lr"]) == (25, "Quark", 0.05, 1.0, 1e-5)
    assert (facts["source"], facts["batch"]) == ("allenai/real-toxicity-prompts", 128)


def test_compare_config_instantiates_dexperts_and_proxy_tuning_with_the_published_experts(tmp_path):
    """conf/toxicity.yaml + conf/compare/toxicity.yaml as they are, run from a folder where DExperts' experts.zip was
    unzipped into ./models (tiny GPT-2s of the same tokenizer there), the hub served from its cache."""
    tokenizer = train_tokenizer(300, ["<eos>", "<pad>"])
    env = {**serve_paper_models(tmp_path, tokenizer), "PYTHONPATH": str(ROOT)}
    work = tmp_path / "work"
    for size, layers in [("large", 3), ("small", 1)]:
        for kind in ["nontoxic", "toxic"]:
            tiny_gpt2_saver(tokenizer, layers, n_positions=64)(work / "models" / "experts" / "toxicity" / size / f"finetuned_gpt2_{kind}")
    script = (
        "import json; from lightning_ipa.cli import main\n"
        f"cli = main(['--config', '{ROOT}/conf/toxicity.yaml', '--config', '{ROOT}/conf/compare/toxicity.yaml', '--trainer.accelerator=cpu'], run=False)\n"
        "m = cli.model\n"
        "print(json.dumps({'policies': m.evaluation.policies('test'), 'base': m.policy.base.path,"
        " 'compare': [[type(c).__name__, c.paths, [m.lm.config.n_layer for m in c.models], c.weights, c.filter_p, c.top_p] for c in m.compare],"
        " 'readers': m.policy.readers}))\n"
    )
    facts = printed_facts(script, work, env)
    assert facts["policies"] == ["base", "tailored", "dexperts", "proxy_tuning"] and facts["base"] == "gpt2-large"
    expert = "models/experts/toxicity/{}/finetuned_gpt2_{}"
    assert facts["compare"] == [
        ["DExperts", [expert.format("large", "nontoxic"), expert.format("large", "toxic")], [3, 3], [2.0, -2.0], 0.9, 1.0],
        ["ProxyTuning", [expert.format("small", "nontoxic"), "gpt2"], [1, 2], [1.0, -1.0], 1.0, None],
    ]
    assert facts["readers"] == {"compare dexperts": 64, "compare proxy_tuning": 64}
