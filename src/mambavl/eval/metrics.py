"""The benchmark scoring rules as pure functions of (model output, gold): answer normalisation, VQA accuracy,
POPE, MME, GQA, VizWiz, VSR, multiple choice, MMBench circular, TallyQA and RefCOCO.

Each rule names its source. Where the benchmark authors' script and the seeds' harness (TRI vlm-evaluation,
which produced Cobra's and ML-Mamba's numbers) disagree, the difference is written down beside the rule.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MME_COGNITION",
    "MME_PERCEPTION",
    "VQA_STANDARDS",
    "box_iou",
    "choice_accuracy",
    "choice_letter",
    "count_answer",
    "gqa_accuracy",
    "mmbench_circular",
    "mme_answer",
    "mme_subtask_score",
    "mme_totals",
    "parse_box",
    "pope_answer",
    "pope_metrics",
    "probability_choice",
    "refcoco_accuracy",
    "tally_accuracy",
    "true_false_answer",
    "vizwiz_accuracy",
    "vqa_accuracy",
    "vqa_normalize",
    "vsr_accuracy",
]


def _text(value: object, what: str = "the prediction (the model's decoded text)") -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__}: {value!r}")
    return value


def _answers(answers: object) -> list[str]:
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise ValueError(
            f"answers must be a list of str (VQA-style: one per annotator), got {type(answers).__name__}"
        )
    if not answers:
        raise ValueError("answers is empty: a VQA-style question needs at least one gold answer (VQA has 10)")
    for answer in answers:
        _text(answer, "every gold answer")
    return list(answers)


# ------------------------------------------------------------------------------------------------------------
# VQA answer normalisation: the tables and steps shared by every VQA-family script (VQA API vqaEval.py,
# LAVIS / vlm-evaluation vqav2, the VizWiz script, the m4c / EvalAI TextVQA processor).

# contraction without apostrophe -> with; stored as `key:value` words. The capitalised keys ("Im", "Ive")
# never match because the text is lower-cased first; kept as in the scripts.
_CONTRACTIONS = dict(
    pair.split(":")
    for pair in """
    aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
    couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
    hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
    howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
    itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
    mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
    neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
    'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
    shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
    somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
    someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
    someones:someone's somethingd:something'd somethingd've:something'd've something'dve:something'd've
    somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've
    therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll
    theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
    werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd
    wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
    whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
    wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
    yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
    you'dve:you'd've youll:you'll youre:you're youve:you've
    """.split()  # noqa: SIM905  (a table of words reads better than 120 quoted strings)
)
# The VizWiz script (as vendored by vlm-evaluation) inherited the VQA beta's curly apostrophes as backticks:
# every apostrophe is a backtick except in these values and these two keys.
_VIZWIZ_STRAIGHT_VALUES = {"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"}
_VIZWIZ_STRAIGHT_KEYS = {"couldn'tve", "hadn'tve"}
_VIZWIZ_CONTRACTIONS = {
    (k if k in _VIZWIZ_STRAIGHT_KEYS else k.replace("'", "`")): (
        v if k in _VIZWIZ_STRAIGHT_VALUES else v.replace("'", "`")
    )
    for k, v in _CONTRACTIONS.items()
}

_NUMBER_WORDS = re.findall(
    r"\w+",
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty",
)
_NUMBERS = {"none": "0"} | {word: str(n) for n, word in enumerate(_NUMBER_WORDS[:11])}  # zero..ten
_ARTICLES = {"a", "an", "the"}
# The same marks in every script since the VQA API's 2015 updates (its beta also had ':' and "'", not '{}-!');
# '.' is handled apart.
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
# The scripts write "(?!<=\d)(\.)(?!\d)": the first group is a mistyped look-behind, really a look-ahead for
# "<=digit", which never matches at a '.', so a period goes whenever no digit follows it ("3.5" keeps it).
_PERIOD = re.compile(r"\.(?!\d)")
# ...and they pass re.UNICODE (= 32) where `sub` takes its count, so only the first 32 periods go.
_PERIOD_COUNT = int(re.UNICODE)
_COMMA_VQA = re.compile(r"(\d)(,)(\d)")  # "1,000": a digit-comma-digit anywhere drops all punctuation
_COMMA_M4C = re.compile(r"(?<=\d)(,)+(?=\d)")


@dataclass(frozen=True)
class VQAStandard:
    """One script's VQA accuracy: how the prediction and the gold answers are normalised before the
    leave-one-annotator-out count. Every standard is a row of `VQA_STANDARDS`."""

    name: str
    source: str
    contractions: dict[str, str]
    comma: re.Pattern
    gold: str  # what the gold answers get: "raw", "punctuation" (punctuation step only) or "full"
    gold_only_if_split: bool = False  # gold normalised only when the answers are not all the same
    prediction_only_if_split: bool = False  # ...and the prediction too (else: always normalised)
    strip_gold: bool = False  # gold answers get newline/tab -> space and strip() first
    word_tokenize: bool = False  # m4c: lower, drop ',' and '?', "'s" -> " 's" before everything else


VQA_STANDARDS: dict[str, VQAStandard] = {
    s.name: s
    for s in (
        VQAStandard(
            "official",
            "VQA API vqaEval.py as published now (GT-Vision-Lab/VQA, 'Fixed processing answers bug', 2021)",
            _CONTRACTIONS,
            _COMMA_VQA,
            gold="full",
            gold_only_if_split=True,
            prediction_only_if_split=True,
            strip_gold=True,
        ),
        VQAStandard(
            "official-2016",
            "VQA API vqaEval.py from 2016 (apostrophe fix) to 2021, the VQA v2.0 release's script",
            _CONTRACTIONS,
            _COMMA_VQA,
            gold="punctuation",
            gold_only_if_split=True,
        ),
        VQAStandard(
            "prismatic",
            "TRI vlm-evaluation vlm_eval/util/evaluation/vqav2/eval.py (from LAVIS): the seeds' VQAv2",
            _CONTRACTIONS,
            _COMMA_VQA,
            gold="punctuation",
        ),
        VQAStandard(
            "textvqa",
            "TRI vlm-evaluation util/evaluation/textvqa/m4c_evaluators.py (m4c / EvalAI): the seeds' TextVQA",
            _CONTRACTIONS,
            _COMMA_M4C,
            gold="full",
            word_tokenize=True,
        ),
        VQAStandard(
            "vizwiz",
            "TRI vlm-evaluation vlm_eval/util/evaluation/vizwiz/eval.py: the seeds' VizWiz numbers",
            _VIZWIZ_CONTRACTIONS,
            _COMMA_VQA,
            gold="raw",
        ),
    )
}


def _vqa_standard(standard: str) -> VQAStandard:
    if standard not in VQA_STANDARDS:
        raise ValueError(f"unknown VQA standard {standard!r}; known: {', '.join(VQA_STANDARDS)}")
    return VQA_STANDARDS[standard]


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str, std: VQAStandard) -> str:
    # the tests for a mark look at the original text while the replacements pile up on the copy
    drop_all = std.comma.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if drop_all or spaced else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digits_articles(text: str, std: VQAStandard) -> str:
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(std.contractions.get(word, word) for word in words if word not in _ARTICLES)


def _normalize(text: str, std: VQAStandard) -> str:
    if std.word_tokenize:
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return _digits_articles(_punctuation(_clean(text), std), std)


def vqa_normalize(text: str, standard: str = "official") -> str:
    """The full VQA normalisation of one answer under `standard` (see `vqa_accuracy`): newlines and tabs to
    spaces and strip; punctuation (a digit-comma-digit anywhere, as in "1,000", deletes every mark; otherwise
    a mark next to a space is deleted and any other becomes a space; a period not followed by a digit is
    deleted); lower-case; number words zero..ten and "none" to digits; articles a/an/the dropped; contractions
    without apostrophe ("dont") given one ("don't"). Under "official" the prediction gets this only when the
    gold answers disagree; `vqa_accuracy` decides when it applies."""
    return _normalize(_text(text, "text"), _vqa_standard(standard))


def _leave_one_out(prediction: str, gold: list[str]) -> float:
    # Leaving annotator i out, the others hold `matches - [gold[i] == prediction]` matches; a subset scores
    # min(1, matches / 3) and the question scores the mean over the subsets. The scripts drop annotator i by
    # identity (answer_id / position), not by value, which is what leaving the index out does here.
    matches = sum(answer == prediction for answer in gold)
    return sum(min(1.0, (matches - (answer == prediction)) / 3) for answer in gold) / len(gold)


def vqa_accuracy(prediction: str, answers: list[str], standard: str = "official") -> float:
    """VQA accuracy in [0, 1]: the mean over leave-one-annotator-out subsets of min(1, matches / 3), after
    the normalisation of `vqa_normalize`. Which side is normalised, and when, depends on `standard`:

    - "official" (GT-Vision-Lab/VQA vqaEval.py as published since 2021): prediction and gold answers get
      newline/tab -> space and strip(). If the gold answers are not all identical, both get the full
      normalisation; if all are identical, neither does, so the comparison is exact and case-sensitive
      ("Yes" scores 0 against ten "yes"; the challenge's annotations are lower-case).
    - "official-2016" (the same script from 2016 to 2021, the VQA v2.0 release): the prediction always gets
      the full normalisation; the gold answers get the punctuation step only, and only when they are not all
      identical (no lower-casing, number words or articles on the gold side).
    - "prismatic" (TRI vlm-evaluation's VQAv2 scorer, taken from LAVIS; the seeds' VQAv2 numbers): the
      prediction always gets the full normalisation; the gold answers always get the punctuation step and
      nothing more. So, against "official": a gold "two" or "the dog" is never turned into "2" / "dog" (a
      prediction "2" or "dog" does not match it; "official" normalises both sides when the answers disagree),
      and a prediction "Yes." matches ten identical "yes" (it scores 0 under "official").
    - "textvqa" (vlm-evaluation's TextVQA scorer, the m4c / EvalAI processor; the seeds' TextVQA numbers):
      prediction and gold answers always get the full normalisation, preceded by lower-casing, deleting every
      ',' and '?' and splitting "'s" off as " 's" ("man's" -> "man 's"); its comma test is therefore moot.
    - "vizwiz" (vlm-evaluation's VizWiz script): the prediction always gets the full normalisation with
      contractions spelt with backticks ("dont" -> "don`t"); the gold answers are compared raw.

    Quirks kept from all the scripts: at most 32 periods are deleted (see `_PERIOD_COUNT`); ':' and "'" are
    not punctuation. Any non-empty list of answers is accepted (VQA has 10, one annotator alone scores 0).
    An empty prediction scores 0; a prediction that is not a str, or an empty list of answers, is a
    ValueError.
    """
    prediction = _text(prediction)
    answers = _answers(answers)
    std = _vqa_standard(standard)
    if not prediction.strip():
        return 0.0

    gold = [_clean(answer) for answer in answers] if std.strip_gold else answers
    split = len(set(gold)) > 1
    if std.gold != "raw" and (split or not std.gold_only_if_split):
        step = _normalize if std.gold == "full" else _punctuation
        gold = [step(answer, std) for answer in gold]
    if split or not std.prediction_only_if_split:
        prediction = _normalize(prediction, std)
    else:
        prediction = _clean(prediction)
    return _leave_one_out(prediction, gold)


def vizwiz_accuracy(prediction: str, answers: list[str]) -> float:
    """VizWiz accuracy: the VQA rule as the seeds' harness scores it (`vqa_accuracy(..., standard="vizwiz")`:
    the prediction normalised, the gold answers raw). Unanswerable questions have "unanswerable" among their
    gold answers, and the harness asks for it ("When the provided information is insufficient, respond with
    'Unanswerable'."); a prediction counts as unanswerable only when it normalises to exactly "unanswerable"
    ("Unanswerable." does, "I can't tell" or "unsuitable" do not): the harness maps nothing else."""
    return vqa_accuracy(prediction, answers, standard="vizwiz")


def gqa_accuracy(prediction: str, answer: str) -> float:
    """GQA accuracy: GQA's official eval.py is an exact string match of prediction and gold answer. The seeds'
    harness (vlm-evaluation GQAScorer) first deletes every ASCII punctuation mark (`string.punctuation`) from
    the prediction and lower-cases it; its generator has already stripped whitespace. The gold is compared
    as given (GQA's answers are lower-case words)."""
    prediction = _text(prediction).strip()
    cleaned = prediction.translate(str.maketrans("", "", string.punctuation)).lower()
    return float(cleaned == _text(answer, "the gold answer"))


# ------------------------------------------------------------------------------------------------------------
# Yes/no benchmarks


def pope_answer(text: str) -> str:
    """The POPE authors' mapping (AoiDragon/POPE evaluate.py) of a free-form answer to "yes" / "no": keep the
    text before the first '.', delete commas, split on single spaces; "no" when one of the words is exactly
    "No", "no" or "not", else "yes". Quirks kept: an empty answer, "NO", "No!" or "no\\n" is "yes"."""
    text = _text(text)
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(word in ("No", "no", "not") for word in words) else "yes"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """POPE's metrics (evaluate.py) with "yes" as the positive class: accuracy, precision, recall, F1 and
    yes_ratio (the fraction of predictions that are "yes"). Predictions are raw texts mapped by
    `pope_answer`; labels are "yes" / "no". A zero denominator gives 0.0 (the script would divide by zero).
    The seeds' harness does not generate for POPE: it takes the larger of the first-token probabilities of
    "Yes" and "No" (`probability_choice`) and reports accuracy (and AUCs)."""
    if len(predictions) != len(labels):
        raise ValueError(
            f"POPE needs one label per prediction; got {len(predictions)} predictions, {len(labels)} labels"
        )
    gold = []
    for label in labels:
        label = _text(label, "a POPE label").strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"a POPE label must be 'yes' or 'no', got {label!r}")
        gold.append(label == "yes")
    said_yes = [pope_answer(p) == "yes" for p in predictions]
    tp = sum(p and g for p, g in zip(said_yes, gold, strict=True))
    fp = sum(p and not g for p, g in zip(said_yes, gold, strict=True))
    tn = sum(not p and not g for p, g in zip(said_yes, gold, strict=True))
    fn = sum(not p and g for p, g in zip(said_yes, gold, strict=True))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(gold)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(sum(said_yes), len(said_yes)),
    }


# MME's official subtask lists (eval_tool calculation.py `eval_type_dict`)
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_answer(text: str) -> str:
    """The MME authors' parsing (eval_tool calculation.py `parse_pred_ans`): lower-case; exactly "yes" or
    "no" is itself; else "yes" if "yes" occurs in the first 4 characters, else "no" if "no" does ("not",
    "none", "nope", "now" all read "no"), else "other" (scored wrong). The script reads the answer as the last
    field of a line, trailing newline included; we strip, which gives the same result for generations that
    are stripped, as every harness's are."""
    text = _text(text).lower().strip()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_subtask_score(rows: list[tuple[str, str, str, str]]) -> dict:
    """One MME subtask from rows (image, question, gold "yes"/"no", prediction): `acc` = fraction of questions
    right, `acc_plus` = fraction of images whose questions are all right (MME asks two per image), `score` =
    100·acc + 100·acc_plus (at most 200). The script pairs consecutive lines of the subtask file; we group by
    image, the same thing for the official files (two consecutive questions per image)."""
    if not rows:
        raise ValueError(
            "an MME subtask needs at least one (image, question, gold, prediction) row; got none"
        )
    right_by_image: dict[str, list[bool]] = {}
    for row in rows:
        if len(row) != 4:
            raise ValueError(
                f"an MME row is (image, question, gold, prediction); got {len(row)} fields: {row!r}"
            )
        image, _, gold, prediction = row
        gold = _text(gold, "an MME gold answer").strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"an MME gold answer must be 'yes' or 'no', got {gold!r} (image {image!r})")
        right_by_image.setdefault(image, []).append(mme_answer(prediction) == gold)
    acc = sum(sum(r) for r in right_by_image.values()) / len(rows)
    acc_plus = sum(all(r) for r in right_by_image.values()) / len(right_by_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus}


