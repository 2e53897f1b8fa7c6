"""Shared enrolment driver for enroll_by_onnx.py and enroll_by_siglip.py (walk, boxes, decode, batch, checkpoint).

Boxes files (`--boxes FILE`), two accepted forms:
  simple:  {"<image path relative to --image-dir>": [[x1, y1, x2, y2], ...], ...}
           (a box may also be {"bbox": [x1, y1, x2, y2], "score": 0.9})
  COCO:    {"images": [{"id": 1, "file_name": "a/b.jpg"}, ...],
            "annotations": [{"image_id": 1, "bbox": [x, y, w, h], "category_id": 1, "score": 0.9?}, ...]}
           only category 1 (person) is used; detections below --min_score are dropped.
With a boxes file only the listed boxes are enrolled (images without boxes are counted, not enrolled); without
one every image is enrolled whole (bbox null). Boxes are clipped to the image; boxes with no area after
clipping are skipped and counted. Files that fail to decode are skipped and counted; all counts end up in one
summary line.
"""
import argparse
import json
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from search.backends import add_backend_args, describe_target, open_enrolment
from search.collection import CollectionError, prefix_paths
from search.engine import clip_bbox
from search.imaging import is_regular_file, open_rgb
from search.index import INDEX_TYPES

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PERSON_CATEGORY = 1


class EnrolError(ValueError):
    """Bad enrolment input; one line for the user."""


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("enrolment", add_help=add_help)
    p.add_argument("--image-dir", "--image_dir", dest="image_dir", required=True,
                   help="folder of gallery images, walked recursively (jpg/jpeg/png/bmp/webp)")
    p.add_argument("--output-prefix", "--output_prefix", dest="output_prefix", default="collection/person",
                   help="writes PREFIX_features.npy and PREFIX_metadata.json (+ PREFIX_index.* for hnsw/ivf)")
    p.add_argument("--boxes", default=None, help="person boxes JSON (simple or COCO form, see the docstring)")
    p.add_argument("--min_score", type=float, default=0.0, help="drop COCO detections scoring below this")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="image decoding threads")
    p.add_argument("--checkpoint_every", type=int, default=20,
                   help="make progress durable every N batches (a killed run resumes from there)")
    p.add_argument("--index", default="auto", choices=INDEX_TYPES,
                   help="faiss index built after enrolment (search/index.py): auto = exact flat (nothing saved) for "
                        "small galleries, else ivf_sq8 tuned to --recall_target")
    p.add_argument("--recall_target", type=float, default=None, help="recall@10 the index is tuned to (0.95)")
    p.add_argument("--rebuild", action="store_true",
                   help="discard the existing collection (required when the model changed)")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: cores, max 8)")
    add_backend_args(p, enrol=True)
    return p


# ------------------------------------------------------------------------------------------- planning
def walk_images(image_dir, skipped=None):
    """Sorted relative '/'-separated paths of image files under image_dir (symlinked dirs are not followed).

    One rule with the web UI (which serves only files inside its root): a symlink resolving outside image_dir is
    not enrolled, nor is anything that is not a regular file (a FIFO named *.jpg would block open() forever);
    both are counted in `skipped` ({"outside_root": n, "not_regular": n}) when a dict is given."""
    out = []
    skipped = {} if skipped is None else skipped
    skipped.setdefault("outside_root", 0)
    skipped.setdefault("not_regular", 0)
    root_real = os.path.realpath(image_dir)
    stack = [image_dir]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
                continue
            if not e.name.lower().endswith(IMAGE_EXTS):
                continue
            if e.is_symlink():
                real = os.path.realpath(e.path)
                if os.path.commonpath([root_real, real]) != root_real:
                    skipped["outside_root"] += 1
                    continue
            if not is_regular_file(e.path):
                skipped["not_regular"] += 1
                continue
            out.append(os.path.relpath(e.path, image_dir).replace(os.sep, "/"))
    return sorted(out)


def _norm_rel(p, image_dir):
    p = str(p).replace("\\", "/")
    if os.path.isabs(p):
        p = os.path.relpath(p, image_dir).replace(os.sep, "/")
    while p.startswith("./"):
        p = p[2:]
    return p


