"""How time to first token and decode rate grow with the prompt and the answer, per raw runtime.

    python -m bench.scaling [--prompt-lengths 16 128 512 1024] [--generation-lengths 32 128 256]
        [--variants fp32 int8] [--repetitions 3] [--threads N] [--no-llama-cpp]
        [--out bench/results]

For every prompt length, each runtime generates exactly the longest generation length (the end
token is ignored) from the same prompt ids: the first N tokens of a fixed English text, no chat
template. Each new token is timestamped, and the shorter generation lengths are read off the
same run: greedy decoding makes the first 32 tokens of a 256-token answer exactly a 32-token
answer. Repetitions are interleaved across runtimes after one untimed warm-up each; medians.

Results: --out/scaling.json, --out/scaling.md (TTFT and prefill rate per prompt length, decode
rate per prompt x generation length) and --out/scaling.png, also logged as a run
`bench-scaling` in the bench's tracking store.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.models import add_model_arguments, bench_models, onnx_build, variant_label
from bench.reporting import provenance, write_report
from bench.runtimes import RawRuntime, RuntimeSpec, Sample, llama_cpp_wanted, open_raw

# Long enough for the longest prompt once tokenized; its content does not change the timing.
TEXT = (
    "The lighthouse stood on a rock at the edge of the bay, and every evening the keeper "
    "climbed its one hundred and twelve steps to light the lamp. He kept a logbook of the "
    "weather, the ships that passed, the birds that rested on the gallery rail, and the "
    "letters his sister sent from the city. In winter the storms came from the north and the "
    "waves broke over the lower windows; in summer the sea was so calm that he could hear the "
    "fishermen talking in their boats a mile away. "
)


@dataclass(frozen=True)
class Point:
    runtime: str
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def prompt_ids(snapshot_dir: Path, length: int) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(snapshot_dir)
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer.encode(TEXT, add_special_tokens=False)
    return ids[:length]


def sweep(
    runtimes: dict[str, RawRuntime],
    prompts: dict[int, list[int]],
    generation_lengths: list[int],
    repetitions: int,
) -> list[Point]:
    longest = max(generation_lengths)
    for name, runtime in runtimes.items():
        runtime.generate(prompts[min(prompts)], 8, ignore_eos=True)  # warm-up
        print(f"warmed up {name}", flush=True)
    points = []
    for length, ids in prompts.items():
        samples: dict[str, list[Sample]] = {name: [] for name in runtimes}
        for _ in range(repetitions):
            for name, runtime in runtimes.items():
                samples[name].append(runtime.generate(ids, longest, ignore_eos=True))
        for name, runs in samples.items():
            for generated in generation_lengths:
                cut = [run.first(generated) for run in runs]
                points.append(
                    Point(
                        name,
                        length,
                        generated,
                        statistics.median(s.ttft_s for s in cut),
                        statistics.median(s.prefill_tokens_per_s for s in cut),
                        statistics.median(s.decode_tokens_per_s for s in cut),
                    )
                )
        print(f"prompt length {length} done", flush=True)
    return points


def markdown(points: list[Point], prompt_lengths: list[int], generated: list[int]) -> str:
    runtimes = list(dict.fromkeys(p.runtime for p in points))
    at = {(p.runtime, p.prompt_tokens, p.generated_tokens): p for p in points}
    first = generated[0]
    lines = [
        "Time to first token, s (prefill tokens/s):",
        "",
        "| runtime | " + " | ".join(f"prompt {n}" for n in prompt_lengths) + " |",
        "|---|" + "---:|" * len(prompt_lengths),
    ]
    for runtime in runtimes:
        cells = [at[runtime, n, first] for n in prompt_lengths]
        lines.append(
            f"| {runtime} | "
            + " | ".join(f"{p.ttft_s:.3f} ({p.prefill_tokens_per_s:.0f})" for p in cells)
            + " |"
        )
    lines += [
        "",
        "Decode tokens/s (after the first token) by prompt length x tokens generated:",
        "",
        "| runtime | prompt | " + " | ".join(f"{g} new" for g in generated) + " |",
        "|---|---:|" + "---:|" * len(generated),
    ]
    for runtime in runtimes:
        for n in prompt_lengths:
            cells = " | ".join(f"{at[runtime, n, g].decode_tokens_per_s:.1f}" for g in generated)
            lines.append(f"| {runtime} | {n} | {cells} |")
    return "\n".join(lines)


def chart(points: list[Point], prompt_lengths: list[int], generated: list[int], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = list(dict.fromkeys(p.runtime for p in points))
    at = {(p.runtime, p.prompt_tokens, p.generated_tokens): p for p in points}
    figure, (ttft, by_prompt, by_answer) = plt.subplots(1, 3, figsize=(16, 4.8))
    middle = generated[len(generated) // 2]
    for index, runtime in enumerate(runtimes):
        color = f"C{index}"  # one color per runtime in every panel
        ttft.plot(prompt_lengths, [at[runtime, n, generated[0]].ttft_s for n in prompt_lengths],
                  marker="o", color=color, label=runtime)  # fmt: skip
        by_prompt.plot(
            prompt_lengths,
            [at[runtime, n, middle].decode_tokens_per_s for n in prompt_lengths],
            marker="o",
            color=color,
        )
        for n, style in ((prompt_lengths[0], "-"), (prompt_lengths[-1], "--")):
            by_answer.plot(
                generated,
                [at[runtime, n, g].decode_tokens_per_s for g in generated],
                style,
                marker="o",
                color=color,
            )
    ttft.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="seconds",
             title="time to first token")  # fmt: skip
    by_prompt.set(xscale="log", xlabel="prompt tokens", ylabel="tokens/s",
                  title=f"decode rate, {middle} new tokens")  # fmt: skip
    by_answer.set(
        xlabel="new tokens",
        ylabel="tokens/s",
        title=f"decode rate: prompt {prompt_lengths[0]} (solid), {prompt_lengths[-1]} (dashed)",
    )
    for axes in (ttft, by_prompt, by_answer):
        axes.grid(alpha=0.3)
    ttft.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt-lengths", nargs="+", type=int, default=[16, 128, 512, 1024])
    parser.add_argument("--generation-lengths", nargs="+", type=int, default=[32, 128, 256])
    parser.add_argument("--variants", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, help="intra-op threads for every runtime")
    parser.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()
    args.llama_cpp = llama_cpp_wanted(args.llama_cpp)
    prompt_lengths, generated = sorted(args.prompt_lengths), sorted(args.generation_lengths)
    models = bench_models(args.model, args.compute, args.out)
    specs = [RuntimeSpec("transformers", "transformers", str(models.snapshot_dir), args.threads)]
    specs += [
        RuntimeSpec(variant_label(v), "onnx", str(onnx_build(models, v)), args.threads)
        for v in args.variants
    ]
    if args.llama_cpp and models.gguf is not None:
        specs.append(RuntimeSpec("llama.cpp", "llama.cpp", str(models.gguf), args.threads))
    runtimes = {spec.label: open_raw(spec) for spec in specs}
    prompts = {n: prompt_ids(models.snapshot_dir, n) for n in prompt_lengths}
    points = sweep(runtimes, prompts, generated, args.repetitions)
    picture = args.out / "scaling.png"
    chart(points, prompt_lengths, generated, picture)
    report = provenance(vars(args)) | {"points": [asdict(p) for p in points]}
    metrics = {
        f"{p.runtime}.p{p.prompt_tokens}.g{p.generated_tokens}.{key}": getattr(p, key)
        for p in points
        for key in ("ttft_s", "decode_tokens_per_s")
    }
    table = markdown(points, prompt_lengths, generated)
    write_report("scaling", report, table, args.out, models.tracking_uri, metrics, (picture,))


if __name__ == "__main__":
    main()
