"""The benchmark scorers of `mambavl.eval.metrics` against cases worked out by hand from each benchmark's own
rules (the arithmetic is in the comments), including the quirks where the official scripts and the seeds'
harness disagree."""

import pytest

from mambavl.eval.metrics import (
    MME_COGNITION,
    MME_PERCEPTION,
    VQA_STANDARDS,
    box_iou,
    choice_accuracy,
    choice_letter,
    count_answer,
    gqa_accuracy,
    mmbench_circular,
    mme_answer,
    mme_subtask_score,
    mme_totals,
    parse_box,
    pope_answer,
    pope_metrics,
    probability_choice,
    refcoco_accuracy,
    tally_accuracy,
    true_false_answer,
    vizwiz_accuracy,
    vqa_accuracy,
    vqa_normalize,
    vsr_accuracy,
)

# ---------------------------------------------------------------------------------------------------------
# VQA normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two dogs", "2 dogs"),  # number words zero..ten become digits, after lower-casing
        ("none", "0"),  # ...and "none" is 0
        ("The cat.", "cat"),  # articles dropped; a period with no digit after it deleted
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions without apostrophe get one
        ("don't", "don't"),  # "'" is not a punctuation mark: kept as written
        ("1,000", "1000"),  # digit-comma-digit anywhere: every mark is deleted, not spaced
        ("1,000 apples!", "1000 apples"),
        ("red,white", "red white"),  # no space beside ',' and no digit-comma-digit: ',' becomes a space
        ("red, white", "red white"),  # ', ' occurs: ',' is deleted
        ("1, 2", "1 2"),  # '1, 2' is not digit-comma-digit: ', ' occurs, so ',' is deleted
        ("hello!world", "hello world"),
        ("blue-green", "blue green"),
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("a.b", "ab"),  # a period followed by anything else goes, even inside a word
        ("10:30", "10:30"),  # ':' is not a punctuation mark
        ("yes\n", "yes"),  # newlines and tabs to spaces, then strip
        ("  Yes\tplease  ", "yes please"),
        (
            "." * 40,
            "." * 8,
        ),  # the scripts delete at most 32 periods (re.UNICODE passed as `count`): 40 - 32 = 8
    ],
)
def test_vqa_normalize_official(text, expected):
    assert vqa_normalize(text) == expected


def test_vqa_normalize_per_standard():
    # m4c splits "'s" off and drops every ',' and '?' before the common steps
    assert vqa_normalize("The man's hat?", "textvqa") == "man 's hat"
    assert vqa_normalize("The man's hat?", "prismatic") == "man's hat"
    # the VizWiz script spells contractions with backticks
    assert vqa_normalize("dont", "vizwiz") == "don`t"
    assert vqa_normalize("cant", "vizwiz") == "can't"  # one of its few straight-apostrophe entries
    with pytest.raises(ValueError, match="unknown VQA standard 'lavis'"):
        vqa_normalize("yes", "lavis")
    assert set(VQA_STANDARDS) == {"official", "official-2016", "prismatic", "textvqa", "vizwiz"}


# ---------------------------------------------------------------------------------------------------------
# VQA accuracy: mean over the 10 leave-one-annotator-out subsets of min(1, matches / 3)


