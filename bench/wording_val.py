"""Query wordings of several checkpoints side by side, on a fresh validation gallery big enough to tell them apart.

The runs' validation split (37 identities, 148 images at the bench's size) moves by +-5 R@1 points between two
neighbouring checkpoints of one run: too few to choose a text recipe by its query-form rows. This script renders a
separate gallery of people drawn with a seed that no training or test data uses (other random draws of the same
generator: never a training image, never a test image), and scores every query set of bench/quality.py on it --
the dataset's captions, the new wordings and the bench/query_forms.py forms -- for each checkpoint, each student
searching its own image embeddings.

    python bench/wording_val.py OLD_RUN/1000.pt NEW_RUN/1000.pt             # 250 people x 4 images, seed 11
    python bench/wording_val.py A/best.pt --ids 100 --seed 12 --json logs/wording_val/a.json
    python bench/wording_val.py A/best.pt --hubness    # + per set: distinct top-1 images, R@1 minus the mean query

--hub_weight W adds, per checkpoint, a column with search/'s hubness correction (search/hubness.py): each gallery
image's hub score against the query bank that export_model.py would write (evaluation_model.query_bank over the
training identities of the checkpoint's --data), results ranked by cosine - W * hub. --data scores the held-out
test identities of a dataset instead of a fresh gallery (the final table's people: a check, not a place to
choose a weight):

    python bench/wording_val.py A/best.pt --hub_weight 0.5
    python bench/wording_val.py A/best.pt --hub_weight 0.5 --data logs/quality/data-1000ids+4000train-s0/synthpedes-dataset.json

--hubness is a diagnosis, not a score: when the words around the attributes (labels, leads) add a near-constant
vector to every query of a form, a few "hub" images come first for all of them; removing the set's mean query
embedding (which uses every query of the set at once, so no deployable search can do it) shows how much of the
form's loss that offset explains.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("query-form R@1 of checkpoints on a fresh validation gallery", add_help=add_help)
    p.add_argument("checkpoints", nargs="+", help="student checkpoints (main.py's .pt files)")
    p.add_argument("--ids", type=int, default=250, help="people in the gallery")
    p.add_argument("--images_per_id", type=int, default=4)
    p.add_argument("--seed", type=int, default=11, help="generator seed; not 0, the seed of the training/test data")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "logs" / "wording_val"), help="gallery folder parent (reused)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="", help="also write the figures here (atomically)")
    p.add_argument("--hub_weight", type=float, default=0.0,
                   help="also score search/'s hubness correction with this weight (0: off; search's default is 0.5)")
    p.add_argument("--query_bank", type=int, default=3000, help="training records of the query bank (as export_model)")
    p.add_argument("--data", default="", help="score this dataset's held-out test identities instead of a fresh "
                                              "gallery (query sets seeded as bench/quality.py: 0)")
    p.add_argument("--hubness", action="store_true",
                   help="also print, per query set, how many distinct images come first and the R@1 with the set's "
                        "mean query embedding removed")
    return p


def gallery(args):
    import quality
    d = Path(args.out) / f"ids{args.ids}x{args.images_per_id}-{args.height}x{args.width}-s{args.seed}"
    return quality.generate(dict(out=str(d), ids=args.ids, images_per_id=args.images_per_id, seed=args.seed,
                                 height=args.height, width=args.width))


def main(args):
    if args.ids < 2 or args.images_per_id < 1:
        raise SystemExit("error: --ids must be >= 2 and --images_per_id >= 1")
    if args.seed == 0 and not args.data:
        raise SystemExit("error: --seed 0 draws the training/test data's own people; use another seed")
    if not 0 <= args.hub_weight < 10:
        raise SystemExit(f"error: --hub_weight must be in [0, 10), got {args.hub_weight}")
    if args.data and not os.path.isfile(args.data):
        raise SystemExit(f"error: --data {args.data}: not found")
    import data as data_lib
    import quality
    from checkpoint import CheckpointError
    from evaluation_model import embed_split, embed_texts
    if args.data:
        records = data_lib.load_records(args.data)
        idx = data_lib.split_records(records, quality.TEST_RATIO, "test")
        sets = quality.query_sets(records, idx, 0)
        where = f"the held-out test identities of {args.data} ({len(idx)} images)"
    else:
        records = data_lib.load_records(str(gallery(args)))
        idx = list(range(len(records)))
        sets = quality.query_sets(records, idx, args.seed)
        where = f"a fresh gallery: {args.ids} people x {args.images_per_id} images, seed {args.seed}"
    results = {}
    for path in args.checkpoints:
        try:
            model, cfg, step = quality.load_student(path, args.device)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        if model.text_only:
            raise SystemExit(f"error: {path} is a text-only student (it has no image tower to enrol the gallery)")
        emb = embed_split(model, records, idx, cfg, device=args.device, langs=("en",), workers=0, progress=False)
        attrs = [records[r]["attributes"] for r in idx]
        q_emb = {name: embed_texts(model, texts, cfg, args.device) for name, (texts, _, _) in sets.items()}
        res = quality.score_sets(sets, lambda name, _: q_emb[name], emb["img_emb"], emb["img_pids"], attrs)
        if args.hub_weight > 0:
            res["hub"] = quality.hub_sets(model, cfg, path, sets, q_emb, emb["img_emb"], emb["img_pids"], attrs,
                                          args.hub_weight, args.query_bank, args.device)
        if args.hubness:
            res.update(hubness(sets, q_emb, emb["img_emb"], emb["img_pids"]))
        results[path] = dict(step=step, **res)
    names = [f"#{i + 1}" for i in range(len(args.checkpoints))]
    print(f"\nR@1 (%) on {where} (fragments: attribute match)")
    for n, p in zip(names, args.checkpoints):
        print(f"  {n}: {p} (step {results[p]['step']})")
    hub = args.hub_weight > 0
    cols = [c for n in names for c in ([n, f"{n}+hub"] if hub else [n])]
    print(f"{'query set':14s}" + "".join(f"{c:>9s}" for c in cols))
    for s in sets:
        key = "attr_r1" if s == "fragment" else "paraphrase_r1"
        print(f"{s:14s}" + "".join(f"{results[p][key][s]:9.2f}" + (f"{results[p]['hub'][key][s]:9.2f}" if hub else "")
                                   for p in args.checkpoints))
    if args.hubness:
        print(f"\ndistinct top-1 images of {len(idx)} / R@1 with the set's mean query removed (a diagnosis)")
        print(f"{'query set':14s}" + "".join(f"{n:>16s}" for n in names))
        for s in sets:
            print(f"{s:14s}" + "".join(f"{results[p]['distinct_top1'][s]:>7d} /{results[p]['r1_mean_removed'][s]:7.2f}"
                                       for p in args.checkpoints))
    if args.json:
        quality.atomic_json(Path(args.json), dict(config=vars(args), results=results))
    return results


def hubness(sets, q_emb, img_emb, img_pids):
    """{"distinct_top1": {set: n}, "r1_mean_removed": {set: R@1 %}} (see the module docstring)."""
    import numpy as np
    import quality
    img = np.asarray(img_emb, np.float32)
    out = {"distinct_top1": {}, "r1_mean_removed": {}}
    for name, (_, pids, _) in sets.items():
        q = np.asarray(q_emb[name], np.float32)
        out["distinct_top1"][name] = int(len(np.unique((q @ img.T).argmax(1)))) if len(q) else 0
        out["r1_mean_removed"][name] = quality.r1(q - q.mean(0, keepdims=True), np.array(pids, np.int64), img,
                                                  img_pids) if len(q) else 0.0
    return out


if __name__ == "__main__":
    main(get_args_parser(add_help=True).parse_args())
