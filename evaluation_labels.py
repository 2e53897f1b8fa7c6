"""The teacher's own verification table and retrieval, from the teacher cache alone (no model, no GPU): how good the
labels the student distils from are -- the seed README's `python evaluation_labels.py` figures.

    python evaluation_labels.py --data SYNTH-PEDES/synthpedes-dataset.json --embedding_path embeddings
    python evaluation_labels.py --data data.json --embedding_path embeddings --split all --langs en,zh --json t.json
    python evaluation_labels.py --data data.json --embedding_path embeddings --image_field attributes

Pairs as in metrics.verification: an image with its own captions is a positive, an image with a caption of another
identity a negative. Images = the split's records whose image row is done in the cache; captions = those records'
caption rows (metrics' order: data.caption_rows) in --langs that are done. Printed: the seed's EER/FAR table, the
Top-K false rejects/accepts (`<id>/<file_path>` and `<id>/<file_path>_caption`), text->image and image->text
retrieval. --json writes every figure (atomically). --image_field attributes / prompt_caption puts that cache field
(the record's attribute string / prompt caption, embedded as text) on the image side. (A cache of the attribute
teacher, `--teacher attributes`, already stores the attribute text in its image field.)
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import data as data_lib
import metrics

FIELD_CHOICES = ("image", "attributes", "prompt_caption")


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("Evaluate the teacher cache", add_help=add_help)
    p.add_argument("--data", required=True, help="dataset JSON the cache was built for")
    p.add_argument("--embedding_path", default="embeddings", help="teacher cache folder (tools/extract_label.py)")
    p.add_argument("--image_root", default=None, help="image folder (only used to resolve paths; no image is read)")
    p.add_argument("--split", choices=["test", "all"], default="test",
                   help="test: the held-out identities (data.split_records); all: every record")
    p.add_argument("--test_ratio", type=float, default=0.1, help="identity hold-out when the JSON has no split")
    p.add_argument("--langs", default="en", help="caption languages, comma-separated: en, zh or en,zh")
    p.add_argument("--image_field", choices=FIELD_CHOICES, default="image",
                   help="cache field on the image side (attributes / prompt_caption: that text, embedded)")
    p.add_argument("--max_images", type=int, default=0,
                   help="evaluate only the split's first N images (with an embedding) and their captions; 0 = all")
    p.add_argument("--top_k", type=int, default=15, help="length of the false reject / false accept lists")
    p.add_argument("--block", type=int, default=metrics.DEFAULT_BLOCK, help="scores held in memory at once")
    p.add_argument("--json", default=None, help="write every figure to this file")
    return p


def _fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def select_rows(records, indices, img_done, cap_done, langs):
    """Image rows (record indices with a done image row) and caption rows (done, in langs) of the given records,
    with ids, the caption -> image position map (-1: the caption's image has no embedding) and names."""
    img_rows = [r for r in indices if img_done[r]]
    pos = {r: k for k, r in enumerate(img_rows)}
    caps = [c for c in data_lib.eval_captions(records, indices, langs=langs) if cap_done[c[0]]]
    offsets = data_lib.caption_offsets(records)
    return dict(
        img_rows=np.array(img_rows, np.int64),
        img_pids=np.array([records[r]["id"] for r in img_rows], np.int64),
        img_names=[f"{records[r]['id']}/{records[r]['file_path']}" for r in img_rows],
        cap_rows=np.array([c[0] for c in caps], np.int64),
        cap_pids=np.array([c[1] for c in caps], np.int64),
        cap_img_index=np.array([pos.get(c[2], -1) for c in caps], np.int64),
        cap_names=[f"{records[c[2]]['id']}/{records[c[2]]['file_path']}_caption{int(c[0] - offsets[c[2]])}"
                   for c in caps],  # the caption's index in its record: two captions never share a name
        cap_texts=[c[3] for c in caps],
    )


def main(args):
    from embedding_cache import CacheMismatchError, EmbeddingCache
    langs = tuple(s.strip() for s in args.langs.split(",") if s.strip())
    bad = [s for s in langs if s not in data_lib.LANGS]
    if not langs or bad:
        _fail(f"--langs must be a comma-separated subset of {','.join(data_lib.LANGS)}, got {args.langs!r}")
    if args.top_k < 0 or args.max_images < 0:
        _fail(f"--top_k and --max_images must be >= 0, got {args.top_k} and {args.max_images}")
    if args.block < 1:
        _fail(f"--block must be >= 1, got {args.block}")
    try:
        records = data_lib.load_records(args.data, args.image_root)
        indices = list(range(len(records))) if args.split == "all" else \
            data_lib.split_records(records, args.test_ratio, "test")
    except ValueError as e:  # DatasetError and a bad --test_ratio
        _fail(e)
    if not os.path.isdir(args.embedding_path):
        _fail(f"{args.embedding_path}: no such folder (build the teacher cache with tools/extract_label.py)")
    try:
        cache = EmbeddingCache.open(args.embedding_path, data_json=args.data)
        img_done, cap_done = cache.done(args.image_field), cache.done("caption")
    except (CacheMismatchError, OSError) as e:
        _fail(e)
    if args.max_images:
        indices = [r for r in indices if img_done[r]][:args.max_images]
    where = f"split '{args.split}' ({len(indices)} records) of {args.data}"
    if not len(indices):
        _fail(f"{where}: no records (try --split all or a larger --test_ratio)")
    sel = select_rows(records, indices, img_done, cap_done, langs)
    if not len(sel["img_rows"]):
        _fail(f"{where}: no {args.image_field} rows with a teacher embedding in {args.embedding_path}")
    if not len(sel["cap_rows"]):
        _fail(f"{where}: no {','.join(langs)} caption rows with a teacher embedding in {args.embedding_path}")
    n_ids = len(set(sel["img_pids"].tolist()))
    m = cache.manifest
    print(f"teacher {m.get('teacher')} ({m.get('teacher_kind')}), field {args.image_field}: "
          f"{len(sel['img_rows'])} images, {len(sel['cap_rows'])} captions ({','.join(langs)}), "
          f"{n_ids} identities, split={args.split}")
    n_missing_img = len(indices) - len(sel["img_rows"])
    if n_missing_img:
        print(f"({n_missing_img} records of the split have no {args.image_field} embedding; their captions stay "
              f"as negatives and queries)")

    t0 = time.time()
    img_emb = np.asarray(cache.array(args.image_field)[sel["img_rows"]])  # float16 copies of just these rows
    cap_emb = np.asarray(cache.array("caption")[sel["cap_rows"]])
    try:
        res = metrics.evaluate_embeddings(img_emb, cap_emb, sel["cap_img_index"], sel["img_pids"], sel["cap_pids"],
                                          top_k=args.top_k, block=args.block, normalize=True,
                                          progress=len(img_emb) * len(cap_emb) > 5e8)
    except ValueError as e:  # e.g. no positive pair: every selected caption lost its image
        _fail(f"{where}: {e}")
    v = res["verification"]
    print(metrics.format_verification_table(v))
    print(metrics.format_error_lists(v, sel["img_names"], sel["cap_names"], args.top_k))
    print(metrics.format_retrieval(res["t2i"], res["i2t"]))
    print(f"({time.time() - t0:.1f}s)")

    if args.json:
        def names(lst):
            return [dict(img=sel["img_names"][i], caption=sel["cap_names"][j], caption_row=int(sel["cap_rows"][j]),
                         text=sel["cap_texts"][j], score=s) for i, j, s in lst]
        out = {"data": os.path.abspath(args.data), "embedding_path": os.path.abspath(args.embedding_path),
               "teacher": m.get("teacher"), "image_field": args.image_field, "split": args.split,
               "test_ratio": args.test_ratio, "langs": list(langs), "n_images": len(sel["img_rows"]),
               "n_captions": len(sel["cap_rows"]), "n_identities": n_ids, **metrics.to_jsonable(res),
               "false_rejects_named": names(v["false_rejects"]), "false_accepts_named": names(v["false_accepts"])}
        tmp = f"{args.json}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(metrics.to_jsonable(out), f, indent=2, ensure_ascii=False)
            os.replace(tmp, args.json)
        except OSError as e:
            _fail(f"cannot write {args.json}: {e}")
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    parser = argparse.ArgumentParser("evaluation_labels.py", parents=[get_args_parser()], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    main(parser.parse_args())
