"""Bad input through the entry points: every case ends in a one-line error (exit 2, no traceback), a counted skip,
or a refusal, and nothing is lost. One test per class of issue 12: code execution from files, data loss in the
teacher cache, hangs on non-regular files, silent wrong results, tracebacks, web UI resources, new-user traps.

Entry points run in-process (`main(args)` with SystemExit caught) where torch is already imported, and as
subprocesses where a hang or the exit status itself is what is tested. Tiny fixtures only: the 24-id synthetic
set, a fake teacher cache, a 2-step training run, the hand-built ONNX export of search_fixtures.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import sys
import time
import zipfile
from pathlib import Path
from urllib.request import urlopen
from urllib.error import HTTPError

import numpy as np
import pytest
import torch
from PIL import Image

from search_fixtures import REPO, make_export, run_py, write_images
from train_fixtures import make_fake_cache

import data as data_lib  # noqa: E402
import evaluation_labels  # noqa: E402
import evaluation_model  # noqa: E402
import export_model  # noqa: E402
import main as trainer  # noqa: E402
import opts  # noqa: E402
from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from embedding_cache import CacheMismatchError, EmbeddingCache  # noqa: E402

ENROL = REPO / "search" / "enroll_by_onnx.py"
API = REPO / "search" / "api.py"
APP = REPO / "search" / "app_onnx.py"
TRAIN_FLAGS = ["--backbone", "mobile_tiny", "--text_backbone", "char_tiny", "--image_size", "64x32",
               "--feature_dim", "16", "--batch_size", "8", "--workers", "0", "--warmup", "1", "--memory_size", "32",
               "--eval_every", "0", "--eval_max_images", "8"]


# ------------------------------------------------------------------------------------------------ helpers
PROGRESS = ("warning: ", "record store", "image check (")  # stderr lines that are not the error


def one_line_error(code, err, contains=None):
    """The project's contract for bad input: exit 2 and exactly one `error: ...` line, no traceback.
    Warnings and the record store's build notice and progress bars (record_store.ensure) may come before it."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(PROGRESS)]
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if contains:
        assert contains in lines[0], lines[0]
    return lines[0]


def call(fn, argv, parser, capsys):
    """Run an entry point in-process; -> (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn(parser.parse_args([str(a) for a in argv]))
    return e.value.code, capsys.readouterr().err


def train_parser():
    return argparse.ArgumentParser(parents=[opts.get_args_parser()])


def run_train(argv, capsys):
    return call(trainer.main, argv, train_parser(), capsys)


def run_eval(argv, capsys):
    return call(evaluation_model.main, argv, evaluation_model.get_args_parser(add_help=True), capsys)


def run_export(argv, capsys):
    return call(export_model.main, argv, argparse.ArgumentParser(parents=[export_model.get_args_parser()]), capsys)


def run_labels(argv, capsys):
    return call(evaluation_labels.main, argv, evaluation_labels.get_args_parser(add_help=True), capsys)


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging (main thread only; the code under test reads files in the main thread)."""
    def boom(*_):
        raise TimeoutError(f"still running after {seconds} s (a hang)")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def wait_for(cond, seconds=30.0):
    t = time.time()
    while not cond():
        assert time.time() - t < seconds, "condition not reached"
        time.sleep(0.05)


def tree(path):
    """{relative path: bytes} of a folder: 'nothing was lost or changed'."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def deep_json(depth=100_000):
    return "[" * depth + "]" * depth


def flip_tensor_byte(path):
    """Flip one byte in the middle of the largest tensor stored in a torch.save zip (stored, not compressed)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        hdr = f.read(30)
        n, m = struct.unpack("<HH", hdr[26:30])
        pos = info.header_offset + 30 + n + m + info.file_size // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x10]))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cache(synth_data, tmp_path_factory):
    return make_fake_cache(synth_data, tmp_path_factory.mktemp("bad_cache") / "emb", dim=16)


@pytest.fixture(scope="module")
def trained(synth_data, cache, tmp_path_factory):
    """A real 2-step run (in-process): its last.pt is the base of the checkpoint cases."""
    out = tmp_path_factory.mktemp("bad_runs")
    args = train_parser().parse_args(["--data", synth_data, "--embedding_path", cache, "--output_dir", str(out),
                                      "--iters", "2", "--save_every", "2", *TRAIN_FLAGS])
    run_dir = trainer.main(args)
    assert (run_dir / "last.pt").is_file()
    return dict(out=out, run_dir=run_dir, ckpt=run_dir / "last.pt")


