"""search/hubness.py: hub scores at enrolment, the corrected ranking at search, bad query banks; export's bank.

    python -m pytest tests/test_hubness.py -q

The tiny torch-free export of search_fixtures embeds an image as its mean colour and the query "r" as the red
direction. A query bank of red texts makes the reddest images hubs, so a strong correction must reorder "r"'s
results exactly as cosine - weight * hub computed here in numpy says.
"""
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_fixtures import REPO, make_export, no_torch_env, run_py, write_images  # noqa: E402

sys.path.insert(0, str(REPO))
from search import hubness  # noqa: E402
from search.api import Searcher  # noqa: E402
from search.collection import load_collection  # noqa: E402
from search.engine import ExportError, TextEncoder, load_export, load_hub  # noqa: E402

ENROL = REPO / "search" / "enroll_by_onnx.py"
API = REPO / "search" / "api.py"
COLOURS = ("red", "yellow", "purple", "green", "blue", "white")


def add_bank(export, bank, k=2, weight=0.5):
    np.save(export / hubness.QUERY_BANK_FILE, np.asarray(bank, np.float16))
    info = json.loads((export / "model_info.json").read_text())
    info["query_bank"] = {"file": hubness.QUERY_BANK_FILE, "rows": len(bank), "k": k, "weight": weight}
    (export / "model_info.json").write_text(json.dumps(info))
    return export


