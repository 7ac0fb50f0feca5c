"""Talk to a build's model: streaming replies, history, and a few commands.

    recipe chat BUILD_DIR                    interactive (a terminal), or one turn per stdin line
    recipe chat BUILD_DIR --prompt "Hi"      one turn, then exit

The model is the build's trained `model/`, or, before training, the weights the first stage starts
from (so a compiled recipe of a pretrained model can be tried at once). Turns are rendered with
exactly the template of training: the chat template for chat data, or the prompt template with the
message as its one input field. Commands start with ':' (`:help` lists them); `:conf` values are
parsed as Python literals and never evaluated.
"""

from __future__ import annotations

import ast
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

GENERATION_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 256, "do_sample": False, "temperature": 0.7, "top_p": 0.9, "top_k": 50,
    "repetition_penalty": 1.0,
}
_TYPES = {"max_new_tokens": int, "do_sample": bool, "temperature": float, "top_p": float, "top_k": int,
          "repetition_penalty": float}
_MARK = "\u2063END\u2063"  # an invisible separator: cannot collide with a real reply
HELP = """commands:
  :help               this list
  :clear              forget the conversation so far
  :history            show the conversation so far
  :seed N             seed the sampler (replies repeat for the same seed and history)
  :conf key=value     set a generation setting ({keys}); values are literals: 0.2, 64, True
  :reset-conf         back to the default settings
  :exit               leave (also Ctrl-D)"""


class ChatError(Exception):
    """A build that cannot be chatted with; the message says why."""


class ContextFull(Exception):
    """The rendered conversation leaves no room in the model's context for a reply."""


@dataclass
class Session:
    """The conversation state the commands act on, separate from the model so it can be tested."""

    conf: dict[str, Any] = field(default_factory=lambda: dict(GENERATION_DEFAULTS))
    history: list[dict[str, str]] = field(default_factory=list)
    seed: int | None = None

    def command(self, line: str) -> tuple[str, bool]:
        """Run a ':' command; returns (what to print, whether to exit)."""
        name, _, rest = line[1:].strip().partition(" ")
        rest = rest.strip()
        if name in ("exit", "quit", "q"):
            return "", True
        if name == "help":
            return HELP.format(keys=", ".join(_TYPES)), False
        if name == "clear":
            self.history.clear()
            return "(history cleared)", False
        if name == "history":
            if not self.history:
                return "(no history)", False
            return "\n".join(f"{m['role']}: {m['content']}" for m in self.history), False
        if name == "seed":
            try:
                self.seed = int(rest)
            except ValueError:
                return f"error: :seed takes an integer, got {rest!r}", False
            return f"(seed {self.seed})", False
        if name == "reset-conf":
            self.conf = dict(GENERATION_DEFAULTS)
            return "(settings reset)", False
        if name == "conf":
            return self._set(rest), False
        return f"error: unknown command :{name} (try :help)", False

    def _set(self, assignment: str) -> str:
        if not assignment:
            return "\n".join(f"{k} = {v!r}" for k, v in sorted(self.conf.items()))
        key, eq, raw = assignment.partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or key not in _TYPES:
            return f"error: use :conf key=value with key one of {', '.join(_TYPES)}"
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return f"error: {raw!r} is not a literal (numbers, True/False); nothing was evaluated"
        expected = _TYPES[key]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            return f"error: {key} takes a {expected.__name__}, got {raw!r}"
        if expected in (int, float) and value < 0:
            return f"error: {key} must not be negative"
        self.conf[key] = value
        return f"({key} = {value!r})"


