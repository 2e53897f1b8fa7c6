"""Give a checkpoint written before main.py stored its word list the list main.py would have stored.

main.py puts the English words of the training texts into model_cfg["query_vocab"] (captions.query_vocabulary);
evaluation_model.py, the benches and search/ (through export_model.py's query_vocab.txt) drop the query words
outside it (search/query_words.py). This tool computes the same list from the checkpoint's own training split
(its args: --data, --test_ratio, --val_ratio, --langs) and writes the checkpoint back atomically.

    python tools/query_vocab.py logs/expModel-res_tiny-192x96-256/run/best.pt               # in place
    python tools/query_vocab.py RUN/best.pt --out /tmp/best_qv.pt --data other/synthpedes-dataset.json
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("attach the training word list to a checkpoint", add_help=add_help)
    p.add_argument("checkpoint", help="a .pt written by main.py")
    p.add_argument("--data", default=None, help="the training dataset JSON (default: the checkpoint's --data)")
    p.add_argument("--out", default=None, help="write here instead of over the checkpoint")
    p.add_argument("--force", action="store_true", help="replace a word list the checkpoint already has")
    return p


def main(args):
    import data as data_lib
    import main as train
    from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    try:
        ck = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    if ck["model_cfg"].get("query_vocab") and not args.force:
        raise SystemExit(f"error: {args.checkpoint} already has a word list "
                         f"({len(ck['model_cfg']['query_vocab'])} words); --force replaces it")
    targs = ck.get("args") or {}
    path = args.data or targs.get("data")
    if not path:
        raise SystemExit(f"error: {args.checkpoint} does not name its dataset; pass --data")
    try:
        records = data_lib.load_records(str(path), targs.get("image_root"))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    langs = tuple(s for s in str(targs.get("langs", "en,zh")).split(",") if s)
    train_idx = data_lib.split_records(records, float(targs.get("test_ratio", 0.1)), "train",
                                       float(targs.get("val_ratio", 0.0)))
    words = train.query_vocab(records, train_idx, langs)
    ck = dict(ck)
    ck["model_cfg"] = dict(ck["model_cfg"], query_vocab=words)  # save_checkpoint re-hashes the new content
    out = args.out or args.checkpoint
    save_checkpoint(out, ck)
    print(f"{out}: {len(words)} words from {len(train_idx)} training records of {path}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
