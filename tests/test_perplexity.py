import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from omniquant.arch import FAMILIES
from omniquant.errors import UserError
from omniquant.logits import CHUNK_BYTES, nll_sum
from omniquant.models.tiny import tiny_model
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
    assert math.isclose(res.ppl, math.exp(sum(losses) / n), rel_tol=1e-6)
    one = perplexity(model, tokens, seqlen=seqlen, max_windows=1, progress=False)
    assert one.windows == 1 and one.total_windows == n
    assert math.isclose(one.ppl, math.exp(losses[0]), rel_tol=1e-6)


@pytest.mark.parametrize("family, overrides", [(a.family, {}) for a in FAMILIES]
                         + [("gemma3_text", {"final_logit_softcapping": 0.05})])
def test_chunked_loss_equals_the_loss_over_the_whole_window(family, overrides):
    model, _ = tiny_model(family, **overrides)
    ids = torch.randint(3, model.config.vocab_size, (1, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
        whole = F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        if overrides:  # the cap changes the loss: the chunks apply it too
            raw = F.cross_entropy(model.lm_head(model.base_model(ids).last_hidden_state)[0, :-1], ids[0, 1:],
                                  reduction="sum").item()
            assert not math.isclose(raw, whole, rel_tol=1e-3)
        per_position = 4 * model.config.vocab_size
        for chunk_bytes in (per_position, 5 * per_position, CHUNK_BYTES):  # 1, 5, all 32 positions per chunk
            assert math.isclose(nll_sum(model, ids, chunk_bytes), whole, rel_tol=1e-6)


class _Fixed(torch.nn.Module):
    """Logits that favour token 0 by ``margin`` (NaN: NaN logits) whatever the input."""

    def __init__(self, margin: float, vocab: int = 8):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # perplexity() reads the device from it
        self.margin, self.config = margin, SimpleNamespace(vocab_size=vocab)

    def base_model(self, input_ids):
        return SimpleNamespace(last_hidden_state=torch.zeros(*input_ids.shape, 1))

    def get_output_embeddings(self):
        def head(hidden):
            logits = torch.zeros(*hidden.shape[:-1], self.config.vocab_size)
            logits[..., 0] = self.margin
            return logits
        return head


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
