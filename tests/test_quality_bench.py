"""bench/quality.py end to end in its --smoke configuration (24 ids x 2 images, 6 iterations, tiny student, the
in-process bag-of-words hash teacher instead of all-MiniLM-L6-v2; ~45 s on 2 busy cores), plus its one-line error.
Structure only: the figures of a 10-iteration student mean nothing, so quality is never asserted.

    python3 -m pytest -q tests/test_quality_bench.py
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "quality.py"
NUM = r"\d+(?:\.\d+)?\*?"  # a figure; '*' marks the English-only teacher's Chinese rows


def _run(*argv, timeout=300):
    # from another folder: the script must find the repo on its own
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT / "tests"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    r = _run("--smoke", "--out", str(out))
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout, out


def _row(out, label):
    m = re.search(r"^" + re.escape(label) + r"\s+(.*)$", out, re.M)
    assert m, f"row {label!r} missing"
    return m.group(1).split()


def test_table_has_teacher_student_and_text_only_figures(smoke):
    out, _ = smoke
    header = next(l for l in out.splitlines() if l.split() == ["teacher", "student", "text-only"])
    assert header
    for label in ("EER (%)", "R@1 (%)", "R@5 (%)", "mAP (%)", "paraphrase R@1 (%): dataset en",
                  "paraphrase R@1 (%): new-en (composed)", "paraphrase R@1 (%): dataset zh",
                  "paraphrase R@1 (%): new-zh (composed)"):
        vals = _row(out, label)
        assert len(vals) == 3 and all(re.fullmatch(NUM, v) for v in vals), (label, vals)
    vals = _row(out, "FRR@FAR=1e-3 (%)")  # 10 images x 25 captions cannot resolve 1e-3: n/a is the honest answer
    assert len(vals) == 3 and all(re.fullmatch(NUM + "|n/a", v) for v in vals)
    for name in ("keywords", "fragment", "fields", "keywords-zh"):
        vals = _row(out, f"query form R@1 (%): {name}")
        assert len(vals) == 3 and all(re.fullmatch(NUM, v) for v in vals), (name, vals)
        vals = _row(out, f"attribute-match R@1 (%): {name}")
        assert len(vals) == 3 and all(re.fullmatch(NUM, v) for v in vals), (name, vals)
    for name in ("en", "new-en", "zh", "new-zh"):
        vals = _row(out, f"text-only: mean cos to teacher {name}")
        assert vals[:2] == ["-", "-"] and re.fullmatch(r"-?\d\.\d{3}", vals[2])


def test_commands_wall_time_and_json(smoke):
    out, folder = smoke
    assert "SMOKE configuration" in out
    cmds = out.split("\ncommands:\n", 1)[1]
    assert "tools/make_synthetic_pedes.py" in cmds and cmds.count("main.py") == 2 and "--text_only" in cmds
    assert re.search(r"^wall time: .*total \d+s", out, re.M)
    res = json.loads((folder / "quality.json").read_text())
    for col in ("teacher", "student", "text_only"):
        assert isinstance(res[col]["eer"], float) and isinstance(res[col]["r1"], float)
        forms = {"keywords", "fragment", "fields", "reordered", "search", "keywords+noise", "keywords-zh",
                 "search-zh"}
        names = {"en", "new-en", "zh", "new-zh"} | forms
        assert set(res[col]["paraphrase_r1"]) == names and set(res[col]["attr_r1"]) == names
        for k in names:  # attribute match counts every identity hit, and more
            assert res[col]["attr_r1"][k] >= res[col]["paraphrase_r1"][k] - 1e-9, (col, k)
        if col != "teacher":  # the students' forms once more with every word kept; main.py stored a word list
            assert set(res[col]["unfiltered_r1"]) == forms and res[col]["query_vocab_words"] > 50
    hub = res["student"]["hub"]  # search/'s hub-corrected ranking, student only
    assert set(hub["paraphrase_r1"]) == names and all(0 <= v <= 100 for v in hub["attr_r1"].values())
    assert "search, hub-corrected R@1 (%): keywords" in out
    for name in ("det", "retrieval", "learning_curve"):
        png = Path(res["student"]["plots"][name])
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(isinstance(v, float) for v in res["text_only"]["mean_cos_to_teacher"].values())
    assert res["config"]["mode"] == "smoke" and res["commands"] and res["wall_time_s"]["total"] > 0
    assert not list(folder.glob("*.tmp.*"))  # written atomically


def test_bad_size_is_one_line():
    msg = "error: --ids must be >= 2, --iters >= 1 and --extra_train_ids >= 0"
    for bad in (["--ids", "1"], ["--extra_train_ids", "-3"]):
        r = _run("--smoke", *bad, "--out", "/nonexistent-never-created")
        assert r.returncode != 0 and r.stderr.strip() == msg, (bad, r.stderr)


def test_wording_val_scores_checkpoints_side_by_side(smoke, tmp_path):
    """bench/wording_val.py on the smoke run's student: a fresh-seed gallery, every query set, one column per
    checkpoint, JSON written; a bad checkpoint and the training seed are one-line errors."""
    ckpt = sorted(Path(smoke[1]).glob("logs/*/student-*/last.pt"))[0]
    script = ROOT / "bench" / "wording_val.py"
    base = [sys.executable, str(script), "--ids", "6", "--images_per_id", "2", "--height", "64", "--width", "32",
            "--out", str(tmp_path / "g")]
    r = subprocess.run(base + [str(ckpt), str(ckpt), "--json", str(tmp_path / "w.json")], capture_output=True,
                       text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {ln.split()[0]: ln.split()[1:] for ln in r.stdout.splitlines() if re.match(r"^\S+\s+" + NUM + r"\s+" + NUM + "$", ln)}
    for s in ("en", "new-en", "zh", "keywords", "fragment", "fields", "search", "search-zh"):
        assert s in rows and rows[s][0] == rows[s][1]  # the same checkpoint twice scores the same
    res = json.loads((tmp_path / "w.json").read_text())["results"]
    assert 0 <= res[str(ckpt)]["paraphrase_r1"]["en"] <= 100
    assert "distinct_top1" not in res[str(ckpt)]
    # --hubness: per set, distinct top-1 images (1 .. gallery size) and R@1 without the set's mean query
    r = subprocess.run(base + [str(ckpt), "--hubness", "--json", str(tmp_path / "h.json")], capture_output=True,
                       text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0 and "distinct top-1 images of 12" in r.stdout, r.stderr[-2000:]
    h = json.loads((tmp_path / "h.json").read_text())["results"][str(ckpt)]
    for s in ("en", "fields", "search"):
        assert 1 <= h["distinct_top1"][s] <= 12 and 0 <= h["r1_mean_removed"][s] <= 100
    # --hub_weight: a corrected column beside each checkpoint; --data: the dataset's held-out test ids instead
    sys.path.insert(0, str(ROOT))
    from checkpoint import load_checkpoint
    data_json = str(load_checkpoint(ckpt)["args"]["data"])
    r = subprocess.run(base + [str(ckpt), "--hub_weight", "0.5", "--data", data_json, "--query_bank", "50"],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0 and "#1+hub" in r.stdout and "held-out test identities" in r.stdout, r.stderr[-2000:]
    # the corrected path with weight 0 is the raw ranking, set by set (same queries, same gallery)
    sys.path.insert(0, str(ROOT / "bench"))
    import data as data_lib
    import quality
    from evaluation_model import embed_split, embed_texts
    model, cfg, _ = quality.load_student(str(ckpt), "cpu")
    recs = data_lib.load_records(data_json)
    idx = data_lib.split_records(recs, 0.1, "test")
    sets = quality.query_sets(recs, idx, 0)
    emb = embed_split(model, recs, idx, cfg, workers=0, progress=False)
    q_emb = {n: embed_texts(model, t, cfg, "cpu") for n, (t, _, _) in sets.items()}
    attrs = [recs[i]["attributes"] for i in idx]
    raw = quality.score_sets(sets, lambda n, _: q_emb[n], emb["img_emb"], emb["img_pids"], attrs)
    zero = quality.hub_sets(model, cfg, str(ckpt), sets, q_emb, emb["img_emb"], emb["img_pids"], attrs, weight=0.0,
                            bank_records=50)
    assert zero["paraphrase_r1"] == pytest.approx(raw["paraphrase_r1"]) and zero["attr_r1"] == pytest.approx(raw["attr_r1"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for extra in ([str(bad)], [str(ckpt), "--seed", "0"], [str(ckpt), "--hub_weight", "-1"],
                  [str(ckpt), "--data", str(tmp_path / "missing.json")]):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
        assert r.returncode != 0 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
