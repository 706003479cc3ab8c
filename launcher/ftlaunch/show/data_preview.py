"""`ftlaunch data preview`: one tokenized example as training sees it, the trained tokens
marked, and the token lengths of the whole set against --seq-len."""

from __future__ import annotations

from collections.abc import Iterator

from ftlaunch.data import tokenize
from ftlaunch.data.formats import PREFERENCE_KINDS, UNPAIRED_KINDS


def preview_lines(dataset, tokenizer, tokenized: list[tokenize.Tokenized], assistant_only: bool,
                  index: int, seq_len: int, show_tokens: bool, color: bool) -> Iterator[str]:
    """The lines `ftlaunch data preview` prints for example `index` of `dataset` (a
    data.read.Dataset) tokenized as `tokenized`. The last ones are notes from
    data.tokenize.check, which raises a UserError, after the rest is printed, when
    nothing could be trained."""
    stats = tokenize.length_stats(tokenized, seq_len)
    example = tokenized[index]
    source = dataset.path
    yield (f"{source}: {len(dataset)} examples, format {dataset.format} ({dataset.kind}); "
           f"loss on: {_loss_scope(dataset.kind, assistant_only)}")
    if example.rejected is not None:
        shown = [(" chosen", example), (" rejected", example.rejected)]
    elif example.label is not None:
        shown = [(" (desirable)" if example.label else " (undesirable)", example)]
    else:
        shown = [("", example)]
    for name, sequence in shown:
        yield (f"\nexample {index}{name}: {len(sequence.ids)} tokens, {sum(sequence.trained)} "
               "trained (marked [+ +]):\n")
        yield tokenize.render(tokenizer, sequence, seq_len, color=color)
        if show_tokens:
            yield "\n" + tokenize.token_table(tokenizer, sequence)
    yield (f"\ntokens per example{' (a pair: its longer sequence)' if example.rejected else ''}: shortest {stats.shortest}, median {stats.median}, "
           f"95th percentile {stats.p95}, longest {stats.longest}; "
           f"{stats.over_seq_len} longer than --seq-len {stats.seq_len}")
    for note in tokenize.check(stats, str(source)):
        yield f"note: {note}"


def _loss_scope(kind: str, assistant_only: bool) -> str:
    if kind == "conversational":
        return "assistant turns only" if assistant_only else "whole conversations"
    if kind in PREFERENCE_KINDS:
        return "the chosen and the rejected completion (DPO), not the prompt"
    if kind in UNPAIRED_KINDS:
        return "the completion, desirable or not (KTO), not the prompt"
    return "the completion only" if kind == "prompt_completion" else "all text"