def mme_totals(subtask_scores: dict[str, dict]) -> dict:
    """MME's totals: `perception` (at most 2000) and `cognition` (at most 800) are the sums of the subtask
    scores (`mme_subtask_score(...)["score"]`) over MME's official lists; `total` is their sum. A name
    outside the lists is a ValueError; subtasks not given are listed under `missing` (their totals are not
    comparable with published ones)."""
    known = MME_PERCEPTION + MME_COGNITION
    unknown = sorted(set(subtask_scores) - set(known))
    if unknown:
        raise ValueError(f"unknown MME subtasks {unknown}; MME's are: {', '.join(known)}")
    perception = sum(subtask_scores[name]["score"] for name in MME_PERCEPTION if name in subtask_scores)
    cognition = sum(subtask_scores[name]["score"] for name in MME_COGNITION if name in subtask_scores)
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "missing": [name for name in known if name not in subtask_scores],
    }


def true_false_answer(text: str) -> str:
    """A free-form True/False answer (the seeds' VSR prompt: 'Respond with "True" or "False" directly.'):
    the first word, lower-cased and stripped of punctuation, if it is "true" or "false"; else the one of the
    two that occurs as a word, if only one does; else "other"."""
    words = [w.strip(string.punctuation) for w in _text(text).lower().split()]
    if words and words[0] in ("true", "false"):
        return words[0]
    found = {w for w in words if w in ("true", "false")}
    return found.pop() if len(found) == 1 else "other"


