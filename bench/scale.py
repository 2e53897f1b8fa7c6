"""Records and extraction at SYNTH-PEDES scale (issue 14): time and peak RSS per stage, side by side, in one run.

Generates a SYNTH-PEDES-like JSON of --n records (15.3 images per identity, 2-3 English captions each written by
the synthetic generator's caption composer, so the lengths are realistic; attributes and prompt_caption as in
SYNTH-PEDES) whose file paths cycle through --images real JPEGs, and a teacher cache for it, then runs each stage
in a fresh process (so each peak RSS is that stage's own) and prints one table:

  imports       import data, main: torch and torchvision alone, the floor under every stage
  json (old)    data.load_records + split: what every rank did before the record store (skipped above
                --baseline_max records, where it needs about 2 KB per record)
  build store   python data.py --data X --index: streaming parse, columns, the image check (once)
  open store    record_store.ensure: sha256 of the JSON + mapping the columns (what every rank does now)
  Dataset       + split_records + stored image verdict + DistillDataset (main.build_data)
  sampler epoch + ResumableSampler with P x K groups, one full epoch of indices
  first batch   + DataLoader with 2 workers, first batch; RSS summed over the rank and its workers (and PSS)
  main.py       python main.py ... to its first logged step (start-up time; whole process tree)
  extract start tools/extract_label.py's inputs and pending rows for every field (no teacher)
  batch write   EmbeddingCache.write of one 64-row batch at 10k rows and at the full caption count (new: in place),
                against the old whole-mask rewrite

    python3 bench/scale.py --n 100000                         # the CI size, about a minute on 2 cores
    flock /tmp/helpers-bench.lock python3 bench/scale.py --n 4791711 --dir /tmp/scale_full   # SYNTH-PEDES size
    python3 bench/scale.py --n 300 --stages build,open        # a subset of stages

Timings are wall-clock on a shared machine: read them as orders of magnitude next to each other. "peak RSS so far"
is the process's VmHWM. For a rank with workers, summed RSS counts the pages they share (torch's libraries, the
pre-fork heap) once per process, so "first batch" and "main.py" also give the tree's proportional set size split
into heap (anonymous pages: the rank's own memory) and mapped files (libraries, store and cache pages: page cache,
shared with other processes and reclaimable).
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGES_PER_ID = 4791711 / 312321  # SYNTH-PEDES: 4,791,711 images of 312,321 identities
STAGES = ("json_old", "build", "rank", "main", "extract")


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("records and extraction at scale", add_help=add_help)
    p.add_argument("--n", type=int, default=100_000, help="records (SYNTH-PEDES: 4791711)")
    p.add_argument("--dir", default=None, help="work folder (default /tmp/scale_<n>); reused when it matches")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {','.join(STAGES)}")
    p.add_argument("--images", type=int, default=64, help="distinct real JPEGs the file paths cycle through")
    p.add_argument("--dim", type=int, default=1152, help="teacher dim of the batch-write caches (SigLIP2: 1152)")
    p.add_argument("--train_dim", type=int, default=64,
                   help="teacher dim of the training cache (filled with random rows; the Dataset reads 2 rows per "
                        "item, so the dim does not move RSS, only the disk the bench writes)")
    p.add_argument("--baseline_max", type=int, default=1_000_000, help="skip json_old above this many records")
    p.add_argument("--image_check", default="auto", choices=["auto", "decode", "header", "none"])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the first-batch stage")
    p.add_argument("--batch_size", type=int, default=64, help="training batch and extraction batch rows")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per stage")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in this process
    return p


# ----------------------------------------------------------------------------------------------------------------
# inputs

def generate(d, n, n_images, seed=0):
    """data.json with n records + n_images real JPEGs; identities as SYNTH-PEDES (15.3 images each)."""
    from PIL import Image
    import numpy as np

    from captions import compose_caption, prompt_caption
    from tools.make_synthetic_pedes import make_identity
    d.mkdir(parents=True, exist_ok=True)
    (d / "imgs").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for j in range(n_images):
        arr = rng.integers(0, 255, size=(128, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / "imgs" / f"{j:03d}.jpg", quality=80)
    n_ids = max(1, round(n / IMAGES_PER_ID))
    tmp = d / "data.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[")
        i = 0
        for pid in range(n_ids):
            k_max = (n * (pid + 1)) // n_ids - (n * pid) // n_ids  # spread n records over n_ids identities
            attrs = make_identity(seed, pid)["attributes"]
            r = random.Random(f"scale/{pid}")
            pool = [compose_caption(attrs, r) for _ in range(4)]
            prompt = prompt_caption(attrs)
            for k in range(k_max):
                caps = r.sample(pool, 3 if r.random() < 0.53 else 2)  # 2.53 captions per image, as SYNTH-PEDES
                rec = {"id": pid, "file_path": f"imgs/{i % n_images:03d}.jpg", "attributes": [attrs],
                       "captions": caps, "prompt_caption": [prompt]}
                f.write((", " if i else "") + json.dumps(rec, ensure_ascii=False))
                i += 1
        f.write("]")
    os.replace(tmp, d / "data.json")


def make_train_cache(d, dim):
    """A full teacher cache for data.json (image and caption rows filled with random unit rows, all done)."""
    import numpy as np

    import data
    import record_store
    from embedding_cache import EmbeddingCache
    store = record_store.ensure(d / "data.json", progress=False)
    n, m = len(store), store.n_captions
    counts = dict(image=n, caption=m, attributes=n, prompt_caption=n)
    base = dict(teacher="bench-random", teacher_kind="attributes", logit_scale=None, logit_bias=None,
                dataset=str(d / "data.json"), dataset_sha256=data.dataset_hash(d / "data.json"), multilingual=False,
                preprocessing={})
    path = d / "cache"
    c = EmbeddingCache.create(path, base, counts, dim)
    block = np.random.default_rng(0).standard_normal((65536, dim)).astype(np.float32)
    block = (block / np.linalg.norm(block, axis=1, keepdims=True)).astype(np.float16)
    for f, rows in (("image", n), ("caption", m)):
        arr = np.lib.format.open_memmap(path / f"{f}.npy", mode="r+")
        for a in range(0, rows, len(block)):
            arr[a:a + len(block)] = block[:rows - a]
        arr.flush()
        del arr
        np.save(path / f"{f}.done.npy", np.ones(rows, dtype=bool))
    del c


# ----------------------------------------------------------------------------------------------------------------
# stages (each runs in its own process: python bench/scale.py --stage NAME --dir D)

def _train_args(d, workers, batch):
    import opts
    a = opts.get_args_parser().parse_args(["--data", str(d / "data.json"), "--embedding_path", str(d / "cache"),
                                            "--workers", str(workers), "--batch_size", str(batch)])
    a.world_size, a.rank, a.local_rank, a.distributed, a.device = 1, 0, 0, False, "cpu"
    return a


def _mem(pid="self"):
    """{hwm, rss, pss, anon, file} in MB of one process: VmHWM/VmRSS, and from smaps_rollup the proportional set
    size split into anonymous pages (heap: shared only with our own forks) and file pages (libraries, memory-
    mapped store and cache: page cache, shared with every process mapping them, reclaimable)."""
    out = dict(pss=float("nan"), anon=float("nan"), file=float("nan"))
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k[2:].lower()] = int(v.split()[0]) / 1024
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Pss", "Pss_Anon", "Pss_File"):
                    out[{"Pss": "pss", "Pss_Anon": "anon", "Pss_File": "file"}[k]] = int(v.split()[0]) / 1024
    except OSError:
        pass
    return out


def stage(name, d, args):
    """Run one process's stages; print one STAGE line per row: name, time_s (of that step), hwm_mb (the process's
    peak RSS so far: a rank goes through these steps in this order), note."""
    import numpy as np
    rows = []
    t = time.time()

    def row(step, note="", **extra):
        nonlocal t
        rows.append(dict(name=step, time_s=time.time() - t, hwm_mb=_mem()["hwm"], note=note, **extra))
        t = time.time()

    import data  # noqa: F401  (torch, torchvision, PIL, numpy)
    import main as M
    import record_store
    row("imports", "import data, main (torch, torchvision): the floor of every process")
    if name == "json_old":
        recs = data.load_records(d / "data.json")
        train = data.split_records(recs, 0.1, "train")
        data.split_records(recs, 0.1, "test")
        row("json (old)", f"{len(recs)} records, {len(train)} train: data.load_records + split, each rank before")
    elif name == "build":
        s = record_store.build(d / "data.json", check=args.image_check, progress=False)
        c = s.manifest["counts"]
        row("build store", f"{c['records']} records, {c['captions']} captions, image check "
                           f"{s.manifest['image_check']}; store {_size(Path(s.path)):.0f} MB, JSON "
                           f"{(d / 'data.json').stat().st_size / 2**20:.0f} MB")
    elif name == "rank":  # what main.py does before its first step, one step at a time
        from embedding_cache import EmbeddingCache
        a = _train_args(d, args.workers, args.batch_size)
        records = record_store.ensure(a.data, progress=False)
        cache = EmbeddingCache.open(a.embedding_path, a.data)
        row("open store", f"sha256 of the JSON, mapping the store and the cache: {len(records)} records")
        ds, sampler, train_idx, val_idx, _ = M.build_data(a, records, cache)
        row("Dataset", f"main.build_data: splits, stored image verdict, {len(ds)} train items, "
                       f"{len(val_idx)} val, P x K groups")
        sampler.set_epoch(0)
        it = iter(sampler)
        next(it)
        row("sampler epoch", f"one epoch of {len(sampler)} indices")
        del it
        loader = M.make_loader(a, ds, sampler)
        it = iter(loader)
        batch = next(it)
        mems = [_mem()] + [_mem(w.pid) for w in it._workers]
        tot = {k: sum(m[k] for m in mems) for k in ("hwm", "anon", "file")}
        row("first batch", f"{len(batch['pid'])} items, {len(mems) - 1} workers; rank + workers: heap (PSS anon) "
                           f"{tot['anon']:.0f} MB + mapped files (PSS file) {tot['file']:.0f} MB; peak RSS summed "
                           f"{tot['hwm']:.0f} MB (shared pages counted in each)", tree=tot)
        del it
    elif name == "extract":
        from embedding_cache import FIELDS
        from tools.extract_label import FieldInputs
        s = record_store.ensure(d / "data.json", progress=False)
        row("open store", "sha256 of the JSON and mapping")

        class Teacher:  # what FieldInputs asks of a teacher: the attribute teacher (all four fields are texts)
            kind, multilingual = "attributes", False
        n_pending = 0
        for f in FIELDS:
            inputs = FieldInputs(s, f, Teacher)
            done = np.zeros(len(s) if f != "caption" else s.n_captions, dtype=bool)
            r = inputs.rows
            pending = r[~done[r] & (r % 1 == 0)]
            n_pending += len(pending)
            _ = [inputs[i] for i in pending[:args.batch_size].tolist()]
        row("extract start", f"tools/extract_label.py inputs + pending rows of {len(FIELDS)} fields: {n_pending} rows")
        row("batch write", batch_write(d, args))
    else:
        raise SystemExit(f"error: unknown stage {name}")
    for r in rows:
        print("STAGE " + json.dumps(r))


def _size(folder):
    return sum(p.stat().st_size for p in folder.iterdir()) / 2**20


def _old_write(cache, field, rows, emb):
    """The pre-issue-14 EmbeddingCache.write: flush the whole memmap, rewrite the whole mask atomically."""
    import numpy as np

    from embedding_cache import _atomic_save
    arr = cache.array(field)
    arr[rows] = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    arr.flush()
    done = cache.done(field)
    done[rows] = True
    _atomic_save(cache._done_path(field), done)


def batch_write(d, args):
    import numpy as np

    import record_store
    from embedding_cache import EmbeddingCache
    m = record_store.ensure(d / "data.json", progress=False).n_captions
    base = dict(teacher="t", teacher_kind="x", logit_scale=None, logit_bias=None, dataset="d.json",
                dataset_sha256="ab" * 32, multilingual=False, preprocessing={})
    bs = args.batch_size
    emb = np.random.default_rng(0).standard_normal((bs, args.dim)).astype(np.float32)
    out = []
    for rows_total in (10_000, m):
        per = {}
        for how in ("new", "old"):
            path = d / f"xcache_{rows_total}_{how}"
            c = EmbeddingCache.create(path, base, dict(image=1, caption=rows_total, attributes=1, prompt_caption=1),
                                      args.dim)
            n_b = max(1, min(60, rows_total // bs))
            starts = np.linspace(0, max(0, rows_total - bs), n_b).astype(np.int64)
            t = time.perf_counter()
            for s in starts:
                rows = np.arange(s, min(s + bs, rows_total))
                (c.write if how == "new" else lambda f, r, e: _old_write(c, f, r, e))("caption", rows, emb[:len(rows)])
            per[how] = (time.perf_counter() - t) / n_b * 1000
            c.close()
            for p in path.iterdir():
                p.unlink()
            path.rmdir()
        row_b = bs * (2 * args.dim + 1)  # float16 rows + their done bytes, the same for both
        out.append(f"{rows_total} rows: new {per['new']:.2f} ms ({row_b / 1024:.0f} KB written), old "
                   f"{per['old']:.2f} ms ({(row_b - bs + rows_total) / 1024:.0f} KB: the whole mask) per {bs}-row batch")
    return "; ".join(out)


# ----------------------------------------------------------------------------------------------------------------
# the parent: one process per stage

def run_stage(name, d, args):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--dir", str(d), "--n", str(args.n),
           "--dim", str(args.dim), "--workers", str(args.workers), "--image_check", args.image_check,
           "--batch_size", str(args.batch_size)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise SystemExit(f"error: stage {name} ran past --timeout {args.timeout} s")
    if p.returncode != 0:
        tail = (err.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"error: stage {name} failed (exit {p.returncode}): {tail}")
    return [json.loads(l[6:]) for l in out.splitlines() if l.startswith("STAGE ")]


def run_main(d, args):
    """main.py from start to its first logged step; peak RSS of its process tree sampled every 0.2 s."""
    cmd = [sys.executable, str(ROOT / "main.py"), "--data", str(d / "data.json"), "--embedding_path",
           str(d / "cache"), "--output_dir", str(d / "logs"), "--backbone", "res_tiny", "--text_backbone", "char_tiny",
           "--image_size", "64x32", "--batch_size", str(args.batch_size), "--workers", str(args.workers), "--iters", "50",
           "--log_every", "1", "--eval_every", "0", "--save_every", "100000", "--device", "cpu"]
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    peak, peak_anon, first, tail, t_sample = 0.0, 0.0, None, [], 0.0
    while time.time() - t0 < args.timeout:
        if sel.select(timeout=0.2):
            line = p.stdout.readline()
            if not line:
                break
            tail = (tail + [line.rstrip()])[-5:]
            if "Iter:1|" in line:
                first = time.time() - t0
        if time.time() - t_sample > 0.5 or first is not None:
            tree = _tree_mem(p.pid)
            peak, peak_anon, t_sample = max(peak, tree["rss"]), max(peak_anon, tree["anon"]), time.time()
        if first is not None:
            break
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    if first is None:
        raise SystemExit("error: main.py logged no first step: " + " | ".join(tail))
    return [dict(name="main.py", time_s=first, hwm_mb=peak,
                 note=f"start to the first step, {args.workers} workers; tree heap (PSS anon) at step 1 "
                      f"{tree['anon']:.0f} MB (peak {peak_anon:.0f}), mapped files {tree['file']:.0f} MB; tree RSS "
                      f"peak {peak:.0f} MB (sampled every 0.5 s, shared pages counted in each)")]


def _tree_mem(root):
    """_mem summed over `root` and its descendants (rss, anon, file)."""
    kids = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(e))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = dict(rss=0.0, anon=0.0, file=0.0), [root]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            m = _mem(pid)
        except OSError:
            continue
        for k in total:
            total[k] += m[k]
    return total


def main(args):
    d = Path(args.dir or f"/tmp/scale_{args.n}")
    if args.stage:
        return stage(args.stage, d, args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or args.n < 20:
        raise SystemExit(f"error: --stages must be a comma list of {','.join(STAGES)}; --n >= 20")
    t0 = time.time()
    marker = d / "generated.json"
    want = dict(n=args.n, images=args.images, version=1)
    if not (marker.exists() and json.loads(marker.read_text()) == want):
        generate(d, args.n, args.images)
        marker.write_text(json.dumps(want))
    t_gen = time.time() - t0
    rows = []
    for name in stages:
        if name == "json_old" and args.n > args.baseline_max:
            rows.append(dict(name="json (old)", time_s=None, hwm_mb=None,
                             note=f"skipped above --baseline_max {args.baseline_max}"))
            continue
        if name in ("rank", "main") and not (d / "cache" / "manifest.json").exists():
            t = time.time()
            make_train_cache(d, args.train_dim)
            print(f"(setup: training cache, dim {args.train_dim}, written in {time.time() - t:.0f} s)", flush=True)
        got = run_main(d, args) if name == "main" else run_stage(name, d, args)
        for r in got:
            if r["name"] == "imports" and any(x["name"] == "imports" for x in rows):
                continue  # the floor once is enough
            print(f"{r['name']:14s} {r['time_s']:8.1f} s  {r['hwm_mb']:8.0f} MB  {r['note']}", flush=True)
            rows.append(r)
    load = os.getloadavg()[0]
    print(f"\nrecords and extraction at n = {args.n} ({time.time() - t0:.0f} s in all, {t_gen:.0f} s generating; "
          f"load {load:.1f} on {os.cpu_count()} CPUs)")
    print("| stage | time (s) | peak RSS so far (MB) | notes |\n|---|---|---|---|")
    for r in rows:
        if r["time_s"] is None:
            print(f"| {r['name']} | - | - | {r['note']} |")
        else:
            print(f"| {r['name']} | {r['time_s']:.1f} | {r['hwm_mb']:.0f} | {r['note']} |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
