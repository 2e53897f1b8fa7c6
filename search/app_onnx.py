r"""Web UI: search an enrolled gallery with the exported student text model (model_text.onnx), no torch.

    cd search
    python app_onnx.py --image-root xm_images --image_feature collection/person_features.npy \
        --image_metadata collection/person_metadata.json --port 5005 \
        --text-model ../logs/expModel-mobile_small-224x112-512/0/export/model_text.onnx
    # then open http://127.0.0.1:5005/  (JSON: /api/search?q=a+man+in+a+red+coat&top_n=10)

Binds 127.0.0.1 unless --host says otherwise (e.g. --host 0.0.0.0 to serve a LAN — there is no login).
Routes, escaping and the image-root confinement are described in search/webui.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from search.api import get_data_args_parser, get_onnx_model_args_parser  # noqa: E402
from search.collection import CollectionError  # noqa: E402
from search.engine import ExportError, TextEncoder  # noqa: E402
from search.webui import main_serve  # noqa: E402


def get_server_args_parser(add_help=False):
    p = argparse.ArgumentParser("server", add_help=add_help)
    p.add_argument("--port", type=int, default=5005)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--top-n", "--top_n", dest="top_n", type=int, default=10, help="results shown by default (<= 100)")
    p.add_argument("--quiet", action="store_true", help="do not log requests")
    return p


def get_args_parser(add_help=True):
    return argparse.ArgumentParser("app_onnx", parents=[get_data_args_parser(), get_onnx_model_args_parser(),
                                                        get_server_args_parser()], add_help=add_help,
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)


def main(args):
    try:
        enc = TextEncoder(args.model_dir, args.text_model, threads=args.threads,
                          filter_queries=bool(args.query_filter))
        main_serve(args, enc, "Person search (ONNX)")
    except (CollectionError, ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