@pytest.mark.parametrize("standard", sorted(VQA_STANDARDS))
@pytest.mark.parametrize(
    ("n_match", "expected"),
    [
        # 0 matches: every subset has 0 -> 0
        (0, 0.0),
        # 1 match: leaving it out (1 subset) -> 0; the other 9 subsets hold 1 -> 1/3. (9 * 1/3) / 10 = 0.3
        (1, 0.3),
        # 2 matches: leaving one out (2 subsets) -> 1 match -> 1/3; the other 8 hold 2 -> 2/3.
        # (8 * 2/3 + 2 * 1/3) / 10 = (16/3 + 2/3) / 10 = 6/10 = 0.6
        (2, 0.6),
        # 3 matches: leaving one out (3 subsets) -> 2 -> 2/3; the other 7 hold 3 -> 1.
        # (3 * 2/3 + 7) / 10 = 0.9
        (3, 0.9),
        # 4 matches: leaving one out still leaves 3 -> 1 everywhere
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(standard, n_match, expected):
    # already-normal answers that disagree (so every standard normalises, and normalising changes nothing)
    answers = ["2"] * n_match + ["3"] * (10 - n_match)
    assert vqa_accuracy("2", answers, standard) == pytest.approx(expected)


def test_vqa_accuracy_normalises_the_prediction():
    # "Two." -> "2"; 2 of the 10 answers are "2" -> 0.6 as above
    assert vqa_accuracy("Two.", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)
    # "The Dog" -> "dog"; 3 of 10 -> 0.9
    assert vqa_accuracy("The Dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_any_number_of_answers():
    # 3 answers ["yes", "yes", "no"], prediction "yes" (2 matches): leaving out a "yes" (2 subsets) -> 1
    # -> 1/3; leaving out "no" -> 2 -> 2/3. (2 * 1/3 + 2/3) / 3 = (4/3) / 3 = 4/9
    assert vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9)
    # one answer: leaving the only annotator out leaves no match -> 0
    assert vqa_accuracy("yes", ["yes"]) == 0.0


def test_vqa_unanimous_answers_official_vs_prismatic():
    """Ten identical answers: the official script (2021) normalises neither side, so the match is exact and
    case-sensitive; the 2016 script and the seeds' harness normalise the prediction ("Yes." -> "yes")."""
    answers = ["yes"] * 10
    assert vqa_accuracy("Yes.", answers, "official") == 0.0  # "Yes." != "yes"
    assert vqa_accuracy("yes", answers, "official") == 1.0  # 10 matches: every subset holds 9 -> 1
    assert vqa_accuracy(" yes\n", answers, "official") == 1.0  # only newline/tab and strip() apply
    for standard in ("official-2016", "prismatic", "textvqa", "vizwiz"):
        assert vqa_accuracy("Yes.", answers, standard) == 1.0


def test_vqa_gold_number_words_official_vs_prismatic():
    """Disagreeing answers: the official script normalises the gold answers fully ("two" -> "2"); the seeds'
    harness (and the 2016 script) give them the punctuation step only, so "two" never matches."""
    answers = ["two"] * 4 + ["three"] * 6
    # official: prediction "2", gold "2" x4 -> 4 matches -> every subset holds >= 3 -> 1.0
    assert vqa_accuracy("2", answers, "official") == 1.0
    assert vqa_accuracy("2", answers, "textvqa") == 1.0  # m4c normalises the gold answers too
    # prismatic: prediction "2" against gold "two" -> 0 matches -> 0.0; even the prediction "two" becomes "2"
    assert vqa_accuracy("2", answers, "prismatic") == 0.0
    assert vqa_accuracy("two", answers, "prismatic") == 0.0
    assert vqa_accuracy("two", answers, "official-2016") == 0.0


def test_vqa_gold_articles_and_case_official_vs_prismatic():
    # official: gold "the dog" -> "dog" x3 -> 3 matches -> (3 * 2/3 + 7) / 10 = 0.9; prismatic keeps "the dog"
    answers = ["the dog"] * 3 + ["cat"] * 7
    assert vqa_accuracy("dog", answers, "official") == pytest.approx(0.9)
    assert vqa_accuracy("dog", answers, "prismatic") == 0.0
    # prismatic does not lower-case the gold: "Coca Cola" never matches the prediction "coca cola"
    answers = ["Coca Cola"] * 3 + ["coke"] * 7
    assert vqa_accuracy("coca cola", answers, "official") == pytest.approx(0.9)
    assert vqa_accuracy("coca cola", answers, "textvqa") == pytest.approx(0.9)
    assert vqa_accuracy("coca cola", answers, "prismatic") == 0.0


def test_vqa_gold_punctuation_only_when_answers_disagree_2016():
    # 2016 script: ten identical "red, white" stay raw; the prediction normalises to "red white" -> no match.
    # prismatic always punctuates the gold: "red, white" -> "red white" -> 10 matches -> 1.0
    answers = ["red, white"] * 10
    assert vqa_accuracy("red white", answers, "official-2016") == 0.0
    assert vqa_accuracy("red white", answers, "prismatic") == 1.0
    # once one answer differs, the 2016 script punctuates the gold too: 9 matches -> 1.0
    assert vqa_accuracy("red white", [*answers[:9], "red"], "official-2016") == 1.0


def test_vqa_comma_rule_in_gold():
    # gold "1,000" (x3) and "1000" (x7) disagree, so the official script normalises both to "1000": 10 matches
    assert vqa_accuracy("1000", ["1,000"] * 3 + ["1000"] * 7) == 1.0
    # prediction "1, 000" -> "1 000" (', ' present: the comma is deleted, the space stays) -> no match
    assert vqa_accuracy("1, 000", ["1,000"] * 3 + ["1000"] * 7) == 0.0


def test_vqa_bad_input():
    answers = ["yes"] * 10
    assert vqa_accuracy("", answers) == 0.0
    assert vqa_accuracy("   ", answers, "prismatic") == 0.0
    with pytest.raises(ValueError, match="NoneType"):
        vqa_accuracy(None, answers)
    with pytest.raises(ValueError, match="int"):
        vqa_accuracy(3, answers)
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="list of str"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(ValueError, match="gold answer"):
        vqa_accuracy("yes", ["yes", 2])
    with pytest.raises(ValueError, match="unknown VQA standard"):
        vqa_accuracy("yes", answers, "evalai")


def test_vizwiz():
    # VizWiz: the prediction normalised, gold raw. "Unanswerable." -> "unanswerable": 10 matches -> 1.0
    assert vizwiz_accuracy("Unanswerable.", ["unanswerable"] * 10) == 1.0
    # nothing else is mapped to "unanswerable"
    assert vizwiz_accuracy("I can't tell", ["unanswerable"] * 10) == 0.0
    assert vizwiz_accuracy("unsuitable", ["unanswerable"] * 10) == 0.0
    # 5 "unanswerable" + 5 "red": a prediction of "unanswerable" has 5 matches -> every subset >= 4 -> 1.0
    assert vizwiz_accuracy("unanswerable", ["unanswerable"] * 5 + ["red"] * 5) == 1.0
    # backtick contractions: "dont" -> "don`t" misses the gold "don't" (the prismatic VQAv2 rule hits it)
    assert vizwiz_accuracy("dont", ["don't"] * 10) == 0.0
    assert vqa_accuracy("dont", ["don't"] * 10, "prismatic") == 1.0
    # gold raw: a capitalised gold answer never matches (the prediction is lower-cased)
    assert vizwiz_accuracy("Red", ["Red"] * 10) == 0.0


# ---------------------------------------------------------------------------------------------------------
# GQA


def test_gqa():
    assert gqa_accuracy("Yes.", "yes") == 1.0  # punctuation deleted, lower-cased
    assert gqa_accuracy(" left ", "left") == 1.0  # the generator strips
    assert gqa_accuracy("the dog", "dog") == 0.0  # no article removal: exact match otherwise
    assert gqa_accuracy("dogs", "dog") == 0.0
    # the harness deletes '-' from the prediction but compares the gold as given: "t-shirt" can never match
    assert gqa_accuracy("t-shirt", "t-shirt") == 0.0
    assert gqa_accuracy("t-shirt", "tshirt") == 1.0
    with pytest.raises(ValueError, match="list"):
        gqa_accuracy(["yes"], "yes")


# ---------------------------------------------------------------------------------------------------------
# POPE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is no dog.", "no"),  # "No" after deleting the comma
        ("There is not a dog in the image", "no"),
        ("Yes. But there is no cat.", "yes"),  # only the first sentence counts
        ("I do not think so", "no"),
        ("no", "no"),
        ("Nope", "yes"),  # only the words No / no / not count
        ("NO", "yes"),  # case-sensitive
        ("No!", "yes"),  # '!' is not stripped, so the word is "No!"
        ("", "yes"),  # an empty answer is "yes"
    ],
)
def test_pope_answer(text, expected):
    assert pope_answer(text) == expected


