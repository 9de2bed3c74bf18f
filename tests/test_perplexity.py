import math
from types import SimpleNamespace

import pytest
import torch

from omniquant.errors import UserError
from omniquant.perplexity import perplexity


def test_protocol_equals_exp_of_hf_loss(tiny):
    model, _ = tiny
    torch.manual_seed(0)
    seqlen, n = 32, 3
    tokens = torch.randint(0, model.config.vocab_size, (1, seqlen * n + 7))  # tail is dropped
    res = perplexity(model, tokens, seqlen=seqlen, progress=False)
    assert res.windows == res.total_windows == n
    with torch.no_grad():
        losses = [
            model(w, labels=w).loss.item() for w in tokens[0, : n * seqlen].reshape(n, 1, seqlen)
        ]
    assert math.isclose(res.ppl, math.exp(sum(losses) / n), rel_tol=1e-5)
    one = perplexity(model, tokens, seqlen=seqlen, max_windows=1, progress=False)
    assert one.windows == 1 and one.total_windows == n
    assert math.isclose(one.ppl, math.exp(losses[0]), rel_tol=1e-5)


class _Fixed(torch.nn.Module):
    """Logits that favour token 0 by ``margin`` (NaN: NaN logits) whatever the input."""

    def __init__(self, margin: float, vocab: int = 8):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # perplexity() reads the device from it
        self.margin, self.vocab = margin, vocab

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab)
        logits[..., 0] = self.margin
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("seqlen, max_windows, message", [
    (8, -1, "max_windows=-1"), (8, 0, "max_windows=0"), (1, None, "seqlen=1"), (-5, None, "seqlen=-5"),
    (64, None, "40 tokens are fewer than one window of seqlen=64"),
])
def test_impossible_protocols_are_user_errors(seqlen, max_windows, message):
    with pytest.raises(UserError, match=message):
        perplexity(_Fixed(0.0), torch.ones(1, 40, dtype=torch.long), seqlen, max_windows, progress=False)


@pytest.mark.parametrize("margin, expected", [(math.nan, math.nan), (1e4, math.inf)])
def test_a_diverged_model_is_reported_as_it_is(margin, expected):
    res = perplexity(_Fixed(margin), torch.ones(1, 40, dtype=torch.long), 8, progress=False)  # targets never 0
    assert res.windows == 5 and (math.isnan(res.ppl) if math.isnan(expected) else res.ppl == expected)
