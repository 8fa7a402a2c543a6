"""End to end through ``main([...])``: conf/quickstart.yaml with the tiny model swapped in."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ipa.cli import DEFAULT_CONFIG, main

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(model: str, save_dir: Path, steps: int = 2, *extra: str) -> list[str]:
    return [
        f"--model.base.name_or_path={model}",
        "--model.base.chat_template=false",
        "--model.sampling.max_new_tokens=6",
        "--trainer.accelerator=cpu",
        f"--model.max_rollouts={steps}",
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--data.init_args.train_size=4",
        "--data.init_args.val_size=6",
        "--data.init_args.batch_size=2",
        "--data.init_args.eval_batch_size=4",
        "--model.algorithm.init_args.epochs=1",  # one optimizer step per rollout: global_step counts rollouts here
        "--model.algorithm.init_args.minibatch_size=null",
        *extra,
    ]


def read_test_results(run: Path, metrics: set[str]) -> tuple[dict, list[dict]]:
    """``results.json`` of a ``test`` run (exactly ``metrics``, each finite for base and tailored) and its ``generations.jsonl`` rows."""
    results = json.loads((run / "results.json").read_text())
    assert set(results["metrics"]) == set(metrics)
    for metric, values in results["metrics"].items():
        assert set(values) == {"base", "tailored"} and all(math.isfinite(v) for v in values.values()), metric
    rows = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    return results, rows


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    # in step order: a resumed run's second event file can sort before the first (same second, lower pid)
    return {tag: [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)] for tag in events.Tags()["scalars"]}


def test_fit_logs_checkpoints_and_predicts(tiny_llama, tmp_path):
    main(["fit", *tiny_args(tiny_llama, tmp_path)])  # no --config: conf/quickstart.yaml
    run = tmp_path / "quickstart" / "version_0"
    logged = scalars(run)
    for tag in ["train/reward", "train/kl", "loss/policy", "train/lr", "train/head_lr", "train/coverage"]:
        assert tag in logged, tag
    assert logged["train/kl"][0] == 0.0 and min(logged["train/kl"]) >= 0  # exact KL: 0 at the zero-initialised start
    for metric in ["reward", "coverage", "distinct_2", "corpus_distinct_2"]:
        for policy in ["tailored", "base"]:
            assert f"val/{metric}/{policy}" in logged
    text = EventAccumulator(str(run))
    text.Reload()
    assert "val/samples/text_summary" in text.Tags()["tensors"]

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    keys = checkpoint["state_dict"].keys()
    assert keys and not any(k.startswith("policy.base.") for k in keys)
    assert "policy.adapter.head.projection.weight" in keys and "algorithm.kl_coef" in keys
    assert "policy.adapter.body.embed_tokens.weight" not in keys  # frozen: rebuilt from its checkpoint
    assert checkpoint["global_step"] == 2 and "rng" in checkpoint

    assert "policy.adapter.head.lm_head.weight" not in keys  # the frozen LM head under the projection, too

    last = str(run / "checkpoints" / "last.ckpt")
    tested = main(["test", *tiny_args(tiny_llama, tmp_path), "--ckpt_path", last])
    assert {"test/coverage/tailored", "test/coverage/base", "test/distinct_2/base"} <= set(tested.trainer.callback_metrics)
    results = json.loads((tmp_path / "quickstart" / "version_1" / "results.json").read_text())
    assert results["metrics"]["coverage"].keys() == {"base", "tailored"} and results["prompts"] == 6
    main(["predict", *tiny_args(tiny_llama, tmp_path), "--ckpt_path", last])
    rows = [json.loads(line) for line in (tmp_path / "quickstart" / "version_2" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert set(rows[0]) == {"prompt", "tailored", "base", "reward_tailored", "reward_base"}


def test_resume_from_last_continues_the_same_run(tiny_llama, tmp_path):
    # temperature 4: the peaked tiny model then writes varied responses, so rewards, advantages and updates are not 0
    adaptive = ["--model.sampling.temperature=4.0", "--model.algorithm.init_args.kl_target=0.5", "--model.algorithm.init_args.kl_horizon=20"]
    straight = main(["fit", *tiny_args(tiny_llama, tmp_path / "a", 4, *adaptive)])
    main(["fit", *tiny_args(tiny_llama, tmp_path / "b", 2, *adaptive)])
    resumed = main(["fit", *tiny_args(tiny_llama, tmp_path / "b", 4, *adaptive), "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 4
    assert resumed.trainer.logger.version == 0  # the same TensorBoard run continues
    assert straight.model.algorithm.kl_coef != 0.05
    assert torch.equal(straight.model.algorithm.kl_coef, resumed.model.algorithm.kl_coef)
    assert straight.model.policy.adapter.head.projection.weight.abs().sum() > 0  # trained: the head started at 0
    for (name, a), b in zip(straight.model.policy.adapter.named_parameters(), resumed.model.policy.adapter.parameters()):
        assert torch.equal(a, b), name


def test_lr_scheduler_anneals_both_learning_rates_and_resumes(tiny_llama, tmp_path):
    cosine = ["--model.lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR", "--model.lr_scheduler.T_max=4"]
    main(["fit", *tiny_args(tiny_llama, tmp_path, 2, *cosine)])
    resumed = main(["fit", *tiny_args(tiny_llama, tmp_path, 4, *cosine), "--ckpt_path", "last"])
    logged = scalars(tmp_path / "quickstart" / "version_0")
    quickstart = yaml.safe_load(DEFAULT_CONFIG.read_text())
    lr, head_lr = quickstart["model"]["lr"], quickstart["model"]["head_lr"]
    cosine_factors = [1.0, 0.8535534, 0.5, 0.1464466]  # (1 + cos(π·t/4)) / 2 before each of the 4 steps
    assert logged["train/lr"] == pytest.approx([lr * f for f in cosine_factors])
    assert logged["train/head_lr"] == pytest.approx([head_lr * f for f in cosine_factors])
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4


def test_training_clock_logs_training_time_and_stops_past_its_budget(tiny_llama, tmp_path):
    clock = ["--trainer.callbacks+=lightning_ipa.callbacks.TrainingClock", "--trainer.callbacks.budget_seconds=0"]
    cli = main(["fit", *tiny_args(tiny_llama, tmp_path, 10, *clock)])
    assert cli.trainer.global_step == 2  # stopped at the first validation (after 2 rollouts), not at max_steps
    logged = scalars(tmp_path / "quickstart" / "version_0")
    assert logged["time/rollouts"] == [2.0] and logged["time/train_seconds"][0] > 0


def test_resume_without_a_checkpoint_says_so(tiny_llama, tmp_path):
    with pytest.raises(SystemExit, match="run `fit` first"):
        main(["fit", *tiny_args(tiny_llama, tmp_path), "--ckpt_path", "last"])


def test_bad_rollout_top_p_says_what_is_allowed(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match=r"rollout_top_p must be in \(0, 1\]"):
        main(["fit", *tiny_args(tiny_llama, tmp_path), "--model.rollout_top_p=1.5"])


def test_a_sampled_kl_estimator_with_filtered_rollouts_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="kl_estimator='k1' estimates KL.*drawn through top-k/top-p"):
        main(["fit", *tiny_args(tiny_llama, tmp_path), "--model.algorithm.init_args.kl_estimator=k1"])


def test_help_shows_documented_knobs():
    out = subprocess.run([sys.executable, "-m", "lightning_ipa", "fit", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for knob in ["--model.adapter.num_layers", "Keep only the first k transformer layers", "--model.sampling.top_p", "--model.alpha",
                 "--model.compare", "Training-free policies that ``test`` measures"]:
        assert knob in out.stdout, knob
    assert DEFAULT_CONFIG.is_file()
    top = subprocess.run([sys.executable, "-m", "lightning_ipa", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert top.stdout.startswith("usage: python -m lightning_ipa ") and "`distill" in top.stdout and "`export" in top.stdout
    export = subprocess.run([sys.executable, "-m", "lightning_ipa", "export", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert export.stdout.startswith("usage: python -m lightning_ipa export ") and "--ckpt_path CKPT_PATH" in export.stdout


def with_algorithm(name: str) -> list[str]:
    """conf/quickstart.yaml with conf/algorithms/<name>.yaml on top, as the README shows."""
    return ["--config", str(DEFAULT_CONFIG), "--config", str(ROOT / "conf" / "algorithms" / f"{name}.yaml")]


def test_ppo_runs_the_quickstart_config(tiny_llama, tmp_path):
    updates = ["--model.algorithm.init_args.epochs=2", "--model.algorithm.init_args.minibatch_size=4"]
    cli = main(["fit", *with_algorithm("ppo"), *tiny_args(tiny_llama, tmp_path, 1, *updates)])  # one rollout
    assert type(cli.model.algorithm).__name__ == "PPO"
    assert cli.trainer.global_step == 4  # optimizer steps: 2 epochs × 2 minibatches of 4 samples (2 prompts × 4)
    assert "loss/value" in scalars(tmp_path / "quickstart" / "version_0")


def test_quark_runs_the_quickstart_config_and_resumes_its_pool(tiny_llama, tmp_path):
    settings = ["--model.algorithm.init_args.pool_size=20", "--model.algorithm.init_args.kl_target=0.5", "--model.algorithm.init_args.kl_horizon=20"]
    first = main(["fit", *with_algorithm("quark"), *tiny_args(tiny_llama, tmp_path, 2, *settings)])
    saved = first.model.algorithm
    assert len(saved.pool) == 16 and saved.kl_loss_coef != 0.05  # 2 rollouts of 2 prompts × 4 samples; the KL coefficient adapted
    with pytest.raises(SystemExit, match="at rollout 2, and --model.max_rollouts is 2: nothing to train"):  # a finished run is not resumed
        main(["fit", *with_algorithm("quark"), *tiny_args(tiny_llama, tmp_path, 2, *settings), "--ckpt_path", "last"])
    # the checkpoint restores the pool and the KL coefficient; then training goes on from it
    restored = main(["validate", *with_algorithm("quark"), *tiny_args(tiny_llama, tmp_path, 2, *settings), "--ckpt_path", "last"]).model.algorithm
    assert restored is not saved and restored.kl_loss_coef == saved.kl_loss_coef
    assert all(torch.equal(saved.pool.data[k], restored.pool.data[k]) for k in saved.pool.data)
    assert torch.equal(saved.pool.rewards, restored.pool.rewards)
    main(["fit", *with_algorithm("quark"), *tiny_args(tiny_llama, tmp_path, 4, *settings), "--ckpt_path", "last"])
    logged = scalars(tmp_path / "quickstart" / "version_0")
    assert logged["train/pool_size"] == [8.0, 16.0, 20.0, 20.0]  # bounded at pool_size, across the resume
    assert {"loss/nll", "loss/kl", "loss/entropy", "train/best_quantile_min_reward"} <= set(logged)


def test_ddp_two_processes_on_cpu(tiny_llama, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = tiny_args(tiny_llama, tmp_path, 2, "--trainer.strategy=ddp", "--trainer.devices=2")
    out = subprocess.run([sys.executable, "-m", "lightning_ipa", "fit", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt").is_file()
