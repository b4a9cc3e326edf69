"""The ADVENT training loop: one step function for every mode; flags decide which losses run.

One iteration follows the release (REFERENCE §3): zero grads; poly lr; freeze the discriminators;
source forward, upsample, segmentation loss, backward; target forward, upsample, the target
losses of each head from ONE fused call (self-information for D, entropy, class prior),
backward; unfreeze D; D on detached source and target maps, each BCE / 2, backward; step G,
then both D.

The fast path (``train.fast_path``, on by default on GPUs; :class:`StepSettings`) computes the same
losses from the 1/8-resolution logits with the upsampling fused into the loss kernels
(:mod:`advent_fast.upsampled`), so the full-resolution logits and their gradients never exist; it
also uses fused optimisers, folds frozen BatchNorm into the convolutions, and by default bf16
autocast with channels_last. Its step never waits for the device (the optimisers skip a
non-finite step themselves; the loop reads the losses a step later), so the whole step can be
replayed as one CUDA graph (``train.cuda_graph``, :mod:`advent_fast.cuda_graph`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

import advent_fast

from . import backend
from . import checkpoint as ckpt_io
from . import distributed as dist_utils
from . import reference
from .config import Config, save_config
from .data.classes import IGNORE_LABEL
from .preemption import StopSignals, TrainingStopped, ignore_stop_signals

SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0  # release labels (the paper writes 1 / 0)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_NAME = "checkpoint.pt"
SNAPSHOT_NAME = re.compile(r"^model_(\d+)\.pt$")  # the generator snapshots a run writes (snapshots/)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


@dataclass(frozen=True)
class LossPlan:
    """Which losses a mode trains; the one step function reads only these flags."""

    adversarial: bool  # fool D with the target self-information; train D
    entropy: bool  # MinEnt on the target
    top_k: Optional[float]  # entropy ranking: fraction of pixels kept (MinEnt+ER)
    class_prior: bool  # class-ratio prior on the target

    @property
    def target(self) -> bool:
        return self.adversarial or self.entropy or self.class_prior

    @classmethod
    def for_mode(cls, mode: str, ranking_ratio: float, class_prior: bool) -> "LossPlan":
        return cls(
            adversarial=mode in ("advent", "advent_minent"),
            entropy=mode in ("minent", "minent_er", "advent_minent"),
            top_k=ranking_ratio if mode == "minent_er" else None,
            class_prior=class_prior,
        )


@dataclass(frozen=True)
class StepSettings:
    """What ``train.fast_path``, ``precision``, ``channels_last`` and ``compile`` mean on a device."""

    fast_path: bool
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    upsampled_losses: bool  # losses from the low-resolution logits, upsampling fused into the kernels
    fold_frozen_bn: bool  # frozen BatchNorm folded into the convolutions (needs model.freeze_bn)
    compile: str  # torch.compile mode of G and D, or "none"
    loss_backend: str  # advent_fast's backend on the device: triton fuses the upsampling, others interpolate first
    # Nothing in the step waits for the device: the fused optimisers skip a step with non-finite
    # losses on the device and read their learning rates from device tensors (with fp16, also a step whose
    # scaled gradients overflow: the gradient scaler's check and scale update run on the device too).
    sync_free: bool
    cuda_graph: bool  # the whole step replayed as one CUDA graph (advent_fast.cuda_graph)
    # train.cuda_graph null: a failed capture or a new batch shape falls back to eager steps (true: an error)
    cuda_graph_fallback: bool
    # How gradients are averaged over processes: ddp (DistributedDataParallel), after_backward (all-reduced
    # after the step's backwards, the optimisers then run outside a captured graph) or none (one process)
    gradient_sync: str
    activation_checkpointing: bool  # backbone blocks recomputed in the backward (memory for compute)
    fused_batchnorm: bool  # BatchNorm (+ residual, + ReLU) in the fused kernels (advent_fast.batch_norm)
    classifier_channels_multiple: int  # the classifier's output channels padded to a multiple of this
    space_to_batch: bool  # the backbone's dilated convolutions run undilated on the input's phases
    fused_weight_casts: bool  # a step's 16-bit weights made by one node (advent_fast.weight_casts)
    deterministic: bool  # deterministic algorithms only: bit-identical runs from one seed

    @classmethod
    def resolve(cls, config: Config, device: torch.device, distributed: bool = False) -> "StepSettings":
        """``distributed``: the run has several processes."""
        t = config.train
        fast = device.type == "cuda" if t.fast_path is None else t.fast_path
        precision = t.precision
        if precision == "auto":
            gpu = fast and device.type == "cuda"
            precision = backend.auto_precision(device) if gpu else "fp32"
        if t.cuda_graph and (device.type != "cuda" or not fast):
            raise ValueError(f"train.cuda_graph needs a CUDA device and the fast path (this run: device "
                             f"{device.type}, fast path {'on' if fast else 'off'})")
        if t.cuda_graph and distributed and t.gradient_sync == "ddp":
            raise ValueError("train.cuda_graph with several processes needs train.gradient_sync after_backward "
                             "(or auto): the graph cannot hold DDP's all-reduces")
        # null: the graph wherever it can be. The config has refused true with compile: reduce-overhead
        # (CUDA graphs of its own); a compiled G and D inside the graph is left to an explicit true.
        cuda_graph = t.cuda_graph if t.cuda_graph is not None else (
            device.type == "cuda" and fast and t.compile == "none"
            and not (distributed and t.gradient_sync == "ddp"))
        gradient_sync = t.gradient_sync
        if gradient_sync == "auto":
            gradient_sync = ("after_backward" if cuda_graph else "ddp") if distributed else "none"
        loss_backend = advent_fast.get_backend(device)
        upsampled_losses = fast and t.target_losses == "fused"
        if t.deterministic and device.type == "cuda" and not (upsampled_losses and loss_backend == "triton"):
            raise ValueError("train.deterministic on CUDA needs the fast path with train.target_losses fused (the "
                             "upsampling fused into the Triton losses): the upsampling backward and NLLLoss that "
                             f"the other steps run have no deterministic CUDA kernels (this run: fast path "
                             f"{'on' if fast else 'off'}, target_losses {t.target_losses}, loss backend "
                             f"{loss_backend})")
        return cls(
            fast_path=fast,
            precision=precision,
            channels_last=fast if t.channels_last is None else t.channels_last,
            upsampled_losses=upsampled_losses,
            fold_frozen_bn=fast and config.model.freeze_bn,
            compile=t.compile,
            loss_backend=loss_backend,
            sync_free=fast,
            cuda_graph=cuda_graph,
            cuda_graph_fallback=t.cuda_graph is None,
            gradient_sync=gradient_sync,
            activation_checkpointing=t.activation_checkpointing,
            # frozen BatchNorm: only folded (the fast path) does it leave a pass to fuse, its shift
            fused_batchnorm=t.fused_batchnorm and (fast or not config.model.freeze_bn),
            classifier_channels_multiple=t.classifier_channels_multiple,
            space_to_batch=t.space_to_batch,
            fused_weight_casts=(t.fused_weight_casts and fast and precision != "fp32" and t.compile == "none"
                                and gradient_sync != "ddp"),
            deterministic=t.deterministic,
        )

    @property
    def fused_optimizers(self) -> bool:
        """Fused SGD / ReleaseSGD / Adam on the fast path (foreach on the release path)."""
        return self.fast_path

    def describe(self) -> str:
        if not self.fast_path:
            parts = ["fast path off", self.precision]
        else:
            parts = ["fast path", self.precision]
            if self.upsampled_losses:
                parts += ["upsample fused into the losses" if self.loss_backend == "triton"
                          else f"low-res logits to the {self.loss_backend} losses"]
            parts += ["fused optimisers"] + (["folded frozen BN"] if self.fold_frozen_bn else [])
            parts += ["no host sync in the step"] if self.sync_free else []
        parts += ["channels_last"] if self.channels_last else []
        parts += [f"torch.compile({self.compile})"] if self.compile != "none" else []
        if self.cuda_graph:
            parts += ["whole step as one CUDA graph" if self.gradient_sync != "after_backward"
                      else "forwards and backwards as one CUDA graph"]
        parts += ["gradients all-reduced after the backwards"] if self.gradient_sync == "after_backward" else []
        parts += ["activation checkpointing"] if self.activation_checkpointing else []
        if self.fused_batchnorm:
            parts += ["fused folded-BN shift + ReLU" if self.fold_frozen_bn else "fused train-mode BatchNorm"]
        parts += ["weights cast by one node a step"] if self.fused_weight_casts else []
        if self.classifier_channels_multiple > 1:
            parts += [f"classifier channels padded to a multiple of {self.classifier_channels_multiple}"]
        parts += ["dilated convolutions as space to batch"] if self.space_to_batch else []
        parts += ["deterministic algorithms"] if self.deterministic else []
        return ", ".join(parts)


def target_losses_function(name: str):
    """``train.target_losses``: the fused op (one read of the logits, fp32 inside whatever the
    logits' dtype) or the naive release-style reference, given fp32 logits."""
    if name == "fused":
        return advent_fast.target_losses

    def reference_target_losses(logits: torch.Tensor, **options) -> reference.TargetLosses:
        return reference.target_losses(logits.float(), **options)

    return reference_target_losses


def poly_lr(base_lr: float, iteration: int, max_iters: int, power: float) -> float:
    return base_lr * (1 - iteration / max_iters) ** power


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


class InfiniteSampler(Sampler[int]):
    """An endless stream of per-epoch permutations, consumed a global batch at a time.

    Stream element ``q`` is ``permutation(epoch = q // n)[q % n]``, each permutation drawn from
    its own generator seeded by (seed, stream, epoch): any position can be resumed without
    replaying. Each global batch is split over the processes, so K processes with batch B see
    the same images as one process with batch K * B.
    """

    def __init__(self, size: int, seed: int, stream: int, global_batch: int,
                 ctx: dist_utils.DistContext, start: int = 0):
        self.size, self.seed, self.stream = size, seed, stream
        self.global_batch, self.start = global_batch, start
        self.shard = dist_utils.shard_slice(global_batch, ctx)

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[int]:
        position, epoch, perm = self.start, -1, None
        while True:
            for q in range(position + self.shard.start, position + self.shard.stop):
                if q // self.size != epoch:
                    epoch = q // self.size
                    perm = self.permutation(epoch)
                yield int(perm[q % self.size])
            position += self.global_batch


STREAMS = {"source": 0, "target": 1}


def loader_workers(configured: Optional[int], device: torch.device) -> int:
    """``data.num_workers``; None: 0 on a CPU (loader processes would take cores from the compute
    threads), 4 on a GPU."""
    if configured is not None:
        return configured
    return 0 if device.type == "cpu" else 4


def training_batches(dataset: Dataset, stream: str, batch_size: int, ctx: dist_utils.DistContext, seed: int,
                     start: int = 0, workers: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """The endless batches of one training stream (``source`` or ``target``) for this process:
    ``batch_size`` is the global batch; loader processes (:func:`loader_workers`) decode ahead
    into pinned memory."""
    workers = loader_workers(workers, ctx.device)
    sampler = InfiniteSampler(len(dataset), seed, STREAMS[stream], batch_size, ctx, start=start)
    loader = DataLoader(dataset, batch_size=batch_size // ctx.world_size, sampler=sampler,
                        num_workers=workers, pin_memory=ctx.device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals)
    return iter(loader)


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over labelled pixels, averaged per image, then over images (fp32); an image
    without labelled pixels counts 0.

    With batch 1 this is the release's ``CrossEntropy2d``; the per-image mean makes a global
    batch give the same loss however it is split over processes.
    """
    ce = F.cross_entropy(logits.float(), label, ignore_index=IGNORE_LABEL, reduction="none")
    labelled = (label != IGNORE_LABEL).flatten(1).sum(1).clamp(min=1)
    return (ce.flatten(1).sum(1) / labelled).mean()


def upsampled_segmentation_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """:func:`segmentation_loss` of the logits upsampled to the label size (bilinear,
    align_corners=True), from the low-resolution logits without the upsampled ones."""
    per_image = torch.stack([advent_fast.upsampled_cross_entropy(logits[i:i + 1], label[i:i + 1],
                                                                 ignore_index=IGNORE_LABEL)
                             for i in range(logits.shape[0])])
    # An image without labelled pixels has a NaN mean (and a zero gradient): count it as 0.
    labelled = (label != IGNORE_LABEL).flatten(1).any(1)
    return torch.where(labelled, per_image, torch.zeros_like(per_image)).mean()


def bce_to(d_out: torch.Tensor, label: float) -> torch.Tensor:
    """Release ``bce_loss``: BCE-with-logits of every output against a constant label (fp32)."""
    d_out = d_out.float()
    return F.binary_cross_entropy_with_logits(d_out, torch.full_like(d_out, label))


def set_requires_grad(modules, flag: bool) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def to_device(batch: Dict[str, Any], device: torch.device, channels_last: bool) -> Dict[str, Any]:
    out = dict(batch)
    image = batch["image"].to(device, non_blocking=True)
    out["image"] = image.contiguous(memory_format=torch.channels_last) if channels_last else image
    if "label" in batch:
        out["label"] = batch["label"].to(device, non_blocking=True)
    return out


class DeviceBatches:
    """A stream's batches on the device. :meth:`prefetch` (called once the step is queued) takes the
    next batch from the loader and, on CUDA, copies it to the device on its own stream while the
    current step computes."""

    def __init__(self, batches: Iterator[Dict[str, Any]], device: torch.device, channels_last: bool):
        self.batches, self.device, self.channels_last = batches, device, channels_last
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead: Optional[Dict[str, Any]] = None

    def prefetch(self) -> None:
        if self.ahead is None:
            self.ahead = self._load()

    def _load(self) -> Dict[str, Any]:
        batch = next(self.batches)
        if self.copy_stream is None:
            return to_device(batch, self.device, self.channels_last)
        with torch.cuda.stream(self.copy_stream):
            return to_device(batch, self.device, self.channels_last)

    def __iter__(self) -> "DeviceBatches":
        return self

    def __next__(self) -> Dict[str, Any]:
        self.prefetch()
        batch, self.ahead = self.ahead, None
        if self.copy_stream is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.copy_stream)
            for value in batch.values():
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    value.record_stream(main)  # made on the copy stream, used (and freed) on the main one
        return batch


# ----------------------------------------------------------------------------------------------
# Building the pieces
# ----------------------------------------------------------------------------------------------
@dataclass
class Datasets:
    source: Dataset  # labelled
    target: Dataset  # target train split, no labels
    val: Dataset  # target val split, with labels


def build_datasets(config: Config, ctx: dist_utils.DistContext) -> Datasets:
    """Source, target and target-val sets (all built now: missing data fails before training);
    roots from the config, or the embedded data."""
    from .data import CityscapesDataset, GTA5Dataset, SynthiaDataset, ensure_embedded_data

    d = config.data
    source_size, target_size, label_size = d.source_size, d.target_size, d.eval_label_size
    if d.source == "embedded":
        # One process generates the data; the others read the cache it leaves.
        if ctx.is_main:
            embedded = ensure_embedded_data(d.embedded_root)
        dist_utils.barrier(ctx)
        if not ctx.is_main:
            embedded = ensure_embedded_data(d.embedded_root)
        if embedded.num_classes != d.num_classes:
            raise ValueError(f"the embedded data has {embedded.num_classes} classes but "
                             f"data.num_classes is {d.num_classes}")
        source_root, target_root = embedded.source_root, embedded.target_root
        source_size = source_size or list(embedded.source_size)
        target_size = target_size or list(embedded.target_size)
        label_size = label_size or list(embedded.label_size)
    else:
        source_root, target_root = d.source_root, d.target_root
        what = {"gta5": "GTA5 root (images/, labels/)", "synthia": "SYNTHIA-RAND-CITYSCAPES root (RGB/, GT/)",
                "cityscapes": "Cityscapes root with leftImg8bit/train and gtFine/train"}
        if source_root is None:
            raise FileNotFoundError(f"no source data: give --source-root PATH (the {what[d.source]}) "
                                    f"or set data.source_root")
        if target_root is None:
            raise FileNotFoundError("no target data: give --target-root PATH (the Cityscapes root "
                                    "with leftImg8bit/ and gtFine/) or set data.target_root")
    if d.source == "synthia":
        source = SynthiaDataset(source_root, size=source_size, list_path=d.source_list, image_reader=d.image_reader)
    elif d.source == "cityscapes":  # the oracle: Cityscapes train with its labels, at the source size
        source = CityscapesDataset(source_root, "train", size=source_size, label_size=source_size,
                                   num_classes=d.num_classes, list_path=d.source_list, image_reader=d.image_reader)
    else:
        source = GTA5Dataset(source_root, size=source_size, list_path=d.source_list,
                             num_classes=d.num_classes, image_reader=d.image_reader)
    target = CityscapesDataset(target_root, "train", size=target_size, label_size=None, num_classes=d.num_classes,
                               labels=False, list_path=d.target_list, image_reader=d.image_reader)
    val = CityscapesDataset(target_root, "val", size=target_size, label_size=label_size,
                            num_classes=d.num_classes, labels=True, list_path=d.val_list)
    if config.eval.max_images is not None:
        val = torch.utils.data.Subset(val, range(min(config.eval.max_images, len(val))))
    return Datasets(source, target, val)


def build_generator(config: Config) -> torch.nn.Module:
    from .models import build_model, load_training_init

    m = config.model
    options = {} if m.width is None else {"width": m.width}
    model = build_model(m.arch, config.data.num_classes, multi_level=m.multi_level,
                        freeze_bn=m.freeze_bn, **options)
    if m.init_weights is not None:
        load_training_init(model, m.init_weights)
    return model


def build_generator_optimizer(model: torch.nn.Module, config: Config, fused: bool = False) -> torch.optim.Optimizer:
    """SGD, heads at 10x; ``param_groups: release`` reproduces the release's repeated tensors
    (:class:`ReleaseSGD`)."""
    from .models import ReleaseSGD

    t = config.train
    groups = model.optim_parameters(t.lr, grouping=config.model.param_groups)
    if config.model.param_groups == "release":
        optimizer = ReleaseSGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=fused)
    else:
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                    fused=fused or None)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # the poly schedule scales each group's own lr
    return optimizer


def load_class_prior(config: Config, device: torch.device) -> Optional[torch.Tensor]:
    if config.train.class_prior is None:
        return None
    from .data import load_prior

    if not os.path.isfile(config.train.class_prior):
        raise FileNotFoundError(f"class prior file not found: {config.train.class_prior}")
    prior = load_prior(config.train.class_prior, config.data.num_classes)
    return prior.to(device=device, dtype=torch.float32).contiguous()


def default_run_dir(config: Config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{config.data.source}_{config.model.arch}_{config.train.mode}_{stamp}")


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class Trainer:
    """Generator, discriminators, optimisers and data streams of one run; see :meth:`fit`."""

    def __init__(self, config: Config, ctx: Optional[dist_utils.DistContext] = None,
                 run_dir: Optional[str] = None, resume: Optional[Dict[str, Any]] = None,
                 datasets: Optional[Datasets] = None):
        """``datasets``: the source / target / val sets to use instead of the config's (benchmarks)."""
        self.config = config
        self.ctx = ctx or dist_utils.DistContext()
        self.device = self.ctx.device
        self.settings = StepSettings.resolve(config, self.device, distributed=self.ctx.distributed)
        t = config.train
        self._use_deterministic_algorithms(t.deterministic, t.cudnn_benchmark)
        if config.run.cpu_threads is not None:
            torch.set_num_threads(config.run.cpu_threads)
        seed_everything(t.seed)
        self.plan = LossPlan.for_mode(t.mode, t.entropy_ranking_ratio, t.class_prior is not None)
        self.heads = ["main", "aux"] if config.model.multi_level else ["main"]
        self.target_losses = target_losses_function(t.target_losses)
        self.autocast_dtype = PRECISIONS[self.settings.precision]
        self.memory_format = torch.channels_last if self.settings.channels_last else torch.preserve_format

        self.data = datasets if datasets is not None else build_datasets(config, self.ctx)
        self.prior = load_class_prior(config, self.device)

        self.model = build_generator(config)
        if self.settings.fold_frozen_bn:
            from .models import fold_frozen_batchnorm

            fold_frozen_batchnorm(self.model)
        if self.settings.fused_batchnorm:
            from .models import use_fused_batchnorm

            use_fused_batchnorm(self.model)
        if self.settings.space_to_batch:
            from .models import use_space_to_batch

            use_space_to_batch(self.model)
        self.model.activation_checkpointing = self.settings.activation_checkpointing
        for head in self.model.heads():
            head.channels_multiple = self.settings.classifier_channels_multiple
        self.model.to(self.device, memory_format=self.memory_format)
        fused = self.settings.fused_optimizers
        self.opt_g = build_generator_optimizer(self.model, config, fused=fused)
        self.discriminators: Dict[str, torch.nn.Module] = {}
        self.opt_d: Dict[str, torch.optim.Optimizer] = {}
        if self.plan.adversarial:
            from .models import FCDiscriminator

            for head in self.heads:
                d = FCDiscriminator(config.data.num_classes, ndf=config.model.discriminator_width)
                self.discriminators[head] = d.to(self.device, memory_format=self.memory_format)
                self.opt_d[head] = torch.optim.Adam(d.parameters(), lr=t.lr_d, betas=tuple(t.betas_d),
                                                    fused=fused or None, capturable=self.settings.cuda_graph)
                self.opt_d[head].param_groups[0]["initial_lr"] = t.lr_d
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.settings.precision == "fp16")

        self.iteration = 0
        self.position = {"source": 0, "target": 0}  # stream elements consumed (global)
        self.nonfinite_steps = 0
        self.evaluations: List[Dict[str, Any]] = []
        self.optimizers = [self.opt_g, *self.opt_d.values()]  # stepped in this order: G, then each D
        if resume is not None:
            self.load_state(resume)
        self.saved_iteration = self.iteration if resume is not None else None
        if self.settings.sync_free:
            self._prepare_sync_free_optimizers()

        # After loading, every rank starts from rank 0's weights (the checkpoint's): DDP broadcasts
        # them when it wraps a module, after_backward here. Compiled modules share their parameters
        # with self.model / self.discriminators.
        modules = [self.model, *self.discriminators.values()]
        self.trained_parameters = [p for m in modules for p in m.parameters()]
        ddp = self.settings.gradient_sync == "ddp"
        if self.settings.gradient_sync == "after_backward":
            dist_utils.broadcast_tensors([t for m in modules for t in (*m.parameters(), *m.buffers())], self.ctx)
        self.generator = self._compiled(dist_utils.wrap(self.model, self.ctx) if ddp else self.model)
        self.d_train = {h: self._compiled(dist_utils.wrap(d, self.ctx) if ddp else d)
                        for h, d in self.discriminators.items()}
        self.d_frozen = {h: self._compiled(d) for h, d in self.discriminators.items()}
        self.metric_names = self._metric_names()
        self.captured = None
        if self.settings.cuda_graph:
            from .cuda_graph import CapturedStep

            # after_backward: the all-reduces and the optimisers run after each replay (_update)
            captured = self._compute if self.settings.gradient_sync == "after_backward" else self._step
            self.captured = CapturedStep(lambda s, t: captured(s, t, keep_logits=True), self.device,
                                         fallback=self.settings.cuda_graph_fallback)

        self.run_dir = run_dir
        self._tb = None

    # ---- one iteration ------------------------------------------------------------------------
    def _metric_names(self) -> List[str]:
        kinds = ["seg"]
        kinds += ["adv"] if self.plan.adversarial else []
        kinds += ["ent"] if self.plan.entropy else []
        kinds += ["cp"] if self.plan.class_prior else []
        kinds += ["d"] if self.plan.adversarial else []
        return [f"{k}_{h}" for k in kinds for h in self.heads]

    def _compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.settings.compile == "none":
            return module
        # The step's shapes are fixed: one specialised graph per input shape (G sees the source and
        # the target size) rather than a symbolic-shape recompile at the second shape.
        return torch.compile(module, mode=None if self.settings.compile == "default" else self.settings.compile,
                             dynamic=False)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # The weight casts cached here live for the step (_shared_weight_casts): a captured step makes
        # them inside the graph, once a replay, and never reuses an eager step's.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Both heads' logits: upsampled to the input size (release: bilinear, align_corners), or
        on the fast path at the model's resolution (the loss kernels upsample)."""
        with self._autocast():
            aux, main = self.generator(image)
            outputs = {"main": main, "aux": aux}
            if self.settings.upsampled_losses:
                return {h: outputs[h] for h in self.heads}
            return {h: upsample(outputs[h], image.shape[-2:]) for h in self.heads}

    def _segmentation_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.settings.upsampled_losses:
            return upsampled_segmentation_loss(logits, label)
        return segmentation_loss(logits, label)

    def _target_losses(self, logits: torch.Tensor, size, **options):
        """The fused target losses of ``logits`` upsampled to ``size`` (already upsampled unless on
        the fast path)."""
        if self.settings.upsampled_losses:
            return advent_fast.upsampled_target_losses(logits, tuple(size), **options)
        return self.target_losses(logits, **options)

    def _full_resolution(self, logits: torch.Tensor, size) -> torch.Tensor:
        """Full-resolution logits for the logged images; a new tensor, as CUDA-graph replays
        (``train.cuda_graph``, ``train.compile: reduce-overhead``) reuse the memory of the step's outputs."""
        return upsample(logits.float(), size) if self.settings.upsampled_losses else logits.clone()

    def _lr(self, group: Dict[str, Any]) -> float:
        t = self.config.train
        return poly_lr(group["initial_lr"], self.iteration, t.max_iters, t.power)

    def _set_lr(self) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(self._lr(group))  # in place: a captured step reads it there
                else:
                    group["lr"] = self._lr(group)

    def _use_deterministic_algorithms(self, deterministic: bool, cudnn_benchmark: bool) -> None:
        """train.deterministic and cudnn_benchmark, process-wide. Without train.deterministic the process's
        own cuDNN and torch determinism switches are left as they are."""
        if self.device.type == "cuda":
            # benchmark may choose other algorithms (deterministic ones too) in another run
            torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
            if deterministic:
                torch.backends.cudnn.deterministic = True
                # cuBLAS's reduction order depends on its workspace size: read when its first handle is made
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if deterministic:
            torch.use_deterministic_algorithms(True)

    def _prepare_sync_free_optimizers(self) -> None:
        """Learning rates as device tensors, and torch SGD's momentum buffers as zeros (its fused
        first step would otherwise leave them uninitialised if that step were skipped; a zero buffer
        gives the same first update, buf = g)."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device)
                if type(opt) is torch.optim.SGD and group["momentum"] != 0:
                    for p in group["params"]:
                        opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p))

    def train_step(self, source: Dict[str, Any], target: Optional[Dict[str, Any]], keep_logits: bool = False):
        """One iteration on a source and a target batch (already on the device), waiting for it.

        Returns (finite, metrics, kept): the losses averaged over processes as floats, whether all
        of them are finite (the optimisers step only then), and if asked the full-resolution
        main-head logits of the target batch (of the source batch in source_only mode).
        """
        metrics, kept = self.step_async(source, target, keep_logits)
        values = metrics.tolist()
        return all(math.isfinite(v) for v in values), dict(zip(self.metric_names, values)), kept

    def step_async(self, source: Dict[str, Any], target: Optional[Dict[str, Any]], keep_logits: bool = False):
        """:meth:`train_step` without waiting: returns the losses as a device tensor (in
        ``metric_names`` order) and the kept logits. With ``StepSettings.sync_free`` nothing here
        waits for the device, so the host queues the next step while this one runs."""
        self._set_lr()
        if self.captured is not None:
            metrics, kept = self.captured(source, target)
            if self.settings.gradient_sync == "after_backward":
                metrics = self._update(metrics)
        else:
            metrics, kept = self._step(source, target, keep_logits)
        if not keep_logits:
            return metrics, None
        return metrics, self._full_resolution(kept, (target or source)["image"].shape[-2:])

    def _step(self, source: Dict[str, Any], target: Optional[Dict[str, Any]], keep_logits: bool):
        """The iteration itself: (metrics, the main-head logits as the model gave them, if kept)."""
        metrics, kept = self._compute(source, target, keep_logits)
        return self._update(metrics), kept

    def _compute(self, source: Dict[str, Any], target: Optional[Dict[str, Any]], keep_logits: bool):
        """Every forward and backward of the step: (this process's losses in ``metric_names`` order,
        the main-head logits as the model gave them, if kept)."""
        with self._shared_weight_casts():
            losses, kept = self._forward_backward(source, target, keep_logits)
        return torch.stack([losses[name].detach().float() for name in self.metric_names]), kept

    def _update(self, metrics: torch.Tensor) -> torch.Tensor:
        """Gradients (after_backward) and losses averaged over the processes, then the optimisers;
        returns the averaged losses."""
        if self.settings.gradient_sync == "after_backward":
            dist_utils.all_reduce_gradients(self.trained_parameters, self.ctx)
        # One small all-reduce: every process reaches the same verdict from the reduced losses.
        metrics = dist_utils.all_reduce_mean(metrics, self.ctx)
        if self.settings.sync_free:  # the fused kernels skip the whole update when found_inf is 1
            found_inf = torch.isfinite(metrics).all().logical_not().float()
            if self.scaler.is_enabled():  # fp16: so do non-finite scaled gradients, which lower the scale
                found_inf = torch.maximum(found_inf, self._unscale_gradients())
            for opt in self.optimizers:  # G first, then the discriminators
                opt.found_inf = found_inf
                opt.step()
            self.scaler.update()
        elif all(math.isfinite(v) for v in metrics.tolist()):  # one host sync
            for opt in self.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
        return metrics

    def _unscale_gradients(self) -> torch.Tensor:
        """fp16 without a host synchronisation: every optimiser's gradients divided by the loss scale
        (``GradScaler.unscale_``); returns 1.0 if any of them is not finite, else 0.0, on the device. The
        scale update that follows (``GradScaler.update``) reads the same checks."""
        found = []
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
            # GradScaler keeps each optimiser's checks there (its step reads them on the host)
            found += self.scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values()
        return torch.stack(found).amax()

    def _shared_weight_casts(self) -> contextlib.ExitStack:
        """Each weight made once a step for the step's forwards and backwards, not once a forward (G runs
        on the source and the target batch, D on both maps): its autocast cast (the autocast cache lives
        while any autocast context is open: this outer one, with autocast off, keeps it open between the
        forwards, whose backwards run outside autocast as before) and a folded frozen BN's scaled weight
        (:func:`advent_fast.models.shared_scaled_weights`); with ``train.fused_weight_casts`` G's convolution
        weights by one node instead of autocast (:mod:`advent_fast.weight_casts`; D's at its own training).
        All are dropped before the optimisers change the weights. Also in a captured step: each replay then
        makes them once."""
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=False))
        stack.enter_context(self._weights_cast_for_step(self.model))
        if self.settings.fold_frozen_bn:
            from .models import shared_scaled_weights

            stack.enter_context(shared_scaled_weights())
        return stack

    def _weights_cast_for_step(self, module: torch.nn.Module):
        """``train.fused_weight_casts``: ``module``'s 16-bit weights made by one node until exit."""
        if not self.settings.fused_weight_casts:
            return contextlib.nullcontext()
        from .weight_casts import weights_cast_for_step

        return weights_cast_for_step(module, self.autocast_dtype)

    def _forward_backward(self, source: Dict[str, Any], target: Optional[Dict[str, Any]], keep_logits: bool):
        """Every forward and backward of the step: (the losses by metric name, the kept logits or None)."""
        t, plan, scale = self.config.train, self.plan, self.scaler.scale
        lambdas = {
            "seg": {"main": t.lambda_seg_main, "aux": t.lambda_seg_aux},
            "adv": {"main": t.lambda_adv_main, "aux": t.lambda_adv_aux},
            "ent": {"main": t.lambda_ent_main, "aux": t.lambda_ent_aux},
            "cp": {"main": t.lambda_cp_main, "aux": t.lambda_cp_aux},
        }
        losses: Dict[str, torch.Tensor] = {}
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        set_requires_grad(self.discriminators.values(), False)

        # Source: supervised segmentation. Its gradient is all-reduced with the target's.
        kept = None
        source_info: Dict[str, torch.Tensor] = {}  # D's source inputs, taken now: G's outputs are dropped
        with dist_utils.no_sync_unless(not plan.target, [self.generator]):
            source_size = source["image"].shape[-2:]
            source_logits = self._forward(source["image"])
            total = 0.0
            for h in self.heads:
                losses[f"seg_{h}"] = self._segmentation_loss(source_logits[h], source["label"])
                total = total + lambdas["seg"][h] * losses[f"seg_{h}"]
                if plan.adversarial:
                    with torch.no_grad():
                        source_info[h] = self._target_losses(source_logits[h].detach(), source_size).self_information
            if keep_logits and not plan.target:
                kept = source_logits["main"].detach()
            del source_logits
            scale(total).backward()

        # Target: every target loss of a head from one fused call (outside autocast: fp32 inside).
        target_info: Dict[str, torch.Tensor] = {}
        if plan.target:
            target_size = target["image"].shape[-2:]
            target_logits = self._forward(target["image"])
            total = 0.0
            for h in self.heads:
                out = self._target_losses(
                    target_logits[h], target_size, self_information=plan.adversarial, entropy=plan.entropy,
                    top_k=plan.top_k, prior=self.prior, mu=t.class_prior_mu)
                if plan.adversarial:
                    with self._autocast():  # the frozen D: gradients reach G only
                        d_out = self.d_frozen[h](out.self_information)
                    losses[f"adv_{h}"] = bce_to(d_out, SOURCE_LABEL)
                    total = total + lambdas["adv"][h] * losses[f"adv_{h}"]
                    target_info[h] = out.self_information.detach()
                if plan.entropy:
                    losses[f"ent_{h}"] = out.entropy_loss
                    total = total + lambdas["ent"][h] * losses[f"ent_{h}"]
                if plan.class_prior:
                    losses[f"cp_{h}"] = out.class_prior_loss
                    total = total + lambdas["cp"][h] * losses[f"cp_{h}"]
            if keep_logits:
                kept = target_logits["main"].detach()
            del target_logits
            scale(total).backward()

        # Discriminators: source maps -> source label, target maps -> target label, each / 2.
        if plan.adversarial:
            set_requires_grad(self.discriminators.values(), True)
            for h in self.heads:
                d = self.d_train[h]
                with self._weights_cast_for_step(self.discriminators[h]):
                    with dist_utils.no_sync_unless(False, [d]):
                        with self._autocast():
                            d_source = d(source_info[h])
                        loss_source = bce_to(d_source, SOURCE_LABEL) / 2
                        scale(loss_source).backward()
                    with self._autocast():
                        d_target = d(target_info[h])
                    loss_target = bce_to(d_target, TARGET_LABEL) / 2
                    scale(loss_target).backward()
                losses[f"d_{h}"] = loss_source.detach() + loss_target.detach()
        return losses, kept

    # ---- the loop -------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, stream: str, batch_size: int) -> DeviceBatches:
        batches = training_batches(dataset, stream, batch_size, self.ctx, self.config.train.seed,
                                   start=self.position[stream], workers=self.config.data.num_workers)
        return DeviceBatches(batches, self.device, self.settings.channels_last)

    def fit(self) -> Optional[Dict[str, Any]]:
        """Train to ``train.stop_iter``; returns the final evaluation (on the main process). A stop signal
        (SIGTERM, SIGUSR1: :mod:`advent_fast.preemption`) ends it early: the checkpoint is saved at the next
        step's end (with several processes, at the next log line's, where they agree), then
        :class:`TrainingStopped` is raised."""
        if self.ctx.is_main and self.run_dir:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(self.config, os.path.join(self.run_dir, "config.yaml"))
            self._trim_metrics()
        with StopSignals() as signals:
            stopped_by = self._train_loop(signals)
        if stopped_by is None and (not self.evaluations or self.evaluations[-1]["iter"] != self.iteration):
            self.evaluate()  # resumed at stop_iter
        self.close()
        if stopped_by is not None:
            raise TrainingStopped(stopped_by, self.iteration, self.saved_iteration if self.run_dir else None)
        return self.evaluations[-1] if self.evaluations and self.ctx.is_main else None

    def _stop_signal(self, signals: StopSignals, log_due: bool) -> Optional[int]:
        """The stop signal this step ends the run for, if any: at once in one process; with several, one that any
        of them received (the largest number), looked for at log lines only (their losses are read then anyway),
        so that every process stops after the same step."""
        if not self.ctx.distributed:
            return signals.received
        if not log_due:
            return None
        return dist_utils.max_over_processes(signals.received or 0, self.ctx) or None

    def _train_loop(self, signals: StopSignals) -> Optional[int]:
        """Steps to ``train.stop_iter`` or until a stop signal (returned, after the checkpoint is saved)."""
        cfg, t = self.config, self.config.train
        stopped_by = None
        source_batches = self._loader(self.data.source, "source", t.source_batch_size)
        target_batches = self._loader(self.data.target, "target", t.target_batch_size) if self.plan.target else None
        bar = self._progress_bar()
        lagged = LaggedMetrics()
        window: Dict[str, float] = {}
        window_start, window_steps = time.perf_counter(), 0
        while self.iteration < t.stop_iter:
            source = next(source_batches)
            target = next(target_batches) if target_batches is not None else None
            want_images = self._images_due()
            lr = self._lr(self.opt_g.param_groups[0])
            metrics, logits = self.step_async(source, target, keep_logits=want_images)
            for batches in (source_batches, target_batches):  # the loaders' work overlaps the queued step
                if batches is not None:
                    batches.prefetch()
            self.iteration += 1
            self.position["source"] += t.source_batch_size
            if target is not None:
                self.position["target"] += t.target_batch_size

            log_due = self.iteration % cfg.run.log_every == 0 or self.iteration == t.stop_iter
            save_due = self.iteration % cfg.run.snapshot_every == 0 or self.iteration == t.stop_iter
            eval_due = (bool(cfg.eval.every) and self.iteration % cfg.eval.every == 0) or self.iteration == t.stop_iter
            stopped_by = self._stop_signal(signals, log_due) if self.iteration < t.stop_iter else None
            log_due = log_due or stopped_by is not None
            done = lagged.push(self.iteration, metrics)
            if log_due or save_due or eval_due:  # these need every step so far accounted for
                done += lagged.drain()
            for iteration, values in done:
                step_metrics = dict(zip(self.metric_names, values))
                self._check_finite(iteration, step_metrics)
                for name, value in step_metrics.items():
                    window[name] = window.get(name, 0.0) + value
                window_steps += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in step_metrics.items()}, refresh=False)
            if log_due:
                seconds = time.perf_counter() - window_start
                record = {"iter": self.iteration, "lr": lr,
                          **{k: v / window_steps for k, v in window.items()},
                          "it_per_s": window_steps / max(seconds, 1e-9)}
                self._log(record)
                window, window_start, window_steps = {}, time.perf_counter(), 0
            if want_images:
                self._log_images(target if target is not None else source, logits)
            if eval_due:  # before the save: the checkpoint keeps its own iteration's evaluation
                self.evaluate()
            if save_due:
                self.save()
            if stopped_by is not None:
                if not save_due:
                    self.save(snapshot=False)  # the snapshots stay the run's schedule
                break
        if bar is not None:
            bar.close()
        del source_batches, target_batches  # stops the loader workers
        return stopped_by

    def _check_finite(self, iteration: int, metrics: Dict[str, float]) -> None:
        """Count consecutive non-finite steps (``iteration``: the one that ended with ``metrics``)."""
        if all(math.isfinite(v) for v in metrics.values()):
            self.nonfinite_steps = 0
            return
        self.nonfinite_steps += 1
        if self.nonfinite_steps >= self.config.train.max_nonfinite_steps:
            kept = (f"the last good checkpoint ({self.checkpoint_path()}, iteration {self.saved_iteration}) "
                    f"is kept" if self.saved_iteration is not None else "no checkpoint had been written yet")
            raise TrainingDiverged(
                f"stopping at iteration {iteration}: {self.nonfinite_steps} consecutive steps "
                f"with non-finite losses (train.max_nonfinite_steps={self.config.train.max_nonfinite_steps}); "
                f"last losses: {', '.join(f'{k}={v:.4g}' for k, v in metrics.items())}; those steps "
                f"were skipped and {kept}. Lower train.lr or use train.precision fp32.")

    def _progress_bar(self):
        if not (self.ctx.is_main and self.config.run.progress):
            return None
        from tqdm import tqdm

        # Into a log file (nohup, a cluster job) every redraw is another line: one a minute there.
        return tqdm(total=self.config.train.stop_iter, initial=self.iteration, desc=self.config.train.mode,
                    dynamic_ncols=True, smoothing=0.1, mininterval=0.1 if sys.stderr.isatty() else 60.0)

    # ---- logs, TensorBoard, evaluation -----------------------------------------------------------
    def _log(self, record: Dict[str, Any]) -> None:
        if not (self.ctx.is_main and self.run_dir):
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(_json_safe(record)) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            prefix = "eval" if record.get("kind") == "eval" else "train"
            for key, value in record.items():
                if key not in ("iter", "kind") and isinstance(value, (int, float)):
                    tb.add_scalar(f"{prefix}/{key}", value, record["iter"])

    def _trim_metrics(self) -> None:
        """On resume, drop the lines an interrupted run wrote after its last checkpoint."""
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            lines = [line for line in f if json.loads(line)["iter"] <= self.iteration]
        with open(path, "w") as f:
            f.writelines(lines)

    def _tensorboard(self):
        if self._tb is None and self.ctx.is_main and self.run_dir and self.config.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("run.tensorboard needs the tensorboard package "
                                   "(pip install tensorboard)") from exc
            self._tb = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
        return self._tb

    def _images_due(self) -> bool:
        return (self.ctx.is_main and bool(self.run_dir) and self.config.run.tensorboard
                and (self.iteration + 1) % self.config.run.image_every == 0)

    def _log_images(self, batch: Dict[str, Any], logits: torch.Tensor) -> None:
        """The first image of the batch, its prediction and its entropy map."""
        from .visualize import colorize, entropy_to_rgb

        logits = logits[:1].float()
        with torch.no_grad():
            entropy = self.target_losses(logits, self_information=False,
                                                entropy_map=True).entropy_map[0]
        tb, step = self._tensorboard(), self.iteration
        tb.add_image("images/input", self.data.source.to_rgb(batch["image"][0].float()), step, dataformats="HWC")
        tb.add_image("images/prediction", colorize(logits.argmax(1)[0].cpu().numpy(), self.config.data.num_classes),
                     step, dataformats="HWC")
        tb.add_image("images/entropy", entropy_to_rgb(entropy.cpu().numpy()), step, dataformats="HWC")

    def evaluate(self) -> Optional[Dict[str, Any]]:
        """Main-head mIoU on the target val split, sharded over the processes."""
        from .evaluate import evaluate_model

        e = self.config.eval
        # Every process evaluates rank 0's model, the one checkpoints save: with train-mode BatchNorm
        # each process's running statistics follow its own images (DDP re-broadcasts them a forward).
        dist_utils.broadcast_tensors(list(self.model.buffers()), self.ctx)
        # Evaluation must not disturb the training RNG (resumed runs stay identical).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            result = evaluate_model(self.model, self.data.val, self.config.data.num_classes, self.device,
                                    batch_size=e.batch_size, precision=e.precision,
                                    num_workers=loader_workers(self.config.data.num_workers, self.device))
        entry = {"kind": "eval", "iter": self.iteration, "miou": float(result["miou"])}
        self.evaluations.append(entry)
        self._log({**entry, **{k: float(result[k]) for k in ("miou16", "miou13") if k in result},
                   "iou": dict(zip(result["class_names"], result["iou"]))})
        return result

    # ---- checkpoints ---------------------------------------------------------------------------
    def checkpoint_path(self) -> Optional[str]:
        return os.path.join(self.run_dir, CHECKPOINT_NAME) if self.run_dir else None

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs (see :mod:`advent_fast.checkpoint`)."""
        from .models import checkpoint_dict

        t = self.config.train
        return checkpoint_dict(
            self.model,
            discriminators={h: d.state_dict() for h, d in self.discriminators.items()},
            optimizers={"generator": _float_lrs(self.opt_g.state_dict()),
                        **{f"d_{h}": _float_lrs(o.state_dict()) for h, o in self.opt_d.items()}},
            scaler=self.scaler.state_dict(),
            iteration=self.iteration,
            schedule={"kind": "poly", "lr": t.lr, "lr_d": t.lr_d, "power": t.power,
                      "max_iters": t.max_iters, "stop_iter": t.stop_iter},
            rng=ckpt_io.rng_state(),
            data_position=dict(self.position),
            nonfinite_steps=self.nonfinite_steps,
            evaluations=list(self.evaluations),
            config=self.config.to_dict(),
        )

    def load_state(self, state: Dict[str, Any]) -> None:
        from .models import load_model_state

        ckpt_io.check_resumable(state)
        ckpt_io.check_meta(state, self.model.meta())
        if set(state["discriminators"]) != set(self.discriminators):
            raise ckpt_io.CheckpointError(
                f"checkpoint has discriminators {sorted(state['discriminators'])}, this run "
                f"({self.config.train.mode}) needs {sorted(self.discriminators)}")
        load_model_state(self.model, state["model"])
        for h, d in self.discriminators.items():
            d.load_state_dict(state["discriminators"][h])
        _load_optimizer_state(self.opt_g, state["optimizers"]["generator"])
        for h, opt in self.opt_d.items():
            _load_optimizer_state(opt, state["optimizers"][f"d_{h}"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.position = dict(state["data_position"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.evaluations = list(state.get("evaluations", []))
        ckpt_io.set_rng_state(state["rng"])

    def save(self, snapshot: bool = True) -> None:
        """Atomically replace the run's checkpoint and, with ``snapshot``, add a generator snapshot (main
        process; every process meets at a barrier afterwards, written or not)."""
        # Never replace the last good checkpoint during a non-finite streak (its count comes from the
        # all-reduced losses: every process skips alike).
        if not self.nonfinite_steps:
            if self.ctx.is_main and self.run_dir:
                state = self.state_dict()
                if not _all_finite([state["model"], *state["discriminators"].values()]):
                    raise TrainingDiverged(  # e.g. BatchNorm statistics of a skipped step
                        f"non-finite weights or BatchNorm statistics at iteration {self.iteration}; "
                        f"not saving, the last good checkpoint (iteration {self.saved_iteration}) is kept")
                ckpt_io.save_atomic(state, self.checkpoint_path())
                if snapshot:
                    ckpt_io.save_atomic(ckpt_io.model_snapshot(state["meta"], state["model"], self.iteration,
                                                               state["config"]),
                                        os.path.join(self.run_dir, "snapshots", f"model_{self.iteration:06d}.pt"))
                    if self.config.run.keep_snapshots is not None:
                        self._prune_snapshots(self.config.run.keep_snapshots)
            self.saved_iteration = self.iteration
        dist_utils.barrier(self.ctx)

    def _prune_snapshots(self, keep: int) -> None:
        """Delete all but the ``keep`` snapshots with the best val mIoU of the evaluation at their iteration
        (ranked by iteration among equals and those without one: with no evaluations, the most recent)."""
        folder = os.path.join(self.run_dir, "snapshots")
        miou = {e["iter"]: e["miou"] for e in self.evaluations if math.isfinite(e["miou"])}
        snapshots = []
        for name in os.listdir(folder):
            match = SNAPSHOT_NAME.match(name)
            if match:
                iteration = int(match.group(1))
                snapshots.append((miou.get(iteration, -math.inf), iteration, name))
        for _, _, name in sorted(snapshots, reverse=True)[keep:]:
            os.remove(os.path.join(folder, name))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class LaggedMetrics:
    """Each step's losses, copied to the host without waiting and read one step later: the host
    queues step i + 1 before it waits for step i, so the device always has work queued."""

    def __init__(self):
        self.pending: Optional[tuple] = None  # (iteration, host tensor, CUDA event or None)

    def push(self, iteration: int, metrics: torch.Tensor) -> List[tuple]:
        """Queue the copy of ``metrics`` (step ``iteration``); returns the previous step's
        (iteration, values) if any."""
        ready = self.drain()
        event = None
        if metrics.device.type == "cuda":
            host = torch.empty(metrics.shape, dtype=metrics.dtype, pin_memory=True)
            host.copy_(metrics, non_blocking=True)  # queued before the next step can overwrite a captured output
            event = torch.cuda.Event()
            event.record()
        else:
            host = metrics  # a new tensor every step on a CPU
        self.pending = (iteration, host, event)
        return ready

    def drain(self) -> List[tuple]:
        """The pending step's (iteration, values), waiting for it: [] if none."""
        if self.pending is None:
            return []
        iteration, host, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return [(iteration, host.tolist())]


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """``load_state_dict`` for the per-parameter state (momentum buffers, Adam's moments and step
    counts), keeping this run's group settings: torch restores the saved ones, which would ignore
    hyper-parameters changed on resume (``--resume RUN --set train.lr=...``: ``initial_lr``, momentum,
    weight decay, betas), run a fast-path checkpoint's fused kernels on the release path, or the release
    path's foreach update (which cannot skip a step on the device) on the fast path. ``lr`` itself is the
    schedule's, set before every step.

    Adam's step counts go where this run's flags want them: torch places them by the saved flags, so a
    release-path (foreach) checkpoint would leave them on the host, where fused and capturable Adam
    read them from the parameters' device. Momentum buffers and moments take their parameter's memory
    format: fused kernels walk a parameter and its state in memory order (CUDA's fused Adam refuses
    other strides), and a checkpoint of the other path has the other format (contiguous or channels_last)."""
    own_settings = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, own_settings):
        group.update(own)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            param_state = optimizer.state.get(param, {})
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.to(param.device, torch.float32) if on_device else step.cpu()


def _float_lrs(state: Dict[str, Any]) -> Dict[str, Any]:
    """An optimiser state dict with host learning rates (the sync-free step keeps them on the
    device), so checkpoints resume on any device and path."""
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
    return state


def _all_finite(state_dicts) -> bool:
    flags = [torch.isfinite(t).all() for sd in state_dicts for t in sd.values() if t.is_floating_point()]
    return bool(torch.stack(flags).all())  # one host sync


def _json_safe(value):
    """NaN (a class absent from the val split) and inf become null: JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value
