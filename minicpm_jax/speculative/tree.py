"""Static draft trees (EAGLE-2 style): the topology of a branching tuple and its attention layouts.

A tree (b_1, .., b_D) has the root (the last emitted token, depth 0), b_1 children of the root, b_2 children of
each depth-1 node, and so on: n_d = b_1 * .. * b_d nodes at depth d, N = 1 + n_1 + .. + n_D nodes in all. Nodes are
numbered breadth first and the children of a node are contiguous, in the order of its parent within the level:
node start_d + p * b_d + c is child c of the p-th node of depth d - 1, so every internal node comes before every
leaf. Which tokens the children carry is the drafting rule's business (`speculative.generate`, `tree_accept`).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from minicpm_jax.tree_attention import TreeLayout


@dataclasses.dataclass(frozen=True)
class Tree:
    """The topology of a branching tuple (numpy arrays are derived on demand; the object is hashable)."""

    branching: tuple[int, ...]

    def __post_init__(self):
        b = self.branching
        if not isinstance(b, tuple) or not b or any(not isinstance(x, (int, np.integer)) or x < 1 for x in b):
            raise ValueError(f"tree must be a non-empty tuple of positive ints (children per depth), got {b!r}")

    @property
    def depth(self) -> int:
        return len(self.branching)

    @functools.cached_property
    def level_sizes(self) -> tuple[int, ...]:
        """n_0 = 1, n_1, .., n_D."""
        return tuple(int(x) for x in np.cumprod((1,) + self.branching))

    @functools.cached_property
    def level_starts(self) -> tuple[int, ...]:
        """Index of the first node of each depth 0..D, and N at the end."""
        return tuple(int(x) for x in np.cumsum((0,) + self.level_sizes))

    @property
    def num_nodes(self) -> int:
        return self.level_starts[-1]

    @functools.cached_property
    def parent(self) -> np.ndarray:
        """int32 [N]: each node's parent (the root is its own)."""
        par = np.zeros(self.num_nodes, np.int32)
        for d, b in enumerate(self.branching, start=1):
            lo, n = self.level_starts[d], self.level_sizes[d]
            par[lo:lo + n] = self.level_starts[d - 1] + np.arange(n) // b
        return par

    @functools.cached_property
    def node_depth(self) -> np.ndarray:
        """int32 [N]."""
        return np.repeat(np.arange(self.depth + 1, dtype=np.int32), self.level_sizes)

    @functools.cached_property
    def paths(self) -> np.ndarray:
        """int32 [N, D+1]: node i's root path (root, .., i), padded with i after depth_i."""
        out = np.zeros((self.num_nodes, self.depth + 1), np.int32)
        for i in range(self.num_nodes):
            chain = [i]
            while chain[-1] != 0:
                chain.append(int(self.parent[chain[-1]]))
            chain = chain[::-1]
            out[i] = chain + [i] * (self.depth + 1 - len(chain))
        return out

    @functools.cached_property
    def ancestors(self) -> np.ndarray:
        """bool [N, N]: ancestors[i, j] iff node j is on node i's root path (i itself included)."""
        anc = np.zeros((self.num_nodes, self.num_nodes), bool)
        for i in range(self.num_nodes):
            anc[i, self.paths[i, :self.node_depth[i] + 1]] = True
        return anc

    def verify_layout(self) -> TreeLayout:
        """The target's step: all N nodes at tree slots 0..N-1 (the root at the first), with their root paths."""
        d = self.node_depth
        return TreeLayout(mask=_tuples(self.ancestors), offset=0,
                          paths=tuple(tuple(int(x) for x in self.paths[i, :d[i] + 1]) for i in range(self.num_nodes)))

    def draft_layout(self, depth: int) -> TreeLayout:
        """The draft's step over the nodes of `depth` (1..D). The draft has no pair for the root (its pair is in the
        cache already), so node i >= 1 keeps its draft KV at tree slot i - 1."""
        lo, hi = self.level_starts[depth], self.level_starts[depth + 1]
        return TreeLayout(mask=_tuples(self.ancestors[lo:hi, 1:]), offset=lo - 1)


def _tuples(a: np.ndarray) -> tuple[tuple[bool, ...], ...]:
    return tuple(tuple(bool(x) for x in row) for row in a)
