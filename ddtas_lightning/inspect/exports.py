"""Exports for search outside the framework: embeddings, labels, roles and image paths as ``.npy``, and a
faiss index of the gallery that returns dataset ids.

Files in the export directory:
``embeddings.npy`` (N, d) float32, L2-normalised (inner product = cosine similarity); ``labels.npy``,
``ids.npy`` (dataset indices) int64; ``is_query.npy``, ``is_gallery.npy`` bool; ``paths.npy`` str;
``gallery.faiss``: ``IndexIDMap2(IndexFlatIP)`` over the gallery rows, ids = dataset indices
(``faiss.read_index``; search returns dataset ids, so a query finds itself first when it is in the
gallery: ask for k + 1 and drop it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FILES = ("embeddings", "labels", "ids", "is_query", "is_gallery", "paths")


def export_embeddings(directory: str | Path, items: dict[str, torch.Tensor], paths: list) -> Path:
    """Write the gathered evaluation ``items`` (one row per dataset index) and their image ``paths``
    (indexed by dataset index) to ``directory``; returns it."""
    from ddtas_lightning.metrics.neighbors import quiet_faiss

    faiss = quiet_faiss()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    emb = torch.nn.functional.normalize(items["embeddings"].float(), dim=1).cpu().numpy()
    ids = items["indices"].long().cpu().numpy()
    arrays = {
        "embeddings": np.ascontiguousarray(emb, dtype=np.float32),
        "labels": items["labels"].long().cpu().numpy(),
        "ids": ids,
        "is_query": items["is_query"].bool().cpu().numpy(),
        "is_gallery": items["is_gallery"].bool().cpu().numpy(),
        "paths": np.array([str(paths[int(i)]) for i in ids]),
    }
    for name, value in arrays.items():
        np.save(directory / f"{name}.npy", value)
    gallery = arrays["is_gallery"]
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(emb.shape[1]))
    index.add_with_ids(arrays["embeddings"][gallery], ids[gallery])
    faiss.write_index(index, str(directory / "gallery.faiss"))
    (directory / "README.txt").write_text(__doc__, encoding="utf-8")
    (directory / "manifest.json").write_text(json.dumps(
        {"num_items": int(len(ids)), "dim": int(emb.shape[1]), "num_gallery": int(gallery.sum()),
         "files": [f"{n}.npy" for n in FILES] + ["gallery.faiss"], "similarity": "inner product of "
         "L2-normalised embeddings (cosine)"}, indent=2))
    return directory


def load_exports(directory: str | Path) -> dict:
    """The arrays of :func:`export_embeddings` by name, plus ``index`` (the faiss index)."""
    from ddtas_lightning.metrics.neighbors import quiet_faiss

    directory = Path(directory)
    out = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in FILES}  # no pickles
    out["index"] = quiet_faiss().read_index(str(directory / "gallery.faiss"))
    return out
