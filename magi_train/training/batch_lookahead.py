"""The training loop's batch source: the loader's batches, a new pass started when a finite loader ends, and one
batch fetched ahead on request (fetch_ahead), so that a loader working in the main process (the synthetic data,
data.num_workers=0) builds the next batch while the GPU still runs this step, not after it.

state_dict() is the position before the batch held ahead: a checkpoint resumes at the first batch not trained on."""
from __future__ import annotations

import copy


class LookaheadBatches:
    def __init__(self, loader):
        self.loader = loader
        self._it = iter(loader)
        self._ahead = None          # (batch, the loader's state before it)

    def _fetch(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:       # a finite loader: start its next pass
            self._it = iter(self.loader)
            return next(self._it)

    def fetch_ahead(self) -> None:
        if self._ahead is None:
            state = copy.deepcopy(self.loader.state_dict())
            self._ahead = (self._fetch(), state)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._ahead is not None:
            batch, self._ahead = self._ahead[0], None
            return batch
        return self._fetch()

    def state_dict(self) -> dict:
        return copy.deepcopy(self._ahead[1]) if self._ahead is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._ahead = None
        self.loader.load_state_dict(state)
        self._it = iter(self.loader)


__all__ = ["LookaheadBatches"]
