"""Two gloo processes under torchrun train like one process with the same global batch."""
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advent_fast import distributed as dist_utils
from advent_fast import train
from advent_fast.checkpoint import load

from test_train import read_metrics, signal_a_training_run, state_tensors, tiny_overrides, write_prior

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun_env() -> dict:
    """The environment of two torchrun processes with one thread each, importing from the repository."""
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Two processes under torchrun (one thread each), run from the repository root: ``args`` after
    torchrun's own (a script or ``-m module``, then its arguments). Asserts they exited with 0."""
    proc = subprocess.run([*TORCHRUN, *args], cwd=ROOT, env=torchrun_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_single_process_helpers_are_no_ops():
    ctx = dist_utils.init("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    t = torch.tensor([1.0, 2.0])
    assert dist_utils.all_reduce_mean(t, ctx) is t and t.tolist() == [1.0, 2.0]
    module = torch.nn.Linear(2, 2)
    assert dist_utils.wrap(module, ctx) is module and dist_utils.broadcast_object("x", ctx) == "x"
    module.weight.grad = torch.ones(2, 2)
    dist_utils.all_reduce_gradients(module.parameters(), ctx)
    dist_utils.broadcast_tensors(module.parameters(), ctx)
    assert module.weight.grad.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert dist_utils.shard_slice(4, dist_utils.DistContext(rank=1, world_size=2)) == slice(2, 4)
    with pytest.raises(ValueError, match="does not split"):
        dist_utils.shard_slice(3, dist_utils.DistContext(rank=0, world_size=2))


def layouts_module(rank: int) -> torch.nn.Module:
    """Parameters of every layout and a few dtypes, each gradient a function of the rank, and buffers."""
    gen = torch.Generator().manual_seed(100 + rank)
    module = torch.nn.Module()
    module.conv = torch.nn.Parameter(torch.randn(8, 5, 3, 3, generator=gen).to(memory_format=torch.channels_last))
    module.pointwise = torch.nn.Parameter(torch.randn(6, 7, 1, 1, generator=gen).to(memory_format=torch.channels_last))
    module.bias = torch.nn.Parameter(torch.randn(33, generator=gen))
    module.float64 = torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64))
    module.matrix = torch.nn.Parameter(torch.randn(5, 9, generator=gen).t())  # transposed strides
    module.frozen = torch.nn.Parameter(torch.randn(3, generator=gen), requires_grad=False)  # no gradient
    module.register_buffer("count", torch.tensor(10 + rank))
    module.register_buffer("mean", torch.randn(7, generator=gen))
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _sync_rank(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = dist_utils.DistContext(rank=rank, world_size=world)
        module = layouts_module(rank)
        # A few bytes a bucket: the buckets split inside a dtype's run and at each dtype change.
        dist_utils.all_reduce_gradients(module.parameters(), ctx, bucket_bytes=200)
        dist_utils.broadcast_tensors([*module.parameters(), *module.buffers()], ctx)
        torch.save({"grads": {n: p.grad for n, p in module.named_parameters() if p.grad is not None},
                    "state": module.state_dict()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_buckets_are_runs_of_one_dtype_up_to_the_bucket_size():
    sizes = [(10, torch.float32), (20, torch.float32), (10, torch.float32), (5, torch.float64), (100, torch.float32),
             (3, torch.float32)]
    buckets = dist_utils._buckets([torch.zeros(n, dtype=dtype) for n, dtype in sizes], bucket_bytes=120)
    # 40 + 80 bytes fill a bucket; a dtype change starts one; a larger tensor stands alone
    assert [[t.numel() for t in bucket] for bucket in buckets] == [[10, 20], [10], [5], [100], [3]]


def test_gradients_all_reduced_after_the_backward_are_the_mean_in_their_layout(tmp_path):
    """train.gradient_sync: after_backward's all-reduce and the start's broadcast, over 2 gloo processes:
    every gradient the mean of the ranks' in its own strides (channels_last, transposed), buckets split
    by size and dtype; parameters and buffers (an integer one too) rank 0's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_sync_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    ranks = [layouts_module(r) for r in range(2)]
    for name, param in ranks[0].named_parameters():
        if param.grad is None:
            assert all(name not in r["grads"] for r in results)
            continue
        expected = (ranks[0].get_parameter(name).grad + ranks[1].get_parameter(name).grad) / 2
        for result in results:
            got = result["grads"][name]
            assert got.stride() == param.stride() and got.dtype == param.dtype, name
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    for result in results:
        for name, value in ranks[0].state_dict().items():
            assert torch.equal(result["state"][name], value), name


@pytest.mark.parametrize("gradient_sync", ["auto", "after_backward"])
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tiny_data, tmp_path, gradient_sync):
    """...also when the two processes take the fast path (folded frozen BN, channels_last, fused
    optimisers, losses from the low-resolution logits) with activation checkpointing (the blocks
    recomputed in DDP's backward) and the single one the release step; with DDP (auto on CPUs) or the
    gradients all-reduced after the step's backwards."""
    prior = write_prior(tmp_path / "prior.json")
    # Frozen BatchNorm: with train-mode BN each process would normalise its own images only.
    overrides = tiny_overrides(tiny_data, "advent_minent", f"train.class_prior={prior}", "model.freeze_bn=true",
                               "train.source_batch_size=2", "train.target_batch_size=2", "train.stop_iter=3",
                               f"train.gradient_sync={gradient_sync}")
    args = [a for o in overrides for a in ("--set", o)]
    single, double = str(tmp_path / "single"), str(tmp_path / "double")
    assert train.main(args + ["--run-dir", single, "--device", "cpu"]) == 0

    proc = torchrun("-m", "advent_fast.train", *args, "--run-dir", double, "--device", "cpu", "--fast-path",
                    "--activation-checkpointing", timeout=600)
    assert "on cpu x2 | fast path" in proc.stdout and "activation checkpointing" in proc.stdout
    assert ("gradients all-reduced after the backwards" in proc.stdout) is (gradient_sync == "after_backward")
    assert proc.stdout.count("target val mIoU") == 1  # one writer

    a, b = load(os.path.join(single, "checkpoint.pt")), load(os.path.join(double, "checkpoint.pt"))
    assert a["data_position"] == b["data_position"] == {"source": 6, "target": 6}
    for key in ("model", "discriminators", "optimizers"):
        ta, tb = state_tensors(a[key]), state_tensors(b[key])
        assert ta.keys() == tb.keys() and ta
        for name in ta:
            torch.testing.assert_close(tb[name], ta[name], rtol=1e-4, atol=2e-6, msg=lambda m: f"{key}{name}: {m}")
    steps_a, evals_a = read_metrics(single)
    steps_b, evals_b = read_metrics(double)
    assert [r["iter"] for r in steps_b] == [1, 2, 3]  # each line written once
    for ra, rb in zip(steps_a, steps_b):
        for k in ra:
            if k != "it_per_s":
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), k
    assert evals_b[-1]["miou"] == pytest.approx(evals_a[-1]["miou"], abs=1e-6)  # sharded evaluation


TRAIN_AND_SAVE_EACH_RANKS_MODEL = """
import sys
import torch
from advent_fast import distributed as dist_utils
from advent_fast.config import load_config
from advent_fast.train import exit_process
from advent_fast.trainer import Trainer

ctx = dist_utils.init("cpu")
trainer = Trainer(load_config("embedded", sys.argv[3:]), ctx, sys.argv[1])
trainer.fit()
torch.save(trainer.model.state_dict(), f"{sys.argv[2]}/rank{ctx.rank}.pt")
dist_utils.shutdown()
exit_process(0)
"""


def test_every_process_evaluates_rank_0s_model(tiny_data, tmp_path):
    """With train-mode BatchNorm and the gradients all-reduced after the backwards (no DDP to
    re-broadcast buffers), each process's running statistics follow its own images; the sharded
    evaluation at the end still evaluates rank 0's model, the checkpoint's: same weights and buffers."""
    script = tmp_path / "train_and_save.py"
    script.write_text(TRAIN_AND_SAVE_EACH_RANKS_MODEL)
    overrides = tiny_overrides(tiny_data, "advent", "train.stop_iter=2", "train.gradient_sync=after_backward",
                               "train.source_batch_size=2", "train.target_batch_size=2")
    torchrun(str(script), str(tmp_path / "run"), str(tmp_path), *overrides)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    saved = load(os.path.join(tmp_path / "run", "checkpoint.pt"))["model"]
    assert any("running_mean" in name for name in saved)
    for name, value in saved.items():
        assert torch.equal(ranks[0][name], value) and torch.equal(ranks[1][name], value), name


TRAIN_ON_GLOO = """
import datetime, sys
import torch
import torch.distributed as dist
from advent_fast import distributed as dist_utils
from advent_fast.config import load_config
from advent_fast.train import exit_process
from advent_fast.trainer import Trainer

torch.backends.cudnn.deterministic = True
torch.backends.cudnn.allow_tf32 = False  # see the test
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # NCCL refuses two ranks on one GPU
ctx = dist_utils.init("cuda")
trainer = Trainer(load_config("embedded", sys.argv[2:]), ctx, sys.argv[1])
print(f"rank {ctx.rank} on {ctx.device}: {trainer.settings.describe()}", flush=True)
trainer.fit()
print(f"rank {ctx.rank} replayed: {trainer.captured.graph is not None}", flush=True)
dist_utils.shutdown()
exit_process(0)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_two_processes_on_one_cuda_device_replay_the_graph_like_one_process(tiny_data, tmp_path, monkeypatch):
    """train.gradient_sync after_backward with the CUDA graph, as several GPUs run it: two ranks (gloo, which
    takes CUDA tensors, both on the one device) capture their forwards and backwards, all-reduce the
    gradients after each replay and step the optimisers; against one process with the same global batch
    replaying its whole step. fp32 without TF32: TF32's rounding (1e-3) of the gradients, which differ with the
    batch split, is what Adam's sign-like first steps would turn into differences of D's weights."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    overrides = tiny_overrides(tiny_data, "advent", "model.freeze_bn=true", "train.source_batch_size=2",
                               "train.target_batch_size=2", "train.stop_iter=6", "train.cudnn_benchmark=false",
                               "train.precision=fp32", "train.cuda_graph=true", "train.fast_path=true")
    single, double = str(tmp_path / "single"), str(tmp_path / "double")
    assert train.main([a for o in overrides for a in ("--set", o)] + ["--run-dir", single, "--device", "cuda"]) == 0
    script = tmp_path / "train_on_gloo.py"
    script.write_text(TRAIN_ON_GLOO)
    proc = torchrun(str(script), double, *overrides, timeout=600)
    for rank in (0, 1):
        assert f"rank {rank} replayed: True" in proc.stdout
    assert "forwards and backwards as one CUDA graph" in proc.stdout
    assert "gradients all-reduced after the backwards" in proc.stdout
    a, b = load(os.path.join(single, "checkpoint.pt")), load(os.path.join(double, "checkpoint.pt"))
    for key in ("model", "discriminators", "optimizers"):
        ta, tb = state_tensors(a[key]), state_tensors(b[key])
        assert ta.keys() == tb.keys() and ta
        for name in ta:
            torch.testing.assert_close(tb[name].cpu(), ta[name].cpu(), rtol=1e-3, atol=1e-5,
                                       msg=lambda m: f"{key}{name}: {m}")


TRAIN_WITH_ONE_NONFINITE_STEP = """
import datetime, sys
import torch.distributed as dist
from advent_fast import distributed as dist_utils
from advent_fast.config import load_config
from advent_fast.train import exit_process
from advent_fast.trainer import Trainer

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a hang fails within a minute
ctx = dist_utils.init("cpu")
trainer = Trainer(load_config("embedded", sys.argv[2:]), ctx, sys.argv[1])
real = trainer._segmentation_loss

def poisoned(logits, label):  # the second step only, a snapshot iteration
    loss = real(logits, label)
    return loss * float("nan") if trainer.iteration == 1 else loss

trainer._segmentation_loss = poisoned
trainer.fit()
print(f"rank {ctx.rank} trained", flush=True)
dist_utils.shutdown()
exit_process(0)
"""


def test_a_snapshot_due_during_a_nonfinite_streak_is_skipped_by_every_process(tiny_data, tmp_path):
    script = tmp_path / "train_one_nonfinite_step.py"
    script.write_text(TRAIN_WITH_ONE_NONFINITE_STEP)
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides(tiny_data, "minent", "train.stop_iter=4", "run.snapshot_every=1",
                               "train.max_nonfinite_steps=3", "train.fast_path=true", "train.source_batch_size=2",
                               "train.target_batch_size=2")
    proc = torchrun(str(script), run_dir, *overrides)
    assert "rank 0 trained" in proc.stdout and "rank 1 trained" in proc.stdout
    assert sorted(os.listdir(os.path.join(run_dir, "snapshots"))) == [
        "model_000001.pt", "model_000003.pt", "model_000004.pt"]
    assert load(os.path.join(run_dir, "checkpoint.pt"))["iteration"] == 4


@pytest.mark.parametrize("world_size, finalised", [("1", True), ("2", False)])
def test_a_process_of_a_multi_process_run_exits_without_finalising(world_size, finalised):
    """train's exit: same exit code, output flushed; a process of a multi-process run skips the interpreter's
    finalisation (where gloo's worker threads can abort it), a single process does not."""
    code = ("import atexit, sys\n"
            "from advent_fast.train import exit_process\n"
            "atexit.register(lambda: print('finalised'))\n"
            "print('trained', end='')\n"
            "exit_process(3)\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "WORLD_SIZE": world_size}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == ("trainedfinalised\n" if finalised else "trained")


def worker_pid(parent: int, local_rank: int) -> int:
    """The process torchrun (pid ``parent``) started for ``local_rank`` (Linux: from /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if ppid == parent and f"LOCAL_RANK={local_rank}".encode() in environ:
            return int(pid)
    raise LookupError(f"no process of local rank {local_rank} under {parent}")


def test_a_stop_signal_stops_every_process_after_the_same_step(tiny_data, tmp_path):
    """SIGTERM to rank 1 alone (a scheduler signals every process, but not always at the same step): the
    processes agree at the next log line, rank 0 writes the checkpoint of that step and says so, both stop."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, "minent", "model.freeze_bn=true", "train.source_batch_size=2",
                               "train.target_batch_size=2", "train.max_iters=100000",
                               "train.stop_iter=100000", "eval.every=0", "run.snapshot_every=100000",
                               "run.log_every=2")
    _, err = signal_a_training_run(
        [*TORCHRUN, "-m", "advent_fast.train", *[a for o in overrides for a in ("--set", o)], "--run-dir",
         str(run_dir), "--device", "cpu"], run_dir, log_lines=2,
        send=lambda proc: os.kill(worker_pid(proc.pid, local_rank=1), signal.SIGTERM), env=torchrun_env())
    assert err.count("stopped by SIGTERM") == 1, err[-3000:]  # rank 0, told by rank 1
    iteration = load(str(run_dir / "checkpoint.pt"))["iteration"]
    assert iteration >= 4 and iteration % 2 == 0  # at a log line, where the processes agree
    assert read_metrics(run_dir)[0][-1]["iter"] == iteration
