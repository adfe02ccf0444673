"""A watch's directories as a tree of inotify watch descriptors.

Each descriptor keeps its parent's descriptor and its own name, and a directory's path is found
by walking up: O(depth) for an event. A rename is then one node changed however much lies
below it; a map from descriptors to whole paths would have every path below rewritten, a scan
of the whole watch for each directory that moves.
"""

from __future__ import annotations

from collections.abc import Iterator

#: Deeper than any path the kernel takes (PATH_MAX 4096, two bytes a level): a chain longer
#: than this is a loop that missed events left, and has no path.
_MAX_DEPTH = 2048
_NOWHERE = -1  # the parent of a node whose place another directory has taken


class Directories:
    """The descriptors of one watch: the top (the watched directory, path ``""``) and, when
    recursive, those below it."""

    def __init__(self) -> None:
        self._nodes: dict[int, tuple[int | None, str]] = {}  # wd -> (parent wd, name); the top: (None, "")
        self._children: dict[int, dict[str, int]] = {}  # wd -> name -> wd

    def __contains__(self, wd: int) -> bool:
        return wd in self._nodes

    def __iter__(self) -> Iterator[int]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def add(self, wd: int, parent: int | None, name: str) -> None:
        """``wd`` is directory ``name`` in ``parent`` (None and ``""`` for the top), wherever
        it was before. A directory that had that place is no longer there: its events are
        dropped until it is placed again."""
        self._unlink(wd)
        self._nodes[wd] = (parent, name)
        if parent is None:
            return
        siblings = self._children.setdefault(parent, {})
        old = siblings.get(name)
        if old is not None and old != wd:
            self._nodes[old] = (_NOWHERE, name)
        siblings[name] = wd

    def child(self, parent: int, name: str) -> int | None:
        """The descriptor of directory ``name`` in ``parent``, if it is watched."""
        return self._children.get(parent, {}).get(name)

    def move(self, parent: int, name: str, to_parent: int, to_name: str) -> None:
        """Directory ``name`` in ``parent`` was renamed to ``to_name`` in ``to_parent``."""
        wd = self.child(parent, name)
        if wd is not None:
            self.add(wd, to_parent, to_name)

    def is_top(self, wd: int) -> bool:
        node = self._nodes.get(wd)
        return node is not None and node[0] is None

    def path(self, wd: int) -> str | None:
        """``wd``'s path in the watch (``""`` for the top), or None when it is not in it."""
        parts: list[str] = []
        node = self._nodes.get(wd)
        for _ in range(_MAX_DEPTH):
            if node is None:
                return None
            parent, name = node
            if parent is None:
                return "/".join(reversed(parts))
            parts.append(name)
            node = self._nodes.get(parent)
        return None

    def remove(self, wd: int) -> list[int]:
        """Forget ``wd`` and everything below it; the descriptors forgotten."""
        if wd not in self._nodes:
            return []
        self._unlink(wd)
        gone, stack = [], [wd]
        while stack:
            here = stack.pop()
            if self._nodes.pop(here, None) is not None:
                gone.append(here)
            stack.extend(self._children.pop(here, {}).values())
        return gone

    def discard(self, wd: int) -> None:
        """Forget ``wd`` alone (the kernel ended its watch); what is below it, if anything,
        has no path until placed again."""
        self._unlink(wd)
        self._nodes.pop(wd, None)
        self._children.pop(wd, None)

    def clear(self) -> None:
        self._nodes.clear()
        self._children.clear()

    def _unlink(self, wd: int) -> None:
        node = self._nodes.get(wd)
        if node is None or node[0] is None:
            return
        siblings = self._children.get(node[0])
        if siblings is not None and siblings.get(node[1]) == wd:
            del siblings[node[1]]
            if not siblings:
                del self._children[node[0]]
