"""Prompt-lookup proposer (ngram): guess that the text repeats what followed the last match.

For a request's tokens t[0..L), take the last n tokens (n from prompt_lookup_max down to
prompt_lookup_min), find the latest earlier place where they occurred, and propose the tokens
that followed it. Code edits, document rewrites and agents quoting their context repeat long
spans, so these guesses are often right and cost no model call (CopySpec, prompt lookup decoding).

Each request keeps an index n-gram -> position after its latest occurrence, extended with the
tokens appended since the last call (tokens are only ever appended), so a lookup is a dict hit
rather than a scan of the whole context.
"""

from __future__ import annotations

from fuselm.core.request import Request


class _Index:
    __slots__ = ("request", "follow", "upto")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.follow: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self.upto = 0  # n-grams ending before this index are in `follow`


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max
        self._indexes: dict[int, _Index] = {}  # id(request) -> its index

    def propose(self, request: Request, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the request's longest matching suffix."""
        tokens = request.all_token_ids
        length = len(tokens)
        index = self._indexes.get(id(request))
        if index is None or index.request is not request:
            index = self._indexes[id(request)] = _Index(request)
        follow = index.follow
        # Index every n-gram that ends before the last token (the suffix itself has no continuation yet).
        for end in range(index.upto, length - 1):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                follow[tuple(tokens[end + 1 - n:end + 1])] = end + 1
        index.upto = max(index.upto, length - 1)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            start = follow.get(tuple(tokens[length - n:]))
            if start is not None:
                return tokens[start:start + k]
        return []

    def release_finished(self) -> None:
        """Drop the indexes of finished requests."""
        for key in [key for key, ix in self._indexes.items() if ix.request.is_finished]:
            del self._indexes[key]
