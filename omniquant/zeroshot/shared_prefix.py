"""lm-eval's ``HFLM`` scoring the choices of a multiple-choice question over one shared context.

Stock ``HFLM`` runs the context once per choice (context + choice, padded into a batch): on HellaSwag
that is four copies of a ~70-token context for ~20-token endings. Here the requests that share their
context tokens are scored as one group (of one request, too): the context (less its last token) runs
once through the model's body, filling the KV cache, and the choices run as one batch over copies of
that cache. The LM head is applied only at the continuations' positions, one request at a time
(:mod:`omniquant.logits`), so a large vocabulary never holds a padded batch of logits. Every activation
quantizer here works per token, so the scores are the stock ones up to float rounding; one-token
contexts and contexts too long for the model take the stock path.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from omniquant.logits import head, hidden_states

Request = tuple[tuple[str, str], list[int], list[int]]


class SharedPrefixLM(HFLM):
    """``HFLM`` whose loglikelihood requests with a common context share the context's forward pass."""

    def _shareable(self, group: list[Request]) -> bool:
        context = group[0][1]
        return len(context) > 1 and all(len(context) + len(cont) <= self.max_length + 1 for _, _, cont in group)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, context, _) in enumerate(requests):
            groups[tuple(context)].append(i)
        shared = [idx for idx in groups.values() if self._shareable([requests[i] for i in idx])]
        in_groups = {i for idx in shared for i in idx}
        rest = [i for i in range(len(requests)) if i not in in_groups]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if rest:
            stock = super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm, override_bs)
            for i, answer in zip(rest, stock, strict=True):
                results[i] = answer
        # contexts of one length batch without padding: up to batch_size groups per forward pass
        by_length: dict[int, list[list[int]]] = defaultdict(list)
        for idx in shared:
            by_length[len(requests[idx[0]][1])].append(idx)
        batches = [chunk[k:k + self.batch_size] for _, chunk in sorted(by_length.items(), reverse=True)
                   for k in range(0, len(chunk), self.batch_size)]
        bar = tqdm(total=len(in_groups), disable=disable_tqdm or self.rank != 0,
                   desc="Running loglikelihood requests (shared contexts)")
        for batch in batches:
            flat = [i for idx in batch for i in idx]
            for i, answer in zip(flat, self._score_groups([[requests[i] for i in idx] for idx in batch]), strict=True):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(1)
        bar.close()
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score_groups(self, groups: list[list[Request]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) for each request of ``groups``, in order;
        the requests of a group share one context and all contexts have one length."""
        contexts = torch.tensor([group[0][1] for group in groups], dtype=torch.long, device=self.device)
        cache = hidden_states(self.model, contexts[:, :-1], use_cache=True).past_key_values
        rows = [(g, cont) for g, group in enumerate(groups) for _, _, cont in group]
        answers: list[tuple[float, bool] | None] = [None] * len(rows)
        # continuations of similar length batch together (less padding), each over its own copy of the cache
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))
        for k in range(0, len(order), self.batch_size):
            chunk = order[k:k + self.batch_size]
            owners = torch.tensor([rows[r][0] for r in chunk], dtype=torch.long, device=self.device)
            past = copy.deepcopy(cache)
            past.reorder_cache(owners)
            # each row: its context's last token, then the continuation less its last token; right padding is
            # never attended to by the causal rows before it, so no attention mask is needed
            tokens = torch.zeros(len(chunk), len(rows[chunk[0]][1]), dtype=torch.long, device=self.device)
            for i, r in enumerate(chunk):
                g, cont = rows[r]
                tokens[i, :len(cont)] = torch.tensor([groups[g][0][1][-1], *cont[:-1]], dtype=torch.long)
            hidden = hidden_states(self.model, tokens, past_key_values=past, use_cache=True).last_hidden_state
            for i, r in enumerate(chunk):
                cont = rows[r][1]
                lp = F.log_softmax(head(self.model, hidden[i, :len(cont)]), dim=-1, dtype=self.softmax_dtype)
                target = torch.tensor(cont, dtype=torch.long, device=self.device)
                greedy = bool((lp.argmax(dim=-1) == target).all())
                answers[r] = (float(lp.gather(1, target[:, None]).sum()), greedy)
        return answers  # type: ignore[return-value]
