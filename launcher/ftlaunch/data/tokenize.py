"""What the model will see: tokenized examples, which tokens carry the loss, lengths.

Used by `ftlaunch data preview` and by the launcher's preflight, which reports
empty and too-long examples before any worker starts. Tokenization follows
what TRL's SFTTrainer does with each data kind, so the counts are the ones
training sees: a conversation through the (training) chat template with its
assistant mask, a prompt/completion pair as prompt + completion + EOS with the
loss on the completion, plain text + EOS with the loss on all of it. Preference pairs
are tokenized as DPOTrainer does, unpaired examples as KTOTrainer does
(data/preference.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from pathlib import Path

from ftlaunch.data.formats import CHAT_KINDS, PREFERENCE_DATA_KINDS
from ftlaunch.errors import UserError
from ftlaunch.models.source import ModelSource


BATCH = 256  # rows per call into the tokenizer


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    trained: list[bool]  # True where the token is a label (carries the loss)
    # A preference pair: this is prompt + chosen, `rejected` is prompt + rejected.
    rejected: "Tokenized | None" = None
    label: bool | None = None  # an unpaired example: desirable (True) or not (KTO)

    @property
    def length(self) -> int:
        """Its tokens; a pair's longer sequence (the one truncation cuts first)."""
        return max(len(self.ids), len(self.rejected.ids) if self.rejected else 0)


@dataclass(frozen=True)
class LengthStats:
    examples: int
    shortest: int
    median: int
    p95: int
    longest: int
    over_seq_len: int  # truncated to seq_len (by packing or by the collator)
    untrained_after_truncation: int  # no trained token left within seq_len
    seq_len: int


def assistant_only(kind: str, data_options: dict) -> bool:
    """Whether the loss is limited to the assistant's turns (conversational data, unless
    the recipe says data.assistant_only_loss: false): the training chat template
    (chat_templates.apply) renders them. Chat preference pairs need no marks (the answer
    starts where prompt and prompt + answer diverge): the model's own template."""
    return kind == "conversational" and bool(data_options.get("assistant_only_loss", True))


def load_tokenizer(model: ModelSource, assistant_only: bool, kind: str | None = None):
    """The run's tokenizer, with the training chat template when the loss is on assistant
    turns; returns (tokenizer, where the template came from or None). Chat data of
    another `kind` (preference pairs) gets ftlaunch's fallback template only when the
    model has none."""
    from ftlaunch.data import chat_templates

    if _built_here(model):
        # The class ftlaunch built it as, and the one AutoTokenizer resolves it to, without
        # importing torch and the model's config to find that out (seconds of every start).
        from transformers import PreTrainedTokenizerFast as loader
    else:
        from transformers import AutoTokenizer as loader
    try:
        tokenizer = loader.from_pretrained(
            model.tokenizer, trust_remote_code=model.trust_remote_code)
    except OSError as exc:
        raise UserError(f"Cannot load the tokenizer of {model.tokenizer}: {exc}") from None
    if assistant_only:
        return tokenizer, chat_templates.apply(tokenizer)
    if kind in CHAT_KINDS and not tokenizer.chat_template:
        tokenizer.chat_template = chat_templates.FALLBACK
        return tokenizer, "ftlaunch fallback (the model has no chat template)"
    return tokenizer, None


def _built_here(model: ModelSource) -> bool:
    """The tokenizer is ftlaunch's own (builtin_models.build_tokenizer): a built-in preset's,
    its adapter's copy, or the one a --random-init model borrows from `tiny`."""
    from ftlaunch.models import builtin as builtin_models
    from ftlaunch.models import presets as models

    if model.is_builtin:
        return True
    return Path(model.tokenizer) == builtin_models.builtin_path(models.resolve("tiny"))


NO_TEMPLATE = "none"  # data that no chat template renders


