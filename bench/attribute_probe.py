"""What a student's image embedding knows: a linear probe per attribute word, scored on validation identities.

    python bench/attribute_probe.py logs/quality/logs/expModel-res_tiny-128x64-256/<run>/best.pt
    python bench/attribute_probe.py <ckpt> --train_images 2000 --steps 600 --json probe.json

Embeds training-split images (the probe's training set) and validation-split images (never the test identities)
with the student's image tower, fits one logistic regression per attribute word of captions.AttributeVocab on the
frozen unit embeddings (Adam, full batch), and prints the validation ROC AUC of every word seen at least
--min_positives times, grouped by field. 1.0 = the embedding separates the word perfectly, 0.5 = chance. It tells
which attributes the image tower has not learnt (or cannot see), where retrieval R@1 only says that it misses.
"""
import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("linear attribute probe of a student's image embedding", add_help=add_help)
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="dataset JSON (default: the checkpoint's)")
    p.add_argument("--train_images", type=int, default=1200, help="training-split images the probe fits on")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--min_positives", type=int, default=5, help="validation positives a word needs to be scored")
    p.add_argument("--json", default=None)
    return p


def roc_auc(scores, labels):
    import numpy as np
    pos, n = int(labels.sum()), len(labels)
    if pos == 0 or pos == n:
        return None
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(n)
    s = scores[order]
    i = 0
    while i < n:  # average ranks over ties
        j = i
        while j + 1 < n and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return float((ranks[labels > 0].sum() - pos * (pos - 1) / 2) / (pos * (n - pos)))


def main(args):
    import numpy as np
    import torch
    import torch.nn.functional as F
    import captions
    import data as data_lib
    from checkpoint import load_checkpoint
    from evaluation_model import embed_split
    from model import build_model
    try:
        ckpt = load_checkpoint(args.checkpoint)
        targs = ckpt.get("args", {})
        records = data_lib.load_records(args.data or targs.get("data"), targs.get("image_root"))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    cfg = ckpt["model_cfg"]
    if cfg.get("text_only"):
        raise SystemExit("error: a --text_only student has no image tower to probe")
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    tr, va = (data_lib.split_records(records, targs.get("test_ratio", 0.1), s, targs.get("val_ratio", 0.05))
              for s in ("train", "val"))
    if not va:
        raise SystemExit("error: the checkpoint's run has no validation identities (--val_ratio 0)")
    tr = tr[::max(1, len(tr) // args.train_images)][:args.train_images]
    vocab = captions.AttributeVocab.build(records[i]["attributes"] for i in tr)
    if not len(vocab):
        raise SystemExit("error: the dataset has no attributes to probe")

    def embed(idx):
        x = embed_split(model, records, idx, cfg, workers=0, progress=False)["img_emb"]
        t = torch.tensor([vocab.targets(records[r]["attributes"])[0] for r in idx])
        return torch.from_numpy(x), t
    x_tr, t_tr = embed(tr)
    x_va, t_va = embed(va)
    torch.manual_seed(0)
    head = torch.nn.Linear(x_tr.shape[1], len(vocab))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(args.steps):
        loss = F.binary_cross_entropy_with_logits(head(x_tr), t_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = head(x_va).numpy()
    t = t_va.numpy()
    res = {}
    for i, (f, w) in enumerate(vocab.words):
        if t[:, i].sum() >= args.min_positives:
            res[f"{f}:{w}"] = roc_auc(z[:, i], t[:, i])
    print(f"{args.checkpoint}: step {ckpt.get('step')}, probe fit on {len(tr)} training images, scored on "
          f"{len(va)} validation images; ROC AUC per attribute word (1 = separable, 0.5 = chance)")
    for f in captions.ATTRIBUTE_FIELDS:
        items = [(k.split(":", 1)[1], v) for k, v in res.items() if k.startswith(f + ":") and v is not None]
        if items:
            print(f"  {f:8s} " + "  ".join(f"{w} {v:.2f}" for w, v in sorted(items, key=lambda x: x[1])))
    if args.json:
        tmp = f"{args.json}.tmp.{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"checkpoint": args.checkpoint, "step": ckpt.get("step"), "auc": res}, fh, indent=1)
        os.replace(tmp, args.json)
    return res


if __name__ == "__main__":
    parser = argparse.ArgumentParser("bench/attribute_probe.py", parents=[get_args_parser()], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    main(parser.parse_args())
