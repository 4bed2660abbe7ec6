"""The tasks of ``hift-ext finetune`` (see :mod:`hift_ext.tasks.base` for the interface)."""
from __future__ import annotations

from hift_ext.errors import UsageError
from hift_ext.model_source import CAUSAL_LM, CLASSIFICATION, detect_task
from hift_ext.tasks.base import Built, Task

__all__ = ["TASKS", "get_task", "detect_task", "Task", "Built", "CLASSIFICATION", "CAUSAL_LM"]

TASKS = (CLASSIFICATION, CAUSAL_LM)


def get_task(name: str) -> Task:
    if name == CLASSIFICATION:
        from hift_ext.tasks.classification import ClassificationTask

        return ClassificationTask()
    if name == CAUSAL_LM:
        from hift_ext.tasks.causal_lm import CausalLMTask

        return CausalLMTask()
    raise UsageError(f"--task {name}: choose {', '.join(TASKS)}")
