"""metrics.py against slow, obviously-correct references (full score matrix, sorts and loops), and
evaluation_labels.py end to end on a tiny cache.   python3 -m pytest -q tests/test_metrics.py

Most cases use "dyadic" embeddings (entries on a 2^-10 grid, |x| <= ~1): every dot product is then exact in
float32 whatever the summation order, so the blockwise float32 scores and the reference's float64 matrix agree
bit for bit and the comparisons can be exact, ties included. Coarse grids make massive ties on purpose.
"""
import json
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import metrics  # noqa: E402

LEVELS = (1e-2, 1e-3, 1e-4, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# data

def make_case(seed, n_id=12, max_img=4, max_cap=3, dim=16, grid=1024, noise=1.0, orphan=0.1):
    """Identities with several images, each with several captions; some captions lose their image (-1)."""
    rng = np.random.default_rng(seed)
    img_pids = np.concatenate([[p] * int(rng.integers(1, max_img + 1)) for p in range(n_id)])
    rng.shuffle(img_pids)
    cen = rng.normal(size=(n_id, dim))
    img = cen[img_pids] + noise * rng.normal(size=(len(img_pids), dim))
    cii = np.concatenate([[i] * int(rng.integers(1, max_cap + 1)) for i in range(len(img_pids))])
    cii = rng.permutation(cii)
    cap = cen[img_pids[cii]] + noise * rng.normal(size=(len(cii), dim))
    q = lambda x: np.round(x / np.linalg.norm(x, axis=1, keepdims=True) * grid) / grid  # noqa: E731
    img, cap = q(img).astype(np.float32), q(cap).astype(np.float32)
    cap_pids = img_pids[cii]
    cii = np.where(rng.random(len(cii)) < orphan, -1, cii)
    return img, cap, cii, img_pids, cap_pids


# ----------------------------------------------------------------------------------------------------------------
# references: the definitions, written the slow way

def ref_verification(img, cap, cii, img_pids, cap_pids, levels=LEVELS, top_k=5, S=None):
    if S is None:
        S = img.astype(np.float64) @ cap.astype(np.float64).T
    pos = [(S[i, j], i, j) for j, i in enumerate(cii) if i >= 0]
    neg = [(S[i, j], i, j) for i in range(len(img)) for j in range(len(cap)) if img_pids[i] != cap_pids[j]]
    P = np.array([p[0] for p in pos])
    N = np.array([n[0] for n in neg])
    out = dict(n_pos=len(P), n_neg=len(N), score_min=min(P.min(), N.min()), score_max=max(P.max(), N.max()))
    best = None
    for t in sorted(set(P.tolist())):  # EER candidates: the distinct positive scores, ties -> smallest t
        far, frr = Fraction(int((N >= t).sum()), len(N)), Fraction(int((P < t).sum()), len(P))
        if best is None or abs(far - frr) < best[0]:
            best = (abs(far - frr), t, far, frr)
    out["eer"], out["eer_threshold"] = float((best[2] + best[3]) / 2) * 100, best[1]
    out["levels"] = []
    for x in levels:
        if x > 0 and x * len(N) < 1:
            out["levels"].append(None)
            continue
        cands = sorted(float(np.nextafter(np.float32(v), np.float32(np.inf))) for v in set(N.tolist()))
        t = next(t for t in cands if (N >= t).sum() / len(N) <= x)  # smallest float32 t with FAR(t) <= x
        out["levels"].append((100.0 * (P < t).sum() / len(P), t))
    out["false_rejects"] = [(i, j, s) for s, i, j in sorted(pos)[:top_k]]
    out["false_accepts"] = [(i, j, s) for s, i, j in sorted(neg, key=lambda n: (-n[0], n[1], n[2]))[:top_k]]
    return out


def ref_retrieval(q, qp, g, gp, ks=(1, 5, 10)):
    """IRRA's evaluator with a stable sort (ties by gallery index), queries without a match dropped."""
    S = q.astype(np.float64) @ g.astype(np.float64).T
    hits, aps, inps, n = np.zeros(len(ks)), [], [], 0
    for r in range(len(q)):
        order = np.lexsort((np.arange(len(g)), -S[r]))
        matches = (gp[order] == qp[r]).astype(np.float64)
        if not matches.any():
            continue
        n += 1
        cmc = np.cumsum(matches)
        hits += [cmc[k - 1] > 0 if k <= len(g) else True for k in ks]
        aps.append(((cmc / np.arange(1, len(g) + 1)) * matches).sum() / matches.sum())
        last = np.nonzero(matches)[0][-1]
        inps.append(cmc[last] / (last + 1))
    return {**{f"R@{k}": 100 * h / n for k, h in zip(ks, hits)}, "mAP": 100 * np.mean(aps),
            "mINP": 100 * np.mean(inps), "n_queries": n, "n_excluded": len(q) - n}


def check_verification(res, ref):
    assert res["n_pos"] == ref["n_pos"] and res["n_neg"] == ref["n_neg"]
    assert res["verify_count"] == ref["n_pos"] + ref["n_neg"]
    assert res["score_min"] == ref["score_min"] and res["score_max"] == ref["score_max"]
    assert res["eer"] == pytest.approx(ref["eer"], rel=1e-12, abs=1e-12)
    assert res["eer_threshold"] == ref["eer_threshold"]
    for e, r in zip(res["far_levels"], ref["levels"]):
        if r is None:
            assert not e["resolvable"] and e["frr"] is None and e["threshold"] is None
        else:
            assert e["resolvable"]
            assert e["frr"] == pytest.approx(r[0], rel=1e-12) and e["threshold"] == r[1]
    assert res["false_rejects"] == ref["false_rejects"]
    assert res["false_accepts"] == ref["false_accepts"]


def check_retrieval(res, ref):
    for k in ("R@1", "R@5", "R@10", "mAP", "mINP"):
        assert res[k] == pytest.approx(ref[k], rel=1e-12), k
    assert res["n_queries"] == ref["n_queries"] and res["n_excluded"] == ref["n_excluded"]


# ----------------------------------------------------------------------------------------------------------------
# verification

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block,tile_rows", [(1, 256), (37, 256), (50, 4), (1 << 22, 256)])
def test_verification_matches_reference(seed, block, tile_rows, monkeypatch):
    """1x1 tiles, 37 rows x 1 column, 4 rows x ~12 columns (2-D tiles), everything in one tile."""
    monkeypatch.setattr(metrics, "_TILE_ROWS", tile_rows)
    img, cap, cii, ip, cp = make_case(seed)
    res = metrics.verification(img, cap, cii, ip, cp, far_levels=LEVELS, top_k=5, block=block)
    check_verification(res, ref_verification(img, cap, cii, ip, cp))


@pytest.mark.parametrize("grid,cells,tile_rows,per_cell", [(4, 16, 256, 16), (4, 16, 3, 16), (2, 16, 5, 16),
                                                           (8, 1, 256, 16), (1024, 1, 4, 16), (1024, 1, 4, 0)])
def test_verification_ties(grid, cells, tile_rows, per_cell, monkeypatch):
    """Coarse grids: thousands of equal scores across positives, negatives and tile boundaries (rows and columns);
    cells=1 puts most scores in lookup cells that hold a positive (the look-closer path; per_cell=0: its binary
    search fallback)."""
    monkeypatch.setattr(metrics, "_CELLS_PER_POSITIVE", cells)
    monkeypatch.setattr(metrics, "_MAX_PER_CELL", per_cell)
    monkeypatch.setattr(metrics, "_TILE_ROWS", tile_rows)
    img, cap, cii, ip, cp = make_case(10 + grid, n_id=15, dim=6, grid=grid, noise=0.7)
    S = img.astype(np.float64) @ cap.T
    if grid <= 8:
        assert len(np.unique(S)) < S.size / 10  # really tied
    res = metrics.verification(img, cap, cii, ip, cp, far_levels=LEVELS, top_k=7, block=50)
    check_verification(res, ref_verification(img, cap, cii, ip, cp, top_k=7))


def test_verification_continuous_float32():
    """Plain float32 data (no grid). Each pair is scored once by a float32 GEMM whose rounding depends on the block
    shape, so the float64 reference can differ by ulps: counts must agree, figures to within float32 rounding."""
    img, cap, cii, ip, cp = make_case(3, n_id=20)
    rng = np.random.default_rng(3)
    img = img + rng.normal(scale=1e-3, size=img.shape).astype(np.float32)
    cap = cap + rng.normal(scale=1e-3, size=cap.shape).astype(np.float32)
    ref = ref_verification(img, cap, cii, ip, cp)
    for block in (1, 100, 1 << 22):
        res = metrics.verification(img, cap, cii, ip, cp, far_levels=LEVELS, top_k=5, block=block)
        assert res["n_pos"] == ref["n_pos"] and res["n_neg"] == ref["n_neg"]
        assert res["eer"] == pytest.approx(ref["eer"], abs=0.2)
        assert res["eer_threshold"] == pytest.approx(ref["eer_threshold"], abs=1e-5)
        for e, r in zip(res["far_levels"], ref["levels"]):
            assert e["resolvable"] == (r is not None)
            if r is None:
                continue
            assert e["frr"] == pytest.approx(r[0], abs=100 / res["n_pos"] + 1e-9)
            assert e["threshold"] == pytest.approx(r[1], abs=1e-5)
        for key in ("false_rejects", "false_accepts"):
            assert [s for *_, s in res[key]] == pytest.approx([s for *_, s in ref[key]], abs=1e-5)


def test_perfect_model():
    """Orthogonal identity vectors: every positive scores 1, every negative 0."""
    ip = np.repeat(np.arange(10), 3)
    img = np.eye(16, dtype=np.float32)[ip]
    cii = np.repeat(np.arange(30), 2)
    cap = img[cii].copy()
    r = metrics.evaluate_embeddings(img, cap, cii, ip, ip[cii], top_k=3, block=64)
    v = r["verification"]
    assert v["eer"] == 0.0 and v["eer_threshold"] == 1.0
    assert all(e["frr"] == 0.0 for e in v["far_levels"] if e["resolvable"])
    assert v["far_levels"][-1]["threshold"] == float(np.nextafter(np.float32(0), np.float32(1)))
    assert v["score_min"] == 0.0 and v["score_max"] == 1.0
    for d in ("t2i", "i2t"):
        assert r[d]["R@1"] == r[d]["mAP"] == r[d]["mINP"] == 100.0
    h = r["headline"]
    assert h["eer"] == 0.0 and h["r1"] == h["map"] == h["minp"] == h["i2t_r1"] == 100.0 and "frr@1e-3" in h


def test_far_resolvability():
    """n_neg = 1000 resolves FAR=1e-3 (one false accept allowed) but not 1e-4; FAR=0 always."""
    # 2 identities x 1 image; 1000 captions of id 1 make the negatives of image 0, image 1 has 1 caption of id 0
    rng = np.random.default_rng(0)
    img = np.eye(8, dtype=np.float32)[:2]
    cap = np.round(rng.normal(size=(1002, 8)) * 64) / 256
    cap = cap.astype(np.float32)
    cp = np.array([0, 0] + [1] * 1000)
    cii = np.array([0, 0] + [-1] * 1000)
    ip = np.array([0, 1])
    res = metrics.verification(img, cap, cii, ip, cp, far_levels=(1e-2, 1e-3, 1e-4, 1e-6, 0.0))
    assert res["n_neg"] == 1002 and res["n_pos"] == 2
    assert [e["resolvable"] for e in res["far_levels"]] == [True, True, False, False, True]
    assert [e["allowed"] for e in res["far_levels"]][:2] == [10, 1]
    check_verification(res, ref_verification(img, cap, cii, ip, cp, levels=(1e-2, 1e-3, 1e-4, 1e-6, 0.0),
                                             top_k=15))
    table = metrics.format_verification_table(res)
    assert table.splitlines()[2].split()[4:6] == ["n/a", "n/a"] and table.splitlines()[3].split()[4:6] == ["n/a"] * 2
    assert table.splitlines()[2].split()[3] == f"{res['far_levels'][1]['frr']:.4f}%"
    # exactly on the boundary: 1e-3 * 1000 == 1 is resolvable
    assert metrics._allowed_false_accepts(1e-3, 1000) == 1 and metrics._allowed_false_accepts(1e-3, 999) == 0


def test_float16_and_torch_inputs():
    img, cap, cii, ip, cp = make_case(5, grid=256)  # on a 2^-8 grid: exact in float16
    ref = metrics.evaluate_embeddings(img, cap, cii, ip, cp, block=40)
    for conv in (lambda a: a.astype(np.float16), lambda a: torch.from_numpy(a).half()):
        r = metrics.evaluate_embeddings(conv(img), conv(cap), torch.from_numpy(cii), ip.tolist(), cp, block=40)
        assert r["headline"] == ref["headline"]
        assert r["verification"]["false_accepts"] == ref["verification"]["false_accepts"]


def test_bad_input():
    img, cap, cii, ip, cp = make_case(0)
    with pytest.raises(ValueError, match="wrong order"):
        metrics.verification(img, cap, cp, ip, cii.clip(0))  # cap_pids and cap_img_index swapped
    with pytest.raises(ValueError, match="expected .* integers"):
        metrics.verification(img, cap, ip, cp, cii)  # the (img_pids, cap_pids, cap_img_index) order
    bad = img.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.verification(bad, cap, cii, ip, cp)
    with pytest.raises(ValueError, match="no positive"):
        metrics.verification(img, cap, np.full_like(cii, -1), ip, cp)
    with pytest.raises(ValueError, match=r"\[-1, "):
        metrics.verification(img, cap, cii + len(img), ip, cp)
    with pytest.raises(ValueError, match="FAR level"):
        metrics.verification(img, cap, cii, ip, cp, far_levels=(1.0,))


# ----------------------------------------------------------------------------------------------------------------
# retrieval

@pytest.mark.parametrize("grid,block,tile_rows", [(1024, 1, 256), (1024, 100, 256), (1024, 60, 4), (4, 7, 256),
                                                  (4, 40, 3), (2, 1 << 22, 256)])
def test_retrieval_matches_reference(grid, block, tile_rows, monkeypatch):
    monkeypatch.setattr(metrics, "_TILE_ROWS", tile_rows)
    img, cap, cii, ip, cp = make_case(7 + grid, n_id=15, dim=8, grid=grid)
    for q, qp, g, gp in ((cap, cp, img, ip), (img, ip, cap, cp)):
        check_retrieval(metrics.retrieval(q, qp, g, gp, block=block), ref_retrieval(q, qp, g, gp))


def test_retrieval_ties_break_by_gallery_index():
    """All scores equal: the ranking is the gallery order, so R@1 is 100 only for the id listed first."""
    g = np.ones((6, 4), np.float32) / 2
    gp = np.array([3, 1, 3, 2, 2, 1])
    q = np.ones((3, 4), np.float32) / 2
    r = metrics.retrieval(q, np.array([3, 1, 2]), g, gp, ks=(1, 2))
    assert r["R@1"] == pytest.approx(100 / 3) and r["R@2"] == pytest.approx(200 / 3)
    # AP: id3 at ranks 1,3 -> (1+2/3)/2; id1 at 2,6 -> (1/2+2/6)/2; id2 at 4,5 -> (1/4+2/5)/2
    assert r["mAP"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 6) / 2 + (1 / 4 + 2 / 5) / 2) / 3)
    assert r["mINP"] == pytest.approx(100 * (2 / 3 + 2 / 6 + 2 / 5) / 3)


