"""A word-level CLIP tokenizer for the shapes captions: every caption word is one token.

`CLIPTokenizer` is byte-pair encoding, so "one token per word" needs merges that rebuild each word from its
characters. They are learned here the way BPE is trained (most frequent adjacent pair first, until every word is
one symbol); applying merges in the learned order reproduces the training segmentation, and `build_tokenizer`
checks that it does for every word.
"""

from __future__ import annotations

from collections import Counter

MODEL_MAX_LENGTH = 16  # <|startoftext|> + at most 8 caption words + <|endoftext|>, padded


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    symbols = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges = []
    while True:
        pairs = Counter(p for s in symbols.values() for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties broken by the pair itself: deterministic
        merges.append(best)
        for word, s in symbols.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            symbols[word] = tuple(out)


def build_tokenizer(words: list[str]):
    """A `CLIPTokenizer` whose vocabulary is the special tokens, the characters, every intermediate merge and
    every word of `words`; pads with <|endoftext|> like SD's tokenizer."""
    from transformers import CLIPTokenizer

    merges = learn_merges(words)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in words:
        for c in list(w[:-1]) + [w[-1] + "</w>"]:
            vocab.setdefault(c, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges),
                              model_max_length=MODEL_MAX_LENGTH, pad_token="<|endoftext|>")
    for w in words:
        got = tokenizer.tokenize(w)
        if got != [w + "</w>"]:
            raise AssertionError(f"tokenizer splits {w!r} into {got}")
    return tokenizer
