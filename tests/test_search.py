"""search/: enrolment, collection format, index, CLI, web server — on tiny torch-free ONNX exports.

    python -m pytest tests/test_search.py -q

The tiny export (tests/search_fixtures.py) embeds an image as its mean colour and a text "r"/"g"/"b" as the
red/green/blue direction, so retrieval has a known right answer.
"""
import http.client
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_fixtures import (REPO, make_export, no_torch_env, run_py, write_images,  # noqa: E402
                             write_split_image)

sys.path.insert(0, str(REPO))
from search.api import Searcher, format_result  # noqa: E402
from search.collection import CollectionError, load_collection, prefix_paths  # noqa: E402
from search.engine import ImageEncoder, TeacherTextEncoder, TextEncoder, load_export, preprocess  # noqa: E402
from search.enroll import EnrolError, _lock, get_args_parser as enrol_args_parser, run_enrolment  # noqa: E402
from search.enroll_by_onnx import OnnxEnrolEncoder  # noqa: E402
from search.index import build_index, get_index  # noqa: E402
from search.webui import make_server, serve_in_thread  # noqa: E402

ENROL = REPO / "search" / "enroll_by_onnx.py"
API = REPO / "search" / "api.py"
BAD_QUERIES = ["", "   \t\n ", "x" * 10000, "😀🧥👖", "穿红色外套的女人", "a\x1b[31mred\x07\x7f", "nul\x00byte", "\u200b\ufeff",
               "\ud800 lone surrogate", "<script>alert(1)</script>"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    return SimpleNamespace(root=d, export=make_export(d / "export"), env=no_torch_env(d))


def enrol_args(image_dir, prefix, model_dir, **kw):
    a = enrol_args_parser().parse_args(["--image-dir", str(image_dir), "--output-prefix", str(prefix)])
    a.model_dir, a.image_model, a.workers = str(model_dir), None, 2
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def enrol(image_dir, prefix, model_dir, **kw):
    a = enrol_args(image_dir, prefix, model_dir, **kw)
    return run_enrolment(a, OnnxEnrolEncoder(a), log=lambda m: None)


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------- engine
def test_preprocessing_and_image_encoder(env, tmp_path):
    im = Image.new("RGB", (30, 50), (200, 10, 10))
    im.paste(Image.new("RGB", (10, 20), (10, 10, 200)), (5, 7))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = preprocess(im.convert("L"), [5, 7, 15, 27], (8, 4), mean, std)  # grey input -> RGB, crop = the blue patch
    ref = np.asarray(im.convert("L").convert("RGB").crop((5, 7, 15, 27)).resize((4, 8), Image.BILINEAR),
                     np.float32) / 255
    ref = ((ref - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)
    assert x.shape == (3, 8, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x, ref, atol=1e-6)
    enc = ImageEncoder(load_export(env.export))
    e = enc.encode([(im, None), (im, [5, 7, 15, 27])])
    assert e.shape == (2, 4)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0].argmax() == 0 and e[1].argmax() == 2  # whole image is red, the crop is the blue patch


def test_text_encoder_located_from_text_model_path(env):
    t1 = TextEncoder(text_model=str(env.export / "model_text.onnx"))
    t2 = TextEncoder(str(env.export))
    q = ["r", "b", "穿红色外套", ""]
    np.testing.assert_allclose(t1.encode(q), t2.encode(q), atol=1e-6)
    e = t1.encode(["r", "g", "b"])
    assert list(e.argmax(1)) == [0, 1, 2]
    # padding is trimmed to the longest text (dynamic L); the answer must equal the full max_seq_length run
    assert t1.dynamic_length
    q = ["r", "a longer query past sixteen characters", "穿红色外套", ""]
    trimmed = t1.encode(q)
    t1.dynamic_length = False
    np.testing.assert_allclose(trimmed, t1.encode(q), atol=1e-6)


# ------------------------------------------------------------------------------------------- CLI round trip
def test_enrol_search_round_trip_without_torch(env, tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, ("red", "green", "blue"))
    write_images(imgs, ("yellow",), sub="nested/deeper", fmt="jpg")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (imgs / "notes.txt").write_text("not an image")
    prefix = tmp_path / "coll" / "person_features"
    # the seed's way: run from inside search/, torch unimportable
    r = run_py([ENROL.name, "--image-dir", imgs, "--output-prefix", prefix, "--model_dir", env.export],
               cwd=REPO / "search", env=env.env)
    assert r.returncode == 0, r.stderr
    assert "enrolled 4 new entries (0 already present, 4 total)" in r.stdout
    assert "skipped 1 undecodable file" in r.stdout
    c = load_collection(f"{prefix}_features.npy")
    assert c.features.dtype == np.float32 and c.features.shape == (4, 4)
    np.testing.assert_allclose(np.linalg.norm(c.features, axis=1), 1, atol=1e-5)
    meta = json.loads(Path(f"{prefix}_metadata.json").read_text())
    assert meta["format_version"] == 1 and meta["dim"] == 4 and meta["model"]["kind"] == "onnx"
    assert sorted(it["image"] for it in meta["items"]) == ["blue.png", "green.png", "nested/deeper/yellow.jpg",
                                                          "red.png"]
    assert all(it["bbox"] is None for it in meta["items"])
    # search from the repo root with the seed's flag spellings
    r = run_py([API, "--image-root", imgs, "--image_feature", f"{prefix}_features.npy", "--image_metadata",
                f"{prefix}_metadata.json", "--text-model", env.export / "model_text.onnx",
                "--queries", "r", "b", "--top-n", "2"], env=env.env)
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("----------\n")[1:]
    assert len(blocks) == 2
    pat = (r"Query: '(.*)'\n\tSearch completed in \d+\.\d{4} seconds\.\n1\. Score: (-?\d\.\d{4})\n   Image: (.*)\n"
           r"   BBox: (.*)\n2\. Score: (-?\d\.\d{4})\n")
    m1, m2 = re.match(pat, blocks[0]), re.match(pat, blocks[1])
    assert m1 and m2, r.stdout
    assert m1.group(1) == "r" and m1.group(3) == os.path.join(str(imgs), "red.png")
    assert m2.group(1) == "b" and m2.group(3) == os.path.join(str(imgs), "blue.png")
    assert float(m1.group(2)) >= float(m1.group(5))
    # --json (snake_case twins) agrees with exact numpy search
    r = run_py([API, "--image_root", imgs, "--image_feature", f"{prefix}_features.npy", "--model_dir", env.export,
                "--queries", "rg", "--top_n", "4", "--json"], env=env.env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    res = doc["queries"][0]["results"]
    q = TextEncoder(str(env.export)).encode(["rg"])[0]
    exact = c.features @ q
    assert [x["row"] for x in res] == list(np.argsort(-exact))
    np.testing.assert_allclose([x["score"] for x in res], np.sort(exact)[::-1], atol=1e-5)
    assert res[0]["image"] == "nested/deeper/yellow.jpg"  # red + green = yellow


def test_append_only_reenrolment_and_resume(env, tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, ("red", "green", "blue"))
    prefix = tmp_path / "c" / "p"
    s = enrol(imgs, prefix, env.export)
    assert (s["new"], s["total"]) == (3, 3)
    before = np.load(f"{prefix}_features.npy").copy()
    write_images(imgs, ("yellow", "white"), sub="day2")
    s = enrol(imgs, prefix, env.export)
    assert (s["new"], s["existing"], s["total"]) == (2, 3, 5)  # only the new images were embedded
    after = np.load(f"{prefix}_features.npy")
    np.testing.assert_array_equal(after[:3], before)
    assert enrol(imgs, prefix, env.export)["new"] == 0

    # a run killed mid-way (simulated: the encoder dies at the 3rd batch) resumes from its checkpoints
    write_images(imgs, ("purple",), sub="day3")
    write_images(imgs, ("red", "green", "blue"), sub="day3")
    a = enrol_args(imgs, prefix, env.export, batch_size=1, checkpoint_every=1)
    enc = OnnxEnrolEncoder(a)
    calls = {"n": 0}
    real = enc.embed

    def dying(payloads):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(payloads)

    enc.embed = dying
    with pytest.raises(SystemExit) as ei:
        run_enrolment(a, enc, log=lambda m: None)
    assert ei.value.code == 130
    assert len(list(Path(prefix_paths(prefix)["partial"]).glob("*.json"))) == 2
    assert len(load_collection(f"{prefix}_features.npy")) == 5  # the committed collection is untouched
    s = enrol(imgs, prefix, env.export)
    assert (s["new"], s["total"]) == (2, 9)  # 2 recovered from checkpoints, 2 embedded now
    assert not os.path.exists(prefix_paths(prefix)["partial"])
    c = load_collection(f"{prefix}_features.npy")
    keys = [it["image"] for it in c.items]
    assert len(set(keys)) == 9
    ref = ImageEncoder(load_export(env.export)).encode([(Image.open(imgs / k), None) for k in keys])
    np.testing.assert_allclose(c.features, ref, atol=1e-5)

    # a crash between writing the features and the metadata leaves extra rows: trimmed on the next run
    f = np.load(f"{prefix}_features.npy")
    np.save(f"{prefix}_features.npy", np.concatenate([f, f[:2]]))
    with pytest.raises(CollectionError):
        load_collection(f"{prefix}_features.npy")
    s = enrol(imgs, prefix, env.export)
    assert (s["new"], s["total"]) == (0, 9)
    assert load_collection(f"{prefix}_features.npy").features.shape == (9, 4)

    # a second enrolment into the same collection while one is running is refused
    held = _lock(prefix)
    with pytest.raises(EnrolError, match="another enrolment"):
        enrol(imgs, prefix, env.export)
    held.close()


def test_model_change_refused_unless_rebuild(env, tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, ("red", "blue"))
    prefix = tmp_path / "p"
    other = make_export(tmp_path / "other_export", image_size=(24, 12))  # same weights, other preprocessing
    assert enrol(imgs, prefix, env.export)["total"] == 2
    r = run_py([ENROL, "--image_dir", imgs, "--output_prefix", prefix, "--model_dir", other], env=env.env)
    assert "--rebuild" in one_line_error(r)
    r = run_py([ENROL, "--image_dir", imgs, "--output_prefix", prefix, "--model_dir", other, "--rebuild"],
               env=env.env)
    assert r.returncode == 0 and "enrolled 2 new entries (0 already present, 2 total)" in r.stdout, r.stderr


def test_boxes_simple_and_coco(env, tmp_path):
    imgs = tmp_path / "imgs"
    write_split_image(imgs / "cams/split.png", "red", "blue")  # 80x80: left half red, right half blue
    write_images(imgs, ("green",))
    boxes = {"cams/split.png": [[0, 0, 40, 80], {"bbox": [40, 0, 80, 80], "score": 0.9}, [70.4, -5, 200, 90],
                                [50, 50, 50, 60], [-30, -30, -1, -1], [1, 2, 3]],
             "./missing.png": [[0, 0, 5, 5]]}
    bf = tmp_path / "boxes.json"
    bf.write_text(json.dumps(boxes))
    prefix = tmp_path / "b"
    r = run_py([ENROL, "--image-dir", imgs, "--output-prefix", prefix, "--model_dir", env.export, "--boxes", bf],
               env=env.env)
    assert r.returncode == 0, r.stderr
    assert "enrolled 3 new entries" in r.stdout
    for part in ("2 degenerate boxes", "1 malformed box", "1 image without boxes", "1 box of a missing image"):
        assert part in r.stdout, r.stdout
    c = load_collection(f"{prefix}_features.npy")
    by_box = {tuple(it["bbox"]): c.features[i] for i, it in enumerate(c.items)}
    assert by_box[(0, 0, 40, 80)].argmax() == 0 and by_box[(40, 0, 80, 80)].argmax() == 2
    clipped = [it for it in c.items if it["bbox"] == [70, 0, 80, 80]]
    assert len(clipped) == 1 and clipped[0]["bbox_src"] == [70.4, -5, 200, 90]
    assert {it["source"] for it in c.items} == {"boxes"}
    assert enrol(imgs, prefix, env.export, boxes=str(bf))["new"] == 0  # clipped boxes are recognised on resume

    coco = {"images": [{"id": 7, "file_name": "cams/split.png"}, {"id": 8, "file_name": "green.png"}],
            "annotations": [{"image_id": 7, "bbox": [40, 10, 40, 60], "category_id": 1, "score": 0.95},
                            {"image_id": 7, "bbox": [0, 0, 40, 80], "category_id": 3, "score": 0.99},  # a car
                            {"image_id": 8, "bbox": [0, 0, 40, 80], "category_id": 1, "score": 0.2},
                            {"image_id": 8, "bbox": [5, 5, 0, 10], "category_id": 1, "score": 0.9}]}
    cf = tmp_path / "coco.json"
    cf.write_text(json.dumps(coco))
    s = enrol(imgs, tmp_path / "coco", env.export, boxes=str(cf), min_score=0.5)
    assert (s["new"], s["degenerate"]) == (1, 1)
    c = load_collection(f"{tmp_path / 'coco'}_features.npy")
    assert c.items[0]["bbox"] == [40, 10, 80, 70] and c.items[0]["source"] == "coco"
    assert c.items[0]["score"] == 0.95 and c.features[0].argmax() == 2

    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    r = run_py([ENROL, "--image-dir", imgs, "--output-prefix", tmp_path / "x", "--model_dir", env.export,
                "--boxes", bad], env=env.env)
    assert "unreadable boxes file" in one_line_error(r)


# ------------------------------------------------------------------------------------------- index
def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_index_matches_exact_search(tmp_path):
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(3000, 32)))
    q = _unit(rng.normal(size=(25, 32)))
    exact = q @ x.T
    ref_rows = np.argsort(-exact, axis=1)[:, :10]
    for kind, params in (("flat", {}), ("hnsw", {"ef_search": 3000}), ("ivf", {"nprobe": 10 ** 6})):
        idx = build_index(x, kind)
        idx.set_search_params(**params)
        if kind == "ivf":
            assert idx.index.nprobe == idx.params["nlist"] > 1  # nprobe clipped to nlist: exhaustive
        s, r = idx.search(q, 10)
        np.testing.assert_array_equal(r, ref_rows, err_msg=kind)
        np.testing.assert_allclose(s, np.take_along_axis(exact, ref_rows, 1), atol=1e-5, err_msg=kind)
    s, r = build_index(x[:5], "flat").search(q[:1], 10)  # k > N answers N
    assert r.shape == (1, 5)

    # saved next to the features, reused while fresh, rebuilt when the gallery changed
    logs = []
    prefix = tmp_path / "g"
    a = get_index(x, prefix, "hnsw", log=logs.append)
    assert os.path.exists(f"{prefix}_index.faiss") and len(logs) == 1
    b = get_index(x, prefix, "hnsw", ef_search=3000, log=logs.append)
    assert len(logs) == 1  # loaded, not rebuilt
    np.testing.assert_array_equal(b.search(q, 10)[1], ref_rows)
    x2 = np.concatenate([x, _unit(rng.normal(size=(1, 32)))])
    c = get_index(x2, prefix, "hnsw", log=logs.append)
    assert len(logs) == 2 and c.n == 3001
    get_index(x2, prefix, "ivf", log=logs.append)  # another type is another index
    assert len(logs) == 3 and a.kind == "hnsw"


