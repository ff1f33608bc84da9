"""python -m ddtas_lightning.evaluate through the CLI on a checkpoint of a tiny synthetic run: the same metrics
as the training run's final test, per-class metrics, gallery / map PNGs of the expected size, a
self-contained HTML page, and exports whose faiss index gives the evaluation's neighbours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ddtas_lightning.inspect.gallery import gallery_layout
from tests.test_train_cli import REPO, run_cli

N_WORST, N_RANDOM, TOP_K, THUMB = 3, 2, 4, 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    proc = run_cli("trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1", "trainer.accelerator=cpu",
                   tmp_path=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "swigfaiss" not in proc.stdout + proc.stderr  # the faiss loader's fallback lines are silenced
    assert "\r" not in proc.stdout  # not a terminal: progress lines, no bar frames
    assert "== config (the whole tree: " in proc.stdout and (tmp / "run" / "config_tree.yaml").is_file()
    return tmp


def run_eval(tmp: Path, *overrides: str, name: str = "eval") -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "ddtas_lightning.evaluate", f"hydra.run.dir={tmp}/{name}",
         f"paths.data_dir={tmp}/data", *overrides],
        capture_output=True, text=True, cwd=tmp, env=env, timeout=600,
    )


def best_checkpoint(tmp: Path) -> str:
    return json.loads((tmp / "run" / "metrics.json").read_text())["best_checkpoint"]


@pytest.fixture(scope="module")
def evaluated(trained) -> Path:
    proc = run_eval(trained, f"ckpt_path={best_checkpoint(trained)}", f"inspect.n_worst={N_WORST}",
                    f"inspect.n_random={N_RANDOM}", f"inspect.top_k={TOP_K}", f"inspect.thumb={THUMB}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "swigfaiss" not in proc.stdout + proc.stderr
    return trained / "eval"


def test_metrics_are_the_training_runs_final_test(trained, evaluated):
    train_metrics = json.loads((trained / "run" / "metrics.json").read_text())
    ev = json.loads((evaluated / "metrics.json").read_text())
    assert ev["test"] == train_metrics["test"]  # the same evaluation code on the same weights
    assert ev["per_class"] == train_metrics["test_per_class"]
    # per-class means, weighted by their queries, give back the aggregate R@1 and MAP@R
    per_class = ev["per_class"]
    n = sum(c["num_queries"] for c in per_class.values())
    for key in ("R@1", "MAP@R"):
        weighted = sum(c[key] * c["num_queries"] for c in per_class.values()) / n
        assert weighted == pytest.approx(ev["test"][f"test/{key}"], abs=1e-6)
    assert len(per_class) == 6  # the 6 synthetic test classes


def test_gallery_and_map_are_images_of_the_expected_size(evaluated):
    rows = json.loads((evaluated / "inspect" / "gallery.json").read_text())
    assert [r["kind"] for r in rows] == ["worst"] * N_WORST + ["random"] * N_RANDOM
    worst_ap = [r["AP@R"] for r in rows[:N_WORST]]
    assert worst_ap == sorted(worst_ap) and max(worst_ap) <= min(r["AP@R"] for r in rows[N_WORST:])
    for r in rows:
        assert len(r["neighbours"]) == TOP_K and r["id"] not in [n["id"] for n in r["neighbours"]]
        assert all(n["correct"] == (n["label"] == r["label"]) for n in r["neighbours"])
    with Image.open(evaluated / "inspect" / "gallery.png") as im:
        im.verify()
    lay = gallery_layout(TOP_K, THUMB, len(rows))  # a header, then one row of tiles + 2 caption lines per query
    with Image.open(evaluated / "inspect" / "gallery.png") as im:
        assert im.size == (max((TOP_K + 1) * THUMB, 560), lay["header"] + len(rows) * (THUMB + lay["caption"]))
        # every tile's frame: blue for the query, green / red as its neighbour is right / wrong
        px = im.convert("RGB")
        for i, r in enumerate(rows):
            y = lay["header"] + i * (THUMB + lay["caption"]) + 1
            assert px.getpixel((1, y)) == (40, 90, 200)
            for j, n in enumerate(r["neighbours"]):
                assert px.getpixel(((j + 1) * THUMB + 1, y)) == ((34, 160, 60) if n["correct"] else (210, 40, 40))
    with Image.open(evaluated / "inspect" / "embedding_map.png") as im:
        assert im.size == (800, 800)
        assert len(set(im.convert("RGB").getdata())) > 10  # not blank
    page = (evaluated / "inspect" / "gallery.html").read_text()
    assert page.count("src='data:image/jpeg;base64,") == len(rows) * (TOP_K + 1)  # self-contained
    # the header names what was evaluated: checkpoint, dataset, split, metrics; and the colour legend
    metrics = json.loads((evaluated / "metrics.json").read_text())
    for fact in (f"<td>{metrics['checkpoint']}</td>", "<td>synthetic</td>", "<td>test</td>",
                 f"R@1 {100 * metrics['test']['test/R@1']:.2f}", "neighbour of another class"):
        assert fact in page, fact


def readme_query_example(export_dir: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The README's example: load the exports and find each query's k nearest gallery images."""
    import faiss

    emb = np.load(export_dir / "embeddings.npy")          # (N, d), L2-normalised
    ids = np.load(export_dir / "ids.npy")                  # dataset index of each row
    index = faiss.read_index(str(export_dir / "gallery.faiss"))
    sims, nbr_ids = index.search(emb, k + 1)               # ids of the gallery items; first hit: the query itself
    keep = nbr_ids != ids[:, None]                         # drop the query itself
    nbr_ids = np.stack([row[m][:k] for row, m in zip(nbr_ids, keep)])
    return ids, nbr_ids


