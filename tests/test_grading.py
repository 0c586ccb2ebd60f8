"""grading.py: reading the answer out of a response (tags, bare letters, phrases, option texts) and scoring
it against the record's truth, on hand-written responses whose right reading is known."""
import pytest

from data import Record
from grading import extract_answer, extract_choice, is_well_formed, parse_number, score_answer

OPTIONS = ["red", "blue", "green", "cyan"]


@pytest.mark.parametrize("response, expected", [
    # tags: the last complete pair decides; inside it any accepted form
    ("<think>Scene 1 is red.</think><answer>A</answer>", ("A", "tag")),
    ("<think>x</think>\n<answer> (c) </answer>\n", ("C", "tag")),
    ("<answer>B. blue</answer>", ("B", "tag")),
    ("<answer>The answer is D.</answer>", ("D", "tag")),
    ("<answer>green</answer>", ("C", "tag")),
    ("<answer>A</answer> wait, maybe <answer>C", ("A", "tag")),          # the unclosed tag does not count
    ("<answer>A</answer> no: <answer>C</answer>", ("C", "tag")),         # the last pair wins
    ("<answer><answer>B</answer></answer>", ("B", "tag")),               # nested
    ("<answer>A or B</answer>", (None, "multiple")),
    ("<answer></answer>", (None, "none")),
    ("<answer>E</answer>", (None, "none")),                              # past the last option
    ("<think>The answer is B</think><answer>C</answer>", ("C", "tag")),  # reasoning is not the answer
    # untagged: VideoMME-style forms
    ("B", ("B", "bare_letter")),
    ("(B)", ("B", "bare_letter")),
    ("B.", ("B", "bare_letter")),
    ("b", ("B", "bare_letter")),
    ("B. blue", ("B", "bare_letter")),
    ("B) because the second scene is blue", ("B", "bare_letter")),
    ("C\nThe third scene is green.", ("C", "bare_letter")),
    ("<think>hmm</think>D", ("D", "bare_letter")),
    ("<answer>B", ("B", "bare_letter")),                                 # unclosed: read as plain text
    ("The answer is B", ("B", "phrase")),
    ("The correct answer is (d).", ("D", "phrase")),
    ("answer: b", ("B", "phrase")),
    ("Answer - C", ("C", "phrase")),
    ("The best option is C because it is green.", ("C", "phrase")),
    ("Option A is correct.", ("A", "phrase")),
    ("A man walks in. So the answer is D.", ("D", "phrase")),             # the article "A" is no option
    ("blue", ("B", "option_text")),
    ("  Cyan. ", ("D", "option_text")),
    # several options: wrong
    ("A or C", (None, "multiple")),
    ("A, C", (None, "multiple")),
    ("The answer is A or C.", (None, "multiple")),
    ("The answer is A. No, the answer is C.", (None, "multiple")),
    ("B. red", (None, "multiple")),                                     # letter and text disagree
    # no option: wrong
    ("", (None, "none")),
    ("I don't know.", (None, "none")),
    ("The answer is a cat.", (None, "none")),                            # lowercase "a" in prose is a word
    ("The options are A, B, C and D.", (None, "none")),
    ("The answer is E", (None, "none")),
    ("<think>B looks right</think>", (None, "none")),                    # thought about, never answered
])
def test_extract_choice(response, expected):
    assert extract_choice(response, 4, OPTIONS) == expected


def test_extract_choice_without_option_texts_and_on_garbage():
    assert extract_choice("blue", 4) == (None, "none")
    assert extract_choice("C", 2) == (None, "none")
    garbage = "<answer>x" * 20_000 + "A " * 20_000 + "answer " * 20_000 + "</think>" * 1000
    assert extract_choice(garbage, 4, OPTIONS) == (None, "none")


def test_extract_answer_and_format():
    assert extract_answer("<think>a</think><answer> 3.5 </answer>") == "3.5"
    assert extract_answer("<answer>A</answer><answer>B") == "A"
    assert extract_answer("no tags") is None
    assert is_well_formed("<think>Red is first.</think>\n<answer>A</answer>\n")
    assert not is_well_formed("<think>x</think><answer> </answer>")           # empty answer
    assert not is_well_formed("<answer>A</answer>")                           # no reasoning
    assert not is_well_formed("<think>x</think><answer>A</answer> and more")  # text after the answer
    assert not is_well_formed("<think><think>x</think><answer>A</answer>")    # nested tags


def record(problem_type="multiple_choice", answer="B", options=OPTIONS, **kw) -> Record:
    return Record(problem_id="q", video="v.mp4", problem="?", options=list(options) if options else [],
                  problem_type=problem_type, reasoning="", answer=answer, **kw)


def test_score_answer_numerical_and_free_form():
    num = record("numerical", "3", options=None)
    assert score_answer(num, "<think>x</think><answer>3.0</answer>") == (True, "3")
    assert score_answer(num, "<answer>about 3.02 scenes</answer>") == (True, "3.02")  # within 1e-2 relative
    assert score_answer(num, "<answer>3.05</answer>") == (False, "3.05")
    assert score_answer(num, "<answer>3 or 4</answer>") == (False, None)             # two numbers: ambiguous
    assert score_answer(num, "There are 3.") == (True, "3")                         # untagged
    assert score_answer(record("numerical", "0", options=None), "<answer>0.0000001</answer>")[0]
    assert parse_number("1,000 frames") == 1000.0 and parse_number("-2.5e1") == -25.0
    free = record("free_form", "a red ball", options=None)
    assert score_answer(free, "<answer>  A RED   ball. </answer>") == (True, "a red ball")
    assert score_answer(free, "<answer>a blue ball</answer>") == (False, "a blue ball")
    assert score_answer(record(), "<answer>B</answer>") == (True, "B")