def vsr_accuracy(prediction: str, label: bool) -> float:
    """VSR accuracy: 1.0 when `true_false_answer` agrees with the gold label. The seeds' harness does not
    generate for VSR: it takes the larger of the first-token probabilities of "True" and "False"
    (`probability_choice`)."""
    if not isinstance(label, bool):
        raise ValueError(f"a VSR label must be a bool, got {type(label).__name__}: {label!r}")
    return float(true_false_answer(prediction) == ("true" if label else "false"))


# ------------------------------------------------------------------------------------------------------------
# Multiple choice


def _letters(options: Sequence[str]) -> str:
    if not options or len(options) > 26:
        raise ValueError(f"a multiple-choice question needs 1 to 26 options, got {len(options)}")
    return string.ascii_uppercase[: len(options)]


def choice_letter(text: str, options: list[str]) -> str | None:
    """The option letter (A, B, ...) a free-form answer picks, or None when it picks none or several. A letter
    counts when it is the whole answer ("B", "b", "(B)", "B."), opens it followed by '.', ')' or ':' ("B. a
    cat", "B) ..."), stands in parentheses anywhere ("I pick (B)"), or follows "answer is" / "answer:" /
    "option" / "choice" ("The answer is C"); only capital letters count except for a whole-answer letter, so
    "A dog" picks nothing. Failing a letter, an answer equal to one option's text (case-insensitive, final
    period ignored) picks that option. Letters beyond the options are ignored."""
    text = _text(text).strip()
    letters = _letters(options)
    bare = text.strip(" ()[].:").upper()
    if len(bare) == 1 and bare in letters:
        return bare
    found = set(re.findall(r"^\(?([A-Z])[.):]", text))
    found |= set(re.findall(r"\(([A-Z])\)", text))
    found |= set(re.findall(r"(?i:(?:answer|option|choice)\s*(?:is|:)?)\s*\(?([A-Z])\b", text))
    found &= set(letters)
    if found:
        return found.pop() if len(found) == 1 else None
    said = text.rstrip(".").strip().lower()
    picked = {letters[i] for i, option in enumerate(options) if option.strip().rstrip(".").lower() == said}
    return picked.pop() if len(picked) == 1 else None