def test_pope_metrics():
    # predictions -> yes, no, yes, yes; labels yes, no, no, yes: TP = 2 (1st, 4th), FP = 1 (3rd), TN = 1,
    # FN = 0.
    # accuracy = 3/4; precision = 2/3; recall = 2/2 = 1; F1 = 2 * (2/3) * 1 / (2/3 + 1) = (4/3) / (5/3) = 0.8;
    # yes_ratio = 3/4
    got = pope_metrics(["Yes", "No", "Yes", "Yes, it is."], ["yes", "no", "no", "yes"])
    assert got == pytest.approx(
        {"accuracy": 0.75, "precision": 2 / 3, "recall": 1.0, "f1": 0.8, "yes_ratio": 0.75}
    )


def test_pope_all_yes():
    # always "yes" on 2 positives and 3 negatives: TP = 2, FP = 3, TN = FN = 0. recall = 1,
    # precision = 2/5 = the positive fraction, accuracy = 2/5, F1 = 2 * 0.4 * 1 / 1.4 = 4/7, yes_ratio = 1
    got = pope_metrics(["yes"] * 5, ["yes", "yes", "no", "no", "no"])
    assert got == pytest.approx(
        {"accuracy": 0.4, "precision": 0.4, "recall": 1.0, "f1": 4 / 7, "yes_ratio": 1.0}
    )


