"""Turns token-level progress into user-facing outputs: detokenization, stop strings,
logprobs, and grouping of the n completions of one prompt."""
from __future__ import annotations

from dataclasses import dataclass, field

from ember.engine.model_runner import StepResult
from ember.engine.request import Request
from ember.engine.scheduler import Scheduler
from ember.layers.sampler import RowLogprobs
from ember.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput


@dataclass
class _Completion:
    request: Request
    detokenizer: object | None   # ember.detokenizer.IncrementalDetokenizer
    text: str = ""
    num_seen: int = 0            # output tokens already detokenized (and their logprobs kept)


@dataclass
class RequestGroup:
    """One user request: a prompt and its n sampled completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    final_only: bool = False   # emit one RequestOutput, when it finishes (offline generate)
    completions: list[_Completion] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.request.finished for c in self.completions)


class OutputProcessor:
    def __init__(self, tokenizer, scheduler: Scheduler) -> None:
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.groups: dict[str, RequestGroup] = {}
        self._group_of: dict[str, RequestGroup] = {}   # child request id -> group

    def add(self, group_id: str, prompt: str | None, requests: list[Request],
            final_only: bool = False) -> None:
        group = RequestGroup(group_id, prompt, list(requests[0].prompt_token_ids), final_only)
        for r in requests:
            detok = None
            if self.tokenizer is not None:
                from ember.detokenizer import IncrementalDetokenizer
                detok = IncrementalDetokenizer(self.tokenizer, r.prompt_token_ids,
                                               skip_special_tokens=r.params.skip_special_tokens)
            group.completions.append(_Completion(r, detok))
            self._group_of[r.request_id] = group
        self.groups[group_id] = group

    def abort(self, group_id: str) -> RequestOutput | None:
        group = self.groups.get(group_id)
        if group is None:
            return None
        for c in group.completions:
            self.scheduler.finish(c.request, "abort")
        return self._emit(group)

    def process(self, touched: list[Request], result: StepResult) -> list[RequestOutput]:
        groups: dict[str, RequestGroup] = {}
        for rid, rows in result.prompt_logprobs.items():
            group = self._group_of[rid]
            req = next(c.request for c in group.completions if c.request.request_id == rid)
            req.prompt_logprobs.extend(self._position_logprobs(row) for row in rows)
        for req in touched:
            group = self._group_of[req.request_id]
            comp = next(c for c in group.completions if c.request is req)
            new = req.num_output_tokens - comp.num_seen   # a speculative step may add several
            lps = result.logprobs.get(req.request_id)
            if lps is not None and req.logprobs is not None:
                for lp in lps[:new]:
                    req.logprobs.append(self._position_logprobs(lp))
                    req.cumulative_logprob += lp.logprob
            self._detokenize(comp, new)
            groups[group.request_id] = group
        # Building an output copies every token so far: per step for all, that is quadratic.
        return [self._emit(g) for g in groups.values() if not g.final_only or g.finished]

    # ---- helpers --------------------------------------------------------------------------
    def _detokenize(self, comp: _Completion, new: int) -> None:
        """Detokenize the new tokens one by one, so a stop string ends the output at the
        token that completed it even when a speculative step added several."""
        req = comp.request
        first = req.num_tokens - new
        comp.num_seen += new
        if comp.detokenizer is None:
            return
        for i in range(first, first + new):
            last = i == first + new - 1
            if self._detokenize_one(comp, req.token_ids[i], last) and not last:
                # Drop the tokens generated after the stop string.
                self.scheduler.truncate(req, i + 1)
                comp.num_seen = req.num_output_tokens
                if req.logprobs is not None:
                    req.cumulative_logprob = sum(
                        d[t].logprob for d, t in zip(req.logprobs, req.output_token_ids))
                return

    def _detokenize_one(self, comp: _Completion, token: int, last: bool) -> bool:
        """Append one token's text; True when a stop string ended the request here."""
        req = comp.request
        before = len(comp.text)
        comp.text += comp.detokenizer.append([token])
        if req.finished and last:
            comp.text += comp.detokenizer.flush()
        stops = req.params.stop
        if not stops:
            return False
        # A stop string can straddle the previous text and the new delta.
        search_from = max(0, before - max(len(s) for s in stops) + 1)
        best = None
        for s in stops:
            j = comp.text.find(s, search_from)
            if j != -1 and (best is None or j < best[0]):
                best = (j, s)
        if best is None:
            return False
        j, s = best
        comp.text = comp.text[: j + len(s) if req.params.include_stop_str_in_output else j]
        if req.finished:
            # The scheduler ended it on a later token of the same step (length, EOS);
            # plain decoding would have stopped here first.
            req.finish("stop", s)
        else:
            self.scheduler.finish(req, "stop", s)
        return True

    def _visible_text(self, comp: _Completion) -> str:
        """While running, hold back a tail that could still become a stop string."""
        stops = comp.request.params.stop
        if comp.request.finished or not stops:
            return comp.text
        hold = max(len(s) for s in stops) - 1
        return comp.text[: len(comp.text) - hold] if hold else comp.text

    def _position_logprobs(self, row: RowLogprobs) -> PositionLogprobs:
        d: PositionLogprobs = {}
        for tok, lp in zip(row.top_token_ids, row.top_logprobs):
            d[tok] = Logprob(lp, None, self._decode_one(tok))
        for rank, tok in enumerate(row.top_token_ids, start=1):
            d[tok].rank = rank
        d[row.token_id] = Logprob(row.logprob, row.rank, self._decode_one(row.token_id))
        return d

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _emit(self, group: RequestGroup) -> RequestOutput:
        first = group.completions[0].request
        outputs = [
            CompletionOutput(
                index=i, text=self._visible_text(c), token_ids=c.request.output_token_ids,
                cumulative_logprob=c.request.cumulative_logprob if c.request.logprobs is not None else None,
                logprobs=list(c.request.logprobs) if c.request.logprobs is not None else None,
                finish_reason=c.request.finish_reason, stop_reason=c.request.stop_reason)
            for i, c in enumerate(group.completions)
        ]
        finished = group.finished
        out = RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs,
                            finished, first.prompt_logprobs,
                            num_cached_tokens=first.num_cached_tokens or 0,
                            metrics=self._metrics(group))
        if finished:
            del self.groups[group.request_id]
            for c in group.completions:
                self._group_of.pop(c.request.request_id, None)
        return out

    @staticmethod
    def _metrics(group: RequestGroup) -> dict[str, float]:
        r = group.completions[0].request
        m = {"arrival_time": r.arrival_time}
        if r.first_token_time is not None:
            m["first_token_time"] = r.first_token_time
        return m
