"""The generated evaluation set chat-basics-v2: committed as its generator writes it, big enough,
and every generated item's patterns take its right answer (alone or in a sentence) but neither
its question echoed back nor a plausible wrong answer."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

from steps.evaluation.evalset import is_correct, load_eval_set
from tools import taskgen

V1 = PROJECT_ROOT / "conf" / "evaluate" / "chat-basics-v1.jsonl"
V2 = PROJECT_ROOT / "conf" / "evaluate" / "chat-basics-v2.jsonl"
GENERATED = taskgen.generated_items()
GENERATED_CATEGORIES = ("arithmetic", "counting", "comparison", "string", "unit")


def test_committed_set_is_the_generators_output(tmp_path: Path) -> None:
    target = tmp_path / "chat-basics-v2.jsonl"
    taskgen.main([str(target)])
    assert target.read_bytes() == V2.read_bytes(), (
        "rerun: python -m tools.taskgen conf/evaluate/chat-basics-v2.jsonl"
    )
    assert [path.name for path in tmp_path.iterdir()] == [target.name], "no temp file is left"


def test_curated_items_come_first_unchanged() -> None:
    curated = V1.read_bytes().splitlines(keepends=True)
    assert V2.read_bytes().splitlines(keepends=True)[: len(curated)] == curated


def test_set_is_large_with_unique_ids_and_questions() -> None:
    items = load_eval_set(V2).items
    assert len(items) >= 170
    assert len({item.id for item in items}) == len(items)
    assert len({item.question for item in items}) == len(items)
    generated_counts = Counter(item.category for item in items if re.search(r"-\d{3}$", item.id))
    assert all(generated_counts[category] >= 25 for category in GENERATED_CATEGORIES)


def test_every_reference_matches_its_own_patterns() -> None:
    for item in load_eval_set(V2).items:
        assert is_correct(item.reference, item.accept), item.id


def test_generated_items_are_what_the_file_holds() -> None:
    loaded = {item.id: item for item in load_eval_set(V2).items}
    for item in GENERATED:
        assert loaded[item.id].accept == item.accept
        assert loaded[item.id].reference == item.reference


@pytest.mark.parametrize("item", GENERATED, ids=lambda item: item.id)
def test_right_answer_in_a_sentence_matches(item: taskgen.GeneratedItem) -> None:
    assert is_correct(f"The answer is {item.reference}.", item.accept)
    assert is_correct(f"Sure!\n\n{item.reference}", item.accept)


@pytest.mark.parametrize("item", GENERATED, ids=lambda item: item.id)
def test_echoed_question_does_not_match(item: taskgen.GeneratedItem) -> None:
    assert not is_correct(item.question, item.accept)
    assert not is_correct(f"{item.question}\n", item.accept)


@pytest.mark.parametrize("item", GENERATED, ids=lambda item: item.id)
def test_wrong_answer_does_not_match(item: taskgen.GeneratedItem) -> None:
    assert item.wrong_answer != item.reference
    assert not is_correct(item.wrong_answer, item.accept)
    assert not is_correct(f"The answer is {item.wrong_answer}.", item.accept)


@pytest.mark.parametrize(
    "item", [item for item in GENERATED if item.category == "comparison"], ids=lambda item: item.id
)
def test_comparison_reply_naming_the_wrong_candidate_does_not_match(
    item: taskgen.GeneratedItem,
) -> None:
    # wrong_answer is the other candidate, as written in the question.
    assert item.wrong_answer in item.question
    assert not is_correct(f"{item.wrong_answer} is more than {item.reference}", item.accept)
    assert not is_correct(f"{item.reference} or {item.wrong_answer}", item.accept)


def test_numbers_match_whole_in_digits_or_words() -> None:
    forty_two = (taskgen.number_pattern(42),)
    assert all(
        is_correct(reply, forty_two) for reply in ("42", "It is 42.", "forty-two", "Forty two")
    )
    assert not any(
        is_correct(reply, forty_two) for reply in ("420", "142", "4.2", "-42", "42.5", "forty")
    )
    forty = (taskgen.number_pattern(40),)
    assert not any(is_correct(reply, forty) for reply in ("forty-five", "forty two", "4,000"))
    assert is_correct("It weighs 4,700 grams.", (taskgen.number_pattern(4700),))


def test_quantity_answers_need_the_right_unit() -> None:
    two_kilograms = (taskgen.quantity_pattern(2, taskgen.KILOGRAM, taskgen.GRAM),)
    assert all(is_correct(reply, two_kilograms) for reply in ("2", "2 kg", "two kilograms"))
    assert not any(is_correct(reply, two_kilograms) for reply in ("2 grams", "2 g", "two"))


def test_letter_answers_take_the_letter_not_a_word_starting_with_it() -> None:
    g = (taskgen.letter_pattern("g"),)
    assert all(is_correct(reply, g) for reply in ("g", "G.", 'The first letter is "g".'))
    assert not any(
        is_correct(reply, g) for reply in ("garden", "The letter is going", "n", "Sure!\ngarden")
    )
