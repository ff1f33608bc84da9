"""The inspect helpers on hand-made embeddings: gallery neighbours against a brute-force ranking, worst/random
query choice, the PNG layout, and the embedding map's clear error without scikit-learn."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.inspect import embedding_map, gallery_rows, render_gallery_png, select_queries
from ddtas_lightning.inspect.embedding_map import class_styles, draw_map
from ddtas_lightning.inspect.gallery import gallery_layout, header_lines
from ddtas_lightning.metrics.retrieval import per_query_metrics
from tests.metrics._reference import brute_knn


def items(seed=0, n=30, dim=5, classes=4):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    labels = torch.randint(0, classes, (n,), generator=g)
    ids = torch.arange(n) * 3 + 7  # dataset indices need not be 0..n-1
    gallery = torch.rand(n, generator=g) < 0.8
    return {"embeddings": emb, "labels": labels, "indices": ids, "is_query": torch.ones(n, dtype=torch.bool),
            "is_gallery": gallery}


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_gallery_neighbours_are_the_brute_force_ranking(backend, tmp_path):
    it = items()
    paths = {int(i): tmp_path / f"{int(i)}.png" for i in it["indices"]}
    for p in paths.values():
        Image.new("RGB", (10, 6), (200, 10, 10)).save(p)
    per_query = per_query_metrics(it["embeddings"], it["labels"], ids=it["indices"], is_gallery=it["is_gallery"])
    queries = select_queries(per_query, 3, 4, seed=1)
    rows = gallery_rows(it, queries, paths, k=5, per_query=per_query, backend=backend)
    g = it["is_gallery"]
    for r in rows:
        q = (it["indices"] == r["id"]).nonzero().item()
        ref = brute_knn(it["embeddings"][q : q + 1], it["embeddings"][g], 5, query_ids=it["indices"][q : q + 1],
                        reference_ids=it["indices"][g])[0]
        assert [n["id"] for n in r["neighbours"]] == it["indices"][g][ref].tolist()
        assert [n["correct"] for n in r["neighbours"]] == (it["labels"][g][ref] == it["labels"][q]).tolist()
    # worst = the 3 lowest AP@R; the random ones come from the rest, without repeats
    ap = dict(zip(per_query["ids"].tolist(), per_query["MAP@R"].tolist()))
    worst = [r["id"] for r in rows if r["kind"] == "worst"]
    rest = [r["id"] for r in rows if r["kind"] == "random"]
    assert sorted(ap.values())[:3] == [ap[i] for i in worst] and len(set(rest)) == 4 and not set(rest) & set(worst)
    png = render_gallery_png(rows, tmp_path / "g.png", k=5, thumb=24)
    lay = gallery_layout(5, 24, 7)
    with Image.open(png) as im:
        assert im.size == (560, lay["header"] + 7 * (24 + lay["caption"]))  # the header keeps >= 560 px


def test_gallery_png_has_a_header_with_title_metrics_and_colour_legend(tmp_path):
    rows = [{"id": 1, "label": 41, "path": "#1", "kind": "worst", "AP@R": 0.12, "R@1": 0.0,
             "neighbours": [{"id": 2, "label": 41, "path": "#2", "similarity": 0.98, "correct": True},
                            {"id": 3, "label": 7, "path": "#3", "similarity": 0.91, "correct": False}]}]
    about = {"checkpoint": "/runs/x/checkpoints/epoch003-step000120-valR@1_0.3844.ckpt", "dataset": "cub200",
             "split": "test", "metrics": {"test/R@1": 0.4, "test/MAP@R": 0.1, "test/num_queries": 10.0}}
    title, info = header_lines(about, rows)
    assert title == "Retrieval gallery: epoch003-step000120-valR@1_0.3844.ckpt"
    assert info.startswith("cub200 test: R@1 40.0, MAP@R 10.0; rows: 1 worst queries")
    lay = gallery_layout(2, 96, 1)
    png = render_gallery_png(rows, tmp_path / "g.png", k=2, thumb=96, about=about)
    with Image.open(png) as im:
        px = im.convert("RGB")
        header = [px.getpixel((x, y)) for x in range(px.width) for y in range(lay["header"] - 4)]
        # the legend's three swatches (query blue, same-class green, other-class red) and dark title text
        assert {(40, 90, 200), (34, 160, 60), (210, 40, 40)} <= set(header)
        assert sum(p == (0, 0, 0) for p in header) > 200
        # captions: lines in the tile's colour under the tile (not one 8 px run-together string)
        caption = [px.getpixel((x, y)) for x in range(96, 192) for y in range(lay["header"] + 96, lay["header"] + 96 + lay["caption"])]
        assert sum(p == (34, 160, 60) for p in caption) > 40


def test_embedding_map_of_32_classes_has_distinct_styles_and_a_legend(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = class_styles(32)
    assert len(set(styles)) == 32  # colour + marker pairs: no two classes look alike
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100, 132), 5)
    fig, ax = plt.subplots()
    legend = draw_map(ax, rng.normal(size=(160, 2)), labels)
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == [str(c) for c in range(100, 132)]
    assert sum(t.get_text() == "117" for t in ax.texts) == 1  # the class id written at its centre
    plt.close(fig)


def test_embedding_map_without_scikit_learn_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    with pytest.raises(ConfigError, match=r"inspect.map=true needs scikit-learn: pip install -e '\.\[inspect\]'"):
        embedding_map(np.random.default_rng(0).normal(size=(10, 3)), np.arange(10) % 2, tmp_path / "m.png")


def test_embedding_map_subsamples_and_separates_separable_classes(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16) * 10
    labels = np.repeat(np.arange(4), 40)
    emb = centres[labels] + rng.normal(scale=0.1, size=(160, 16))
    png, coords, rows = embedding_map(emb, labels, tmp_path / "m.png", max_points=100, size_px=300)
    assert len(rows) == 100 and coords.shape == (100, 2)
    with Image.open(png) as im:
        assert im.size == (300, 300)
    # every point's nearest 2-D neighbour is of its own class (well separated clusters stay separated)
    d = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[rows][d.argmin(1)] == labels[rows]).all()
