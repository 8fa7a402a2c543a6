"""Sequence-level distillation of a base (a remote API model, typically) into a local proxy LM.

IPA's two steps for a black-box base: train the adapter against a local proxy of the API model, then
decode with the API model itself. ``python -m lightning_ipa distill --config conf/blackbox/distill.yaml``
fine-tunes the proxy on the teacher's own samples and saves it as a Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
from lightning import LightningModule
from torch import Tensor

from .bases import DType, LocalBase, load_causal_lm, load_tokenizer, max_positions, resolve_pretrained
from .data import PromptBatch, PromptDataModule
from .io import write_dir_atomic
from .module import refuse_long_prompts
from .policy import Sampling, TailoredPolicy
from .remote import RemoteBase
from .types import masked_mean, position_ids, sequence


class DistillModule(LightningModule):
    """Fine-tunes ``student`` by NLL on the teacher's responses to the training prompts (sequence-level KD)."""

    def __init__(
        self,
        teacher: Union[LocalBase, RemoteBase],
        student: str,
        output_dir: str,
        sampling: Sampling = Sampling(),
        samples_per_prompt: int = 1,
        lr: float = 1e-5,
        dtype: DType = "float32",
    ):
        """
        Args:
            teacher: The model to imitate: a ``RemoteBase`` (its top-k support), or a local base.
            student: The proxy's starting checkpoint (hub name, folder, ``.gguf``); it must share the teacher's tokenizer.
            output_dir: Where the distilled proxy is saved (a Hugging Face folder; then ``model.base.name_or_path``).
            sampling: How the teacher samples its responses.
            samples_per_prompt: Teacher responses per prompt.
            lr: AdamW learning rate of the student.
            dtype: The student's weights' dtype.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["teacher"])
        path = resolve_pretrained(student)
        tokenizer = load_tokenizer(path)
        if tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
            raise ValueError(f"student {student} has another tokenizer than the teacher ({len(tokenizer)} vs {len(teacher.tokenizer)} "
                             "tokens); the proxy must share the API model's tokenizer")
        self.student = load_causal_lm(path, dtype)
        # the student reads prompt + response too: prompts must fit its window as well as the teacher's
        self.teacher = TailoredPolicy(teacher, None, sampling=sampling, readers={"student": max_positions(self.student.config)})
        self.tokenizer = tokenizer
        self.strict_loading = False  # checkpoints leave the teacher out

    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor:
        # 1. The teacher answers each prompt (the base alone, as the API serves it).
        k = self.hparams.samples_per_prompt
        responses = self.teacher.generate(self.teacher.encode(batch["prompt"]), samples_per_prompt=k, use_adapter=False)
        # 2. The student learns the teacher's responses: NLL of the response tokens given the prompt.
        ids, mask = sequence(responses)
        prompt_length = responses.prompt_ids.shape[1]
        logits = self.student(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        logprobs = logits[:, prompt_length - 1 : -1].float().log_softmax(-1).gather(-1, responses.response_ids[..., None]).squeeze(-1)
        loss = -masked_mean(logprobs, responses.response_mask)
        self.log_dict({"distill/nll": loss, "distill/response_length": responses.response_mask.sum(-1).float().mean()},
                      prog_bar=True, batch_size=len(ids))
        return loss

    def setup(self, stage: str) -> None:
        """Refuse, before any work, prompts too long for the teacher's or the student's window (``sampling.long_prompts``)."""
        if isinstance(data := self.trainer.datamodule, PromptDataModule):
            refuse_long_prompts(self.teacher, data, stage)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.student.parameters(), lr=self.hparams.lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        self.save_student()

    def on_train_end(self) -> None:
        self.save_student()

    def save_student(self) -> None:
        """Write the proxy to ``output_dir`` atomically (rank 0), replacing the last one: a reader never sees half a model
        (``write_dir_atomic``)."""
        if self.trainer.global_rank != 0:
            return
        write_dir_atomic(Path(self.hparams.output_dir), self.student.save_pretrained, self.tokenizer.save_pretrained, replace=True)
