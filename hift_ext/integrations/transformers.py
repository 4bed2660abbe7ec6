"""HiFT with the transformers ``Trainer``.

    from transformers import Trainer, TrainingArguments
    from hift_ext.integrations.transformers import (
        HiFTCallback, create_hift_optimizer_and_scheduler, num_training_steps)

    args = TrainingArguments(output_dir="out", learning_rate=2e-4, num_train_epochs=3,
                             per_device_train_batch_size=32, lr_scheduler_type="linear",
                             warmup_steps=0.06, weight_decay=0.01, save_steps=100)
    steps = num_training_steps(args, len(train_dataset))
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset,
                      optimizers=create_hift_optimizer_and_scheduler(model, args, steps),
                      callbacks=[HiFTCallback()])
    trainer.train()                        # or trainer.train(resume_from_checkpoint=True)

What comes from ``TrainingArguments``: ``learning_rate``, ``weight_decay``, ``adam_beta1/2`` and
``adam_epsilon`` (AdamW), ``lr_scheduler_type``, ``lr_scheduler_kwargs`` and the warmup
(``args.get_warmup_steps``), all through the *delayed* schedule of :mod:`hift_ext.lr` (the LR is
held within a cycle of k * K steps, or a visit of K steps with ``lr_hold="visit"``, on the run's own
horizon; a warmup warms up from the first cycle on), and ``seed`` (the ``random`` strategy).
``steps_per_group=K`` takes K consecutive optimizer steps on each group before switching.
The rest needs nothing from us, because the HiFT optimizer keeps the contracts Trainer relies on:

* ``gradient_accumulation_steps``: ``requires_grad`` flips only in ``step()`` (at a switch), so every
  micro-batch of an accumulation trains the same group, and every optimizer step (not micro-batch)
  counts towards ``steps_per_group``;
* ``max_grad_norm``: Trainer clips the gradients that exist, i.e. the active group's;
* ``fp16`` / ``bf16``: the optimizer supports GradScaler's ``grad_scale``/``found_inf``; an overflow
  step changes nothing, and neither the group schedule nor the LR advances (the group is retried);
* the learning rate, weight decay, betas, epsilon, momentum and ``max_grad_norm`` are checked with
  the rules ``hift-ext finetune`` uses (:mod:`hift_ext.hparams`): inf/NaN or out of range raises
  ValueError naming the argument, before anything trains;
* ``save_steps`` / ``resume_from_checkpoint``: ``optimizer.pt`` holds every group's state plus the
  group schedule, ``scheduler.pt`` the LR position; both load with ``torch.load(weights_only=True)``,
  so a resumed run ends with the same weights as an uninterrupted one.

``num_training_steps`` must be the number of optimizer steps Trainer will take (the LR horizon);
:func:`num_training_steps` computes it from the arguments the way Trainer does (``max_steps`` wins),
with the batches split over ``args.world_size`` processes.

Many processes (``torchrun --nproc-per-node N train.py`` or ``accelerate launch``): the HiFT optimizer
synchronizes the ranks itself, so the model must stay out of DDP (DDP registers the parameters that
require grad when it wraps the model; HiFT switches them). :func:`create_hift_optimizer_and_scheduler`
does both halves when ``args.world_size > 1``: it marks the model as already prepared for accelerate
(``model._is_accelerate_prepared = True``: Trainer's ``accelerator.prepare`` then neither wraps it in
DDP nor moves it, so put the model on ``args.device`` before calling it), and it lets Trainer's
accumulation decide which backward synchronizes (accelerate's ``GradientState.sync_gradients``, set
by Trainer for the last micro-batch of each optimizer step): one gradient synchronization per
optimizer step, of the active group only. Trainer shards the data over the processes as usual, and
clips the synchronized gradients. Not supported yet under Trainer: ``shard_state=True`` (Trainer
clips with torch's clip_grad_norm_ and saves the optimizer on rank 0 alone; use ``hift-ext
finetune --shard-state``) and ``fp16``/``bf16`` autocast (accelerate applies it while preparing the
model; load the model in bfloat16 instead: HiFT keeps fp32 master weights).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import torch

__all__ = ["create_hift_optimizer_and_scheduler", "num_training_steps", "HiFTCallback", "OPTIMIZERS",
           "keep_out_of_ddp", "ResponseLogitsCollator"]

OPTIMIZERS = ("adamw", "adagrad", "sgd")


def _optimizer_class(name: str):
    from hift_ext import hift_optim

    try:
        return {"adamw": hift_optim.FusedHiFTAdamW, "adagrad": hift_optim.FusedHiFTAdaGrad,
                "sgd": hift_optim.FusedHiFTSGD}[name]
    except KeyError:
        raise ValueError(f"unknown HiFT optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None


def num_training_steps(args, num_examples: int) -> int:
    """Optimizer steps Trainer takes for ``num_examples`` training examples, on ``args.world_size``
    processes (accelerate gives each process every N-th batch, padding the last round)."""
    if getattr(args, "max_steps", -1) and args.max_steps > 0:
        return int(args.max_steps)
    batch = args.per_device_train_batch_size * max(1, getattr(args, "n_gpu", 1) or 1)
    n_batches = len(range(0, num_examples, batch)) if not args.dataloader_drop_last else num_examples // batch
    world = max(1, int(getattr(args, "world_size", 1) or 1))
    if world > 1:  # batches per process
        n_batches = n_batches // world if args.dataloader_drop_last else math.ceil(n_batches / world)
    per_epoch = max(1, math.ceil(n_batches / args.gradient_accumulation_steps))
    return int(math.ceil(args.num_train_epochs * per_epoch))


def create_hift_optimizer_and_scheduler(
    model: torch.nn.Module,
    args,
    num_training_steps: int,
    optimizer: str = "adamw",
    group_size: Union[int, Sequence[int]] = 1,
    strategy: str = "down2up",
    seed: Optional[int] = None,
    offload: bool = False,
    steps_per_group: int = 1,
    lr_hold: Optional[str] = None,
    **optimizer_kwargs: Any,
) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """(HiFT optimizer, delayed LR scheduler) for ``Trainer(..., optimizers=...)``.

    Args:
        model: the model Trainer trains (the optimizer groups its layer units bottom to top).
        args: the ``TrainingArguments``.
        num_training_steps: the LR schedule's horizon in optimizer steps (see :func:`num_training_steps`).
        optimizer: ``"adamw"`` (FusedHiFTAdamW), ``"adagrad"`` or ``"sgd"``.
        group_size: layer units per HiFT group (the paper's m), or a list of each group's units,
            bottom to top (an unequal split).
        strategy: ``"down2up"``, ``"up2down"`` or ``"random"``.
        seed: seed of the ``random`` strategy (default ``args.seed``).
        offload: keep inactive groups' optimizer state in host memory (GPU training).
        steps_per_group: K, consecutive optimizer steps on each group before switching (1: HiFT
            as in the paper; an AMP-skipped step does not count).
        lr_hold: how long the delayed LR is held: ``"cycle"`` (k * K steps), ``"visit"`` (K steps)
            or None (:data:`hift_ext.lr.DEFAULT_HOLD`).
        **optimizer_kwargs: override/extend the base optimizer's arguments (e.g. ``momentum=0.9``
            for SGD, ``amsgrad=True``).
    """
    from hift_ext.lr import check_hold, get_scheduler

    cls = _optimizer_class(optimizer)
    kw: dict = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if optimizer == "adamw":
        kw.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    elif optimizer == "sgd":
        kw.setdefault("momentum", 0.9)
    kw.update(optimizer_kwargs)
    _check_hparams(kw, args, optimizer_kwargs)
    check_hold(lr_hold)  # before the optimizer freezes anything
    world = _world_size(args)
    if world > 1:
        _check_distributed(args, kw)
    opt = cls(model, group_size=group_size, strategy=strategy,
              seed=args.seed if seed is None else seed, steps_per_group=steps_per_group, offload=offload, **kw)
    if opt.data_parallel is not None:
        keep_out_of_ddp(model)
        sync = _trainer_sync_flag()
        if sync is not None:
            opt.data_parallel.should_sync = sync
    name = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    sched = get_scheduler(name, opt, num_warmup_steps=args.get_warmup_steps(num_training_steps),
                          num_training_steps=num_training_steps, hold=lr_hold, **(args.lr_scheduler_kwargs or {}))
    return opt, sched


def _world_size(args) -> int:
    """Processes of the launch; reading ``args.device`` first makes TrainingArguments join them."""
    try:
        args.device  # noqa: B018 - sets up the process group under torchrun / accelerate launch
    except Exception:  # noqa: BLE001 - e.g. a mock without devices
        pass
    return max(1, int(getattr(args, "world_size", 1) or 1))


def _check_distributed(args, kw: dict) -> None:
    if kw.get("shard_state"):
        raise ValueError(
            "shard_state=True is not supported under transformers.Trainer yet: Trainer clips the gradients "
            "with torch's clip_grad_norm_ (each rank would see its part of them only) and saves the optimizer "
            "on rank 0 alone (the sharded state_dict is a collective). Leave shard_state off with Trainer "
            "(the optimizer state is replicated), or use `hift-ext finetune --shard-state`")
    if getattr(args, "fp16", False) or getattr(args, "bf16", False):
        raise ValueError(
            "fp16/bf16 autocast under Trainer on several processes is not supported with HiFT yet: the model "
            "is kept out of accelerate's preparation (no DDP), which is where the autocast is applied. Load "
            "the model in bfloat16 instead (model.to(torch.bfloat16): HiFT keeps fp32 master weights) and "
            "leave args.fp16/bf16 off")


def keep_out_of_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """Keep ``model`` out of accelerate's DDP wrapping: the HiFT optimizer synchronizes it. Marks the
    model as prepared, so ``accelerator.prepare`` returns it as it is (no DDP, no device move, no
    autocast); called by :func:`create_hift_optimizer_and_scheduler` on several processes."""
    model._is_accelerate_prepared = True
    return model


def _trainer_sync_flag():
    """accelerate's GradientState.sync_gradients (Trainer sets it for each micro-batch: True for the
    last one of an optimizer step, also a shorter last one of an epoch), or None without accelerate."""
    try:
        from accelerate.state import GradientState
    except ImportError:  # pragma: no cover
        return None
    state = GradientState()

    def should_sync() -> bool:
        return bool(getattr(state, "sync_gradients", True))

    return should_sync


_ARG_NAMES = {"lr": "args.learning_rate", "weight_decay": "args.weight_decay", "eps": "args.adam_epsilon"}


def _check_hparams(kw: dict, args, overrides: dict) -> None:
    """The range rules ``hift-ext finetune`` applies (hift_ext.hparams), named as the caller set
    them: an inf/NaN learning rate or decay would otherwise train to NaN weights."""
    from hift_ext import hparams

    def name(key: str) -> str:
        return f"{key} (keyword argument)" if key in overrides else _ARG_NAMES.get(key, key)

    hparams.check_all({k: kw[k] for k in ("lr", "weight_decay", "momentum", "eps") if k in kw},
                      names={k: name(k) for k in kw})
    for i, b in enumerate(kw.get("betas") or ()):
        hparams.check(f"betas[{i}] (keyword argument)" if "betas" in overrides else f"args.adam_beta{i + 1}",
                      b, hparams.RULES["beta"])
    hparams.check("args.max_grad_norm", getattr(args, "max_grad_norm", 0.0) or 0.0, hparams.RULES["max_grad_norm"])


class ResponseLogitsCollator:
    """Wraps a causal-LM data collator (e.g. ``DataCollatorForSeq2Seq``) so that the model computes its
    vocabulary logits only from the batch's first response position on, as ``hift-ext finetune --task
    causal-lm`` does: each batch gains ``logits_to_keep`` and its labels lose the leading positions
    that predict no target (all -100). The model's own loss over the kept positions is the loss over
    the whole sequence (the same targets, the same count), while the head and the cross-entropy run
    on the response part only (in ``hift-ext finetune`` this saves about 15% of a SmolLM2-135M step on
    GSM8K: ``bench_sft.py``'s ``speed:loss_ab=1``). Logits and labels that Trainer's evaluation
    returns are cut alike.

    ``model``: the model Trainer trains; its ``forward`` must take ``logits_to_keep`` (transformers'
    causal LMs such as LLaMA, Mistral, Qwen2 do). Its output head gets a forward pre-hook that makes
    the head's input (the kept slice of the hidden states) contiguous
    (:func:`hift_ext.tasks.causal_lm.contiguous_head_input`: with the head frozen, as in most HiFT
    steps, the slice would otherwise cost a batched matrix product)."""

    def __init__(self, collator, model: torch.nn.Module):
        from hift_ext.tasks.causal_lm import _takes_logits_to_keep, contiguous_head_input

        if not callable(collator):
            raise TypeError(f"ResponseLogitsCollator wraps a data collator (a callable), got {type(collator).__name__}")
        if not _takes_logits_to_keep(model):
            raise ValueError(f"{type(model).__name__}.forward takes no logits_to_keep argument, so its logits "
                             "cannot be cut to the response: use the data collator without ResponseLogitsCollator")
        contiguous_head_input(model)
        self.collator = collator

    def __call__(self, features):
        from hift_ext.tasks.causal_lm import first_target_position

        batch = self.collator(features)
        labels = batch.get("labels") if hasattr(batch, "get") else None
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            return batch
        first = first_target_position(labels)
        if first:  # logits of positions first..length-1; the loss shifts the labels by one itself
            batch["labels"] = labels[:, first:].contiguous()
            batch["logits_to_keep"] = labels.shape[1] - first
        return batch


def _unwrap(opt):
    # Trainer wraps the optimizer in accelerate's AcceleratedOptimizer (``.optimizer`` is ours).
    while opt is not None and not hasattr(opt, "active_group") and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


try:
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:  # pragma: no cover - transformers is optional for the rest of hift_ext
    _TrainerCallback = object


class HiFTCallback(_TrainerCallback):
    """Adds the HiFT group to Trainer's logs (``hift_group`` = the group the next step updates,
    ``hift_num_groups``, ``hift_position``; ``hift_steps_per_group`` when it is not 1). Optional:
    training is correct without it."""

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        opt = _unwrap(optimizer)
        if logs is not None and opt is not None and hasattr(opt, "active_group"):
            logs["hift_group"] = int(opt.active_group)
            logs["hift_num_groups"] = int(opt.num_groups)
            logs["hift_position"] = int(opt.hift_position)
            if getattr(opt, "steps_per_group", 1) != 1:
                logs["hift_steps_per_group"] = int(opt.steps_per_group)
        return control
