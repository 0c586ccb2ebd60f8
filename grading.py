"""Answer grading: reading the answer out of a response and scoring it against a record's ground truth.

rl.py's rewards and eval.py's scores both come from here, so training and evaluation grade alike.

Scoring (`score_answer`):
    multiple_choice  `extract_choice`: the last complete <answer>...</answer> pair if there is one, else
                     the text after </think>, read as "B", "(B)", "B.", "B. red", "The answer is B",
                     "answer: b", or an option's full text. Naming several options, or none, is wrong.
    numerical        the one number in the answer (every number found must agree), correct when within
                     a relative 1e-2 or an absolute 1e-6 of the truth
    free_form        exact match after lower-casing, collapsing whitespace and dropping a final "."

The reward format (`is_well_formed`): the whole response is <think>...</think><answer>...</answer>.
"""
import math
import re

import data
from data import Record


# A complete <answer>...</answer> pair whose content holds no other answer tag.
_ANSWER_PAIR = re.compile(r"<answer>((?:(?!</?answer>).)*)</answer>", re.DOTALL)
_WELL_FORMED = re.compile(r"\s*<think>((?:(?!</?(?:think|answer)>).)*)</think>\s*"
                          r"<answer>((?:(?!</?(?:think|answer)>).)*)</answer>\s*", re.DOTALL)
_TAG = re.compile(r"</?(?:think|answer)>")

# Letter forms. A lowercase letter counts only where it cannot be an English word ("a", "I"): alone,
# in brackets, or ending a phrase ("answer: b").
_BARE = re.compile(r"\s*(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z]))[.:]?\s*")      # "B", "(b)", "B."
_LEADING = re.compile(r"\s*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.):\n])(.*)", re.DOTALL)  # "B. red", "(B) red"
_ONE = r"(?:\([A-Z]\)|\[[A-Z]\]|[A-Z](?![A-Za-z0-9]))"
_LIST = re.compile(rf"\s*{_ONE}(?:\s*(?:,|/|&|\band\b|\bor\b)\s*{_ONE})+\s*\.?\s*")     # "A, C", "A or C"
# The letters after an answer phrase: "B", "(b)", "b" at the end, and any "or C" / ", D" that follow.
_PHRASE_LETTERS = (r"(\([A-Za-z]\)|\[[A-Za-z]\]|[A-Z](?![A-Za-z0-9])|[a-z](?=\s*$|[.,;:!?)\]]))"
                   rf"((?:\s*(?:,|/|\band\b|\bor\b)\s*{_ONE})*)")
_PHRASES = [re.compile(f"(?i:{head})" + _PHRASE_LETTERS + (f"(?i:{tail})" if tail else "")) for head, tail in (
    (r"\banswer\b(?:\s+(?:is|would be|should be|will be))?\s*[:=\-]?\s*(?:option\s+|choice\s+)?", ""),
    (r"\b(?:correct|best|right)\s+(?:option|choice)(?:\s+(?:is|would be|should be))?\s*[:=\-]?\s*", ""),
    (r"\b(?:option|choice)\s+", r"\s+is\s+(?:the\s+)?(?:correct|right|best|answer)\b"),
)]


def extract_answer(response: str) -> str | None:
    """The stripped content of the last complete <answer>...</answer> pair, or None.

    >>> extract_answer("<think>hmm</think><answer> B </answer>")
    'B'
    >>> extract_answer("<answer>A</answer> wait, <answer>C")   # an unclosed tag does not count
    'A'
    """
    pairs = _ANSWER_PAIR.findall(response)
    return pairs[-1].strip() if pairs else None


def is_well_formed(response: str) -> bool:
    """The whole response is <think>...</think><answer>...</answer> (whitespace around is fine), no
    tag nested inside another, and the answer is not empty. This is the format the rewards ask for."""
    m = _WELL_FORMED.fullmatch(response)
    return bool(m) and bool(m.group(2).strip())


def _final_text(response: str) -> tuple[str, bool]:
    """What the response gives as its answer: (text, from_tag). The last complete answer tag's content;
    without one, the text after the last </think> (the reasoning may mention every option)."""
    tagged = extract_answer(response)
    if tagged is not None:
        return tagged, True
    return response.rsplit("</think>", 1)[-1], False


def _normalise_text(text: str) -> str:
    """Lower case, single spaces, no final full stop: "  The  Red ball. " -> "the red ball"."""
    return " ".join(text.lower().split()).removesuffix(".").strip()


