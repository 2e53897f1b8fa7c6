"""The Milvus back end (search/backends.py) against Milvus Lite (a .db file in tmp_path): enrol with metadata
fields, search, filter by folder / expression, resume, prune deleted images; the CLI and the web UI on it; and
--prune on the faiss back end too.

    python -m pytest tests/test_milvus.py -q
"""
import http.client
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_fixtures import REPO, make_export, no_torch_env, run_py, write_images  # noqa: E402

sys.path.insert(0, str(REPO))
from search.api import Searcher  # noqa: E402
from search.backends import MilvusStore, collection_name, entry_key, quote, release  # noqa: E402
from search.collection import CollectionError, load_collection  # noqa: E402
from search.engine import TextEncoder  # noqa: E402
from search.enroll import get_args_parser as enrol_args_parser, run_enrolment  # noqa: E402
from search.enroll_by_onnx import OnnxEnrolEncoder  # noqa: E402
from search.webui import make_server, serve_in_thread  # noqa: E402

try:
    import milvus_lite  # noqa: F401
    import pymilvus  # noqa: F401
    HAVE_MILVUS = True
except ImportError:
    HAVE_MILVUS = False
needs_milvus = pytest.mark.skipif(not HAVE_MILVUS, reason="pymilvus + milvus-lite not installed "
                                                          "(pip install pymilvus milvus-lite)")


def make_gallery(root):
    """cam1/{red,green}.png and cam2/{blue,yellow}.png."""
    write_images(root, ("red", "green"), sub="cam1")
    write_images(root, ("blue", "yellow"), sub="cam2")


def enrol(image_dir, prefix, model_dir, **kw):
    a = enrol_args_parser().parse_args(["--image-dir", str(image_dir), "--output-prefix", str(prefix)])
    a.model_dir, a.image_model, a.workers = str(model_dir), None, 1
    for k, v in kw.items():
        setattr(a, k, v)
    return run_enrolment(a, OnnxEnrolEncoder(a), log=lambda m: None)


def test_names_keys_and_quoting():
    assert collection_name(None, "collection/person-features") == "person_features"
    assert collection_name("9cams", "x") == "_9cams"
    assert quote('a"b\\c') == '"a\\"b\\\\c"'
    assert entry_key({"image": "a.jpg", "bbox": None}) != entry_key({"image": "a.jpg", "bbox": [1, 2, 3, 4]})


