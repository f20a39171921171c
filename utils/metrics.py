"""Evaluation metrics: perplexity for training, and BLEU / ROUGE / METEOR for comparing generated replies with
references, in English and Chinese.

nltk and rouge-score are imported inside the functions that use them: the trainer imports this module for
`perplexity` and should neither wait for nor depend on them. Nothing here downloads data.
"""

import math
import re
from collections.abc import Sequence
from statistics import fmean

from utils.cjk import HANGUL, IDEOGRAPHS, KANA

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# NLTK resource names under which nltk.corpus.wordnet looks for its data: unpacked, then zipped (the downloader
# leaves wordnet as corpora/wordnet.zip).
WORDNET_RESOURCES = ("corpora/wordnet", "corpora/wordnet.zip/wordnet/")

# Scripts written without spaces between words: each character is a token. Ideographs, kana and Hangul.
_CJK = IDEOGRAPHS + KANA + HANGUL
# One CJK character, or a run of letters/digits that are not CJK ([^\W_] is a letter or digit; excluding CJK from
# the run keeps "北京tiananmen" from becoming one token). Everything else (punctuation, spaces, "_") separates.
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged run reports a large number instead of overflowing to inf."""
    return math.exp(min(loss, 50.0))


def tokenize_for_metrics(text: str) -> list[str]:
    """Lowercased tokens: each CJK character alone, runs of other letters and digits, punctuation dropped.

    rouge-score's default tokenizer keeps only [a-z0-9], so Chinese text has no tokens and always scores 0.
    """
    return _TOKEN_RE.findall(text.lower())


class MetricsTokenizer:
    """tokenize_for_metrics in the shape rouge_score.rouge_scorer.RougeScorer(tokenizer=...) expects."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize_for_metrics(text)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    """Raise unless there is exactly one reference per prediction and at least one pair."""
    if isinstance(predictions, str) or isinstance(references, str):
        # A lone string would otherwise be scored character by character.
        raise TypeError("predictions and references must be sequences of strings, not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: "
                         "need exactly one reference per prediction")
    if not predictions:
        raise ValueError("no predictions to score")


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 in 0..1 (nltk corpus_bleu) on tokenize_for_metrics tokens, one reference per prediction.

    Smoothing is nltk's method3, NIST's geometric sequence (mteval-v13a, sacrebleu's default "exp"): an n-gram
    order with no match counts 1/2^k of its n-grams instead of 0, k = 1, 2, ... for each such order. Without
    smoothing a small evaluation set with no 4-gram match scores exactly 0; method3 keeps it graded, follows the
    reference tools, and has no free epsilon (method1's 0.1). Predictions shorter than 4 tokens cannot reach 1.0.
    An empty prediction counts as a prediction with no n-grams; if all are empty the score is 0.
    """
    _check_pairs(predictions, references)
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    hypotheses = [tokenize_for_metrics(prediction) for prediction in predictions]
    list_of_references = [[tokenize_for_metrics(reference)] for reference in references]
    # float(): corpus_bleu returns the int 0 when no unigram matches at all.
    return float(corpus_bleu(list_of_references, hypotheses, smoothing_function=SmoothingFunction().method3))


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 (rouge-score), each averaged over the pairs, on tokenize_for_metrics
    tokens. An empty prediction or reference scores 0 for its pair."""
    _check_pairs(predictions, references)
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(list(ROUGE_TYPES), tokenizer=MetricsTokenizer())
    # score() takes the reference first; F1 is symmetric but precision and recall are not.
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {name: fmean(score[name].fmeasure for score in scores) for name in ROUGE_TYPES}


def _wordnet_available() -> bool:
    """Whether NLTK's WordNet data is installed, looking where nltk.corpus.wordnet would; never downloads."""
    import nltk.data

    for resource in WORDNET_RESOURCES:
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            continue
    return False


def meteor_unavailable_reason() -> str | None:
    """Why meteor() returns None, with how to fix it, in one line; None when METEOR can be computed."""
    if _wordnet_available():
        return None
    return ("METEOR needs NLTK's WordNet data, which is not in any nltk.data.path folder: on a machine with "
            "internet run `python -m nltk.downloader wordnet` and copy its nltk_data folder here "
            "(or point NLTK_DATA at it)")


def meteor(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Sentence METEOR (nltk) averaged over the pairs, in 0..1, on tokenize_for_metrics tokens; None when NLTK's
    WordNet data is not installed (see meteor_unavailable_reason). WordNet synonyms only help English."""
    _check_pairs(predictions, references)
    if not _wordnet_available():
        return None
    from nltk.translate.meteor_score import meteor_score

    return fmean(meteor_score([tokenize_for_metrics(reference)], tokenize_for_metrics(prediction))
                 for prediction, reference in zip(predictions, references))


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int | str | None]:
    """BLEU, ROUGE-1/2/L F1 and METEOR of model replies against one reference each.

    Returns {"bleu", "rouge1", "rouge2", "rougeL", "meteor", "meteor_note", "num_samples"}; "meteor" is None and
    "meteor_note" says why when WordNet is missing, else "meteor_note" is None. Raises ValueError on a length
    mismatch or empty input.
    """
    _check_pairs(predictions, references)
    meteor_note = meteor_unavailable_reason()
    return {
        "bleu": bleu(predictions, references),
        **rouge(predictions, references),
        "meteor": None if meteor_note else meteor(predictions, references),
        "meteor_note": meteor_note,
        "num_samples": len(predictions),
    }
