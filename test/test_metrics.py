"""Perplexity and the generation metrics (BLEU, ROUGE, METEOR) on English and Chinese, against hand-computed values
and nltk / rouge-score called directly. Offline: WordNet is made present or absent with a private nltk data path."""

import math
import zipfile
from fractions import Fraction

import nltk.data
import nltk.translate.meteor_score
import pytest
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from rouge_score.rouge_scorer import RougeScorer

from utils import metrics
from utils.metrics import (bleu, generation_metrics, meteor, meteor_unavailable_reason, perplexity, rouge,
                           tokenize_for_metrics)

EN_PREDICTION, EN_REFERENCE = "The cat sat on the mat today.", "the cat is on the mat"
EN_PREDICTION_TOKENS = ["the", "cat", "sat", "on", "the", "mat", "today"]
EN_REFERENCE_TOKENS = ["the", "cat", "is", "on", "the", "mat"]
ZH_PREDICTION, ZH_REFERENCE = "我喜欢猫", "我喜欢狗"
ZH_SENTENCE = "今天天气很好，我们去公园散步吧。"


def f1(overlap: int, prediction_len: int, reference_len: int) -> float:
    """F1 of precision overlap/prediction_len and recall overlap/reference_len."""
    return 2 * overlap / (prediction_len + reference_len)


@pytest.fixture
def no_wordnet(monkeypatch, tmp_path):
    """An nltk data path without WordNet, whatever this machine has installed."""
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])


@pytest.fixture
def fake_wordnet(monkeypatch, tmp_path):
    """An nltk data path holding corpora/wordnet.zip as the downloader leaves it (contents are never read)."""
    (tmp_path / "corpora").mkdir()
    with zipfile.ZipFile(tmp_path / "corpora" / "wordnet.zip", "w") as archive:
        archive.writestr("wordnet/", "")
        archive.writestr("wordnet/lexnames", "")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])


def test_perplexity_is_exp_of_loss_and_capped():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(1e6) == math.exp(50.0)


def test_tokenizer_splits_cjk_characters_and_keeps_words():
    assert tokenize_for_metrics("我爱北京 tiananmen!") == ["我", "爱", "北", "京", "tiananmen"]
    assert tokenize_for_metrics("Hello, World! GPT4模型 v3.14 snake_case") == [
        "hello", "world", "gpt4", "模", "型", "v3", "14", "snake", "case"]
    # Extension A, a compatibility ideograph, extension B, Hiragana, Katakana, Hangul: one token each.
    assert tokenize_for_metrics("㐀豈𠀀ひらカナ한국") == ["㐀", "豈", "𠀀", "ひ", "ら", "カ", "ナ", "한", "국"]
    assert tokenize_for_metrics("Café，“你好”。") == ["café", "你", "好"]
    assert tokenize_for_metrics("") == tokenize_for_metrics(" ,.!？") == []


@pytest.mark.parametrize("text", ["the quick brown fox jumps over the lazy dog", ZH_SENTENCE])
def test_identical_texts_score_one(text):
    assert bleu([text], [text]) == pytest.approx(1.0)
    assert rouge([text], [text]) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})


def test_rouge_chinese_partial_overlap_hand_computed():
    # 我 喜 欢 match, 猫/狗 do not: 3 of 4 unigrams, 2 of 3 bigrams (我喜, 喜欢), LCS 3.
    assert rouge([ZH_PREDICTION], [ZH_REFERENCE]) == pytest.approx(
        {"rouge1": 0.75, "rouge2": 2 / 3, "rougeL": 0.75})


def test_rouge_english_hand_computed():
    # Unigrams: the x2, cat, on, mat = 5 of 7 predicted, 6 in the reference. Bigrams: "the cat", "on the",
    # "the mat" = 3 of 6 and 5. LCS: the cat on the mat = 5.
    assert rouge([EN_PREDICTION], [EN_REFERENCE]) == pytest.approx(
        {"rouge1": f1(5, 7, 6), "rouge2": f1(3, 6, 5), "rougeL": f1(5, 7, 6)})
    assert f1(5, 7, 6) == pytest.approx(10 / 13) and f1(3, 6, 5) == pytest.approx(6 / 11)


def test_rouge_averages_over_pairs():
    scores = rouge([EN_PREDICTION, ZH_PREDICTION], [EN_REFERENCE, ZH_REFERENCE])
    assert scores["rouge1"] == pytest.approx((10 / 13 + 0.75) / 2)
    assert scores["rouge2"] == pytest.approx((6 / 11 + 2 / 3) / 2)


