"""Decode speed of the wrapped models against their raw runtimes and the memory-bandwidth bound.

    python -m bench.speed [--model smollm2-135m] [--compute cpu] [--new-tokens 64]
        [--repetitions 5] [--variants fp32 int8 int4 int4:int4_algo_config=k_quant_last]
        [--out bench/results]

It runs the pipeline's fetch, wrap_transformers and wrap_onnx steps into its own tracking store
under --out (reused on the next run, as `main` reuses steps), builds each ONNX variant with the
pipeline's builder (cached), and then times, side by side in one process and interleaved
repetition by repetition: raw transformers, the wrap_transformers pyfunc, raw
onnxruntime-genai for every variant, and the wrap_onnx pyfunc. One warm-up generation per
runtime is not counted. Results: --out/speed.json and --out/speed.md (also printed), and a
run `bench-speed` in the bench's tracking store with one metric per runtime and measure, both
files as artifacts and the git commit and package versions as tags:
`mlflow ui --backend-store-uri sqlite:///bench/results/mlflow.db`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow

from bench.bandwidth import read_bandwidth
from bench.decode_bytes import DecodeBytes, onnx_decode_bytes, safetensors_decode_bytes
from bench.runtimes import (
    Runner,
    Sample,
    pyfunc,
    raw_onnx,
    raw_transformers,
)
from steps import main as pipeline
from steps.core.config import PipelineConfig, compose_config
from steps.core.lineage import fetched_snapshot
from steps.core.onnx_build import build_inputs, build_onnx
from steps.core.provenance import git_state, package_versions
from steps.core.snapshot_store import SnapshotStore

# A request that asks for a long answer, so that greedy decoding runs to --new-tokens.
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@dataclass(frozen=True)
class Result:
    runtime: str
    wrapped: bool
    decode_bytes: int  # what one decode step reads, mid-answer
    prompt_tokens: int
    new_tokens: int
    ttft_s: float | None
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    decode_spread: tuple[float, float] | None  # min, max over the repetitions
    end_to_end_tokens_per_s: float
    end_to_end_spread: tuple[float, float]


def variant_options(variant: str) -> tuple[str, dict[str, str]]:
    """`int4:int4_algo_config=k_quant_last` -> ("int4", {"int4_algo_config": "k_quant_last"})."""
    precision, _, rest = variant.partition(":")
    options = dict(item.split("=", 1) for item in rest.split(",") if item)
    return precision, options


def prepare(
    cfg: PipelineConfig, overrides: list[str], variants: list[str]
) -> dict[str, tuple[Runner, DecodeBytes]]:
    """The runners, in the order they are timed, each with the bytes its decode step reads."""
    pipeline.main(cfg, overrides)  # reuses the steps of an earlier bench run
    parent = mlflow.last_active_run()
    tags = parent.data.tags
    _, fetched = fetched_snapshot(cfg, parent.info.experiment_id)
    store = SnapshotStore.open(cfg.fetch.cache_dir)
    transformers_bytes = safetensors_decode_bytes(fetched.model_dir)
    runners = {
        "transformers": (raw_transformers(fetched.model_dir), transformers_bytes),
        "transformers pyfunc": (
            pyfunc(tags["main.model_uri.transformers"], stream=False),
            transformers_bytes,
        ),
    }
    wrapped_variant = cfg.compute.onnx_precision.value
    for variant in variants:
        precision, options = variant_options(variant)
        inputs = build_inputs(
            fetched.manifest.snapshot_id, precision, cfg.compute.onnx_provider.value, options
        )
        built = build_onnx(cfg.model.name, fetched.model_dir, inputs, store)
        label = "-".join(["onnx", precision, *options.values()])
        decode_bytes = onnx_decode_bytes(built.model_dir)
        runners[label] = (raw_onnx(built.model_dir), decode_bytes)
        if variant == wrapped_variant:
            uri = tags["main.model_uri.onnxruntime-genai"]
            runners[f"{label} pyfunc"] = (pyfunc(uri, stream=True), decode_bytes)
    return runners


def measure(
    runners: dict[str, tuple[Runner, DecodeBytes]], new_tokens: int, repetitions: int
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {name: [] for name in runners}
    for name, (run, _) in runners.items():
        run(MESSAGES, new_tokens)  # warm-up
        print(f"warmed up {name}", flush=True)
    for repetition in range(repetitions):
        for name, (run, _) in runners.items():
            samples[name].append(run(MESSAGES, new_tokens))
        print(f"repetition {repetition + 1}/{repetitions} done", flush=True)
    return samples


def summarize(name: str, samples: list[Sample], decode_bytes: DecodeBytes) -> Result:
    first = samples[0]
    decode = [s.decode_tokens_per_s for s in samples if s.decode_tokens_per_s is not None]
    end_to_end = [s.end_to_end_tokens_per_s for s in samples]
    ttft = [s.ttft_s for s in samples if s.ttft_s is not None]
    prefill = [s.prefill_tokens_per_s for s in samples if s.prefill_tokens_per_s is not None]
    return Result(
        runtime=name,
        wrapped=name.endswith("pyfunc"),
        decode_bytes=decode_bytes.at(first.prompt_tokens + first.new_tokens // 2),
        prompt_tokens=first.prompt_tokens,
        new_tokens=first.new_tokens,
        ttft_s=statistics.median(ttft) if ttft else None,
        prefill_tokens_per_s=statistics.median(prefill) if prefill else None,
        decode_tokens_per_s=statistics.median(decode) if decode else None,
        decode_spread=(min(decode), max(decode)) if decode else None,
        end_to_end_tokens_per_s=statistics.median(end_to_end),
        end_to_end_spread=(min(end_to_end), max(end_to_end)),
    )


def markdown(results: list[Result], bandwidth: float) -> str:
    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"Read bandwidth {bandwidth / 1e9:.1f} GB/s. Bound = bandwidth / bytes one decode step "
        "reads (weights at their stored precision, one embedding row, the KV cache so far).",
        "",
        "| runtime | prompt | new | TTFT s | prefill tok/s | decode tok/s (min-max) | "
        "end-to-end tok/s | MB read / step | bound tok/s | decode / bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        bound = bandwidth / r.decode_bytes
        spread = (
            ""
            if r.decode_spread is None
            else f" ({r.decode_spread[0]:.1f}-{r.decode_spread[1]:.1f})"
        )
        fraction = None if r.decode_tokens_per_s is None else r.decode_tokens_per_s / bound
        lines.append(
            f"| {r.runtime} | {r.prompt_tokens} | {r.new_tokens} | {number(r.ttft_s, 3)} | "
            f"{number(r.prefill_tokens_per_s, 0)} | {number(r.decode_tokens_per_s)}{spread} | "
            f"{r.end_to_end_tokens_per_s:.1f} | {r.decode_bytes / 1e6:.1f} | {bound:.1f} | "
            f"{'-' if fraction is None else f'{fraction:.0%}'} |"
        )
    lines += ["", *overhead_lines(results)]
    return "\n".join(lines)


def overhead_lines(results: list[Result]) -> list[str]:
    """Wrapped over raw, per runtime, on the rate both report."""
    by_name = {r.runtime: r for r in results}
    lines = []
    for wrapped in (r for r in results if r.wrapped):
        raw = by_name[wrapped.runtime.removesuffix(" pyfunc")]
        if wrapped.decode_tokens_per_s and raw.decode_tokens_per_s:
            ratio, rate = wrapped.decode_tokens_per_s / raw.decode_tokens_per_s, "decode"
        else:
            ratio = wrapped.end_to_end_tokens_per_s / raw.end_to_end_tokens_per_s
            rate = "end-to-end"
        lines.append(f"- {wrapped.runtime} / {raw.runtime}: {ratio:.3f} of raw {rate} tokens/s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--compute", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument(
        "--variants", nargs="+", default=["fp32", "int8", "int4"], help="ONNX builds to time"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(args.out / 'mlflow.db').resolve()}"
    overrides = [f"tracking.uri={uri}", "tracking.experiment=bench"]
    cfg = compose_config(
        [
            f"model={args.model}",
            f"compute={args.compute}",
            *overrides,
            "main.steps=[fetch,wrap_transformers,wrap_onnx]",
        ]
    )
    runners = prepare(cfg, overrides, args.variants)
    bandwidth = read_bandwidth()
    samples = measure(runners, args.new_tokens, args.repetitions)
    results = [summarize(name, samples[name], runners[name][1]) for name in runners]
    table = markdown(results, bandwidth)
    print(table)
    commit, dirty = git_state()
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "git": {"commit": commit, "dirty": dirty},
        "versions": package_versions(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "read_bandwidth_bytes_per_s": bandwidth,
        "results": [asdict(r) for r in results],
    }
    (args.out / "speed.json").write_text(json.dumps(report, indent=2))
    (args.out / "speed.md").write_text(table + "\n")
    log_run(report, args.out, uri)


def log_run(report: dict, out: Path, tracking_uri: str) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("bench")
    with mlflow.start_run(run_name="bench-speed"):
        mlflow.log_params(report["settings"])
        mlflow.set_tags(
            {"git.commit": report["git"]["commit"], "git.dirty": str(report["git"]["dirty"])}
            | {f"versions.{name}": v for name, v in report["versions"].items()}
        )
        mlflow.log_metric("read_bandwidth_gb_per_s", report["read_bandwidth_bytes_per_s"] / 1e9)
        for result in report["results"]:
            name = result["runtime"].replace(" ", "_")
            for key in ("ttft_s", "decode_tokens_per_s", "end_to_end_tokens_per_s"):
                if result[key] is not None:
                    mlflow.log_metric(f"{name}.{key}", result[key])
        mlflow.log_artifact(str(out / "speed.json"))
        mlflow.log_artifact(str(out / "speed.md"))


if __name__ == "__main__":
    main()
