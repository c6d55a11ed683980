"""What the ONNX builds of a model cost on this machine (builder wall time and peak memory, size
on disk), and the same costs estimated for a larger model of the same kind by scaling with
parameter count: the estimates docs/phi3.md gives for a real Phi-3, whose weights these
machines cannot reach.

    python -m bench.footprint [--model smollm2-135m] [--scale-to phi3-mini-4k]
        [--variants fp32 int8 int4 int4:algo_config=k_quant_last] [--out bench/results]

Each build runs the pipeline's builder command in a fresh subprocess into a temp folder (never
the cache, so it always builds), with its resident memory (children included) polled every
50 ms. The target's parameter count comes from its architecture: the real model's config
fields (ARCHITECTURES) instantiated on torch's meta device, so no weights are needed. The
estimates are linear in parameters: the builder's time, memory and output all scale with the
tensors it processes, give or take fixed costs that a larger model only makes smaller. Decode
speed is bounded by the machine's read bandwidth (bench.bandwidth, measured in the same run)
over the bytes of one build; the bundled model reaches 70-95% of that bound (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from bench.bandwidth import read_bandwidth
from bench.models import add_model_arguments, tracking_uri
from bench.reporting import provenance, write_report
from steps.config.compose import compose_config
from steps.config.onnx_builds import parse_build_spec
from steps.sources.snapshots import fetch_snapshot
from steps.store.snapshot_store import SnapshotStore

GiB, MiB = 2**30, 2**20
# config.json of the real checkpoints at the pins in conf/model (the three share one shape;
# 128k and 3.5 add LongRoPE, which changes no parameter).
PHI3_MINI = {
    "architectures": ["Phi3ForCausalLM"],
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "tie_word_embeddings": False,
}
ARCHITECTURES = {"phi3-mini-4k": PHI3_MINI, "phi3-mini-128k": PHI3_MINI, "phi3.5-mini": PHI3_MINI}


@dataclass(frozen=True)
class Build:
    variant: str
    seconds: float
    peak_bytes: int
    size_bytes: int


def parameters_of(config_fields: dict) -> int:
    """Parameter count of an architecture, from its config alone (meta tensors, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = {"Phi3ForCausalLM": "phi3"}[config_fields["architectures"][0]]
    config = AutoConfig.for_model(model_type, **config_fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def parameters_in(folder: Path) -> int:
    """Parameter count of a checkpoint, from its safetensors headers."""
    from safetensors import safe_open

    count = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as tensors:
            names = tensors.keys()  # a safe_open handle is not iterable itself
            count += sum(math.prod(tensors.get_slice(name).get_shape()) for name in names)
    return count


def timed_build(snapshot: Path, variant: str, scratch: Path) -> Build:
    spec = parse_build_spec(variant, "--variants")
    output = scratch / spec.name
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(snapshot),
        "-o", str(output), "-c", str(scratch / "builder-cache"), "-p", spec.precision, "-e", "cpu",
    ]  # fmt: skip
    if spec.options:
        command += ["--extra_options", *(f"{k}={v}" for k, v in spec.options.items())]
    print(f"building {variant} ...", flush=True)
    started, peak = time.monotonic(), 0
    with (scratch / f"{spec.name}.log").open("wb") as log:
        builder = psutil.Popen(command, stdout=log, stderr=log)
        while builder.poll() is None:
            try:
                processes = [builder, *builder.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in processes))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
    if builder.returncode != 0:
        raise SystemExit(f"the {variant} build failed; see {scratch / f'{spec.name}.log'}")
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    return Build(variant, time.monotonic() - started, peak, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--scale-to", default="phi3-mini-4k", choices=sorted(ARCHITECTURES))
    parser.add_argument(
        "--variants", nargs="+", default=["fp32", "int8", "int4", "int4:algo_config=k_quant_last"]
    )
    args = parser.parse_args()

    cfg = compose_config([f"model={args.model}", f"compute={args.compute}"])
    snapshot = fetch_snapshot(cfg.model, cfg.compute.target, cfg.fetch.artifact,
                              SnapshotStore.open(cfg.fetch.cache_dir))  # fmt: skip
    measured_params = parameters_in(snapshot.model_dir)
    target_params = parameters_of(ARCHITECTURES[args.scale_to])
    scale = target_params / measured_params
    with tempfile.TemporaryDirectory(prefix="footprint-") as scratch:
        builds = [timed_build(snapshot.model_dir, v, Path(scratch)) for v in args.variants]
    bandwidth = read_bandwidth()

    rows = [
        f"{args.model} ({measured_params / 1e6:.1f} M parameters) built here; {args.scale_to} "
        f"({target_params / 1e9:.2f} B parameters, {scale:.1f}x) estimated by scaling. "
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, read "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s.",
        "",
        "| build | seconds | builder peak | size | est. seconds | est. builder peak | est. size "
        "| est. decode bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in builds:
        est_size = b.size_bytes * scale
        rows.append(
            f"| {b.variant} | {b.seconds:.1f} | {b.peak_bytes / MiB:.0f} MiB | "
            f"{b.size_bytes / MiB:.0f} MiB | {b.seconds * scale / 60:.0f} min | "
            f"{b.peak_bytes * scale / GiB:.1f} GiB | {est_size / GiB:.1f} GiB | "
            f"{bandwidth / est_size:.1f} tok/s |"
        )
    table = "\n".join(rows)
    report = provenance(vars(args)) | {
        "measured_parameters": measured_params,
        "target_parameters": target_params,
        "read_bandwidth_bytes_per_s": bandwidth,
        "builds": [asdict(b) for b in builds],
    }
    metrics = {f"{b.variant}.build_seconds": b.seconds for b in builds}
    write_report(
        f"footprint-{args.scale_to}", report, table, args.out, tracking_uri(args.out), metrics
    )


if __name__ == "__main__":
    main()
