"""The trainer end to end on tiny synthetic data: logs, checkpoints, held-out eval, resume after kill -9,
torchrun with two CPU processes, non-finite loss handling, and evaluation_model.py on the result."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import save_checkpoint
from train_fixtures import make_fake_cache

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
ITER_RE = re.compile(r"Iter:(\d+)\| (.*)\| lr: ")


@pytest.fixture(scope="module")
def cache(synth_data, tmp_path_factory):
    return make_fake_cache(synth_data, tmp_path_factory.mktemp("cache") / "emb", dim=32)


def base_args(synth_data, cache, out, *extra):
    return [sys.executable, str(ROOT / "main.py"), "--data", synth_data, "--embedding_path", cache,
            "--output_dir", str(out), "--backbone", "mobile_tiny", "--text_backbone", "char_tiny",
            "--image_size", "64x32", "--feature_dim", "32", "--batch_size", "8", "--workers", "0",
            "--warmup", "2", "--memory_size", "64", "--val_ratio", "0.2", *extra]  # val ids 1 and 11


def logged_losses(text):
    out = {}
    for m in ITER_RE.finditer(text):
        out[int(m.group(1))] = {k: float(v.split()[0]) for k, v in (p.split(": ") for p in m.group(2).split("| "))}
    return out


def run_dir(out, name):
    return out / "expModel-mobile_tiny-64x32-32" / name


def test_train_logs_checkpoints_and_eval(synth_data, cache, tmp_path):
    r = subprocess.run(base_args(synth_data, cache, tmp_path, "--run_name", "a", "--iters", "12", "--log_every", "1",
                                 "--eval_every", "6", "--save_every", "6"),
                       capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = logged_losses(r.stdout)
    assert sorted(losses) == list(range(1, 13))
    for v in losses.values():  # the seed's terms are all there and finite
        assert {"dist_rel", "id_img", "id_cap", "id_img_cap", "d_pos", "total"} <= set(v)
        assert all(x == x and abs(x) < 1e6 for x in v.values())
    assert re.search(r"Eval Iter:6\| eer: [\d.]+ .*r1: [\d.]+", r.stdout)
    d = run_dir(tmp_path, "a")
    for name in ("6.pt", "12.pt", "last.pt", "best.pt", "args.json", "train.log"):
        assert (d / name).exists(), name
    assert list(d.glob("events.out.tfevents.*"))
    assert not list(d.glob("*.tmp*"))
    ck = torch.load(d / "last.pt", weights_only=True)
    assert ck["step"] == 12 and ck["model_cfg"]["feature_dim"] == 32 and ck["args"]["iters"] == 12
    # the training texts' words travel with the model (search/query_words.py), and tools/query_vocab.py gives an
    # older checkpoint exactly the list main.py stores
    qv = ck["model_cfg"]["query_vocab"]
    assert qv == sorted(set(qv)) and {"man", "woman", "shirt", "wearing", "search", "top"} <= set(qv)
    old = tmp_path / "old.pt"
    save_checkpoint(old, {**ck, "model_cfg": {k: v for k, v in ck["model_cfg"].items() if k != "query_vocab"}})
    t = subprocess.run([sys.executable, str(ROOT / "tools" / "query_vocab.py"), str(old)], capture_output=True,
                       text=True, env=ENV, timeout=300, cwd=ROOT)
    assert t.returncode == 0, t.stderr[-2000:]
    assert torch.load(old, weights_only=True)["model_cfg"]["query_vocab"] == qv
    t = subprocess.run([sys.executable, str(ROOT / "tools" / "query_vocab.py"), str(old)], capture_output=True,
                       text=True, env=ENV, timeout=300, cwd=ROOT)
    assert t.returncode != 0 and "already has a word list" in t.stderr and "Traceback" not in t.stderr
    assert json.loads((d / "args.json").read_text())["backbone"] == "mobile_tiny"

    # evaluation_model.py rebuilds the model from the checkpoint alone and prints the seed's table
    e = subprocess.run([sys.executable, str(ROOT / "evaluation_model.py"), str(d / "last.pt"), "--workers", "0",
                        "--json", str(tmp_path / "eval.json")], capture_output=True, text=True, env=ENV,
                       timeout=300, cwd=ROOT)
    assert e.returncode == 0, e.stdout[-2000:] + e.stderr[-2000:]
    assert "EER      FAR=1e-3" in e.stdout and "Verify Count=" in e.stdout and "Top-5" not in e.stdout
    assert "Top-15 False Rejected:" in e.stdout and "R@1" in e.stdout
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["n_images"] > 0 and 0 <= res["verification"]["eer"] <= 100


def test_resume_after_kill_reproduces_next_step(synth_data, cache, tmp_path):
    common = ["--run_name", "r", "--iters", "8", "--log_every", "1", "--save_every", "3", "--eval_every", "0"]
    ref = subprocess.run(base_args(synth_data, cache, tmp_path / "ref", *common), capture_output=True, text=True,
                         env=ENV, timeout=300, cwd=ROOT)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_losses = logged_losses(ref.stdout)

    # kill -9 as soon as the step-3 checkpoint is being written (maybe mid-write)
    p = subprocess.Popen(base_args(synth_data, cache, tmp_path / "k", *common), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
    deadline = time.time() + 240
    for line in p.stdout:
        if "Saving checkpoint" in line or time.time() > deadline:
            break
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    d = run_dir(tmp_path / "k", "r")
    for f in d.glob("*.pt"):  # whatever exists is a whole checkpoint, never a half-written one
        torch.load(f, weights_only=True)

    res = subprocess.run(base_args(synth_data, cache, tmp_path / "k", *common, "--resume", "auto"),
                         capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"Resumed from .* at iteration (\d+)", res.stdout)
    start = int(m.group(1)) if m else 0
    got = logged_losses(res.stdout)
    assert start + 1 in got and max(got) == 8
    for step in range(start + 1, 9):
        for k, v in ref_losses[step].items():
            assert got[step][k] == pytest.approx(v, abs=2e-4), (step, k)


def test_torchrun_two_cpu_processes(synth_data, cache, tmp_path):
    cmd = base_args(synth_data, cache, tmp_path, "--run_name", "ddp", "--iters", "4", "--log_every", "1",
                    "--eval_every", "0", "--save_every", "4", "--batch_size", "4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + cmd[1:]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-f", str(tmp_path)])
        raise
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = logged_losses(r.stdout)
    assert sorted(losses) == [1, 2, 3, 4]  # rank 0 alone logs: each step once
    assert "x2" in r.stdout
    assert (run_dir(tmp_path, "ddp") / "4.pt").exists()


def test_nonfinite_loss_skipped_then_stops(synth_data, cache, tmp_path, monkeypatch, capsys):
    import argparse
    import losses
    import main as trainer
    import opts

    orig = losses.DistillLoss.forward

    def nan_forward(self, *a, **k):
        out = orig(self, *a, **k)
        out["dist_rel"] = out["dist_rel"] * float("nan")
        return out

    monkeypatch.setattr(losses.DistillLoss, "forward", nan_forward)
    parser = argparse.ArgumentParser(parents=[opts.get_args_parser()])
    args = parser.parse_args(base_args(synth_data, cache, tmp_path, "--run_name", "nan", "--iters", "20",
                                       "--max_bad_steps", "3", "--log_every", "1")[2:])
    with pytest.raises(SystemExit, match="non-finite for 3 steps"):
        trainer.main(args)
    out = capsys.readouterr().out
    assert out.count("step skipped") == 3
    assert not list(run_dir(tmp_path, "nan").glob("*.pt"))  # nothing saved from poisoned weights


def test_sampler_pk_runs_resume_and_rank_split():
    sys.path.insert(0, str(ROOT))
    from main import ResumableSampler
    groups = [i // 4 for i in range(40)] + [10, 11, 11]  # ids with 4, 1 and 2 items
    def order(rank=0, ws=1, start=0, epoch=1, k=2, bs=4):
        s = ResumableSampler(len(groups), bs, rank, ws, seed=3, groups=groups, instances_per_id=k)
        s.set_epoch(epoch, start)
        return list(s)
    full = order()
    assert len(full) == (len(groups) // 4) * 4 and len(set(full)) == len(full)
    # 21 runs of 2 of one identity (the 1-item id is a run of 1); the 3 items past the 40-item epoch end can
    # take at most two of them
    def adjacent_same(o):
        return sum(groups[a] == groups[b] for a, b in zip(o, o[1:]))
    assert adjacent_same(full) >= 19
    assert adjacent_same(order(k=1)) < 10  # uniform: ~3 expected
    assert order() == full and order(epoch=2) != full  # a pure function of (seed, epoch)
    assert order(start=3) == full[12:]  # resume skips whole batches by index
    r0, r1 = order(rank=0, ws=2, bs=2), order(rank=1, ws=2, bs=2)
    assert sorted(r0 + r1) == sorted(full) and r0 == full[0::2]


def _reference_order(n, bs, ws, rank, seed, epoch, groups, k):
    """The sampler as first written (Python lists per id): the array version must give the very same order."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    if k > 1:
        by_id = {}
        for i, gr in enumerate(groups):
            by_id.setdefault(int(gr), []).append(i)
        runs = []
        for items in [by_id[x] for x in sorted(by_id)]:
            items = [items[j] for j in torch.randperm(len(items), generator=g).tolist()]
            runs += [items[j:j + k] for j in range(0, len(items), k)]
        perm = [i for j in torch.randperm(len(runs), generator=g).tolist() for i in runs[j]]
    else:
        perm = torch.randperm(n, generator=g).tolist()
    out = []
    for b in range(n // (bs * ws)):
        out += perm[b * bs * ws:(b + 1) * bs * ws][rank::ws]
    return out


@pytest.mark.parametrize("k", [1, 2, 4])
def test_sampler_equals_reference(k):
    from main import ResumableSampler
    rng = np.random.default_rng(k)
    groups = rng.integers(0, 60, size=500)  # ids of 1..20 items, in random record order
    for epoch, ws, rank in ((0, 1, 0), (3, 2, 1), (5, 3, 2)):
        s = ResumableSampler(len(groups), 7, rank, ws, seed=11, groups=groups.tolist(), instances_per_id=k)
        s.set_epoch(epoch)
        got = list(s)
        assert got == _reference_order(len(groups), 7, ws, rank, 11, epoch, groups, k)
        assert all(type(i) is int for i in got[:5])


def test_training_text_path_gives_the_full_length_embeddings_and_gradients():
    """Training encodes captions through the text tower's length groups (model.encode_text ->
    CharTextEncoder.forward); on real encoded captions, short, long and empty, every row's embedding and every
    gradient must equal those of one full-width pass, in the batch's order."""
    sys.path.insert(0, str(ROOT))
    import text_encoder
    from search.charmap import encode_batch
    torch.manual_seed(0)
    enc = text_encoder.create_text_encoder("char_tiny", 16, max_seq_length=192, vocab_size=1024, embed_dim=32)
    texts = ["a woman in a red coat " * k for k in (1, 8, 3, 6, 2, 0, 5)] * 3  # 0 -> "" (CLS only)
    ids, mask = (torch.from_numpy(x) for x in encode_batch(texts, 192, 1024))
    assert (mask.sum(1) > 96).any() and (mask.sum(1) <= 96).any() and len(texts) > text_encoder.LENGTH_GROUP
    full = enc.forward_embedded(enc.input_embeddings(ids), mask.float())
    g_full = torch.autograd.grad(full.square().sum(), list(enc.parameters()), allow_unused=True)
    grouped = enc(ids, mask)
    g_b = torch.autograd.grad(grouped.square().sum(), list(enc.parameters()), allow_unused=True)
    assert torch.allclose(full, grouped, atol=1e-5)
    for a, b in zip(g_full, g_b):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-4))


