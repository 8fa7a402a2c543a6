"""Bad inputs: each gives one clear error (what was wrong, where, how to fix it) before any training or generation."""

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lightning_ipa.cli import CONF, main
from lightning_ipa.data import read_records
from test_cli import ROOT, tiny_args, with_algorithm

# ---- text files must be UTF-8 ----

# line 2 holds "é" written as Latin-1 (byte 0xe9): column 16 of that line, byte 32 of the file
LATIN1 = '{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1")


def read_with(reader: str, path: Path) -> list:
    """Everything ``reader`` reads from ``path``."""
    if reader == "read_records":
        return list(read_records(str(path)))
    if reader == "read_concepts":
        from tasks.quickstart.data import read_concepts

        return read_concepts(str(path))
    if reader == "commongen":
        from tasks.commongen.data import read_concept_sets

        return read_concept_sets(str(path))
    if reader == "load_jsonl":
        from lightning_ipa.analysis import load_jsonl

        return load_jsonl(path).to_dict("records")
    raise AssertionError(reader)


@pytest.mark.parametrize("reader, name", [
    ("read_records", "data.jsonl"), ("read_records", "data.json"), ("read_concepts", "concepts.jsonl"),
    ("commongen", "ipa.json"), ("load_jsonl", "predictions.jsonl"),
])
def test_a_file_that_is_not_utf8_names_file_line_column_and_how_to_convert(tmp_path, reader, name):
    path = tmp_path / name
    concepts = reader in ("read_concepts", "commongen")
    data = LATIN1.replace(b'"prompt": ', b'"concepts": ').replace(b'"ok"', b'["ok"]') if concepts else LATIN1
    path.write_bytes(data)
    column = data.split(b"\n")[1].index(b"\xe9") + 1
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2:{column}: byte 0xe9 \(byte \d+ of the file\) is not UTF-8.*iconv"):
        read_with(reader, path)


def test_utf8_readers_count_lines_as_editors_do_and_accept_a_bom(tmp_path):
    path = tmp_path / "data.jsonl"
    # U+2028 is valid inside a JSON string (json.dumps(..., ensure_ascii=False) writes it raw); only \n ends a line
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "a\u2028b"}\r\n\n{"prompt": "c\x85d"}\n'.encode())
    assert list(read_records(str(path))) == [(f"{path}:1", {"prompt": "a\u2028b"}), (f"{path}:3", {"prompt": "c\x85d"})]


def test_a_missing_data_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no such file: {re.escape(str(tmp_path / 'missing.jsonl'))}"):
        list(read_records(str(tmp_path / "missing.jsonl")))


