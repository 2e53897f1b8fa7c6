"""bench/speed.py end to end in its --smoke configuration (tiny SigLIP configs, tiny student, galleries of 1k/5k,
batch 8; ~10 s), plus its one-line errors, and bench/train_profile.py on tiny data. Structure only: timings are
never asserted.

    python3 -m pytest -q tests/test_bench.py
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "speed.py"
NUM = r"[\d,]+(?:\.\d+)?"


def _run(*argv, timeout=300):
    # from another folder: the script must find the repo on its own
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT / "tests"))


@pytest.fixture(scope="module")
def smoke():
    r = _run("--smoke")
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _rows(out, title):
    """Lines of the section whose header contains `title`, up to the next section."""
    m = re.search(r"^== [^\n]*" + re.escape(title) + r"[^\n]*==$(.*?)(?=^== |\Z)", out, re.M | re.S)
    assert m, f"section {title!r} missing"
    return m.group(1).splitlines()


def test_header_prints_equal_threads(smoke):
    assert re.search(r"^threads: torch 2, onnxruntime intra_op 2 .*faiss 2; OMP_WAIT_POLICY=PASSIVE$", smoke, re.M)
    assert re.search(r"load average \S+ \(1/5/15 min\)", smoke)
    assert "SMOKE configuration" in smoke


@pytest.mark.parametrize("title", ["1. Image encoders", "2. Text encoders"])
def test_encoder_tables(smoke, title):
    lines = _rows(smoke, title)
    header = next(l for l in lines if l.startswith("model "))
    for col in ("params", "fp32 MiB", "file MiB", "b1 ms/item", "b8 ms/item", "warm-up+timed", "spread b1 / b8"):
        assert col in header
    # teacher row, student ONNX row, ratio row: each with its figures, run counts and spreads
    runs = rf"\s{NUM}\s+{NUM}\s+\d+\+\d+ / \d+\+\d+\s+(\d+%|-) / (\d+%|-)\s*$"
    assert any(re.match(rf"SigLIP .*\(PyTorch fp32\).*{runs}", l) for l in lines)
    assert any(re.match(rf"student .*ONNX Runtime.*{runs}", l) for l in lines)
    assert any(re.match(rf"speed-up SigLIP / student ONNX\s+{NUM}x\s+{NUM}x\s*$", l) for l in lines)
    assert any(l.startswith("size ratio (params") for l in lines)


def test_text_table_has_l64_and_typical_query(smoke):
    lines = _rows(smoke, "2. Text encoders")
    assert any(re.match(r"SigLIP .* text \(PyTorch fp32\), L=64\s", l) for l in lines)
    for kind in ("fp32", "int8"):
        assert any(re.match(rf"student char_tiny \(charmap \+ lookup \+ ONNX Runtime {kind}\), L=64\s", l)
                   for l in lines)
    assert any(l.startswith("student, typical search query") for l in lines)


def test_search_table(smoke):
    lines = _rows(smoke, "3. Search")  # bench/search_speed.py's table, on the smoke student
    assert any(l.startswith("gallery (D=32)") and "recall@10" in l and "build s" in l and "index MiB" in l
               for l in lines)
    table = [l for l in lines if re.match(r"(2k|6k)\s+(flat|ivf|ivf_fp16|ivf_sq8|hnsw|auto)\s", l)]
    kinds = {(l.split()[0], l.split()[1]) for l in table}
    for g in ("2k", "6k"):
        for k in ("flat", "ivf", "ivf_fp16", "ivf_sq8", "hnsw"):
            assert (g, k) in kinds, (g, k)
    for l in table:
        recall = float(l.split()[-1])
        assert 0.0 <= recall <= 1.0
        if l.split()[1] == "flat":
            assert l.split()[-1] == "1.000"
    assert any(l.startswith("text encoding (search.engine.TextEncoder") for l in lines)


def test_eval_and_train_tables(smoke):
    ev = _rows(smoke, "4. Evaluation")
    for name in ("metrics.verification", "metrics.retrieval text->image", "metrics.retrieval image->text"):
        assert any(re.match(rf"{re.escape(name)}.*\s{NUM}\s+{NUM}\s+{NUM}\s*$", l) for l in ev), name
    tr = _rows(smoke, "5. Training")
    for name in ("forward (student + losses)", "backward", "clip + AdamW", "steps/s", "images/s"):
        assert any(l.startswith(name) for l in tr), name
    assert any(re.match(rf"DataLoader, 1 workers: \d+ batches incl. start-up\s+{NUM} s = {NUM} batches/s", l)
               for l in tr)
    assert re.search(rf"^loader keeps up: (yes|no) \({NUM} batches/s vs {NUM} steps/s\)$", smoke, re.M)


def test_headline_lines(smoke):
    head = _rows(smoke, "Headline")
    assert any(re.match(rf"image encoder speed-up vs .* @ batch 1: {NUM}x \(target >= 1000x\) (met|NOT met)$", l)
               for l in head)
    assert any(re.match(rf"text encoder speed-up vs .* @ batch 1: {NUM}x \(target >= 300x\) (met|NOT met)", l)
               for l in head)
    assert any(re.match(rf"text encoder speed-up vs .* typical \d+-character query: {NUM}x", l) for l in head)
    assert any(re.match(rf"image encoder \(int8\) speed-up vs .* @ batch 1: {NUM}x", l) for l in head)
    assert any(re.match(rf"text model \+ table, int8: {NUM} MiB \(target <= 8 MiB\) (met|NOT met)", l) for l in head)


def test_every_family_in_one_run(smoke):
    """The recipe, its static-shape export and the other families, fp32 and int8, in the speed-up tables."""
    for title, names in (("1. Image encoders", ("res_tiny 64x32 (the recipe)", "res_tiny 64x32 (static shapes)",
                                                "mobile_tiny 64x32")),
                         ("2. Text encoders", ("char_tiny, L=64 (the recipe)", "char_tiny (static shapes), L=64",
                                               "char_small, L=64"))):
        lines = _rows(smoke, title)
        for n in names:
            assert any(re.match(rf"{re.escape(n)}\s.*{NUM}x / {NUM}x\s+>= \d+x$", l) for l in lines), (title, n)


@pytest.mark.parametrize("argv, needle", [
    (["--threads", "0"], "--threads"),
    (["--smoke", "--checkpoint", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    (["--smoke", "--sections", "image,bogus"], "bogus"),
])
def test_bad_input_is_one_line(argv, needle):
    r = _run(*argv, timeout=60)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_train_profile_runs_and_compares_text_passes(synth_data, tmp_path):
    """bench/train_profile.py on tiny data: every part timed, and the text tower's length groups timed beside
    one full-length pass (the README's ratio); times are not asserted, only that both were measured."""
    sys.path.insert(0, str(ROOT / "bench"))
    import train_profile
    from train_fixtures import make_fake_cache
    emb = make_fake_cache(synth_data, tmp_path / "emb", dim=32)
    args = train_profile.get_args_parser().parse_args(["--data", synth_data, "--embedding_path", str(emb),
                                                       "--steps", "1", "--warmup", "0"])
    acc, per_term, text_ab = train_profile.main(args, ["--batch_size", "8", "--image_size", "64x32",
                                                       "--feature_dim", "32", "--vocab_size", "1024",
                                                       "--embed_dim", "64", "--workers", "0"])
    assert {"forward: image tower", "forward: text tower", "backward (both towers + losses)"} <= set(acc)
    assert "dist_rel" in per_term and all(v > 0 for v in per_term.values())
    assert len(text_ab) == 2 and all(v > 0 for v in text_ab.values())