def test_retrieval_excludes_queries_without_match():
    img, cap, cii, ip, cp = make_case(2)
    cp2 = cp.copy()
    cp2[:5] = 999  # ids not in the gallery
    r = metrics.retrieval(cap, cp2, img, ip, block=30)
    assert r["n_excluded"] == 5 and r["n_queries"] == len(cap) - 5
    check_retrieval(r, ref_retrieval(cap, cp2, img, ip))


# ----------------------------------------------------------------------------------------------------------------
# printing

SEED_TABLE = """\
        EER      FAR=1e-3  FAR=1e-4  FAR=1e-5  FAR=1e-6  FAR=0
----------------------------------------------------------------
FRR    12.2132%  90.5400%  98.5000%  99.9200%  100.0000%  100.0000%
SCORE   0.0641772 0.153719  0.180852  0.201203  0.213413  0.217483"""


def test_table_reproduces_the_seed():
    lv = [dict(label=lab, frr=f, threshold=t, resolvable=True) for lab, f, t in
          [("1e-3", 90.54, 0.153719), ("1e-4", 98.5, 0.180852), ("1e-5", 99.92, 0.201203),
           ("1e-6", 100.0, 0.213413), ("0", 100.0, 0.217483)]]
    res = dict(eer=12.2132, eer_threshold=0.0641772, far_levels=lv, verify_count=12466498,
               score_min=-0.2114, score_max=0.7437)
    out = metrics.format_verification_table(res)
    assert out.startswith(SEED_TABLE + "\n")
    assert out.splitlines()[-1] == "Verify Count=12466498. Score in [ -0.21 - 0.74 ]"
    assert [metrics.format_far(x) for x in (1e-3, 1e-6, 0, 0.015, 5e-4)] == ["1e-3", "1e-6", "0", "1.5e-2", "5e-4"]


