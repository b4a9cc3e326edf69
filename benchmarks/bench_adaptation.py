"""Adaptation methods on the embedded data: target val mIoU over seeds, as a table and a plot.

    python benchmarks/bench_adaptation.py [--seeds 3] [--iters N] [--jobs 2] [--out runs/bench_adaptation]

Trains source-only, MinEnt, MinEnt+ER, AdvEnt and AdvEnt+MinEnt (joint training) with the
embedded preset (``python -m advent_fast.train`` runs, one folder each), evaluates the paper's
AdvEnt + MinEnt ensemble (0.5/0.5 sum of the AdvEnt and MinEnt+ER models' upsampled logits),
and reports the mean, standard deviation and range over seeds of the final mIoU and of the best
evaluated snapshot (the release's protocol picks the best). Writes ``bench_results.json`` and
``bench_miou.png`` (mIoU over iterations, mean over seeds with the min-max band) under --out.
Finished runs found in --out are reused, so an interrupted benchmark can be restarted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ("source_only", "minent", "minent_er", "advent", "advent_minent")
ENSEMBLE = "advent+minent_er (ensemble)"
COLOURS = {  # BGR
    "source_only": (110, 110, 110), "minent": (200, 120, 30), "minent_er": (230, 180, 90),
    "advent": (40, 40, 210), "advent_minent": (40, 160, 40), ENSEMBLE: (160, 40, 160),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (train.seed)")
    p.add_argument("--iters", type=int, help="iterations per run (default: the embedded preset's)")
    p.add_argument("--eval-every", type=int, help="evaluation interval (default: the embedded preset's)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (threads split between them)")
    p.add_argument("--out", default=os.path.join("runs", "bench_adaptation"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config overrides for every run")
    return p.parse_args(argv)


def run_dir(out: str, method: str, seed: int) -> str:
    return os.path.join(out, f"{method}_seed{seed}")


def read_evaluations(path: str) -> List[dict]:
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        return []
    with open(metrics) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "eval"]


def finished(path: str, stop_iter: int) -> bool:
    evals = read_evaluations(path)
    return bool(evals) and evals[-1]["iter"] == stop_iter


def train_all(args, stop_iter: int) -> Dict[str, float]:
    """Run every (method, seed) not already finished, ``--jobs`` at a time; seconds per run."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    overrides = [f"train.max_iters={stop_iter}", f"train.stop_iter={stop_iter}", "run.progress=false",
                 "data.num_workers=0", *args.overrides]
    if args.eval_every is not None:
        overrides.append(f"eval.every={args.eval_every}")
    queue = [(m, s) for s in range(args.seeds) for m in args.methods
             if not finished(run_dir(args.out, m, s), stop_iter)]
    running: Dict[subprocess.Popen, tuple] = {}
    seconds: Dict[str, float] = {}
    while queue or running:
        while queue and len(running) < args.jobs:
            method, seed = queue.pop(0)
            path = run_dir(args.out, method, seed)
            if os.path.isdir(path):  # an unfinished earlier attempt: start over
                shutil.rmtree(path)
            cmd = [sys.executable, "-m", "advent_fast.train", "--mode", method, "--run-dir", path,
                   "--set", f"train.seed={seed}"] + [a for o in overrides for a in ("--set", o)]
            os.makedirs(args.out, exist_ok=True)
            log = open(os.path.join(args.out, f"{method}_seed{seed}.log"), "w")
            print(f"start {method} seed {seed}", flush=True)
            running[subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)] = (
                method, seed, time.perf_counter(), log)
        for proc in list(running):
            if proc.poll() is None:
                continue
            method, seed, start, log = running.pop(proc)
            log.close()
            if proc.returncode != 0:
                raise SystemExit(f"{method} seed {seed} failed (exit {proc.returncode}); see {log.name}")
            seconds[f"{method}_seed{seed}"] = time.perf_counter() - start
            print(f"done  {method} seed {seed} in {seconds[f'{method}_seed{seed}']:.0f} s", flush=True)
        time.sleep(1)
    return seconds


def evaluate_ensembles(args, stop_iter: int, max_images: Optional[int]) -> List[float]:
    """Per seed: the 0.5/0.5 ensemble of the final AdvEnt and MinEnt+ER models."""
    import torch

    from advent_fast.evaluate import build_dataset, evaluate_ensemble, load_models

    dataset = None
    scores = []
    for seed in range(args.seeds):
        paths = [os.path.join(run_dir(args.out, m, seed), "snapshots", f"model_{stop_iter:06d}.pt")
                 for m in ("advent", "minent_er")]
        models, num_classes = load_models(paths, "cpu")
        if dataset is None:
            dataset = build_dataset("cityscapes", None, num_classes)
            if max_images is not None:  # the same images as the runs' evaluations
                dataset = torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
        result = evaluate_ensemble(models, [0.5, 0.5], dataset, num_classes, torch.device("cpu"), precision="fp32")
        scores.append(float(result["miou"]))
    return scores


