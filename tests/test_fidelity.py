"""The fidelity scorer and the statistics behind the choice, fed known distributions and counts
whose answers are worked out by hand (no model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from steps.config.compose import compose_config, project_path
from steps.errors import PipelineError
from steps.evaluation.fidelity import Agreement, load_fidelity_text, windows
from steps.evaluation.selection import fastest_faithful, plan_asking
from steps.evaluation.stats import mcnemar_exact_p, wilson_interval
from steps.main import preflight


def logits_of(*distributions: tuple[float, ...]) -> np.ndarray:
    """Logits whose softmax is each given distribution."""
    return np.log(np.array(distributions, dtype=np.float32))


def test_identical_distributions_agree_perfectly() -> None:
    agreement = Agreement()
    same = logits_of((0.7, 0.2, 0.1), (0.1, 0.1, 0.8))
    agreement.add(same, same.copy(), np.array([0, 2]))
    summary = agreement.summary()
    assert summary["kld_mean"] == summary["kld_max"] == 0.0
    assert summary["top1_agreement"] == 1.0
    assert summary["ppl_ratio"] == pytest.approx(1.0)
    assert summary["delta_p_rms"] == pytest.approx(0.0, abs=1e-7)
    # The reference's perplexity: exp of the mean negative log-likelihood of the actual tokens.
    assert summary["ppl_reference"] == pytest.approx(math.exp(-(math.log(0.7) + math.log(0.8)) / 2))


def test_a_shifted_distribution_gives_the_hand_computed_statistics() -> None:
    agreement = Agreement()
    agreement.add(logits_of((0.6, 0.4)), logits_of((0.3, 0.7)), np.array([0]))
    summary = agreement.summary()
    # KL(ref || cand) = 0.6 ln(0.6/0.3) + 0.4 ln(0.4/0.7)
    assert summary["kld_mean"] == pytest.approx(0.6 * math.log(2) + 0.4 * math.log(4 / 7), rel=1e-5)
    assert summary["top1_agreement"] == 0.0  # token 0 against token 1
    assert summary["ppl_ratio"] == pytest.approx(0.6 / 0.3, rel=1e-5)  # one token: p_ref / p_cand
    assert summary["delta_p_rms"] == pytest.approx(0.3, rel=1e-5)  # |0.3 - 0.6|


def test_disjoint_distributions_are_far_apart() -> None:
    agreement = Agreement()
    reference = np.array([[20.0, 0.0, 0.0]], dtype=np.float32)
    candidate = np.array([[0.0, 20.0, 0.0]], dtype=np.float32)
    agreement.add(reference, candidate, np.array([0]))
    summary = agreement.summary()
    # Nearly all of the reference's mass sits where the candidate has e^-20 of its own.
    assert summary["kld_mean"] == pytest.approx(20.0, rel=1e-3)
    assert summary["top1_agreement"] == 0.0
    assert summary["ppl_ratio"] == pytest.approx(math.exp(20.0), rel=1e-3)


def test_statistics_pool_every_window() -> None:
    agreement = Agreement()
    near, far = logits_of((0.5, 0.5)), logits_of((0.9, 0.1))
    agreement.add(near, near, np.array([0]))  # KLD 0
    for _ in range(99):
        agreement.add(near, far, np.array([1]))
    summary = agreement.summary()
    kld = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert summary["scored_tokens"] == 100
    assert summary["kld_mean"] == pytest.approx(kld * 99 / 100, rel=1e-5)
    assert summary["kld_max"] == pytest.approx(kld, rel=1e-5)
    low, high = summary["top1_agreement_ci_low"], summary["top1_agreement_ci_high"]
    assert low <= summary["top1_agreement"] <= high


def test_logits_of_different_vocabularies_are_refused() -> None:
    with pytest.raises(PipelineError, match="do not share a vocabulary"):
        Agreement().add(logits_of((0.5, 0.5)), logits_of((0.2, 0.3, 0.5)), np.array([0]))


def test_windows_cover_the_scored_tokens_and_refuse_a_short_text() -> None:
    stream = np.arange(10_000)
    # 511 - 256 = 255 scored per window of 512, so 1,000 scored tokens need 4 windows.
    chosen = windows(stream, 512, 1000)
    assert len(chosen) == 4 and all(len(w) == 512 for w in chosen)
    assert chosen[1][0] == 512  # consecutive, not overlapping
    assert len(windows(stream, 512, None)) == 19
    with pytest.raises(PipelineError, match="shorter than one window of 512"):
        windows(np.arange(300), 512, 1000)


def test_shipped_fidelity_text_is_prose_and_chat() -> None:
    text = load_fidelity_text(project_path(compose_config([]).evaluate.fidelity.text))
    kinds = {document.kind for document in text.documents}
    assert kinds == {"prose", "chat"}
    assert (text.path.parent / f"{text.path.stem}.LICENSE").is_file()


def test_a_bad_fidelity_line_is_reported_by_line_number(tmp_path: Path) -> None:
    path = tmp_path / "text.jsonl"
    good = {"id": "a", "kind": "prose", "text": "Some words."}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"id": "b", "kind": "poem"}) + "\n")
    with pytest.raises(PipelineError, match=r"text.jsonl:2: not a fidelity document"):
        load_fidelity_text(path)


def test_wilson_bounds_hold_the_share_and_mcnemar_p_matches_hand_computed_counts() -> None:
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0
    for trials in range(1, 200):  # rounding never puts a bound past the share
        for successes in (0, trials):
            low, high = wilson_interval(successes, trials)
            assert low <= successes / trials <= high
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)  # both tails of 5 one-way flips
    assert mcnemar_exact_p(9, 1) == mcnemar_exact_p(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact_p(3, 3) == 1.0


def _summary(kld: float, top1: float, ppl_ratio: float, speed: float, **extra: float):
    return {
        "kld_mean": kld, "top1_agreement": top1, "ppl_ratio": ppl_ratio, "tokens_per_s": speed,
        "accuracy": 0.4, "latency_p95_s": 1.0, **extra,
    }  # fmt: skip


def test_fastest_faithful_takes_the_fastest_build_that_passes() -> None:
    gate = compose_config([]).register
    summaries = {
        "transformers-fp32": _summary(0.0, 1.0, 1.0, 15.0),
        "onnx-fp32": _summary(1e-8, 1.0, 1.0, 45.0),
        "onnx-int8": _summary(0.004, 0.97, 1.005, 110.0),
        "onnx-int4": _summary(0.33, 0.72, 1.31, 190.0),
        "onnx-int8-lossy": _summary(
            0.004, 0.97, 1.005, 120.0, flips_lost=12, flips_gained=2, mcnemar_p=0.01
        ),
    }
    selection = fastest_faithful(summaries, "transformers-fp32", gate)
    assert selection.chosen == "onnx-int8"
    assert "mean KLD 0.3300 > max_kld_mean" in selection.verdicts["onnx-int4"]
    assert "accuracy significantly below the reference" in selection.verdicts["onnx-int8-lossy"]
    assert selection.verdicts["onnx-fp32"].startswith("passes, but slower")
    nothing_passes = {k: v for k, v in summaries.items() if k in ("transformers-fp32", "onnx-int4")}
    nothing_passes["transformers-fp32"] = dict(nothing_passes["transformers-fp32"], accuracy=0.0)
    fallback = fastest_faithful(nothing_passes, "transformers-fp32", gate)
    assert fallback.chosen == "transformers-fp32"
    assert "no candidate passes" in fallback.verdicts["transformers-fp32"]


def test_main_refuses_a_short_text_and_builds_outside_the_sweep_before_any_step(
    tmp_path: Path,
) -> None:
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"id": "a", "kind": "prose", "text": "Too short."}) + "\n")
    with pytest.raises(PipelineError, match="shorter than one window of 512"):
        preflight(compose_config([f"evaluate.fidelity.text={short}"]))
    with pytest.raises(PipelineError, match=r"put the build in compute\.onnx_candidates"):
        preflight(compose_config(["+wrap.onnx_builder_options.block_size=64"]))
    preflight(compose_config([]))  # the shipped files pass


def _scores(kld: float, top1: float, ppl_ratio: float) -> dict[str, float]:
    return {"kld_mean": kld, "top1_agreement": top1, "ppl_ratio": ppl_ratio}


# The sweep on the bundled model as fidelity sees it: fp32 ONNX computes the reference's
# distribution, int8 passes the fidelity gate, both int4 builds fail it.
SWEEP = {
    "transformers-fp32": _scores(0.0, 1.0, 1.0),
    "onnx-fp32": _scores(4.5e-8, 1.0, 1.0),
    "onnx-int8": _scores(0.0043, 0.963, 1.004),
    "onnx-int4": _scores(0.34, 0.677, 1.3),
    "onnx-int4-k_quant_last": _scores(0.26, 0.74, 1.2),
}


def test_only_candidates_that_can_still_win_are_asked_and_twins_share_answers() -> None:
    cfg = compose_config([])
    plan = plan_asking(SWEEP, "transformers-fp32", cfg.evaluate, cfg.register)
    assert plan.asked == ["transformers-fp32", "onnx-fp32", "onnx-int8"]
    assert plan.twins == ["transformers-fp32", "onnx-fp32"]
    assert set(plan.not_asked) == {"onnx-int4", "onnx-int4-k_quant_last"}
    assert plan.not_asked["onnx-int4"] == (
        "not asked: failed fidelity (mean KLD 0.3400 > max_kld_mean 0.05; top-1 agreement "
        "0.677 < min_top1_agreement 0.9; perplexity ratio 1.300 > max_ppl_ratio 1.05)"
    )
    study = compose_config(["evaluate.ask=all", "evaluate.share_answers_below_kld=null"])
    everyone = plan_asking(SWEEP, "transformers-fp32", study.evaluate, study.register)
    assert everyone.asked == list(SWEEP)
    assert everyone.twins == [] and everyone.not_asked == {}
    # Top-1 agreement short of 1.0 is a different distribution, however small the KLD.
    close = SWEEP | {"onnx-fp32": _scores(4.5e-8, 0.999, 1.0)}
    assert plan_asking(close, "transformers-fp32", cfg.evaluate, cfg.register).twins == []


def test_a_candidate_not_asked_fails_the_gate_and_says_why() -> None:
    gate = compose_config([]).register
    summaries = {
        "transformers-fp32": _summary(0.0, 1.0, 1.0, 15.0),
        "onnx-int8": _summary(0.004, 0.97, 1.005, 110.0),
        "onnx-int4": {"kld_mean": 0.34, "top1_agreement": 0.677, "ppl_ratio": 1.3},
    }
    selection = fastest_faithful(summaries, "transformers-fp32", gate)
    assert selection.chosen == "onnx-int8"
    assert selection.failures["onnx-int4"]
    assert selection.verdicts["onnx-int4"].startswith("not asked: failed fidelity (mean KLD 0.3400")