@needs_milvus
def test_milvus_enrol_search_filter_resume_prune(tmp_path):
    exp = make_export(tmp_path / "export")
    imgs = tmp_path / "imgs"
    make_gallery(imgs)
    uri = str(tmp_path / "gallery.db")
    kw = dict(backend="milvus", uri=uri, collection="g", token=None)
    st = enrol(imgs, tmp_path / "unused", exp, **kw)
    assert (st["new"], st["existing"], st["total"]) == (4, 0, 4)
    assert not (tmp_path / "unused_features.npy").exists()  # nothing written beside: Milvus holds the rows

    enc = TextEncoder(exp)
    store = MilvusStore(uri, "g")
    s = Searcher(enc, store=store, image_root=str(imgs))
    assert len(s) == 4 and s.collection.dim == 4 and store.model["kind"] == "onnx"
    top = s.search("r", 4)["results"]
    assert [r["image"] for r in top][0] == "cam1/red.png" and top[0]["bbox"] is None
    assert top[0]["source"] == "image" and top[0]["score"] > top[1]["score"]
    assert [r["image"] for r in s.search("r", 4, folder="cam2")["results"]] == ["cam2/yellow.png", "cam2/blue.png"]
    s.expr = 'image like "cam1/%"'
    assert {r["image"] for r in s.search("b", 4)["results"]} == {"cam1/red.png", "cam1/green.png"}
    s.expr = "folder ==== 1"
    with pytest.raises(CollectionError, match="milvus search failed"):
        s.search("r", 2)
    s.expr = None
    assert s.has_image("cam2/blue.png") and not s.has_image("cam2/none.png")
    store.client.close()

    # resume: nothing new is embedded; a new image is upserted with its fields
    write_images(imgs, ("white",), sub="cam2")
    st = enrol(imgs, tmp_path / "unused", exp, **kw)
    assert (st["new"], st["existing"], st["total"]) == (1, 4, 5)

    # prune: a deleted image's entry goes, the rest stay searchable
    os.remove(imgs / "cam1" / "red.png")
    st = enrol(imgs, tmp_path / "unused", exp, prune=True, **kw)
    assert (st["new"], st["pruned"], st["total"]) == (0, 1, 4)
    store = MilvusStore(uri, "g")
    s = Searcher(enc, store=store)
    assert "cam1/red.png" not in [r["image"] for r in s.search("r", 10)["results"]] and len(s) == 4

    # the web UI on the milvus back end: search with a folder, gallery images only
    srv = make_server(s, str(imgs), port=0, quiet=True)
    serve_in_thread(srv)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
        conn.request("GET", "/api/search?q=r&top_n=3&folder=cam2")
        r = conn.getresponse()
        doc = json.loads(r.read())
        assert r.status == 200 and [x["image"] for x in doc["results"]][0] == "cam2/yellow.png"
        for path, code in (("cam2/blue.png", 200), ("cam1/red.png", 404)):
            conn.request("GET", "/image?path=" + path)
            r = conn.getresponse()
            r.read()
            assert r.status == code, path
    finally:
        srv.shutdown()
        srv.server_close()
        store.client.close()

    # another model is refused unless --rebuild
    other = make_export(tmp_path / "other", image_size=(16, 8))
    with pytest.raises(CollectionError, match="different model"):
        enrol(imgs, tmp_path / "unused", other, **kw)
    st = enrol(imgs, tmp_path / "unused", other, rebuild=True, **kw)
    assert (st["new"], st["existing"]) == (4, 0)

    # the CLI, torch-free, on the same file (once this process has let go of it)
    release(uri)
    r = run_py([REPO / "search" / "api.py", "--backend", "milvus", "--uri", uri, "--collection", "g",
                "--model_dir", other, "--queries", "r", "--top-n", "2", "--folder", "cam2", "--json"],
               env=no_torch_env(tmp_path))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["collection"]["backend"] == "milvus" and doc["collection"]["rows"] == 4
    assert [x["image"] for x in doc["queries"][0]["results"]] == ["cam2/yellow.png", "cam2/white.png"]
    r = run_py([REPO / "search" / "api.py", "--backend", "milvus", "--uri", uri, "--collection", "nope",
                "--model_dir", other, "--queries", "r"], env=no_torch_env(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no collection 'nope'" in r.stderr
    r = run_py([REPO / "search" / "api.py", "--backend", "milvus", "--uri", uri, "--collection", "g",
                "--model_dir", other, "--queries", "r", "--filter", "folder ==== 1"], env=no_torch_env(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "milvus search failed" in r.stderr


def test_faiss_prune_and_folder_filter(tmp_path):
    exp = make_export(tmp_path / "export")
    imgs = tmp_path / "imgs"
    make_gallery(imgs)
    prefix = tmp_path / "g"
    assert enrol(imgs, prefix, exp)["total"] == 4
    os.remove(imgs / "cam1" / "red.png")
    st = enrol(imgs, prefix, exp, prune=True)
    assert (st["pruned"], st["total"]) == (1, 3)
    c = load_collection(f"{prefix}_features.npy")
    assert len(c) == 3 and "cam1/red.png" not in [it["image"] for it in c.items]
    s = Searcher(TextEncoder(exp), f"{prefix}_features.npy")
    # rows and items still line up after the rewrite: the reddest left is yellow, and green's row is green
    assert s.search("r", 1)["results"][0]["image"] == "cam2/yellow.png"
    assert s.search("g", 1)["results"][0]["image"] == "cam1/green.png"
    assert [r["image"] for r in s.search("r", 5, folder="cam2")["results"]] == ["cam2/yellow.png", "cam2/blue.png"]
    assert s.search("r", 5, folder="cam9")["results"] == []
    with pytest.raises(CollectionError, match="needs --backend milvus"):
        s.expr = 'folder == "cam1"'
        s.search("r", 1)
    assert enrol(imgs, prefix, exp, prune=True).get("pruned") == 0  # nothing more to prune
