"""Where a training step's time goes: data, image/text forward, each loss term, backward, optimizer -- one run.

    python bench/train_profile.py --data logs/quality/data-1000ids+4000train-s0/synthpedes-dataset.json \
        --embedding_path logs/quality/emb-1000ids+4000train-s0                     # bench/quality.py's RECIPE
    python bench/train_profile.py --data ... --embedding_path ... -- --image_size 224x112   # + main.py flags

Builds the student exactly as main.py does (RECIPE of bench/quality.py, then any main.py flags after `--`),
times `--steps` steps on one fixed batch after `--warmup` steps, and prints a table of milliseconds per step and
shares, side by side, in one run (the machine is noisy: compare the shares, not the absolute numbers of two runs).
Loss terms are timed one at a time (forward + backward of that term alone, on the step's embeddings). Last, the
text tower alone (forward + backward) as training runs it -- rows in length groups, each cut to its longest text
(text_encoder.CharTextEncoder.forward) -- against one full-length pass of the same batch, interleaved, as a ratio.
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("training step profile", add_help=add_help)
    p.add_argument("--data", required=True)
    p.add_argument("--embedding_path", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    return p


def main(args, extra):
    import torch
    import losses
    import main as trainer
    import opts
    from quality import RECIPE, flags
    from embedding_cache import EmbeddingCache
    from model import build_model, default_model_cfg
    import data as data_lib

    p = argparse.ArgumentParser(parents=[opts.get_args_parser()])
    targs = p.parse_args(["--data", args.data, "--embedding_path", args.embedding_path, *flags(RECIPE), *extra,
                          "--memory_warmup", "0"])  # the memory on: its cost is part of a long run's step
    targs.world_size, targs.rank, targs.device = 1, 0, "cpu"
    try:
        records = data_lib.load_records(targs.data)
        cache = EmbeddingCache.open(targs.embedding_path, targs.data)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    ds, _, _, _, vocab = trainer.build_data(targs, records, cache)
    bs = targs.batch_size
    t = time.perf_counter()
    items = [ds[i] for i in range(bs)]
    t_data = time.perf_counter() - t
    batch = torch.utils.data.default_collate(items)
    cfg = default_model_cfg(targs, cache.dim, "")
    model = build_model(cfg)
    crit = losses.build_criterion(targs, cfg["feature_dim"], cache.dim, attr_words=len(vocab) if vocab else 0)
    img_dt, txt_dt = trainer.amp_plan(targs)
    cl = trainer.use_channels_last(targs)
    if cl:
        model = model.to(memory_format=torch.channels_last)
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    distiller = trainer.Distiller(model, crit, img_dt, txt_dt, cl)
    opt = torch.optim.AdamW(trainer.param_groups(distiller, targs.weight_decay), lr=targs.lr)
    attr = ({k: batch[f"attr_{k}"] for k in ("img_target", "img_weight", "cap_target", "cap_weight")}
            if "attr_img_target" in batch else None)

    def clock(fn):
        t0 = time.perf_counter()
        r = fn()
        return r, time.perf_counter() - t0

    acc = {}

    def add(k, v):
        acc[k] = acc.get(k, 0.0) + v

    for step in range(args.warmup + args.steps):
        keep = step >= args.warmup
        with torch.autocast("cpu", dtype=img_dt, enabled=img_dt is not None):
            s_img, ti = clock(lambda: model.encode_image(batch["image"]))
        with torch.autocast("cpu", dtype=txt_dt, enabled=txt_dt is not None):
            s_cap, tt = clock(lambda: model.encode_text(batch["text_ids"], batch["text_mask"]))
        terms, tl = clock(lambda: crit(s_img, s_cap, batch["t_img_emb"], batch["t_cap_emb"], batch["has_t_img"],
                                       batch["has_t_cap"], batch["pid"], batch["img_row"], attr=attr))
        total = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        _, tb = clock(total.backward)
        _, to = clock(opt.step)
        if keep:
            for k, v in (("forward: image tower", ti), ("forward: text tower", tt), ("forward: all loss terms", tl),
                         ("backward (both towers + losses)", tb), ("optimizer (AdamW)", to)):
                add(k, v)
    # each loss term alone: forward + backward through detached embeddings (its own cost, not the towers')
    with torch.no_grad():
        e_img = model.encode_image(batch["image"])
        e_cap = model.encode_text(batch["text_ids"], batch["text_mask"])
    per_term = {}
    for name in terms:
        for _ in range(args.steps):
            a = e_img.clone().requires_grad_(True)
            c = e_cap.clone().requires_grad_(True)

            def one():
                out = crit(a, c, batch["t_img_emb"], batch["t_cap_emb"], batch["has_t_img"], batch["has_t_cap"],
                           batch["pid"], batch["img_row"], attr=attr)
                out[name].backward()
            _, tv = clock(one)
            per_term[name] = per_term.get(name, 0.0) + tv / args.steps
    # the text tower's length groups (text_encoder.CharTextEncoder.forward) against one full-length pass of the
    # same batch, interleaved so a neighbour's load hits both sides of the ratio
    enc = getattr(model, "text_encoder", None)
    text_ab = {}
    if enc is not None:
        ids, mask = batch["text_ids"], batch["text_mask"]
        ways = {"length groups (forward)": lambda: enc(ids, mask),
                "one full-length pass (forward_embedded)":
                    lambda: enc.forward_embedded(enc.input_embeddings(ids), mask.float())}
        for _ in range(args.steps):
            for k, fn in ways.items():
                def fwd_bwd(fn=fn):
                    with torch.autocast("cpu", dtype=txt_dt, enabled=txt_dt is not None):
                        y = fn()
                    y.float().square().sum().backward()
                _, tv = clock(fwd_bwd)
                text_ab[k] = text_ab.get(k, 0.0) + tv / args.steps
        opt.zero_grad(set_to_none=True)
    n = args.steps
    step_s = sum(acc.values()) / n
    print(f"batch {bs}, image {tuple(cfg['image_size'])}, {targs.backbone} + {targs.text_backbone}, "
          f"max_seq_length {targs.max_seq_length}, amp: image {img_dt} text {txt_dt}, channels_last {cl}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print(f"{'part':44s}{'ms/step':>10s}{'share':>8s}")
    print(f"{'data (one process, ' + str(bs) + ' items)':44s}{1000 * t_data:10.1f}{'':>8s}  "
          f"(DataLoader workers run this beside the step)")
    for k, v in acc.items():
        print(f"{k:44s}{1000 * v / n:10.1f}{100 * v / n / step_s:7.1f}%")
    print(f"{'step (sum of the above, data excluded)':44s}{1000 * step_s:10.1f}")
    print("loss terms alone (forward + backward of the term on fixed embeddings; the full criterion computes the "
          "batch similarity matrices once for several terms, so these overlap):")
    for k, v in per_term.items():
        print(f"  {k:42s}{1000 * v:10.1f}")
    if text_ab:
        lengths = batch["text_mask"].sum(1).float()
        print(f"text tower alone, forward + backward (texts: mean {lengths.mean():.0f}, longest {lengths.max():.0f} "
              f"of {batch['text_mask'].shape[1]} characters):")
        for k, v in text_ab.items():
            print(f"  {k:42s}{1000 * v:10.1f}")
        a, b = text_ab.values()
        print(f"  {'full-length / length groups':42s}{b / a:9.2f}x")
    return acc, per_term, text_ab


if __name__ == "__main__":
    argv = sys.argv[1:]
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser("bench/train_profile.py", parents=[get_args_parser()], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    main(parser.parse_args(own), extra)
