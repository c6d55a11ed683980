"""Which ONNX builds stay faithful to the model: the pipeline's own evaluate step over several
builds, against the transformers model.

    python -m bench.quality [--variants fp32 int8 int4 int4:algo_config=k_quant_last]
        [--model smollm2-135m] [--compute cpu] [--out bench/results] [--overrides ...]

Each variant is wrapped by the pipeline's wrap_onnx step (`wrap.onnx_build=<variant>`; builds
are cached), then one evaluate run scores every variant against the wrap_transformers model:
teacher-forced fidelity on the fidelity text (mean and 99th-percentile KL divergence, top-1
agreement, perplexity ratio) and the task set (accuracy with its 95% interval, items lost and
gained against the reference, exact McNemar p). Every build is asked the task set, the ones
that fail fidelity too (`evaluate.ask=all`: this is the study the pipeline's shortcut rests
on). The table also says which build the register step's fastest_faithful policy would choose
and why the others were not. `--overrides` passes config overrides to both steps (e.g.
`evaluate.fidelity.scored_tokens=null` for the whole text, `evaluate.ask=contenders` for the
pipeline's own evaluation).

Results: --out/quality.json and --out/quality.md, and a run `bench-quality`; the evaluate run
itself (items, charts) is in the bench's tracking store too.
"""

from __future__ import annotations

import argparse

import mlflow

from bench.models import (
    BenchModels,
    add_model_arguments,
    bench_config,
    bench_models,
    parse_variant,
)
from bench.reporting import provenance, write_report
from steps import evaluate, wrap_onnx
from steps.config.schema import PipelineConfig
from steps.evaluate import EvaluateResult
from steps.evaluation.report import candidates_table


def step_config(models: BenchModels, overrides: list[str]) -> PipelineConfig:
    return bench_config(
        models.cfg.model.name, models.cfg.compute.name, models.tracking_uri, *overrides
    )


def wrap_variant(models: BenchModels, variant: str, overrides: list[str]) -> str:
    """The run id of a wrap_onnx run that built and logged this variant."""
    spec = parse_variant(variant).spec
    return wrap_onnx.main(
        step_config(models, [*overrides, f"wrap.onnx_build='{spec}'"])
    ).model.wrap_run_id


def markdown(result: EvaluateResult) -> str:
    return (
        f"Reference: {result.reference}; {len(result.eval_set.items)} items of "
        f"{result.eval_set.name}; fidelity on {result.fidelity_text.name}; the last column is "
        "register's fastest_faithful verdict.\n\n"
        + candidates_table(
            result.summaries, result.reference, result.selection.verdicts, result.answers
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["fp32", "int8", "int4", "int4:algo_config=k_quant_last"],
        help="ONNX builds to compare with the transformers model",
    )
    parser.add_argument(
        "--overrides", nargs="*", default=[], help="config overrides for wrap_onnx and evaluate"
    )
    args = parser.parse_args()
    models = bench_models(args.model, args.compute, args.out)
    client = mlflow.MlflowClient()
    transformers_run = client.get_logged_model(
        models.transformers_uri.removeprefix("models:/")
    ).source_run_id
    wrap_runs = [transformers_run] + [
        wrap_variant(models, v, args.overrides) for v in args.variants
    ]
    ids = ",".join(wrap_runs)
    overrides = ["evaluate.ask=all", *args.overrides, f"evaluate.wrap_run_ids=[{ids}]"]
    result = evaluate.main(step_config(models, overrides))
    report = provenance(vars(args)) | {
        "reference": result.reference,
        "chosen": result.selection.chosen,
        "results": result.summaries,
        "verdicts": result.selection.verdicts,
    }
    metrics = {
        f"{label}.{key}": summary[key]
        for label, summary in result.summaries.items()
        for key in ("accuracy", "kld_mean", "top1_agreement", "ppl_ratio")
        if key in summary  # a build not asked (evaluate.ask=contenders) has no accuracy
    }
    write_report("quality", report, markdown(result), args.out, models.tracking_uri, metrics)


if __name__ == "__main__":
    main()