class _FakeTextTeacher:
    def __init__(self, multilingual, dim=4):
        self.multilingual, self.dim, self.seen = multilingual, dim, []

    def embed_texts(self, texts):
        self.seen += list(texts)
        return np.stack([np.eye(self.dim, dtype=np.float32)[len(t) % self.dim] for t in texts])


@pytest.mark.parametrize("multilingual", [False, True])
def test_text_teacher_fills_only_query_texts_without_a_row(multilingual):
    import main
    fake = _FakeTextTeacher(multilingual)
    tt = main.TextTeacher(fake)
    t_cap = torch.full((4, 4), 0.5)
    t_cap[1:] = 0
    batch = {"query_lang": torch.tensor([1, 1, 2, 0]), "has_t_cap": torch.tensor([True, False, False, False]),
             "t_cap_emb": t_cap.clone(), "text": ["cached row", "red shirt", "红色衬衫", "composed sentence"]}
    tt.fill(batch)
    # row 0 keeps its cache row; row 3 (not a query-like text) stays without a target
    assert torch.equal(batch["t_cap_emb"][0], t_cap[0]) and torch.equal(batch["t_cap_emb"][3], t_cap[3])
    assert batch["has_t_cap"].tolist() == [True, True, multilingual, False]
    assert fake.seen == (["red shirt", "红色衬衫"] if multilingual else ["red shirt"])
    assert torch.equal(batch["t_cap_emb"][1], torch.eye(4)[len("red shirt") % 4])
    assert tt.n_texts == (2 if multilingual else 1)


