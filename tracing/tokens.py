"""Tokenising prompts and finding the subject's tokens by character offsets.

Example::

    p = encode_prompt(lm.tokenizer, "The Eiffel Tower is located in", "Eiffel Tower")
    p.tokens[p.subject_start:p.subject_end]     # ['ĠE', 'iff', 'el', 'ĠTower']

Offsets make the search robust to leading spaces (a subject mid-sentence owns
the space before it), to BOS tokens (special tokens have empty spans) and to
subjects that occur more than once (``occurrence`` picks which, default the
first).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncodedPrompt:
    """A tokenised prompt and the half-open token range of its subject."""

    text: str
    ids: tuple[int, ...]  # (tokens,)
    tokens: tuple[str, ...]  # readable token strings, same length as ids
    subject_start: int
    subject_end: int  # exclusive

    @property
    def subject_range(self) -> tuple[int, int]:
        return (self.subject_start, self.subject_end)

    @property
    def last_subject_token(self) -> int:
        return self.subject_end - 1

    def __len__(self) -> int:
        return len(self.ids)


def find_occurrence(text: str, subject: str, occurrence: int = 0) -> int:
    """Character index of the ``occurrence``-th appearance of ``subject`` in ``text``."""
    start = -1
    for _ in range(occurrence + 1):
        start = text.find(subject, start + 1)
        if start < 0:
            break
    if start < 0:
        count = text.count(subject)
        if count == 0:
            raise ValueError(
                f"The subject {subject!r} does not appear in the prompt {text!r}. "
                "Use the subject exactly as written in the prompt (case and spelling matter)."
            )
        raise ValueError(
            f"The subject {subject!r} appears {count} time(s) in the prompt; occurrence {occurrence} "
            f"does not exist (occurrences count from 0)."
        )
    return start


def check_context(max_length: int | None, n_tokens: int, what: str = "The prompt", fix: str = "Shorten it.") -> None:
    """A ValueError before any forward pass when ``n_tokens`` exceed the model's context ``max_length``.

    Models with learned positions (GPT-2) index out of range past their
    context, which on CUDA is a device-side assert that poisons the process,
    so every entry point checks first.
    """
    if max_length is not None and n_tokens > max_length:
        raise ValueError(f"{what} is {n_tokens} tokens long; this model takes at most {max_length}. {fix}")


def readable_tokens(tokenizer, ids) -> tuple[str, ...]:
    """Each token id as the text it stands for (spaces kept), for labels and JSON."""
    return tuple(tokenizer.decode([i]) for i in ids)


def encode_prompt(
    tokenizer,
    prompt: str,
    subject: str,
    *,
    occurrence: int = 0,
    max_length: int | None = None,
) -> EncodedPrompt:
    """Tokenise ``prompt`` and locate ``subject`` in it (the tokens overlapping its characters)."""
    if not prompt or not prompt.strip():
        raise ValueError("The prompt is empty. Enter a sentence to complete, e.g. 'The Eiffel Tower is located in the city of'.")
    if not subject or not subject.strip():
        raise ValueError("The subject is empty. Enter the part of the prompt the fact is about, e.g. 'The Eiffel Tower'.")
    subject = subject.strip()
    char_start = find_occurrence(prompt, subject, occurrence)
    char_end = char_start + len(subject)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("Subject location needs a fast (Rust) tokenizer with offset mappings; load the model's fast tokenizer.")
    enc = tokenizer(prompt, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    check_context(max_length, len(ids), fix="Shorten the prompt.")
    special = set(getattr(tokenizer, "all_special_ids", []))
    covered = [
        i
        for i, (a, b) in enumerate(enc["offset_mapping"])
        if b > a and a < char_end and b > char_start and ids[i] not in special
    ]
    if not covered:
        raise ValueError(f"The subject {subject!r} maps to no tokens of the prompt.")
    return EncodedPrompt(
        text=prompt,
        ids=tuple(ids),
        tokens=readable_tokens(tokenizer, ids),
        subject_start=covered[0],
        subject_end=covered[-1] + 1,
    )


def continuation_ids(tokenizer, prompt: str, continuation: str) -> list[int]:
    """Token ids of ``continuation`` as the model would see it right after ``prompt``.

    A continuation without leading whitespace gets one space (prompts end without
    one), so "Paris" and " Paris" both mean the token " Paris". Tokenising the
    prompt and continuation together keeps tokenizers that merge across the
    boundary or prepend word markers honest.
    """
    if continuation is None or not continuation.strip():
        raise ValueError("The answer/target is empty. Enter the words that should follow the prompt, e.g. 'Paris'.")
    text = continuation
    if not text[0].isspace() and prompt and not prompt[-1].isspace():
        text = " " + text
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
    if whole[: len(head)] == head and len(whole) > len(head):
        ids = whole[len(head):]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"The answer {continuation!r} tokenizes to nothing; enter at least one visible character.")
    return list(ids)