def test_printed_figures_and_error_lists():
    img, cap, cii, ip, cp = make_case(1)
    r = metrics.evaluate_embeddings(img, cap, cii, ip, cp, top_k=4, block=100)
    v = r["verification"]
    lines = metrics.format_verification_table(v).splitlines()
    assert lines[2].split()[1] == f"{v['eer']:.4f}%"
    assert lines[3].split()[1] == f"{v['eer_threshold']:g}"
    assert lines[2].split()[2] == f"{v['far_levels'][0]['frr']:.4f}%"
    assert lines[4] == (f"Verify Count={v['n_pos'] + v['n_neg']}. "
                        f"Score in [ {v['score_min']:.2f} - {v['score_max']:.2f} ]")
    names = [f"{p}/img{i}.jpg" for i, p in enumerate(ip)]
    cnames = [f"{p}/cap{j}.jpg_caption" for j, p in enumerate(cp)]
    el = metrics.format_error_lists(v, names, cnames, 4).splitlines()
    assert el[0] == "Top-4 False Rejected:" and el[5] == "Top-4 False Accepted:" and len(el) == 10
    i, j, s = v["false_accepts"][0]
    assert el[6] == f"\t {names[i]} {cnames[j]} {s!r}" and ip[i] != cp[j]
    i, j, s = v["false_rejects"][0]
    assert el[1] == f"\t {names[i]} {cnames[j]} {s!r}" and cii[j] == i
    rt = metrics.format_retrieval(r["t2i"], r["i2t"]).splitlines()
    assert rt[0].split() == ["R@1", "R@5", "R@10", "mAP", "mINP", "queries"]
    assert rt[1].split()[:3] == ["t2i", f"{r['t2i']['R@1']:.2f}", f"{r['t2i']['R@5']:.2f}"]
    assert rt[2].split()[0] == "i2t"
    json.dumps(metrics.to_jsonable(r))  # serialisable


