"""Nothing lost: checkpoints while training, exact resume (mid-pass, after a crash, a SIGKILL or a SIGTERM),
``--ckpt_path last`` naming one run, and the configuration given winning over a checkpoint's."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_ipa import RemoteBase
from lightning_ipa.cli import CONF, DEFAULT_CONFIG, main
from tasks.quickstart import ConceptCoverage
from tests.test_cli import ROOT, scalars, tiny_args
from tests.test_remote import FaultyServer

# temperature 4: the peaked tiny model then writes varied responses, so rewards, advantages and updates are not 0;
# an adaptive KL coefficient, so its state must resume too; 8 training prompts in batches of 2: 4 rollouts per pass
VARIED = ["--model.sampling.temperature=4.0", "--model.algorithm.init_args.kl_target=0.5", "--model.algorithm.init_args.kl_horizon=20",
          "--data.init_args.train_size=8"]
ROLLOUT = 2 * 4  # samples per rollout: 2 prompts × 4 samples (tiny_args, conf/quickstart.yaml)


class RecordingCoverage(ConceptCoverage):
    """The quickstart's reward; appends the prompts of each rollout (a call with a rollout's number of samples) to
    the file ``record`` and, at the rollout numbered ``fail_at`` (1-based) in this process, raises, or sends this
    process the signal ``signal_name``."""

    def __init__(self, record: str = "", fail_at: int = 0, signal_name: str = "", **kwargs: Any):
        super().__init__(**kwargs)
        self.record, self.fail_at, self.signal_name, self.calls = record, fail_at, signal_name, 0

    def __call__(self, prompts, responses, meta):
        if len(responses) == ROLLOUT:
            self.calls += 1
            with open(self.record, "a") as f:
                f.write(json.dumps(prompts[::4]) + "\n")
            if self.calls == self.fail_at and self.signal_name:
                os.kill(os.getpid(), getattr(signal, self.signal_name))  # SIGTERM: handled at the next rollout boundary
            elif self.calls == self.fail_at:
                raise RuntimeError(f"reward service down at rollout {self.calls}")
        return super().__call__(prompts, responses, meta)


def recording(record: Path, fail_at: int = 0, signal_name: str = "") -> list[str]:
    return ["--model.reward=tests.test_checkpoints.RecordingCoverage", f"--model.reward.record={record}",
            f"--model.reward.fail_at={fail_at}", f"--model.reward.signal_name={signal_name}"]


def recorded(record: Path) -> list[list[str]]:
    """The prompts of each rollout recorded in ``record`` (and the file emptied)."""
    rollouts = [json.loads(line) for line in record.read_text().splitlines()]
    record.unlink()
    return rollouts


def fit(model: str, save_dir: Path, steps: int, *extra: str):
    return main(["fit", *tiny_args(model, save_dir, steps, *VARIED, *extra)])


def assert_same_adapter(a, b) -> None:
    assert a.policy.adapter.head.projection.weight.abs().sum() > 0  # trained: the head started at 0
    for (name, x), y in zip(a.policy.adapter.named_parameters(), b.policy.adapter.parameters()):
        assert torch.equal(x, y), name
    assert torch.equal(a.algorithm.kl_coef, b.algorithm.kl_coef) and a.algorithm.kl_coef != 0.05  # the KL coefficient adapted


def last_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


def test_resume_mid_pass_equals_the_straight_run(tiny_llama, tmp_path):
    """fit 4 rollouts straight vs 2, then --ckpt_path last to 4: the second pass's half is not replayed."""
    record = tmp_path / "prompts.jsonl"
    straight = fit(tiny_llama, tmp_path / "a", 4, *recording(record)).model
    straight_prompts = recorded(record)
    assert len({tuple(p) for p in straight_prompts}) == 4  # one pass over the 8 prompts: 4 different batches
    fit(tiny_llama, tmp_path / "b", 2, *recording(record))
    first = recorded(record)
    resumed = fit(tiny_llama, tmp_path / "b", 4, *recording(record), "--ckpt_path", "last")
    assert first + recorded(record) == straight_prompts  # the same prompts in the same order
    assert resumed.trainer.global_step == 4 and resumed.trainer.logger.version == 0
    assert_same_adapter(straight, resumed.model)