class Chat:
    """A loaded model, tokenizer and template, replying to a Session."""

    def __init__(self, build_dir: Path):
        import torch
        from transformers import PreTrainedTokenizerFast

        from runtime.contract.config import IncompatibleBuildError, load_runtime_config
        from runtime.contract.layout import MODEL_DIR
        from runtime.core.model import ModelLoadError
        from runtime.core.outputs import starting_model
        from runtime.evaluate import load_trained

        try:
            self.config = config = load_runtime_config(build_dir)
        except IncompatibleBuildError as exc:
            raise ChatError(str(exc)) from None
        self.template = config.data[config.stages[-1].data].template
        model_dir = build_dir / MODEL_DIR
        try:
            if model_dir.is_dir():
                self.model = load_trained(config, build_dir, model_dir)
                self.source = str(model_dir)
            else:
                stage = config.stages[0]
                self.model = starting_model(config, build_dir, stage).eval()
                self.source = f"{build_dir} (untrained: the weights stage {stage.name!r} starts from)"
        except ModelLoadError as exc:
            raise ChatError(str(exc)) from None
        if config.tokenizer.file is None:
            raise ChatError(f"{build_dir} has no tokenizer file (the recipe's tokenizer was not available at compile)")
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(build_dir / config.tokenizer.file),
                                                 eos_token=config.tokenizer.eos_token,
                                                 pad_token=config.tokenizer.pad_token)
        if self.template.chat is not None:
            self.tokenizer.chat_template = self.template.chat
        self.stop_ids = sorted({i for i in (config.model.eos_token_id, self._end_of_turn()) if i is not None})
        self.torch = torch

    def _end_of_turn(self) -> int | None:
        """The token a chat template puts right after an assistant reply (e.g. <|im_end|>)."""
        if self.template.chat is None:
            return None
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}], tokenize=False)
        after = text.split(_MARK, 1)[1] if _MARK in text else ""
        ids = self.tokenizer.encode(after, add_special_tokens=False) if after.strip() else []
        return ids[0] if ids else None

    def render(self, history: list[dict[str, str]]) -> str:
        if self.template.chat is not None:
            messages = list(history)
            if self.template.system and not any(m["role"] == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": self.template.system})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        from jinja2 import StrictUndefined, meta
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
        fields = sorted(meta.find_undeclared_variables(env.parse(self.template.prompt)))
        if len(fields) != 1:
            raise ChatError(f"the prompt template has fields {fields}; chat fills exactly one with your message")
        return env.from_string(self.template.prompt).render({fields[0]: history[-1]["content"]})

    def reply(self, session: Session, out: TextIO) -> str:
        """Generate the next assistant turn for `session.history`, streaming it to `out`."""
        from transformers import TextStreamer

        torch = self.torch
        prompt = self.render(session.history)
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        conf = dict(session.conf)
        room = self.config.model.n_positions - ids["input_ids"].shape[1]
        if room <= 0:
            raise ContextFull(f"error: the conversation is {ids['input_ids'].shape[1]} tokens, the model's context "
                              f"is {self.config.model.n_positions}; :clear to start over")
        conf["max_new_tokens"] = min(conf["max_new_tokens"], room)
        if not conf["do_sample"]:
            for key in ("temperature", "top_p", "top_k"):
                conf.pop(key)
        if session.seed is not None:
            torch.manual_seed(session.seed)

        class _Stream(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                out.write(text)
                out.flush()

        streamer = _Stream(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            generated = self.model.generate(**ids, **conf, streamer=streamer, eos_token_id=self.stop_ids,
                                            pad_token_id=self.config.model.pad_token_id)
        out.write("\n")
        new = generated[0, ids["input_ids"].shape[1]:].tolist()
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()


def turn(chat: Chat, session: Session, text: str, out: TextIO) -> None:
    """One user message: append it, reply, and keep the reply (chat templates only keep history)."""
    session.history.append({"role": "user", "content": text})
    try:
        answer = chat.reply(session, out)
    except ContextFull as exc:
        session.history.pop()
        out.write(f"{exc}\n")
        return
    if chat.template.chat is None:
        session.history.clear()  # a prompt template sees one message at a time
    else:
        session.history.append({"role": "assistant", "content": answer})


def run(build_dir: Path, prompt: str | None, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    chat = Chat(build_dir)
    session = Session()
    if prompt is not None:
        turn(chat, session, prompt, out)
        return 0
    interactive = stdin.isatty()
    if interactive:
        importlib.import_module("readline")  # line editing and arrow-key history at the prompt
        out.write(f"chatting with {chat.source}; :help for commands, :exit to leave\n")
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:  # Ctrl-D
                out.write("\n")
                return 0
        else:
            line = stdin.readline()
            if not line:  # end of input
                return 0
            line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith(":"):
            message, leave = session.command(line)
            if message:
                out.write(message + "\n")
            if leave:
                return 0
            continue
        turn(chat, session, line, out)
