"""losses.py: each term against a hand/loop reference, invariances, masks, the XBM memory, DDP gathering.
CPU, tiny tensors.  python3 -m pytest -q tests/test_losses.py"""
import argparse
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import losses  # noqa: E402
from losses import DistillLoss, build_criterion, gather_with_grad  # noqa: E402

ALL_OFF = {k: 0.0 for k in ("dist_rel_weight", "rkda_weight", "rkdd_weight", "fd_weight", "id_img_weight",
                            "id_cap_weight", "id_img_cap_weight", "d_pos_weight", "s_neg_weight", "attr_weight")}


def only(s_dim, t_dim, **kw):
    """A criterion with every term off except those given; the memory is used from the first step unless given."""
    return DistillLoss(s_dim, t_dim, **{"memory_warmup": 0, **ALL_OFF, **kw})


def test_constructor_defaults_are_the_cli_defaults():
    import inspect
    sig = inspect.signature(DistillLoss.__init__).parameters
    from losses import DEFAULTS
    assert {k: sig[k].default for k in DEFAULTS} == DEFAULTS


def unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


def batch(B=8, Ds=6, Dt=6, seed=0, n_pids=3):
    g = torch.Generator().manual_seed(seed)
    return dict(s_img=unit(B, Ds, gen=g), s_cap=unit(B, Ds, gen=g), t_img=unit(B, Dt, gen=g),
                t_cap=unit(B, Dt, gen=g), has_t_img=torch.ones(B, dtype=torch.bool),
                has_t_cap=torch.ones(B, dtype=torch.bool), pids=torch.randint(0, n_pids, (B,), generator=g),
                img_rows=torch.arange(B) + 1000 * seed)


def call(crit, b, **over):
    b = {**b, **over}
    return crit(b["s_img"], b["s_cap"], b["t_img"], b["t_cap"], b["has_t_img"], b["has_t_cap"], b["pids"],
                b["img_rows"])


def rand_orth(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


# ----------------------------------------------------------------------------- flags

def test_flags_defaults_and_build():
    p = argparse.ArgumentParser()
    losses.add_loss_args(p)
    args = p.parse_args([])
    for k, v in losses.DEFAULTS.items():
        assert getattr(args, k) == v, k
    args = p.parse_args(["--id_temp", "0.07", "--s_neg_mode", "hard", "--memory_size", "16"])
    crit = build_criterion(args, 8, 16)
    assert crit.id_temp == 0.07 and crit.s_neg_mode == "hard" and crit.mem_img.shape == (16, 8)
    assert isinstance(crit.fd_proj, torch.nn.Linear) and crit.fd_proj.weight.requires_grad
    assert build_criterion(argparse.Namespace(fd_weight=0.0), 8, 16).fd_proj is None  # partial namespace
    assert build_criterion(argparse.Namespace(), 16, 16).fd_proj is None  # same dims: identity
    with pytest.raises(ValueError):
        build_criterion(argparse.Namespace(**ALL_OFF), 8, 8)


def test_names_weights_and_total():
    b = batch()
    crit = build_criterion(argparse.Namespace(), 6, 6).train()
    d = call(crit, b)
    # every default weight > 0, in the logging order; the attribute terms need a vocabulary (attr_words)
    assert list(d) == [k for k in losses.TERM_ORDER if not k.startswith("attr_")]
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in d.values())
    one = only(6, 6, s_neg_weight=1.0)
    two = only(6, 6, s_neg_weight=2.0, d_pos_weight=1.0)
    d1, d2 = call(one, b), call(two, b)
    assert list(d1) == ["s_neg"] and set(d2) == {"s_neg", "d_pos"}
    assert torch.allclose(d2["s_neg"], 2 * d1["s_neg"])  # values are already weighted
    total = sum(d.values())
    assert torch.allclose(total, torch.stack(list(d.values())).sum())


# ----------------------------------------------------------------------------- distillation terms

def test_student_equals_teacher_gives_zero():
    b = batch(B=10, Ds=6, Dt=6, seed=1)
    crit = only(6, 6, dist_rel_weight=1.0, fd_weight=1.0, rkda_weight=1.0, rkdd_weight=1.0)
    d = call(crit, b, s_img=b["t_img"], s_cap=b["t_cap"])
    for k in ("dist_rel", "fd_img", "fd_cap", "rkda_img", "rkda_cap", "rkdd_img", "rkdd_cap"):
        assert abs(d[k].item()) < 1e-6, (k, d[k])
    assert d["dist_rel"].item() == 0.0  # identical inputs, identical temperatures: exactly the KL minimum
    d = call(crit, b)  # a different student: every term is positive (the zeros above are not trivial)
    assert all(v.item() > 1e-3 for v in d.values()), d


