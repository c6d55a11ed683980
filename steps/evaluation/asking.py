"""Asking the evaluation set as a plan says (steps.evaluation.selection.plan_asking): every
candidate the timed items, the rest only where they can still tell something, and who answered
what, for the tables."""

from __future__ import annotations

import logging
from math import isnan
from pathlib import Path

from steps.config.schema import EvaluateConfig
from steps.evaluation.evalset import EvalSet
from steps.evaluation.measure import (
    CandidateResult,
    evaluate_candidate,
    same_answers,
    take_shared_answers,
)
from steps.evaluation.selection import AskPlan

log = logging.getLogger(__name__)


def ask_candidates(
    evaluation: EvaluateConfig, eval_set: EvalSet, folders: dict[str, Path], plan: AskPlan
) -> dict[str, CandidateResult]:
    """Ask each candidate of the plan the timed items, then the rest; of the reference's twins
    only the one with the highest decode rate on the timed items asks the rest, and the others
    take its answers where their timed answers were the same (else they ask them too)."""
    timed = eval_set.items[: evaluation.timed_items]
    untimed = eval_set.items[evaluation.timed_items :]

    def ask(label: str, timed, untimed, earlier=None) -> CandidateResult:
        return evaluate_candidate(
            label, folders[label], timed, untimed, evaluation.max_new_tokens, evaluation.batch_size,
            earlier,
        )  # fmt: skip

    results = {
        label: ask(label, timed, () if label in plan.twins else untimed)
        for label in sorted(plan.asked, key=lambda label: label not in plan.twins)
    }
    if plan.twins and untimed:
        # A twin with no decode rate (every timed item failed) never answers for the others.
        rates = {label: results[label].tokens_per_s for label in plan.twins}
        answering = max(plan.twins, key=lambda label: 0.0 if isnan(rates[label]) else rates[label])
        ask(answering, (), untimed, results[answering])
        for label in plan.twins:
            if label == answering:
                continue
            if same_answers(results[label].items, results[answering].items[: len(timed)]):
                take_shared_answers(results[label], results[answering])
            else:
                log.warning(
                    "%s computes %s's distribution but answered a timed item differently: "
                    "asking it every item", label, answering,
                )  # fmt: skip
                ask(label, (), untimed, results[label])
    return {label: results[label] for label in plan.asked}


def answered_by(
    label: str, plan: AskPlan, results: dict[str, CandidateResult],
    scores: dict[str, dict[str, float]], reference: str,
) -> str:  # fmt: skip
    """Who answered a candidate's items, for its row: all itself, partly a twin (and why they
    may share), or nobody."""
    if label in plan.not_asked:
        return "not asked"
    result = results[label]
    if source := result.shared_from:
        twin = scores[source if label == reference else label]
        return (
            f"{result.asked} asked, {len(result.items) - result.asked} shared from {source} "
            f"(same distribution: mean KLD {twin['kld_mean']:.2g}, top-1 "
            f"{twin['top1_agreement']:.3f})"
        )
    takers = [other for other, r in results.items() if r.shared_from == label]
    return f"{result.asked} asked" + (f", shared with {', '.join(takers)}" if takers else "")
