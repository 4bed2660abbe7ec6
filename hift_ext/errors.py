"""The ways a fine-tuning run ends early, each with its own ``hift-ext`` exit code.

The command line prints the message of each and exits with :attr:`exit_code`; library callers of
:func:`hift_ext.train.run_finetune` catch them like any exception.
"""
from __future__ import annotations

__all__ = ["UsageError", "NonFiniteTrainingError", "RunInterrupted"]


class UsageError(Exception):
    """Bad input the user can fix (data, model, flags, output/resume directories). Exit code 2."""

    exit_code = 2


class NonFiniteTrainingError(RuntimeError):
    """Training produced NaN/inf (loss, gradients or weights) and was stopped; the last good
    checkpoint is left in place. Exit code 3."""

    exit_code = 3


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the last checkpoint is and how to resume.
    A KeyboardInterrupt, so code that already handles Ctrl-C keeps working. Exit code 130."""

    exit_code = 130
