"""``Frozen``: modules that never leave eval mode, whatever Lightning asks."""

from __future__ import annotations

from torch import nn


class Frozen(nn.Module):
    """A module that stays in eval mode: ``train()`` puts it, and every submodule, in eval mode whatever ``mode`` says.

    Lightning calls ``train()`` on the whole LightningModule when fitting starts and after each validation. Train mode
    would turn on dropout (and any other behaviour a module has only in training), and it must stay off:

    - in frozen models (the base LM, rewards, evaluation models): one input, one output (a reward's score of a
      sample, the base's log-probs of a token, never depend on a dropout draw);
    - in the tailored policy (base and trainable adapter): rollouts are sampled in eval mode, so the loss must see
      the same distribution, or its ratios and KL would compare two different policies.

    It fixes the mode only: gradients are left as they are, since the tailored policy's adapter trains. A module whose
    parameters never train calls ``freeze`` too.
    """

    def train(self, mode: bool = True) -> Frozen:
        """Eval mode, whatever ``mode`` says (see the class)."""
        return super().train(False)

    def freeze(self) -> Frozen:
        """Turn off the gradients of all parameters and switch to eval mode: for a module that never trains (a reward,
        a base); call it at the end of ``__init__``. Never on a module that holds a trainable part (the adapter).

        Returns:
            This module.
        """
        return self.requires_grad_(False).eval()