def test_isometric_student_of_other_dim():
    """A student that is the teacher embedded isometrically in a bigger space (Ds != Dt) has zero relational
    losses; fd is zero once the learnable map is the inverse isometry."""
    Dt, Ds = 5, 9
    b = batch(B=10, Ds=Ds, Dt=Dt, seed=2)
    Q = rand_orth(Ds, 3)[:Dt]  # [Dt, Ds], orthonormal rows
    crit = only(Ds, Dt, dist_rel_weight=1.0, fd_weight=1.0, rkda_weight=1.0, rkdd_weight=1.0)
    with torch.no_grad():
        crit.fd_proj.weight.copy_(Q)  # y = s @ Q^T = t
    d = call(crit, b, s_img=b["t_img"] @ Q, s_cap=b["t_cap"] @ Q)
    for k, v in d.items():
        assert abs(v.item()) < 1e-5, (k, v)


def _scaled_student(b, a):
    """Unit-norm students whose similarity matrix is a*T + (1-a): a shared extra direction."""
    B = b["t_img"].shape[0]
    e = torch.ones(B, 1)
    si = torch.cat([math.sqrt(a) * b["t_img"], math.sqrt(1 - a) * e], 1)
    sc = torch.cat([math.sqrt(a) * b["t_cap"], math.sqrt(1 - a) * e], 1)
    return si, sc


def test_dist_rel_auto_student_temperature_is_scale_free():
    b = batch(B=12, Ds=7, Dt=6, seed=4)
    si, sc = _scaled_student(b, 0.3)
    assert torch.allclose(si @ sc.t(), 0.3 * b["t_img"] @ b["t_cap"].t() + 0.7, atol=1e-6)
    auto = only(7, 6, dist_rel_weight=1.0)
    assert call(auto, b, s_img=si, s_cap=sc)["dist_rel"].item() < 1e-5
    fixed = only(7, 6, dist_rel_weight=1.0, dist_rel_t_temp=0.05, dist_rel_s_temp=0.05)
    tied = only(7, 6, dist_rel_weight=1.0, dist_rel_s_temp=-1.0)
    assert call(fixed, b, s_img=si, s_cap=sc)["dist_rel"].item() > 1e-2  # scale matters with a fixed temp
    assert call(tied, b, s_img=si, s_cap=sc)["dist_rel"].item() > 1e-2   # ... and when tied to the teacher's


def _ref_dist_rel(S, T, rows, cols, tt, ts):
    """Loop reference: mean over valid rows of KL(p_t || p_s) over valid cols, same for columns, averaged."""
    def kl(p_logits, q_logits):
        p, q = torch.softmax(torch.tensor(p_logits), 0), torch.softmax(torch.tensor(q_logits), 0)
        return float((p * (p.log() - q.log())).sum())
    r = [kl([T[i][j] / tt for j in cols], [S[i][j] / ts for j in cols]) for i in rows]
    c = [kl([T[i][j] / tt for i in rows], [S[i][j] / ts for i in rows]) for j in cols]
    return 0.5 * (sum(r) / len(r) + sum(c) / len(c))


