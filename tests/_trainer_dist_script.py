"""transformers.Trainer with HiFT, one process or several (torchrun); for test_distributed_cli.py.

    [torchrun --standalone --nproc-per-node 2] python _trainer_dist_script.py OUT PER_DEVICE_BATCH

A tiny BERT classifier without dropout, 48 random examples, gradient accumulation 2, one epoch
(6 optimizer steps, a checkpoint at step 6). Rank 0 saves the final weights and what the test checks
into OUT/result.pt.
"""
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from hift_ext.integrations.transformers import HiFTCallback, create_hift_optimizer_and_scheduler, num_training_steps


class RandomData(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def main():
    out, per_device = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    # average_tokens_across_devices=False: BERT's classification loss is a plain mean (it ignores the
    # num_items_in_batch Trainer would divide by), so Trainer's token averaging would scale the loss
    # by the number of processes (under DDP as well); without it, N processes train as one
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=per_device, gradient_accumulation_steps=2,
                             num_train_epochs=1, learning_rate=1e-2, weight_decay=0.01, lr_scheduler_type="linear",
                             warmup_steps=0, logging_steps=1, save_strategy="steps", save_steps=6, report_to=[],
                             disable_tqdm=True, use_cpu=True, seed=0, max_grad_norm=1.0,
                             average_tokens_across_devices=False)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    data = RandomData(48, 8, 100)
    steps = num_training_steps(args, len(data))
    opt, sched = create_hift_optimizer_and_scheduler(model, args, steps, group_size=1)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched), callbacks=[HiFTCallback()])
    trainer.train()
    if args.process_index == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "wrapped_in_ddp": isinstance(trainer.model_wrapped, DistributedDataParallel),
                    "world_size": args.world_size, "global_step": trainer.state.global_step,
                    "hift_position": opt.hift_position, "steps": steps,
                    "grad_syncs": opt.comm_stats().get("grad_syncs", 0)},
                   os.path.join(out, "result.pt"))


if __name__ == "__main__":
    main()
