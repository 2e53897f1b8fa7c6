"""Evaluate a trained student on the held-out identities: the seed's EER/FAR table, retrieval, error lists.

    python evaluation_model.py logs/expModel-res_tiny-224x112-512/1/last.pt
    python evaluation_model.py <ckpt> --data SYNTH-PEDES/synthpedes-dataset.json --langs zh --json eval.json
    python evaluation_model.py <ckpt> --data SYNTH-PEDES/synthpedes-dataset.json --max_ids 10000   # a seeded sample
A --text_only student lives in the teacher's space: its captions are matched against the teacher's image cache
(the gallery a teacher-enrolled search would hold):
    python evaluation_model.py <text_only ckpt> --embedding_path embeddings

Positives are an image with its own captions; negatives an image with captions of other identities.
"""
import os

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared or oversubscribed CPU,
# spinning made small training steps up to 13x slower (bench/speed.py); on a dedicated GPU box it costs nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import argparse
import functools
import json

import numpy as np
import torch

import data as data_lib
import metrics
from checkpoint import load_checkpoint
from cli import HelpFormatter, fail
from model import build_model
from search.charmap import encode_batch
from search.query_words import QueryVocab, prepare_query


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("Evaluate a student checkpoint", add_help=add_help)
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="dataset JSON (default: the one the checkpoint was trained on)")
    p.add_argument("--image_root", default=None)
    p.add_argument("--embedding_path", default=None,
                   help="teacher cache; needed for --text_only students (default: the training one)")
    p.add_argument("--split", choices=["test", "all"], default="test")
    p.add_argument("--test_ratio", type=float, default=None, help="default: the training run's")
    p.add_argument("--langs", default="en", help="caption languages to evaluate, e.g. en, zh or en,zh")
    p.add_argument("--top_k", type=int, default=15)
    p.add_argument("--query_filter", type=int, choices=(0, 1), default=1,
                   help="1: captions lose field labels and the words the student never saw, as search/ queries "
                        "do (search/query_words.py; a checkpoint without a word list keeps every word); 0: as written")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--max_ids", type=int, default=0,
                   help="evaluate a seeded random sample of N identities of the split (all their images); 0 = all")
    p.add_argument("--max_images", type=int, default=0, help="then a seeded random sample of N of those images")
    p.add_argument("--sample_seed", type=int, default=0, help="seed of the --max_ids / --max_images sample")
    p.add_argument("--precision", choices=metrics.PRECISIONS, default="auto",
                   help="score precision (metrics.py): auto = bf16 matrix units from 2^30 pairs on, where supported")
    p.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write det.png (ROC/DET, with the teacher when its cache is there), retrieval.png (a few "
                        "queries with their top-5 images) and learning_curve.png (from the run's train.log) to "
                        "DIR, and add them to the run's TensorBoard")
    p.add_argument("--plot_queries", type=int, default=6, help="queries on the retrieval sheet")
    return p


@functools.lru_cache(maxsize=4)
def _query_vocab(words):
    return QueryVocab(words)


def query_filter(cfg):
    """The checkpoint's query clean-up (search/query_words.prepare_query): text -> text; labels only for a
    checkpoint written before the student stored its word list."""
    words = cfg.get("query_vocab")
    vocab = _query_vocab(tuple(words)) if words else None
    return lambda t: prepare_query(t, vocab)


@torch.no_grad()
def embed_texts(model, texts, cfg, device, batch_size=256, filter_queries=True):
    """Query embeddings; `filter_queries`: strip field labels and drop the words the student never saw first (as
    search/ does)."""
    if filter_queries:
        f = query_filter(cfg)
        texts = [f(t) for t in texts]
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode_batch(texts[i:i + batch_size], max_len=cfg["max_seq_length"], vocab_size=cfg["vocab_size"])
        out.append(model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)).float().cpu())
    d = model.cfg["feature_dim"]
    return torch.cat(out).numpy() if out else np.zeros((0, d), np.float32)