def template_digest(model: ModelSource, kind: str, data_options: dict) -> str | None:
    """A digest of the chat template that renders conversational data (the training one
    chat_templates chose): what a resume compares, since another template trains other
    tokens. NO_TEMPLATE for other data; None when it cannot be known yet (a dry run
    before a built-in model's tokenizer is built)."""
    import hashlib
    import json

    path = Path(model.tokenizer)
    if kind not in CHAT_KINDS:
        return NO_TEMPLATE
    if path.is_absolute() and not path.exists():
        return None
    tokenizer, _ = load_tokenizer(model, assistant_only(kind, data_options), kind)
    template = tokenizer.chat_template
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenize_dataset(model: ModelSource, dataset, data_options: dict, rows=None):
    """(tokenizer, [Tokenized] for `rows` (default: all of dataset), assistant_only)."""
    only_assistant = assistant_only(dataset.kind, data_options)
    tokenizer, _ = load_tokenizer(model, only_assistant, dataset.kind)
    check_tokenizer(tokenizer, dataset.kind)
    rows = list(dataset.rows if rows is None else rows)
    tokenized = []
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        batch = {key: [row[key] for row in chunk] for key in chunk[0]}
        indices = list(range(start, start + len(chunk)))
        if dataset.kind in PREFERENCE_DATA_KINDS:
            tokenized += _preferences(tokenizer, batch, indices, dataset.kind)
            continue
        out = tokenize_batch(batch, indices, tokenizer, dataset.kind, only_assistant)
        tokenized += [Tokenized(list(ids), [label != -100 for label in labels])
                      for ids, labels in zip(out["input_ids"], out["labels"])]
    return tokenizer, tokenized, only_assistant


def _preferences(tokenizer, batch: dict, indices: list[int], kind: str) -> list[Tokenized]:
    from ftlaunch.data import preference

    out = preference.tokenize_batch(batch, indices, tokenizer, kind)
    columns = preference.columns(kind)
    examples = []
    for row in zip(*(out[name] for name in columns)):
        example = dict(zip(columns, row))
        sequences = preference.sequences(example)
        if "completion" in sequences:
            examples.append(Tokenized(*sequences["completion"], label=example["label"]))
        else:
            examples.append(Tokenized(*sequences["chosen"],
                                      rejected=Tokenized(*sequences["rejected"])))
    return examples


def tokenize(tokenizer, row: dict, kind: str, assistant_only: bool = True) -> Tokenized:
    """One example exactly as training gets it (tokenize_batch)."""
    check_tokenizer(tokenizer, kind)
    out = tokenize_batch({key: [value] for key, value in row.items()}, [0], tokenizer, kind,
                         assistant_only)
    return Tokenized(list(out["input_ids"][0]), [label != -100 for label in out["labels"][0]])


def check_tokenizer(tokenizer, kind: str) -> None:
    """What tokenize_batch needs of the tokenizer for this kind of data."""
    if kind in CHAT_KINDS and not tokenizer.chat_template:
        raise UserError(
            "The model's tokenizer has no chat template, so conversations cannot be rendered. "
            "Use data.assistant_only_loss: true (ftlaunch then supplies a template) or "
            "give the tokenizer a chat template.")
    if kind not in CHAT_KINDS and tokenizer.eos_token is None:
        raise UserError(
            "The model's tokenizer has no EOS token, which training appends to every text and "
            "completion so the model learns to stop. Use a tokenizer that defines one.")


