"""utils/sampling.py: one draw per row through the sampling processors has the frequencies of transformers' own
sampling distribution (temperature, top-k, top-p, then softmax), never picks a token the warpers removed, and leaves
exactly one token for the greedy step."""

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from utils.sampling import InverseCDFSampling, sampling_processors

DRAWS = 20000


def frequencies(processed: torch.Tensor, vocabulary: int) -> torch.Tensor:
    assert (processed.isfinite().sum(-1) == 1).all()  # one token left standing per row
    return torch.bincount(processed.argmax(-1), minlength=vocabulary).float() / len(processed)


def test_draws_follow_the_warped_distribution():
    scores = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0]])
    expected = scores.clone()
    for warper in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(6), TopPLogitsWarper(0.9)):
        expected = warper(None, expected)
    expected = expected.softmax(-1)[0]
    torch.manual_seed(0)
    drawn = frequencies(sampling_processors(0.8, 6, 0.9)(None, scores.repeat(DRAWS, 1)), 8)
    assert (drawn[expected == 0] == 0).all() and (expected == 0).sum() >= 2
    torch.testing.assert_close(drawn, expected, atol=0.012, rtol=0)


def test_plain_settings_add_no_warper_and_a_lone_token_is_always_taken():
    assert [type(processor) for processor in sampling_processors()] == [InverseCDFSampling]
    probabilities = torch.tensor([0.5, 0.3, 0.2, 0.0])
    torch.manual_seed(0)
    drawn = frequencies(InverseCDFSampling()(None, probabilities.log().expand(DRAWS, 4).clone()), 4)
    torch.testing.assert_close(drawn, probabilities, atol=0.012, rtol=0)
    one = torch.full((8, 4), -torch.inf)
    one[:, 2] = 3.0  # what top-k 1 leaves
    assert InverseCDFSampling()(None, one).argmax(-1).eq(2).all()