def _as_box(v):
    if isinstance(v, dict):
        v = v.get("bbox")
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        return None
    try:
        b = [float(t) for t in v]
    except (TypeError, ValueError):
        return None
    return b if all(math.isfinite(t) for t in b) else None


def load_boxes(path, image_dir, min_score=0.0):
    """-> ({rel_path: [(bbox_xyxy, source, score|None), ...]}, n_invalid). Raises EnrolError on a bad file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise EnrolError(f"{path}: boxes file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise EnrolError(f"{path}: unreadable boxes file ({e.__class__.__name__}: {e})") from None
    boxes, invalid = {}, 0
    if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO
        if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
            raise EnrolError(f"{path}: COCO 'images' and 'annotations' must be lists")
        names = {}
        for im in data["images"]:
            if isinstance(im, dict) and isinstance(im.get("id"), (int, str)) and isinstance(im.get("file_name"), str):
                names[im["id"]] = _norm_rel(im["file_name"], image_dir)
        for a in data["annotations"]:
            if not isinstance(a, dict) or a.get("category_id", PERSON_CATEGORY) != PERSON_CATEGORY:
                continue
            score = a.get("score")
            if isinstance(score, (int, float)) and score < min_score:
                continue
            b = _as_box(a.get("bbox"))
            iid = a.get("image_id")
            name = names.get(iid) if isinstance(iid, (int, str)) else None  # a list/dict id is malformed
            if b is None or name is None:
                invalid += 1
                continue
            x, y, w, h = b
            boxes.setdefault(name, []).append(([x, y, x + w, y + h], "coco",
                                               float(score) if isinstance(score, (int, float)) else None))
    elif isinstance(data, dict):
        for name, lst in data.items():
            if not isinstance(lst, list):
                invalid += 1
                continue
            rel = _norm_rel(name, image_dir)
            for v in lst:
                b = _as_box(v)
                if b is None:
                    invalid += 1
                    continue
                score = v.get("score") if isinstance(v, dict) else None
                if isinstance(score, (int, float)) and score < min_score:
                    continue
                boxes.setdefault(rel, []).append((b, "boxes", float(score) if isinstance(score, (int, float))
                                                  else None))
    else:
        raise EnrolError(f"{path}: expected {{\"image\": [[x1,y1,x2,y2], ...]}} or a COCO object with "
                         "'images' and 'annotations'")
    return boxes, invalid


def plan(image_dir, boxes=None):
    """-> (tasks [(rel, [item templates])], stats). An item template holds image/bbox_src/source/score."""
    skipped = {}
    rels = walk_images(image_dir, skipped)
    stats = {"images_found": len(rels), "no_boxes": 0, "boxes_missing_image": 0, **skipped}
    tasks = []
    if boxes is None:
        tasks = [(r, [{"image": r, "bbox_src": None, "source": "image"}]) for r in rels]
    else:
        present = set(rels)
        for r in rels:
            bl = boxes.get(r)
            if not bl:
                stats["no_boxes"] += 1
                continue
            its = []
            for b, src, score in bl:
                it = {"image": r, "bbox_src": [round(v, 3) for v in b], "source": src}
                if score is not None:
                    it["score"] = round(score, 4)
                its.append(it)
            tasks.append((r, its))
        stats["boxes_missing_image"] = sum(len(v) for k, v in boxes.items() if k not in present)
    return tasks, stats


def _finalise_item(tpl, bbox, size):
    it = {"image": tpl["image"], "bbox": bbox, "source": tpl["source"], "size": list(size)}
    if "score" in tpl:
        it["score"] = tpl["score"]
    src = tpl.get("bbox_src")
    if src is not None and [float(v) for v in bbox] != [round(float(v), 3) for v in src]:
        it["bbox_src"] = src  # keeps the append/resume key stable when clipping/rounding changed the box
    return it


def _key_template(tpl):
    return {"image": tpl["image"], "bbox": tpl["bbox_src"]}


# ------------------------------------------------------------------------------------------- running
def _decode_task(image_dir, rel, templates, prepare):
    """Worker: decode once, clip every box, prepare each crop. -> (ok [(item, payload)], n_degenerate, error)."""
    try:
        img, _ = open_rgb(os.path.join(image_dir, rel))  # regular files only; 16-bit scaled, not clipped
    except Exception as e:  # noqa: BLE001 - any decoder failure (OSError, SyntaxError, DecompressionBomb...)
        return [], 0, f"{e.__class__.__name__}"
    w, h = img.size
    ok, degen = [], 0
    for tpl in templates:
        if tpl["bbox_src"] is None:
            bbox = None
        else:
            bbox = clip_bbox(tpl["bbox_src"], w, h)
            if bbox is None:
                degen += 1
                continue
        ok.append((_finalise_item(tpl, bbox, (w, h)), prepare(img, bbox)))
    return ok, degen, None


def _lock(prefix):
    """Exclusive advisory lock on PREFIX.lock so two enrolments never interleave their writes."""
    import fcntl

    path = f"{prefix}.lock"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise EnrolError(f"another enrolment is writing {prefix} (lock {path}); wait for it to finish") from None
    return f


def check_args(args):
    if args.batch_size < 1 or args.checkpoint_every < 1 or args.workers < 1 or (getattr(args, "threads", 0) or 1) < 1:
        raise EnrolError("--batch_size, --checkpoint_every, --workers and --threads must be >= 1")
    if not math.isfinite(getattr(args, "min_score", 0.0)):
        raise EnrolError(f"--min_score must be a finite number, got {args.min_score}")
    rt = getattr(args, "recall_target", None)
    if rt is not None and not 0 < rt <= 1:  # also refuses nan
        raise EnrolError(f"--recall_target must be in (0, 1], got {rt}")


def run_enrolment(args, encoder, log=None):
    """encoder: .model_record (dict with kind/signature/space/dim), .dim, .prepare(img, bbox) -> payload,
    .embed(list of payloads) -> float32 [B,D] unit norm. Returns a stats dict."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    image_dir = args.image_dir
    if not os.path.isdir(image_dir):
        raise EnrolError(f"--image-dir {image_dir}: not a directory")
    check_args(args)
    boxes, invalid = (load_boxes(args.boxes, image_dir, args.min_score) if args.boxes else (None, 0))
    tasks, stats = plan(image_dir, boxes)
    stats["invalid_boxes"] = invalid
    lock = _lock(args.output_prefix)  # one writer per collection
    try:
        return _run_locked(args, encoder, log, image_dir, boxes, tasks, stats)
    finally:
        lock.close()


