"""Built-in chat templates against the tokenizer's own `apply_chat_template`."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from compiler.data.conversations import BUILTIN_CHAT_TEMPLATES, chat_template, conversation, segments
from compiler.data.tokenizer import gguf_encoder, gguf_tokenizer_folder
from runtime.contract.assets import load_catalog

SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4."}],
    [{"role": "user", "content": "Hi! Help me with Python?"}, {"role": "assistant", "content": "Sure."},
     {"role": "user", "content": "Reverse a list?\nI tried `x.reverse`."},
     {"role": "assistant", "content": "Use `x[::-1]` 🎉"}],
    [{"role": "user", "content": "  leading and trailing spaces  "}, {"role": "assistant", "content": "\nok\n"}],
]


@pytest.fixture(scope="module")
def smollm2():
    spec = load_catalog()["smollm2-135m-instruct-gguf"]
    return gguf_encoder(spec), AutoTokenizer.from_pretrained(gguf_tokenizer_folder(spec))


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["system", "multi-turn", "whitespace"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_builtin_chatml_equals_smollm2_apply_chat_template_byte_for_byte(smollm2, messages, generation_prompt):
    encoder, tokenizer = smollm2
    ours = chat_template("chatml", None, encoder.bos_token, encoder.eos_token)
    # SmolLM2's template adds its default system message when a conversation has none; the
    # recipe's template.system does the same for the built-in template.
    with_system = conversation({"messages": messages}, "openai-chat", SMOLLM2_DEFAULT_SYSTEM)
    rendered = ours.render(with_system, add_generation_prompt=generation_prompt)
    theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert rendered.encode() == theirs.encode()


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["system", "multi-turn", "whitespace"])
def test_tokenizer_template_pieces_join_to_the_ids_transformers_gives(smollm2, messages):
    encoder, tokenizer = smollm2
    template = chat_template("tokenizer", encoder.chat_template, encoder.bos_token, encoder.eos_token)
    pieces = segments(template, conversation({"messages": messages}, "openai-chat", None), "assistant")
    ids = [i for text, _ in pieces for i in encoder.encode_batch([text])[0]]
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    supervised = "".join(text for text, sup in pieces if sup)
    assert supervised == "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")


@pytest.mark.parametrize("name", BUILTIN_CHAT_TEMPLATES)
def test_every_builtin_template_locates_assistant_turns(name):
    template = chat_template(name, None, None, None)
    messages = conversation({"messages": CONVERSATIONS[1]}, "openai-chat", "Be kind.")
    pieces = segments(template, messages, "assistant")
    assert "".join(text for text, _ in pieces) == template.render(messages)
    supervised = [text for text, sup in pieces if sup]
    assert len(supervised) == 2
    assert "Sure." in supervised[0] and "x[::-1]" in supervised[1]
    assert not any("Reverse a list" in text for text in supervised)
