"""POST /v1/completions: prompts (text, token ids, or lists of either) in, text choices out."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from .generation import ChoiceResult, Delta
from .protocol import APIError, CompletionRequest, logit_bias_of, sampling_params
from .serving import (
    AppState,
    Endpoint,
    check_model,
    check_token_ids,
    completion_logprobs,
    decode,
    encode_text,
    read_body,
    resolve_max_tokens,
    serve_choices,
)
from .structured import check, from_structured_outputs

ENDPOINT = Endpoint("cmpl", "text_completion", "text_completion")


class CompletionView:
    def __init__(self, app: AppState, body: CompletionRequest, prompt_ids: list[int]):
        self.app, self.body, self.prompt_ids = app, body, prompt_ids
        self.offset = 0  # text offset of the next streamed token, for logprobs

    def _prompt_text(self) -> str:
        return self.app.tokenizer.decode(self.prompt_ids) if self.app.tokenizer else ""

    def opening(self) -> dict | None:
        if not self.body.echo:
            return None
        return {"text": self._prompt_text(), "logprobs": None, "finish_reason": None}

    def chunk(self, d: Delta) -> list[dict]:
        if not d.text and not d.finish_reason:
            return []
        logprobs = None
        if self.body.logprobs is not None and d.logprobs:
            logprobs = completion_logprobs(self.app, d.token_ids, d.logprobs, self.offset)
        self.offset += len(d.text)
        return [{"text": d.text, "logprobs": logprobs, "finish_reason": d.finish_reason}]

    def final(self, r: ChoiceResult) -> dict:
        text, logprobs = r.text, None
        if self.body.logprobs is not None:
            ids, entries = r.token_ids, r.logprobs
            if self.body.echo:
                ids, entries = self.prompt_ids + ids, (r.prompt_logprobs or [None] * len(self.prompt_ids)) + entries
            logprobs = completion_logprobs(self.app, ids, entries, 0)
        if self.body.echo:
            text = self._prompt_text() + text
        return {"text": text, "logprobs": logprobs, "finish_reason": r.finish_reason}


def prompts_of(app: AppState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [encode_text(app, prompt)]
    if not prompt:
        raise APIError("prompt is empty", param="prompt")
    if all(isinstance(x, str) for x in prompt):
        return [encode_text(app, x) for x in prompt]
    if all(isinstance(x, list) for x in prompt):
        return [check_token_ids(app, x) for x in prompt]
    return [check_token_ids(app, prompt)]


async def completions(request: Request) -> Response:
    app: AppState = request.app.state.halffull
    body = decode(await read_body(request, app.config), CompletionRequest)
    check_model(app, body.model)
    if body.suffix:
        raise APIError("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError("best_of is not supported (other than equal to n)", param="best_of")
    if body.echo and body.stream and body.logprobs is not None:
        raise APIError("echo with logprobs is supported only without streaming", param="echo")
    prompts = prompts_of(app, body.prompt)
    if len(prompts) * body.n > 256:
        raise APIError("at most 256 prompts times n per request", param="prompt")
    constraint = None
    if body.structured_outputs:
        constraint = from_structured_outputs(body.structured_outputs)
        check(constraint, app.config.structured_outputs_backend, "structured_outputs", body.ignore_eos,
              body.min_tokens)
    bias = logit_bias_of(body, app.config.vocab_size)
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None

    def params_of(prompt_len: int):
        return sampling_params(body, resolve_max_tokens(app, prompt_len, body.max_tokens), body.logprobs,
                               prompt_logprobs, structured_outputs=constraint, logit_bias=bias)
    return await serve_choices(request, app, ENDPOINT, body, prompts, params_of,
                               lambda i: CompletionView(app, body, prompts[i // body.n]))
