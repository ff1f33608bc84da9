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

from ddtas_lightning.data.image_dataset import to_rgb8
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
            im = to_rgb8(im)  # transparency over white, as the data module reads it by default
            scale = (size - 2 * border) / max(im.width, im.height)  # up or down: small images fill the tile
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    except OSError:
        im = Image.new("RGB", (size - 2 * border, size - 2 * border), (128, 128, 128))
    tile = Image.new("RGB", (size, size), color)
    inner = Image.new("RGB", (size - 2 * border, size - 2 * border), (255, 255, 255))
    inner.paste(im, ((inner.width - im.width) // 2, (inner.height - im.height) // 2))
    tile.paste(inner, (border, border))
    return tile


MIN_WIDTH = 560  # px: the header (title, metrics, legend) stays legible beside few or small thumbnails


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def gallery_layout(k: int, thumb: int, n_rows: int) -> dict[str, int]:
    """Pixel layout of :func:`render_gallery_png`: font size, caption strip and header heights, image size."""
    font = max(11, min(16, thumb // 7))
    caption = 3 * (font + 3) + 4                  # caption lines under every thumbnail: 3 (query), 2 (neighbour)
    header = 3 * (font + 8) + 10                   # title, metrics line, colour legend
    width = max((k + 1) * thumb, MIN_WIDTH)
    return {"font": font, "caption": caption, "header": header, "width": width,
            "height": header + max(1, n_rows) * (thumb + caption)}


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut (with "…") to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _captions(row: dict, n: dict | None, wide: bool) -> tuple[str, ...]:
    """Caption lines: the query's kind, class and AP@R; a neighbour's class and similarity."""
    if n is None:
        return (f"{row['kind']} query" if wide else row["kind"], f"class {row['label']}" if wide else f"c{row['label']}",
                f"AP@R {row['AP@R']:.2f}" if wide else f"AP {row['AP@R']:.2f}")
    return ((f"class {n['label']}" if wide else f"c{n['label']}"),
            (f"sim {n['similarity']:.2f}" if wide else f"{n['similarity']:.2f}"))


def header_lines(about: dict | None, rows: list[dict]) -> tuple[str, str]:
    """The title and the metrics line of a gallery: which checkpoint, dataset, split, and its R@1 / MAP@R."""
    about = about or {}
    ckpt = Path(str(about.get("checkpoint", ""))).name or "(checkpoint not given)"
    metrics = about.get("metrics") or {}
    scores = ", ".join(f"{name} {100 * float(v):.1f}" for name in ("R@1", "MAP@R")
                       for key, v in metrics.items() if key.rsplit("/", 1)[-1] == name)
    kinds = ", ".join(f"{sum(r['kind'] == k for r in rows)} {k}" for k in ("worst", "random") if any(
        r["kind"] == k for r in rows))
    where = " ".join(str(x) for x in (about.get("dataset"), about.get("split")) if x) or "evaluation"
    return (f"Retrieval gallery: {ckpt}",
            f"{where}: {scores or 'metrics n/a'}; rows: {kinds} queries (worst = lowest AP@R)")


def render_gallery_png(rows: list[dict], path: str | Path, k: int, thumb: int = 96, about: dict | None = None
                       ) -> Path:
    """Grid under a header (title naming the checkpoint; dataset, split, R@1 / MAP@R; a colour legend): one
    row per query (blue frame) followed by its ``k`` neighbours, green frame = same class, red = another
    class; caption lines under each thumbnail (query: kind, class, AP@R; neighbour: class, similarity). ``about``: ``checkpoint``, ``dataset``, ``split``, ``metrics``. Size: :func:`gallery_layout`."""
    lay = gallery_layout(k, thumb, len(rows))
    font, big = _font(lay["font"]), _font(lay["font"] + 3)
    border, line = max(3, thumb // 24), lay["font"] + 3
    canvas = Image.new("RGB", (lay["width"], lay["height"]), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    title, info = header_lines(about, rows)
    pad = 6
    draw.text((pad, 4), _fit(draw, title, big, lay["width"] - 2 * pad), fill=(0, 0, 0), font=big)
    draw.text((pad, 4 + lay["font"] + 8), _fit(draw, info, font, lay["width"] - 2 * pad), fill=(40, 40, 40), font=font)
    x, y = pad, 4 + 2 * (lay["font"] + 8)
    for color, text in ((QUERY, "query"), (RIGHT, "neighbour, same class"), (WRONG, "neighbour, another class")):
        draw.rectangle((x, y + 2, x + lay["font"], y + 2 + lay["font"]), outline=color, width=3)
        x += lay["font"] + 5
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
        x += int(draw.textlength(text, font=font)) + 16
    draw.line((0, lay["header"] - 3, lay["width"], lay["header"] - 3), fill=(180, 180, 180), width=1)
    wide = thumb >= 64
    for r, row in enumerate(rows):
        y = lay["header"] + r * (thumb + lay["caption"])
        canvas.paste(_thumb(row["path"], thumb, QUERY, border), (0, y))
        tiles = [(0, None, QUERY)] + [((c + 1) * thumb, n, RIGHT if n["correct"] else WRONG)
                                      for c, n in enumerate(row["neighbours"][:k])]
        for x, n, color in tiles:
            if n is not None:
                canvas.paste(_thumb(n["path"], thumb, color, border), (x, y))
            for i, text in enumerate(_captions(row, n, wide)):
                draw.text((x + 2, y + thumb + 2 + i * line), _fit(draw, text, font, thumb - 4),
                          fill=(0, 0, 0) if n is None else color, font=font)
    path = Path(path)
    canvas.save(path)
    return path


def _data_uri(path: str, size: int) -> str:
    buf = io.BytesIO()
    _thumb(path, size, (255, 255, 255), 0).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_gallery_html(rows: list[dict], path: str | Path, thumb: int = 128, title: str = "Retrieval gallery",
                        about: dict | None = None) -> Path:
    """A self-contained HTML page (thumbnails embedded as base64 JPEG), one table row per query, under a
    header naming the checkpoint, dataset and split with the evaluation's metrics (``about``: ``checkpoint``,
    ``dataset``, ``split``, ``metrics``)."""
    about = about or {}
    esc = html.escape
    css = ("body{font-family:sans-serif}td{text-align:center;font-size:12px;padding:2px}"
           "table.about td{text-align:left;font-size:14px;padding:1px 12px 1px 0}"
           f"img{{border:4px solid;display:block}}.q img{{border-color:rgb{QUERY}}}"
           f".ok img{{border-color:rgb{RIGHT}}}.bad img{{border-color:rgb{WRONG}}}"
           ".sw{display:inline-block;width:12px;height:12px;border:3px solid;margin:0 4px 0 12px}")
    metrics = about.get("metrics") or {}
    shown = "  ".join(f"{esc(k.split('/', 1)[-1])} {100 * float(v):.2f}" for k, v in metrics.items()
                      if "/num_" not in k)
    facts = [("checkpoint", about.get("checkpoint") or "(not given)"), ("dataset", about.get("dataset") or "-"),
             ("split", about.get("split") or "-"), ("metrics (%)", shown or "-"),
             ("queries shown", header_lines(about, rows)[1].split("rows: ", 1)[-1])]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{css}</style></head><body><h1>{esc(title)}</h1><table class='about'>"
           + "".join(f"<tr><td><b>{esc(k)}</b></td><td>{esc(str(v))}</td></tr>" for k, v in facts) + "</table>"
           f"<p><span class='sw' style='border-color:rgb{QUERY}'></span>query"
           f"<span class='sw' style='border-color:rgb{RIGHT}'></span>neighbour of the same class"
           f"<span class='sw' style='border-color:rgb{WRONG}'></span>neighbour of another class. "
           "Worst = lowest AP@R; under each neighbour its class and cosine similarity.</p><table>"]
    for row in rows:
        out.append("<tr>")
        out.append(f"<td class='q'><img src='{_data_uri(row['path'], thumb)}' title='{esc(row['path'])}'>"
                   f"{esc(row['kind'])} #{row['id']} class {row['label']}<br>AP@R {row['AP@R']:.3f}</td>")
        for n in row["neighbours"]:
            cls = "ok" if n["correct"] else "bad"
            out.append(f"<td class='{cls}'><img src='{_data_uri(n['path'], thumb)}' "
                       f"title='{esc(n['path'])}'>#{n['id']} class {n['label']}<br>"
                       f"sim {n['similarity']:.3f}</td>")
        out.append("</tr>")
    out.append("</table></body></html>")
    path = Path(path)
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
