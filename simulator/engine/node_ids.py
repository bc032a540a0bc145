"""Client (partition) id <-> node id where the engine fixes the rule: node = id + 1.

The inline grid and the Ray cohorts give client ``p`` the node id ``p + 1``. Holding that as two
dicts of the population (id -> node for the strategy, node -> id for failure accounting) cost
about 200 MB at 1,000,000 clients and would cost 3 GB at 15,000,000; these mappings compute it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

NODE_OFFSET = 1  # node id = client id + 1 under the inline grid and the Ray cohorts


class OffsetIds(Mapping[int, int]):
    """Keys ``start .. start + n - 1`` -> ``key + offset``; ``OffsetIds(n)`` maps client ids to
    node ids, and :meth:`inverse` maps them back."""

    def __init__(self, n: int, start: int = 0, offset: int = NODE_OFFSET) -> None:
        self.n, self.start, self.offset = int(n), int(start), int(offset)

    def __getitem__(self, key: int) -> int:
        key = int(key)
        if not self.start <= key < self.start + self.n:
            raise KeyError(key)
        return key + self.offset

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.start + self.n))

    def __len__(self) -> int:
        return self.n

    def inverse(self) -> "OffsetIds":
        return OffsetIds(self.n, self.start + self.offset, -self.offset)

    def __repr__(self) -> str:
        return f"OffsetIds(n={self.n}, start={self.start}, offset={self.offset})"
