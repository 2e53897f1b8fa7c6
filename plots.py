"""Pictures of a student's quality (matplotlib, Agg; PNG files): where a person would rather look than read.

    python evaluation_model.py <ckpt> --plots DIR       # det.png, retrieval.png, learning_curve.png (+ TensorBoard)
    python bench/quality.py                             # the same three for the bench's teacher and student

  det_curve(...)            -> (far, frr) of the verification pairs of metrics.verification (a caption with its
                               own image = positive, with an image of another identity = negative)
  plot_det(curves, path)    ROC/DET: FRR against FAR (log axis) for several models on one axis, FAR levels marked
  plot_retrieval_sheet(rows, path)   each query with its top-k images, hits framed green, misses red, scores under
  read_eval_log(train.log)  the trainer's "Eval Iter:<step>| r1: .. eer: .." lines -> {step: {metric: value}}
  plot_learning_curve(points, path)  validation R@1 and EER against step
Each plot_* returns the PNG path; png_to_array() reads one back for TensorBoard's add_image.
"""
import math
import re

import numpy as np

FAR_LEVELS = (1e-3, 1e-4, 1e-5, 1e-6)


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    # Chinese queries on the retrieval sheet: fall back to a CJK font when one is installed (tools/install.sh
    # installs fonts-wqy-zenhei); matplotlib picks per glyph from this list
    import matplotlib.font_manager as fm
    have = {f.name for f in fm.fontManager.ttflist}
    cjk = ("WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans CJK JP", "Droid Sans Fallback")
    plt.rcParams["font.family"] = ["DejaVu Sans"] + [f for f in cjk if f in have]
    # WenQuanYi ships one weight (500): matplotlib would warn "Failed to find font weight normal" for every text
    import logging
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    return plt


def det_curve(img_emb, cap_emb, cap_img_index, img_pids, cap_pids, max_pairs=20_000_000, seed=0):
    """FAR and FRR at every distinct score threshold (exact on the pairs used). Above max_pairs image x caption
    pairs, a seeded sample of the captions is scored (the curve's shape, not the table's exact figures)."""
    img = np.asarray(img_emb, np.float32)
    cap = np.asarray(cap_emb, np.float32)
    cap_img_index, img_pids, cap_pids = (np.asarray(x, np.int64) for x in (cap_img_index, img_pids, cap_pids))
    sel = np.arange(len(cap))
    if len(img) * len(cap) > max_pairs:
        k = max(1, max_pairs // max(1, len(img)))
        sel = np.sort(np.random.default_rng(seed).choice(len(cap), size=min(k, len(cap)), replace=False))
    pos, neg = [], []
    for s in range(0, len(sel), 4096):
        j = sel[s:s + 4096]
        S = cap[j] @ img.T  # [c, i]
        own = cap_img_index[j]
        ok = own >= 0
        pos.append(S[np.nonzero(ok)[0], own[ok]])
        neg.append(S[cap_pids[j][:, None] != img_pids[None, :]])
    pos, neg = np.concatenate(pos), np.concatenate(neg)
    if not len(pos) or not len(neg):
        raise ValueError("det_curve needs positive and negative pairs")
    thr = np.unique(np.concatenate([pos, neg]))
    # accept when score >= t: FAR = #neg >= t / n_neg, FRR = #pos < t / n_pos
    far = 1.0 - np.searchsorted(np.sort(neg), thr, side="left") / len(neg)
    frr = np.searchsorted(np.sort(pos), thr, side="left") / len(pos)
    return far, frr


def plot_det(curves, path, far_levels=FAR_LEVELS, title="verification: caption vs image"):
    """curves: {label: (far, frr)} -> PNG with FRR (%) against FAR (log) and the EER point of each curve."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    for label, (far, frr) in curves.items():
        far, frr = np.asarray(far), np.asarray(frr)
        k = int(np.argmin(np.abs(far - frr)))
        eer = 50.0 * (far[k] + frr[k])
        ax.plot(np.clip(far, 1e-7, 1), 100 * frr, label=f"{label} (EER {eer:.2f}%)")
        ax.plot([max(far[k], 1e-7)], [100 * frr[k]], "o", color=ax.lines[-1].get_color())
    for lv in far_levels:
        ax.axvline(lv, color="gray", ls=":", lw=1)
        ax.text(lv, 101, f"{lv:g}", ha="center", va="bottom", fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("FRR (%)")
    ax.set_title(title, pad=16)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_retrieval_sheet(rows, path, title="text -> image: top results"):
    """rows: [(query text, [(image path or HxWx3 uint8 array, score, is_hit), ...])] -> PNG sheet."""
    from PIL import Image
    plt = _plt()
    n_rows = max(1, len(rows))
    k = max([len(r[1]) for r in rows] + [1])
    fig, axes = plt.subplots(n_rows, k, figsize=(1.5 * k + 0.5, 2.9 * n_rows), dpi=100, squeeze=False)
    for i, (query, hits) in enumerate(rows):
        for j in range(k):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(hits):
                ax.axis("off")
                continue
            img, score, ok = hits[j]
            if not isinstance(img, np.ndarray):
                with Image.open(img) as im:
                    img = np.asarray(im.convert("RGB"))
            ax.imshow(img)
            for s in ax.spines.values():
                s.set_edgecolor("#1a9641" if ok else "#d7191c")
                s.set_linewidth(4)
            ax.set_xlabel(f"{score:.3f}", fontsize=9)
        q = query if len(query) <= 90 else query[:87] + "..."
        axes[i][0].set_title(q, loc="left", fontsize=9, x=0.0)
    fig.suptitle(title + "  (green: the query's person, red: someone else; score under each)", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=1 - 0.35 / n_rows, hspace=0.45, wspace=0.08)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


_EVAL_RE = re.compile(r"Eval Iter:(\d+)\|(.*)$")


def read_eval_log(log_path):
    """{step: {metric: value}} from the trainer's log lines 'Eval Iter:<step>| r1: 12.3 eer: 45.6 ...'."""
    out = {}
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _EVAL_RE.search(line)
            if not m:
                continue
            toks = m.group(2).split()
            vals = {}
            for name, v in zip(toks[0::2], toks[1::2]):
                try:
                    vals[name.rstrip(":")] = float(v)
                except ValueError:
                    pass
            out[int(m.group(1))] = vals
    return out


def plot_learning_curve(points, path, title="validation identities during training"):
    """points: {step: {"r1": .., "eer": ..}} -> PNG, R@1 (left axis) and EER (right axis) against step."""
    plt = _plt()
    steps = sorted(points)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    r1 = [points[s].get("r1", math.nan) for s in steps]
    eer = [points[s].get("eer", math.nan) for s in steps]
    ax.plot(steps, r1, "o-", color="#2b83ba", label="R@1 (%)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("R@1 (%)", color="#2b83ba")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(steps, eer, "s--", color="#d7191c", label="EER (%)")
    ax2.set_ylabel("EER (%)", color="#d7191c")
    ax2.set_ylim(0, max([50.0] + [e for e in eer if e == e]))
    ax.grid(True, alpha=0.3)
    ax.set_title(title if steps else title + " (no evaluation in the log)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def png_to_array(path):
    """HxWx3 uint8 of a PNG (TensorBoard add_image with dataformats='HWC')."""
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
