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
import json

import numpy as np
import torch

import data as data_lib
import metrics
from checkpoint import load_checkpoint
from model import build_model
from search.charmap import encode_batch


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
    return p


@torch.no_grad()
def embed_texts(model, texts, cfg, device, batch_size=256):
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode_batch(texts[i:i + batch_size], max_len=cfg["max_seq_length"], vocab_size=cfg["vocab_size"])
        out.append(model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)).float().cpu())
    d = model.cfg["feature_dim"]
    return torch.cat(out).numpy() if out else np.zeros((0, d), np.float32)


@torch.no_grad()
def embed_split(model, records, indices, cfg, device="cpu", langs=("en",), batch_size=128, workers=2,
                progress=True, images=True):
    """Embeddings of the given records' images and captions, row-aligned with ids and names for the metrics."""
    from tqdm import tqdm
    device = torch.device(device)
    indices = list(indices)
    pos = {r: k for k, r in enumerate(indices)}
    caps = data_lib.eval_captions(records, indices, langs=langs)
    out = {
        "img_records": indices,
        "img_pids": np.array([records[i]["id"] for i in indices], np.int64),
        "img_names": [f"{records[i]['id']}/{records[i]['file_path']}" for i in indices],
        "cap_rows": np.array([c[0] for c in caps], np.int64),
        "cap_pids": np.array([c[1] for c in caps], np.int64),
        "cap_img_index": np.array([pos[c[2]] for c in caps], np.int64),
        "cap_names": [f"{records[c[2]]['id']}/{records[c[2]]['file_path']}_caption" for c in caps],
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
    out["cap_emb"] = embed_texts(model, out["cap_texts"], cfg, device, batch_size=max(batch_size, 256))
    return out


def main(args):
    if min(args.max_images, args.max_ids) < 0:
        raise SystemExit(f"error: --max_images and --max_ids must be >= 0, got {args.max_images}, {args.max_ids}")
    try:
        ckpt = load_checkpoint(args.checkpoint)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    targs, cfg = ckpt.get("args", {}), ckpt["model_cfg"]
    data_json = args.data or targs.get("data")
    image_root = args.image_root or targs.get("image_root")
    test_ratio = args.test_ratio if args.test_ratio is not None else targs.get("test_ratio", 0.1)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        records = data_lib.load_records(data_json, image_root)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()

    idx = list(range(len(records))) if args.split == "all" else data_lib.split_records(records, test_ratio, "test")
    teacher_cache = None
    if cfg.get("text_only"):
        # the gallery is the teacher's image embeddings of the held-out records
        from embedding_cache import EmbeddingCache
        try:
            cache = EmbeddingCache.open(args.embedding_path or targs.get("embedding_path"), data_json)
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: {e}")
        done = cache.done("image")
        idx = [i for i in idx if done[i]]
        teacher_cache = cache
    else:
        ok, n_missing, n_corrupt = data_lib.check_images([records[i] for i in idx])
        if n_missing or n_corrupt:
            print(data_lib.format_skip_summary(n_missing, n_corrupt))
        idx = [idx[k] for k in ok]
    if not idx:
        raise SystemExit("error: no evaluable images in the selected split")
    if args.max_images or args.max_ids:  # a seeded sample, for galleries like the full SYNTH-PEDES test split
        n_all = len(idx)
        idx = [idx[k] for k in metrics.sample_gallery([records[i]["id"] for i in idx], args.max_images,
                                                       args.max_ids, args.sample_seed)]
        print(f"sample (seed {args.sample_seed}): {len(idx)} of {n_all} images")
    langs = tuple(s for s in args.langs.split(",") if s)
    emb = embed_split(model, records, idx, cfg, device=device, langs=langs, batch_size=args.batch_size,
                      workers=args.workers)
    if teacher_cache is not None:
        emb["img_emb"] = np.asarray(teacher_cache.array("image")[idx], dtype=np.float32)
    if len(emb["cap_texts"]) == 0:
        raise SystemExit(f"error: the selected split has no captions in languages {args.langs}")
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
    if args.json:
        out = {"checkpoint": args.checkpoint, "split": args.split, "langs": args.langs,
               "n_images": len(idx), "n_captions": len(emb["cap_texts"]), **metrics.to_jsonable(res)}
        tmp = f"{args.json}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    parser = argparse.ArgumentParser("evaluation_model.py", parents=[get_args_parser()], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    main(parser.parse_args())
