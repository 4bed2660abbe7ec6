"""The task interface of ``hift-ext finetune``: what differs between tasks, behind one loop.

:mod:`hift_ext.train` runs one training loop for every task (gradient accumulation, clipping, the
delayed LR, AMP, non-finite skipping, checkpoints, reports). A :class:`Task` supplies the rest:

* ``defaults`` / ``default_lrs``: the TrainConfig values the task's job is tuned for;
* :meth:`shipped` (the package's train/dev splits, used by :meth:`data_paths`) and :meth:`load_data`:
  the shipped data and the file reader (parsing only,
  so bad data is reported before a model is loaded);
* :meth:`build`: tokenizer, model and the tokenized datasets (objects with ``__len__``,
  ``batches(order, batch_size)``, ``collate(idx)`` and ``input_ids``), as a :class:`Built`;
* :meth:`loss`: the training loss of a micro-batch (default: the model's own ``.loss``);
* :meth:`evaluate`, :meth:`eval_message`, :meth:`final_metrics`, :meth:`summary_rows` and
  ``plot_eval``: what an evaluation measures and how it is reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from hift_ext.errors import UsageError

__all__ = ["Task", "Built"]


@dataclass
class Built:
    model: Any
    tokenizer: Any
    train_ds: Any
    eval_ds: Optional[Any]
    model_path: str  # what config.json records and --overwrite must not delete
    config_extra: Dict[str, Any] = field(default_factory=dict)  # task facts for config.json


class Task:
    name: str = ""
    defaults: Dict[str, Any] = {}  # TrainConfig fields that differ from the dataclass defaults
    default_lrs: Dict[Tuple[str, str], float] = {}  # (mode, optimizer) -> lr
    default_steps_per_group: int = 1  # HiFT's consecutive steps per group (TrainConfig.steps_per_group=None)
    # HiFT's layer units per group when TrainConfig.group_size is None: an int (any model), or an
    # unequal split, bottom to top, tuned on the task's default model and carried to other models in
    # proportion (group_size_for); each task sets its own
    default_group_size: Union[int, Tuple[int, ...]] = 1
    rate_unit: str = "ex"  # the progress bar's speed: examples/s or tokens/s
    plot_eval: Tuple[str, str, float] = ("eval_accuracy", "eval accuracy (%)", 100.0)  # key, label, scale

    shipped_data_name: str = ""  # what the package ships for this task (for messages)

    def shipped(self, split: str) -> str:
        """Path of the shipped ``split`` ("train" or "dev")."""
        raise NotImplementedError

    def group_size_for(self, num_units: int) -> Union[int, Tuple[int, ...]]:
        """What ``group_size=None`` means on a model of ``num_units`` layer units."""
        if isinstance(self.default_group_size, int):
            return self.default_group_size
        from hift_ext.grouping import proportional_split

        return proportional_split(self.default_group_size, num_units)

    def default_model_name(self) -> str:
        from hift_ext.model_source import DEFAULT_NAMES

        return DEFAULT_NAMES[self.name]

    def data_paths(self, cfg) -> Tuple[str, Optional[str]]:
        """--train/--eval, or the shipped train/dev splits when neither is given."""
        if cfg.train is None and cfg.eval is None:
            return self.shipped("train"), self.shipped("dev")
        if cfg.train is None:
            raise UsageError(f"--eval needs --train too (the shipped {self.shipped_data_name} is used only when "
                             "neither is given)")
        return cfg.train, cfg.eval

    def load_data(self, cfg, train_path: str, eval_path: Optional[str]) -> Any:
        raise NotImplementedError

    def build(self, cfg, data: Any, log: Callable[[str], None]) -> Built:
        raise NotImplementedError

    def loss(self, model, batch: Dict[str, Any], host_batch: Dict[str, Any]):
        """The mean loss of a micro-batch: ``batch`` on the model's device, ``host_batch`` the same
        tensors as the dataset's ``collate`` made them (on the CPU: shapes and positions read there
        cost no device synchronization)."""
        return model(**batch).loss

    def evaluate(self, built: Built, cfg, device, autocast, *, final: bool,
                 ranks=None) -> Tuple[Dict[str, Any], Dict[str, str]]:
        """(the eval record for metrics.jsonl, {file name in OUTPUT: text} to write, e.g. samples).
        Under torchrun (``ranks``, a :class:`hift_ext.distributed.Ranks`) every rank calls it: each
        evaluates its share and the figures are summed over the ranks; rank 0 writes the files."""
        raise NotImplementedError

    def eval_message(self, ev: Dict[str, Any]) -> str:
        raise NotImplementedError

    def final_metrics(self, evals: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        raise NotImplementedError

    def summary_rows(self, m: Dict[str, Any]) -> List[Tuple[str, str]]:
        raise NotImplementedError