def query_bank(model, cfg, records, indices, n=3000, seed=0, device="cpu"):
    """The hubness correction's query bank (search/hubness.py): float32 [N, D] unit rows, the student's embeddings
    of captions.query_bank_texts over up to n of `records[indices]` (training identities: the bank must never
    see the people it is used on), filtered as search/ filters a query."""
    import captions as captions_lib
    recs = [records[i] for i in indices]
    step = max(1, len(recs) // 20_000)
    words = captions_lib.filler_words(captions_lib.caption_vocabulary(c for r in recs[::step] for c in r["captions"]))
    texts = captions_lib.query_bank_texts(recs, n, seed, words)
    if not texts:
        return np.zeros((0, model.cfg["feature_dim"]), np.float32)
    emb = embed_texts(model, texts, cfg, device).astype(np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def training_query_bank(model, cfg, data_json, train_args, n=3000, image_root=None, device="cpu"):
    """(query_bank over the training identities of `data_json`, split as the checkpoint's run split it:
    its test_ratio and val_ratio, n_training_records). Raises OSError / ValueError on an unusable dataset."""
    records = data_lib.load_records(str(data_json), image_root or train_args.get("image_root"))
    train_idx = data_lib.split_records(records, float(train_args.get("test_ratio", 0.1)), "train",
                                       float(train_args.get("val_ratio", 0.0) or 0.0))
    return query_bank(model, cfg, records, train_idx, n, device=device), len(train_idx)


@torch.no_grad()
def embed_split(model, records, indices, cfg, device="cpu", langs=("en",), batch_size=128, workers=2,
                progress=True, images=True, filter_queries=True):
    """Embeddings of the given records' images and captions, row-aligned with ids and names for the metrics."""
    from tqdm import tqdm
    device = torch.device(device)
    indices = list(indices)
    pos = {r: k for k, r in enumerate(indices)}
    caps = data_lib.eval_captions(records, indices, langs=langs)
    offsets = data_lib.caption_offsets(records)
    out = {
        "img_records": indices,
        "img_pids": np.array([records[i]["id"] for i in indices], np.int64),
        "img_names": [f"{records[i]['id']}/{records[i]['file_path']}" for i in indices],
        "cap_rows": np.array([c[0] for c in caps], np.int64),
        "cap_pids": np.array([c[1] for c in caps], np.int64),
        "cap_img_index": np.array([pos[c[2]] for c in caps], np.int64),
        "cap_names": [caption_name(records, offsets, c) for c in caps],
        "cap_texts": [c[3] for c in caps],
    }
    if images and not model.text_only:
        ds = data_lib.EvalImages(records, indices, image_size=tuple(cfg["image_size"]), mean=cfg["mean"],
                                 std=cfg["std"])
        dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
        embs = []
        for x in tqdm(dl, desc="images", disable=not progress):
            embs.append(model.encode_image(x.to(device)).float().cpu())
        out["img_emb"] = torch.cat(embs).numpy()
    out["cap_emb"] = embed_texts(model, out["cap_texts"], cfg, device, batch_size=max(batch_size, 256),
                                 filter_queries=filter_queries)
    return out


def caption_name(records, offsets, cap):
    """`<id>/<file_path>_caption<k>`, k = the caption's index within its record (en first, then zh): unique, so
    an image's two captions never print as the same name in the error lists."""
    row, _, r = cap[0], cap[1], cap[2]
    return f"{records[r]['id']}/{records[r]['file_path']}_caption{int(row - offsets[r])}"


def main(args):
    import opts
    opts.validate_args(args)  # the flags this script shares with main.py: same ranges, same messages
    if min(args.max_images, args.max_ids) < 0:
        fail(f"--max_images and --max_ids must be >= 0, got {args.max_images}, {args.max_ids}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        fail(f"--json {args.json}: its folder does not exist")
    try:
        ckpt = load_checkpoint(args.checkpoint)
    except ValueError as e:
        fail(e)
    targs, cfg = ckpt.get("args", {}), ckpt["model_cfg"]
    if not isinstance(targs, dict):
        targs = {}
    data_json = args.data or targs.get("data")
    image_root = args.image_root or targs.get("image_root")
    test_ratio = args.test_ratio if args.test_ratio is not None else targs.get("test_ratio", 0.1)
    if type(test_ratio) not in (int, float) or not 0 <= test_ratio <= 1:
        fail(f"{args.checkpoint}: its test_ratio {test_ratio!r:.40} is not a number in [0, 1]; pass --test_ratio")
    if not isinstance(data_json, (str, type(None))) or not isinstance(image_root, (str, type(None))):
        fail(f"{args.checkpoint}: its data / image_root are not paths; pass --data and --image_root")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not data_json:
        fail(f"{args.checkpoint}: records no dataset; pass --data")
    try:
        records = data_lib.load_records(data_json, image_root)
    except (ValueError, OSError) as e:
        fail(e)
    try:  # cfg and weights come from the file: any inconsistency is one line, not a traceback
        model = build_model(cfg)
        model.load_state_dict(ckpt["model"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        fail(f"{args.checkpoint}: cannot rebuild the model from it: {' '.join(lines[:2])[:300]}")
    model.to(device).eval()

    idx = list(range(len(records))) if args.split == "all" else data_lib.split_records(records, test_ratio, "test")
    teacher_cache = None
    if cfg.get("text_only"):
        # the gallery is the teacher's image embeddings of the held-out records
        from embedding_cache import EmbeddingCache
        try:
            cache = EmbeddingCache.open(args.embedding_path or targs.get("embedding_path"), data_json)
        except (ValueError, OSError) as e:
            fail(e)
        done = cache.done("image")
        idx = [i for i in idx if done[i]]
        teacher_cache = cache
    else:
        ok, n_missing, n_corrupt = data_lib.check_images([records[i] for i in idx])
        if n_missing or n_corrupt:
            print(data_lib.format_skip_summary(n_missing, n_corrupt))
        idx = [idx[k] for k in ok]
    if not idx:
        fail("no evaluable images in the selected split")
    if args.max_images or args.max_ids:  # a seeded sample, for galleries like the full SYNTH-PEDES test split
        n_all = len(idx)
        idx = [idx[k] for k in metrics.sample_gallery([records[i]["id"] for i in idx], args.max_images,
                                                       args.max_ids, args.sample_seed)]
        print(f"sample (seed {args.sample_seed}): {len(idx)} of {n_all} images")
    langs = tuple(s for s in args.langs.split(",") if s)
    emb = embed_split(model, records, idx, cfg, device=device, langs=langs, batch_size=args.batch_size,
                      workers=args.workers, filter_queries=bool(args.query_filter))
    if teacher_cache is not None:
        emb["img_emb"] = np.asarray(teacher_cache.array("image")[idx], dtype=np.float32)
    if len(emb["cap_texts"]) == 0:
        fail(f"the selected split has no captions in languages {args.langs}")
    print(f"{len(idx)} images, {len(emb['cap_texts'])} captions ({args.langs}), "
          f"{len(set(emb['img_pids'].tolist()))} identities, split={args.split}")
    n_pairs = len(emb["img_emb"]) * len(emb["cap_emb"])
    print(f"scoring {n_pairs:,} image-caption pairs once (verification + both retrieval directions), precision "
          f"{metrics.pick_precision(args.precision, n_pairs)}")
    res = metrics.evaluate_embeddings(emb["img_emb"], emb["cap_emb"], emb["cap_img_index"], emb["img_pids"],
                                      emb["cap_pids"], top_k=args.top_k, precision=args.precision, progress=True)
    print(metrics.format_verification_table(res["verification"]))
    print(metrics.format_error_lists(res["verification"], emb["img_names"], emb["cap_names"], args.top_k))
    print(metrics.format_retrieval(res["t2i"], res["i2t"]))
    if cfg.get("text_only"):
        print("(text-only student: captions by the student, gallery = the teacher's image cache)")
    if args.plots:
        write_plots(args, ckpt, cfg, records, idx, emb, data_json)
    if args.json:
        out = {"checkpoint": args.checkpoint, "split": args.split, "langs": args.langs,
               "n_images": len(idx), "n_captions": len(emb["cap_texts"]), **metrics.to_jsonable(res)}
        tmp = f"{args.json}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(out, f, indent=2)
            os.replace(tmp, args.json)
        except OSError as e:
            fail(f"cannot write {args.json}: {e.strerror or e}")
        print(f"wrote {args.json}")
    return res


def retrieval_rows(emb, records, n_queries=6, k=5, seed=0, gallery_images=None):
    """[(query, [(image, score, hit)])] for a retrieval sheet: the first caption of n seeded held-out ids."""
    import random
    first = {}
    for j, pid in enumerate(emb["cap_pids"].tolist()):
        first.setdefault(pid, j)
    picks = sorted(random.Random(seed).sample(sorted(first), min(n_queries, len(first))))
    rows = []
    for pid in picks:
        j = first[pid]
        s = emb["img_emb"] @ emb["cap_emb"][j]
        top = np.argsort(-s, kind="stable")[:k]
        imgs = gallery_images or [records[r]["image_path"] for r in emb["img_records"]]
        rows.append((emb["cap_texts"][j], [(imgs[t], float(s[t]), bool(emb["img_pids"][t] == pid)) for t in top]))
    return rows


def write_plots(args, ckpt, cfg, records, idx, emb, data_json):
    """det.png, retrieval.png, learning_curve.png into args.plots, and into the run's TensorBoard as images."""
    from pathlib import Path
    import plots
    out = Path(args.plots)
    curves = {"student": plots.det_curve(emb["img_emb"], emb["cap_emb"], emb["cap_img_index"], emb["img_pids"],
                                         emb["cap_pids"])}
    emb_path = args.embedding_path or ckpt.get("args", {}).get("embedding_path")
    try:  # the teacher's curve on the same pairs, from its cache, when the cache is at hand
        from embedding_cache import EmbeddingCache
        cache = EmbeddingCache.open(emb_path, data_json)
        if cache.done("image")[idx].all() and cache.done("caption")[emb["cap_rows"]].all():
            curves = {"teacher": teacher_det_curve(cache, emb), **curves}
    except (ValueError, OSError, TypeError) as e:
        print(f"(det.png without the teacher: {str(e).splitlines()[0] if str(e) else type(e).__name__})")
    rows = None if cfg.get("text_only") else retrieval_rows(emb, records, args.plot_queries)
    return save_plots(out, curves, rows, Path(args.checkpoint).resolve().parent, int(ckpt.get("step", 0)))


def teacher_det_curve(cache, emb):
    """(far, frr) of the teacher's cache rows on exactly the student's evaluation pairs."""
    import plots
    t_img = np.asarray(cache.array("image")[emb["img_records"]], np.float32)
    t_cap = np.asarray(cache.array("caption")[emb["cap_rows"]], np.float32)
    return plots.det_curve(t_img, t_cap, emb["cap_img_index"], emb["img_pids"], emb["cap_pids"])


def save_plots(out, curves, rows, run_dir, step):
    """det.png from curves {label: (far, frr)}, retrieval.png from rows (None: skipped), learning_curve.png from
    run_dir/train.log; each also into run_dir's TensorBoard as an image. -> {name: path}"""
    from pathlib import Path
    import plots
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"det": plots.plot_det(curves, out / "det.png")}
    if rows:
        files["retrieval"] = plots.plot_retrieval_sheet(rows, out / "retrieval.png")
    log = Path(run_dir) / "train.log"
    points = plots.read_eval_log(log) if log.exists() else {}
    files["learning_curve"] = plots.plot_learning_curve(points, out / "learning_curve.png")
    try:
        from torch.utils.tensorboard import SummaryWriter
        w = SummaryWriter(str(run_dir))
        for name, f in files.items():
            w.add_image(f"plots/{name}", plots.png_to_array(f), step, dataformats="HWC")
        w.close()
    except (OSError, ImportError) as e:
        print(f"(plots not added to TensorBoard: {e})")
    print("wrote " + ", ".join(files.values()))
    return files


if __name__ == "__main__":
    parser = argparse.ArgumentParser("evaluation_model.py", parents=[get_args_parser()], description=__doc__,
                                     formatter_class=HelpFormatter)
    main(parser.parse_args())
