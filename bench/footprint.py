"""What the ONNX builds of a model cost on this machine (builder wall time and peak memory, size
on disk), and the same costs estimated for a larger model of the same kind by scaling with
parameter count: the estimates docs/phi3.md gives for a real Phi-3, whose weights these
machines cannot reach.

    python -m bench.footprint [--model smollm2-135m] [--scale-to phi3-mini-4k]
        [--variants fp32 int8 int4 int4:algo_config=k_quant_last] [--out bench/results]

Each build runs the pipeline's builder command in a fresh subprocess into a temp folder (never
the cache, so it always builds), with its resident memory (children included) polled every
50 ms. The target's parameters come from its architecture: the real model's config fields
(ARCHITECTURES) instantiated on torch's meta device, so no weights are needed.

How the estimates are made:
- size: each build's bytes per parameter, measured separately for the embedding table, the
  output projection and the transformer layers (from the ONNX initializers' byte lengths),
  times the target's parameters in each role. A builder treats the three differently (the
  int8 build keeps the embedding in float32), and the roles' shares differ a lot between
  models (the bundled model's tied 49k-token embedding is a fifth of its parameters).
- builder time and peak memory: what the builder costs above its fixed start (an interpreter
  importing the builder's libraries, measured here), scaled by the parameter ratio.
- decode speed: bounded by the machine's read bandwidth (bench.bandwidth, measured in the same
  run) over the estimated bytes of one build; the bundled model reaches 70-95% of that bound
  (docs/benchmarks.md).
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
from steps.onnx.build import build_inputs, builder_command
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


ROLES = ("embedding", "output", "layers")
# What the builder process imports before it reads any weight.
STARTUP = "import onnxruntime_genai.models.builder, torch, transformers"


@dataclass(frozen=True)
class Build:
    variant: str
    name: str  # the build as labels name it (int4-k_quant_last)
    seconds: float
    peak_bytes: int
    size_bytes: int
    role_bytes: dict[str, int]  # initializer bytes of the embedding, the output, the layers


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_bytes: int


def cpu_name() -> str:
    """The CPU's model name (Linux), which the figures depend on."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.machine()


def role_of(name: str) -> str:
    """Which part of the model a weight (HF) or initializer (ONNX) belongs to."""
    if "embed_tokens" in name:
        return "embedding"
    return "output" if name.startswith("lm_head") else "layers"


def parameters_of(config_fields: dict) -> dict[str, int]:
    """Parameters by role of an architecture, from its config alone (meta tensors, no memory);
    a tied output projection counts as its own, as the builder writes it separately."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = {"Phi3ForCausalLM": "phi3"}[config_fields["architectures"][0]]
    config = AutoConfig.for_model(model_type, **config_fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return _by_role((name, p.numel()) for name, p in model.named_parameters(remove_duplicate=False))


def parameters_in(folder: Path) -> dict[str, int]:
    """Parameters by role of a checkpoint, from its config and safetensors headers."""
    from safetensors import safe_open

    shapes = []
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as tensors:
            names = tensors.keys()  # a safe_open handle is not iterable itself
            shapes += [(n, math.prod(tensors.get_slice(n).get_shape())) for n in names]
    counts = _by_role(shapes)
    if not counts["output"]:  # tied: the builder writes the embedding again as the output
        counts["output"] = counts["embedding"]
    return counts


def _by_role(sizes) -> dict[str, int]:
    counts = dict.fromkeys(ROLES, 0)
    for name, size in sizes:
        counts[role_of(name)] += size
    return counts


def initializer_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes of the ONNX model's initializers by role (external data lengths, or inline)."""
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    sizes = dict.fromkeys(ROLES, 0)
    for tensor in graph.initializer:
        external = {entry.key: entry.value for entry in tensor.external_data}
        sizes[role_of(tensor.name)] += int(external.get("length", len(tensor.raw_data)))
    return sizes


def measured(command: list[str], log: Path) -> Measured:
    """Wall time and peak resident memory (children included) of a command."""
    started, peak = time.monotonic(), 0
    with log.open("wb") as sink:
        process = psutil.Popen(command, stdout=sink, stderr=sink)
        while process.poll() is None:
            try:
                processes = [process, *process.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in processes))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed; see {log}")
    return Measured(time.monotonic() - started, peak)


def timed_build(snapshot: Path, variant: str, scratch: Path) -> Build:
    spec = parse_build_spec(variant, "--variants")
    output = scratch / spec.name
    # The pipeline's own command line, without its cache: every variant is really built.
    inputs = build_inputs("footprint", spec.precision, "cpu", spec.options)
    command = builder_command(snapshot, output, scratch / "builder-cache", inputs)
    print(f"building {variant} ...", flush=True)
    cost = measured(command, scratch / f"{spec.name}.log")
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    return Build(variant, spec.name, cost.seconds, cost.peak_bytes, size, initializer_bytes(output))


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
    here, target = parameters_in(snapshot.model_dir), parameters_of(ARCHITECTURES[args.scale_to])
    scale = sum(target.values()) / sum(here.values())
    with tempfile.TemporaryDirectory(prefix="footprint-") as scratch:
        start = measured([sys.executable, "-c", STARTUP], Path(scratch) / "startup.log")
        builds = [timed_build(snapshot.model_dir, v, Path(scratch)) for v in args.variants]
    bandwidth = read_bandwidth()

    rows = [
        f"{args.model} built here ({sum(here.values()) / 1e6:.1f} M weights as the builder "
        f"writes them, a tied output counted again); {args.scale_to} "
        f"({sum(target.values()) / 1e9:.2f} B, {scale:.1f}x) estimated from it "
        f"(bench/footprint.py says how). {cpu_name()}, "
        f"{psutil.cpu_count()} cores, read bandwidth {bandwidth / 1e9:.1f} GB/s; the builder's "
        f"fixed start: {start.seconds:.1f} s, {start.peak_bytes / MiB:.0f} MiB.",
        "",
        "| build | seconds | builder peak | size | est. time | est. builder peak | est. size "
        "| est. decode bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in builds:
        est_size = sum(b.role_bytes[r] / here[r] * target[r] for r in ROLES if here[r])
        est_seconds = start.seconds + (b.seconds - start.seconds) * scale
        est_peak = start.peak_bytes + (b.peak_bytes - start.peak_bytes) * scale
        rows.append(
            f"| {b.variant} | {b.seconds:.1f} | {b.peak_bytes / MiB:.0f} MiB | "
            f"{b.size_bytes / MiB:.0f} MiB | {est_seconds / 60:.0f} min | "
            f"{est_peak / GiB:.1f} GiB | {est_size / GiB:.1f} GiB | "
            f"{bandwidth / est_size:.1f} tok/s |"
        )
    table = "\n".join(rows)
    report = provenance(vars(args)) | {
        "parameters": here,
        "target_parameters": target,
        "builder_start": asdict(start),
        "read_bandwidth_bytes_per_s": bandwidth,
        "builds": [asdict(b) for b in builds],
    }
    metrics = {f"{b.name}.build_seconds": b.seconds for b in builds}
    write_report(
        f"footprint-{args.scale_to}", report, table, args.out, tracking_uri(args.out), metrics
    )


if __name__ == "__main__":
    main()
