"""Which chat template a run trains with, so that loss masking is right.

Assistant-only loss needs `{% generation %}` markers in the template (that is
how `apply_chat_template(..., return_assistant_tokens_mask=True)` knows which
tokens the assistant wrote). In order of preference:

  1. the model's own template, when it has the markers;
  2. TRL's training version of the model's template (TRL ships marked copies of
     the common families: Llama 3, Qwen, Gemma, Phi-3, ...);
  3. for a plain ChatML template TRL does not know (SmolLM2, ...): the same ChatML
     with markers, used only if it renders every probe conversation exactly as the
     model's own template does;
  4. for a base model without any template: FALLBACK, a plain-text template whose
     assistant turns end with the tokenizer's EOS, a token a base model already
     has an embedding for (adding new special tokens would need the embeddings
     trained too, which LoRA does not do).

A model whose template has no markers and that TRL does not know gets a clear
error instead of silently training on the user's turns.
"""

from __future__ import annotations

import re

from ftlaunch.errors import UserError

FALLBACK = (
    "{%- if bos_token %}{{ bos_token }}{% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ '### System:\n' + message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Assistant:\n' }}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}{{ '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\n' }}{%- endif -%}"
)


def has_generation_markers(template: str) -> bool:
    """trl.chat_template_utils.has_generation_markers's test (whitespace-trim variants
    included), without importing trl for it."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def choose(tokenizer) -> tuple[str, str]:
    """(template, where it came from) for assistant-only training with this tokenizer."""
    own = tokenizer.chat_template
    if isinstance(own, dict):
        own = own.get("default")
    if not own:
        return FALLBACK, "ftlaunch fallback (the model has no chat template)"
    if has_generation_markers(own):
        return own, "the model's own (it marks assistant turns)"
    # Only now: importing trl costs the launcher ~2 s.
    from trl.chat_template_utils import get_training_chat_template

    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        patched = None
    if patched:
        return patched, "TRL's training version of the model's template"
    chatml = _marked_chatml(tokenizer, own)
    if chatml:
        return chatml, "ChatML with generation markers (renders as the model's own)"
    raise UserError(
        "The model's chat template does not mark which tokens the assistant wrote "
        "({% generation %} markers) and TRL has no training version of it, so the loss "
        "cannot be limited to the assistant's replies. Either train on whole conversations "
        "with --set data.assistant_only_loss=false, or give the tokenizer a chat template "
        "with {% generation %}...{% endgeneration %} around assistant content."
    )


def chatml_template(default_system: str | None) -> str:
    """ChatML with `{% generation %}` around assistant turns, rendering the same text as
    the ChatML templates models ship with (optionally with their default system turn)."""
    default = ""
    if default_system:
        literal = default_system.replace("\\", "\\\\").replace("'", "\\'")
        default = ("{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\\n" + literal + "<|im_end|>\\n' }}{% endif %}")
    return (
        "{% for message in messages %}" + default +
        "{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def _marked_chatml(tokenizer, own: str) -> str | None:
    """chatml_template for a plain ChatML `own` template, if it renders the probe
    conversations (with and without a generation prompt) exactly as `own` does."""
    from ftlaunch.data import demo as demo_data

    if "<|im_start|>" not in own:
        return None
    head = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                         chat_template=own).split("<|im_start|>user")[0]
    default_system = None
    if head.startswith("<|im_start|>system\n") and head.endswith("<|im_end|>\n"):
        default_system = head[len("<|im_start|>system\n"):-len("<|im_end|>\n")]
    candidate = chatml_template(default_system)
    for row in demo_data.examples(8):
        for prompt_only in (False, True):
            turns = row["messages"][:-1] if prompt_only else row["messages"]
            kwargs = {"tokenize": False, "add_generation_prompt": prompt_only}
            if (tokenizer.apply_chat_template(turns, chat_template=candidate, **kwargs)
                    != tokenizer.apply_chat_template(turns, chat_template=own, **kwargs)):
                return None
    return candidate


def apply(tokenizer) -> str:
    """Set the training template on the tokenizer (it is saved with the adapter, so
    generation uses the same format); returns where it came from."""
    template, source = choose(tokenizer)
    tokenizer.chat_template = template
    return source
