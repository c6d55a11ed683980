"""Where a decode step's time goes in onnxruntime-genai, per ONNX build.

    python -m bench.profile_decode [--variants fp32 int8 int4] [--prompt-tokens 128]
        [--new-tokens 64] [--threads N] [--out bench/results]

Each build runs once with onnxruntime's own profiler on (the decoder session's
`enable_profiling`): a prompt of --prompt-tokens, then exactly --new-tokens greedy tokens, on
every available core as the wrap_onnx model runs (--threads N sets a number; 0 leaves
onnxruntime's own default, which ran a single thread on a 2-core VM). The profile has one
`model_run` per forward pass and one event per kernel; the first pass is the prompt (prefill)
and is left out. Per decode token the table shows the wall time of the
whole `generate_next_token`, the time inside onnxruntime's session run, each op type's kernel
time, and what is left: onnxruntime-genai's own work around the session run (copying logits,
the greedy search over the vocabulary, growing the KV cache) plus Python.

Results: --out/profile.json and --out/profile.md, also a run `bench-profile`.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.models import add_model_arguments, bench_models, onnx_build, variant_label
from bench.reporting import provenance, write_report
from bench.runtimes import available_cores, onnx_config
from bench.scaling import prompt_ids


@dataclass(frozen=True)
class DecodeProfile:
    runtime: str
    tokens: int
    wall_ms: float  # per decode token, generate_next_token as a caller sees it
    session_ms: float  # per decode token, inside onnxruntime's session run
    ops_ms: dict[str, float]  # per decode token, kernel time by op type, largest first


def profile(
    label: str, folder: Path, ids: list[int], new_tokens: int, threads: int | None
) -> DecodeProfile:
    import onnxruntime_genai as og

    with tempfile.TemporaryDirectory(prefix="ort-profile-") as scratch:
        session: dict[str, object] = {"enable_profiling": str(Path(scratch) / "decode")}
        if threads != 0:
            session["intra_op_num_threads"] = threads or available_cores()
        model = og.Model(onnx_config(folder, session))
        params = og.GeneratorParams(model)
        length = len(ids) + new_tokens
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        generator.generate_next_token()  # the prompt's pass and the first token
        started = time.perf_counter()
        decoded = 0
        while not generator.is_done():
            generator.generate_next_token()
            decoded += 1
        wall = time.perf_counter() - started
        del generator, params, model  # the session writes its profile when it closes
        gc.collect()
        (trace,) = Path(scratch).glob("decode*.json")
        events = json.loads(trace.read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) < decoded + 1:
        raise RuntimeError(f"{folder}: the profile has {len(runs)} passes for {decoded + 1}")
    decode_from = runs[-decoded]["ts"]
    ops: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["ts"] >= decode_from:
            ops[event["args"].get("op_name", event["name"])] += event["dur"]
    per_token = 1e-3 / decoded  # microseconds in the trace -> ms per token
    return DecodeProfile(
        runtime=label,
        tokens=decoded,
        wall_ms=wall * 1e3 / decoded,
        session_ms=sum(r["dur"] for r in runs[-decoded:]) * per_token,
        ops_ms={op: us * per_token for op, us in sorted(ops.items(), key=lambda kv: -kv[1])},
    )


def markdown(profiles: list[DecodeProfile], top: int = 6) -> str:
    lines = [
        "Per decode token, ms (share of the wall time):",
        "",
        "| build | tokens/s | wall | session run | outside the session | top kernels |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for p in profiles:
        outside = p.wall_ms - p.session_ms
        kernels = ", ".join(
            f"{op} {ms:.2f} ({ms / p.wall_ms:.0%})" for op, ms in list(p.ops_ms.items())[:top]
        )
        lines.append(
            f"| {p.runtime} | {1e3 / p.wall_ms:.1f} | {p.wall_ms:.2f} | "
            f"{p.session_ms:.2f} ({p.session_ms / p.wall_ms:.0%}) | "
            f"{outside:.2f} ({outside / p.wall_ms:.0%}) | {kernels} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--variants", nargs="+", default=["fp32", "int8", "int4"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        help="intra-op threads (default: every available core; 0: onnxruntime's own default)",
    )
    args = parser.parse_args()
    models = bench_models(args.model, args.compute, args.out)
    ids = prompt_ids(models.snapshot_dir, args.prompt_tokens)
    profiles = []
    for variant in args.variants:
        folder = onnx_build(models, variant)
        label = variant_label(variant)
        profiles.append(profile(label, folder, ids, args.new_tokens, args.threads))
        print(f"profiled {variant}", flush=True)
    report = provenance(vars(args)) | {"profiles": [asdict(p) for p in profiles]}
    metrics = {
        f"{p.runtime}.{key}": getattr(p, key) for p in profiles for key in ("wall_ms", "session_ms")
    }
    write_report("profile", report, markdown(profiles), args.out, models.tracking_uri, metrics)


if __name__ == "__main__":
    main()