def test_pope_zero_division():
    # always "no": TP = FP = 0 -> precision 0/0 -> 0.0; recall 0/2 = 0; F1 0/0 -> 0.0; accuracy = 1/3
    got = pope_metrics(["no"] * 3, ["yes", "yes", "no"])
    assert got == pytest.approx(
        {"accuracy": 1 / 3, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    )
    assert pope_metrics([], []) == {
        "accuracy": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "yes_ratio": 0.0,
    }


def test_pope_bad_input():
    with pytest.raises(ValueError, match="2 predictions, 1 labels"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])
    assert pope_metrics(["yes"], ["Yes"])["accuracy"] == 1.0  # labels are read case-insensitively


# ---------------------------------------------------------------------------------------------------------
# MME


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("No.", "no"),  # not exactly "no", but "no" is in "no." (its first 4 characters)
        ("Yes, it is.", "yes"),
        ("not sure", "no"),  # "not " holds "no"
        ("Nope", "no"),
        ("none", "no"),
        ("I think yes", "other"),  # "i th": neither in the first 4 characters
        ("The answer is no", "other"),
        ("unknown", "other"),  # "unkn"
        ("  yes\n", "yes"),
    ],
)
def test_mme_answer(text, expected):
    assert mme_answer(text) == expected


def test_mme_subtask_score():
    rows = [
        ("a.jpg", "Is there a dog?", "Yes", "Yes"),  # right
        ("a.jpg", "Is there a cat?", "No", "No, there is not."),  # right -> a.jpg: both right
        ("b.jpg", "Is it red?", "Yes", "yes"),  # right
        ("b.jpg", "Is it blue?", "No", "Yes"),  # wrong -> b.jpg: not both
    ]
    # acc = 3/4 = 0.75; acc+ = 1 of 2 images = 0.5; score = 100 * 0.75 + 100 * 0.5 = 125
    assert mme_subtask_score(rows) == pytest.approx({"acc": 0.75, "acc_plus": 0.5, "score": 125.0})


def test_mme_other_is_wrong():
    # "maybe" parses to "other": wrong for either gold.
    # acc = 2/4 = 0.5; acc+ = 1/2 (c.jpg); score = 50 + 50 = 100
    rows = [
        ("c.jpg", "q1", "yes", "yes"),
        ("c.jpg", "q2", "no", "no"),
        ("d.jpg", "q1", "yes", "maybe"),
        ("d.jpg", "q2", "no", "maybe"),
    ]
    assert mme_subtask_score(rows) == pytest.approx({"acc": 0.5, "acc_plus": 0.5, "score": 100.0})


