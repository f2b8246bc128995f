"""Chat messages to prompt text with the model's chat template: text content parts, assistant tool calls
(their arguments as objects, the way Hugging Face templates read them), tool results, the tool definitions,
and `chat_template_kwargs` (e.g. enable_thinking)."""

from __future__ import annotations

import json

import msgspec

from .protocol import APIError, ChatMessage, Tool
from .serving import AppState, check_text_length

# Arguments the server itself gives the template; a request may not override them.
RESERVED = {"messages", "tools", "add_generation_prompt", "tokenize", "conversation", "documents", "return_dict"}


def _content(m: ChatMessage, index: int) -> str:
    if not isinstance(m.content, list):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError("only text content parts are supported", param=f"messages[{index}].content")
        parts.append(part["text"])
    return "".join(parts)


def template_message(m: ChatMessage, index: int) -> dict:
    out = {"role": m.role, "content": _content(m, index)}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        if m.role != "assistant":
            raise APIError("only assistant messages carry tool_calls", param=f"messages[{index}].tool_calls")
        calls = []
        for c in m.tool_calls:
            try:
                arguments = json.loads(c.function.arguments)
            except ValueError:
                raise APIError(f"tool call {c.id}: arguments are not valid JSON",
                               param=f"messages[{index}].tool_calls") from None
            calls.append({"id": c.id, "type": "function",
                          "function": {"name": c.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        if m.role != "tool":
            raise APIError("only tool messages carry tool_call_id", param=f"messages[{index}].tool_call_id")
        out["tool_call_id"] = m.tool_call_id
    if m.reasoning is not None:
        if m.role != "assistant":
            raise APIError("only assistant messages carry reasoning", param=f"messages[{index}].reasoning")
        out["reasoning_content"] = m.reasoning  # the name Qwen3's and DeepSeek's templates read
    return out


def render(app: AppState, messages: list[ChatMessage], tools: list[Tool] | None, add_generation_prompt: bool,
           chat_template_kwargs: dict | None) -> str:
    """The prompt text; raises APIError (400) when the request cannot be rendered."""
    tokenizer = app.tokenizer
    if tokenizer is None:
        raise APIError("this model has no tokenizer, so it cannot serve chat")
    if not messages:
        raise APIError("messages must not be empty", param="messages")
    dicts = [template_message(m, i) for i, m in enumerate(messages)]
    kwargs = dict(chat_template_kwargs or {})
    if clash := sorted(RESERVED & kwargs.keys()):
        raise APIError(f"chat_template_kwargs may not set {clash}", param="chat_template_kwargs")
    tool_dicts = [msgspec.to_builtins(t) for t in tools] if tools else None
    chars = sum(len(d["role"]) + len(d["content"]) for d in dicts) + len(json.dumps(tool_dicts or []))
    check_text_length(app, chars, "messages")
    try:
        text = tokenizer.apply_chat_template(dicts, tools=tool_dicts, add_generation_prompt=add_generation_prompt,
                                             tokenize=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - template errors are the request's fault
        raise APIError(f"could not apply the chat template: {e}", param="messages") from None
    if not isinstance(text, str):
        raise APIError("the chat template did not render text", param="messages")
    return text