def choice_accuracy(prediction: str, options: list[str], answer: str) -> float:
    """Multiple-choice accuracy: 1.0 when `choice_letter` is the gold letter `answer`."""
    letters = _letters(options)
    gold = _text(answer, "the gold answer").strip().upper()
    if gold not in letters:
        raise ValueError(
            f"the gold answer must be one of the option letters {', '.join(letters)}; got {answer!r}"
        )
    return float(choice_letter(prediction, options) == gold)


def mmbench_circular(results: list[tuple[str, bool]]) -> dict:
    """MMBench CircularEval: each question is asked once per rotation of its options; `results` holds
    (question index, correct) for every pass. `circular_accuracy` is the fraction of question indices whose
    every pass is correct; `vanilla_accuracy` the fraction correct on each index's first pass (the options in
    their original order). MMBench's own pipeline falls back to an LLM to extract a choice the rules miss; we
    use `choice_letter` alone."""
    passes: dict[str, list[bool]] = {}
    for index, correct in results:
        passes.setdefault(index, []).append(bool(correct))
    return {
        "circular_accuracy": _ratio(sum(all(p) for p in passes.values()), len(passes)),
        "vanilla_accuracy": _ratio(sum(p[0] for p in passes.values()), len(passes)),
        "questions": len(passes),
    }


