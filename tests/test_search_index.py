"""search/index.py at scale, on tiny data: compressed IVF options, --index auto's recall tuning and its record in the
sidecar, chunked building from a memory-mapped gallery, exact flat search without a copy."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search import index as sindex  # noqa: E402
from search.index import auto_params, build_index, exact_neighbours, get_index, recall_at  # noqa: E402


def _clustered(n, d=32, n_c=60, seed=0):
    """Unit rows around n_c centres (a person-like gallery: tight groups, not uniform noise)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n_c, d))
    x = c[rng.integers(0, n_c, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_auto_params_follow_n_and_target():
    small, big = auto_params(10_000, 512), auto_params(1_000_000, 512, 0.97)
    assert small["kind"] == "flat"
    assert big["kind"] == "ivf_sq8" and big["nlist"] == 2000 and big["recall_target"] == 0.97 and big["refine"] == 4
    assert auto_params(4_000_000, 512)["nlist"] == 4000  # ~2 sqrt(N), not a fixed ratio of N
    assert auto_params(60_000, 1152)["kind"] == "ivf_sq8"  # wider rows leave exact search sooner


@pytest.mark.parametrize("kind", ["ivf", "ivf_fp16", "ivf_sq8", "hnsw"])
def test_tuned_index_reaches_its_target(tmp_path, kind):
    x, q = np.split(_clustered(6100), [6000])  # queries: fresh points of the same groups, not gallery rows
    path = tmp_path / "g_features.npy"
    np.save(path, x)
    feats = np.load(path, mmap_mode="r")  # the index is built from the memmap, in chunks
    logs = []
    idx = get_index(feats, tmp_path / "g", kind, recall_target=0.97, log=logs.append)
    tune = idx.params["tuning"]
    assert tune["recall_target"] == 0.97 and tune["recall_at_10"] >= 0.97 and tune["queries"] == 200
    assert "tuned" in logs[0] and tune["param"] in logs[0]
    # held-out queries (not gallery rows) agree with the measured recall, within sampling noise
    _, truth = exact_neighbours(feats, q, 10)
    assert recall_at(idx.search(q, 10)[1], truth) >= 0.9
    # the sidecar records the chosen parameter and the measured recall; it is reused while the target is the same
    meta = json.loads((tmp_path / "g_index.json").read_text())
    assert meta["params"]["tuning"] == tune and meta["params"][tune["param"]] == tune["value"]
    again = get_index(feats, tmp_path / "g", kind, recall_target=0.97, log=logs.append)
    assert len(logs) == 1 and again.params[tune["param"]] == tune["value"]
    get_index(feats, tmp_path / "g", kind, recall_target=0.9, log=logs.append)  # another target: rebuilt
    assert len(logs) == 2


def test_tuning_picks_fewer_probes_for_a_lower_target():
    x = _clustered(8000, seed=2)
    a = build_index(x, "ivf")
    lo = sindex.tune_search_param(a, 0.8)["value"]
    hi = sindex.tune_search_param(a, 0.99)["value"]
    assert lo < hi <= a.params["nlist"]


def test_sq8_is_a_quarter_and_refine_restores_exact_order():
    x, q = np.split(_clustered(5030, d=64, seed=3), [5000])
    es, er = exact_neighbours(x, q, 10)
    sizes = {}
    for kind in ("ivf", "ivf_fp16", "ivf_sq8"):
        import faiss

        idx = build_index(x, kind)
        sizes[kind] = faiss.serialize_index(idx.index).nbytes
        idx.set_search_params(nprobe=10 ** 6)  # exhaustive: only the codes' precision differs from exact
        s, r = idx.search(q, 10)
        if kind != "ivf_fp16":
            np.testing.assert_array_equal(r, er, err_msg=kind)  # float32 lists, or SQ8 + exact re-ranking
            np.testing.assert_allclose(s, es, atol=1e-5)
    assert sizes["ivf_sq8"] < 0.3 * sizes["ivf"] and sizes["ivf_fp16"] < 0.55 * sizes["ivf"]
    raw = build_index(x, "ivf_sq8", refine=0)  # without re-ranking the 8-bit scores are approximate
    raw.set_search_params(nprobe=10 ** 6)
    assert "refine" not in raw.params and not np.allclose(raw.search(q, 10)[0], es, atol=1e-5)


def test_flat_searches_the_memmap_without_a_copy(tmp_path):
    x = _clustered(3000)
    np.save(tmp_path / "f.npy", x)
    feats = np.load(tmp_path / "f.npy", mmap_mode="r")
    idx = get_index(feats, tmp_path / "f", "auto")
    assert idx.kind == "flat" and idx.index is None and idx.features is feats
    assert not os.path.exists(tmp_path / "f_index.faiss")  # exact search saves nothing
    q = x[:3]
    s, r = idx.search(q, 5)
    np.testing.assert_array_equal(r, np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :5])


def test_sq8_lengthens_its_rerank_list_on_a_tight_cone():
    rng = np.random.default_rng(0)
    m = rng.normal(size=32)
    x = m + 0.02 * np.linalg.norm(m) / np.sqrt(32) * rng.normal(size=(6000, 32))  # all cosines > 0.99
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    idx = build_index(x, "ivf_sq8")
    tune = sindex.tune_search_param(idx, 0.95)
    assert idx.params["refine"] > 4 and tune["recall_at_10"] >= 0.95  # x4 alone cannot reach it here
