"""Retrieval gallery: the N worst and N random queries with their top-k neighbours, right/wrong marked.

Worst = lowest AP@R (ties: a missed R@1 first, then the smaller dataset index); random = drawn with a
seeded generator from the other queries. Neighbours are the exact top-k of the evaluation
(:meth:`ddtas_lightning.metrics.KNNIndex.search`: cosine similarity, ties by smaller gallery index, the
query itself excluded), so the gallery shows exactly what the metrics counted.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ddtas_lightning.metrics.neighbors import KNNIndex

RIGHT, WRONG, QUERY = (34, 160, 60), (210, 40, 40), (40, 90, 200)


def select_queries(per_query: dict[str, torch.Tensor], n_worst: int, n_random: int, seed: int = 0
                   ) -> list[tuple[int, str]]:
    """``[(dataset id, "worst" | "random"), ...]`` from :func:`~ddtas_lightning.metrics.retrieval.per_query_metrics`."""
    ids = per_query["ids"].cpu()
    ap, hit = per_query["MAP@R"].cpu().double(), per_query["R@1"].cpu().double()
    order = sorted(range(len(ids)), key=lambda i: (float(ap[i]), float(hit[i]), int(ids[i])))
    worst = order[: max(0, n_worst)]
    rest = torch.tensor(sorted(set(range(len(ids))) - set(worst)), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    rand = rest[torch.randperm(len(rest), generator=g)[: max(0, n_random)]].tolist() if len(rest) else []
    return [(int(ids[i]), "worst") for i in worst] + [(int(ids[i]), "random") for i in sorted(rand)]


def gallery_rows(items: dict[str, torch.Tensor], queries: list[tuple[int, str]], paths: list, k: int,
                 per_query: dict[str, torch.Tensor] | None = None, backend: str = "torch") -> list[dict]:
    """One dict per query: its id, label, path, kind, AP@R / R@1, and its top-``k`` neighbours
    (``id``, ``label``, ``path``, ``similarity``, ``correct``). ``items``: the gathered evaluation items
    (``embeddings``, ``labels``, ``indices``, ``is_gallery``; one row per dataset index); ``paths``:
    the dataset's image paths by dataset index."""
    emb = torch.nn.functional.normalize(items["embeddings"].float(), dim=1)
    ids, labels = items["indices"].long(), items["labels"].long()
    g_pos = items["is_gallery"].bool().nonzero().squeeze(1)
    index = KNNIndex(emb[g_pos], backend=backend, reference_ids=ids[g_pos])
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    q_rows = torch.tensor([row_of[i] for i, _ in queries], dtype=torch.long)
    sims, nbr = index.search(emb[q_rows], k, query_ids=ids[q_rows]) if len(q_rows) else (None, None)
    scores = {}
    if per_query is not None:
        scores = {int(i): (float(a), float(h)) for i, a, h in
                  zip(per_query["ids"].tolist(), per_query["MAP@R"].tolist(), per_query["R@1"].tolist())}
    rows = []
    for j, (qid, kind) in enumerate(queries):
        q_label = int(labels[row_of[qid]])
        neighbours = []
        for s, pos in zip(sims[j].tolist(), nbr[j].tolist()):
            if pos < 0:
                continue
            gid = int(ids[g_pos[pos]])
            g_label = int(labels[g_pos[pos]])
            neighbours.append({"id": gid, "label": g_label, "path": str(paths[gid]), "similarity": s,
                               "correct": g_label == q_label})
        ap, hit = scores.get(qid, (float("nan"), float("nan")))
        rows.append({"id": qid, "label": q_label, "path": str(paths[qid]), "kind": kind, "AP@R": ap,
                     "R@1": hit, "neighbours": neighbours})
    return rows


def _thumb(path: str, size: int, color: tuple[int, int, int], border: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = (size - 2 * border) / max(im.width, im.height)  # up or down: small images fill the tile
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    except OSError:
        im = Image.new("RGB", (size - 2 * border, size - 2 * border), (128, 128, 128))
    tile = Image.new("RGB", (size, size), color)
    inner = Image.new("RGB", (size - 2 * border, size - 2 * border), (255, 255, 255))
    inner.paste(im, ((inner.width - im.width) // 2, (inner.height - im.height) // 2))
    tile.paste(inner, (border, border))
    return tile


def render_gallery_png(rows: list[dict], path: str | Path, k: int, thumb: int = 96) -> Path:
    """Grid: one row per query (blue frame) followed by its ``k`` neighbours, green frame = same class,
    red = another class; a caption strip under each row gives kind, label and AP@R / similarities.
    Image size: ``(k + 1) * thumb`` x ``len(rows) * (thumb + 14)`` pixels."""
    caption, border = 14, max(3, thumb // 24)
    width, height = (k + 1) * thumb, max(1, len(rows)) * (thumb + caption)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = r * (thumb + caption)
        canvas.paste(_thumb(row["path"], thumb, QUERY, border), (0, y))
        draw.text((2, y + thumb), f"{row['kind']} c{row['label']} AP {row['AP@R']:.2f}", fill=(0, 0, 0))
        for c, n in enumerate(row["neighbours"][:k]):
            x = (c + 1) * thumb
            canvas.paste(_thumb(n["path"], thumb, RIGHT if n["correct"] else WRONG, border), (x, y))
            draw.text((x + 2, y + thumb), f"c{n['label']} {n['similarity']:.2f}",
                      fill=RIGHT if n["correct"] else WRONG)
    path = Path(path)
    canvas.save(path)
    return path


def _data_uri(path: str, size: int) -> str:
    buf = io.BytesIO()
    _thumb(path, size, (255, 255, 255), 0).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_gallery_html(rows: list[dict], path: str | Path, thumb: int = 128, title: str = "Retrieval gallery"
                        ) -> Path:
    """A self-contained HTML page (thumbnails embedded as base64 JPEG), one table row per query."""
    css = ("body{font-family:sans-serif}td{text-align:center;font-size:12px;padding:2px}"
           f"img{{border:4px solid;display:block}}.q img{{border-color:rgb{QUERY}}}"
           f".ok img{{border-color:rgb{RIGHT}}}.bad img{{border-color:rgb{WRONG}}}")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>"
           "<p>Blue: query; green: neighbour of the same class; red: another class. Worst = lowest AP@R.</p><table>"]
    for row in rows:
        out.append("<tr>")
        out.append(f"<td class='q'><img src='{_data_uri(row['path'], thumb)}' title='{html.escape(row['path'])}'>"
                   f"{row['kind']} #{row['id']} class {row['label']}<br>AP@R {row['AP@R']:.3f}</td>")
        for n in row["neighbours"]:
            cls = "ok" if n["correct"] else "bad"
            out.append(f"<td class='{cls}'><img src='{_data_uri(n['path'], thumb)}' "
                       f"title='{html.escape(n['path'])}'>#{n['id']} class {n['label']}<br>"
                       f"{n['similarity']:.3f}</td>")
        out.append("</tr>")
    out.append("</table></body></html>")
    path = Path(path)
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