def _run_locked(args, encoder, log, image_dir, boxes, tasks, stats):
    enr = open_enrolment(args, encoder.model_record, log=log)
    try:
        return _enrol(args, encoder, log, image_dir, boxes, tasks, stats, enr)
    finally:
        getattr(enr, "close", lambda: None)()


def _enrol(args, encoder, log, image_dir, boxes, tasks, stats, enr):
    existing = enr.total
    todo, seen = [], set()
    for rel, tpls in tasks:
        left = []
        for t in tpls:  # skip entries already enrolled and duplicate boxes within the boxes file
            k = json.dumps(_key_template(t))
            if k not in seen and not enr.has(_key_template(t)):
                seen.add(k)
                left.append(t)
        if left:
            todo.append((rel, left))
    n_todo = sum(len(t) for _, t in todo)
    if stats["images_found"] == 0 and existing == 0:
        raise EnrolError(f"--image-dir {image_dir}: no images ({'/'.join(e[1:] for e in IMAGE_EXTS)}) found")
    stats.update(existing=existing, new=0, undecodable=0, degenerate=0)
    t0 = time.perf_counter()
    try:
        from tqdm import tqdm
        bar = tqdm(total=n_todo, unit="img" if boxes is None else "box", disable=None, mininterval=1.0,
                   dynamic_ncols=True)
    except ImportError:  # tqdm is optional on a bare device
        bar = None
    batch_items, batch_payload, n_batches = [], [], 0

    def flush():
        nonlocal batch_items, batch_payload, n_batches
        if not batch_items:
            return
        feats = encoder.embed(batch_payload)
        if hasattr(encoder, "annotate"):  # per-entry extras the encoder derives from the features (hub scores)
            encoder.annotate(feats, batch_items)
        enr.add(feats, batch_items)
        stats["new"] += len(batch_items)
        n_batches += 1
        if n_batches % args.checkpoint_every == 0:
            enr.checkpoint()
        batch_items, batch_payload = [], []

    try:
        with ThreadPoolExecutor(max_workers=args.workers) as ex:
            it = iter(todo)
            pending = deque()
            for rel, tpls in it:  # bounded read-ahead: decoding overlaps inference without unbounded memory
                pending.append((tpls, ex.submit(_decode_task, image_dir, rel, tpls, encoder.prepare)))
                if len(pending) >= args.workers * 4:
                    break
            while pending:
                tpls, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt[1], ex.submit(_decode_task, image_dir, nxt[0], nxt[1], encoder.prepare)))
                ok, degen, err = fut.result()
                if err:
                    stats["undecodable"] += 1
                stats["degenerate"] += degen
                for item, payload in ok:
                    batch_items.append(item)
                    batch_payload.append(payload)
                    if len(batch_items) >= args.batch_size:
                        flush()
                if bar is not None:
                    bar.update(len(tpls))
            flush()
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        enr.checkpoint()
        log(f"interrupted: {stats['new']} new entries are checkpointed in {prefix_paths(args.output_prefix)['partial']}"
            "; re-run the same command to resume")
        raise SystemExit(130)
    if bar is not None:
        bar.close()
    total = enr.finish()
    if getattr(args, "prune", False):  # entries whose image file is gone from --image-dir
        stats["pruned"] = enr.prune(set(walk_images(image_dir)))
        total = enr.total
    stats["total"] = total
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _plural(what):
    return {"undecodable file": "undecodable files", "degenerate box": "degenerate boxes",
            "malformed box": "malformed boxes", "image without boxes": "images without boxes",
            "box of a missing image": "boxes of missing images",
            "link pointing outside the image folder": "links pointing outside the image folder",
            "file that is not a regular file": "files that are not regular files"}[what]


