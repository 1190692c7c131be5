"""``Dataset`` on a twinkle server: load, map, filter and encode there; rows stay there.

Derived from the declaration ``twinkle.protocol.api.DatasetAPI`` that ``twinkle.dataset.Dataset``
implements (same constructor and methods). The building calls
(``set_template``, ``map``, ``filter``, ``encode``...) are deferred; ``len()`` and indexing
wait for the server. Pass it to ``twinkle_client.dataloader.DataLoader`` to batch it there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twinkle.protocol.api import DATASET
from twinkle.protocol.dataset_meta import DatasetMeta

from .derive import derive_remote_class
from .remote import RemoteObject

__all__ = ["Dataset", "DatasetMeta"]


class _RemoteDataset(RemoteObject):
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every row, one request each (use a DataLoader to train)."""
        for i in range(len(self)):
            yield self[i]


Dataset = derive_remote_class(DATASET, _RemoteDataset, module=__name__)
