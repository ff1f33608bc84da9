"""Embedding map: a 2-D t-SNE of the evaluated embeddings, one colour per class, as a PNG.

t-SNE from scikit-learn rather than UMAP (umap-learn): scikit-learn is a small, pure-wheel dependency
already used by the tests, while umap-learn pulls numba/llvmlite and spends seconds JIT-compiling on
first use; for a picture of whether classes separate, t-SNE on a few thousand points is the standard
choice. scikit-learn is the ``inspect`` extra (``pip install -e '.[inspect]'``); without it the map
raises one clear error. At most ``max_points`` items are projected (a seeded random subset): exact
t-SNE cost grows quadratically (Barnes-Hut: n log n, still ~1 min at 10k points on one CPU core).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddtas_lightning.config.validation import ConfigError


def tsne_2d(embeddings: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """(n, 2) t-SNE coordinates (cosine metric, PCA initialisation)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ConfigError("inspect.map=true needs scikit-learn: pip install -e '.[inspect]' "
                          "(or set inspect.map=false)") from None
    n = len(embeddings)
    if n < 3:
        return np.zeros((n, 2), dtype=np.float32)
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), init="pca", metric="cosine",
                random_state=seed)
    return tsne.fit_transform(np.asarray(embeddings, dtype=np.float32)).astype(np.float32)


def embedding_map(embeddings, labels, path: str | Path, *, max_points: int = 3000, seed: int = 0,
                  title: str = "t-SNE of the embeddings", size_px: int = 800) -> tuple[Path, np.ndarray, np.ndarray]:
    """Project (a seeded subset of at most ``max_points``) embeddings to 2-D and save a
    ``size_px`` x ``size_px`` scatter plot coloured by class. Returns ``(path, coords, rows used)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    emb = np.asarray(embeddings, dtype=np.float32)
    lab = np.asarray(labels)
    rows = np.arange(len(emb))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_points, replace=False))
    coords = tsne_2d(emb[rows], seed=seed)
    classes, colour = np.unique(lab[rows], return_inverse=True)
    dpi = 100
    fig, ax = plt.subplots(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    cmap = plt.get_cmap("tab20" if len(classes) <= 20 else "gist_ncar")
    ax.scatter(coords[:, 0], coords[:, 1], c=colour, cmap=cmap, s=float(np.clip(20000 / max(len(rows), 1), 4, 40)), alpha=0.8, linewidths=0,
               vmin=0, vmax=max(len(classes) - 1, 1))
    ax.set_title(f"{title} ({len(rows)} items, {len(classes)} classes)")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(classes) <= 20:
        for i, c in enumerate(classes):
            ax.scatter([], [], color=cmap(i / max(len(classes) - 1, 1)), label=str(c), s=12)
        ax.legend(fontsize=7, markerscale=1.0, loc="best", ncol=2, title="class")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path, coords, rows
