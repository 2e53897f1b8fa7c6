"""plots.py and evaluation_model.py --plots: real PNG files of the expected size (pixels are not checked).

    python3 -m pytest -q tests/test_plots.py
"""
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import plots  # noqa: E402
from train_fixtures import make_fake_cache  # noqa: E402


@pytest.fixture(scope="module")
def trained_ckpt(synth_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plots_run")
    cache = make_fake_cache(synth_data, tmp / "emb", dim=32)
    cmd = [sys.executable, str(ROOT / "main.py"), "--data", synth_data, "--embedding_path", cache, "--output_dir",
           str(tmp / "logs"), "--run_name", "p", "--backbone", "res_tiny", "--text_backbone", "char_tiny",
           "--image_size", "64x32", "--feature_dim", "32", "--batch_size", "8", "--workers", "0", "--warmup", "2",
           "--iters", "6", "--eval_every", "3", "--save_every", "3", "--val_ratio", "0.2", "--log_every", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return tmp / "logs" / "expModel-res_tiny-64x32-32" / "p" / "last.pt"


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # width, height


def _emb(n_ids=6, per_id=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, d))
    img = np.repeat(centres, per_id, 0) + 0.3 * rng.standard_normal((n_ids * per_id, d))
    cap = img + 0.3 * rng.standard_normal(img.shape)
    pids = np.repeat(np.arange(n_ids), per_id)
    n = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return n(img), n(cap), np.arange(len(img)), pids, pids


def test_det_curve_is_monotone_and_exact_on_small_sets():
    img, cap, own, ip, cp = _emb()
    far, frr = plots.det_curve(img, cap, own, ip, cp)
    assert np.all(np.diff(far) <= 0) and np.all(np.diff(frr) >= 0)  # thresholds ascending
    assert far[0] == 1.0 and frr[0] == 0.0 and 0 <= far[-1] <= 1e-1
    s = cap @ img.T
    neg = s[cp[:, None] != ip[None, :]]
    t = np.median(neg)
    k = int(np.searchsorted(np.unique(np.concatenate([s[np.arange(len(cap)), own], neg])), t))
    assert far[k] == pytest.approx((neg >= t).mean())
    sub = plots.det_curve(img, cap, own, ip, cp, max_pairs=40, seed=1)  # sampled captions still give a curve
    assert len(sub[0]) > 3


def test_plots_write_pngs(tmp_path):
    img, cap, own, ip, cp = _emb()
    curves = {"teacher": plots.det_curve(img, cap, own, ip, cp), "student": plots.det_curve(cap, img, own, ip, cp)}
    assert png_size(plots.plot_det(curves, tmp_path / "det.png")) == (700, 500)
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 255, (64, 32, 3), dtype=np.uint8) for _ in range(5)]
    rows = [("a man in a red shirt", [(t, 0.5 - 0.1 * i, i == 0) for i, t in enumerate(tiles)]),
            ("女人，红色外套", [(t, 0.4, False) for t in tiles[:3]])]
    w, h = png_size(plots.plot_retrieval_sheet(rows, tmp_path / "retrieval.png"))
    assert w == 800 and h == 580  # 5 columns x 2 rows at 100 dpi
    log = tmp_path / "train.log"
    log.write_text("2026-01-01 00:00:00,000-INFO:Iter:10| total: 3.0\n"
                   "2026-01-01 00:00:01,000-INFO:Eval Iter:100| eer: 30.5 r1: 10.0 r5: 20.0\n"
                   "2026-01-01 00:00:02,000-INFO:Eval Iter:200| eer: 20.0 r1: 40.0 r5: 60.0\n")
    points = plots.read_eval_log(log)
    assert points == {100: {"eer": 30.5, "r1": 10.0, "r5": 20.0}, 200: {"eer": 20.0, "r1": 40.0, "r5": 60.0}}
    assert png_size(plots.plot_learning_curve(points, tmp_path / "lc.png")) == (700, 400)
    assert png_size(plots.plot_learning_curve({}, tmp_path / "empty.png")) == (700, 400)  # no eval yet: still a file
    assert plots.png_to_array(tmp_path / "lc.png").shape == (400, 700, 3)


def test_evaluation_model_plots(tmp_path, trained_ckpt):
    import evaluation_model
    out = tmp_path / "plots"
    args = evaluation_model.get_args_parser(add_help=True).parse_args(
        [str(trained_ckpt), "--plots", str(out), "--workers", "0", "--plot_queries", "2"])
    evaluation_model.main(args)
    assert png_size(out / "det.png") == (700, 500)
    assert png_size(out / "learning_curve.png") == (700, 400)
    w, h = png_size(out / "retrieval.png")
    assert w > 300 and h > 200
    events = list(Path(trained_ckpt).parent.glob("events.out.tfevents.*"))
    assert events and max(e.stat().st_size for e in events) > 10_000  # the images went into TensorBoard


def test_attribute_probe_scores_words_on_validation_ids(trained_ckpt, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import attribute_probe
    out = tmp_path / "probe.json"
    args = attribute_probe.get_args_parser(add_help=True).parse_args(
        [str(trained_ckpt), "--min_positives", "1", "--steps", "50", "--json", str(out)])
    res = attribute_probe.main(args)
    assert res and all(v is None or 0.0 <= v <= 1.0 for v in res.values())
    assert any(k.startswith("gender:") for k in res)
    import json
    assert json.loads(out.read_text())["auc"] == res
    assert attribute_probe.roc_auc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == 1.0
    assert attribute_probe.roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5  # ties
    assert attribute_probe.roc_auc(np.array([0.1, 0.2]), np.array([1, 1])) is None