def probability_choice(probs: dict[str, float]) -> str:
    """The option with the highest probability; ties go to the first in dict order (numpy's argmax, as the
    seeds' harness scores POPE, VSR, TallyQA and AI2D by first-token probability)."""
    if not probs:
        raise ValueError("probability_choice needs at least one option and its probability; got none")
    return max(probs, key=probs.__getitem__)


# ------------------------------------------------------------------------------------------------------------
# Counting and grounding

_COUNT = re.compile(r"\d+|\b(?:" + "|".join(_NUMBER_WORDS) + r")\b")


def count_answer(text: str) -> int | None:
    """The first number in a free-form answer: a run of digits ("3", "12 apples"; "3.5" reads 3) or a number
    word zero..twenty ("Three."); None if there is none. Compound words read their first part
    ("twenty-one" -> 20)."""
    match = _COUNT.search(_text(text).lower())
    if match is None:
        return None
    word = match.group()
    return int(word) if word.isdigit() else _NUMBER_WORDS.index(word)


def tally_accuracy(prediction: str, answer: int) -> float:
    """TallyQA accuracy of a free-form answer: 1.0 when `count_answer` is the gold count. The seeds' harness
    does not generate for TallyQA: it offers 0..15 as options A..P and takes the most probable letter."""
    return float(count_answer(prediction) == answer)


