"""A radix tree of the prompts recently routed to one replica: the router's guess at its prefix cache.

The router never sees a replica's KV blocks, only the prompts it sent there. A replica keeps the
KV of recent prompts in its prefix cache (LRU), so the longest prefix a new prompt shares with the
prompts recently sent to a replica is a good estimate of the prompt tokens that replica would
find cached (SGLang's cache-aware router does the same). Keys are prompt text, not token ids: the
router carries no tokenizer, and equal text prefixes tokenise to (almost) equal token prefixes.

Each edge holds a string; a node remembers when a prompt last passed through it. When the tree
holds more than `max_chars` characters, the least recently used leaves are cut first, the way the
replica's LRU would drop those blocks first.
"""

from __future__ import annotations

import heapq
import itertools


class _Node:
    __slots__ = ("children", "parent", "edge", "last_used")

    def __init__(self, edge: str, parent: "_Node | None", last_used: int) -> None:
        self.children: dict[str, _Node] = {}  # first character of the child's edge -> child
        self.parent = parent
        self.edge = edge
        self.last_used = last_used


def _common_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixTree:
    """Prompt texts with shared prefixes stored once; `match` and `insert` run in O(len(text))."""

    def __init__(self, max_chars: int = 4_000_000) -> None:
        self.max_chars = max_chars
        self.num_chars = 0
        self._clock = itertools.count(1)
        self.root = _Node("", None, 0)

    def match(self, text: str) -> int:
        """Length of the longest prefix of `text` that the tree holds (marks it as used)."""
        node, depth, now = self.root, 0, next(self._clock)
        while depth < len(text):
            child = node.children.get(text[depth])
            if child is None:
                break
            common = _common_length(child.edge, text[depth:depth + len(child.edge)])
            child.last_used = now
            depth += common
            if common < len(child.edge):
                break
            node = child
        return depth

    def insert(self, text: str) -> None:
        node, depth, now = self.root, 0, next(self._clock)
        while depth < len(text):
            rest = text[depth:]
            child = node.children.get(rest[0])
            if child is None:
                node.children[rest[0]] = _Node(rest, node, now)
                self.num_chars += len(rest)
                break
            common = _common_length(child.edge, rest)
            if common < len(child.edge):  # split the edge where the texts part
                middle = _Node(child.edge[:common], node, now)
                node.children[rest[0]] = middle
                child.edge = child.edge[common:]
                child.parent = middle
                middle.children[child.edge[0]] = child
                child = middle
            child.last_used = now
            node, depth = child, depth + common
        if self.num_chars > self.max_chars:
            self._evict(self.num_chars - self.max_chars)

    def _evict(self, chars: int) -> None:
        """Cut least recently used leaves until `chars` characters are gone."""
        leaves = [(n.last_used, id(n), n) for n in self._leaves()]
        heapq.heapify(leaves)
        while chars > 0 and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            del parent.children[leaf.edge[0]]
            self.num_chars -= len(leaf.edge)
            chars -= len(leaf.edge)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))

    def _leaves(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                yield node
