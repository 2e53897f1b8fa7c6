"""record_store.py: the memory-mapped records equal data.load_records', the image check runs once, a changed JSON
is refused or rebuilt, builds are atomic; bench/scale.py end to end at a tiny size (structure only, no timings).

    python3 -m pytest -q tests/test_record_store.py
"""
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import record_store  # noqa: E402
import test_data  # noqa: E402  (its fixtures' writers and malformed cases)
from data import DatasetError  # noqa: E402
from record_store import RecordStore, StoreError  # noqa: E402


def _same(store, recs):
    assert len(store) == len(recs)
    assert [dict(r) for r in store] == recs
    assert store[-1] == recs[-1] and store[0] == recs[0] and dict(store[len(recs) - 1]) == recs[-1]
    assert np.array_equal(data.caption_offsets(store), data.caption_offsets(recs))
    assert data.caption_rows(store) == data.caption_rows(recs)
    for ratio, val_ratio in ((0.1, 0.0), (0.5, 0.0), (0.1, 0.3)):  # the val split too (a JSON "val" is val)
        splits = [data.split_records(store, ratio, split, val_ratio) for split in ("train", "val", "test")]
        assert splits == [data.split_records(recs, ratio, split, val_ratio) for split in ("train", "val", "test")]
        assert sorted(sum(splits, [])) == list(range(len(recs)))  # every record in exactly one split
    idx = list(range(len(recs)))[::-1]
    assert data.eval_captions(store, idx, ("en", "zh")) == data.eval_captions(recs, idx, ("en", "zh"))


@pytest.mark.parametrize("chunk", [record_store.CHUNK_CHARS, 7])  # 7 characters: every record spans chunks
def test_same_records_as_load_records(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(record_store, "CHUNK_CHARS", chunk)
    path = test_data._synth(tmp_path, n_ids=5, per_id=3)
    recs = data.load_records(path)
    recs[0]["attributes"] = None  # and a record without attributes / with an empty prompt
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    raw[0].pop("attributes")
    raw[1]["prompt_caption"] = ""
    recs[1]["prompt_caption"] = ""
    Path(path).write_text(json.dumps(raw, ensure_ascii=False, indent=1), encoding="utf-8")
    store = record_store.build(path, progress=False)
    assert store.path == str(tmp_path / "synth.records")
    _same(store, recs)
    assert store.optional("prompt_caption", 1) == "" and not store.nonempty("prompt_caption")[1]
    assert store.optional("attributes", 0) is None
    # the caption column is caption.npy's row order, and pivots are the parallel English rows
    rows = data.caption_rows(recs)
    assert [store.caption_text(i) for i in range(len(rows))] == [t for _, _, t, _ in rows]
    assert [store.caption_text(p) for p in store.pivot_rows(np.arange(len(rows)))] == [p for *_, p in rows]
    assert store.caption_record(np.arange(len(rows))).tolist() == [r for r, *_ in rows]


def test_other_formats_and_image_root(tmp_path):
    cuhk = [{"split": "Train", "captions": ["a man"], "file_path": "CUHK01/a.png", "processed_tokens": [["a"]],
             "id": 1}, {"split": "val", "captions": ["a woman", "she"], "file_path": "b.png", "processed_tokens": [],
                        "id": 7}]
    p = test_data._write(tmp_path / "reid_raw.json", cuhk)
    _same(record_store.build(p, image_root="/imgs", check="none", progress=False), data.load_records(p, "/imgs"))
    icfg = test_data._write(tmp_path / "icfg.json", [dict(cuhk[0], id=0), dict(cuhk[1], id=3)])
    _same(record_store.build(icfg, check="none", progress=False), data.load_records(icfg))
    rstp = [{"id": 0, "img_path": "0000_c14_0031.jpg", "captions": ["x", "y"], "split": "train"},
            {"id": 5, "img_path": "0005_c1.jpg", "captions": ["z"], "split": "test"}]
    p = test_data._write(tmp_path / "data_captions.json", rstp)
    s = record_store.build(p, check="none", progress=False)
    _same(s, data.load_records(p))
    assert s.splits == ["train", "test"]


@pytest.mark.parametrize("text, where, what", test_data.test_malformed.pytestmark[0].args[1])
def test_malformed_same_message(tmp_path, text, where, what):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError) as ref:
        data.load_records(path)
    with pytest.raises(DatasetError) as got:
        record_store.build(path, progress=False)
    assert str(got.value) == str(ref.value)
    assert not [n for n in os.listdir(tmp_path) if n != "bad.json"]  # no half-built store left behind


def test_streaming_error_message_on_big_files(tmp_path, monkeypatch):
    monkeypatch.setattr(record_store, "EXACT_ERROR_MAX_BYTES", 0)  # as if the file were too big to parse whole
    path = tmp_path / "bad.json"
    path.write_text('[{"id": 1, "file_path": "a.jpg", "captions": ["a"]},\n {"id": 2, "file_path": "b" "x"}]')
    with pytest.raises(DatasetError, match=rf"^{path}: record 1: invalid JSON \(") as e:
        record_store.build(path, progress=False)
    assert "\n" not in str(e.value)


