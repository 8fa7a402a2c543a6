"""The warnings this package silences, in one place: each is expected and says nothing a user can act on.

``ignore_known_warnings`` is called once, when ``lightning_ipa`` is imported (the CLI, a notebook or a script alike).
Every other warning stays on. The CLI also drops a few of Lightning's log lines (``cli.QuietLightning``).
"""

from __future__ import annotations

import warnings

KNOWN_WARNINGS = {
    # IPAModule keeps its frozen parts (base, rewards, evaluation models) and the policy in eval mode on purpose
    # (``frozen.Frozen``: no dropout in RL, rollout and loss see one distribution); Lightning cautions at every fit.
    r"Found \d+ module\(s\) in eval mode at the start of training": "frozen modules are in eval mode by design",
    # Lightning 2.6 and torchdata 0.11 (their newest releases) call torch APIs that torch 2.13 deprecates, at every fit.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated": "Lightning's call of a deprecated torch API",
    r"'set_vital' is deprecated": "torchdata's call of a deprecated torch API",
}


def ignore_known_warnings() -> None:
    """Ignore the warnings of ``KNOWN_WARNINGS`` (by message), and no other."""
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
