"""FLTrust's root data set: a small clean sample the server holds, taken honestly.

The samples are drawn from the clients' *training* data and removed from it, so the root set
is disjoint both from every client's data and from the test set that reported accuracy is
measured on (drawing it from the test set would leak the evaluation data into training).
"""

from __future__ import annotations

import numpy as np

from fedmosaic.data import ArrayDataset, ClientData, FederatedDataset


def hold_out_root(fed: FederatedDataset, samples: int,
                  seed: int) -> tuple[FederatedDataset, ArrayDataset]:
    """Move ``samples`` training samples, drawn uniformly from all clients' pooled training
    data, into a server-side root set; every client keeps at least one sample.

    Returns the federation without them and the root set. Deterministic in ``seed``.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"root samples must be an integer >= 1, got {samples!r}")
    rng = np.random.default_rng([seed, 0xF17])
    # Candidates: every (client, index) pair except one protected sample per client.
    owners, indices = [], []
    for pos, c in enumerate(fed.clients):
        n = len(c.train)
        keep = int(rng.integers(n))
        idx = np.delete(np.arange(n), keep)
        owners.append(np.full(len(idx), pos))
        indices.append(idx)
    owner = np.concatenate(owners)
    index = np.concatenate(indices)
    if samples > len(owner):
        raise ValueError(f"cannot hold out {samples} root samples: the clients have only "
                         f"{len(owner)} training samples to spare (each keeps one)")
    chosen = rng.choice(len(owner), size=samples, replace=False)
    chosen.sort()
    taken: dict[int, list[int]] = {}
    for i in chosen:
        taken.setdefault(int(owner[i]), []).append(int(index[i]))
    parts, clients = [], []
    for pos, c in enumerate(fed.clients):
        drop = np.array(taken.get(pos, []), dtype=np.int64)
        if drop.size:
            parts.append(c.train.subset(drop))
            mask = np.ones(len(c.train), dtype=bool)
            mask[drop] = False
            clients.append(ClientData(c.client_id, c.train.subset(mask), c.test))
        else:
            clients.append(c)
    root = ArrayDataset.concat(parts)
    rest = FederatedDataset(name=fed.name, clients=clients, test=fed.test,
                            num_classes=fed.num_classes, feature_shape=fed.feature_shape)
    return rest, root
