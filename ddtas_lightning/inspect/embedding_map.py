"""Embedding map: a 2-D t-SNE of the evaluated embeddings, one colour + marker per class (class ids at the class
centres, a legend beside the plot), as a PNG.

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


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LEGEND_MAX = 60   # classes listed in the legend (beyond: class ids at the class centres only)
LABEL_MAX = 200   # classes whose id is written at its centre


def class_styles(n: int) -> list[tuple[tuple[float, ...], str]]:
    """``n`` distinct (colour, marker) pairs: tab10's colours x :data:`MARKERS` (80 pairs; beyond, pairs
    repeat), so neighbouring class ids never share both colour and shape."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    return [(tuple(colours[i % len(colours)]), MARKERS[(i // len(colours)) % len(MARKERS)]) for i in range(n)]


def draw_map(ax, coords: np.ndarray, labels: np.ndarray, point_size: float = 12.0):
    """Scatter ``coords`` one (colour, marker) style per class, write each class's id at its centre (up to
    :data:`LABEL_MAX` classes) and list the classes in a legend beside the axes (up to :data:`LEGEND_MAX`);
    returns the legend (None above that)."""
    import matplotlib.patheffects as pe

    classes = np.unique(labels)
    styles = class_styles(len(classes))
    for c, (colour, marker) in zip(classes, styles):
        mask = labels == c
        ax.scatter(coords[mask, 0], coords[mask, 1], color=colour, marker=marker, s=point_size, alpha=0.8,
                   linewidths=0, label=str(c))
    if len(classes) <= LABEL_MAX:
        for c in classes:
            x, y = np.median(coords[labels == c], axis=0)
            ax.annotate(str(c), (x, y), fontsize=7, ha="center", va="center", weight="bold",
                        path_effects=[pe.withStroke(linewidth=2, foreground="white")])
    if len(classes) > LEGEND_MAX:
        return None
    return ax.legend(fontsize=7, markerscale=2.0, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                     ncol=1 if len(classes) <= 30 else 2, title="class", title_fontsize=8, frameon=False)


def embedding_map(embeddings, labels, path: str | Path, *, max_points: int = 3000, seed: int = 0,
                  title: str = "t-SNE of the embeddings", size_px: int = 800) -> tuple[Path, np.ndarray, np.ndarray]:
    """Project (a seeded subset of at most ``max_points``) embeddings to 2-D and save a
    ``size_px`` x ``size_px`` scatter plot, one colour + marker per class, class ids at the class centres
    and a legend beside the axes. Returns ``(path, coords, rows used)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    emb = np.asarray(embeddings, dtype=np.float32)
    lab = np.asarray(labels)
    rows = np.arange(len(emb))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_points, replace=False))
    coords = tsne_2d(emb[rows], seed=seed)
    classes = np.unique(lab[rows])
    dpi = 100
    fig, ax = plt.subplots(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    legend = draw_map(ax, coords, lab[rows], point_size=float(np.clip(12000 / max(len(rows), 1), 4, 30)))
    ax.set_title(f"{title} ({len(rows)} items, {len(classes)} classes"
                 + ("" if legend is not None else "; ids at the class centres") + ")", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    # room on the right for the legend, inside the figure (the image stays size_px x size_px)
    fig.subplots_adjust(left=0.02, right=0.80 if legend is not None and len(classes) <= 30 else
                        (0.68 if legend is not None else 0.98), top=0.94, bottom=0.02)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path, coords, rows