# ----------------------------------------------------------------------------------------------------------------
# evaluation_labels.py end to end on a tiny cache

def _tiny_dataset(tmp_path, n_id=6):
    import data
    from embedding_cache import EmbeddingCache
    recs = [{"id": p, "file_path": f"imgs/{p}_{k}.jpg", "captions": [f"person {p} view {k} a", f"person {p} b"],
             "split": "test"} for p in range(n_id) for k in range(2)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    records = data.load_records(path)
    n_cap = len(data.caption_rows(records))
    counts = {"image": len(recs), "caption": n_cap, "attributes": len(recs), "prompt_caption": len(recs)}
    c = EmbeddingCache.create(tmp_path / "emb", {"teacher": "fake", "teacher_kind": "siglip", "multilingual": False,
                                                 "dataset": str(path), "dataset_sha256": data.dataset_hash(path)},
                              counts, dim=8)
    rng = np.random.default_rng(0)
    cen = rng.normal(size=(n_id, 8))
    n_img = len(recs) - 1  # the last record gets no image embedding
    c.write("image", np.arange(n_img), cen[[r["id"] for r in records][:n_img]] + 0.3 * rng.normal(size=(n_img, 8)))
    cap_pid = [records[r]["id"] for r, *_ in data.caption_rows(records)]
    c.write("caption", np.arange(n_cap), cen[cap_pid] + 0.5 * rng.normal(size=(n_cap, 8)))
    return path, tmp_path / "emb", records


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "evaluation_labels.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_evaluation_labels_end_to_end(tmp_path):
    path, emb, records = _tiny_dataset(tmp_path)
    out = tmp_path / "res.json"
    p = _run("--data", path, "--embedding_path", emb, "--top_k", 3, "--json", out)
    assert p.returncode == 0, p.stderr
    assert "FAR=1e-3" in p.stdout and "Verify Count=" in p.stdout and "Top-3 False Accepted:" in p.stdout
    assert f"\t {records[0]['id']}/imgs/" in p.stdout and re.search(r"\.jpg_caption\d+ ", p.stdout)
    # caption names carry their index within the record, so one image's captions never share a name
    rejected = p.stdout.split("Top-3 False Rejected:")[1].split("Top-3")[0]
    fr = [ln.split()[1] for ln in rejected.splitlines() if ln.strip()]
    assert len(fr) == len(set(fr))
    res = json.loads(out.read_text())
    # 11 images have an embedding (the last record's does not): its 2 captions only make negatives
    assert res["n_images"] == 11 and res["n_captions"] == 24 and res["verification"]["n_pos"] == 22
    assert res["verification"]["n_neg"] == 11 * 24 - (5 * 2 + 1) * 4  # minus the same-id pairs
    assert res["headline"]["eer"] == res["verification"]["eer"]
    assert f"Verify Count={res['verification']['verify_count']}." in p.stdout


def _run_inproc(capsys, *args):
    import evaluation_labels
    parser = evaluation_labels.get_args_parser(add_help=True)
    with pytest.raises(SystemExit) as e:
        evaluation_labels.main(parser.parse_args([str(a) for a in args]))
    return e.value.code, capsys.readouterr().err


def test_evaluation_labels_errors(tmp_path, capsys):
    """Bad input ends with one `error: ...` line and exit status 2 (in-process: a subprocess each is slow)."""
    path, emb, _ = _tiny_dataset(tmp_path)
    code, err = _run_inproc(capsys, "--data", path, "--embedding_path", tmp_path / "nowhere")
    assert code == 2 and err.startswith("error:") and "nowhere" in err
    (tmp_path / "empty").mkdir()
    code, err = _run_inproc(capsys, "--data", path, "--embedding_path", tmp_path / "empty")
    assert code == 2 and "no teacher cache" in err
    other = tmp_path / "other.json"
    other.write_text(path.read_text().replace("view", "pose"))
    code, err = _run_inproc(capsys, "--data", other, "--embedding_path", emb)
    assert code == 2 and "cache was built for" in err and len(err.strip().splitlines()) == 1
    code, err = _run_inproc(capsys, "--data", path, "--embedding_path", emb, "--langs", "zh")  # no zh captions
    assert code == 2 and "no zh caption rows" in err
    code, err = _run_inproc(capsys, "--data", path, "--embedding_path", emb, "--split", "test", "--test_ratio", "0",
                            "--langs", "fr")
    assert code == 2 and "--langs" in err


def test_evaluation_labels_max_images(tmp_path, capsys):
    import evaluation_labels
    path, emb, _ = _tiny_dataset(tmp_path)
    args = evaluation_labels.get_args_parser(add_help=True).parse_args(
        ["--data", str(path), "--embedding_path", str(emb), "--max_images", "4", "--top_k", "2"])
    res = evaluation_labels.main(args)
    out = capsys.readouterr().out
    assert ": 4 images, 8 captions (en), 2 identities" in out and "Top-2 False Rejected:" in out
    assert res["verification"]["n_pos"] == 8 and res["verification"]["n_neg"] == 4 * 8 - 4 * 4
