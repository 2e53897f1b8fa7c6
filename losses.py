"""Distillation + identity losses of the student (DESIGN §5).

    criterion = losses.build_criterion(args, s_dim=512, t_dim=1152)   # args from opts.py (add_loss_args)
    terms = criterion(s_img, s_cap, t_img, t_cap, has_t_img, has_t_cap, pids, img_rows)
    total = sum(terms.values())                                        # every term is already weighted

    python3 -m pytest -q tests/test_losses.py                          # the checks of this file (CPU, ~20 s)

Terms (a weight of 0 removes the term from the dict and from the computation):
  dist_rel            cross-modal similarity distillation: KL(teacher || student) of the image->caption and
                      caption->image softmaxes of the (global) batch similarity matrix
  rkda_img/rkda_cap   RKD angle loss (Park et al., CVPR 2019), within a modality
  rkdd_img/rkdd_cap   RKD distance loss, distances normalised by their mean (scale invariant)
  fd_img/fd_cap       feature distillation 1 - cos(proj(student), teacher); proj is a learnable linear map
                      when the dims differ (CLIP-KD, Yang et al. CVPR 2024, found plain feature mimicry strong).
                      With --fd_center 1 (default) both sides are centred on their batch mean first: teacher
                      embeddings share a large common component (the attribute teacher's image rows have cos
                      0.82 to their mean), and plain cosine was then satisfied to 0.16 by predicting the mean.
  id_img/id_cap/      identity contrastive terms (multi-positive InfoNCE, SupCon "L_out") against the batch
  id_img_cap          plus a cross-batch memory of past embeddings (XBM, Wang et al. CVPR 2020)
  d_pos               mean (1 - cos) of an image and its own caption
  s_neg               relu(cos - margin) over image/caption pairs of different identities
  attr_img/attr_cap   attribute words (captions.AttributeVocab: "red", "shirt", "backpack" per field) predicted
                      from the unit embedding by ONE linear classifier shared by both towers (binary
                      cross-entropy over the known words: every field of an image, only the named fields of a
                      caption). Factorised labels let ~1000 training identities teach colours and garments
                      separately, and the shared classifier puts "red" in the same direction for pixels and
                      words. Needs attributes in the dataset; the classifier is training-only (not exported).

Conventions:
  * everything is computed in float32 with autocast disabled (bf16 similarity matrices lose the small
    differences the teacher's SigLIP similarities live in: they span only ~0.0-0.22);
  * terms are dense masked means, never boolean-indexed subsets: a batch with no teacher rows gives an exact 0
    that still has a grad path to every input/parameter (DDP with find_unused_parameters=False needs that);
  * text-only students (s_img is None) use the teacher image embeddings as fixed image anchors in the
    cross-modal terms (dist_rel, id_img_cap, d_pos, s_neg); image-only terms are then absent;
  * DDP: dist_rel, id_* and s_neg see the global batch (gather_with_grad). Their gradient is multiplied by the
    world size (value unchanged) because each rank holds the exact gradient of the global loss w.r.t. its own
    slice and DDP *averages* over ranks: the average times W is the exact single-process gradient of the
    global batch. Local terms (rkd*, fd*, d_pos) are per-rank means, which DDP's average already makes exact;
    fd_center centres on each rank's own batch (like BN without SyncBN), so with it fd is per-rank, not global.
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# One table of defaults: add_loss_args() and build_criterion() (for partial Namespaces) both read it.
DEFAULTS = {
    "dist_rel_weight": 1.0,
    "dist_rel_t_temp": 0.0,
    "dist_rel_s_temp": 0.0,
    "rkda_weight": 1.0,
    "rkdd_weight": 0.5,
    "rkd_max_rows": 128,
    "fd_weight": 1.0,
    "fd_proj": "auto",
    "fd_center": 1,
    "id_img_weight": 0.1,
    "id_cap_weight": 0.1,
    "id_img_cap_weight": 1.0,
    "id_temp": 0.05,
    "memory_size": 4096,
    "memory_warmup": 1000,
    # 0.1, not 1: d_pos at the weight of the mean-over-negatives s_neg has a collapsed near-equilibrium (every
    # pair at cos ~0.98, d_pos ~0.02, s_neg ~0.77, id_* at log(#keys)) that short CPU runs on synthetic data
    # fell into and stayed in for 1200 steps; at 0.1 the same runs kept the modalities apart and id_* learned
    "d_pos_weight": 0.1,
    "s_neg_weight": 1.0,
    "s_neg_margin": 0.2,
    "s_neg_mode": "mean",
    "attr_weight": 1.0,
}

# Order of the dict the criterion returns (= the order the trainer logs them in; the seed's order first).
TERM_ORDER = ("dist_rel", "rkda_img", "rkda_cap", "rkdd_img", "rkdd_cap", "fd_img", "fd_cap",
              "id_img", "id_cap", "id_img_cap", "d_pos", "s_neg", "attr_img", "attr_cap")

# Temperature floor of the automatic (standardising) temperatures: bounds the logits' gradient when a
# (fresh, nearly collapsed) student has almost no spread in its similarities.
MIN_AUTO_TEMP = 0.01
# Masked logits get this instead of -inf: exp() underflows to exactly 0, yet a row that has no valid entry at
# all stays finite (an all -inf row would give NaN through logsumexp, even with weight 0).
NEG = -1e9


def add_loss_args(parser):
    """Adds the loss flags (all `--snake_case`, defaults in DEFAULTS) to an argparse parser; returns the group."""
    d = DEFAULTS
    g = parser.add_argument_group("losses (losses.py; a weight of 0 switches a term off)")
    g.add_argument("--dist_rel_weight", type=float, default=d["dist_rel_weight"],
                   help="cross-modal similarity distillation: KL between the teacher's and the student's "
                        "image<->caption softmaxes over the (global) batch")
    g.add_argument("--dist_rel_t_temp", type=float, default=d["dist_rel_t_temp"],
                   help="teacher temperature of dist_rel; 0 = auto: the std of the teacher's off-diagonal "
                        "similarities in the batch (standardised logits, whatever the teacher's similarity range)")
    g.add_argument("--dist_rel_s_temp", type=float, default=d["dist_rel_s_temp"],
                   help="student temperature of dist_rel; 0 = auto: the std of the student's own off-diagonal "
                        "similarities (scale-free relation matching) or, for a text-only student, the teacher's "
                        "temperature (it must reproduce the teacher's scale); -1 = always the teacher's")
    g.add_argument("--rkda_weight", type=float, default=d["rkda_weight"],
                   help="RKD angle loss within each modality (rkda_img, rkda_cap)")
    g.add_argument("--rkdd_weight", type=float, default=d["rkdd_weight"],
                   help="RKD distance loss (mean-normalised) within each modality (rkdd_img, rkdd_cap)")
    g.add_argument("--rkd_max_rows", type=int, default=d["rkd_max_rows"],
                   help="RKD uses at most the first N rows of the local batch (the angle loss costs N^3)")
    g.add_argument("--fd_weight", type=float, default=d["fd_weight"],
                   help="feature distillation 1 - cos(proj(student), teacher) (fd_img, fd_cap)")
    g.add_argument("--fd_proj", choices=["auto", "linear"], default=d["fd_proj"],
                   help="auto: identity when the student and teacher dims are equal, else a learnable linear map; "
                        "linear: always the learnable map (keeps a same-dim student out of the teacher's modality gap)")
    g.add_argument("--fd_center", type=int, choices=[0, 1], default=d["fd_center"],
                   help="1: fd compares batch-centred features (student and teacher each minus its batch mean), "
                        "so the common component every teacher embedding shares cannot satisfy it")
    g.add_argument("--id_img_weight", type=float, default=d["id_img_weight"],
                   help="identity contrastive loss image vs images (batch + memory)")
    g.add_argument("--id_cap_weight", type=float, default=d["id_cap_weight"],
                   help="identity contrastive loss caption vs captions (batch + memory)")
    g.add_argument("--id_img_cap_weight", type=float, default=d["id_img_cap_weight"],
                   help="identity contrastive loss image vs captions and caption vs images (batch + memory)")
    g.add_argument("--id_temp", type=float, default=d["id_temp"], help="temperature of the id_* terms")
    g.add_argument("--memory_size", type=int, default=d["memory_size"],
                   help="cross-batch memory (XBM) entries for the id_* terms; 0 = current batch only")
    g.add_argument("--memory_warmup", type=int, default=d["memory_warmup"],
                   help="training steps before the memory is used as keys (it is filled from the start); XBM "
                        "starts late because early features drift fast")
    g.add_argument("--d_pos_weight", type=float, default=d["d_pos_weight"],
                   help="mean (1 - cos) of an image and its own caption")
    g.add_argument("--s_neg_weight", type=float, default=d["s_neg_weight"],
                   help="relu(cos - margin) over image/caption pairs of different identities")
    g.add_argument("--s_neg_margin", type=float, default=d["s_neg_margin"], help="margin of s_neg")
    g.add_argument("--attr_weight", type=float, default=d["attr_weight"],
                   help="attribute-word loss on both towers' embeddings through one shared classifier "
                        "(attr_img, attr_cap); used when the dataset has attributes")
    g.add_argument("--s_neg_mode", choices=["mean", "hard"], default=d["s_neg_mode"],
                   help="mean: over all different-identity pairs; hard: the hardest negative of each image and "
                        "of each caption (VSE++), averaged")
    return g


# ----------------------------------------------------------------------------- distributed helpers

def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(x, sizes=None):
    """all_gather along dim 0 over all ranks; the local slice keeps its autograd graph, the others are detached.

    Identity when torch.distributed is not initialised (or has one rank). Ranks may hold different numbers of
    rows (padded for the collective, trimmed after). bool tensors travel as uint8 (gloo has no bool).
    `sizes` (rows per rank) may be passed to save the collective that finds them.
    """
    world, rank = _world()
    if world == 1:
        return x
    if sizes is None:
        sizes = _gather_sizes(x.shape[0], x.device)
    y = x.detach()
    is_bool = y.dtype == torch.bool
    if is_bool:
        y = y.to(torch.uint8)
    m = max(sizes)
    if y.shape[0] < m:
        y = torch.cat([y, y.new_zeros((m - y.shape[0],) + tuple(y.shape[1:]))])
    out = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(out, y.contiguous())
    parts = [o[:s] for o, s in zip(out, sizes)]
    if is_bool:
        parts = [p.bool() for p in parts]
    parts[rank] = x  # the local rows: the caller's tensor itself, graph intact
    return torch.cat(parts)


def _gather_sizes(n, device):
    world, _ = _world()
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [int(o) for o in out]


def _ddp_grad_scale(v):
    """Value unchanged, gradient x world size (see the module docstring: DDP averages, the exact gradient of a
    loss computed on the gathered global batch is the *sum* of the ranks' local-slice gradients)."""
    world, _ = _world()
    if world == 1:
        return v
    return v + (world - 1) * (v - v.detach())


# ----------------------------------------------------------------------------- small pieces

def _masked_mean(x, w):
    """sum(w * x) / max(sum(w), 1): an exact 0 (with a grad path through x) when no weight is set."""
    w = w.to(x.dtype)
    return (x * w).sum() / w.sum().clamp_min(1.0)


def _masked_row_mean(x, w):
    """Mean of the rows of x where w is set, as a [1, D] row (zeros when none is)."""
    w = w.to(x.dtype)[:, None]
    return (x * w).sum(0, keepdim=True) / w.sum().clamp_min(1.0)


def _auto_temp(x, mask):
    """Std of x over mask (population), floored at MIN_AUTO_TEMP; the floor when fewer than 2 entries."""
    w = mask.to(x.dtype)
    n = w.sum()
    mean = (x * w).sum() / n.clamp_min(1.0)
    var = (((x - mean) * w) ** 2).sum() / n.clamp_min(1.0)
    temp = var.clamp_min(MIN_AUTO_TEMP ** 2).sqrt()
    return torch.where(n >= 2, temp, torch.full_like(temp, MIN_AUTO_TEMP))


def _pairwise64(x):
    """Gram matrix and pairwise distances in float64 of mean-centred rows.

    Centring (distances and angles are translation invariant) keeps the Gram entries as small as the distances,
    and float64 keeps G_ik - G_ij - G_jk + G_jj free of cancellation for near-duplicate rows. The +1e-12 under
    the sqrt bounds the gradient of a zero distance (identical rows, e.g. two identical captions)."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    g = x @ x.t()
    sq = g.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(0)
    return g, (d2 + 1e-12).sqrt()


def rkd_distance(s, t, valid):
    """RKD distance loss: smooth-L1 between student and teacher pairwise distances, each normalised by its mean
    over the valid off-diagonal pairs. Invariant to scaling, rotating and translating either side."""
    n = s.shape[0]
    _, ds = _pairwise64(s)
    _, dt = _pairwise64(t)
    pair = valid[:, None] & valid[None, :] & ~torch.eye(n, dtype=torch.bool, device=s.device)
    w = pair.double()
    ds = ds / ((ds * w).sum() / w.sum().clamp_min(1.0)).clamp_min(1e-12)
    dt = dt / ((dt * w).sum() / w.sum().clamp_min(1.0)).clamp_min(1e-12)
    return _masked_mean(F.smooth_l1_loss(ds, dt, reduction="none"), pair).float()


def rkd_angle(s, t, valid):
    """RKD angle loss: smooth-L1 between cos(angle x_i x_j x_k) of student and teacher over triplets of
    distinct valid rows, computed from Gram matrices (O(N^3 + N^2 D) instead of Park's O(N^2 D) normalised
    difference tensor, which is ~300 MB for N=128, D=1152).

    cos at vertex j = <x_i - x_j, x_k - x_j> / (d_ij d_kj) = (G_ik - G_ij - G_jk + G_jj) / (d_ij d_kj).
    Triplets whose legs are degenerate (d < 1e-3 of the mean distance, on either side) are skipped: their angle
    is undefined and its gradient unbounded."""
    n = s.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    pair = valid[:, None] & valid[None, :] & ~eye

    def cosines(x):
        g, d = _pairwise64(x)
        w = pair.double()
        mean_d = (d * w).sum() / w.sum().clamp_min(1.0)
        ok = pair & (d > 1e-3 * mean_d)
        num = g[None, :, :] - g[:, :, None] - g[:, None, :] + g.diagonal()[:, None, None]  # [j, i, k]
        return num / (d[:, :, None] * d[:, None, :]), ok

    a_s, ok_s = cosines(s)
    a_t, ok_t = cosines(t)
    ok = ok_s & ok_t
    trip = ok[:, :, None] & ok[:, None, :] & ~eye[None, :, :]  # legs j-i and j-k usable, i != k
    return _masked_mean(F.smooth_l1_loss(a_s, a_t, reduction="none"), trip).float()


def supcon(q, q_pid, q_row, q_ok, k, k_pid, k_row, k_ok, temp, exclude_same_row):
    """Multi-positive InfoNCE (SupCon L_out): for each usable query, the mean over its positives of
    -log softmax over its usable keys. Positives share the pid; keys with the query's img_row are excluded
    entirely when exclude_same_row (same modality: the query itself, or an older copy of it in the memory);
    queries without a positive are ignored (weight 0). `k` may be a list of key blocks (batch, memory): the
    logits are concatenated, so autograd never computes a gradient for the (detached) memory keys."""
    k = k if isinstance(k, (list, tuple)) else [k]
    logits = torch.cat([q @ kb.t() for kb in k], 1) / temp
    keep = k_ok[None, :].expand_as(logits)
    if exclude_same_row:
        keep = keep & (q_row[:, None] != k_row[None, :])
    pos = keep & (q_pid[:, None] == k_pid[None, :])
    logits = logits.masked_fill(~keep, NEG)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = pos.sum(1)
    per_q = -(log_prob * pos).sum(1) / n_pos.clamp_min(1)
    return _masked_mean(per_q, q_ok & (n_pos > 0))


# ----------------------------------------------------------------------------- the criterion

class DistillLoss(nn.Module):
    """All loss terms of the student; forward returns {name: weighted scalar}; see the module docstring."""

    def __init__(self, s_dim, t_dim, dist_rel_weight=1.0, dist_rel_t_temp=0.0, dist_rel_s_temp=0.0,
                 rkda_weight=1.0, rkdd_weight=0.5, rkd_max_rows=128, fd_weight=1.0, fd_proj="auto", fd_center=1,
                 id_img_weight=0.1, id_cap_weight=0.1, id_img_cap_weight=1.0, id_temp=0.05,
                 memory_size=4096, memory_warmup=1000, d_pos_weight=0.1, s_neg_weight=1.0, s_neg_margin=0.2,
                 s_neg_mode="mean", attr_weight=1.0, attr_words=0):
        super().__init__()
        self.s_dim, self.t_dim = int(s_dim), int(t_dim)
        self.w = {"dist_rel": dist_rel_weight, "rkda": rkda_weight, "rkdd": rkdd_weight, "fd": fd_weight,
                  "id_img": id_img_weight, "id_cap": id_cap_weight, "id_img_cap": id_img_cap_weight,
                  "d_pos": d_pos_weight, "s_neg": s_neg_weight, "attr": attr_weight if attr_words > 0 else 0.0}
        for k, v in self.w.items():
            if v < 0:
                raise ValueError(f"loss weight for {k} must be >= 0, got {v}")
        if not any(v > 0 for v in self.w.values()):
            raise ValueError("all loss weights are 0: nothing to train")
        if s_neg_mode not in ("mean", "hard"):
            raise ValueError(f"s_neg_mode must be 'mean' or 'hard', got {s_neg_mode!r}")
        if fd_proj not in ("auto", "linear"):
            raise ValueError(f"fd_proj must be 'auto' or 'linear', got {fd_proj!r}")
        if id_temp <= 0:
            raise ValueError(f"id_temp must be > 0, got {id_temp}")
        self.t_temp, self.s_temp = float(dist_rel_t_temp), float(dist_rel_s_temp)
        self.rkd_max_rows = int(rkd_max_rows)
        self.id_temp = float(id_temp)
        self.s_neg_margin, self.s_neg_mode = float(s_neg_margin), s_neg_mode
        self.memory_warmup = int(memory_warmup)
        self.fd_center = bool(fd_center)

        # feature distillation map student -> teacher space: one map for both modalities, so that it cannot undo
        # the student's cross-modal alignment (a per-modality map could rotate the two towers apart)
        self.fd_proj = None
        if fd_weight > 0 and (self.s_dim != self.t_dim or fd_proj == "linear"):
            self.fd_proj = nn.Linear(self.s_dim, self.t_dim, bias=False)

        # attribute classifier on the unit embeddings; a fixed-size logit scale, learnt, because unit vectors
        # through a default-initialised Linear give logits too small to fit 0/1 targets quickly
        self.attr_head = None
        if self.w["attr"] > 0:
            self.attr_head = nn.Linear(self.s_dim, int(attr_words))
            self.attr_logit_scale = nn.Parameter(torch.tensor(10.0))

        uses_memory = any(self.w[k] > 0 for k in ("id_img", "id_cap", "id_img_cap"))
        self.memory_size = int(memory_size) if uses_memory else 0
        M, D = self.memory_size, self.s_dim
        # persistent buffers: state_dict() carries the memory, so a resumed run continues bit-identically
        self.register_buffer("mem_img", torch.zeros(M, D))
        self.register_buffer("mem_cap", torch.zeros(M, D))
        self.register_buffer("mem_pid", torch.full((M,), -1, dtype=torch.long))
        self.register_buffer("mem_row", torch.full((M,), -1, dtype=torch.long))
        self.register_buffer("mem_img_ok", torch.zeros(M, dtype=torch.bool))  # text-only: image had a teacher
        self.register_buffer("mem_filled", torch.zeros(M, dtype=torch.bool))
        self.register_buffer("mem_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._anon_rows = 0  # fallback ids when the caller gives no img_rows

    # ---- memory

    @torch.no_grad()
    def enqueue(self, img, cap, pids, img_rows, img_ok=None):
        """Writes a batch into the ring buffer at mem_ptr (wrapping); if the batch is larger than the memory, only
        its newest memory_size rows are kept, at the slots they would have reached written one by one."""
        M = self.memory_size
        if M == 0:
            return
        n = cap.shape[0]
        if img_ok is None:
            img_ok = torch.ones(n, dtype=torch.bool, device=cap.device)
        start = self.mem_ptr.clone()
        if n > M:
            img, cap, pids, img_rows, img_ok = (x[n - M:] for x in (img, cap, pids, img_rows, img_ok))
            start = start + (n - M)
        slots = (start + torch.arange(img.shape[0], device=cap.device)) % M
        # a non-finite row (a diverging step the trainer will skip) must not poison the memory for the next
        # memory_size steps: stored as zeros and marked unfilled (a NaN key would give NaN gradients even masked)
        finite = torch.isfinite(img).all(1) & torch.isfinite(cap).all(1)
        self.mem_img[slots] = torch.where(finite[:, None], img.detach(), 0).to(self.mem_img.dtype)
        self.mem_cap[slots] = torch.where(finite[:, None], cap.detach(), 0).to(self.mem_cap.dtype)
        self.mem_pid[slots] = pids.long()
        self.mem_row[slots] = img_rows.long()
        self.mem_img_ok[slots] = img_ok.bool()
        self.mem_filled[slots] = finite
        self.mem_ptr.copy_((self.mem_ptr + n) % M)

    def reset_memory(self):
        for b in (self.mem_img, self.mem_cap):
            b.zero_()
        self.mem_pid.fill_(-1)
        self.mem_row.fill_(-1)
        self.mem_img_ok.zero_()
        self.mem_filled.zero_()
        self.mem_ptr.zero_()

    # ---- forward

    def forward(self, s_img, s_cap, t_img, t_cap, has_t_img, has_t_cap, pids, img_rows=None, attr=None):
        """attr: {"img_target", "img_weight", "cap_target", "cap_weight"} [B, words] 0/1 floats, or None."""
        # float32 even under autocast: see the module docstring
        with torch.autocast(device_type=s_cap.device.type, enabled=False):
            out = self._forward(s_img, s_cap, t_img, t_cap, has_t_img, has_t_cap, pids, img_rows)
            if self.attr_head is not None and attr is not None:
                for mod, x in (("img", s_img), ("cap", s_cap)):
                    if x is not None:
                        out[f"attr_{mod}"] = self.w["attr"] * self._attr(x.float(), attr[f"{mod}_target"],
                                                                        attr[f"{mod}_weight"])
        return {k: out[k] for k in TERM_ORDER if k in out}

    def _attr(self, x, target, weight):
        """Masked binary cross-entropy of the shared attribute classifier, mean over the known words."""
        dev = x.device
        z = self.attr_logit_scale * self.attr_head(x)
        bce = F.binary_cross_entropy_with_logits(z, target.float().to(dev), reduction="none")
        return _masked_mean(bce, weight.float().to(dev))

    def _forward(self, s_img, s_cap, t_img, t_cap, has_t_img, has_t_cap, pids, img_rows):
        dev = s_cap.device
        B = s_cap.shape[0]
        text_only = s_img is None
        s_cap = s_cap.float()
        t_img, t_cap = t_img.float().to(dev), t_cap.float().to(dev)
        has_t_img, has_t_cap = has_t_img.bool().to(dev), has_t_cap.bool().to(dev)
        pids = pids.long().to(dev)
        if img_rows is None:
            # unique negative ids: every sample is only itself (no memory entry can be an older copy of it)
            img_rows = -1 - (self._anon_rows + torch.arange(B, device=dev))
            self._anon_rows += B
        img_rows = img_rows.long().to(dev)
        if text_only:
            if s_cap.shape[1] != t_img.shape[1]:
                raise ValueError(f"text-only student (s_img=None) needs its dim ({s_cap.shape[1]}) to equal the "
                                 f"teacher's ({t_img.shape[1]})")
            img, img_ok = t_img, has_t_img  # the teacher's images are the fixed anchors
        else:
            img, img_ok = s_img.float(), torch.ones(B, dtype=torch.bool, device=dev)
        w = self.w
        out = {}

        # ---- local terms (per-rank means; DDP's gradient average makes them exact)
        K = self.rkd_max_rows if self.rkd_max_rows > 0 else B
        for mod, s, t, has in (("img", None if text_only else img, t_img, has_t_img), ("cap", s_cap, t_cap, has_t_cap)):
            if s is None:
                continue
            if w["rkda"] > 0:
                out[f"rkda_{mod}"] = w["rkda"] * rkd_angle(s[:K], t[:K], has[:K])
            if w["rkdd"] > 0:
                out[f"rkdd_{mod}"] = w["rkdd"] * rkd_distance(s[:K], t[:K], has[:K])
            if w["fd"] > 0:
                p = self.fd_proj(s) if self.fd_proj is not None else s
                if self.fd_center:
                    p, t = p - _masked_row_mean(p, has), t - _masked_row_mean(t, has)
                out[f"fd_{mod}"] = w["fd"] * _masked_mean(1 - F.cosine_similarity(p, t, dim=1, eps=1e-8), has)
        if w["d_pos"] > 0:
            out["d_pos"] = w["d_pos"] * _masked_mean(1 - (img * s_cap).sum(1), img_ok)

        # ---- global terms: one gather of floats (graph kept on the local slice), one of ints
        need_global = w["dist_rel"] > 0 or w["s_neg"] > 0 or any(w[k] > 0 for k in ("id_img", "id_cap", "id_img_cap"))
        if need_global:
            world, _ = _world()
            sizes = _gather_sizes(B, dev) if world > 1 else None
            D, Dt = img.shape[1], t_img.shape[1]
            fl = gather_with_grad(torch.cat([img, s_cap, t_img, t_cap], 1), sizes)
            g_img, g_cap, g_timg, g_tcap = torch.split(fl, [D, D, Dt, Dt], 1)
            ints = torch.stack([pids, img_rows, has_t_img.long(), has_t_cap.long(), img_ok.long()], 1)
            g_pid, g_row, g_htimg, g_htcap, g_imgok = gather_with_grad(ints, sizes).unbind(1)
            g_htimg, g_htcap, g_imgok = g_htimg.bool(), g_htcap.bool(), g_imgok.bool()

            if w["dist_rel"] > 0:
                v = self._dist_rel(g_img, g_cap, g_timg, g_tcap, g_htimg & g_imgok, g_htcap, text_only)
                out["dist_rel"] = _ddp_grad_scale(w["dist_rel"] * v)

            if any(w[k] > 0 for k in ("id_img", "id_cap", "id_img_cap")):
                if self.memory_size > 0:
                    # during the warm-up the memory is filled but masked out (a tensor test: no host sync, no
                    # torch.compile graph break)
                    m_ok = self.mem_filled & (self.num_updates >= self.memory_warmup)
                    # clones: the matmul saves the memory for backward, and enqueue below overwrites it in place
                    k_img, k_cap = [g_img, self.mem_img.clone()], [g_cap, self.mem_cap.clone()]
                    k_pid = torch.cat([g_pid, self.mem_pid])
                    k_row = torch.cat([g_row, self.mem_row])
                    k_img_ok = torch.cat([g_imgok, m_ok & self.mem_img_ok])
                    k_cap_ok = torch.cat([torch.ones_like(g_imgok), m_ok])
                else:
                    k_img, k_cap, k_pid, k_row = g_img, g_cap, g_pid, g_row
                    k_img_ok, k_cap_ok = g_imgok, torch.ones_like(g_imgok)
                all_q = torch.ones_like(g_imgok)
                T = self.id_temp
                if w["id_img"] > 0 and not text_only:
                    v = supcon(g_img, g_pid, g_row, g_imgok, k_img, k_pid, k_row, k_img_ok, T, True)
                    out["id_img"] = _ddp_grad_scale(w["id_img"] * v)
                if w["id_cap"] > 0:
                    v = supcon(g_cap, g_pid, g_row, all_q, k_cap, k_pid, k_row, k_cap_ok, T, True)
                    out["id_cap"] = _ddp_grad_scale(w["id_cap"] * v)
                if w["id_img_cap"] > 0:
                    # cross-modal: an image's own caption (and older captions of it in memory) ARE positives
                    v = 0.5 * (supcon(g_img, g_pid, g_row, g_imgok, k_cap, k_pid, k_row, k_cap_ok, T, False)
                               + supcon(g_cap, g_pid, g_row, all_q, k_img, k_pid, k_row, k_img_ok, T, False))
                    out["id_img_cap"] = _ddp_grad_scale(w["id_img_cap"] * v)

            if w["s_neg"] > 0:
                out["s_neg"] = _ddp_grad_scale(w["s_neg"] * self._s_neg(g_img, g_cap, g_pid, g_imgok))

            if self.training and self.memory_size > 0:
                # after the loss (the current batch must not meet itself in the memory); the global batch, so
                # every rank holds the same memory
                self.enqueue(g_img.detach(), g_cap.detach(), g_pid, g_row, g_imgok)
        if self.training:
            self.num_updates += 1
        return {k: out[k] for k in TERM_ORDER if k in out}

    def _dist_rel(self, img, cap, t_img, t_cap, row_ok, col_ok, text_only):
        """KL(softmax(T/tau_t) || softmax(S/tau_s)) over the rows (image -> captions) and the columns
        (caption -> images), averaged; rows are images with a teacher, columns captions with a teacher
        (masks, not subsets: shapes stay static and an empty batch gives an exact 0 with a grad path).

        Auto temperatures divide each side by the std of its own off-diagonal (non-matching) similarities, i.e.
        compare standardised similarity patterns: robust to the teacher's range (SigLIP ~0.0-0.22, a
        sentence-transformer 0.2-0.9) and free of the student's scale, which d_pos/s_neg/id_* set. S == T gives
        the same temperature on both sides, hence exactly KL = 0."""
        S = img @ cap.t()
        T = t_img @ t_cap.t()
        n = S.shape[0]
        valid = row_ok[:, None] & col_ok[None, :]
        off = valid & ~torch.eye(n, dtype=torch.bool, device=S.device)
        tt = self.t_temp if self.t_temp > 0 else _auto_temp(T, off)
        if self.s_temp > 0:
            ts = self.s_temp
        elif self.s_temp < 0 or text_only:
            ts = tt  # tied: the student must reproduce the teacher's similarity scale
        else:
            ts = _auto_temp(S, off)
        zt = (T / tt).masked_fill(~valid, NEG)
        zs = (S / ts).masked_fill(~valid, NEG)
        kl = []
        for dim, ok in ((1, row_ok), (0, col_ok)):
            lt, ls = F.log_softmax(zt, dim), F.log_softmax(zs, dim)
            per = (lt.exp() * (lt - ls) * valid).sum(dim)
            kl.append(_masked_mean(per, ok & (valid.sum(dim) > 0)))
        return 0.5 * (kl[0] + kl[1])

    def _s_neg(self, img, cap, pid, img_ok):
        cos = img @ cap.t()
        neg = (pid[:, None] != pid[None, :]) & img_ok[:, None]
        viol = F.relu(cos - self.s_neg_margin) * neg
        if self.s_neg_mode == "mean":
            # all negatives: a stable, batch-size independent scale; the gradient still goes only to the pairs
            # above the margin (relu), so easy negatives cost nothing but the denominator
            return _masked_mean(viol, neg)
        # hard (VSE++): hardest negative of each image and of each caption; viol is 0 off the negatives
        rows = _masked_mean(viol.max(1).values, neg.any(1))
        cols = _masked_mean(viol.max(0).values, neg.any(0))
        return 0.5 * (rows + cols)


def build_criterion(args, s_dim, t_dim, attr_words=0):
    """DistillLoss from an argparse Namespace (or any object with attributes); missing ones take DEFAULTS.
    attr_words: size of the attribute vocabulary (0: no attribute terms)."""
    kw = {k: getattr(args, k, v) for k, v in DEFAULTS.items()}
    return DistillLoss(s_dim, t_dim, attr_words=attr_words, **kw)


if __name__ == "__main__":  # python3 losses.py: print the flags and their defaults
    p = argparse.ArgumentParser("losses.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_loss_args(p)
    p.print_help()
