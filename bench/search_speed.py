r"""Gallery search at scale: recall@10, query latency, build time and RAM per index option, side by side in one run.

    python bench/search_speed.py                         # 100k and 1M, every option (~13 min on 2 busy cores)
    python bench/search_speed.py --sizes 1000000 --options flat,ivf_fp16,auto   # the README 1M rows (~8 min)
    python bench/search_speed.py --sizes 100000          # one size
    python bench/search_speed.py --smoke                 # ~30 s: 2k and 6k rows (bench/speed.py --smoke runs it)
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

from bench.speed import print_table  # noqa: E402  (one table printer for both benches)

OPTIONS = ("flat", "ivf", "ivf_fp16", "ivf_sq8", "hnsw", "auto", "milvus")
SLOW = ("ivf", "hnsw")  # built only up to --slow_max_n: float32 lists (2x the RAM) / HNSW (40 min at 1M)
QUERIES = ["a woman in a red coat with a black handbag", "man with a blue shirt and black trousers",
           "穿红色外套的女人", "girl in a white dress carrying an umbrella",
           "old man, grey jacket, walking stick", "person with a yellow backpack and green shoes"]


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("search_speed", add_help=add_help, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma list of gallery sizes")
    p.add_argument("--options", default="flat,ivf,ivf_fp16,ivf_sq8,hnsw,auto",
                   help=f"comma list of: {','.join(OPTIONS)}; auto is skipped where it equals ivf_sq8 already run "
                        "(same kind and nlist), and ivf_sq8 where auto will run it")
    p.add_argument("--slow_max_n", type=int, default=100_000,
                   help=f"build {' and '.join(SLOW)} only up to this size (float32 lists hold the gallery twice; "
                        "HNSW takes ~40 min at 1M on 2 cores)")
    p.add_argument("--milvus_max_n", type=int, default=100_000,
                   help="the milvus option (Milvus Lite in a temp file, search/backends.py) only up to this size")
    p.add_argument("--recall_target", type=float, default=0.95, help="what --index auto tunes nprobe for")
    p.add_argument("--queries", type=int, default=200, help="single-query searches timed per option")
    p.add_argument("--flat_queries", type=int, default=20, help="exact flat searches timed (100 ms each at 1M)")
    p.add_argument("--threads", type=int, default=2, help="faiss threads for build and search")
    p.add_argument("--base_ids", type=int, default=400)
    p.add_argument("--base_views", type=int, default=5)
    p.add_argument("--model_dir", default=None, help="an export_model.py folder (default: a random student)")
    p.add_argument("--student_info", default=None, help=argparse.SUPPRESS)  # bench/speed.py passes its export
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


# ------------------------------------------------------------------------------------------------ measuring
def peak_rss():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fmt_ms(s):
    ms = s * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def fmt_n(n):
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" if n >= 1e3 else str(n)


def time_queries(sidx, q, k=10):
    """-> (per-query seconds, rows [n, k]) of single-query searches."""
    import numpy as np

    per, got = [], []
    for i in range(len(q)):
        t = time.perf_counter()
        _, r = sidx.search(q[i:i + 1], k)
        per.append(time.perf_counter() - t)
        got.append(np.pad(r[0], (0, k - len(r[0])), constant_values=-1))
    return per, np.stack(got)


def params_text(kind, p):
    t = p.get("tuning") or {}
    bits = [f"nlist={p['nlist']}" if "nlist" in p else "", f"M={p['M']}" if "M" in p else "",
            f"nprobe={p['nprobe']}" if "nprobe" in p and kind != "hnsw" else "",
            f"efSearch={p['ef_search']}" if kind == "hnsw" else "",
            f"refine x{p['refine']}" if p.get("refine") else "",
            f"(tuned: {t['recall_at_10']:.3f} on {t['queries']} gallery rows)" if t else ""]
    return " ".join(b for b in bits if b)


def bench_size(args, base, n, options, tmp, text_s):
    import gc

    import numpy as np

    from search import index as sindex

    t0 = time.perf_counter()
    x, q = tile_gallery(base, n, args.queries, os.path.join(tmp, f"gallery_{n}.npy"), args.seed)
    t_tile = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, truth = sindex.exact_neighbours(x, q, 10)
    t_exact = time.perf_counter() - t0
    d = x.shape[1]
    print(f"\n{fmt_n(n)} rows x {d}: tiled in {t_tile:.0f} s ({x.nbytes / 2**20:,.0f} MiB float32, memory-mapped); "
          f"exact answers of the {len(q)} queries in {t_exact:.1f} s", flush=True)
    rows, cache = [], {}
    ap = sindex.auto_params(n, d, args.recall_target)
    todo = [o for o in options if not (o in SLOW and n > args.slow_max_n)
            and not (o == "milvus" and n > args.milvus_max_n)]
    if "auto" in todo and ap["kind"] in todo and ap["kind"] != "flat":
        todo.remove(ap["kind"])  # the auto row is that index, built with auto's parameters
    if "auto" in todo and ap["kind"] == "flat" and "flat" in todo:
        todo.remove("auto")
    t_gt = None
    for opt in todo:
        gc.collect()
        if opt == "milvus":
            rows.append(bench_milvus(args, x, q, truth, tmp, text_s, n))
            continue
        kind = ap["kind"] if opt == "auto" else opt
        label = f"auto -> {kind}" if opt == "auto" else kind
        if kind == "flat":
            sidx = sindex.build_index(x, "flat")
            sindex.set_search_threads(args.threads)
            per, got = time_queries(sidx, q[:args.flat_queries])
            rows.append([f"{fmt_n(n)}", label, "exact, over the memory-mapped features", "0", "0", "0", "0",
                         fmt_ms(statistics.median(per)), fmt_ms(sorted(per)[int(0.9 * (len(per) - 1))]),
                         fmt_ms(text_s + statistics.median(per)), f"{sindex.recall_at(got, truth[:len(got)]):.3f}"])
            continue
        import faiss

        faiss.omp_set_num_threads(args.threads)
        t0 = time.perf_counter()
        sidx = sindex.build_index(x, kind, nlist=ap.get("nlist") if opt == "auto" else None)
        tb = time.perf_counter() - t0
        if t_gt is None:  # the exact answers of the tuning queries: paid once per gallery here, by every real build
            t0 = time.perf_counter()
            sindex.tune_search_param(sidx, args.recall_target, cache=cache)
            t_gt = time.perf_counter() - t0
            t0 = time.perf_counter()
        else:
            t0 = time.perf_counter()
        sindex.tune_search_param(sidx, args.recall_target, cache=cache)
        tt = time.perf_counter() - t0
        ram = sidx.nbytes()
        sindex.set_search_threads(args.threads)
        per, got = time_queries(sidx, q)
        med = statistics.median(per)
        rec = sindex.recall_at(got, truth)
        rows.append([f"{fmt_n(n)}", label, params_text(kind, sidx.params), f"{tb:.0f}", f"{tt:.0f}",
                     f"{ram / 2**20:,.0f}", f"{ram / x.nbytes:.3f}", fmt_ms(med),
                     fmt_ms(sorted(per)[int(0.9 * (len(per) - 1))]),
                     fmt_ms(text_s + med), f"{rec:.3f}"])
        print(f"  {label}: build {tb:.0f} s + tune {tt:.0f} s, {ram / 2**20:,.0f} MiB, p50 {fmt_ms(med)} ms, "
              f"recall@10 {rec:.3f}", flush=True)
        del sidx
    del x
    os.remove(os.path.join(tmp, f"gallery_{n}.npy"))
    return rows, t_gt


def bench_milvus(args, x, q, truth, tmp, text_s, n):
    """Milvus Lite through search/backends.py: upsert the gallery (build = upserts + flush + index), reopen, time
    single-query searches the way api.py runs them."""
    import numpy as np

    from search import backends
    from search.index import recall_at

    uri = os.path.join(tmp, f"milvus_{n}.db")
    model = {"kind": "bench", "signature": "bench", "space": "bench", "dim": int(x.shape[1])}
    t0 = time.perf_counter()
    enr = backends.MilvusEnrolment(uri, "bench", model, log=lambda m: None)
    for s in range(0, n, 2048):
        f = np.asarray(x[s:s + 2048])
        enr.add(f, [{"image": f"cam{i % 100}/{i}.jpg", "bbox": None, "source": "image"} for i in range(s, s + len(f))])
    enr.client.flush("bench")
    enr.close()
    backends.release(uri)
    store = backends.MilvusStore(uri, "bench")
    store.search(q[:1], 10)  # the first search after opening waits for the collection to load
    tb = time.perf_counter() - t0
    per, got = [], []
    for i in range(len(q)):
        t = time.perf_counter()
        hits = store.search(q[i:i + 1], 10)
        per.append(time.perf_counter() - t)
        got.append([int(h[2]["image"].rsplit("/", 1)[1][:-4]) for h in hits] + [-1] * (10 - len(hits)))
    store.client.close()
    backends.release(uri)
    med = statistics.median(per)
    rec = recall_at(np.asarray(got), truth)
    print(f"  milvus lite: upsert + index {tb:.0f} s, p50 {fmt_ms(med)} ms, recall@10 {rec:.3f}", flush=True)
    return [fmt_n(n), "milvus lite", "AUTOINDEX, IP, consistency Bounded (search/backends.py)", f"{tb:.0f}", "-",
            "-", "-", fmt_ms(med), fmt_ms(sorted(per)[int(0.9 * (len(per) - 1))]), fmt_ms(text_s + med),
            f"{rec:.3f}"]


def main(args):
    import numpy as np

    from search.engine import TextEncoder, load_export

    sizes = [int(v) for v in str(args.sizes).split(",") if v]
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    bad = [o for o in options if o not in OPTIONS]
    if bad or not sizes or min(sizes) < 100:
        raise SystemExit(f"error: --options from {','.join(OPTIONS)} and --sizes >= 100 (got {bad or sizes})")
    if args.smoke:
        sizes, args.base_ids, args.base_views, args.queries = [2000, 6000], 12, 3, 30
        args.flat_queries, args.slow_max_n = 10, 6000
    t_all = time.perf_counter()
    print(f"search benchmark: sizes {','.join(fmt_n(n) for n in sizes)}, faiss threads {args.threads}, "
          f"recall target {args.recall_target}, load average {'/'.join(f'{v:.2f}' for v in os.getloadavg())}",
          flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if args.student_info is not None:
            info, desc = args.student_info, "the bench/speed.py student"
        elif args.model_dir:
            info, desc = load_export(args.model_dir), f"export {args.model_dir}"
        else:
            t0 = time.perf_counter()
            info = load_export(random_student_export(tmp, args.seed, args.smoke))
            desc = f"a randomly initialised student exported in {time.perf_counter() - t0:.0f} s"
        base, t_emb = base_embeddings(info, args.base_ids, args.base_views, args.seed)
        b = base.reshape(-1, base.shape[-1])
        same = float(np.einsum("ivd,iwd->", base, base) - args.base_ids * args.base_views) / max(
            1, args.base_ids * args.base_views * (args.base_views - 1))
        print(f"gallery: {desc}; {b.shape[0]} synthetic images ({args.base_ids} people x {args.base_views} views) "
              f"embedded in {t_emb:.0f} s; mean cosine between images {float((b @ b.T).mean()):.3f}, between views "
              f"of one person {same:.3f}")
        enc = TextEncoder(info, threads=1)
        for t in QUERIES:
            enc.encode([t])
        ts = []
        for _ in range(5):
            for t in QUERIES:
                t0 = time.perf_counter()
                enc.encode([t])
                ts.append(time.perf_counter() - t0)
        text_s = statistics.median(ts)
        print(f"text encoding (search.engine.TextEncoder, 1 thread, {len(QUERIES)} typical queries en+zh): "
              f"{fmt_ms(text_s)} ms median, separate from the index search below", flush=True)
        rows, gts = [], []
        for n in sizes:
            r, t_gt = bench_size(args, base, n, options, tmp, text_s)
            rows += r
            gts.append((n, t_gt))
    print()
    print_table([f"gallery (D={base.shape[-1]})", "index", "parameters", "build s", "tune s", "index MiB", "x fp32",
                 "search ms", "p90 ms", "query total ms", "recall@10"], rows)
    print(f"search ms = p50 of {args.queries} single-query top-10 searches ({args.flat_queries} for flat) on "
          f"{args.threads} faiss threads; query total = text encoding ({fmt_ms(text_s)} ms) + search; recall@10 "
          f"against exact search, queries = fresh views of gallery people; build = k-means + add from the "
          f"memory-mapped features; tune = choosing nprobe/efSearch for recall@10 >= {args.recall_target} on 200 "
          f"gallery rows; index MiB = what the index holds in RAM (codes + ids + centroids / graph), x fp32 = that "
          f"over the float32 features (which stay in their memory-mapped file); peak RSS of the run "
          f"{peak_rss() / 2**30:.1f} GiB")
    for n, t in gts:
        if t is not None:
            print(f"plus, once per build at {fmt_n(n)}: the exact answers of the 200 tuning queries, {t:.0f} s")
    print(f"total {time.perf_counter() - t_all:.0f} s; load average after "
          f"{'/'.join(f'{v:.2f}' for v in os.getloadavg())}")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
