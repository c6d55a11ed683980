"""Which ONNX builds keep the answers: the pipeline's own evaluate step over several variants.

    python -m bench.quality [--variants fp32 int8 int4 int4:algo_config=k_quant_last]
        [--model smollm2-135m] [--compute cpu] [--out bench/results]

Each variant is wrapped by the pipeline's wrap_onnx step (`compute.onnx_precision` plus one
`wrap.onnx_builder_options` override per builder option; builds are cached), then one evaluate
run asks the wrap_transformers model and every variant the whole evaluation set, greedy.
The table shows each model's accuracy, how many items it gets right that the reference ONNX
variant (the first one) gets wrong and vice versa, how many answers are word-for-word the
reference's, and its tokens/s in the evaluation. Speed is bench.speed's job; this is for
"which variants keep the reference's accuracy".

Results: --out/quality.json and --out/quality.md, and a run `bench-quality`; the evaluate run
itself (items, chart) is in the bench's tracking store too.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import mlflow

from bench.models import (
    EXPERIMENT,
    BenchModels,
    add_model_arguments,
    bench_config,
    bench_models,
    parse_variant,
    variant_label,
)
from bench.reporting import provenance, write_report
from steps import evaluate, wrap_onnx
from steps.config.schema import PipelineConfig, Runtime, model_label


@dataclass(frozen=True)
class Quality:
    label: str
    accuracy: float
    correct: int
    gained: int  # right here, wrong in the reference
    lost: int  # wrong here, right in the reference
    same_answers: int  # word for word the reference's answer
    items: int
    tokens_per_s: float


def step_config(models: BenchModels, overrides: list[str]) -> PipelineConfig:
    return bench_config(
        models.cfg.model.name, models.cfg.compute.name, models.tracking_uri, *overrides
    )


def wrap_variant(models: BenchModels, variant: str) -> str:
    """The run id of a wrap_onnx run that built and logged this variant."""
    precision, options = parse_variant(variant)
    overrides = [f"compute.onnx_precision={precision}"]
    overrides += [f"+wrap.onnx_builder_options.{k}={v}" for k, v in options.items()]
    return wrap_onnx.main(step_config(models, overrides)).model.wrap_run_id


def evaluate_runs(models: BenchModels, wrap_run_ids: list[str]) -> str:
    ids = ",".join(wrap_run_ids)
    evaluate.main(step_config(models, [f"evaluate.wrap_run_ids=[{ids}]"]))
    # The last active run is evaluate's last nested genai-evaluate run, not the step's own.
    (run,) = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        filter_string="tags.`pipeline.step` = 'evaluate'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return run.info.run_id


def compare(evaluate_run_id: str, labels: list[str], reference: str) -> list[Quality]:
    run = mlflow.get_run(evaluate_run_id)
    client = mlflow.MlflowClient()
    items = client.load_table(run.info.experiment_id, "eval/items.json", [evaluate_run_id])
    metrics = run.data.metrics
    right = {label: items[f"{label} correct"].astype(bool) for label in labels}
    answers = {label: items[f"{label} answer"] for label in labels}
    return [
        Quality(
            label=label,
            accuracy=metrics[f"{label}.accuracy"],
            correct=int(right[label].sum()),
            gained=int((right[label] & ~right[reference]).sum()),
            lost=int((~right[label] & right[reference]).sum()),
            same_answers=int((answers[label] == answers[reference]).sum()),
            items=len(items),
            tokens_per_s=metrics[f"{label}.tokens_per_s"],
        )
        for label in labels
    ]


def markdown(results: list[Quality], reference: str, evaluate_run_id: str) -> str:
    lines = [
        f"Evaluate run {evaluate_run_id}; reference: {reference}.",
        "",
        "| model | accuracy | right | gained | lost | same answer as reference | "
        "tokens/s in evaluation |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {q.label} | {q.accuracy:.3f} | {q.correct}/{q.items} | {q.gained} | {q.lost} | "
        f"{q.same_answers}/{q.items} | {q.tokens_per_s:.1f} |"
        for q in results
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["fp32", "int8", "int4", "int4:algo_config=k_quant_last"],
        help="ONNX builds to evaluate; the first is the reference",
    )
    args = parser.parse_args()
    models = bench_models(args.model, args.compute, args.out)
    client = mlflow.MlflowClient()
    transformers_run = client.get_logged_model(
        models.transformers_uri.removeprefix("models:/")
    ).source_run_id
    wrap_runs = [transformers_run] + [wrap_variant(models, v) for v in args.variants]
    evaluate_run_id = evaluate_runs(models, wrap_runs)
    transformers = model_label(Runtime.transformers, models.cfg.compute.torch_dtype.precision)
    labels = [transformers] + [variant_label(v) for v in args.variants]
    reference = labels[1]
    results = compare(evaluate_run_id, labels, reference)
    report = provenance(vars(args)) | {
        "evaluate_run_id": evaluate_run_id,
        "reference": reference,
        "results": [asdict(q) for q in results],
    }
    metrics = {f"{q.label}.accuracy": q.accuracy for q in results}
    table = markdown(results, reference, evaluate_run_id)
    write_report("quality", report, table, args.out, models.tracking_uri, metrics)


if __name__ == "__main__":
    main()
