"""The README's op lists, generated from the op report export_model.py writes into model_info.json.

    python export_model.py CKPT export_dyn --int8                                  # the recipe, dynamic shapes
    python export_model.py CKPT export_static --static_shapes --batch 1 --text_length 64 --int8
    python tools/op_lists.py export_dyn export_static                              # print the Markdown
    python tools/op_lists.py export_dyn export_static --readme README.md           # rewrite the README block
    python tools/op_lists.py export_dyn export_static --readme README.md --check   # exit 1 if it differs

The block sits between `<!-- op-lists:begin -->` and `<!-- op-lists:end -->` in README.md. Every graph named in an
export's model_info.json "ops" gets one line: its op set, with the ops outside export_model.NPU_OPS (the
documented conservative NPU list) called out. tests/test_export.py regenerates the block from tiny exports of the
recipe's architecture (op sets do not depend on sizes or weights) and checks that the README holds exactly it.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BEGIN, END = "<!-- op-lists:begin -->", "<!-- op-lists:end -->"


def get_args_parser(add_help=False):
    p = argparse.ArgumentParser("README op lists from export_model.py's op report", add_help=add_help)
    p.add_argument("export_dirs", nargs="+", help="folders written by export_model.py (model_info.json)")
    p.add_argument("--readme", default=None, help="rewrite the op-lists block of this README")
    p.add_argument("--check", action="store_true", help="with --readme: only compare, exit 1 when it differs")
    return p


def shapes_label(info):
    # no sizes here: op sets do not depend on them, and the tests regenerate this block from tiny exports
    return "static shapes" if info.get("static_shapes") else "dynamic shapes"


def op_lists(infos):
    """infos: model_info dicts -> the Markdown block (without the markers)."""
    from export_model import NPU_OPS

    lines = []
    for info in infos:
        for f, ops in info["ops"].items():
            outside = [o for o in ops if o not in NPU_OPS]
            arch = info.get("backbone") if f.startswith("model_image") else info.get("text_backbone")
            lines.append(f"- `{f}` ({arch}, {shapes_label(info)}): " + ", ".join(ops)
                         + (f". **Outside the NPU list:** {', '.join(outside)}" if outside
                            else ". All in the NPU list."))
    return "\n".join(lines)


def replace_block(text, block):
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README needs exactly one {BEGIN} ... {END} block")
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:a] + "\n" + block + "\n" + text[b:]


def read_infos(dirs):
    infos = []
    for d in dirs:
        f = Path(d) / "model_info.json"
        try:
            info = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {f}: {e}")
        if not isinstance(info, dict) or not isinstance(info.get("ops"), dict):
            raise SystemExit(f"error: {f}: no op report ('ops'); re-export with this export_model.py")
        infos.append(info)
    return infos


def main(args):
    block = op_lists(read_infos(args.export_dirs))
    if not args.readme:
        print(block)
        return
    try:
        text = Path(args.readme).read_text(encoding="utf-8")
        new = replace_block(text, block)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {args.readme}: {e}")
    if args.check:
        if new != text:
            print(f"{args.readme}: the op lists differ from the exports' op report", file=sys.stderr)
            raise SystemExit(1)
        print(f"{args.readme}: op lists match")
        return
    tmp = f"{args.readme}.tmp.{os.getpid()}"
    Path(tmp).write_text(new, encoding="utf-8")
    os.replace(tmp, args.readme)
    print(f"{args.readme}: op lists rewritten ({block.count(chr(10)) + 1} lines)")


if __name__ == "__main__":
    main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args())
