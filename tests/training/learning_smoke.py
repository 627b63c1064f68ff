"""Learning smoke check (not a pytest test yet): a tiny ModifiedResNet image tower and an
MLP text tower, trained with the pairwise likelihood loss on the generated shapes,
must reach a mAP clearly above that of random codes within a couple of CPU minutes.

    python tests/training/learning_smoke.py [--seconds 120] [--bits 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from cmhash.training.blocks import HashHead, binarize, build_image_backbone, label_similarity, pairwise_nll_loss
from cmhash.training.data import CrossModalDataset, build_transform, make_shapes, make_split


def map_at_all(query_codes, db_codes, query_labels, db_labels) -> float:
    """Hamming ranking, ties in database order; relevant = at least one shared label."""
    bits = query_codes.shape[1]
    aps = []
    for q, ql in zip(query_codes, query_labels):
        distance = 0.5 * (bits - db_codes @ q)
        order = np.argsort(distance, kind="stable")
        relevant = (db_labels[order] @ ql) > 0
        if not relevant.any():
            aps.append(0.0)
            continue
        hits = np.cumsum(relevant)
        aps.append(float((hits[relevant] / (np.flatnonzero(relevant) + 1)).mean()))
    return float(np.mean(aps))


def tensors(dataset):
    items = [dataset[k] for k in range(len(dataset))]
    return tuple(torch.stack([it[j] for it in items]) for j in range(3))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)

    data = make_shapes(args.n, seed=0)
    split = make_split(len(data), {"query": 500, "train": 2000, "seed": 0})
    data = data.with_vocabulary(data.build_vocabulary(split.train))
    image_tower = build_image_backbone("clip:tiny-resnet")
    transform = build_transform(image_tower.preprocess)
    t0 = time.time()
    train_x, train_t, train_y = tensors(CrossModalDataset(data, split.train, transform))
    query_x, query_t, query_y = tensors(CrossModalDataset(data, split.query, transform))
    db_x, db_t, db_y = tensors(CrossModalDataset(data, split.database, transform))
    print(f"rendered and preprocessed {args.n} samples in {time.time() - t0:.1f}s; vocabulary {len(data.vocabulary)}")

    image_net = nn.Sequential(image_tower, HashHead(image_tower.output_dim, args.bits))
    text_net = nn.Sequential(nn.Linear(len(data.vocabulary), 512), nn.ReLU(), HashHead(512, args.bits))
    params = list(image_net.parameters()) + list(text_net.parameters())
    optimiser = torch.optim.Adam(params, lr=1e-3)

    @torch.no_grad()
    def evaluate():
        image_net.eval(), text_net.eval()
        enc_i = lambda x: torch.cat([binarize(image_net(x[k:k + 256])) for k in range(0, len(x), 256)]).numpy()
        qi, di = enc_i(query_x), enc_i(db_x)
        qt, dt = binarize(text_net(query_t)).numpy(), binarize(text_net(db_t)).numpy()
        image_net.train(), text_net.train()
        ql, dl = query_y.numpy(), db_y.numpy()
        return map_at_all(qi, dt, ql, dl), map_at_all(qt, di, ql, dl)

    rng = np.random.default_rng(0)
    random_codes = lambda n: np.where(rng.random((n, args.bits)) < 0.5, 1.0, -1.0)
    chance = map_at_all(random_codes(500), random_codes(len(db_y)), query_y.numpy(), db_y.numpy())
    print(f"random codes: mAP {chance:.3f}")

    start, epoch = time.time(), 0
    while time.time() - start < args.seconds:
        perm = torch.randperm(len(train_y))
        for k in range(0, len(perm), 64):
            idx = perm[k:k + 64]
            h_i, h_t = image_net(train_x[idx]), text_net(train_t[idx])
            s = label_similarity(train_y[idx])
            loss = (pairwise_nll_loss(h_i, h_t, s) + pairwise_nll_loss(h_i, h_i, s) + pairwise_nll_loss(h_t, h_t, s)
                    + 0.1 * (((h_i - binarize(h_i.detach())) ** 2).mean() + ((h_t - binarize(h_t.detach())) ** 2).mean()))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        epoch += 1
        i2t, t2i = evaluate()
        print(f"epoch {epoch} ({time.time() - start:.0f}s): loss {loss.item():.3f}  mAP I->T {i2t:.3f}  T->I {t2i:.3f}")
    return i2t, t2i, chance


if __name__ == "__main__":
    main()
