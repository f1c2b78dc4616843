"""Per-epoch speed of the training engine against a reference loop written the usual way.

    python benchmarks/train_throughput.py --config configs/exp12.yaml --device cuda
    python benchmarks/train_throughput.py --config configs/quick.yaml --device cpu --train-images 12000
    python benchmarks/train_throughput.py --config configs/exp12.yaml --device cuda --modes reference,engine64,engine64+graphs

Modes, run interleaved (one epoch of each per round) so drift hits them alike; medians reported:
  reference          DataLoader over CPU tensors, batch 64, fp32, loss.item() every step
  engine64           the engine at batch 64 in fp32: the same math as the reference
  enginefast         the engine with its fast settings (batch 256, bf16 autocast and channels_last
                     on CUDA; --compile adds torch.compile)
  engine64+graphs    engine64 with every step replayed from a CUDA graph (CUDA only)
  enginefast+graphs  enginefast with CUDA graphs (CUDA only; not with --compile)
The plain engine modes run without CUDA graphs. Needs only torch, numpy and pyyaml (no mlflow or
hyperopt), so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fmnist_hpo.config.loading import load
from fmnist_hpo.config.sections import Config
from fmnist_hpo.data.datasets import dataset_named
from fmnist_hpo.data.loading import load_dataset
from fmnist_hpo.data.splits import Split, make_splits
from fmnist_hpo.training.batches import normalize
from fmnist_hpo.training.device import resolve_device
from fmnist_hpo.training.loop import make_optimizer, prepare_trial, train_epoch
from fmnist_hpo.training.model import build_model

MODES = ("reference", "engine64", "enginefast", "engine64+graphs", "enginefast+graphs")


def reference_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> float:
    """The loop most tutorials write: per-sample collation, host->device copies, a sync per step."""
    model.train()
    total = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
    return total / len(loader.dataset)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/exp12.yaml")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="epochs of each mode, interleaved")
    parser.add_argument("--train-images", type=int, default=None, help="train on a class-balanced subset")
    parser.add_argument("--modes", default="reference,engine64,enginefast")
    parser.add_argument("--fast-batch", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="torch.compile in enginefast")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    subset = [f"data.train_subset={args.train_images}"] if args.train_images else []
    cfg = load(args.config, ["search.space={}", *subset])
    device = resolve_device(args.device)
    result = measure(cfg, device, args.modes.split(","), args.rounds, args.fast_batch, args.compile)
    print(f"{args.config} on {result['machine']}; {result['train_images']} training images, "
          f"{args.rounds} rounds, torch {torch.__version__}")
    print(table(result["results"]))
    if args.out:
        args.out.write_text(json.dumps({"config": args.config, **result}, indent=2))


def measure(cfg: Config, device: torch.device, modes: list[str], rounds: int, fast_batch: int = 256,
            compile_fast: bool = False) -> dict:
    """Median seconds per training epoch of each mode, interleaved over rounds, as a JSON-ready dict."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if device.type != "cuda":
        modes = [m for m in modes if not m.endswith("+graphs")]  # CUDA graphs need CUDA
    splits = make_splits(load_dataset(cfg.data), cfg.data, device)
    cpu_train = Split(splits.train.images.cpu(), splits.train.labels.cpu())
    engines: list = []
    runners = {mode: make_runner(mode, cfg, cpu_train, splits.train, device, fast_batch, compile_fast, engines)
               for mode in modes}
    for runner in runners.values():  # warm-up: allocator, cudnn autotuning, graph capture, compilation
        runner()
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    peak: dict[str, int] = {}
    for _ in range(rounds):
        for mode, runner in runners.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            runner()
            sync(device)
            seconds[mode].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak[mode] = torch.cuda.max_memory_allocated(device)
    for engine in engines:
        engine.release_graphs()
    return {"machine": machine(device), "device": str(device), "torch": torch.__version__,
            "train_images": len(cpu_train), "date": time.strftime("%Y-%m-%d"),
            "results": rows(len(cpu_train), seconds, peak)}


def make_runner(mode: str, cfg: Config, cpu_train: Split, train: Split, device: torch.device,
                fast_batch: int, compile_fast: bool, engines: list):
    if mode == "reference":
        torch.manual_seed(0)
        info = dataset_named(cfg.data.dataset)
        model = build_model(cfg.model, info).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        dataset = TensorDataset(normalize(cpu_train.images, info), cpu_train.labels)
        loader = DataLoader(dataset, batch_size=64, shuffle=True)
        return lambda: reference_epoch(model, loader, optimizer, device)
    graphs = mode.endswith("+graphs")
    if mode.startswith("engine64"):
        train_cfg = cfg.train.model_copy(update={"batch_size": 64, "precision": "fp32", "channels_last": False,
                                                 "compile": False, "seed": 0, "cuda_graphs": graphs})
    else:
        train_cfg = cfg.train.model_copy(update={"batch_size": fast_batch, "precision": "auto", "channels_last": True,
                                                 "compile": compile_fast and not graphs, "seed": 0, "cuda_graphs": graphs})
    model, engine = prepare_trial(cfg.model_copy(update={"train": train_cfg}), device)
    optimizer = make_optimizer(model, train_cfg, engine)
    engines.append(engine)  # its graphs are released when the measurement ends
    return lambda: train_epoch(model, train, optimizer, engine, train_cfg, cfg.data)


def rows(n_images: int, seconds: dict[str, list[float]], peak: dict[str, int]) -> list[dict]:
    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    base = medians.get("reference")
    return [{"mode": mode, "seconds_per_epoch": median, "all_seconds": seconds[mode],
             "images_per_second": n_images / median, "peak_mib": peak[mode] / 2**20 if mode in peak else None,
             "speedup_vs_reference": base / median if base else float("nan")}
            for mode, median in medians.items()]


def table(results: list[dict]) -> str:
    lines = [f"{'mode':<19}{'s/epoch':>10}{'images/s':>12}{'peak MiB':>10}{'vs reference':>14}"]
    for row in results:
        mib = f"{row['peak_mib']:>10.0f}" if row["peak_mib"] is not None else f"{'n/a':>10}"
        lines.append(f"{row['mode']:<19}{row['seconds_per_epoch']:>10.2f}{row['images_per_second']:>12.0f}"
                     f"{mib}{row['speedup_vs_reference']:>13.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