def test_exports_reload_and_give_the_evaluation_neighbours(evaluated):
    from ddtas_lightning.inspect import load_exports

    export = evaluated / "export"
    loaded = load_exports(export)
    n = len(loaded["ids"])
    assert loaded["embeddings"].shape == (n, 16) and loaded["embeddings"].dtype == np.float32
    assert np.allclose(np.linalg.norm(loaded["embeddings"], axis=1), 1.0, atol=1e-5)
    assert loaded["index"].ntotal == int(loaded["is_gallery"].sum()) == n
    assert all(Path(p).is_file() for p in loaded["paths"])
    ids, nbr = readme_query_example(export, TOP_K)
    row_of = {int(i): r for r, i in enumerate(ids)}
    for r in json.loads((evaluated / "inspect" / "gallery.json").read_text()):
        assert nbr[row_of[r["id"]]].tolist() == [x["id"] for x in r["neighbours"]]
    # and R@1 from the exports alone is the evaluation's
    labels = loaded["labels"]
    r1 = np.mean([labels[row_of[int(nbr[i, 0])]] == labels[i] for i in range(n)])
    ev = json.loads((evaluated / "metrics.json").read_text())
    assert r1 == pytest.approx(ev["test"]["test/R@1"], abs=1e-6)


@pytest.mark.slow  # two more evaluate processes
def test_val_split_and_bad_input(trained, evaluated):  # evaluated: the test-split run it compares with
    proc = run_eval(trained, f"ckpt_path={best_checkpoint(trained)}", "split=val", "inspect.map=false",
                    "inspect.gallery=false", "inspect.export=false", name="eval_val")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((trained / "eval_val" / "metrics.json").read_text())
    assert ev["split"] == "val" and ev["per_class"]
    test_classes = set(json.loads((trained / "eval" / "metrics.json").read_text())["per_class"])
    assert test_classes.isdisjoint(ev["per_class"])  # validation classes are train classes
    # a checkpoint copied away from its run dir (no .hydra/ beside it) carries its config itself
    import shutil

    moved = trained / "elsewhere" / "model.ckpt"
    moved.parent.mkdir(exist_ok=True)
    shutil.copy(best_checkpoint(trained), moved)
    proc = run_eval(trained, f"ckpt_path={moved}", "inspect.map=false", "inspect.gallery=false",
                    "inspect.export=false", name="eval_moved")
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved_metrics = json.loads((trained / "eval_moved" / "metrics.json").read_text())["test"]
    assert moved_metrics == json.loads((trained / "eval" / "metrics.json").read_text())["test"]
    proc = run_eval(trained, "ckpt_path=/nonexistent.ckpt", name="eval_bad")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ckpt_path")
    proc = run_eval(trained, f"ckpt_path={best_checkpoint(trained)}", "split=train", name="eval_bad2")
    assert proc.returncode == 2 and "split" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # one more evaluate process
def test_another_dataset_keeps_the_models_preprocessing(trained):
    proc = run_eval(trained, f"ckpt_path={best_checkpoint(trained)}", "dataset=synthetic",
                    "dataset.source.num_classes=12", "dataset.source.images_per_class=3", "dataset.image_size=48",
                    "dataset.recall_ks=[1]", "inspect.map=false", "inspect.export=false", name="eval_other")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((trained / "eval_other" / "metrics.json").read_text())
    assert ev["test"]["test/num_queries"] == 18 and set(ev["per_class"]) == {str(c) for c in range(7, 13)}
    assert "test/R@2" not in ev["test"]  # the new dataset's recall_ks
    rebuilt = OmegaConf.load(trained / "eval_other" / "eval_config.yaml")
    assert rebuilt.dataset.image_size == 48 and rebuilt.transform.image_size == 32  # trained at 32 px