def red_bank(n=6, seed=0):
    """Texts near the red direction (dim 4: r, g, b, 0): the reddest images become hubs."""
    rng = np.random.default_rng(seed)
    b = np.tile([1.0, 0.0, 0.0, 0.0], (n, 1)) + rng.normal(0, 0.05, (n, 4))
    return b / np.linalg.norm(b, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("hub")
    imgs = d / "imgs"
    write_images(imgs, COLOURS)
    return SimpleNamespace(root=d, imgs=imgs, plain=make_export(d / "plain"),
                           hub=add_bank(make_export(d / "hub"), red_bank()), env=no_torch_env(d))


def test_hub_scores_and_rerank_units():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(300, 8)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    bank = rng.normal(size=(40, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    want = np.sort(f @ bank.T, axis=1)[:, -5:].mean(1)
    np.testing.assert_allclose(hubness.hub_scores(f, bank, 5), want, atol=1e-6)
    np.testing.assert_allclose(hubness.hub_scores(f, bank, 999), (f @ bank.T).mean(1), atol=1e-6)  # k capped
    assert hubness.hub_scores(f[:0], bank, 5).shape == (0,)
    hits = [(0.9, 0, {"hub": 0.8}), (0.8, 1, {"hub": 0.1}), (0.7, 2, {"hub": 0.5})]
    assert [r for _, r, _ in hubness.rerank(hits, 0.5, 3)] == [1, 0, 2]  # 0.75, 0.5, 0.45
    assert [r for _, r, _ in hubness.rerank(hits, 0.5, 1)] == [1]
    assert [r for _, r, _ in hubness.rerank(hits, 0.0, 2)] == [0, 1]
    mixed = hits[:2] + [(0.7, 2, {})]  # an entry without a hub score: the raw order stands
    assert [r for _, r, _ in hubness.rerank(mixed, 0.5, 3)] == [0, 1, 2]
    assert hubness.candidates(10) >= 40 and hubness.candidates(1) > 1
    assert hubness.default_k(9000) == 100 and hubness.default_k(3) == 1


@pytest.mark.parametrize("bad,msg", [
    (np.array([{"a": 1}], dtype=object), "unreadable query bank"),
    (np.zeros((3, 5), np.float32), "expected a float array"),
    (np.zeros((0, 4), np.float32), "expected a float array"),
    (np.array([[1, 0, 0, 0]], np.int64), "expected a float array"),
    (np.array([[np.nan, 0, 0, 1]], np.float32), "non-finite"),
    (np.zeros((2, 4), np.float32), "zero rows"),
])
def test_bad_query_bank_is_one_line(tmp_path, bad, msg):
    export = add_bank(make_export(tmp_path / "e"), np.eye(4))
    np.save(export / hubness.QUERY_BANK_FILE, bad, allow_pickle=True)
    with pytest.raises(ExportError, match=msg) as e:
        load_hub(load_export(export))
    assert "\n" not in str(e.value)
    # and the CLI says it in one line
    r = run_py([API, "--image_feature", tmp_path / "none_features.npy", "--model_dir", export, "--queries", "r"])
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and msg in r.stderr, r.stderr


@pytest.mark.parametrize("entry,msg", [
    ({"file": "missing.npy"}, "not found"), ("query_bank.npy", "must be an object"),
    ({"file": hubness.QUERY_BANK_FILE, "k": 0}, "integer k >= 1"),
    ({"file": hubness.QUERY_BANK_FILE, "weight": -1}, "weight in"),
    ({"file": hubness.QUERY_BANK_FILE, "weight": float("nan")}, "weight in"),
    ({"file": "../../etc/" + hubness.QUERY_BANK_FILE}, None),  # a path is cut to its name: the file beside the info
])
def test_bad_query_bank_entry(tmp_path, entry, msg):
    export = add_bank(make_export(tmp_path / "e"), np.eye(4))
    info = json.loads((export / "model_info.json").read_text())
    info["query_bank"] = entry
    (export / "model_info.json").write_text(json.dumps(info))
    if msg is None:
        assert load_hub(load_export(export))["bank"].shape == (4, 4)
    else:
        with pytest.raises(ExportError, match=msg):
            load_hub(load_export(export))


def test_enrolment_stores_hub_scores_and_search_reranks(env, tmp_path):
    prefix = tmp_path / "p"
    r = run_py([ENROL, "--image-dir", env.imgs, "--output-prefix", prefix, "--model_dir", env.hub], env=env.env)
    assert r.returncode == 0, r.stderr
    c = load_collection(f"{prefix}_features.npy")
    hub = load_hub(load_export(env.hub))
    want = np.sort(c.features @ hub["bank"].T, axis=1)[:, -2:].mean(1)
    np.testing.assert_allclose([it["hub"] for it in c.items], want, atol=1e-5)
    assert c.model["query_bank_sha256"] == hub["sha256"] and c.model["hub_k"] == 2
    q = TextEncoder(str(env.hub)).encode(["r"])[0]
    cos = c.features @ q
    names = [it["image"] for it in c.items]
    for w in (0.0, 0.5, 2.0):
        r = run_py([API, "--image_feature", f"{prefix}_features.npy", "--model_dir", env.hub, "--queries", "r",
                    "--top_n", "6", "--json", "--hub_weight", w], env=env.env)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)["queries"][0]["results"]
        order = np.lexsort((np.arange(len(cos)), -(cos - w * want)))
        assert [x["image"] for x in res] == [names[i] for i in order], (w, res)
        np.testing.assert_allclose([x["score"] for x in res], cos[order], atol=1e-5)  # the score stays the cosine
    assert res[0]["image"] != "red.png"  # a strong correction really reorders: red is the hub of a red bank
    assert any("hubness correction" in n for n in json.loads(r.stdout)["queries"][0]["notes"])  # and says so
    # the export's default weight (0.5) applies without the flag
    s = Searcher(TextEncoder(str(env.hub)), f"{prefix}_features.npy", save_index=False, log=lambda m: None)
    assert s.hub_weight == 0.5 and not s.warnings


def test_collection_without_the_bank_ranks_raw_with_a_warning(env, tmp_path):
    prefix = tmp_path / "p"
    r = run_py([ENROL, "--image-dir", env.imgs, "--output-prefix", prefix, "--model_dir", env.plain], env=env.env)
    assert r.returncode == 0, r.stderr
    assert "hub" not in load_collection(f"{prefix}_features.npy").items[0]
    # the same image model with a bank is another model: resuming the old collection is refused
    r = run_py([ENROL, "--image-dir", env.imgs, "--output-prefix", prefix, "--model_dir", env.hub], env=env.env)
    assert r.returncode == 2 and "--rebuild" in r.stderr, r.stderr
    logs = []
    s = Searcher(TextEncoder(str(env.hub)), f"{prefix}_features.npy", save_index=False, log=logs.append)
    assert s.hub_weight == 0.0 and any("not enrolled with this export's query bank" in m for m in logs)
    res = s.search("r", 6)["results"]
    assert [x["score"] for x in res] == sorted((x["score"] for x in res), reverse=True)
    # an export without a bank: the flag warns and nothing else changes
    logs = []
    s = Searcher(TextEncoder(str(env.plain)), f"{prefix}_features.npy", save_index=False, log=logs.append,
                 hub_weight=1.0)
    assert s.hub_weight == 0.0 and any("needs an export with a query bank" in m for m in logs)
    r = run_py([API, "--image_feature", f"{prefix}_features.npy", "--model_dir", env.hub, "--queries", "r",
                "--hub_weight", "-1"], env=env.env)
    assert r.returncode == 2 and "--hub_weight must be in [0, 10)" in r.stderr, r.stderr


def test_milvus_keeps_hub_scores(env, tmp_path):
    pytest.importorskip("milvus_lite")
    uri = str(tmp_path / "g.db")
    r = run_py([ENROL, "--image-dir", env.imgs, "--output-prefix", tmp_path / "p", "--model_dir", env.hub,
                "--backend", "milvus", "--uri", uri], env=env.env, timeout=300)
    assert r.returncode == 0, r.stderr
    r = run_py([API, "--backend", "milvus", "--uri", uri, "--image_feature", f"{tmp_path / 'p'}_features.npy",
                "--model_dir", env.hub, "--queries", "r", "--top_n", "6", "--json", "--hub_weight", "2"],
               env=env.env, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["queries"][0]["results"]
    assert all(isinstance(x["hub"], float) for x in res)
    adj = [x["score"] - 2 * x["hub"] for x in res]
    assert adj == sorted(adj, reverse=True) and res[0]["image"] != "red.png"
    shutil.rmtree(tmp_path, ignore_errors=True)
