"""Builds the evaluation set chat-basics-v2: the 30 curated items of chat-basics-v1, unchanged,
followed by generated items whose answers can be checked exactly (arithmetic, counting,
comparison, string and unit-conversion questions, ITEMS_PER_CATEGORY of each), drawn from a
random.Random with the fixed SEED so that every run writes the same bytes. Each item's accepted
patterns take a sentence-style right answer but not the question echoed back nor a wrong
candidate. Rerun after changing this module and commit the result (tests/test_taskgen.py checks
that the committed file is this module's output):

    python -m tools.taskgen conf/evaluate/chat-basics-v2.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from steps.evaluation.evalset import is_correct

SEED = 20250611
ITEMS_PER_CATEGORY = 28
CURATED_SET = Path(__file__).resolve().parents[1] / "conf" / "evaluate" / "chat-basics-v1.jsonl"

# fmt: off
ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"
]
TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
MINUS_SIGN = "\N{MINUS SIGN}"
MULTIPLICATION_SIGN = "\N{MULTIPLICATION SIGN}"

LIST_KINDS = {
    "fruits": [
        "apple", "pear", "plum", "banana", "cherry", "grape", "lemon", "mango", "peach", "kiwi",
        "melon", "apricot"
    ],
    "animals": [
        "dog", "horse", "cow", "sheep", "goat", "rabbit", "mouse", "lion", "tiger", "bear", "fox",
        "wolf"
    ],
    "colours": [
        "red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "grey"
    ],
    "vegetables": [
        "carrot", "potato", "onion", "pea", "bean", "leek", "cabbage", "pepper", "turnip", "celery"
    ],
}
# Short everyday words that are not palindromes; "hello" and "cat" are left out because curated
# items already ask about them.
WORDS = [
    "garden", "window", "pencil", "rocket", "planet", "forest", "button", "monkey", "turtle",
    "basket", "candle", "mirror", "jacket", "bottle", "dragon", "tomato", "silver", "winter",
    "summer", "castle", "pocket", "kitten", "ladder", "muffin", "parrot", "wallet", "helmet",
    "frog", "lamp", "desk", "milk", "bird", "ship", "moon", "star", "book", "door", "tree", "fish",
    "cake", "hand", "road", "cloud", "bread", "chair", "table", "river", "stone", "house", "mouse",
    "horse", "lemon", "sugar", "train", "truck"
]
# fmt: on
SHORT_WORDS = [word for word in WORDS if len(word) <= 5]


@dataclass(frozen=True)
class GeneratedItem:
    id: str
    category: str
    question: str
    reference: str
    accept: tuple[str, ...]
    # A plausible wrong reply that the accepted patterns must reject; tests only, not written.
    wrong_answer: str

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "category": self.category,
            "question": self.question,
            "reference": self.reference,
            "accept": list(self.accept),
        }


@dataclass(frozen=True)
class Task:
    question: str
    reference: str
    accept: tuple[str, ...]
    wrong_answer: str


def number_words(n: int) -> str:
    """English words for 1 <= n < 100, hyphen or space between tens and units."""
    if n < 20:
        return ONES[n]
    tens, units = divmod(n, 10)
    return TENS[tens] if units == 0 else f"{TENS[tens]}[- ]{ONES[units]}"


def digits_pattern(n: int) -> str:
    """n in digits, optionally with a thousands comma, never part of a longer number: 42 does not
    match 420, 4.2 or -42."""
    digits = f"{n // 1000},?{n % 1000:03d}" if n >= 1000 else str(n)
    return rf"(?<![\d.,\-{MINUS_SIGN}]){digits}(?![.,]?\d)"


def words_pattern(n: int) -> str:
    """n < 100 in words, not part of a longer one: forty does not match forty-five."""
    unit_words = "|".join(ONES[1:10])
    return rf"(?<!-)(?<!ty )\b{number_words(n)}\b(?![- ](?:{unit_words}|hundred|thousand)\b)"


def number_pattern(n: int) -> str:
    # Replies spell out small numbers ("There are three fruits."), rarely large ones.
    if n >= 100:
        return f"(?:{digits_pattern(n)})"
    return f"(?:{digits_pattern(n)}|{words_pattern(n)})"


def letter_pattern(letter: str) -> str:
    # The letter starting a line, or after "is"/"letter" as in 'The first letter is "g".'
    return rf"(?:^|\n|\bis|\bletter)\W*\b{letter}\b"


def numeric_task(question: str, answer: int, wrong: int) -> Task:
    return Task(question, str(answer), (number_pattern(answer),), str(wrong))


def choice_task(
    question: str, answer: str, distractor: str, answer_pattern: str, distractor_pattern: str
) -> Task:
    """Mentioning the distractor at all rejects the reply: "17 is larger than 42" must fail."""
    accept = rf"^(?![\s\S]*{distractor_pattern})[\s\S]*{answer_pattern}"
    return Task(question, answer, (accept,), distractor)


def arithmetic_task(rng: random.Random, index: int) -> Task:
    operation = index % 3
    if operation == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        symbol, answer = "+", a + b
    elif operation == 1:
        a = rng.randint(10, 99)
        b = rng.randint(2, a - 2)  # a difference of 1 would accept the pronoun "one"
        symbol, answer = "-", a - b
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        symbol, answer = MULTIPLICATION_SIGN, a * b
    question = f"What is {a} {symbol} {b}? Answer with just the number."
    return numeric_task(question, answer, answer + 1)


def counting_task(rng: random.Random, index: int) -> Task:
    if index % 2 == 0:
        kind = rng.choice(list(LIST_KINDS))
        members = rng.sample(LIST_KINDS[kind], rng.randint(2, 9))
        question = (
            f"How many {kind} are in this list: {', '.join(members)}? Answer with just the number."
        )
        count = len(members)
    else:
        word = rng.choice(WORDS)
        question = f'How many letters are in the word "{word}"? Answer with just the number.'
        count = len(word)
    return numeric_task(question, count, count + 1)


@dataclass(frozen=True)
class Unit:
    name: str
    # How a reply may write it, as regex alternatives.
    aliases: str


@dataclass(frozen=True)
class QuantityKind:
    verb: str
    adjective: str
    large_unit: Unit
    small_unit: Unit
    small_per_large: int
    large_amounts: range
    small_amounts: range


KILOGRAM = Unit("kilogram", r"kilo(?:gram)?s?|kgs?")
GRAM = Unit("gram", r"grams?|g")
METRE = Unit("metre", r"met(?:er|re)s?|m")
CENTIMETRE = Unit("centimetre", r"centimet(?:er|re)s?|cm")
HOUR = Unit("hour", r"hours?|hrs?|h")
MINUTE = Unit("minute", r"minutes?|mins?")
# Either side can win: the amount with the larger number is often the smaller quantity.
QUANTITY_KINDS = (
    QuantityKind("is", "heavier", KILOGRAM, GRAM, 1000, range(1, 6), range(100, 6001, 100)),
    QuantityKind("is", "longer", METRE, CENTIMETRE, 100, range(1, 6), range(50, 601, 10)),
    QuantityKind("takes", "longer", HOUR, MINUTE, 60, range(1, 5), range(30, 301, 15)),
)


def amount_text(amount: int, unit_name: str) -> str:
    return f"{amount} {unit_name}" if amount == 1 else f"{amount} {unit_name}s"


def quantity_pattern(amount: int, unit: Unit, other_unit: Unit) -> str:
    """The amount in digits unless the other unit follows ("2 grams" is not 2 kilograms), or in
    words followed by its unit: a bare "one" is as often a pronoun ("the heavier one")."""
    as_digits = rf"{digits_pattern(amount)}(?!\s*(?:{other_unit.aliases})\b)"
    if amount >= 100:
        return f"(?:{as_digits})"
    return rf"(?:{as_digits}|{words_pattern(amount)}\s*(?:{unit.aliases})\b)"


def comparison_task(rng: random.Random, index: int) -> Task:
    kind = index % 5
    if kind < 2:
        # Not 1: "one" is also a pronoun ("42 is the larger one").
        first, second = rng.sample(range(2, 100), 2)
        wanted = "larger" if kind == 0 else "smaller"
        answer = max(first, second) if kind == 0 else min(first, second)
        distractor = first + second - answer
        question = f"Which number is {wanted}, {first} or {second}? Answer with just the number."
        return choice_task(
            question,
            str(answer),
            str(distractor),
            number_pattern(answer),
            number_pattern(distractor),
        )
    quantities = QUANTITY_KINDS[kind - 2]
    large_unit, small_unit = quantities.large_unit, quantities.small_unit
    large, small = rng.choice(quantities.large_amounts), rng.choice(quantities.small_amounts)
    while small in (large, large * quantities.small_per_large):
        small = rng.choice(quantities.small_amounts)
    large_text = amount_text(large, large_unit.name)
    small_text = amount_text(small, small_unit.name)
    options = [large_text, small_text]
    rng.shuffle(options)
    question = (
        f"Which {quantities.verb} {quantities.adjective}, {options[0]} or {options[1]}? "
        f"Answer with just the {quantities.adjective} amount."
    )
    large_pattern = quantity_pattern(large, large_unit, small_unit)
    small_pattern = quantity_pattern(small, small_unit, large_unit)
    if large * quantities.small_per_large > small:
        return choice_task(question, large_text, small_text, large_pattern, small_pattern)
    return choice_task(question, small_text, large_text, small_pattern, large_pattern)


def string_task(rng: random.Random, index: int) -> Task:
    kind = index % 4
    if kind < 2:
        position = "first" if kind == 0 else "last"
        # "a" and "i" are also words ("The first letter is a consonant"), so no pattern could
        # tell the letter from the article; a word whose ends differ gives a wrong answer.
        word = rng.choice(
            [w for w in WORDS if w[0] != w[-1] and w[0] not in "ai" and w[-1] not in "ai"]
        )
        letter, other = (word[0], word[-1]) if kind == 0 else (word[-1], word[0])
        question = (
            f'What is the {position} letter of the word "{word}"? Answer with just the letter.'
        )
        return Task(question, letter, (letter_pattern(letter),), other)
    word = rng.choice(SHORT_WORDS if kind == 3 else WORDS)
    if kind == 2:
        question = f'Write the word "{word}" in capital letters. Answer with just that word.'
        return Task(question, word.upper(), (rf"\b(?-i:{word.upper()})\b",), word)
    question = f'Write the word "{word}" backwards. Answer with just the reversed word.'
    return Task(question, word[::-1], (rf"\b{word[::-1]}\b",), word)


@dataclass(frozen=True)
class UnitConversion:
    asked_unit: str
    given_unit: str
    factor: int
    # A reply that confuses the factor (100 minutes in an hour, a 5-day week) must be wrong.
    confused_factor: int
    amounts: range


UNIT_CONVERSIONS = (
    UnitConversion("minutes", "hour", 60, 100, range(2, 13)),
    UnitConversion("centimetres", "metre", 100, 10, range(2, 21)),
    UnitConversion("grams", "kilogram", 1000, 100, range(2, 13)),
    UnitConversion("seconds", "minute", 60, 100, range(2, 16)),
    UnitConversion("days", "week", 7, 5, range(2, 13)),
)


def unit_task(rng: random.Random, index: int) -> Task:
    conversion = UNIT_CONVERSIONS[index % len(UNIT_CONVERSIONS)]
    amount = rng.choice(conversion.amounts)
    given = amount_text(amount, conversion.given_unit)
    question = f"How many {conversion.asked_unit} are in {given}? Answer with just the number."
    return numeric_task(question, amount * conversion.factor, amount * conversion.confused_factor)


GENERATORS: tuple[tuple[str, str, Callable[[random.Random, int], Task]], ...] = (
    ("arith", "arithmetic", arithmetic_task),
    ("count", "counting", counting_task),
    ("compare", "comparison", comparison_task),
    ("string", "string", string_task),
    ("unit", "unit", unit_task),
)


def echo_matches(task: Task) -> bool:
    return is_correct(task.question, tuple(task.accept))


def generated_items() -> list[GeneratedItem]:
    """The generated items, in file order; redrawn tasks keep every question unique and
    unanswerable by echoing it (e.g. 50 - 25, whose answer is in the question)."""
    rng = random.Random(SEED)
    items: list[GeneratedItem] = []
    questions: set[str] = set()
    for prefix, category, make_task in GENERATORS:
        for index in range(ITEMS_PER_CATEGORY):
            task = make_task(rng, index)
            while task.question in questions or echo_matches(task):
                task = make_task(rng, index)
            questions.add(task.question)
            items.append(
                GeneratedItem(
                    id=f"{prefix}-{index + 1:03d}",
                    category=category,
                    question=task.question,
                    reference=task.reference,
                    accept=task.accept,
                    wrong_answer=task.wrong_answer,
                )
            )
    return items


def render_eval_set(curated_set: Path = CURATED_SET) -> str:
    lines = curated_set.read_text(encoding="utf-8").splitlines()
    curated = [json.loads(line) for line in lines if line.strip()]
    bodies = curated + [item.as_json() for item in generated_items()]
    return "".join(json.dumps(body, ensure_ascii=False) + "\n" for body in bodies)


def write_eval_set(target: Path, curated_set: Path = CURATED_SET) -> None:
    """Write atomically, so an interrupted run never leaves a half-written set behind."""
    text = render_eval_set(curated_set)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
        os.chmod(temp, 0o644)  # mkstemp's 0600 would otherwise become the set's mode
        os.replace(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.taskgen", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("target", type=Path, help="the JSONL file to write")
    args = parser.parse_args(argv)
    write_eval_set(args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