def ckpt_variant(trained, tmp_path, name, edit):
    ck = load_checkpoint(trained["ckpt"])
    edit(ck)
    p = tmp_path / f"{name}.pt"
    save_checkpoint(p, ck)  # re-hashed: these files are well-formed, only their content is hostile/wrong
    return p


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A tiny enrolled collection (torch-free export of search_fixtures) + its image folder."""
    root = tmp_path_factory.mktemp("bad_gallery")
    export = make_export(root / "export")
    imgs = root / "imgs"
    write_images(imgs, ("red", "green", "blue", "yellow", "white", "purple"))
    prefix = root / "coll" / "person"
    r = run_py([ENROL, "--image-dir", imgs, "--output-prefix", prefix, "--model_dir", export], timeout=120)
    assert r.returncode == 0, r.stderr
    return dict(root=root, export=export, imgs=imgs, prefix=prefix, features=Path(f"{prefix}_features.npy"),
                metadata=Path(f"{prefix}_metadata.json"))


def copy_collection(gallery, dst):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(gallery["features"], dst / "person_features.npy")
    shutil.copy(gallery["metadata"], dst / "person_metadata.json")
    return dst / "person_features.npy", dst / "person_metadata.json"


def api(gallery, features, *extra, image_root=None):
    return run_py([API, "--image-root", image_root or gallery["imgs"], "--image_feature", features,
                   "--model_dir", gallery["export"], "--queries", "r", "--top-n", "3", *extra])


# ================================================================================================ 1. security
HOSTILE_CFGS = {
    "subprocess": dict(backbone="subprocess.run", backbone_kwargs={"args": "touch {pwned}", "shell": True}),
    "os_system": dict(backbone="os.system", backbone_kwargs={"command": "touch {pwned}"}),
    "dotted_unregistered": dict(backbone="backbone.tv.TorchvisionBackbone", backbone_kwargs={"arch": "resnet18"}),
    "undeclared_kwarg": dict(backbone="mobile_tiny", backbone_kwargs={"shell": True}),
    "weights_path": dict(backbone="mobile_tiny", backbone_kwargs={"weights_path": "/etc/passwd"}),
    "object_kwarg": dict(backbone="mobile_tiny", backbone_kwargs={"width_mult": {"__class__": "x"}}),
    "text_backbone": dict(text_backbone="subprocess.run"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CFGS))
def test_checkpoint_names_resolve_only_to_registered_classes(case, trained, tmp_path, capsys):
    pwned = tmp_path / "pwned"
    edit = {k: json.loads(json.dumps(v).replace("{pwned}", str(pwned))) for k, v in HOSTILE_CFGS[case].items()}
    ck = ckpt_variant(trained, tmp_path, case, lambda c: c["model_cfg"].update(edit))
    targs = load_checkpoint(trained["ckpt"])["args"]
    for name, run, argv in (
            ("evaluation_model.py", run_eval, [ck, "--workers", "0"]),
            ("export_model.py", run_export, [ck, tmp_path / "export"]),
            ("main.py --resume", run_train, ["--data", targs["data"], "--embedding_path", targs["embedding_path"],
                                              "--output_dir", tmp_path / "logs", "--resume", ck, *TRAIN_FLAGS])):
        code, err = run(argv, capsys)
        one_line_error(code, err)
        assert not pwned.exists(), f"{name} ran a command from the checkpoint"
    assert not (tmp_path / "logs").exists()  # the refused resume created no run folder
    assert not (tmp_path / "export").exists() or not list((tmp_path / "export").glob("*.onnx"))


def test_cli_backbone_names_are_checked(synth_data, cache, tmp_path, capsys):
    from backbone import create_backbone
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("subprocess.run", args="touch x", shell=True)
    code, err = run_train(["--data", synth_data, "--embedding_path", cache, "--output_dir", tmp_path,
                           *TRAIN_FLAGS, "--backbone", "subprocess.run"], capsys)
    one_line_error(code, err, "--backbone 'subprocess.run': unknown")
    assert list(tmp_path.iterdir()) == []


# ================================================================================================ 2. data loss
def test_truncated_cache_is_refused_or_repaired_never_grown(cache, synth_data, tmp_path, capsys):
    emb = tmp_path / "emb"
    shutil.copytree(cache, emb)
    f = emb / "image.npy"
    full, before = f.stat().st_size, f.read_bytes()
    row = 16 * 2
    os.truncate(f, full - 40 * row - 5)  # the last 40 rows (and a bit of the one before) are gone
    # readers: refused with one line; the file is left as it is (no silent zero-growth)
    with pytest.raises(CacheMismatchError, match="truncated or damaged"):
        EmbeddingCache.open(emb)
    code, err = run_train(["--data", synth_data, "--embedding_path", emb, "--output_dir", tmp_path / "logs",
                           "--iters", "1", *TRAIN_FLAGS], capsys)
    one_line_error(code, err, "image.npy is")
    code, err = run_labels(["--data", synth_data, "--embedding_path", emb], capsys)
    one_line_error(code, err, "truncated")
    assert f.stat().st_size == full - 40 * row - 5 and not (tmp_path / "logs").exists()
    # a writer (an extraction resuming into it) keeps the intact rows and marks the lost ones not done, loudly
    w = EmbeddingCache.open(emb, mode="r+")
    err = capsys.readouterr().err
    n = w.manifest["counts"]["image"]
    keep = n - 41
    assert "41 rows marked done were lost and are marked not done" in err, err
    assert f.stat().st_size == full
    done = EmbeddingCache.open(emb).done("image")
    assert done[:keep].all() and not done[keep:].any()
    assert f.read_bytes()[:full - 41 * row] == before[:full - 41 * row]  # intact rows kept byte for byte


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    """A tiny random SigLIP saved like a hub checkpoint: a real image teacher for extraction (seconds on a CPU)."""
    import transformers as T
    from test_extract import _tokenizer
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("teacher") / "siglip-tiny"
    text = dict(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(p)
    T.SiglipProcessor(T.SiglipImageProcessor(size={"height": 32, "width": 32}), _tokenizer()).save_pretrained(p)
    return p


def test_extraction_resume_recomputes_a_truncated_field(tiny_siglip, synth_data, tmp_path, capsys):
    from test_extract import extract, subset
    dj = subset(synth_data, tmp_path / "d", 6)
    emb = tmp_path / "emb"
    with deadline(120):
        extract(dj, emb, tiny_siglip, "--fields", "image")
    f = emb / "image.npy"
    full, before = f.stat().st_size, f.read_bytes()
    row = 2 * json.loads((emb / "manifest.json").read_text())["dim"]
    os.truncate(f, full - 2 * row)  # a copy cut short: the last 2 rows are gone
    capsys.readouterr()
    with deadline(120):
        res = extract(dj, emb, tiny_siglip, "--fields", "image")
    assert "2 rows marked done were lost and are marked not done" in capsys.readouterr().err
    assert res["computed"]["image"] == 2  # exactly the lost rows, nothing else
    assert f.read_bytes() == before  # same teacher, same images: the file is whole again, byte for byte
    assert EmbeddingCache.open(emb).done("image").all()


# ================================================================================================ 3. hangs
def test_fifo_in_image_teacher_extraction(tiny_siglip, synth_data, tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    from test_extract import extract, subset
    dj = subset(synth_data, tmp_path / "d", 4)
    recs = data_lib.load_records(dj)
    os.remove(recs[2]["image_path"])
    os.mkfifo(recs[2]["image_path"])
    with deadline(120):  # Image.open on the FIFO blocked forever before
        res = extract(dj, tmp_path / "emb", tiny_siglip, "--fields", "image")
    assert res["n_corrupt"] == 1 and res["computed"]["image"] == 3
    assert EmbeddingCache.open(tmp_path / "emb").done("image").tolist() == [True, True, False, True]


def test_fifo_named_jpg_never_hangs(synth_data, tmp_path, capsys):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    # the dataset side (training, evaluation, extraction all read through data.load_image / check_images)
    recs = json.loads(Path(synth_data).read_text())[:4]
    d = tmp_path / "d"
    for r in recs:
        (d / r["file_path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(synth_data).parent / r["file_path"], d / r["file_path"])
    os.remove(d / recs[1]["file_path"])
    os.mkfifo(d / recs[1]["file_path"])
    (d / "data.json").write_text(json.dumps(recs))
    records = data_lib.load_records(d / "data.json")
    with deadline(30):
        assert data_lib.load_image(records[1]["image_path"]) is None
        ok, n_missing, n_corrupt = data_lib.check_images(records)
    assert ok == [0, 2, 3] and (n_missing, n_corrupt) == (0, 1)  # counted as undecodable, not "missing"


def test_enrolment_skips_fifos_and_outside_links(gallery, tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, ("red", "blue"))
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(outside)
    os.symlink(outside, imgs / "link_out.png")
    os.symlink(imgs / "red.png", imgs / "link_in.png")  # inside the folder: fine
    if hasattr(os, "mkfifo"):
        os.mkfifo(imgs / "pipe.jpg")
    prefix = tmp_path / "c" / "person"
    r = run_py([ENROL, "--image-dir", imgs, "--output-prefix", prefix, "--model_dir", gallery["export"]], timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "enrolled 3 new entries" in r.stdout, r.stdout
    assert "1 link pointing outside the image folder" in r.stdout
    if hasattr(os, "mkfifo"):
        assert "1 file that is not a regular file" in r.stdout
    items = {it["image"] for it in json.loads(Path(f"{prefix}_metadata.json").read_text())["items"]}
    assert items == {"red.png", "blue.png", "link_in.png"}


# ======================================================================================== 4. silent wrong results
def test_bad_rows_and_masks_in_the_teacher_cache(cache, synth_data, tmp_path, capsys):
    emb = tmp_path / "emb"
    shutil.copytree(cache, emb)
    cap = np.load(emb / "caption.npy", mmap_mode="r+")
    cap[0], cap[1], cap[2] = np.nan, np.inf, 0.0
    cap.flush()
    del cap
    c = EmbeddingCache.open(emb)
    err = capsys.readouterr().err
    assert "caption 3" in err and "treated as not done" in err
    assert not c.done("caption")[:3].any() and c.done("caption")[3:].all()
    # a writer saves the corrected mask, so an extraction resume recomputes those rows
    EmbeddingCache.open(emb, mode="r+")
    assert not np.load(emb / "caption.done.npy")[:3].any()
    # all-false masks: training refuses to run with every distillation term at 0
    for f in ("image", "caption"):
        np.save(emb / f"{f}.done.npy", np.zeros_like(np.load(emb / f"{f}.done.npy")))
    code, err = run_train(["--data", synth_data, "--embedding_path", emb, "--output_dir", tmp_path / "logs",
                           *TRAIN_FLAGS], capsys)
    one_line_error(code, err, "no image or caption row has a teacher embedding")
    # a deleted mask: refused, not read as "nothing done"
    os.remove(emb / "image.done.npy")
    with pytest.raises(CacheMismatchError, match="image.done.npy is missing"):
        EmbeddingCache.open(emb)
    assert not (tmp_path / "logs").exists()


def test_16bit_png_is_scaled_not_saturated(tmp_path):
    from search.engine import preprocess
    a = np.full((16, 8), 32768, np.uint16)  # mid-grey in 16 bits
    p = tmp_path / "grey16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    img = data_lib.load_image(p)
    assert img.mode == "RGB" and abs(np.asarray(img).mean() - 127.5) < 1.5  # convert("RGB") gave 255
    x = preprocess(Image.open(p), None, (16, 8), (0, 0, 0), (1, 1, 1))
    assert abs(float(x.mean()) - 0.5) < 0.01


BAD_FLAGS = [("--batch_size", "0"), ("--batch_size", "-1"), ("--batch_size", "1"), ("--lr", "nan"), ("--lr", "-1"),
             ("--save_every", "0"), ("--log_every", "0"), ("--workers", "-1"), ("--feature_dim", "0"),
             ("--feature_dim", "-1"),
             ("--embed_dim", "0"), ("--max_seq_length", "1"), ("--max_seq_length", "0"), ("--vocab_size", "10"),
             ("--iters", "-5"), ("--eval_every", "-1"), ("--keep_checkpoints", "0"), ("--test_ratio", "2"),
             ("--langs", "fr"), ("--text_backbone", "nope"), ("--fd_weight", "-1"), ("--compose_prob", "1.5"),
             ("--id_temp", "0"), ("--weight_decay", "inf")]
if not torch.cuda.is_available():
    BAD_FLAGS.append(("--device", "cuda"))


def test_flag_ranges_are_checked_before_anything_is_created(synth_data, cache, tmp_path, capsys):
    base = ["--data", synth_data, "--embedding_path", cache, "--output_dir", tmp_path / "logs", *TRAIN_FLAGS]
    before = tree(cache)
    for flag, value in BAD_FLAGS:
        code, err = run_train(base + [flag, value], capsys)
        one_line_error(code, err, flag)
    (tmp_path / "file").write_text("x")
    code, err = run_train(base + ["--output_dir", tmp_path / "file"], capsys)
    one_line_error(code, err, "is not a folder")
    assert not (tmp_path / "logs").exists() and tree(cache) == before
    # the defaults themselves pass (tolerant of flags added later: only the flags a parser has are checked)
    assert opts.arg_problems(train_parser().parse_args(["--data", synth_data, "--embedding_path", cache])) == []
    # export: an opset the exporter cannot write is refused, not silently replaced
    code, err = run_export([tmp_path / "x.pt", tmp_path / "e", "--opset", "999"], capsys)
    one_line_error(code, err, "--opset")


def test_collection_rows_index_bytes_and_names(gallery, tmp_path):
    from search.api import Searcher
    from search.engine import TextEncoder
    from search.index import file_hash
    # NaN / unnormalised rows: refused in one line
    for name, value in (("nan", np.nan), ("long", 3.0)):
        feats, _ = copy_collection(gallery, tmp_path / name)
        f = np.load(feats)
        f[2] = value if name == "nan" else f[2] * value
        np.save(feats, f)
        r = api(gallery, feats)
        one_line_error(r.returncode, r.stderr, "row 2 is")
    # a saved HNSW index with flipped bytes is detected by its own hash and rebuilt (not read as fresh)
    feats, _ = copy_collection(gallery, tmp_path / "hnsw")
    enc = TextEncoder(str(gallery["export"]))
    logs = []
    Searcher(enc, feats, image_root=str(gallery["imgs"]), index="hnsw", log=logs.append)
    idx_file = tmp_path / "hnsw" / "person_index.faiss"
    good = idx_file.read_bytes()
    raw = bytearray(good)
    for k in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[k] ^= 0x5A
    idx_file.write_bytes(bytes(raw))
    logs.clear()
    s = Searcher(enc, feats, image_root=str(gallery["imgs"]), index="hnsw", log=logs.append)
    assert any("built hnsw index" in m for m in logs), logs  # rebuilt, not loaded
    scores = [r["score"] for r in s.search("r", 6)["results"]]
    assert all(-1.01 <= v <= 1.01 for v in scores), scores
    assert file_hash(idx_file) == json.loads((tmp_path / "hnsw" / "person_index.json").read_text())["index_hash"]
    # terminal injection: names from the metadata are printed escaped
    feats, meta = copy_collection(gallery, tmp_path / "esc")
    m = json.loads(meta.read_text())
    for it in m["items"]:
        it["image"] = "evil\x1b[2J\nFAKE RESULT.png"
    meta.write_text(json.dumps(m))
    r = api(gallery, feats)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\nFAKE RESULT" not in r.stdout and "evil\\x1b[2J\\nFAKE RESULT.png" in r.stdout


def test_checkpoint_bit_flip_is_refused(trained, tmp_path, capsys):
    p = tmp_path / "flipped.pt"
    shutil.copy(trained["ckpt"], p)
    flip_tensor_byte(p)
    code, err = run_eval([p, "--workers", "0"], capsys)
    one_line_error(code, err, "does not match its stored hash")
    args = load_checkpoint(trained["ckpt"])["args"]
    code, err = run_train(["--data", args["data"], "--embedding_path", args["embedding_path"], "--output_dir",
                           tmp_path / "logs", "--resume", p, *TRAIN_FLAGS], capsys)
    one_line_error(code, err, "does not match its stored hash")


# ================================================================================================ 5. tracebacks
def test_dataset_and_cache_errors_are_one_line(synth_data, cache, tmp_path, capsys):
    base = ["--embedding_path", cache, "--output_dir", tmp_path / "logs", *TRAIN_FLAGS]
    before = tree(cache)
    other = tmp_path / "other.json"
    recs = json.loads(Path(synth_data).read_text())
    other.write_text(json.dumps(recs[:-1]))
    (tmp_path / "Part1").symlink_to(Path(synth_data).parent / "Part1")
    code, err = run_train(["--data", other, *base], capsys)  # the cache belongs to another dataset
    one_line_error(code, err, "cache was built for")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(recs[:3])[:-30])
    code, err = run_train(["--data", broken, *base], capsys)
    one_line_error(code, err, "invalid JSON")
    code, err = run_train(["--data", synth_data, *base, "--batch_size", "500"], capsys)  # fewer images than a batch
    one_line_error(code, err, "fewer than one global batch")
    code, err = run_train(["--data", synth_data, *base, "--backbone", "tv_resnet18", "--backbone_weights",
                           Path(cache) / "manifest.json"], capsys)  # ImageNet weights that are not a state_dict
    one_line_error(code, err, "not a readable torch state_dict")
    assert not (tmp_path / "logs").exists() and tree(cache) == before  # refused, and nothing touched


BAD_CKPTS = {
    "cfg_type": lambda c: c["model_cfg"].update(feature_dim="x"),
    "wrong_dim": lambda c: c["model_cfg"].update(feature_dim=24),
    "image_size": lambda c: c["model_cfg"].update(image_size="abc"),
    "no_cfg_key": lambda c: c["model_cfg"].pop("text_backbone"),
    "step": lambda c: c.update(step="abc"),
    "no_optimizer": lambda c: c.pop("optimizer"),
}


@pytest.mark.parametrize("case", sorted(BAD_CKPTS))
def test_bad_checkpoints_are_one_line(case, trained, tmp_path, capsys):
    p = ckpt_variant(trained, tmp_path, case, BAD_CKPTS[case])
    args = load_checkpoint(trained["ckpt"])["args"]
    code, err = run_train(["--data", args["data"], "--embedding_path", args["embedding_path"], "--output_dir",
                           tmp_path / "logs", "--resume", p, *TRAIN_FLAGS], capsys)
    one_line_error(code, err, str(p))
    assert not (tmp_path / "logs").exists()
    if case not in ("step", "no_optimizer"):  # evaluation needs only the model
        code, err = run_eval([p, "--workers", "0"], capsys)
        one_line_error(code, err, str(p))


def test_missing_checkpoint_exit_code_is_2_everywhere(trained, tmp_path, capsys):
    code, err = run_eval([tmp_path / "none.pt"], capsys)
    one_line_error(code, err, "no such checkpoint file")
    code, err = run_eval([trained["ckpt"], "--json", tmp_path / "no" / "such" / "eval.json"], capsys)
    one_line_error(code, err, "its folder does not exist")
    code, err = run_export([tmp_path / "none.pt", tmp_path / "out"], capsys)
    one_line_error(code, err, "no such checkpoint file")


def test_deeply_nested_json_in_every_reader(synth_data, cache, gallery, tmp_path, capsys):
    from search.index import load_index
    deep = deep_json()
    d = tmp_path / "deep.json"
    d.write_text(deep)
    with pytest.raises(data_lib.DatasetError, match="nested too deeply"):  # dataset JSON (every root script)
        data_lib.load_records(d)
    code, err = run_train(["--data", d, "--embedding_path", cache, "--output_dir", tmp_path / "l", *TRAIN_FLAGS],
                          capsys)
    one_line_error(code, err, "nested too deeply")
    emb = tmp_path / "emb"  # cache manifest
    shutil.copytree(cache, emb)
    (emb / "manifest.json").write_text(deep)
    with pytest.raises(CacheMismatchError, match="unreadable manifest"):
        EmbeddingCache.open(emb)
    feats, meta = copy_collection(gallery, tmp_path / "c")  # collection metadata
    meta.write_text(deep)
    r = api(gallery, feats)
    one_line_error(r.returncode, r.stderr, "unreadable metadata")
    feats, meta = copy_collection(gallery, tmp_path / "c2")  # model_info.json
    exp = tmp_path / "exp"
    shutil.copytree(gallery["export"], exp)
    (exp / "model_info.json").write_text(deep)
    r = run_py([API, "--image-root", gallery["imgs"], "--image_feature", feats, "--model_dir", exp, "--queries", "r"])
    one_line_error(r.returncode, r.stderr, "unreadable model info")
    boxes = tmp_path / "boxes.json"  # enrolment boxes file
    boxes.write_text(deep)
    r = run_py([ENROL, "--image-dir", gallery["imgs"], "--output-prefix", tmp_path / "b" / "p", "--model_dir",
                gallery["export"], "--boxes", boxes])
    one_line_error(r.returncode, r.stderr, "unreadable boxes file")
    (tmp_path / "c2" / "person_index.json").write_text(deep)  # index sidecar: treated as stale, rebuilt
    assert load_index(tmp_path / "c2" / "person", "hnsw", "x", 6, 4) is None


def test_other_one_line_cases(synth_data, gallery, tmp_path):
    # ids that do not fit in 64 bits
    recs = json.loads(Path(synth_data).read_text())[:2]
    recs[1]["id"] = 2 ** 63
    (tmp_path / "big.json").write_text(json.dumps(recs))
    r = run_py([REPO / "data.py", "--data", tmp_path / "big.json"])
    one_line_error(r.returncode, r.stderr, "does not fit in 64 bits")
    # web UI start-up: a port out of range, a missing or absent --image-root
    base = [APP, "--image_feature", gallery["features"], "--model_dir", gallery["export"]]
    r = run_py(base + ["--image-root", gallery["imgs"], "--port", "99999"])
    one_line_error(r.returncode, r.stderr, "--port must be 0..65535")
    r = run_py(base)
    one_line_error(r.returncode, r.stderr, "--image-root is required")
    r = run_py(base + ["--image-root", tmp_path / "nowhere"])
    one_line_error(r.returncode, r.stderr, "no such folder")
    # the CLI: an image root that does not exist, a features file that does not exist
    r = api(gallery, gallery["features"], image_root=tmp_path / "nowhere")
    one_line_error(r.returncode, r.stderr, "--image-root")
    r = api(gallery, tmp_path / "nope_features.npy")
    one_line_error(r.returncode, r.stderr, "features file not found")
    # COCO boxes with unhashable ids: counted as malformed, not a TypeError
    boxes = tmp_path / "coco.json"
    boxes.write_text(json.dumps({"images": [{"id": [1], "file_name": "red.png"}],
                                 "annotations": [{"image_id": {"a": 1}, "bbox": [0, 0, 5, 5]}]}))
    r = run_py([ENROL, "--image-dir", gallery["imgs"], "--output-prefix", tmp_path / "cc" / "p", "--model_dir",
                gallery["export"], "--boxes", boxes])
    assert r.returncode == 0 and "Traceback" not in r.stderr and "1 malformed box" in r.stdout, r.stderr
    # NaN / Infinity bbox in the metadata: refused in one line (no traceback, no `Infinity` in --json)
    for bad in ("NaN", "Infinity"):
        feats, meta = copy_collection(gallery, tmp_path / bad)
        m = json.loads(meta.read_text())
        m["items"][0]["bbox"] = [0, 0, 10, 10]
        meta.write_text(json.dumps(m).replace("[0, 0, 10, 10]", f"[0, 0, {bad}, 10]"))
        r = api(gallery, feats, "--json")
        one_line_error(r.returncode, r.stderr, "invalid bbox")
        assert "Infinity" not in r.stdout and "NaN" not in r.stdout


# ================================================================================================ 6. web UI resources
def test_webui_timeouts_bounded_threads_decode_and_codes(gallery, tmp_path, monkeypatch):
    from search import webui
    from search.api import Searcher
    from search.engine import TextEncoder
    imgs = tmp_path / "imgs"
    shutil.copytree(gallery["imgs"], imgs)
    Image.new("RGB", (120, 100), (200, 10, 10)).save(imgs / "big.jpg", quality=90)
    Image.new("RGB", (120, 100), (10, 200, 10)).save(imgs / "big.png")
    feats, meta = copy_collection(gallery, tmp_path / "c")
    m = json.loads(meta.read_text())
    m["items"][0]["image"], m["items"][1]["image"] = "big.jpg", "big.png"
    meta.write_text(json.dumps(m))
    # long enough that both silent clients surely hold their slots at once on a loaded CPU (3 s once missed it)
    monkeypatch.setattr(webui.SearchHandler, "timeout", 8.0)
    monkeypatch.setattr(webui.BoundedThreadingHTTPServer, "max_threads", 2)
    monkeypatch.setattr(webui, "MAX_DECODE_PIXELS", 2000)  # stands in for a 100-megapixel image
    webui.render_crop.cache_clear()
    s = Searcher(TextEncoder(str(gallery["export"])), feats, image_root=str(imgs), log=lambda m: None)
    srv = webui.make_server(s, str(imgs), "127.0.0.1", 0, quiet=True)
    webui.serve_in_thread(srv)
    port = srv.server_address[1]
    url = f"http://127.0.0.1:{port}"

    def status(path):
        try:
            with urlopen(url + path, timeout=10) as r:
                return r.status, r.read()
        except HTTPError as e:
            with e:  # closed now: an error response left open would hold a server slot until its socket timeout
                return e.code, e.read()
    try:
        assert status("/api/search?q=r&top_n=2")[0] == 200
        assert status("/api/search?" + "&".join(f"a{i}=1" for i in range(25)))[0] == 400
        assert status("/image?path=red.png&bbox=5,5,5,20")[0] == 400  # zero-area box
        code, body = status("/image?path=big.jpg&bbox=10,10,60,80")  # JPEG: decoded reduced (draft)
        assert code == 200 and Image.open(io.BytesIO(body)).size[1] > 0
        assert status("/image?path=big.png&bbox=10,10,60,80")[0] == 413  # cannot be reduced: refused
        # idle connections: dropped after the socket timeout, and never more than max_threads at once
        wait_for(lambda: srv._slots._value == 2)  # the requests above are all done: the idle clients get both slots
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        wait_for(lambda: srv._slots._value == 0)  # both slots taken by the silent clients (a loaded CPU is slow)
        assert status("/api/search?q=r")[0] == 503
        wait_for(lambda: srv._slots._value == 2)  # freed by the socket timeout, not by the clients
        for c in idle:
            c.settimeout(2)
            assert c.recv(100) == b""  # closed by the server
            c.close()
        assert status("/api/search?q=r")[0] == 200  # slots freed
    finally:
        srv.shutdown()
        srv.server_close()


# ================================================================================================ 7. new-user traps
def test_resume_auto_after_a_failed_launch_and_stale_temp_files(trained, synth_data, cache, capsys):
    out, run_dir = trained["out"], trained["run_dir"]
    exp = run_dir.parent
    before = sorted(p.name for p in exp.iterdir())
    code, err = run_train(["--data", synth_data, "--embedding_path", cache, "--output_dir", out, *TRAIN_FLAGS,
                           "--batch_size", "0"], capsys)
    one_line_error(code, err)
    assert sorted(p.name for p in exp.iterdir()) == before  # a failed launch leaves no folder behind
    (exp / str(int(run_dir.name) + 1)).mkdir()  # an empty run folder (what older launches left behind)
    stale = run_dir / "7.pt.tmp.999999999"
    stale.write_bytes(b"x" * 1000)
    last = (run_dir / "last.pt").read_bytes()
    args = train_parser().parse_args(["--data", synth_data, "--embedding_path", cache, "--output_dir", str(out),
                                      "--iters", "2", "--resume", "auto", *TRAIN_FLAGS])
    assert trainer.main(args) == run_dir  # the newest run *with a last.pt*, not the empty one
    assert not stale.exists()
    assert (run_dir / "last.pt").read_bytes() == last  # nothing to do at step 2 of 2: nothing rewritten


def test_help_shows_defaults_and_every_flag_has_help():
    from cli import HelpFormatter
    parser = argparse.ArgumentParser(parents=[opts.get_args_parser()], formatter_class=HelpFormatter)
    for a in parser._actions:
        assert a.help, f"{a.option_strings} has no help"
    text = " ".join(parser.format_help().split())
    assert "(default: 0.002)" in text and "(default: res_tiny)" in text