def spread(values: List[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def table(results: dict) -> str:
    lines = ["| method | final mIoU (mean ± std) | range | best snapshot mIoU (mean ± std) |",
             "|---|---|---|---|"]
    for name, r in results.items():
        f, b = r["final"], r.get("best")
        best = f"{b['mean']:.2f} ± {b['std']:.2f}" if b else "-"
        lines.append(f"| {name} | {f['mean']:.2f} ± {f['std']:.2f} | {f['min']:.2f} - {f['max']:.2f} | {best} |")
    return "\n".join(lines)


def plot(curves: Dict[str, Dict[int, List[float]]], path: str) -> None:
    """mIoU over iterations: mean over seeds, min-max band (OpenCV drawing, no plotting library)."""
    w, h, left, right, top, bottom = 960, 540, 70, 260, 30, 50
    canvas = np.full((h, w, 3), 255, np.uint8)
    iters = sorted({i for c in curves.values() for i in c})
    values = [v for c in curves.values() for vs in c.values() for v in vs]
    x_max, y_max = max(iters), max(5.0, 5 * np.ceil(max(values) / 5))
    to_px = lambda i, v: (int(left + (w - left - right) * i / x_max), int(h - bottom - (h - top - bottom) * v / y_max))
    for k in range(6):  # grid and y labels
        v = y_max * k / 5
        y = to_px(0, v)[1]
        cv2.line(canvas, (left, y), (w - right, y), (225, 225, 225), 1)
        cv2.putText(canvas, f"{v:.0f}", (left - 40, y + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for i in iters:
        x = to_px(i, 0)[0]
        cv2.putText(canvas, str(i), (x - 15, h - bottom + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(canvas, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    cv2.putText(canvas, "iteration", ((w - right + left) // 2 - 30, h - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, "target val mIoU", (5, top - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for n, (name, curve) in enumerate(curves.items()):
        xs = sorted(curve)
        colour = COLOURS[name]
        band = [to_px(i, max(curve[i])) for i in xs] + [to_px(i, min(curve[i])) for i in reversed(xs)]
        overlay = canvas.copy()
        cv2.fillPoly(overlay, [np.array(band, np.int32)], colour)
        canvas = cv2.addWeighted(overlay, 0.15, canvas, 0.85, 0)
        mean = [to_px(i, statistics.fmean(curve[i])) for i in xs]
        cv2.polylines(canvas, [np.array(mean, np.int32)], False, colour, 2, cv2.LINE_AA)
        for p in mean:
            cv2.circle(canvas, p, 3, colour, -1, cv2.LINE_AA)
        y = top + 20 + 24 * n
        cv2.line(canvas, (w - right + 15, y - 4), (w - right + 45, y - 4), colour, 3)
        cv2.putText(canvas, name, (w - right + 52, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(path, canvas)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from advent_fast.config import load_config
    from advent_fast.data import ensure_embedded_data

    preset = load_config("embedded", args.overrides)
    stop_iter = args.iters or preset.train.stop_iter
    ensure_embedded_data(preset.data.embedded_root)  # once, before the parallel runs
    start = time.perf_counter()
    seconds = train_all(args, stop_iter)

    results, curves = {}, {}
    for method in args.methods:
        evals = [read_evaluations(run_dir(args.out, method, s)) for s in range(args.seeds)]
        results[method] = {"final": spread([e[-1]["miou"] for e in evals]),
                           "best": spread([max(r["miou"] for r in e) for e in evals])}
        curves[method] = {}
        for e in evals:
            for r in e:
                curves[method].setdefault(r["iter"], []).append(r["miou"])
    if {"advent", "minent_er"} <= set(args.methods):
        scores = evaluate_ensembles(args, stop_iter, preset.eval.max_images)
        results[ENSEMBLE] = {"final": spread(scores)}
        curves[ENSEMBLE] = {stop_iter: scores}
    text = table(results)
    print(f"\nEmbedded data, {stop_iter} iterations, seeds 0..{args.seeds - 1}, target val mIoU (%):\n{text}")
    payload = {"iterations": stop_iter, "seeds": args.seeds, "overrides": args.overrides, "results": results,
               "curves": {m: {str(i): v for i, v in c.items()} for m, c in curves.items()},
               "run_seconds": seconds, "wall_seconds": time.perf_counter() - start}
    with open(os.path.join(args.out, "bench_results.json"), "w") as f:
        json.dump(payload, f, indent=1)
    plot(curves, os.path.join(args.out, "bench_miou.png"))
    print(f"wrote {os.path.join(args.out, 'bench_results.json')} and {os.path.join(args.out, 'bench_miou.png')}")
    return payload


if __name__ == "__main__":
    main()