def test_a_non_utf8_predict_file_fails_before_predicting(tiny_llama, tmp_path):
    path = tmp_path / "concepts.jsonl"
    path.write_bytes(b'{"concepts": ["dog", "cat"]}\n{"concepts": ["caf\xe9", "dog"]}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2:19: byte 0xe9 \(byte 47 of the file\) is not UTF-8"):
        main(["predict", *tiny_args(tiny_llama, tmp_path / "runs"), f"--data.init_args.predict_file={path}"])
    assert not list(tmp_path.glob("runs/**/predictions.jsonl"))


# ---- rows that are JSON but not what the reader expects ----

@pytest.mark.parametrize("line, problem", [
    ('{"concepts": "dog cat"}', r"concepts must be a non-empty list of words, got 'dog cat'"),
    ('{"words": ["dog"]}', r"expected \{\"concepts\": \[words\]\}"),
    ('"dog cat"', r"expected \{\"concepts\": \[words\]\}"),
])
def test_concept_lines_of_the_wrong_shape_are_refused(tmp_path, line, problem):
    from tasks.quickstart.data import read_concepts

    path = tmp_path / "concepts.jsonl"
    path.write_text(f"dog cat\n{line}\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: .*{problem}"):
        read_concepts(str(path))


def test_a_json_list_of_words_is_a_concept_set(tmp_path):
    from tasks.quickstart.data import read_concepts

    path = tmp_path / "concepts.jsonl"
    path.write_text('["dog", "ice cream"]\n')
    assert read_concepts(str(path)) == [["dog", "ice cream"]]


# ---- splits a stage needs must hold prompts ----

def test_an_empty_predict_file_is_an_error_naming_it(tiny_llama, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=rf"'predict' split is empty.*predict_file={re.escape(str(empty))}"):
        main(["predict", *tiny_args(tiny_llama, tmp_path / "runs"), f"--data.init_args.predict_file={empty}"])
    assert not list(tmp_path.glob("runs/**/predictions.jsonl"))


def test_an_empty_validation_split_fails_fit_before_training(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match=r"'val' split is empty \(val_size=0\).*limit_val_batches=0"):
        main(["fit", *tiny_args(tiny_llama, tmp_path), "--data.init_args.val_size=0"])
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_fewer_training_prompts_than_one_batch_is_an_error_with_the_numbers(tiny_llama, tmp_path):
    args = tiny_args(tiny_llama, tmp_path, 2, "--data.init_args.train_size=1", "--data.init_args.batch_size=2")
    with pytest.raises(ValueError, match=r"1 training prompt .*train_size=1.*fewer than one batch \(batch_size=2\)"):
        main(["fit", *args])
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_under_ddp_each_process_needs_a_batch_of_its_share():
    from tasks.quickstart.data import ConceptsDataModule

    data = ConceptsDataModule(batch_size=3, train_size=6, val_size=2)
    data.trainer = SimpleNamespace(world_size=2, limit_val_batches=1.0, state=SimpleNamespace(fn="fit"))
    data.setup("fit")
    data.check_splits("fit")  # 3 per process: one batch each
    data.trainer.world_size = 3  # 2 per process: no batch
    share = r"6 training prompts \(train_size=6\), shared by 3 processes: 2 each, fewer than one batch \(batch_size=3\)"
    with pytest.raises(ValueError, match=share):
        data.check_splits("fit")


@pytest.mark.parametrize("option, value", [("batch_size", 0), ("eval_batch_size", 0), ("num_workers", -1)])
def test_batch_sizes_must_be_positive(option, value):
    from tasks.quickstart.data import ConceptsDataModule

    with pytest.raises(ValueError, match=rf"{option} must be"):
        ConceptsDataModule(**{option: value})


def test_more_concept_sets_than_the_word_lists_hold_is_refused():
    from tasks.quickstart.data import ConceptsDataModule

    data = ConceptsDataModule(concepts_per_prompt=1, train_size=500, val_size=10)
    with pytest.raises(ValueError, match=r"510 concept sets of 1 word.*only \d+ distinct"):
        data.setup("fit")  # used to loop for ever


# ---- the update schedule: minibatches and max_steps ----

def test_a_minibatch_size_that_does_not_divide_the_rollout_is_refused(tiny_llama, tmp_path):
    args = tiny_args(tiny_llama, tmp_path, 2, "--model.algorithm.init_args.minibatch_size=3")
    message = r"minibatch_size=3 does not divide the 8 samples trained on per rollout \(2 prompts × samples_per_prompt=4\).*1, 2, 4 or 8"
    with pytest.raises(ValueError, match=message):
        main(["fit", *args])
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_max_steps_must_be_a_whole_number_of_rollouts(tiny_llama, tmp_path):
    updates = ["--model.algorithm.init_args.epochs=2", "--model.algorithm.init_args.minibatch_size=4"]
    with pytest.raises(ValueError, match=r"max_steps=6 .* 4 optimizer steps per rollout \(epochs=2 × 2 minibatches of 4\).*4 or 8"):
        main(["fit", *tiny_args(tiny_llama, tmp_path, 2, *updates, "--model.max_rollouts=null", "--trainer.max_steps=6")])
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_quark_minibatches_split_its_replay_batch_which_pool_size_bounds(tiny_llama, tmp_path):
    # rollouts of 8 samples; the pool keeps 6, so each update replays 6 samples
    quark = ["--model.algorithm.init_args.pool_size=6", "--model.algorithm.init_args.minibatch_size=4"]
    with pytest.raises(ValueError, match=r"minibatch_size=4 does not divide the 6 samples .*pool_size=6.*1, 2, 3 or 6"):
        main(["fit", *with_algorithm("quark"), *tiny_args(tiny_llama, tmp_path, 2, *quark)])
    quark[-1] = "--model.algorithm.init_args.minibatch_size=3"
    cli = main(["fit", *with_algorithm("quark"), *tiny_args(tiny_llama, tmp_path, 1, *quark)])
    assert cli.trainer.global_step == 2  # one rollout: 2 minibatches of 3


def algorithm_from(config: dict):
    import importlib

    module, _, name = config["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**config.get("init_args", {}))


SHIPPED = sorted(p.name for p in CONF.glob("*.yaml")) + ["blackbox/ipa.yaml", "algorithms/ppo.yaml", "algorithms/quark.yaml"]


@pytest.mark.parametrize("conf", SHIPPED)
def test_every_shipped_config_trains_whole_rollouts(conf):
    config = yaml.safe_load((CONF / conf).read_text())
    if conf.startswith("algorithms/"):  # applied on top of the quickstart
        quickstart = yaml.safe_load((CONF / "quickstart.yaml").read_text())
        config = {**quickstart, "model": {**quickstart["model"], "algorithm": config["model"]["algorithm"]}}
    algorithm = algorithm_from(config["model"].get("algorithm") or {"class_path": "lightning_ipa.algorithms.RLOO"})
    assert algorithm.updates_per_rollout(config["data"]["init_args"].get("batch_size", 8)) >= 1  # raises: uneven minibatches
    assert config["model"]["max_rollouts"] >= 1 and "max_steps" not in config["trainer"]  # the length in rollouts, only


@pytest.mark.parametrize("option, value, message", [
    ("samples_per_prompt", 0, "samples_per_prompt must be ≥ 1"),
    ("epochs", 0, "epochs must be ≥ 1"),
    ("minibatch_size", 0, "minibatch_size must be ≥ 1"),
])
@pytest.mark.parametrize("algorithm", ["PPO", "Quark"])
def test_algorithm_counts_must_be_positive(algorithm, option, value, message):
    from lightning_ipa import algorithms

    with pytest.raises(ValueError, match=message):
        getattr(algorithms, algorithm)(**{option: value})


# ---- the model ----

def test_a_negative_alpha_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match=r"alpha must be ≥ 0.*got -1"):
        main(["fit", *tiny_args(tiny_llama, tmp_path), "--model.alpha=-1"])


def test_alpha_zero_stays_valid(policy_factory):
    assert policy_factory(alpha=0.0).alpha == 0.0


@pytest.mark.parametrize("path, kind", [
    ("/no/such/dir", "folder"), ("./missing_model", "folder"), ("/no/such/model.gguf", "file"), ("runs/a/b", "folder"),
])
def test_a_missing_base_model_says_no_such_folder(tiny_llama, tmp_path, path, kind):
    with pytest.raises(FileNotFoundError, match=rf"^no such {kind}: {re.escape(path)}[ ;].*hub name") as error:
        main(["fit", *tiny_args(path, tmp_path)])
    assert "RemoteBase" not in str(error.value)


def test_a_missing_base_model_on_the_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lightning_ipa", "fit", "--model.base.name_or_path=/no/such/dir"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("FileNotFoundError: no such folder: /no/such/dir"), out.stderr[-2000:]
    assert "Union" not in out.stderr


@pytest.mark.parametrize("extra", [
    ["--model.adapter.name_or_path=./missing_adapter"],
    ["--model.reward=lightning_ipa.rewards.PerplexityFluency", "--model.reward.init_args.name_or_path=./missing_adapter"],
    ["--model.evaluation=tasks.toxicity.metrics.ToxicityEvaluation", "--model.evaluation.init_args.fluency=lightning_ipa.Perplexity",
     "--model.evaluation.init_args.fluency.init_args.name_or_path=./missing_adapter"],
])
def test_missing_adapter_reward_and_evaluation_models_are_named(tiny_llama, tmp_path, extra):
    with pytest.raises(FileNotFoundError, match=r"^no such folder: \./missing_adapter"):
        main(["fit", *tiny_args(tiny_llama, tmp_path, 2, *extra)])


def test_a_missing_remote_tokenizer_is_named(tmp_path):
    remote = [
        "--model.base=lightning_ipa.RemoteBase", "--model.base.init_args.base_url=http://127.0.0.1:9", "--model.base.init_args.model=m",
        "--model.base.init_args.tokenizer=/no/such/tokenizer",
    ]
    with pytest.raises(Exception, match=r"no such folder: /no/such/tokenizer") as error:
        main(["fit", *tiny_args("gpt2", tmp_path), *remote])
    assert "Union" not in str(error.value)


def test_hub_names_pass_through_unchanged():
    from lightning_ipa.bases import resolve_pretrained

    for name in ["gpt2", "org/name", "HuggingFaceTB/SmolLM2-135M"]:
        assert resolve_pretrained(name) == name


def test_missing_detoxify_files_are_named(tmp_path):
    from tasks.toxicity.reward import DetoxifyReward

    with pytest.raises(FileNotFoundError, match=r"^no such file: .*missing\.ckpt \(checkpoint: a Detoxify checkpoint file\)"):
        DetoxifyReward(checkpoint=str(tmp_path / "missing.ckpt"))
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"^no such folder: \./missing_config \(huggingface_config_path"):
        DetoxifyReward(checkpoint=str(tmp_path / "model.ckpt"), huggingface_config_path="./missing_config")


@pytest.mark.parametrize("option", ["train_size", "val_size"])
def test_negative_split_sizes_are_refused(option):
    from tasks.quickstart.data import ConceptsDataModule

    with pytest.raises(ValueError, match=rf"split sizes must be ≥ 0, got {option}=-1"):
        ConceptsDataModule(**{option: -1})  # val_size=-1 used to make every concept set but one a validation set