def tokenize_batch(batch: dict, indices: list[int], tokenizer, kind: str,
                   only_assistant: bool) -> dict:
    """TRL 1.16's tokenize_fn and build_labels (SFTTrainer._prepare_dataset) for a batch
    of rows ({column: [values]}): input_ids, labels, and per example its length and first
    trained index. Batched because one call into the Rust tokenizer for many texts is
    much faster than one per text, and gives the same ids. The launcher's data cache and
    `ftlaunch data preview` both tokenize through it; check_tokenizer first."""
    eos = tokenizer.eos_token
    masks = None
    if kind == "conversational":
        # Conversational data gets no EOS from TRL: the template ends each turn.
        out = tokenizer.apply_chat_template(batch["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=only_assistant)
        ids = [list(x) for x in out["input_ids"]]
        if only_assistant:
            masks = [list(m) for m in out["assistant_masks"]]
            for index, mask in zip(indices, masks):
                if 1 not in mask:  # TRL raises a RuntimeError for this example
                    raise UserError(
                        f"Example {index + 1} has no assistant token under the chat template's "
                        "{% generation %} markers, so assistant-only loss has nothing to "
                        "train on. Fix the example or set data.assistant_only_loss: false.")
    elif kind == "prompt_completion":
        completions = [c if c.endswith(eos) else c + eos for c in batch["completion"]]
        prompt_ids = tokenizer(text=batch["prompt"])["input_ids"]
        ids = tokenizer(text=[p + c for p, c in zip(batch["prompt"], completions)])["input_ids"]
        # Where prompt and prompt + completion diverge, not len(prompt): tokens can merge
        # across the boundary (trl.data_utils.common_prefix_length).
        masks = []
        for prompt, full in zip(prompt_ids, ids):
            start = common_prefix_length(prompt, full)
            masks.append([0] * start + [1] * (len(full) - start))
    else:
        texts = [t if t.endswith(eos) else t + eos for t in batch["text"]]
        ids = tokenizer(text=texts)["input_ids"]

    if masks is None:
        labels = [list(x) for x in ids]
    else:  # zip, not strict: TRL's build_labels stops at the shorter one too
        labels = [[token if bit else -100 for token, bit in zip(row, mask)]
                  for row, mask in zip(ids, masks)]
    first = [next((i for i, label in enumerate(row) if label != -100), -1) for row in labels]
    return {"input_ids": ids, "labels": labels, "_length": [len(row) for row in ids],
            "_first_trained": first}


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """trl.data_utils.common_prefix_length, without importing TRL (seconds) for it."""
    length = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        length += 1
    return length


def length_stats(tokenized: list[Tokenized], seq_len: int) -> LengthStats:
    return stats_from_lengths([t.length for t in tokenized],
                              [t.trained.index(True) if True in t.trained else -1
                               for t in tokenized], seq_len)


def stats_from_lengths(lengths: list[int], first_trained: list[int], seq_len: int) -> LengthStats:
    """From each example's token count and index of its first trained token (-1: none).
    Truncation keeps the start, so an example trains only if that index is within seq_len."""
    ordered = sorted(lengths)
    n = len(ordered)
    return LengthStats(
        examples=n,
        shortest=ordered[0],
        median=ordered[n // 2],
        p95=ordered[min(n - 1, (95 * n) // 100)],
        longest=ordered[-1],
        over_seq_len=sum(1 for length in ordered if length > seq_len),
        untrained_after_truncation=sum(1 for first in first_trained
                                       if first < 0 or first >= seq_len),
        seq_len=seq_len,
    )


def check(stats: LengthStats, source: str) -> list[str]:
    """Warnings worth a line before training; raises when nothing could be trained."""
    if stats.untrained_after_truncation == stats.examples:
        raise UserError(
            f"{source}: no example has a trained token within --seq-len {stats.seq_len} "
            f"(examples are {stats.shortest}-{stats.longest} tokens; the loss-bearing part "
            "comes after the cut). Raise --seq-len or shorten the examples."
        )
    notes = []
    if stats.over_seq_len:
        notes.append(f"{stats.over_seq_len} of {stats.examples} examples are longer than "
                     f"--seq-len {stats.seq_len} tokens (longest {stats.longest}) and will be "
                     "truncated")
    if stats.untrained_after_truncation:
        notes.append(f"{stats.untrained_after_truncation} examples have no trained token "
                     f"within {stats.seq_len} tokens and contribute nothing")
    return notes


def render(tokenizer, tokenized: Tokenized, seq_len: int, color: bool = False) -> str:
    """One example as text, trained spans marked: [+ ... +] (or green on a terminal),
    masked spans plain; a cut at seq_len is shown."""
    out: list[str] = []
    span: list[int] = []
    state = None

    def flush():
        if not span:
            return
        text = tokenizer.decode(span)
        if state:
            out.append(f"\033[32m{text}\033[0m" if color else f"[+{text}+]")
        else:
            out.append(text)

    for index, (token, trained) in enumerate(zip(tokenized.ids, tokenized.trained)):
        if index == seq_len:
            flush()
            span, state = [], None
            out.append(f"\n<<< cut at --seq-len {seq_len}: the rest is dropped >>>\n")
        if trained != state:
            flush()
            span, state = [], trained
        span.append(token)
    flush()
    return "".join(out)


def token_table(tokenizer, tokenized: Tokenized, limit: int = 64) -> str:
    rows = []
    for token, trained in list(zip(tokenized.ids, tokenized.trained))[:limit]:
        rows.append(f"{token:>7}  {'train' if trained else 'mask ':5}  {tokenizer.decode([token])!r}")
    more = len(tokenized.ids) - limit
    if more > 0:
        rows.append(f"... {more} more tokens")
    return "\n".join(rows)