def summary_line(stats, prefix, target=None):
    parts = [f"enrolled {stats['new']} new entries ({stats['existing']} already present, {stats['total']} total) "
             f"in {stats['seconds']:.1f} s -> {target or prefix_paths(prefix)['features']}"]
    if stats.get("pruned"):
        parts[0] += f"; pruned {stats['pruned']} entries of deleted images"
    skipped = []
    for key, what in (("undecodable", "undecodable file"), ("degenerate", "degenerate box"),
                      ("invalid_boxes", "malformed box"), ("no_boxes", "image without boxes"),
                      ("boxes_missing_image", "box of a missing image"),
                      ("outside_root", "link pointing outside the image folder"),
                      ("not_regular", "file that is not a regular file")):
        n = stats.get(key, 0)
        if n:
            skipped.append(f"{n} {what if n == 1 else _plural(what)}")
    return parts[0] + ("; skipped " + ", ".join(skipped) if skipped else "")


def main_common(args, make_encoder):
    """Shared main: build the encoder, enrol, build the index, print one summary line. Exit 2 on bad input."""
    from search.engine import ExportError
    from search.collection import load_collection
    from search.index import choose_index, get_index

    try:
        check_args(args)  # before the (possibly large) model loads
        encoder = make_encoder(args)
        stats = run_enrolment(args, encoder)
        print(summary_line(stats, args.output_prefix, describe_target(args)), flush=True)
        kind = choose_index(args.index, stats["total"], encoder.dim)
        if kind != "flat" and stats["total"] and args.backend == "faiss":  # Milvus indexes its rows itself
            p = prefix_paths(args.output_prefix)
            coll = load_collection(p["features"], p["metadata"])
            get_index(coll.features, args.output_prefix, args.index, recall_target=args.recall_target,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    except (EnrolError, CollectionError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return stats