def test_default_rouge_tokenizer_drops_chinese_ours_does_not():
    # Why MetricsTokenizer exists: rouge-score keeps only [a-z0-9], so identical Chinese texts score 0.
    default = RougeScorer(["rouge1"]).score(ZH_SENTENCE, ZH_SENTENCE)["rouge1"].fmeasure
    assert default == 0.0
    assert rouge([ZH_SENTENCE], [ZH_SENTENCE])["rouge1"] == 1.0


def test_bleu_equals_nltk_corpus_bleu_with_method3():
    expected = corpus_bleu([[EN_REFERENCE_TOKENS], [list(ZH_REFERENCE)]],
                           [EN_PREDICTION_TOKENS, list(ZH_PREDICTION)], smoothing_function=SmoothingFunction().method3)
    assert bleu([EN_PREDICTION, ZH_PREDICTION], [EN_REFERENCE, ZH_REFERENCE]) == expected
    assert 0.0 < expected < 1.0


def test_bleu_english_hand_computed():
    # Precisions 5/7, 3/6, 1/5 ("on the mat"); no 4-gram match -> method3 gives 1/(2^1 * 4).
    # 7 predicted tokens > 6 reference tokens: no brevity penalty.
    expected = float(Fraction(5, 7) * Fraction(3, 6) * Fraction(1, 5) * Fraction(1, 8)) ** 0.25
    assert bleu([EN_PREDICTION], [EN_REFERENCE]) == pytest.approx(expected)


def test_unrelated_texts_score_near_zero():
    assert bleu(["the weather is sunny"], [ZH_SENTENCE]) == 0.0
    assert bleu(["the stock market fell sharply yesterday afternoon"], ["the cat sat on the mat"]) < 0.1
    assert rouge(["the weather is sunny"], [ZH_SENTENCE]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_empty_prediction_scores_zero_without_error():
    score = bleu([""], [EN_REFERENCE])
    assert score == 0.0 and isinstance(score, float)
    assert rouge([""], [EN_REFERENCE]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # In a corpus an empty reply only pulls the score down.
    assert 0.0 < bleu(["", ZH_SENTENCE], [EN_REFERENCE, ZH_SENTENCE]) < bleu([ZH_SENTENCE], [ZH_SENTENCE])


def test_meteor_is_none_without_wordnet(no_wordnet):
    reason = meteor_unavailable_reason()
    assert reason is not None and "wordnet" in reason.lower() and "nltk.downloader" in reason
    assert "\n" not in reason
    assert meteor([EN_PREDICTION], [EN_REFERENCE]) is None


def test_meteor_available_with_zipped_wordnet_averages_nltk_scores(fake_wordnet, monkeypatch):
    calls = []

    def fake_meteor_score(references, hypothesis):
        calls.append((references, hypothesis))
        return len(hypothesis) / 10

    monkeypatch.setattr(nltk.translate.meteor_score, "meteor_score", fake_meteor_score)
    assert meteor_unavailable_reason() is None
    assert meteor([EN_PREDICTION, ZH_PREDICTION], [EN_REFERENCE, ZH_REFERENCE]) == pytest.approx((0.7 + 0.4) / 2)
    assert calls == [([EN_REFERENCE_TOKENS], EN_PREDICTION_TOKENS), ([list(ZH_REFERENCE)], list(ZH_PREDICTION))]


def test_wordnet_found_unpacked_too(monkeypatch, tmp_path):
    (tmp_path / "corpora" / "wordnet").mkdir(parents=True)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    assert metrics._wordnet_available()


def test_generation_metrics_keys_and_values(no_wordnet):
    predictions, references = [EN_PREDICTION, ZH_PREDICTION], [EN_REFERENCE, ZH_REFERENCE]
    result = generation_metrics(predictions, references)
    assert set(result) == {"bleu", "rouge1", "rouge2", "rougeL", "meteor", "meteor_note", "num_samples"}
    assert result["bleu"] == bleu(predictions, references)
    assert {key: result[key] for key in metrics.ROUGE_TYPES} == rouge(predictions, references)
    assert result["meteor"] is None and result["meteor_note"] == meteor_unavailable_reason()
    assert result["num_samples"] == 2


def test_generation_metrics_reports_meteor_when_available(fake_wordnet, monkeypatch):
    monkeypatch.setattr(nltk.translate.meteor_score, "meteor_score", lambda references, hypothesis: 0.5)
    result = generation_metrics([ZH_PREDICTION], [ZH_REFERENCE])
    assert result["meteor"] == 0.5 and result["meteor_note"] is None


@pytest.mark.parametrize("function", [generation_metrics, bleu, rouge, meteor])
def test_mismatched_or_empty_inputs_are_rejected(function):
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        function(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no predictions"):
        function([], [])
    with pytest.raises(TypeError):
        function("a reply", "a reference")