def test_dist_rel_matches_loop_reference_and_ignores_masked_rows():
    B = 7
    b = batch(B=B, Ds=5, Dt=4, seed=5)
    b["has_t_img"] = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    b["has_t_cap"] = torch.tensor([1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    rows = [i for i in range(B) if b["has_t_img"][i]]
    cols = [j for j in range(B) if b["has_t_cap"][j]]
    S = (b["s_img"] @ b["s_cap"].t()).tolist()
    T = (b["t_img"] @ b["t_cap"].t()).tolist()
    # fixed temperatures
    crit = only(5, 4, dist_rel_weight=1.0, dist_rel_t_temp=0.1, dist_rel_s_temp=0.2)
    v = call(crit, b)["dist_rel"].item()
    assert v == pytest.approx(_ref_dist_rel(S, T, rows, cols, 0.1, 0.2), rel=1e-5)
    # auto temperatures: population std over valid, non-matching (i != j) entries, by hand
    def std(M):
        x = torch.tensor([M[i][j] for i in rows for j in cols if i != j], dtype=torch.float64)
        return max(float(x.std(unbiased=False)), losses.MIN_AUTO_TEMP)
    auto = only(5, 4, dist_rel_weight=1.0)
    v_auto = call(auto, b)["dist_rel"].item()
    assert v_auto == pytest.approx(_ref_dist_rel(S, T, rows, cols, std(T), std(S)), rel=1e-5)
    # rows/cols without a teacher do not count: change them (teacher and student) -> same value
    g = torch.Generator().manual_seed(9)
    t_img, t_cap, s_img, s_cap = (b[k].clone() for k in ("t_img", "t_cap", "s_img", "s_cap"))
    t_img[2], s_img[6] = unit(4, gen=g), unit(5, gen=g)
    t_cap[1], s_cap[1] = unit(4, gen=g), unit(5, gen=g)
    for c, ref in ((crit, v), (auto, v_auto)):
        assert call(c, b, t_img=t_img, s_img=s_img, t_cap=t_cap, s_cap=s_cap)["dist_rel"].item() == \
            pytest.approx(ref, rel=1e-6)
    t_img[3] = unit(4, gen=g)  # a row that does count changes it
    assert abs(call(crit, b, t_img=t_img)["dist_rel"].item() - v) > 1e-4


def _ref_rkd(s, t):
    """Park et al.'s definitions with explicit loops over distinct triplets / pairs (float64)."""
    s, t = s.double(), t.double()
    n = s.shape[0]
    da, dd = [], []
    for j in range(n):
        for i in range(n):
            for k in range(n):
                if len({i, j, k}) == 3:
                    ang = [F.cosine_similarity(x[i] - x[j], x[k] - x[j], dim=0) for x in (s, t)]
                    da.append(F.smooth_l1_loss(ang[0], ang[1]))
    ps = [(s[i] - s[j]).norm() for i in range(n) for j in range(n) if i != j]
    pt = [(t[i] - t[j]).norm() for i in range(n) for j in range(n) if i != j]
    ms, mt = sum(ps) / len(ps), sum(pt) / len(pt)
    dd = [F.smooth_l1_loss(a / ms, c / mt) for a, c in zip(ps, pt)]
    return float(sum(da) / len(da)), float(sum(dd) / len(dd))


def test_rkd_matches_reference_and_is_invariant():
    g = torch.Generator().manual_seed(6)
    s, t = unit(6, 5, gen=g), unit(6, 8, gen=g)
    valid = torch.ones(6, dtype=torch.bool)
    ra, rd = _ref_rkd(s, t)
    a, d = losses.rkd_angle(s, t, valid).item(), losses.rkd_distance(s, t, valid).item()
    assert a == pytest.approx(ra, rel=1e-5) and d == pytest.approx(rd, rel=1e-5)
    assert a > 1e-3 and d > 1e-3
    s2 = 3.7 * s @ rand_orth(5, 7) + 0.5  # scale, rotate, translate the student
    assert losses.rkd_angle(s2, t, valid).item() == pytest.approx(a, rel=1e-5)
    assert losses.rkd_distance(s2, t, valid).item() == pytest.approx(d, rel=1e-5)
    # rows without a teacher are ignored
    valid[4] = False
    a4 = losses.rkd_angle(s, t, valid).item()
    ra4, rd4 = _ref_rkd(s[[0, 1, 2, 3, 5]], t[[0, 1, 2, 3, 5]])
    assert a4 == pytest.approx(ra4, rel=1e-5)
    assert losses.rkd_distance(s, t, valid).item() == pytest.approx(rd4, rel=1e-5)
    s3 = s.clone()
    s3[4] = -s3[4]
    assert losses.rkd_angle(s3, t, valid).item() == pytest.approx(a4, rel=1e-6)


def test_rkd_duplicate_rows_finite_gradients():
    """Two identical captions in a batch (identical student and teacher rows) must not give NaN/huge grads."""
    g = torch.Generator().manual_seed(8)
    t = unit(5, 4, gen=g)
    t[1] = t[0]
    s = (t @ rand_orth(4, 1)).clone().requires_grad_(True)
    valid = torch.ones(5, dtype=torch.bool)
    loss = losses.rkd_angle(s, t, valid) + losses.rkd_distance(s, t, valid)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() < 1e-6
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e-3


def test_rkd_collapsed_student_pair_bounded_gradients():
    """A fresh student may map two different inputs to one point: the angle at that leg is undefined, so those
    triplets are skipped rather than giving ~1/d^2 gradients."""
    g = torch.Generator().manual_seed(9)
    t = unit(6, 4, gen=g)
    s0 = unit(6, 4, gen=g)
    s0[1] = s0[0]
    s = s0.clone().requires_grad_(True)
    valid = torch.ones(6, dtype=torch.bool)
    loss = losses.rkd_angle(s, t, valid)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().max() < 10


def test_fd_masks_rows_and_trains_the_projection():
    b = batch(B=6, Ds=4, Dt=7, seed=10)
    b["has_t_cap"] = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    for center in (0, 1):
        crit = only(4, 7, fd_weight=2.0, fd_center=center)
        d = call(crit, b)
        keep = b["has_t_cap"]
        with torch.no_grad():
            y, t = crit.fd_proj(b["s_cap"])[keep], b["t_cap"][keep]
            if center:  # centred on the rows that have a teacher, each side on its own mean
                y, t = y - y.mean(0), t - t.mean(0)
        ref = [1 - F.cosine_similarity(y[i], t[i], dim=0) for i in range(len(t))]
        assert d["fd_cap"].item() == pytest.approx(2 * float(sum(ref) / len(ref)), rel=1e-5), center
    sum(d.values()).backward()
    assert crit.fd_proj.weight.grad is not None and crit.fd_proj.weight.grad.abs().sum() > 0
    assert [n for n, _ in crit.named_parameters()] == ["fd_proj.weight"]


def test_fd_center_ignores_a_common_teacher_component():
    # teacher = student direction + one shared vector: uncentred fd is far from 0, centred fd is exactly 0
    b = batch(B=8, Ds=6, Dt=6, seed=11)
    common = 3 * torch.randn(6, generator=torch.Generator().manual_seed(1))
    b["t_cap"] = b["s_cap"].detach() + common
    b["t_img"] = b["s_img"].detach() + common
    plain = call(only(6, 6, fd_weight=1.0, fd_center=0), b)
    centred = call(only(6, 6, fd_weight=1.0, fd_center=1), b)
    assert plain["fd_cap"].item() > 0.05 and plain["fd_img"].item() > 0.05
    assert centred["fd_cap"].item() == pytest.approx(0, abs=1e-6)
    assert centred["fd_img"].item() == pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------------------- d_pos, s_neg

def test_d_pos():
    b = batch(B=5, seed=11)
    crit = only(6, 6, d_pos_weight=1.0)
    assert call(crit, b, s_cap=b["s_img"])["d_pos"].item() == pytest.approx(0.0, abs=1e-6)
    ref = sum(1 - float(b["s_img"][i] @ b["s_cap"][i]) for i in range(5)) / 5
    assert call(crit, b)["d_pos"].item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("mode", ["mean", "hard"])
def test_s_neg_brute_force(mode):
    B = 9
    b = batch(B=B, Ds=3, Dt=3, seed=12, n_pids=3)  # 3 dims: many pairs above the margin
    crit = only(3, 3, s_neg_weight=1.0, s_neg_margin=0.1, s_neg_mode=mode)
    cos = b["s_img"] @ b["s_cap"].t()
    pid = b["pids"].tolist()
    viol = lambda i, j: max(0.0, float(cos[i, j]) - 0.1)  # noqa: E731
    if mode == "mean":
        negs = [viol(i, j) for i in range(B) for j in range(B) if pid[i] != pid[j]]
        ref = sum(negs) / len(negs)
    else:
        r = [max(viol(i, j) for j in range(B) if pid[j] != pid[i]) for i in range(B)]
        c = [max(viol(i, j) for i in range(B) if pid[j] != pid[i]) for j in range(B)]
        ref = 0.5 * (sum(r) / B + sum(c) / B)
    v = call(crit, b)["s_neg"].item()
    assert ref > 0.01 and v == pytest.approx(ref, rel=1e-5)
    # same-pid pairs never count: one identity for all -> no negatives, 0 although many pairs exceed the margin
    assert call(crit, b, pids=torch.zeros(B, dtype=torch.long))["s_neg"].item() == 0.0


# ----------------------------------------------------------------------------- identity terms and memory

def _ref_supcon(q, qpid, qrow, qok, k, kpid, krow, kok, temp, excl):
    out = []
    for a in range(len(q)):
        if not qok[a]:
            continue
        keys = [c for c in range(len(k)) if kok[c] and not (excl and krow[c] == qrow[a])]
        pos = [c for c in keys if kpid[c] == qpid[a]]
        if not pos:
            continue
        den = torch.logsumexp(torch.stack([q[a] @ k[c] / temp for c in keys]), 0)
        out.append(sum(-(q[a] @ k[c] / temp - den) for c in pos) / len(pos))
    return float(sum(out) / len(out)) if out else 0.0


def _ref_id_terms(b, mem, temp, excl_self=True):
    """Brute force over batch + memory (a python list of (img, cap, pid, row) tuples, newest last)."""
    B = b["s_img"].shape[0]
    ki = list(b["s_img"]) + [m[0] for m in mem]
    kc = list(b["s_cap"]) + [m[1] for m in mem]
    kp = b["pids"].tolist() + [m[2] for m in mem]
    kr = b["img_rows"].tolist() + [m[3] for m in mem]
    ok = [True] * len(ki)
    qp, qr, qo = b["pids"].tolist(), b["img_rows"].tolist(), [True] * B
    return {
        "id_img": _ref_supcon(b["s_img"], qp, qr, qo, ki, kp, kr, ok, temp, excl_self),
        "id_cap": _ref_supcon(b["s_cap"], qp, qr, qo, kc, kp, kr, ok, temp, excl_self),
        "id_img_cap": 0.5 * (_ref_supcon(b["s_img"], qp, qr, qo, kc, kp, kr, ok, temp, False)
                             + _ref_supcon(b["s_cap"], qp, qr, qo, ki, kp, kr, ok, temp, False)),
    }


ID_ON = dict(id_img_weight=1.0, id_cap_weight=1.0, id_img_cap_weight=1.0, id_temp=0.1)


def test_memory_ring_order_and_wrap():
    crit = only(2, 2, id_cap_weight=1.0, memory_size=5)
    def push(ids):
        ids = torch.tensor(ids)
        emb = torch.stack([ids.float(), -ids.float()], 1)
        crit.enqueue(emb, emb, ids, ids)
    push([0, 1, 2])
    assert crit.mem_pid.tolist() == [0, 1, 2, -1, -1] and crit.mem_filled.tolist() == [1, 1, 1, 0, 0]
    push([3, 4, 5, 6])  # wraps: newest five, in ring order
    assert crit.mem_pid.tolist() == [5, 6, 2, 3, 4] and crit.mem_ptr.item() == 2 and crit.mem_filled.all()
    assert crit.mem_cap[:, 0].tolist() == [5, 6, 2, 3, 4] and crit.mem_row.tolist() == [5, 6, 2, 3, 4]
    push(list(range(10, 22)))  # 12 > 5 items at once: only 17..21 kept, where sequential writes would put them
    assert crit.mem_pid.tolist() == [18, 19, 20, 21, 17] and crit.mem_ptr.item() == (2 + 12) % 5


def test_id_terms_batch_only_match_reference():
    b = batch(B=10, Ds=4, Dt=4, seed=13, n_pids=4)
    crit = only(4, 4, memory_size=0, **ID_ON).train()
    d = call(crit, b)
    ref = _ref_id_terms(b, [], 0.1)
    for k in ref:
        assert ref[k] > 0 and d[k].item() == pytest.approx(ref[k], rel=1e-5), k


def test_id_terms_with_memory_match_reference_and_never_self_pair():
    M = 6
    crit = only(4, 4, memory_size=M, **ID_ON).train()
    mem = []
    for step in range(3):  # 3 x 4 = 12 > M: the memory wraps
        b = batch(B=4, Ds=4, Dt=4, seed=20 + step, n_pids=5)
        b["img_rows"] = torch.tensor([0, 1, 2, 3]) + 2 * step  # rows repeat across steps: older copies in memory
        d = call(crit, b)
        ref = _ref_id_terms(b, mem[-M:], 0.1)
        for k in ref:
            assert d[k].item() == pytest.approx(ref[k], rel=1e-5, abs=1e-6), (step, k)
        mem += [(b["s_img"][i], b["s_cap"][i], int(b["pids"][i]), int(b["img_rows"][i])) for i in range(4)]
    # a case where pairing with itself would change the value: the query's only same-pid entry in the memory is
    # an older copy of the same image (same img_row): id_img must ignore that query (no positive -> 0).
    crit = only(4, 4, memory_size=M, id_img_weight=1.0, id_temp=0.1).train()
    g = torch.Generator().manual_seed(30)
    old = unit(1, 4, gen=g)
    crit.enqueue(old, old, torch.tensor([7]), torch.tensor([42]))
    other = unit(1, 4, gen=g)
    crit.enqueue(other, other, torch.tensor([8]), torch.tensor([43]))
    b = batch(B=3, Ds=4, Dt=4, seed=31)
    b["pids"], b["img_rows"] = torch.tensor([7, 1, 2]), torch.tensor([42, 5, 6])
    mem2 = [(old[0], old[0], 7, 42), (other[0], other[0], 8, 43)]
    v = call(crit, b)["id_img"].item()
    assert v == 0.0 == _ref_id_terms(b, mem2, 0.1)["id_img"]
    assert _ref_id_terms(b, mem2, 0.1, excl_self=False)["id_img"] > 0.1  # self-pairing would have counted


def test_unfilled_memory_slots_are_ignored():
    b = batch(B=6, Ds=4, Dt=4, seed=40, n_pids=3)
    crit = only(4, 4, memory_size=8, **ID_ON).eval()  # eval: no enqueue inside forward
    g = torch.Generator().manual_seed(41)
    m = unit(2, 4, gen=g)
    crit.enqueue(m, m.flip(1), torch.tensor([0, 1]), torch.tensor([100, 101]))
    before = call(crit, b)
    ref = _ref_id_terms(b, [(m[0], m.flip(1)[0], 0, 100), (m[1], m.flip(1)[1], 1, 101)], 0.1)
    for k in ref:
        assert before[k].item() == pytest.approx(ref[k], rel=1e-5), k
    with torch.no_grad():  # garbage in the 6 unfilled slots that would matter if they were read
        crit.mem_img[2:] = b["s_img"][:1]
        crit.mem_cap[2:] = b["s_cap"][:1]
        crit.mem_pid[2:] = b["pids"][0]
        crit.mem_row[2:] = 999
        crit.mem_img_ok[2:] = True
    after = call(crit, b)
    for k in ref:
        assert after[k].item() == before[k].item(), k


def test_non_finite_rows_do_not_poison_the_memory():
    crit = only(4, 4, memory_size=8, **ID_ON).train()
    b = batch(B=4, Ds=4, Dt=4, seed=44, n_pids=2)
    bad = b["s_img"].clone()
    bad[1] = float("nan")
    assert not torch.isfinite(call(crit, b, s_img=bad)["id_img"])  # this step is NaN (the trainer skips it) ...
    assert crit.mem_filled.tolist() == [True, False, True, True] + [False] * 4
    b2 = batch(B=4, Ds=4, Dt=4, seed=45, n_pids=2)
    s_img = b2["s_img"].clone().requires_grad_(True)
    d = call(crit, b2, s_img=s_img)  # ... the next one is not
    total = sum(d.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(s_img.grad).all()


def test_memory_warmup():
    b = batch(B=6, Ds=4, Dt=4, seed=42, n_pids=3)
    crit = only(4, 4, memory_size=8, memory_warmup=1, **ID_ON).train()
    g = torch.Generator().manual_seed(43)
    m = unit(3, 4, gen=g)
    crit.enqueue(m, m, torch.tensor([0, 1, 2]), torch.tensor([100, 101, 102]))
    d0 = call(crit, b)  # step 0 < warmup: batch only
    ref = _ref_id_terms(b, [], 0.1)
    for k in ref:
        assert d0[k].item() == pytest.approx(ref[k], rel=1e-5), k
    assert crit.num_updates.item() == 1 and crit.mem_filled.sum().item() == 8  # filled during warm-up


def test_state_dict_roundtrip_resumes_identically(tmp_path):
    torch.manual_seed(0)
    a = build_criterion(argparse.Namespace(**{**ID_ON, "memory_size": 10}), 4, 6).train()
    for step in range(3):
        b = batch(B=4, Ds=4, Dt=6, seed=50 + step)
        sum(call(a, b).values()).backward()
    path = tmp_path / "crit.pt"
    torch.save(a.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert {"mem_img", "mem_cap", "mem_pid", "mem_row", "mem_filled", "mem_ptr", "num_updates"} <= set(sd)
    torch.manual_seed(123)  # a different init: everything must come from the state dict
    c = build_criterion(argparse.Namespace(**{**ID_ON, "memory_size": 10}), 4, 6).train()
    c.load_state_dict(sd)
    for name, buf in a.named_buffers():
        assert torch.equal(buf, dict(c.named_buffers())[name]), name
    b = batch(B=4, Ds=4, Dt=6, seed=60)
    da, dc = call(a, b), call(c, b)
    assert list(da) == list(dc)
    for k in da:
        assert da[k].item() == dc[k].item(), k
    assert torch.equal(a.mem_img, c.mem_img) and a.mem_ptr.item() == c.mem_ptr.item() == 6


# ----------------------------------------------------------------------------- modes and edge cases

def test_text_only_mode():
    D = 6
    b = batch(B=8, Ds=D, Dt=D, seed=70, n_pids=3)
    b["has_t_img"][5] = False
    crit = build_criterion(argparse.Namespace(memory_size=16), D, D).train()
    s_cap = b["s_cap"].clone().requires_grad_(True)
    d = call(crit, b, s_img=None, s_cap=s_cap)
    assert set(d) == {"dist_rel", "rkda_cap", "rkdd_cap", "fd_cap", "id_cap", "id_img_cap", "d_pos", "s_neg"}
    sum(d.values()).backward()
    assert torch.isfinite(s_cap.grad).all() and s_cap.grad.abs().sum() > 0
    # the caption equal to the teacher caption: zero dist_rel (the student is tied to the teacher's scale)
    d2 = call(crit, b, s_img=None, s_cap=b["t_cap"])
    assert d2["dist_rel"].item() == 0.0 and d2["fd_cap"].item() == pytest.approx(0, abs=1e-6)
    # image anchors are the teacher's: d_pos over the rows that have one
    ref = sum(1 - float(b["t_img"][i] @ b["s_cap"][i]) for i in range(8) if i != 5) / 7
    assert d["d_pos"].item() == pytest.approx(losses.DEFAULTS["d_pos_weight"] * ref, rel=1e-5)
    with pytest.raises(ValueError):
        call(build_criterion(argparse.Namespace(), 4, D), batch(B=4, Ds=4, Dt=D), s_img=None)


def test_text_only_memory_skips_images_without_teacher():
    """Text-only: teacher images are the anchors; an image without a teacher row (zeros) is neither a query nor
    a key, in the batch or later in the memory."""
    D = 4
    crit = only(D, D, id_img_cap_weight=1.0, id_temp=0.1, memory_size=8).train()
    b1 = batch(B=4, Ds=D, Dt=D, seed=71, n_pids=2)
    b1["has_t_img"] = torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    b1["t_img"][1] = 0
    call(crit, b1, s_img=None)
    assert crit.mem_img_ok.tolist() == [True, False, True, True] + [False] * 4
    b2 = batch(B=4, Ds=D, Dt=D, seed=72, n_pids=2)
    b2["has_t_img"] = torch.tensor([1, 1, 0, 1], dtype=torch.bool)
    b2["t_img"][2] = 0
    v = call(crit, b2, s_img=None)["id_img_cap"].item()
    ki = list(b2["t_img"]) + list(b1["t_img"])
    kc = list(b2["s_cap"]) + list(b1["s_cap"])
    kp = b2["pids"].tolist() + b1["pids"].tolist()
    kr = b2["img_rows"].tolist() + b1["img_rows"].tolist()
    ki_ok = b2["has_t_img"].tolist() + b1["has_t_img"].tolist()
    qp, qr = b2["pids"].tolist(), b2["img_rows"].tolist()
    ref = 0.5 * (_ref_supcon(b2["t_img"], qp, qr, b2["has_t_img"].tolist(), kc, kp, kr, [True] * 8, 0.1, False)
                 + _ref_supcon(b2["s_cap"], qp, qr, [True] * 4, ki, kp, kr, ki_ok, 0.1, False))
    assert v == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("text_only", [False, True])
def test_no_teacher_rows_and_no_positives_are_finite(text_only):
    b = batch(B=6, Ds=5, Dt=7 if not text_only else 5, seed=80)
    b["has_t_img"][:] = False
    b["has_t_cap"][:] = False
    b["t_img"].zero_()
    b["t_cap"].zero_()
    b["pids"] = torch.arange(6)  # no identity has a second sample: no positives in id_img/id_cap
    Dt = b["t_img"].shape[1]
    crit = build_criterion(argparse.Namespace(memory_size=4), 5, Dt).train()
    s_img = None if text_only else b["s_img"].clone().requires_grad_(True)
    s_cap = b["s_cap"].clone().requires_grad_(True)
    d = call(crit, b, s_img=s_img, s_cap=s_cap)
    for k in ("dist_rel", "fd_cap", "rkda_cap", "rkdd_cap", "id_cap"):
        assert d[k].item() == 0.0, k
    total = sum(d.values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(s_cap.grad).all()
    if not text_only:
        assert torch.isfinite(s_img.grad).all()
        assert crit.fd_proj.weight.grad is not None  # still in the graph (DDP find_unused_parameters=False)


def test_float32_under_autocast():
    b = batch(B=6, Ds=8, Dt=8, seed=90)
    crit = build_criterion(argparse.Namespace(memory_size=0), 8, 8).eval()
    ref = call(crit, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = call(crit, b, s_img=b["s_img"].bfloat16(), s_cap=b["s_cap"].bfloat16())
    bf = {k: b[k].bfloat16().float() for k in ("s_img", "s_cap")}
    ref_bf = call(crit, b, **bf)  # same bf16-rounded inputs without autocast
    for k in d:
        assert d[k].dtype == torch.float32
        assert d[k].item() == pytest.approx(ref_bf[k].item(), rel=1e-5, abs=1e-6), k
    assert set(d) == set(ref)


# ----------------------------------------------------------------------------- DDP (2 processes, gloo)

W = 2
# fd_center 0: a centred fd uses each rank's own batch mean, so only the uncentred one is exact across ranks
DDP_KW = dict(dist_rel_weight=1.0, rkda_weight=0.0, rkdd_weight=0.0, fd_weight=1.0, fd_center=0, id_img_weight=1.0,
              id_cap_weight=1.0, id_img_cap_weight=1.0, id_temp=0.1, memory_size=12, d_pos_weight=1.0,
              s_neg_weight=1.0, s_neg_margin=0.0, memory_warmup=0)


def _ddp_data(step, Bl=4, Ds=5, Dt=6):
    g = torch.Generator().manual_seed(100 + step)
    B = W * Bl
    raw_i, raw_c = torch.randn(B, Ds, generator=g), torch.randn(B, Ds, generator=g)
    t_i, t_c = unit(B, Dt, gen=g), unit(B, Dt, gen=g)
    has_i = torch.ones(B, dtype=torch.bool)
    has_i[[1, Bl + 2]] = False  # one row per rank: local means stay exact fractions of the global one
    t_i[~has_i] = 0
    has_c = torch.ones(B, dtype=torch.bool)
    pids = torch.randint(0, 3, (B,), generator=g)
    rows = torch.arange(B) + 3 * step  # repeats across steps
    return raw_i, raw_c, t_i, t_c, has_i, has_c, pids, rows


def _run_steps(crit, sl, steps=2):
    """Runs `steps` training steps on the slice `sl` of each step's global batch; returns values and grads."""
    res = []
    for step in range(steps):
        raw_i, raw_c, t_i, t_c, has_i, has_c, pids, rows = (x[sl] for x in _ddp_data(step))
        raw_i, raw_c = raw_i.clone().requires_grad_(True), raw_c.clone().requires_grad_(True)
        crit.zero_grad()
        d = crit(F.normalize(raw_i, dim=1), F.normalize(raw_c, dim=1), t_i, t_c, has_i, has_c, pids, rows)
        sum(d.values()).backward()
        res.append({"terms": {k: v.item() for k, v in d.items()}, "g_img": raw_i.grad, "g_cap": raw_c.grad,
                    "g_proj": crit.fd_proj.weight.grad.clone()})
    return res


def _ddp_worker(rank, tmpdir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/store", rank=rank, world_size=W)
    try:
        # gather_with_grad: different row counts per rank, bool dtype, grads only to the local slice
        n = 2 + rank
        x = (torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 100 * rank).requires_grad_(True)
        gx = gather_with_grad(x)
        coef = torch.arange(gx.numel(), dtype=torch.float32).view_as(gx)
        (gx * coef).sum().backward()
        gb = gather_with_grad(torch.tensor([rank == 0] * n))
        torch.manual_seed(0)
        crit = DistillLoss(5, 6, **DDP_KW).train()
        Bl = 4
        res = _run_steps(crit, slice(rank * Bl, (rank + 1) * Bl))
        torch.save({"gx": gx.detach(), "xgrad": x.grad, "gb": gb, "res": res,
                    "buffers": {k: v for k, v in crit.named_buffers()}}, f"{tmpdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_gather_two_processes():
    """2 gloo processes vs one process on the global batch: same global-term values, same memory, and each
    rank's local-input gradient = W x the single-process gradient of its slice (DDP then averages: exact)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmpdir:
        mp.spawn(_ddp_worker, args=(tmpdir,), nprocs=W, join=True)
        out = [torch.load(f"{tmpdir}/rank{r}.pt", weights_only=True) for r in range(W)]
    full = torch.cat([torch.arange(6.).view(2, 3), torch.arange(9.).view(3, 3) + 100])
    for r in range(W):
        assert torch.equal(out[r]["gx"], full)
        assert out[r]["gb"].dtype == torch.bool and out[r]["gb"].tolist() == [True] * 2 + [False] * 3
    coef = torch.arange(15.).view(5, 3)
    assert torch.equal(out[0]["xgrad"], coef[:2]) and torch.equal(out[1]["xgrad"], coef[2:])

    torch.manual_seed(0)
    single_crit = DistillLoss(5, 6, **DDP_KW).train()
    single = _run_steps(single_crit, slice(None))
    Bl = 4
    for step in range(2):
        s = single[step]
        for k, v in s["terms"].items():
            if k in ("dist_rel", "id_img", "id_cap", "id_img_cap", "s_neg"):  # global terms: same value
                assert all(o["res"][step]["terms"][k] == pytest.approx(v, rel=1e-5, abs=1e-7) for o in out), k
            else:  # local means: their average is the global mean
                assert sum(o["res"][step]["terms"][k] for o in out) / W == pytest.approx(v, rel=1e-5), k
        for r in range(W):
            sl = slice(r * Bl, (r + 1) * Bl)
            for g in ("g_img", "g_cap"):
                assert torch.allclose(out[r]["res"][step][g], W * s[g][sl], rtol=1e-4, atol=1e-6), (step, r, g)
        g_proj = sum(o["res"][step]["g_proj"] for o in out) / W  # DDP's average of the criterion's parameter
        assert torch.allclose(g_proj, s["g_proj"], rtol=1e-4, atol=1e-6)
    # every rank ends with the single process's memory (the global batches, enqueued in the same order)
    ref = dict(single_crit.named_buffers())
    assert ref["mem_filled"].sum().item() == 12 and ref["mem_ptr"].item() == 16 % 12
    for o in out:
        for k in ref:
            assert torch.allclose(o["buffers"][k].float(), ref[k].float(), atol=1e-6), k


# ----------------------------------------------------------------------------- attribute terms

def _attr_batch(B=12, W=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(B, W, generator=g) < 0.3).float()
    return {"img_target": target, "img_weight": torch.ones(B, W),
            "cap_target": target, "cap_weight": (torch.rand(B, W, generator=g) < 0.5).float()}


def test_attr_terms_are_masked_bce_through_one_shared_classifier():
    b, a = batch(B=12, Ds=6, Dt=6), _attr_batch()
    crit = only(6, 6, attr_weight=2.0, attr_words=10)
    d = crit(b["s_img"], b["s_cap"], b["t_img"], b["t_cap"], b["has_t_img"], b["has_t_cap"], b["pids"],
             b["img_rows"], attr=a)
    assert set(d) == {"attr_img", "attr_cap"}
    for mod, x in (("img", b["s_img"]), ("cap", b["s_cap"])):  # reference: BCE over the known words only
        z = crit.attr_logit_scale * crit.attr_head(x)
        ref = F.binary_cross_entropy_with_logits(z, a[f"{mod}_target"], weight=a[f"{mod}_weight"], reduction="sum")
        torch.testing.assert_close(d[f"attr_{mod}"], 2.0 * ref / a[f"{mod}_weight"].sum())
    # nothing known about a caption: an exact 0 that still reaches the parameters (DDP needs the graph)
    a0 = {**a, "cap_weight": torch.zeros(12, 10)}
    d0 = crit(b["s_img"], b["s_cap"].requires_grad_(True), b["t_img"], b["t_cap"], b["has_t_img"], b["has_t_cap"],
              b["pids"], b["img_rows"], attr=a0)
    assert d0["attr_cap"].item() == 0.0
    d0["attr_cap"].backward()
    # no vocabulary or no labels: no attribute terms
    assert "attr_img" not in call(only(6, 6, attr_weight=1.0, s_neg_weight=1.0), b)


def test_attr_classifier_learns_and_aligns_the_towers():
    torch.manual_seed(0)
    a = _attr_batch(B=32, W=8, seed=1)
    img = torch.randn(32, 6, requires_grad=True)
    cap = torch.randn(32, 6, requires_grad=True)
    crit = only(6, 6, attr_weight=1.0, attr_words=8)
    b = batch(B=32, Ds=6, Dt=6)
    opt = torch.optim.Adam([img, cap, *crit.parameters()], lr=0.05)
    first = None
    for _ in range(150):
        d = crit(F.normalize(img, dim=1), F.normalize(cap, dim=1), b["t_img"], b["t_cap"], b["has_t_img"],
                 b["has_t_cap"], b["pids"], b["img_rows"], attr=a)
        total = sum(d.values())
        first = first if first is not None else total.item()
        opt.zero_grad()
        total.backward()
        opt.step()
    assert total.item() < 0.3 * first
    # one classifier for both: rows with the same labels end up near each other across the modalities
    same = (F.normalize(img, dim=1) * F.normalize(cap, dim=1)).sum(1)
    assert same.mean().item() > 0.3
