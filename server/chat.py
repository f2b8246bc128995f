"""POST /v1/chat/completions: messages rendered with the chat template (chat_template), then each choice's
text split into reasoning (reasoning), content and tool calls (tool_parsers), streaming or not."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from .chat_template import render
from .generation import ChoiceResult, Delta
from .protocol import APIError, ChatCompletionRequest, NamedToolChoice, logit_bias_of, sampling_params
from .reasoning import END, REASONING_PARSERS, ReasoningParser, ReasoningStream
from .serving import (
    AppState,
    Endpoint,
    chat_logprobs,
    check_model,
    decode,
    read_body,
    resolve_max_tokens,
    serve_choices,
)
from .structured import check, for_tools, from_response_format, from_structured_outputs, named_tool
from .tool_parsers import KEEPS_SPECIAL_TOKENS, TOOL_CALL_PARSERS, Parser, ToolCallStream, extract, named, required

ENDPOINT = Endpoint("chatcmpl", "chat.completion", "chat.completion.chunk")


class ChatView:
    """One choice: its text through the reasoning split, then the tool-call parser, into message fields."""

    def __init__(self, app: AppState, logprobs: bool, reasoning: ReasoningParser | None, thinking: bool,
                 tool_parser: Parser | None, max_calls: int | None):
        self.app, self.logprobs = app, logprobs
        self.reasoning, self.thinking = reasoning, thinking
        self.tool_parser, self.max_calls = tool_parser, max_calls
        self.reasoning_stream = ReasoningStream(reasoning, thinking) if reasoning else None
        self.tool_stream = ToolCallStream(tool_parser, max_calls) if tool_parser else None

    @staticmethod
    def _finish(reason: str | None, called: bool) -> str | None:
        return "tool_calls" if called and reason == "stop" else reason

    def opening(self) -> dict | None:
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def chunk(self, d: Delta) -> list[dict]:
        final = d.finish_reason is not None
        delta, content = {}, d.text
        if self.reasoning_stream:
            thought, content = self.reasoning_stream.push(content, final)
            if thought:
                delta["reasoning"] = thought
        calls = []
        if self.tool_stream:
            content, calls = self.tool_stream.push(content, final)
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        if not delta and not final:
            return []
        lp = chat_logprobs(self.app, d.token_ids, d.logprobs) if self.logprobs and d.logprobs else None
        called = self.tool_stream is not None and self.tool_stream.called
        return [{"delta": delta, "logprobs": lp, "finish_reason": self._finish(d.finish_reason, called)}]

    def final(self, r: ChoiceResult) -> dict:
        message: dict = {"role": "assistant"}
        content = r.text
        if self.reasoning:
            thought, content = self.reasoning.split(content, self.thinking, True)
            message["reasoning"] = thought or None
        calls = []
        if self.tool_parser:
            content, calls = extract(self.tool_parser, content, self.max_calls)
        message["content"] = content if content.strip() or not calls else None
        if calls:
            message["tool_calls"] = calls
        return {"message": message,
                "logprobs": chat_logprobs(self.app, r.token_ids, r.logprobs) if self.logprobs else None,
                "finish_reason": self._finish(r.finish_reason, bool(calls))}


def tool_mode(app: AppState, body: ChatCompletionRequest):
    """The request's tool choice, checked: None (no tools), "none", "auto", "required" or a NamedToolChoice."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError("tool_choice needs tools", param="tool_choice")
        return None
    choice = choice or "auto"  # OpenAI's default once tools are given
    if choice == "auto" and not (app.config.enable_auto_tool_choice and app.config.tool_call_parser):
        raise APIError('tool_choice "auto" needs the server started with --enable-auto-tool-choice and '
                       '--tool-call-parser; or send tool_choice "required", "none" or a named function',
                       param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        named_tool(body.tools, choice)  # 400 if it names no tool
    return choice


async def chat_completions(request: Request) -> Response:
    app: AppState = request.app.state.halffull
    body = decode(await read_body(request, app.config), ChatCompletionRequest)
    check_model(app, body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    tools = tool_mode(app, body)
    prompt_text = render(app, body.messages, body.tools, body.add_generation_prompt, body.chat_template_kwargs)
    prompt = app.tokenizer.encode(prompt_text, add_special_tokens=False)

    sources = {"response_format": from_response_format(body.response_format) if body.response_format else None,
               "structured_outputs": from_structured_outputs(body.structured_outputs)
               if body.structured_outputs else None,
               "tool_choice": for_tools(body.tools, tools, body.parallel_tool_calls) if body.tools else None}
    given = [k for k, c in sources.items() if c is not None]
    if len(given) > 1:
        raise APIError(f"give one of response_format, structured_outputs and a tool_choice that forces a call "
                       f"(required or a named function); got {given}", param=given[1])
    constraint = sources[given[0]] if given else None
    if constraint is not None:
        check(constraint, app.config.structured_outputs_backend, given[0], body.ignore_eos, body.min_tokens)
    reasoning = REASONING_PARSERS.get(app.config.reasoning_parser)
    if constraint is not None and reasoning is not None and reasoning.expects_thinking(prompt_text):
        # The constraint is on the answer: it starts once the thinking block is closed.
        constraint = msgspec.structs.replace(constraint,
                                             start_after=app.tokenizer.encode(END, add_special_tokens=False))

    max_calls = None if body.parallel_tool_calls else 1
    tool_parser, skip_special = None, body.skip_special_tokens
    if isinstance(tools, NamedToolChoice):
        tool_parser = named(tools.function.name)
    elif tools == "required":
        tool_parser = required
    elif tools == "auto":
        tool_parser = TOOL_CALL_PARSERS[app.config.tool_call_parser]
        skip_special = skip_special and app.config.tool_call_parser not in KEEPS_SPECIAL_TOKENS
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    bias = logit_bias_of(body, app.config.vocab_size)

    def params_of(prompt_len: int):
        return sampling_params(body, resolve_max_tokens(app, prompt_len, requested), logprobs,
                               structured_outputs=constraint, logit_bias=bias, skip_special_tokens=skip_special)
    thinking = reasoning.thinking_at_start(prompt_text) if reasoning else False
    return await serve_choices(request, app, ENDPOINT, body, [prompt], params_of,
                               lambda i: ChatView(app, body.logprobs, reasoning, thinking, tool_parser, max_calls))