def test_mme_subtask_bad_input():
    with pytest.raises(ValueError, match="got none"):
        mme_subtask_score([])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        mme_subtask_score([("a.jpg", "q", "maybe", "yes")])


def test_mme_totals():
    # perception: 10 subtasks x 150 = 1500; cognition: 4 x 100 = 400; total 1900
    scores = {name: {"score": 150.0} for name in MME_PERCEPTION} | {
        name: {"score": 100.0} for name in MME_COGNITION
    }
    assert mme_totals(scores) == {"perception": 1500.0, "cognition": 400.0, "total": 1900.0, "missing": []}
    partial = mme_totals({"existence": {"score": 200.0}})
    assert (partial["perception"], partial["cognition"], partial["total"]) == (200.0, 0, 200.0)
    assert len(partial["missing"]) == 13
    with pytest.raises(ValueError, match="unknown MME subtasks"):
        mme_totals({"ocr": {"score": 1.0}})  # the official name is "OCR"


# ---------------------------------------------------------------------------------------------------------
# VSR (true / false)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("True", "true"),
        ("False.", "false"),
        ("The statement is false.", "false"),  # the only one of the two that occurs
        ("True or false", "true"),  # the first word decides
        ("It is true, not false", "other"),  # both occur, neither first
        ("Yes", "other"),
    ],
)
def test_true_false_answer(text, expected):
    assert true_false_answer(text) == expected


def test_vsr_accuracy():
    assert vsr_accuracy("True.", True) == 1.0
    assert vsr_accuracy("False", True) == 0.0
    assert vsr_accuracy("false", False) == 1.0
    assert vsr_accuracy("maybe", False) == 0.0
    with pytest.raises(ValueError, match="bool"):
        vsr_accuracy("True", "true")


# ---------------------------------------------------------------------------------------------------------
# Multiple choice and MMBench

OPTIONS = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("b", "B"),  # a whole-answer letter in any case
        ("(B)", "B"),
        ("B.", "B"),
        ("B) dog", "B"),
        ("B. fish", "B"),  # the letter wins over the text
        ("I choose (C).", "C"),
        ("The answer is C", "C"),
        ("Answer: D", "D"),
        ("The answer is (B) dog", "B"),
        ("dog", "B"),  # an option's text
        ("Dog.", "B"),
        ("A or B", None),  # no rule matches: ambiguous
        ("(A) and (C)", None),  # two letters
        ("E", None),  # beyond the 4 options
        ("A dog", None),  # a capital 'A' opening a sentence is not a pick
        ("I don't know", None),
        ("", None),
    ],
)
def test_choice_letter(text, expected):
    assert choice_letter(text, OPTIONS) == expected


def test_choice_accuracy():
    assert choice_accuracy("B", OPTIONS, "B") == 1.0
    assert choice_accuracy("The answer is C", OPTIONS, "B") == 0.0
    assert choice_accuracy("dunno", OPTIONS, "b") == 0.0
    with pytest.raises(ValueError, match="option letters A, B, C, D"):
        choice_accuracy("B", OPTIONS, "E")
    with pytest.raises(ValueError, match="1 to 26 options"):
        choice_letter("A", [])


def test_mmbench_circular():
    # q1: all 4 rotations right; q2: first pass right, a later one wrong; q3: first pass wrong.
    # circular = 1/3 (q1); vanilla = 2/3 (q1 and q2 right on their first pass)
    results = [("q1", True)] * 4 + [("q2", True), ("q2", False), ("q2", True), ("q2", True)]
    results += [("q3", False), ("q3", True)]
    got = mmbench_circular(results)
    assert got == pytest.approx({"circular_accuracy": 1 / 3, "vanilla_accuracy": 2 / 3, "questions": 3})
    assert mmbench_circular([]) == {"circular_accuracy": 0.0, "vanilla_accuracy": 0.0, "questions": 0}


def test_probability_choice():
    assert probability_choice({"Yes": 0.6, "No": 0.4}) == "Yes"
    assert probability_choice({"A": 0.1, "B": 0.3, "C": 0.3}) == "B"  # tie: the first in dict order
    with pytest.raises(ValueError, match="at least one option"):
        probability_choice({})