def test_a_reward_raising_at_rollout_5_leaves_rollout_4s_checkpoint_which_resumes(tiny_llama, tmp_path):
    straight = fit(tiny_llama, tmp_path / "a", 6, *recording(tmp_path / "prompts.jsonl")).model
    with pytest.raises(RuntimeError, match="reward service down at rollout 5"):
        fit(tiny_llama, tmp_path / "b", 6, *recording(tmp_path / "prompts.jsonl", fail_at=5))  # validations (and checkpoints) after rollouts 2 and 4
    run = tmp_path / "b" / "quickstart" / "version_0"
    assert last_step(run) == 4  # rollout 5 was cut short: not a state to resume from
    resumed = fit(tiny_llama, tmp_path / "b", 6, *recording(tmp_path / "prompts.jsonl"), "--ckpt_path", "last")
    assert resumed.trainer.global_step == 6
    assert_same_adapter(straight, resumed.model)
    assert scalars(run)["train/reward"] == scalars(tmp_path / "a" / "quickstart" / "version_0")["train/reward"]


def test_checkpoints_every_n_rollouts_without_validation(tiny_llama, tmp_path):
    every = ["--trainer.callbacks.every_n_rollouts=3", "--trainer.val_check_interval=100", "--trainer.limit_val_batches=0"]
    with pytest.raises(RuntimeError, match="rollout 5"):
        fit(tiny_llama, tmp_path, 8, *recording(tmp_path / "prompts.jsonl", fail_at=5), *every)
    assert last_step(tmp_path / "quickstart" / "version_0") == 3


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lightning_ipa", "fit", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.parametrize("signal_name, saved_at", [("SIGKILL", 4), ("SIGTERM", 5)])
def test_a_killed_process_resumes_from_its_last_checkpoint(tiny_llama, tmp_path, signal_name, saved_at):
    """SIGKILL at rollout 5: last.ckpt is the validation's after rollout 4. SIGTERM (pre-emption) at rollout 5: Lightning
    stops at the end of that rollout and RolloutCheckpoint saves it. Either way the resumed run equals the straight one."""
    straight = fit(tiny_llama, tmp_path / "a", 6, *recording(tmp_path / "prompts.jsonl")).model
    out = run_cli(*tiny_args(tiny_llama, tmp_path / "b", 6, *VARIED, *recording(tmp_path / "prompts.jsonl", fail_at=5, signal_name=signal_name)))
    run = tmp_path / "b" / "quickstart" / "version_0"
    if signal_name == "SIGKILL":
        assert out.returncode == -signal.SIGKILL
    else:
        assert out.returncode == 128 + signal.SIGTERM, (out.stdout + out.stderr)[-3000:]  # 143: not finished
        assert "SIGTERMException: saved" in out.stdout + out.stderr
    assert last_step(run) == saved_at
    resumed = fit(tiny_llama, tmp_path / "b", 6, *recording(tmp_path / "prompts.jsonl"), "--ckpt_path", "last")
    assert resumed.trainer.global_step == 6
    assert_same_adapter(straight, resumed.model)


def test_ckpt_path_last_never_picks_another_run(tiny_llama, tmp_path):
    fit(tiny_llama, tmp_path, 2)
    finished = tmp_path / "quickstart" / "version_0"
    config = (finished / "config.yaml").read_bytes()
    with pytest.raises(RuntimeError):  # a run that dies before its first checkpoint (version_1)
        fit(tiny_llama, tmp_path, 4, *recording(tmp_path / "prompts.jsonl", fail_at=1))
    with pytest.raises(SystemExit, match=r"version_1 has no checkpoints/last.ckpt .*runs with a checkpoint:\n  .*version_0/checkpoints/last.ckpt"):
        fit(tiny_llama, tmp_path, 4, "--ckpt_path", "last")
    assert (finished / "config.yaml").read_bytes() == config and last_step(finished) == 2  # untouched
    resumed = fit(tiny_llama, tmp_path, 4, "--ckpt_path", "last", "--trainer.logger.init_args.version=0")  # named: resumed
    assert resumed.trainer.global_step == 4 and resumed.trainer.logger.version == 0
    assert (finished / "config.yaml").read_bytes() == config  # the run's own configuration is kept ...
    assert "max_steps: 4" in (finished / "config.resume1.yaml").read_text()  # ... and the resume's is beside it
    with pytest.raises(SystemExit, match="at step 4, and --trainer.max_steps is 4: nothing to train"):
        fit(tiny_llama, tmp_path, 4, "--ckpt_path", "last", "--trainer.logger.init_args.version=0")


