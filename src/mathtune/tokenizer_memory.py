"""A loaded tokenizer's memory: free the Python copies it was built from and never reads again."""

from __future__ import annotations

from mathtune.speedups.memory import release_free_heap

CONSTRUCTION_COPIES = ("_vocab", "_merges")  # what transformers' fast tokenizers are built from


def drop_construction_copies(tokenizer) -> list[str]:
    """Free the Python copies of the vocabulary and merges a fast tokenizer was built from; returns their names.

    transformers 5 keeps them for the tokenizer's life, although its Rust object holds its own: for
    Gemma 3's 262,144 words and 514,906 merges, a large share of the tokenizer's memory, resident
    through training. A copy goes only where no method of the tokenizer's classes but __init__
    reads it (Whisper's save_vocabulary reads both, so Whisper keeps them). The heap the Rust
    parser left free goes back to the system too.
    """
    read_later = _attributes_read(type(tokenizer))
    dropped = [name for name in CONSTRUCTION_COPIES if name in vars(tokenizer) and name not in read_later]
    for name in dropped:
        delattr(tokenizer, name)
    release_free_heap()
    return dropped


def _attributes_read(cls: type) -> set[str]:
    """Every name the methods of a class and its bases (their __init__ aside) look up, nested code included."""
    names: set[str] = set()
    codes = [getattr(getattr(member, "fget", getattr(member, "__func__", member)), "__code__", None)
             for klass in cls.__mro__ for attribute, member in vars(klass).items() if attribute != "__init__"]
    while codes:
        code = codes.pop()
        if code is not None:
            names.update(code.co_names)
            codes.extend(const for const in code.co_consts if hasattr(const, "co_names"))
    return names