def _phrase_letters(text: str) -> set[str]:
    """Letters named after answer phrases: "The answer is B" -> {"B"}; "answer: a or C" -> {"A", "C"}."""
    letters = set()
    for pattern in _PHRASES:
        for m in pattern.finditer(text):
            letters |= set(re.findall(r"(?<![A-Za-z])[A-Za-z](?![A-Za-z])", f"{m.group(1)} {m.group(2)}"))
    return {c.upper() for c in letters}


def _read_choice(text: str, options: list[str]) -> tuple[set[str], str]:
    """The option letters (upper case) a short answer text names, and which form named them."""
    text = _TAG.sub(" ", text)
    if m := _BARE.fullmatch(text):
        return {next(g for g in m.groups() if g).upper()}, "bare_letter"
    if _LIST.fullmatch(text):
        return set(re.findall(r"(?<![A-Za-z])[A-Z](?![A-Za-z])", text)), "multiple"
    wanted = _normalise_text(text)
    by_text = {data.option_letter(i) for i, o in enumerate(options) if wanted and _normalise_text(o) == wanted}
    if by_text:
        return by_text, "option_text"
    if m := _LEADING.match(text):  # "B. red": the text after the letter must not name another option
        letter, rest = next(g for g in m.groups()[:3] if g), _normalise_text(m.group(4))
        named = {data.option_letter(i) for i, o in enumerate(options) if rest and _normalise_text(o) == rest}
        return {letter} | named | _phrase_letters(text), "bare_letter"
    return _phrase_letters(text), "phrase"


def extract_choice(response: str, num_options: int, options: list[str] | None = None
                   ) -> tuple[str | None, str]:
    """The option letter a response chose, and how it was found: (letter or None, how).

    how is "tag" (read inside the last complete <answer> pair), "bare_letter" ("B", "(B)", "B.",
    "B. red"), "phrase" ("The answer is B", "answer: b", "Option C is correct"), "option_text" (the
    full text of one option, needs `options`), "multiple" (several different letters: wrong) or
    "none" (no letter, or one past the last option: wrong).

    >>> extract_choice("<think>...</think><answer>C</answer>", 4)
    ('C', 'tag')
    >>> extract_choice("The answer is (b).", 4)
    ('B', 'phrase')
    >>> extract_choice("A or C", 4)
    (None, 'multiple')
    """
    text, from_tag = _final_text(response)
    letters, how = _read_choice(text, list(options or [])[:num_options])
    if len(letters) > 1:
        return None, "multiple"
    if not letters or ord(min(letters)) - ord("A") >= num_options:
        return None, "none"
    return letters.pop(), "tag" if from_tag else how


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text: str) -> float | None:
    """The number a text states: every number in it must have the same value ("3", "about 3.0
    scenes", "1,000"); none, or two different ones ("3 or 4"), gives None."""
    values = {float(m.replace(",", "")) for m in _NUMBER.findall(text)}
    values = {v for v in values if math.isfinite(v)}
    return values.pop() if len(values) == 1 else None


def numbers_match(prediction: float, truth: float) -> bool:
    """Within a relative 1e-2 of the truth, or an absolute 1e-6 (so a truth of 0 needs ~0)."""
    return abs(prediction - truth) <= max(1e-2 * abs(truth), 1e-6)


def grade(record: Record, response: str) -> tuple[bool, str | None, str]:
    """(correct, prediction, how) for one response; `how` says where the prediction was read (see
    extract_choice; "untagged" or "tag" for the other types, "none" when nothing could be read)."""
    if record.problem_type == "multiple_choice":
        letter, how = extract_choice(response, len(record.options), record.options)
        return letter == record.answer, letter, how
    text, from_tag = _final_text(response)
    if record.problem_type == "numerical":
        value = parse_number(text)
        prediction = None if value is None else f"{value:g}"
        correct = value is not None and numbers_match(value, float(record.answer))
    else:
        prediction = _normalise_text(text) or None
        correct = prediction == _normalise_text(record.answer)
    how = "none" if prediction is None else "tag" if from_tag else "untagged"
    return correct, prediction, how


def score_answer(record: Record, response: str) -> tuple[bool, str | None]:
    """Is the response's answer right? (correct, prediction): prediction is the option letter, the
    number (as text) or the normalised free-form answer, None when none could be read.

    >>> score_answer(record, "<think>Scene 1 is red.</think><answer>A</answer>")   # record.answer == "A"
    (True, 'A')
    """
    correct, prediction, _ = grade(record, response)
    return correct, prediction
