import math

import torch

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
