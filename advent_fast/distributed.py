"""Process groups for ``torchrun``: NCCL on GPUs, gloo on CPUs; one process per device.

Without torchrun's environment (RANK, WORLD_SIZE, ...) everything here degrades to a single
process and the collectives are no-ops, so the trainer has one code path.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The one process that writes logs and checkpoints."""
        return self.rank == 0


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def init(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment (if any)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=dev)
        else:
            # Processes share the cores: oversubscribed threads slow every one of them down.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean over processes (in place; returned for chaining)."""
    if ctx.distributed:
        dist.all_reduce(tensor)
        tensor /= ctx.world_size
    return tensor


def max_over_processes(value: int, ctx: DistContext) -> int:
    """The largest of the processes' ``value`` (a collective: every process calls it)."""
    if not ctx.distributed:
        return value
    flag = torch.tensor([value], dtype=torch.int64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


# As DDP's default bucket_cap_mb: a few collectives a step, and little memory for the flat copies.
BUCKET_BYTES = 25 * 2**20


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], ctx: DistContext,
                         bucket_bytes: int = BUCKET_BYTES) -> None:
    """Every gradient replaced by its mean over the processes (``train.gradient_sync: after_backward``):
    the gradients flattened into buckets of about ``bucket_bytes``, one all-reduce a bucket, after the
    step's backwards, instead of DDP's all-reduces inside the last backward. Parameters without a
    gradient are skipped: they are the same in every process, whose steps run the same graph."""
    if ctx.distributed:
        for bucket in _buckets([p.grad for p in params if p.grad is not None], bucket_bytes):
            flat = _flatten(bucket)
            dist.all_reduce(flat)
            flat /= ctx.world_size
            _unflatten_into(flat, bucket)


def broadcast_tensors(tensors: Iterable[torch.Tensor], ctx: DistContext, src: int = 0) -> None:
    """Rank ``src``'s values of ``tensors`` (parameters, buffers) in every process, in place."""
    if ctx.distributed:
        for bucket in _buckets([t.detach() for t in tensors], BUCKET_BYTES):
            flat = _flatten(bucket)
            dist.broadcast(flat, src)
            _unflatten_into(flat, bucket)


def _buckets(tensors: List[torch.Tensor], bucket_bytes: int) -> List[List[torch.Tensor]]:
    """Consecutive runs of one device and dtype, each up to ``bucket_bytes`` (or one larger tensor)."""
    buckets: List[List[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = buckets[-1][-1] if buckets else None
        if last is None or (last.device, last.dtype) != (t.device, t.dtype) or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += nbytes
    return buckets


def _in_memory_order(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t`` with its dimensions in memory order: contiguous whenever ``t`` is dense (a
    channels_last gradient too), so flattening it reads it once, without a reordering copy."""
    if t.dim() == 0:
        return t
    return t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))


def _flatten(bucket: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat([_in_memory_order(t).reshape(-1) for t in bucket])


def _unflatten_into(flat: torch.Tensor, bucket: List[torch.Tensor]) -> None:
    views = [_in_memory_order(t) for t in bucket]
    parts, offset = [], 0
    for view in views:
        parts.append(flat[offset:offset + view.numel()].view(view.shape))
        offset += view.numel()
    torch._foreach_copy_(views, parts)


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's value of a picklable object, on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DistributedDataParallel over the process group, or the module itself."""
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


@contextlib.contextmanager
def no_sync_unless(last: bool, modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Skip DDP's gradient all-reduce for every backward but the last of a step.

    Gradients then accumulate locally and one all-reduce at the last backward averages their
    sum, which equals the sum of the averages.
    """
    with contextlib.ExitStack() as stack:
        if not last:
            for m in modules:
                if hasattr(m, "no_sync"):
                    stack.enter_context(m.no_sync())
        yield


def shard_slice(global_batch: int, ctx: DistContext) -> slice:
    """This rank's part of a global batch; the batch must split evenly."""
    if global_batch % ctx.world_size:
        raise ValueError(f"a global batch of {global_batch} does not split over {ctx.world_size} "
                         f"processes; make the batch size a multiple of the process count")
    per_rank = global_batch // ctx.world_size
    return slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