# ------------------------------------------------------------------------------------------- queries, errors
@pytest.fixture(scope="module")
def gallery(env, tmp_path_factory):
    d = tmp_path_factory.mktemp("gallery")
    imgs = d / "imgs"
    write_images(imgs, ("red", "green", "blue", "yellow"))
    write_split_image(imgs / "split.png", "red", "blue")
    bf = d / "boxes.json"
    bf.write_text(json.dumps({"split.png": [[0, 0, 40, 80], [40, 0, 80, 80]], "red.png": [[0, 0, 40, 80]],
                              "green.png": [[0, 0, 40, 80]], "blue.png": [[0, 0, 40, 80]],
                              "yellow.png": [[5, 5, 35, 75]]}))
    prefix = d / "coll" / "p"
    enrol(imgs, prefix, env.export, boxes=str(bf))
    return SimpleNamespace(dir=d, imgs=imgs, prefix=prefix, features=f"{prefix}_features.npy",
                           metadata=f"{prefix}_metadata.json")


def test_bad_queries_answer(env, gallery):
    s = Searcher(TextEncoder(str(env.export)), gallery.features, image_root=str(gallery.imgs), log=lambda m: None)
    for q in BAD_QUERIES:
        res = s.search(q, 3)
        text = format_result(res)
        assert "\x1b" not in text and "\x00" not in text and "\x07" not in text
        if q.strip() == "" or q == "\u200b\ufeff":
            assert res["results"] == [] and "empty query" in res["notes"][0]
        else:
            assert len(res["results"]) == 3
            assert all(np.isfinite(r["score"]) for r in res["results"])
    assert "truncated to its first 15 of 10000 characters" in s.search("x" * 10000)["notes"][0]
    r = run_py([API, "--image-root", gallery.imgs, "--image_feature", gallery.features, "--model_dir", env.export,
                "--queries", *[q for q in BAD_QUERIES if "\x00" not in q and "\ud800" not in q], "--top-n", "2"],
               env=env.env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.count("----------") == len(BAD_QUERIES) - 2
    assert "\x1b" not in r.stdout and "Query: 'a\\x1b[31mred\\x07\\x7f'" in r.stdout


def test_mismatches_refused_with_one_line(env, gallery, tmp_path):
    base = [API, "--image-root", gallery.imgs, "--queries", "r"]
    # dim mismatch between the text model and the features
    wide = make_export(tmp_path / "wide", dim=6)
    msg = one_line_error(run_py(base + ["--image_feature", gallery.features, "--model_dir", wide], env=env.env))
    assert "6-dim" in msg and "4-dim" in msg
    # row-count mismatch between features and metadata
    f = np.load(gallery.features)
    np.save(tmp_path / "short_features.npy", f[:-1])
    shutil.copy(gallery.metadata, tmp_path / "short_metadata.json")
    msg = one_line_error(run_py(base + ["--image_feature", tmp_path / "short_features.npy", "--model_dir",
                                        env.export], env=env.env))
    assert f"{len(f) - 1} rows" in msg and f"{len(f)} items" in msg
    # feature dim disagreeing with the metadata's dim
    np.save(tmp_path / "d3_features.npy", f[:, :3])
    shutil.copy(gallery.metadata, tmp_path / "d3_metadata.json")
    assert "dim 4" in one_line_error(run_py(base + ["--image_feature", tmp_path / "d3_features.npy",
                                                    "--model_dir", env.export], env=env.env))
    # missing files, no model, a pickled object array
    assert "not found" in one_line_error(run_py(base + ["--image_feature", tmp_path / "nope_features.npy",
                                                        "--model_dir", env.export], env=env.env))
    r = run_py(base + ["--image_feature", gallery.features], cwd=tmp_path, env=env.env)
    assert "--model_dir" in one_line_error(r)
    np.save(tmp_path / "obj_features.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    shutil.copy(gallery.metadata, tmp_path / "obj_metadata.json")
    assert "unreadable features" in one_line_error(run_py(base + ["--image_feature", tmp_path / "obj_features.npy",
                                                                  "--model_dir", env.export], env=env.env))


def test_search_side_imports_without_torch(env):
    code = ("import sys\n"
            "try:\n    import torch\n    raise SystemExit('guard failed: torch imported')\nexcept ImportError:\n    pass\n"
            "import search.api, search.engine, search.collection, search.index, search.enroll, search.webui\n"
            "import search.enroll_by_onnx, search.app_onnx, search.app_siglip, search.enroll_by_siglip\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'transformers'))]\n"
            "assert not bad, bad\nprint('ok')\n")
    r = run_py(["-c", code], env=env.env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


# ------------------------------------------------------------------------------------------- teacher space
class FakeTeacher:
    """Stands in for teachers.load_teacher(): a 4-dim 'teacher' whose image tower is the mean colour."""
    kind, name, dim = "siglip2", "google/fake-siglip2", 4

    def embed_images(self, images):
        x = np.stack([np.asarray(im.convert("RGB"), np.float32).mean((0, 1)) for im in images])
        return _unit(np.concatenate([x, np.zeros((len(x), 1), np.float32)], 1))

    def embed_texts(self, texts):
        return _unit(np.stack([[t.count("r") + .01, t.count("g") + .01, t.count("b") + .01, 0] for t in texts]))


def test_teacher_enrolled_gallery_searched_with_text_only_student(env, tmp_path, monkeypatch):
    import search.enroll_by_siglip as ebs

    monkeypatch.setitem(sys.modules, "teachers", SimpleNamespace(load_teacher=lambda *a, **k: FakeTeacher()))
    imgs = tmp_path / "imgs"
    write_images(imgs, ("red", "green", "blue"))
    a = ebs.get_args_parser().parse_args(["--teacher", "google/fake-siglip2", "--image-dir", str(imgs),
                                          "--output-prefix", str(tmp_path / "t")])
    s = run_enrolment(a, ebs.TeacherEnrolEncoder(a), log=lambda m: None)
    assert s["total"] == 3
    c = load_collection(f"{tmp_path / 't'}_features.npy")
    assert c.model["kind"] == "teacher" and c.model["space"] == "teacher:fake-siglip2"
    # a --text_only student distilled from that teacher (local copy path of the same teacher): no warning
    student = make_export(tmp_path / "student", image=False, teacher_space=True, teacher="/models/fake-siglip2")
    logs = []
    srch = Searcher(TextEncoder(str(student)), f"{tmp_path / 't'}_features.npy", log=logs.append)
    assert logs == [] and srch.search("b", 1)["results"][0]["image"] == "blue.png"
    # a student-space text model gets a warning (different space), not a silent answer
    Searcher(TextEncoder(str(env.export)), f"{tmp_path / 't'}_features.npy", log=logs.append)
    assert len(logs) == 1 and "space" in logs[0]
    # the teacher's own text tower (app_siglip.py's encoder)
    tt = TeacherTextEncoder.__new__(TeacherTextEncoder)
    tt.teacher, tt.dim, tt.max_seq_length, tt.name, tt.space = FakeTeacher(), 4, None, "fake", "teacher:fake-siglip2"
    assert Searcher(tt, f"{tmp_path / 't'}_features.npy").search("g", 1)["results"][0]["image"] == "green.png"
    # a text-only export cannot enrol images
    r = run_py([ENROL, "--image-dir", imgs, "--output-prefix", tmp_path / "x", "--model_dir", student], env=env.env)
    assert "no image model" in one_line_error(r)


# ------------------------------------------------------------------------------------------- web server
@pytest.fixture(scope="module")
def server(env, gallery):
    outside = gallery.dir / "outside_secret.png"
    write_images(gallery.dir, ("purple",))
    shutil.copy(gallery.dir / "purple.png", outside)
    os.symlink(outside, gallery.imgs / "escape.png")
    (gallery.imgs / "private.txt").write_text("root:x:0:0 not for the web")
    write_images(gallery.imgs, ("white",), sub="unlisted")
    # list the symlink in the collection so that only the realpath check can refuse it
    meta = json.loads(Path(gallery.metadata).read_text())
    meta["items"][-1] = dict(meta["items"][-1], image="escape.png")
    srv_meta = gallery.dir / "srv_metadata.json"
    srv_meta.write_text(json.dumps(meta))
    s = Searcher(TextEncoder(str(env.export)), gallery.features, str(srv_meta), str(gallery.imgs),
                 log=lambda m: None)
    srv = make_server(s, str(gallery.imgs), "127.0.0.1", 0, quiet=True)
    serve_in_thread(srv)
    yield SimpleNamespace(port=srv.server_address[1], searcher=s)
    srv.shutdown()
    srv.server_close()


def get(port, path, host=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.putrequest("GET", path, skip_host=host is not None)  # the raw path: no client-side normalisation
    if host is not None:
        c.putheader("Host", host)
    c.endheaders()
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, r.getheader("Content-Type"), body


def test_api_search_json(server):
    st, ct, body = get(server.port, "/api/search?q=r&top_n=2")
    assert st == 200 and ct.startswith("application/json")
    doc = json.loads(body)
    assert len(doc["results"]) == 2 and doc["time_s"] >= 0
    top = doc["results"][0]
    assert top["image"] == "red.png" or top["bbox"] == [0, 0, 40, 80]  # the red image or the red half
    assert top["score"] > doc["results"][1]["score"] - 1e-9
    assert "path" not in top  # no server filesystem paths in answers
    st, ct, img = get(server.port, top["image_url"])
    assert st == 200 and ct == "image/jpeg"
    crop = Image.open(io.BytesIO(img))
    assert crop.size[0] > 0
    for path, code in (("/api/search?q=r&top_n=101", 400), ("/api/search?q=r&top_n=abc", 400),
                       ("/api/search?top_n=3", 400), ("/nope", 404)):
        assert get(server.port, path)[0] == code, path
    st, _, body = get(server.port, "/api/search?q=" + "x" * 5000 + "&top_n=100")
    doc = json.loads(body)
    assert st == 200 and len(doc["results"]) == len(server.searcher) and "cut to 1000" in doc["notes"][0]
    st, _, body = get(server.port, "/api/search?q=%F0%9F%98%80%E7%BA%A2%00%1b&top_n=1")
    assert st == 200 and len(json.loads(body)["results"]) == 1
    st, _, body = get(server.port, "/api/search?q=%20%20&top_n=1")
    assert st == 200 and json.loads(body)["results"] == []


def test_image_route_confined_to_root(server):
    assert get(server.port, "/image?path=green.png")[0] == 200
    assert get(server.port, "/image?path=red.png&bbox=0,0,40,80")[0] == 200
    for path in ("/image?path=../../etc/passwd", "/image?path=%2e%2e/%2e%2e/etc/passwd",
                 "/image?path=..%2f..%2fetc/passwd", "/image?path=%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                 "/image?path=/etc/passwd", "/image?path=%2Fetc%2Fpasswd", "/image?path=..\\..\\etc\\passwd",
                 "/image?path=../outside_secret.png", "/image?path=escape.png",  # symlink out of the root
                 "/image?path=private.txt", "/image?path=unlisted/white.png",  # in the root, not in the gallery
                 "/image?path=%252e%252e/etc/passwd", "/image?path=", "/image?path=red.png%00.txt",
                 "/image/../../etc/passwd", "/../../etc/passwd"):
        st, _, body = get(server.port, path)
        assert st in (403, 404), (path, st)
        assert b"root:" not in body and not body.startswith(b"\x89PNG"), path
    assert get(server.port, "/image?path=escape.png")[0] == 403
    assert get(server.port, "/image?path=red.png&bbox=1,2,x")[0] == 400
    assert get(server.port, "/api/search?q=r", host="evil.example.com:80")[0] == 403  # DNS rebinding guard
    assert get(server.port, "/api/search?q=r", host="localhost:1234")[0] == 200


def test_page_escapes_query(server):
    st, ct, body = get(server.port, "/?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E%22%27&top_n=3")
    page = body.decode()
    assert st == 200 and ct.startswith("text/html")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;" in page
    assert page.count("<figure class=result>") == 3
    st, _, body = get(server.port, "/")
    assert st == 200 and b"<form" in body and b"<figure" not in body


# ------------------------------------------------------------------------------------------- synthetic dataset
def test_enrol_and_search_synthetic_pedes(env, synth_data, tmp_path):
    """The project's synthetic SYNTH-PEDES images (nested Part1/<id>/<k>.jpg) through the CLI, torch blocked."""
    records = json.loads(Path(synth_data).read_text())
    root = Path(synth_data).parent
    prefix = tmp_path / "pedes"
    r = run_py([ENROL, "--image-dir", root, "--output-prefix", prefix, "--model_dir", env.export,
                "--batch_size", "16", "--index", "hnsw"], env=env.env)
    assert r.returncode == 0, r.stderr
    assert f"enrolled {len(records)} new entries" in r.stdout and "skipped" not in r.stdout
    assert os.path.exists(f"{prefix}_index.faiss")  # --index hnsw saves its index next to the features
    c = load_collection(f"{prefix}_features.npy")
    assert sorted(it["image"] for it in c.items) == sorted(rec["file_path"] for rec in records)
    sample = c.items[:5]
    ref = ImageEncoder(load_export(env.export)).encode([(Image.open(root / it["image"]), None) for it in sample])
    np.testing.assert_allclose(c.features[:5], ref, atol=1e-5)
    caps = [records[0]["captions"][0], records[0]["captions_zh"][0]]
    r = run_py([API, "--image-root", root, "--image_feature", f"{prefix}_features.npy", "--model_dir", env.export,
                "--queries", *caps, "--top-n", "5", "--index", "hnsw", "--ef_search", "200", "--json"], env=env.env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["collection"]["index"] == "hnsw"
    q = TextEncoder(str(env.export)).encode(caps)
    for res, qv in zip(doc["queries"], q):
        assert [x["row"] for x in res["results"]] == list(np.argsort(-(c.features @ qv))[:5])


def test_query_words_the_student_never_saw_are_left_out(env, gallery, tmp_path):
    """An export with query_vocab.txt: the CLI (torch-free) and Searcher drop unknown Latin words and say what the
    model read; --query_filter 0 and an export without the list search the query as typed."""
    exp = tmp_path / "export"
    shutil.copytree(env.export, exp)
    info = json.loads((exp / "model_info.json").read_text())
    (exp / "model_info.json").write_text(json.dumps(dict(info, query_vocab="query_vocab.txt")))
    (exp / "query_vocab.txt").write_text("a\ncoat\nin\nman\nred\n")
    q = "looking for a man in a red coat, camera 3"
    s = Searcher(TextEncoder(str(exp)), gallery.features, image_root=str(gallery.imgs), log=lambda m: None)
    res = s.search(q, 2)
    assert "it read: 'a man in a red coat, 3'" in res["notes"][0]  # (then: truncated to the fixture's 15 chars)
    plain = Searcher(TextEncoder(str(env.export)), gallery.features, image_root=str(gallery.imgs), log=lambda m: None)
    assert [r["score"] for r in res["results"]] == pytest.approx(
        [r["score"] for r in plain.search("a man in a red coat, 3", 2)["results"]], abs=1e-6)
    assert not any("never saw" in n for n in plain.search(q, 2)["notes"])
    # field labels go with or without a word list: both read the same text
    assert "it read: 'man, red coat'" in s.search("Sex - man. Outer layer - red coat.", 2)["notes"][0]
    assert "it read: 'man, red Coat'" in plain.search("Sex - man. Coat: red", 2)["notes"][0]
    base = [API, "--image-root", gallery.imgs, "--image_feature", gallery.features, "--model_dir", exp,
            "--queries", q, "--top-n", "1"]
    r = run_py(base, env=env.env)
    assert r.returncode == 0 and "words the student never saw were left out" in r.stdout, r.stderr
    r = run_py(base + ["--query_filter", "0"], env=env.env)
    assert r.returncode == 0 and "never saw" not in r.stdout, r.stderr
    (exp / "query_vocab.txt").unlink()  # named but missing: one line, not a traceback
    assert "query_vocab.txt" in one_line_error(run_py(base, env=env.env))
