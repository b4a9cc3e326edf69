"""Command line: ``python -m advent_fast.train [--config PRESET] [--mode MODE] ...``.

Without data arguments it trains the small model on the embedded data (generated on first use)
and prints the target validation mIoU. Several processes: ``torchrun --nproc_per_node=K -m
advent_fast.train ...`` (NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

from . import checkpoint as ckpt_io
from . import distributed as dist_utils
from .config import (CHOICES, DEFAULT_PRESET, MODES, ConfigError, dump_config, from_dict, list_presets,
                     load_config, merge, set_value, validate)
from .preemption import TrainingStopped
from .trainer import CHECKPOINT_NAME, Trainer, TrainingDiverged, default_run_dir


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m advent_fast.train",
        description="Train ADVENT (MinEnt / AdvEnt) for unsupervised domain adaptation in semantic "
                    "segmentation. Defaults: the embedded data and the small model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m advent_fast.train --mode advent\n"
               "  python -m advent_fast.train --config gta2cityscapes_r101 --mode minent_er \\\n"
               "      --source-root GTA5 --target-root Cityscapes \\\n"
               "      --init-weights DeepLab_resnet_pretrained_imagenet.pth\n"
               "  python -m advent_fast.train --resume runs/NAME --set train.stop_iter=4000\n"
               "  python -m advent_fast.train --config gta2cityscapes_r101 ... --run-dir runs/NAME --auto-resume\n"
               "  torchrun --nproc_per_node=4 -m advent_fast.train --config gta2cityscapes_r101 ... \\\n"
               "      --set train.source_batch_size=4 --set train.target_batch_size=4",
    )
    p.add_argument("--config", default=None, metavar="PRESET|FILE",
                   help=f"a preset ({', '.join(list_presets())}), a YAML file, or the release's experiment file "
                        f"(advent/scripts/configs/advent.yml) (default: {DEFAULT_PRESET})")
    p.add_argument("--mode", choices=MODES, help="train.mode")
    p.add_argument("--source-root", metavar="DIR", help="data.source_root (GTA5, SYNTHIA or Cityscapes root)")
    p.add_argument("--target-root", metavar="DIR", help="data.target_root (Cityscapes root)")
    p.add_argument("--init-weights", metavar="FILE", help="model.init_weights (ImageNet weights or a checkpoint)")
    p.add_argument("--class-prior", metavar="FILE", help="train.class_prior: adds the class-ratio prior loss")
    p.add_argument("--fast-path", action=argparse.BooleanOptionalAction, default=None,
                   help="train.fast_path (default: on for GPUs): upsampling fused into the losses, fused "
                        "optimisers, bf16 autocast and channels_last unless set otherwise; --no-fast-path "
                        "runs the release-style step")
    p.add_argument("--precision", choices=CHOICES["train.precision"],
                   help="train.precision (auto: bf16 on the GPU fast path, fp16 on GPUs without bf16 tensor "
                        "cores, fp32 on those without tensor cores and off the fast path)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="train.channels_last (default: with the fast path)")
    p.add_argument("--compile", choices=CHOICES["train.compile"],
                   help="train.compile: torch.compile mode of the generator and discriminators")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="train.cuda_graph: replay the whole step as one CUDA graph (fast path, one GPU)")
    p.add_argument("--fused-batchnorm", action=argparse.BooleanOptionalAction, default=None,
                   help="train.fused_batchnorm: BatchNorm (train mode, or a folded frozen one's shift) "
                        "with the residual add and ReLU in fused kernels (GPU)")
    p.add_argument("--space-to-batch", action=argparse.BooleanOptionalAction, default=None,
                   help="train.space_to_batch: the backbone's dilated convolutions run undilated on the "
                        "input's phases (same values)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="train.activation_checkpointing: recompute the backbone's blocks in the backward "
                        "(less memory, about one more backbone forward per step)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="train.deterministic: bit-identical runs from one seed on a GPU (deterministic "
                        "cuDNN and torch algorithms; on CUDA with the fast path's fused losses)")
    p.add_argument("--run-dir", metavar="DIR", help="run.dir: config, metrics, checkpoints go here")
    p.add_argument("--resume", metavar="RUN_DIR|CHECKPOINT",
                   help="continue a run from its checkpoint (the config comes from the checkpoint)")
    p.add_argument("--auto-resume", action="store_true",
                   help="with --run-dir: continue that run if it holds a checkpoint of this same config, else "
                        "start it (the one command line of a job that a scheduler may stop and requeue)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def flag_updates(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """The dedicated flags as a nested config dict."""
    flags = {("train", "mode"): args.mode, ("data", "source_root"): args.source_root,
             ("data", "target_root"): args.target_root, ("model", "init_weights"): args.init_weights,
             ("train", "class_prior"): args.class_prior, ("train", "precision"): args.precision,
             ("train", "channels_last"): args.channels_last, ("train", "fast_path"): args.fast_path,
             ("train", "compile"): args.compile, ("train", "cuda_graph"): args.cuda_graph,
             ("train", "fused_batchnorm"): args.fused_batchnorm, ("train", "space_to_batch"): args.space_to_batch,
             ("train", "activation_checkpointing"): args.activation_checkpointing,
             ("train", "deterministic"): args.deterministic,
             ("run", "dir"): args.run_dir}
    updates: Dict[str, Dict[str, Any]] = {}
    for (section, key), value in flags.items():
        if value is not None:
            updates.setdefault(section, {})[key] = value
    return updates


def resolve(args: argparse.Namespace):
    """(config, resume state or None, run dir) from the command line."""
    if args.resume is None:
        config = load_config(args.config or DEFAULT_PRESET, args.overrides, flag_updates(args))
        return _auto_resume(config) if args.auto_resume else (config, None, None)
    if args.auto_resume:
        raise ConfigError("--auto-resume finds the checkpoint in --run-dir itself; drop --resume")
    if args.config is not None:
        raise ConfigError("--resume takes the config from the checkpoint; drop --config "
                          "(change keys with --set)")
    path = os.path.join(args.resume, CHECKPOINT_NAME) if os.path.isdir(args.resume) else args.resume
    state = _resumable_state(path)
    config = from_dict(state["config"])
    for assignment in args.overrides:
        set_value(config, assignment)
    merge(config, flag_updates(args), source="command line")
    validate(config)
    run_dir = config.run.dir if args.run_dir else os.path.dirname(os.path.abspath(path))
    return config, state, run_dir


def _resumable_state(path: str) -> Dict[str, Any]:
    state = ckpt_io.load(path)
    ckpt_io.check_resumable(state, path)
    return state


def _auto_resume(config):
    """--auto-resume with the command line's ``config``: its run folder's checkpoint if it has one (trained with
    this same config), else a new run there."""
    if config.run.dir is None:
        raise ConfigError("--auto-resume needs --run-dir (or run.dir): the folder a requeued job goes on in")
    path = os.path.join(config.run.dir, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        return config, None, None
    state = _resumable_state(path)
    saved, now = _flat(from_dict(state["config"]).to_dict()), _flat(config.to_dict())
    changed = [f"{key}: {saved.get(key)!r} there, {now.get(key)!r} here" for key in sorted(saved.keys() | now.keys())
               if saved.get(key) != now.get(key)]
    if changed:
        raise ConfigError(f"{config.run.dir} holds a run of another config ({'; '.join(changed)}); continue it "
                          f"with --resume {config.run.dir} (changing keys with --set) or choose another --run-dir")
    return config, state, config.run.dir


def _flat(values: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    return {f"{section}.{key}": value for section, keys in values.items() for key, value in keys.items()}


def prepare_run_dir(config, run_dir: Optional[str], resuming: bool) -> str:
    run_dir = run_dir or config.run.dir or default_run_dir(config)
    if not resuming and os.path.isfile(os.path.join(run_dir, CHECKPOINT_NAME)):
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                          f"or choose another --run-dir")
    config.run.dir = run_dir
    return run_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        try:
            config, _, _ = resolve(args)
        except (ConfigError, ckpt_io.CheckpointError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(dump_config(config), end="")
        return 0
    try:
        ctx = dist_utils.init(args.device)
    except ValueError as exc:  # a device this machine does not have
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            config, state, run_dir = resolve(args)
            error = None
            if ctx.is_main:  # the writer decides; the other processes follow (or stop with it)
                try:
                    run_dir = prepare_run_dir(config, run_dir, state is not None)
                except ConfigError as exc:
                    error = str(exc)
            run_dir, error = dist_utils.broadcast_object((run_dir, error), ctx)
            if error:
                raise ConfigError(error)
            config.run.dir = run_dir
            trainer = Trainer(config, ctx, run_dir, resume=state)
        except (ConfigError, ckpt_io.CheckpointError, FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if ctx.is_main:
            print(f"run: {run_dir} | mode {config.train.mode} | {config.model.arch} on {ctx.device}"
                  f" x{ctx.world_size} | {trainer.settings.describe()} | iterations {trainer.iteration} -> "
                  f"{config.train.stop_iter}",
                  flush=True)
        start = time.perf_counter()
        try:
            result = trainer.fit()
        except TrainingDiverged as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
        except TrainingStopped as exc:
            if ctx.is_main:
                print(f"{exc}; go on with: python -m advent_fast.train --resume {run_dir}", file=sys.stderr,
                      flush=True)
            return exc.exit_code
        if ctx.is_main:
            best = max(trainer.evaluations, key=lambda e: e["miou"])
            print(f"target val mIoU: {result['miou']:.2f} at iteration {trainer.iteration} "
                  f"(best {best['miou']:.2f} at {best['iter']}); {time.perf_counter() - start:.0f} s; "
                  f"run folder {run_dir}", flush=True)
        return 0
    finally:
        dist_utils.shutdown()


def exit_process(code: int) -> None:
    """Exit with ``code``. A process of a multi-process run leaves without finalising the interpreter:
    gloo's worker threads outlive destroy_process_group (the DDP wrappers keep the group alive) and may
    still be releasing the last collective's tensors then, which needs the GIL and aborts the process
    (SIGABRT, "terminate called without an active exception") after a finished run, under load about
    once in 20 (torch 2.11; pytorch/pytorch#179291). Everything is written and closed by then."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
