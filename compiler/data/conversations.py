"""Conversations and chat templates.

Every conversational record (OpenAI `messages`, ChatGLM `conversations`, ShareGPT `from`/`value`)
and every single-turn record rendered through a chat template becomes one list of
`{"role", "content"}` messages. Chat templates are jinja2, rendered in an immutable sandbox the
way `transformers` renders `apply_chat_template` (trim_blocks, lstrip_blocks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from compiler.data.templating import TemplateError
from runtime.contract.paths import templates_dir

BUILTIN_CHAT_TEMPLATES = ("chatml", "llama3", "llama2", "chatglm3", "alpaca")
ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "function_call": "assistant", "observation": "tool", "tool": "tool"}
# Special tokens the built-in templates print, for tokenizers that do not define them.
_DEFAULT_TOKENS = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama2": {"bos_token": "<s>", "eos_token": "</s>"},
}


class ConversationError(Exception):
    """A record that is not a well-formed conversation; the message says what is wrong."""


def builtin_chat_source(name: str) -> str:
    return (templates_dir() / "chat" / f"{name}.jinja").read_text(encoding="utf-8")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str
    bos_token: str
    eos_token: str

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
        try:
            return env.from_string(self.source).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template \"{self.name}\" failed: {exc}") from None


def chat_template(name: str, tokenizer_source: str | None, bos: str | None, eos: str | None) -> ChatTemplate:
    """A named built-in template, or the tokenizer's own (`name == "tokenizer"`)."""
    defaults = _DEFAULT_TOKENS.get(name, {})
    bos = bos or defaults.get("bos_token", "")
    eos = eos or defaults.get("eos_token", "")
    if name == "tokenizer":
        if not tokenizer_source:
            raise TemplateError('the tokenizer has no chat template; name a built-in one such as chat = "chatml"')
        return ChatTemplate("tokenizer", tokenizer_source, bos, eos)
    return ChatTemplate(name, builtin_chat_source(name), bos, eos)


def conversation(fields: dict[str, Any], fmt: str, system: str | None) -> list[dict[str, str]]:
    """The row as messages, with `system` prepended when the row has no system message."""
    if fmt == "openai-chat":
        messages = _messages(fields["messages"], "role", "content", None)
    elif fmt == "chatglm-chat":
        messages = _messages(fields["conversations"], "role", "content", {"observation": "tool"})
    elif fmt == "sharegpt":
        messages = _messages(fields["conversations"], "from", "value", _SHAREGPT_ROLES)
    elif fmt == "instruction":
        user = str(fields["instruction"]) + (f"\n\n{fields['input']}" if fields.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(fields["output"])}]
    elif fmt in ("completion", "scored"):
        messages = [{"role": "user", "content": str(fields["user_input"])},
                    {"role": "assistant", "content": str(fields["completion"])}]
    elif fmt == "prompt":
        messages = [{"role": "user", "content": str(fields["user_input"])}]
    elif fmt == "preference":
        messages = [{"role": "user", "content": str(fields["prompt"])},
                    {"role": "assistant", "content": str(fields["chosen"])}]
    else:
        raise ConversationError(f"format \"{fmt}\" has no roles to build a conversation from")
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def _messages(value: Any, role_key: str, content_key: str, roles: dict[str, str] | None) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ConversationError("the conversation must be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ConversationError(f"message {i} is {type(message).__name__}, not an object")
        if role_key not in message or content_key not in message:
            raise ConversationError(f"message {i} needs \"{role_key}\" and \"{content_key}\"")
        role = message[role_key]
        role = roles.get(role, role) if roles else role
        if role not in ROLES:
            raise ConversationError(f"message {i} has role {json.dumps(message[role_key])}; roles are {', '.join(ROLES)}")
        content = message[content_key]
        if not isinstance(content, str):
            raise ConversationError(f"message {i} content is {type(content).__name__}, not a string")
        entry = {"role": role, "content": content}
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        out.append(entry)
    if not any(m["role"] == "assistant" for m in out):
        raise ConversationError("the conversation has no assistant message to learn from")
    return out


def segments(template: ChatTemplate, messages: list[dict[str, str]], loss: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, supervised) pieces.

    Each assistant turn's text is the difference between rendering the conversation through that
    turn and rendering it up to the turn with a generation prompt, so the supervised pieces are
    exactly what the model would be asked to generate."""
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    out: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[: i + 1])
        if not before.startswith(done) or not through.startswith(before):
            raise TemplateError(f"chat template \"{template.name}\" renders a conversation's prefix differently "
                                "from the conversation; assistant turns cannot be located")
        supervised = loss == "all" or loss == "assistant" or (loss == "last_assistant" and i == last_assistant)
        out.append((before[len(done):], loss == "all"))
        out.append((through[len(before):], supervised))
        done = through
    rest = template.render(messages)[len(done):]
    if rest:
        out.append((rest, loss == "all"))
    return [(text, sup) for text, sup in out if text]