def test_image_check_once_and_recorded(tmp_path, monkeypatch):
    path = test_data._synth(tmp_path)
    recs = data.load_records(path)
    os.remove(recs[1]["image_path"])
    Path(recs[4]["image_path"]).write_bytes(b"")
    jpg = Path(recs[6]["image_path"]).read_bytes()
    Path(recs[6]["image_path"]).write_bytes(jpg[:len(jpg) // 2])  # truncated: the header still parses
    store = record_store.build(path, check="decode", progress=False)
    assert store.image_status.tolist() == [0, 1, 0, 0, 2, 0, 2, 0]
    assert store.manifest["counts"]["images_missing"] == 1 and store.manifest["counts"]["images_corrupt"] == 2
    assert data.check_images(store) == data.check_images(recs) == ([0, 2, 3, 5, 7], 1, 2)
    assert data.check_images(store, indices=[4, 7, 1]) == ([7], 1, 1)
    # no rank repeats it: opening and asking never touch an image file
    monkeypatch.setattr(data, "_image_status", lambda *a: pytest.fail("image checked again"))
    monkeypatch.setattr(data, "load_image", lambda *a: pytest.fail("image loaded"))
    again = record_store.ensure(path, progress=False)
    assert data.check_images(again, indices=range(8))[1:] == (1, 2)
    # header mode cannot see truncation; none checks nothing and lets the Dataset's fallback skip bad files
    monkeypatch.undo()
    assert record_store.build(path, check="header", progress=False).image_status.tolist() == [0, 1, 0, 0, 2, 0, 0, 0]
    none = record_store.build(path, check="none", progress=False)
    assert set(none.image_status.tolist()) == {3} and data.check_images(none) == (list(range(8)), 0, 0)
    assert record_store.build(path, progress=False).manifest["image_check"] == "decode"  # auto, small: decode


def test_changed_json_is_refused_or_rebuilt(tmp_path, capsys):
    path = test_data._synth(tmp_path)
    store = record_store.ensure(path)
    assert "not built yet; building it" in capsys.readouterr().err
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    raw[2]["captions"][0] = "changed"
    Path(path).write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(StoreError, match="built for another version of the JSON") as e:
        RecordStore.open(store.path, json_path=path)
    assert "\n" not in str(e.value) and isinstance(e.value, DatasetError)
    assert store[2]["captions"][0] != "changed"  # an open store keeps serving its own (old) files
    fresh = record_store.ensure(path)
    assert "built for another version of the JSON" in capsys.readouterr().err
    assert fresh[2]["captions"][0] == "changed" and fresh.manifest["dataset_sha256"] == data.dataset_hash(path)
    assert store[2]["captions"][0] != "changed"
    other = tmp_path / "elsewhere"
    moved = record_store.ensure(path, image_root=str(other), progress=False)  # another image root: rebuilt
    assert moved[0]["image_path"] == str(other / "imgs/0_0.jpg") and moved.image_status[0] == 1
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n or ".old." in n]
    with pytest.raises(DatasetError, match="no such file"):
        record_store.ensure(tmp_path / "nope.json")


def test_damaged_or_unwritable(tmp_path):
    path = test_data._synth(tmp_path)
    store = record_store.build(path, progress=False)
    os.remove(os.path.join(store.path, "caption.off.npy"))
    with pytest.raises(StoreError, match="damaged record store"):
        RecordStore.open(store.path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a folder that cannot be created, even by root
    with pytest.raises(StoreError, match="cannot write the record store.*--record_store"):
        record_store.build(path, out=str(blocker / "s"), progress=False)
    with pytest.raises(StoreError, match="cannot write the record store.*--record_store"):
        record_store.ensure(path, store=str(blocker / "s"), progress=False)


def test_waiting_rank_gets_the_builders_store(tmp_path):
    path = test_data._synth(tmp_path)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("s", record_store.ensure(path, builder=False, poll_s=0.05)))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # nothing built yet: it waits instead of building
    record_store.ensure(path, progress=False)
    t.join(10)
    assert not t.is_alive() and len(got["s"]) == 8


def test_dataset_on_the_store_equals_the_list(tmp_path):
    import torch
    path = test_data._synth(tmp_path)
    recs, store = data.load_records(path), record_store.build(path, progress=False)
    blob = pickle.dumps(store)
    assert len(blob) < 4000  # DataLoader workers get the folder name, not the columns
    assert pickle.loads(blob)[3] == recs[3]
    for langs, compose in ((("en", "zh"), 0.0), (("zh",), 0.0), (("zh",), 0.5)):
        kw = dict(image_size=(32, 16), langs=langs, compose_prob=compose, seed=3)
        a = data.DistillDataset(recs, range(len(recs)), **kw)
        b = data.DistillDataset(store, range(len(recs)), **kw)
        assert np.array_equal(a.indices, b.indices) and a.n_dropped == b.n_dropped
        for i in range(len(a)):
            x, y = a[i], b[i]
            for k in x:
                assert (torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]), (langs, i, k)


def test_data_cli_index(tmp_path):
    path = test_data._synth(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "--data", str(path), "--index"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "8 records, 4 identities, 16 en + 8 zh captions; image check decode: 8 ok" in r.stdout
    assert "split: " in r.stdout and (tmp_path / "synth.records" / "manifest.json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "--data", str(bad), "--index"], capture_output=True,
                       text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith(f"error: {bad}: record 0: ") and "Traceback" not in r.stderr


def test_bench_scale_tiny(tmp_path):
    """bench/scale.py at 40 records: every stage runs and prints its row (timings are never asserted)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--n", "40", "--dir", str(tmp_path / "b"),
                        "--images", "4", "--dim", "16", "--train_dim", "16", "--batch_size", "8"], capture_output=True, text=True,
                       timeout=600, cwd=str(tmp_path), env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = r.stdout[r.stdout.index("| stage |"):]
    for name in ("imports", "json (old)", "build store", "open store", "Dataset", "sampler epoch", "first batch",
                 "main.py", "extract start", "batch write"):
        assert f"| {name} | " in table, name
    assert "40 records" in table and "PSS" in table and "new " in table and "old " in table
