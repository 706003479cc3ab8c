"""Which template assistant-only training uses: chat_templates.choose's branches."""

from __future__ import annotations

import pytest

from ftlaunch.data import chat_templates
from ftlaunch.models.builtin import build_tokenizer
from ftlaunch.errors import UserError

# The shape of SmolLM2-Instruct's template: ChatML with a default system turn, no markers.
SMOL_STYLE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = [{"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4"}]


@pytest.fixture
def tokenizer():
    return build_tokenizer(512)


def test_a_plain_chatml_template_gets_markers_and_renders_the_same(tokenizer):
    tokenizer.chat_template = SMOL_STYLE
    template, source = chat_templates.choose(tokenizer)
    assert source.startswith("ChatML with generation markers")
    for prompt in (False, True):
        turns = CONVERSATION[:1] if prompt else CONVERSATION
        assert (tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt,
                                              chat_template=template)
                == tokenizer.apply_chat_template(turns, tokenize=False,
                                                 add_generation_prompt=prompt))
    # ...and the markers let the loss fall on the assistant's reply only.
    out = tokenizer.apply_chat_template(CONVERSATION, chat_template=template, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(trained) == "4<|im_end|>"


def test_a_chatml_lookalike_that_renders_differently_is_refused(tokenizer):
    tokenizer.chat_template = SMOL_STYLE.replace("'\n'}}{% endfor %}", "'\n\n'}}{% endfor %}")
    with pytest.raises(UserError, match="generation %} markers"):
        chat_templates.choose(tokenizer)


def test_own_markers_are_kept_and_no_template_gets_the_fallback(tokenizer):
    marked = chat_templates.chatml_template(None)
    tokenizer.chat_template = marked
    assert chat_templates.choose(tokenizer) == (marked, "the model's own (it marks assistant turns)")
    tokenizer.chat_template = None
    assert chat_templates.choose(tokenizer)[0] == chat_templates.FALLBACK


@pytest.mark.parametrize("template", [
    "{% generation %}x{% endgeneration %}", "{%- generation %}x", "{%- generation -%}x",
    "{%generation%}", "{% generations %}", "no markers at all", "{{ 'generation' }}",
])
def test_marker_test_agrees_with_trl(template):
    from trl.chat_template_utils import has_generation_markers

    assert chat_templates.has_generation_markers(template) == has_generation_markers(template)