def test_default_root_dir_places_the_run(tiny_llama, tmp_path):
    cli = main(["fit", *tiny_args(tiny_llama, tmp_path / "ignored", 2), f"--trainer.default_root_dir={tmp_path / 'here'}"])
    assert Path(cli.trainer.log_dir) == tmp_path / "here" / "quickstart" / "version_0"
    assert (tmp_path / "here" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "ignored").exists()


def test_the_configuration_given_wins_over_the_checkpoints(tiny_llama, tmp_path):
    fit(tiny_llama, tmp_path, 2)
    last = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    for ckpt in (str(last), "last"):
        cli = main(["validate", *tiny_args(tiny_llama, tmp_path, 2, *VARIED, "--model.sampling.top_p=0.5"), "--ckpt_path", ckpt])
        assert cli.model.policy.sampling.top_p == 0.5 and cli.model.policy.sampling.temperature == 4.0
    with FaultyServer(tiny_llama, []) as server:  # the base given: the remote one, not the checkpoint's local one
        api = ["--config", str(CONF / "blackbox" / "remote_base.yaml"), f"--model.base.init_args.base_url={server.url}",
               f"--model.base.init_args.tokenizer={tiny_llama}", "--model.base.init_args.chat_template=false", "--model.base.init_args.top_logprobs=8",
               f"--model.adapter.name_or_path={tiny_llama}"]
        cli = main(["validate", "--config", str(DEFAULT_CONFIG), *tiny_args(tiny_llama, tmp_path, 2), *api, "--ckpt_path", str(last)])
        assert isinstance(cli.model.policy.base, RemoteBase) and server.requests > 0


@pytest.mark.parametrize("change, message", [
    ("--model.adapter.head=zeros", r"configured but not in the checkpoint: policy.adapter.head.weight\n"
                                   r"  in the checkpoint but not configured: policy.adapter.head.projection.weight"),
    ("--model.adapter.num_layers=1", r"in the checkpoint but not configured: policy.adapter.body.layers.1"),
    ("--model.algorithm=lightning_ipa.algorithms.PPO", r"configured but not in the checkpoint: algorithm.value_head"),
])
def test_a_checkpoint_that_does_not_fit_the_configured_adapter_is_refused(tiny_llama, tmp_path, change, message):
    fit(tiny_llama, tmp_path, 2)
    run = tmp_path / "quickstart" / "version_0"
    for ckpt in (str(run / "checkpoints" / "last.ckpt"), "last"):
        with pytest.raises(ValueError, match=message + r"(.|\n)*pass --config .*version_0/config.yaml"):
            main(["validate", *tiny_args(tiny_llama, tmp_path, 2), change, "--ckpt_path", ckpt])


def test_two_processes_resume_mid_pass_as_they_run_straight(tiny_llama, tmp_path):
    """DDP (2 CPU processes): each rank's share of the pass continues where it stopped (EpochShuffle deals it)."""
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--data.init_args.train_size=16"]  # 8 prompts a rank: 4 rollouts a pass

    def weights(save_dir: Path) -> dict[str, torch.Tensor]:
        return torch.load(save_dir / "quickstart" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    for save_dir, steps, resume in [(tmp_path / "a", 4, []), (tmp_path / "b", 2, []), (tmp_path / "b", 4, ["--ckpt_path", "last"])]:
        out = run_cli(*tiny_args(tiny_llama, save_dir, steps, *VARIED, *ddp), *resume)
        assert out.returncode == 0, out.stderr[-3000:]
    straight, resumed = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert straight.keys() == resumed.keys() and straight["policy.adapter.head.projection.weight"].abs().sum() > 0
    assert all(torch.equal(straight[k], resumed[k]) for k in straight if torch.is_tensor(straight[k]))
