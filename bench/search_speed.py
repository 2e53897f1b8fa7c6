r"""Gallery search at scale: recall@10, query latency, build time and RAM per index option, side by side in one run.

    python bench/search_speed.py                         # 100k and 1M, the README "Scale / Search" table (~8 min)
    python bench/search_speed.py --sizes 100000          # one size
    python bench/search_speed.py --smoke                 # seconds: 5k rows (tests/test_search_speed.py)
    python bench/search_speed.py --model_dir EXPORT      # a trained export instead of a random student
    python bench/search_speed.py --options auto,ivf_sq8 --recall_target 0.97

Gallery ("student-like"): a student (exported by export_model.py from a randomly initialised res_tiny/char_small,
512-d, unless --model_dir) embeds --base_ids x --base_views synthetic person images rendered by
tools/make_synthetic_pedes.render_image, through search.engine.ImageEncoder (what enrolment runs). That gives the
student's real embedding geometry: per-identity means and within-identity residuals (one view minus its
identity's mean). The gallery is tiled from them to N rows: N/8 synthetic identities, each the mean of a random
pair of base identities mixed by w ~ U(0.2, 0.8) (new people between existing ones), with 8 views each = identity
+ a real residual of a random base view scaled by U(0.6, 1.4) + 2% isotropic noise, L2-normalised. Queries are
fresh views of random synthetic identities (not in the gallery), i.e. "another picture of a gallery person".
Rows are generated in chunks straight into a memory-mapped .npy (never held twice), as an enrolled gallery is.

Per option (search/index.py: flat, hnsw, ivf, ivf_fp16, ivf_sq8, auto = the pick of index.auto_params from N and
--recall_target) it prints: build s (k-means + add + the build-time nprobe tuning), index RAM (the index's own
bytes; the float32 features stay in the memory-mapped file and are not read by a compressed index), search ms
(median and p90 over --queries single-query searches, faiss on --threads threads), recall@10 against exact search
over the same queries, and the parameters. Text encoding (search.engine.TextEncoder on a typical short query, one
thread) is timed once and printed separately: a query costs text + search.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPTIONS = ("flat", "ivf", "ivf_fp16", "ivf_sq8", "hnsw", "auto")
QUERIES = ["a woman in a red coat with a black handbag", "man with a blue shirt and black trousers",
           "穿红色外套的女人", "girl in a white dress carrying an umbrella",
           "old man, grey jacket, walking stick", "person with a yellow backpack and green shoes"]


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("search_speed", add_help=add_help, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma list of gallery sizes")
    p.add_argument("--options", default="flat,ivf,ivf_fp16,ivf_sq8,hnsw,auto",
                   help=f"comma list of: {','.join(OPTIONS)}")
    p.add_argument("--hnsw_max_n", type=int, default=100_000,
                   help="build HNSW only up to this size (its build at 1M takes ~40 min on 2 cores)")
    p.add_argument("--recall_target", type=float, default=0.95, help="what --index auto tunes nprobe for")
    p.add_argument("--queries", type=int, default=200, help="single-query searches timed per option")
    p.add_argument("--threads", type=int, default=2, help="faiss threads for build and search")
    p.add_argument("--base_ids", type=int, default=400)
    p.add_argument("--base_views", type=int, default=5)
    p.add_argument("--model_dir", default=None, help="an export_model.py folder (default: a random student)")
    p.add_argument("--workdir", default=None, help="where the gallery .npy goes (default: a temp dir, removed)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes; numbers mean nothing (tests)")
    p.add_argument("--seed", type=int, default=0)
    return p


# ------------------------------------------------------------------------------------------------ student
def random_student_export(out, seed, smoke):
    """Export a randomly initialised student with export_model.export; -> the export folder."""
    import contextlib
    import io

    import torch

    import export_model
    from checkpoint import save_checkpoint
    from model import build_model, default_model_cfg

    torch.manual_seed(seed)
    cfg = default_model_cfg(dict(feature_dim=512, image_size=[64, 32] if smoke else [224, 112],
                                 max_seq_length=64), teacher_dim=1152)
    model = build_model(cfg).eval()
    ckpt = os.path.join(out, "student.pt")
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_cfg": cfg, "args": {}, "step": 0})
    exp = os.path.join(out, "export")
    eargs = export_model.get_args_parser().parse_args([ckpt, exp, "--no_simplify"])
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), torch.no_grad():
            export_model.export(eargs)
    except export_model.ExportFailure as e:
        print(buf.getvalue()[-2000:], file=sys.stderr)
        raise SystemExit(f"error: student export failed: {e}")
    return exp


def base_embeddings(info, n_ids, n_views, seed):
    """Student embeddings of rendered synthetic people -> (float32 [n_ids, n_views, D], seconds)."""
    import numpy as np

    from search.engine import ImageEncoder
    from tools.make_synthetic_pedes import make_identity, render_image

    enc = ImageEncoder(info, threads=2)
    h, w = enc.image_size
    t0 = time.perf_counter()
    out = np.empty((n_ids, n_views, enc.dim), np.float32)
    for pid in range(n_ids):
        ident = make_identity(seed, pid)
        ims = [render_image(ident, seed, pid, k, height=max(h, 64), width=max(w, 32))[0] for k in range(n_views)]
        out[pid] = enc.encode([(im, None) for im in ims])
    return out, time.perf_counter() - t0


def tile_gallery(base, n, n_queries, path, seed, views=8, chunk=50_000):
    """Memory-mapped float32 [n, D] gallery + [n_queries, D] queries tiled from base (see the docstring)."""
    import numpy as np

    n_ids, n_views, d = base.shape
    means = base.mean(1)
    resid = (base - means[:, None]).reshape(-1, d)
    rng = np.random.default_rng(seed)
    n_syn = max(1, n // views)
    pair = rng.integers(0, n_ids, (n_syn, 2))
    wgt = rng.uniform(0.2, 0.8, (n_syn, 1)).astype(np.float32)
    iso = 0.02 * float(np.linalg.norm(means, axis=1).mean()) / np.sqrt(d)

    def rows(ids):
        m = wgt[ids] * means[pair[ids, 0]] + (1 - wgt[ids]) * means[pair[ids, 1]]
        r = resid[rng.integers(0, len(resid), len(ids))] * rng.uniform(0.6, 1.4, (len(ids), 1)).astype(np.float32)
        v = m + r + iso * rng.standard_normal((len(ids), d), dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, chunk):
        ids = np.arange(s, min(n, s + chunk)) // views % n_syn
        x[s:s + len(ids)] = rows(ids)
    x.flush()
    del x
    q = rows(rng.integers(0, n_syn, n_queries))
    return np.load(path, mmap_mode="r"), q
