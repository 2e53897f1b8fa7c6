"""How far a pixel-only student can get, and how far it overfits: the evidence behind the README "Results" gap.

    python bench/pixel_bound.py                                  # the bench's data and cache (logs/quality)
    python bench/pixel_bound.py --checkpoint logs/quality/logs/expModel-res_tiny-128x64-256/<run>/best.pt
    python bench/pixel_bound.py --data D/synthpedes-dataset.json --embedding_path E --split val --json bound.json

The offline attribute teacher is privileged: its image row is the text of the ground-truth attributes. Gender is
one of those words, but the synthetic renderer draws it only through a slightly narrower build and the clothes and
hair that are more common for one gender (tools/make_synthetic_pedes.py), so pixels cannot always tell it. This
script scores text->image retrieval (the teacher's cached caption rows as queries) against three galleries of the
same held-out images:
  teacher           the cached image rows (what bench/quality.py reports)
  no gender         the attribute text without its gender word, re-embedded (a student that sees everything
                    else perfectly and says nothing about gender)
  gender guessed    the gender word replaced by the more likely gender given hair, garments and bag under the
                    generator's own frequency tables (a student that sees everything else and guesses gender)
With --checkpoint it also scores that student on the split and on as many *training* identities (the ones it was
trained on): a large gap between the two is overfitting, not a model that cannot learn the task.
"""
import argparse
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("retrieval bound of a pixel-only student under the attribute teacher", add_help=add_help)
    default = ROOT / "logs" / "quality"
    p.add_argument("--data", default=str(default / "data-1000ids+4000train-s0" / "synthpedes-dataset.json"))
    p.add_argument("--embedding_path", default=str(default / "emb-1000ids+4000train-s0"))
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--test_ratio", type=float, default=0.1)
    p.add_argument("--val_ratio", type=float, default=0.05)
    p.add_argument("--checkpoint", default=None, help="also score this student on the split and on training ids")
    p.add_argument("--json", default=None)
    return p


def gender_priors():
    """{gender: {field: {value: probability}}} from the generator's tables: hair, upper garment, lower, carried."""
    sys.path.insert(0, str(ROOT / "tools"))
    import make_synthetic_pedes as msp
    out = {}
    for g in ("man", "woman"):
        tables = {"hair": msp.HAIR[g], "upper": msp.UPPER[g], "lower": msp.LOWER[g],
                  "carried": [(v or "unknown", w) for v, w in msp.CARRIED[g]]}
        out[g] = {k: {v: w / sum(x for _, x in t) for v, w in t} for k, t in tables.items()}
    return out


def visible_fields(attributes):
    """{hair, upper, lower, carried} garment/hair kinds the image shows, parsed from the attribute text (None where
    the text does not say: the hair length is sometimes left out)."""
    f = [p.strip() for p in attributes.split(",")]
    hair = f[1].split()
    length = ("bald" if f[1] == "bald" else "ponytail" if hair[-1] == "ponytail"
              else hair[0] if hair[0] in ("long", "short") else None)
    last = lambda s: "unknown" if s == "unknown" else s.split()[-1]  # noqa: E731
    return {"hair": length, "upper": last(f[2]), "lower": None if last(f[2]) == "dress" else last(f[3]),
            "carried": last(f[5])}


def guess_gender(attributes, priors):
    seen = visible_fields(attributes)
    score = {}
    for g, tables in priors.items():
        p = 1.0
        for k, v in seen.items():
            if v is not None:
                p *= tables[k].get(v, 0.0)
        score[g] = p
    return max(score, key=score.get)


def main(args):
    import numpy as np
    import data as data_lib
    import evaluation_labels
    import metrics
    from embedding_cache import EmbeddingCache
    from quality import atomic_json, core_figures, eval_student
    from teachers import attribute_text, load_teacher
    from cli import fail
    if not Path(args.data).is_file():
        fail(f"--data {args.data} not found (run python bench/quality.py first, or pass --data)")
    records = data_lib.load_records(args.data)
    cache = EmbeddingCache.open(args.embedding_path, args.data)
    idx = data_lib.split_records(records, args.test_ratio, args.split, args.val_ratio)
    idx = [i for i in idx if records[i]["attributes"]]
    if not idx:
        fail(f"no {args.split} record with attributes in {args.data}")
    teacher = load_teacher("attributes", device="cpu")
    priors = gender_priors()
    sel = evaluation_labels.select_rows(records, idx, cache.done("image"), cache.done("caption"), ("en",))
    cap = np.asarray(cache.array("caption")[sel["cap_rows"]], np.float32)
    attrs = [records[r]["attributes"] for r in sel["img_rows"]]

    def score(img):
        res = metrics.evaluate_embeddings(img, cap, sel["cap_img_index"], sel["img_pids"], sel["cap_pids"],
                                          top_k=0, normalize=True)
        return core_figures(res)
    no_gender = [attribute_text(",".join(["unknown"] + a.split(",")[1:])) for a in attrs]
    guessed = [guess_gender(a, priors) for a in attrs]
    with_guess = [attribute_text(",".join([g] + a.split(",")[1:])) for g, a in zip(guessed, attrs)]
    rows = {"teacher": score(np.asarray(cache.array("image")[sel["img_rows"]], np.float32)),
            "no gender": score(teacher.embed_texts(no_gender)),
            "gender guessed": score(teacher.embed_texts(with_guess))}
    acc = float(np.mean([g == a.split(",")[0].strip() for g, a in zip(guessed, attrs)]))
    n_ids = len(set(sel["img_pids"].tolist()))
    if args.checkpoint:
        tr = data_lib.split_records(records, args.test_ratio, "train", args.val_ratio)
        tr_ids = sorted({records[i]["id"] for i in tr})
        pick = set(random.Random(0).sample(tr_ids, min(n_ids, len(tr_ids))))
        for name, ix in ((f"student ({args.split} ids)", idx),
                         ("student (as many training ids)", [i for i in tr if records[i]["id"] in pick])):
            r, _ = eval_student(args.checkpoint, records, ix, {}, "cpu")  # no query sets: the core figures only
            rows[name] = {k: r[k] for k in ("eer", "frr@1e-3", "r1", "r5", "map")}  # core_figures' keys
    print(f"\n== text->image on {n_ids} {args.split} identities ({len(sel['img_rows'])} images, {len(cap)} "
          f"captions); gender guessed right for {100 * acc:.1f}% of images ==")
    print(f"{'gallery':<34}{'EER (%)':>10}{'R@1 (%)':>10}{'R@5 (%)':>10}{'mAP (%)':>10}")
    for name, r in rows.items():
        print(f"{name:<34}{r['eer']:>10.2f}{r['r1']:>10.2f}{r['r5']:>10.2f}{r['map']:>10.2f}")
    if args.json:
        out = {"split": args.split, "n_identities": n_ids, "gender_guess_accuracy": acc, "rows": rows,
               "checkpoint": args.checkpoint}
        atomic_json(args.json, out)
    return rows


if __name__ == "__main__":
    main(get_args_parser(add_help=True).parse_args())
