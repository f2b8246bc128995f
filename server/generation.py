"""One choice of one request, from submission to its last text delta: incremental detokenization,
stop strings (which abort the request on its worker), logprobs, timing for the metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.messages import SLO, SamplingParams, TopLogprobs

from .middleware import current_request_id
from .protocol import APIError

log = logging.getLogger("server.requests")


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[TopLogprobs] | None
    finish_reason: str | None = None


@dataclass
class ChoiceResult:
    """Everything a non-streaming response needs about one choice."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0


class Choice:
    def __init__(self, app_state, prompt_ids: list[int], params: SamplingParams, priority: int, slo: SLO):
        self.app = app_state
        self.prompt_ids, self.params, self.priority, self.slo = prompt_ids, params, priority, slo
        self.result = ChoiceResult()
        self.detok = IncrementalDetokenizer(app_state.tokenizer, prompt_ids, params.skip_special_tokens, params.stop)
        self.state = None
        self.http_request_id = current_request_id()

    async def start(self) -> None:
        self.started = time.monotonic()
        self.state = await self.app.client.submit(self.prompt_ids, self.params, self.priority, self.slo,
                                                  id_prefix=self.http_request_id)

    async def deltas(self):
        """Yield Deltas until the choice finishes; raise APIError if the engine refused or lost it."""
        first = None
        queue_s, preemptions = None, 0
        error = None
        try:
            while True:
                out = await self.state.outputs.get()
                if out.error:
                    error = out.error
                    raise APIError(out.error, status=out.status or 500,
                                   type="invalid_request_error" if out.status == 400 else "server_error")
                if out.timings is not None:
                    queue_s, preemptions = out.timings.queue_s, out.timings.num_preemptions
                if out.prompt_logprobs is not None:
                    self.result.prompt_logprobs = out.prompt_logprobs
                self.result.num_cached_tokens = out.num_cached_tokens
                if out.new_token_ids and first is None:
                    first = time.monotonic()
                finish = out.finish_reason
                text = self.detok.push(out.new_token_ids, final=finish is not None)
                if self.detok.stopped and finish is None:
                    finish = "stop"
                    await self.app.client.abort(self.state)
                r = self.result
                r.text += text
                r.token_ids += out.new_token_ids
                if out.logprobs:
                    r.logprobs += out.logprobs
                if finish is not None:
                    r.finish_reason = finish
                    self.app.metrics.record(len(self.prompt_ids), len(r.token_ids), finish, self.started, first,
                                            time.monotonic(), queue_s, preemptions)
                yield Delta(text, out.new_token_ids, out.logprobs, finish)
                if finish is not None:
                    return
        finally:
            self.log_finished(first, preemptions, error)
            await self.abort()  # the client went away mid-stream; a no-op once finished

    def log_finished(self, first: float | None, preemptions: int, error: str | None) -> None:
        """One line per finished choice: what the request id, the response's id and the engine's id share."""
        r = self.result
        reason = r.finish_reason or ("error" if error else "abort")  # abort: the client went away
        ttft = "-" if first is None else f"{(first - self.started) * 1e3:.1f}ms"
        log.info("request %s finished: engine id %s, worker %d, prompt %d tokens (%d cached), output %d tokens, "
                 "ttft %s, e2e %.1fms, finish %s, preemptions %d%s", self.http_request_id, self.state.request_id,
                 self.state.worker_id, len(self.prompt_ids), r.num_cached_tokens, len(r.token_ids), ttft,
                 (time.monotonic() - self.started) * 1e3, reason, preemptions, f", error: {error}" if error else "")

    async def abort(self) -> None:
        if self.state is not None:
            await self.app.client.abort(self.state)

    async def run(self) -> ChoiceResult:
        async for _ in self.deltas():
            pass
        return self.result