# ---------------------------------------------------------------------------------------------------------
# TallyQA


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", 3),
        ("There are three dogs.", 3),
        ("12 apples", 12),
        ("Zero", 0),
        ("twenty", 20),
        ("I see 2 or three", 2),  # the first number
        ("three or 2", 3),
        ("3.5", 3),  # the first run of digits
        ("someone", None),  # "one" inside a word is not a number
        ("none", None),
        ("", None),
    ],
)
def test_count_answer(text, expected):
    assert count_answer(text) == expected


def test_tally_accuracy():
    assert tally_accuracy("Three.", 3) == 1.0
    assert tally_accuracy("4", 3) == 0.0
    assert tally_accuracy("no idea", 0) == 0.0


# ---------------------------------------------------------------------------------------------------------
# RefCOCO


def test_parse_box_normalised_and_pixels():
    # normalised, scaled by (width 200, height 100): x 0.1 * 200 = 20, y 0.2 * 100 = 20, 0.5 * 200 = 100,
    # 0.6 * 100 = 60
    assert parse_box("[0.1, 0.2, 0.5, 0.6]", (200, 100)) == pytest.approx((20, 20, 100, 60))
    # no image size: left normalised
    assert parse_box("[0.1, 0.2, 0.5, 0.6]") == pytest.approx((0.1, 0.2, 0.5, 0.6))
    assert parse_box("The box is (10, 20, 110, 220).", (200, 100)) == (10, 20, 110, 220)  # pixels: unchanged
    assert parse_box("[0.5, 0.6, 0.1, 0.2]") == pytest.approx((0.1, 0.2, 0.5, 0.6))  # corners reordered
    assert parse_box("[0, 0, 1, 1]", (640, 480)) == (0, 0, 640, 480)  # all in [0, 1]: read as normalised
    assert parse_box("x1=0.1 y1=0.2") is None  # two numbers: "x1" and "y1" are labels
    assert parse_box("x1=0.1, y1=0.2, x2=0.5, y2=0.6") == pytest.approx((0.1, 0.2, 0.5, 0.6))
    assert parse_box("no box") is None


def test_box_iou():
    # (0,0,10,10) and (5,5,15,15): intersection 5 * 5 = 25; union 100 + 100 - 25 = 175 -> 25/175 = 1/7
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # no area: no division by zero


def test_refcoco_accuracy():
    gold, size = (0, 0, 100, 100), (200, 200)
    # [0, 0, 0.5, 0.5] * 200 = (0, 0, 100, 100): IoU 1
    assert refcoco_accuracy("[0, 0, 0.5, 0.5]", gold, size) == 1.0
    # (0, 0, 100, 50): intersection 100 * 50 = 5000; union 10000 + 5000 - 5000 = 10000 -> IoU 0.5 exactly,
    # which counts as right (>= 0.5)
    assert refcoco_accuracy("[0, 0, 0.5, 0.25]", gold, size) == 1.0
    # (50, 0, 150, 100): intersection 50 * 100 = 5000; union 10000 + 10000 - 5000 = 15000 -> IoU 1/3: wrong
    assert refcoco_accuracy("[0.25, 0, 0.75, 0.5]", gold, size) == 0.0
    assert refcoco_accuracy("[0, 0, 100, 100]", gold, size) == 1.0  # a pixel box
    assert refcoco_accuracy("I cannot find it", gold, size) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Every free-form reader refuses a prediction that is not text


@pytest.mark.parametrize(
    "call",
    [
        lambda p: vqa_accuracy(p, ["yes"]),
        lambda p: gqa_accuracy(p, "yes"),
        pope_answer,
        mme_answer,
        true_false_answer,
        lambda p: choice_letter(p, OPTIONS),
        count_answer,
        parse_box,
    ],
)
def test_non_str_prediction_is_a_clear_error(call):
    with pytest.raises(ValueError, match=r"must be a str.*got bytes"):
        call(b"yes")
