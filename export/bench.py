"""The PyTorch eager baseline of ``cmhash bench``: the checkpoint's towers, float32, on CPU
(or CUDA), timed like the bundle's models on the same input shapes."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from cmhash.bench import DEFAULT_BATCH_SIZES, example_inputs, summarize, time_calls

from .loading import Trained


def bench_checkpoint(
    checkpoint,
    *,
    modalities: Iterable[str] = ("image", "text"),
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    warmup: int = 3,
    repeats: int = 20,
    device: str = "cpu",
    threads: int | None = None,
) -> list[dict]:
    trained = Trained.load(checkpoint)
    if threads is not None:
        torch.set_num_threads(threads)
    towers = {"image": trained.method.image_tower(), "text": trained.method.text_tower()}
    shapes = {"image": (3, *trained.image_preprocessor().output_size), "text": (trained.text_dim,)}
    rows = []
    for modality in modalities:
        tower = towers[modality].to(device).eval()
        for batch in batch_sizes:
            x = torch.from_numpy(example_inputs(shapes[modality], batch, modality)).to(device)

            def call():
                with torch.inference_mode():
                    out = tower(x)
                if device != "cpu":
                    torch.cuda.synchronize()
                return out

            times = time_calls(call, warmup=warmup, repeats=repeats)
            rows.append({"modality": modality, "backend": "pytorch-eager", "variant": "fp32", "batch": batch,
                         **summarize(np.asarray(times), batch)})
    return rows
