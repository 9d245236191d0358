"""Tasks whose only packaged split is ``validation``: it is cut into two fixed halves.

The half of an item is a SHA-256 of its *split key* (the normalised question text by default, the
video id for HellaSwag), so a question that occurs twice, or several endings of one video, always
land in the same half. With ``--data SOURCE`` and a ``train`` split in it, ``train`` trains and the
whole ``validation`` split evaluates; without one, the same halves are cut from its ``validation``.
"""

from __future__ import annotations

from typing import Any

from dskd.tasks.base import Item, Task, TaskError, hash_half, olmo_hf_dir, read_hf, read_split


class HalvesTask(Task):
    """Validation split in two fixed halves by a hash of :meth:`split_key`."""

    folder: tuple[str, ...] = ()  # under hf_datasets/, ending in the split folder

    def row_to_item(self, row: dict[str, Any]) -> Item:
        raise NotImplementedError

    def split_key(self, item: Item, row: dict[str, Any]) -> str:
        return item.question

    def _rows(self, split: str) -> list[dict[str, Any]]:
        if self.source:
            return read_hf(self.source, split)
        return read_split(olmo_hf_dir(*self.folder))

    def _load(self, part: str) -> list[Item]:
        if self.source:
            try:
                train_rows = read_hf(self.source, "train")
            except TaskError:
                train_rows = None
            if train_rows is not None:
                rows = train_rows if part == "train" else self._rows("validation")
                return self._dedupe([self.row_to_item(r) for r in rows])
        items = []
        for row in self._rows("validation"):
            item = self.row_to_item(row)
            if hash_half(self.split_key(item, row)) == part:
                items.append(item)
        return self._dedupe(items)

    @staticmethod
    def _dedupe(items: list[Item]) -> list[Item]:
        seen: set[str] = set()
        out = []
        for x in items:
            if x.id not in seen:
                seen.add(x.id)
                out.append(x)
        return out