def test_text_teacher_distils_query_texts_and_refuses_another_teacher(synth_data, cache, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import extract_label
    emb = tmp_path / "emb_attr"
    extract_label.main(extract_label.get_args_parser().parse_args(
        ["--data", synth_data, "--embedding_path", str(emb), "--teacher", "attributes", "--workers", "0",
         "--device", "cpu", "--fields", "image,caption"]))
    r = subprocess.run(base_args(synth_data, str(emb), tmp_path, "--run_name", "tt", "--iters", "3", "--log_every",
                                 "1", "--eval_every", "0", "--save_every", "3", "--augment_prob", "0.5",
                                 "--compose_prob", "0", "--text_teacher", "attributes"),
                       capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"text teacher: attributes .*mean cos ([\d.]+)", r.stdout)
    assert m and float(m.group(1)) > 0.99
    n = int(re.search(r"text teacher embedded (\d+) query texts", r.stdout).group(1))
    assert 0 < n < 3 * 8  # about half the 24 texts, and never a dataset caption
    # a cache of another teacher: one line, before training starts
    for c, why in ((cache, "embeds into 384 dims"),
                   (make_fake_cache(synth_data, tmp_path / "fake384", dim=384), "does not reproduce")):
        r = subprocess.run(base_args(synth_data, str(c), tmp_path, "--run_name", "bad", "--iters", "2",
                                     "--text_teacher", "attributes"),
                           capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
        assert r.returncode != 0 and why in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not run_dir(tmp_path, "bad").exists()


def test_plain_consistency_pulls_only_query_texts_to_their_keyword_list():
    import torch.nn.functional as F
    import main

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)

        def encode_text(self, ids, mask):
            return F.normalize((self.emb(ids) * mask[..., None]).sum(1), dim=-1)

    torch.manual_seed(0)
    tower = Tower()
    ids = torch.randint(1, 50, (4, 12))
    plain = torch.randint(1, 50, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.bool)
    batch = {"plain_ids": plain, "plain_mask": mask, "has_plain": torch.tensor([True, False, True, False])}
    s_cap = tower.encode_text(ids, mask)
    loss = main.plain_consistency(tower, s_cap, batch)
    target = tower.encode_text(plain, mask).detach()
    ref = (1 - F.cosine_similarity(s_cap[[0, 2]], target[[0, 2]], dim=1)).mean()
    assert torch.allclose(loss, ref) and loss > 0
    loss.backward()
    grad_rows = tower.emb.weight.grad.abs().sum(1) > 0
    # only the query texts' own characters get a gradient (none through the keyword lists, rows 1 and 3 unused)
    assert set(grad_rows.nonzero().squeeze(1).tolist()) == set(ids[[0, 2]].flatten().tolist())
    # a text equal to its keyword list costs nothing; a batch without query texts gives an exact 0 with a graph
    same = main.plain_consistency(tower, tower.encode_text(plain, mask), batch)
    assert same.abs() < 1e-6
    none = main.plain_consistency(tower, s_cap, dict(batch, has_plain=torch.zeros(4, dtype=torch.bool)))
    assert none.item() == 0 and none.requires_grad