# a number not glued to a word: "x1=0.1" holds one number, 0.1 ("x1" is a label)
_NUMBER = re.compile(r"(?<![A-Za-z_\d.])(?:\d+(?:\.\d+)?|\.\d+)")
Box = tuple[float, float, float, float]


def parse_box(text: str, image_size: tuple[int, int] | None = None) -> Box | None:
    """The box (x1, y1, x2, y2) in a free-form answer: its first four numbers (signs are not read, so
    "0.1-0.3" is two numbers; a number glued to a word, as in "x1=", is a label, not a coordinate). When
    all four are in [0, 1] they are normalised coordinates, as the seeds' RefCOCO prompt produces, and with
    `image_size` (width, height) they are scaled to pixels; a pixel box [0, 0, 1, 1] is read as normalised.
    Corners are ordered so that x1 <= x2 and y1 <= y2. None when there are fewer than four numbers."""
    numbers = [float(n) for n in _NUMBER.findall(_text(text))[:4]]
    if len(numbers) < 4:
        return None
    x1, y1, x2, y2 = numbers
    if image_size is not None and all(n <= 1 for n in numbers):
        width, height = image_size
        x1, x2, y1, y2 = x1 * width, x2 * width, y1 * height, y2 * height
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0.0 when the union has no area."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def refcoco_accuracy(prediction: str, box: Box, image_size: tuple[int, int]) -> float:
    """RefCOCO / RefCOCO+ / RefCOCOg accuracy: 1.0 when the predicted box overlaps the gold `box` (pixels,
    x1, y1, x2, y2; COCO's x, y, w, h must be converted first) with IoU >= 0.5. The seeds' harness is
    stricter about the text: it accepts only a Python list of exactly four numbers, all in [0, 1] with
    x1 < x2 and y1 < y2, and counts anything else wrong; we also read pixel boxes, boxes inside prose and
    swapped corners. IoU is the same in normalised or pixel coordinates (scaling both axes scales both areas
    alike)."""
    predicted = parse_box(prediction, image_size)
    return float(predicted is not None and box_iou(predicted, box) >= 0.5)
