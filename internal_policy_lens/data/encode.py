"""Turn the inputs of ``entropy_table`` into token ids: token lists, strings or chat records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple


class Encoded(NamedTuple):
    """One input sequence.

    ``response_start`` is the index of the first response token, or None when the input has no
    prompt/response split.
    """

    sample_id: Any
    input_ids: list[int]
    response_start: int | None


def encode_inputs(tokenizer, inputs: Sequence) -> list[Encoded]:
    """Encode a list of token-id lists, strings or records.

    - token-id lists are used exactly as given;
    - strings are tokenized as given (the tokenizer's special tokens, e.g. BOS, are added;
      no chat template);
    - :class:`Encoded` items are used as they are;
    - records (mappings) carry ``prompt`` (a string or a list of chat messages) and optionally
      ``response`` (a string) and ``sample_id``; see :func:`encode_record`.

    Sample ids are the records' ``sample_id`` when given, else the position in ``inputs``.
    """
    if isinstance(inputs, (str, Mapping)):
        inputs = [inputs]
    out = []
    for index, item in enumerate(inputs):
        if isinstance(item, Encoded):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(encode_record(tokenizer, item, index))
        elif isinstance(item, str):
            out.append(Encoded(index, list(tokenizer(item)["input_ids"]), None))
        elif isinstance(item, Sequence) and all(isinstance(t, int) for t in item):
            out.append(Encoded(index, list(item), None))
        else:
            raise TypeError(
                f"input {index} is a {type(item).__name__}; pass token-id lists, strings or "
                "records with 'prompt' (and 'response')"
            )
        if not out[-1].input_ids:
            raise ValueError(f"input {index} encodes to no tokens")
    return out


def unknown_tokens(tokenizer, encoded: Sequence[Encoded]) -> tuple[int, int]:
    """(unknown tokens, sequences holding one) in ``encoded``: characters the vocabulary lacks.

    A tokenizer without an unknown token (byte-level BPE) has none.
    """
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:
        return 0, 0
    counts = [e.input_ids.count(unknown) for e in encoded]
    return sum(counts), sum(count > 0 for count in counts)


def prompt_text(tokenizer, prompt: str | Sequence[Mapping[str, str]]) -> str:
    """Render a prompt for generation.

    With a chat template, the messages are rendered with the generation prompt appended. Without
    one, the message contents are joined by blank lines and followed by a newline.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages) + "\n"


def encode_prompt(tokenizer, prompt: str | Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a rendered prompt (see :func:`prompt_text`)."""
    text = prompt_text(tokenizer, prompt)
    # A chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS).
    with_special = not getattr(tokenizer, "chat_template", None)
    return list(tokenizer(text, add_special_tokens=with_special)["input_ids"])


def encode_record(tokenizer, record: Mapping, index: int) -> Encoded:
    """Encode a ``{"prompt": ..., "response": ...}`` record; the response follows the prompt."""
    if "prompt" not in record:
        raise ValueError(f"record {index} has no 'prompt' field")
    prompt_ids = encode_prompt(tokenizer, record["prompt"])
    response = record.get("response")
    sample_id = record.get("sample_id", index)
    if response is None:
        return Encoded(sample_id, prompt_ids, None)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return Encoded(sample_id, prompt_ids + response_ids, len(prompt_ids))
