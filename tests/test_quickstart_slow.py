"""conf/quickstart.yaml as shipped, on the real SmolLM2-135M-Instruct (one step of each stage)."""

import pytest

from lightning_ipa.cli import main

pytestmark = pytest.mark.slow


def test_quickstart_yaml_runs_on_smollm2(tmp_path):
    cli = main([
        "fit",
        "--trainer.fast_dev_run=true",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.eval_batch_size=4",
    ])
    policy = cli.model.policy
    assert policy.base.vocab_size == 49152 and len(policy.adapter.body.layers) == 2
    assert policy.base.tokenizer.chat_template  # prompts go through the instruct model's template
    metrics = cli.trainer.callback_metrics
    assert {"train/reward", "val/coverage/base", "val/coverage/tailored", "val/distinct_2/base"} <= set(metrics)
    assert 0.0 <= float(metrics["val/coverage/base"]) <= 1.0
