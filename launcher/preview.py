"""What the model will see: tokenized examples, which tokens carry the loss, lengths.

Used by `ftlaunch data preview` and by the launcher's preflight, which reports
empty and too-long examples before any worker starts. Tokenization follows
what TRL's SFTTrainer does with each data kind, so the counts are the ones
training sees: a conversation through the (training) chat template with its
assistant mask, a prompt/completion pair as prompt + completion + EOS with the
loss on the completion, plain text + EOS with the loss on all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftlaunch.errors import UserError


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    trained: list[bool]  # True where the token is a label (carries the loss)


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
    the recipe says data.assistant_only_loss: false)."""
    return kind == "conversational" and bool(data_options.get("assistant_only_loss", True))


def load_tokenizer(model_record: dict, assistant_only: bool):
    """The run's tokenizer, with the training chat template when the loss is on assistant
    turns; returns (tokenizer, where the template came from or None)."""
    from transformers import AutoTokenizer

    from ftlaunch import chat_templates

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_record["tokenizer"], trust_remote_code=bool(model_record.get("trust_remote_code")))
    except OSError as exc:
        raise UserError(f"Cannot load the tokenizer of {model_record['tokenizer']}: {exc}") from None
    return tokenizer, (chat_templates.apply(tokenizer) if assistant_only else None)


def tokenize_dataset(model_record: dict, dataset, data_options: dict, rows=None):
    """(tokenizer, [Tokenized] for `rows` (default: all of dataset), assistant_only)."""
    only_assistant = assistant_only(dataset.kind, data_options)
    tokenizer, _ = load_tokenizer(model_record, only_assistant)
    rows = dataset.rows if rows is None else rows
    return (tokenizer, [tokenize(tokenizer, row, dataset.kind, only_assistant, index)
                        for index, row in enumerate(rows)],
            only_assistant)


def tokenize(tokenizer, row: dict, kind: str, assistant_only: bool = True,
             index: int = 0) -> Tokenized:
    """One example exactly as training gets it: TRL's tokenization, as the launcher's data
    cache does it (EOS only where TRL adds one, the completion from where prompt and
    prompt + completion diverge)."""
    from ftlaunch.data_cache import tokenize_batch

    batch = {key: [value] for key, value in row.items()}
    out = tokenize_batch(batch, [index], tokenizer, kind, assistant_only, tokenizer.eos_token)
    return Tokenized(list(out["input_ids"][0]), [label != -100 for label in out["labels"][0]])


def length_stats(tokenized: list[Tokenized], seq_len: int) -> LengthStats:
    lengths = sorted(len(t.ids) for t in tokenized)
    n = len(lengths)
    return LengthStats(
        examples=n,
        shortest=lengths[0],
        median=lengths[n // 2],
        p95=lengths[min(n - 1, (95 * n) // 100)],
        longest=lengths[-1],
        over_seq_len=sum(1 for length in lengths if length > seq_len),
        untrained_after_truncation=sum(1 for t in tokenized if not any(t.trained[:seq_len])),
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
