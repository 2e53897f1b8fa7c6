"""The search web UI shared by app_onnx.py and app_siglip.py: stdlib http.server, no JavaScript, no Flask.

Routes (GET only):
    /                          the page; `/?q=...&top_n=...` renders results server-side (every string escaped
                               with html.escape; a strict Content-Security-Policy forbids scripts altogether)
    /api/search?q=...&top_n=..[&folder=F]
                               JSON {"query", "time_s", "notes", "results": [{"rank", "score", "image", "bbox",
                               "image_url"}]}; q is cut to 1000 characters, top_n must be 1..100; folder keeps
                               only images directly in that folder (search/backends.py)
    /image?path=REL[&bbox=x1,y1,x2,y2]
                               REL must be an image of the collection under the image root: absolute paths,
                               '..' components (also percent-encoded), and symlinks resolving outside the root
                               are refused (403); unknown files 404. With bbox: a JPEG crop around the box with
                               the box drawn; without: the file itself.
Binds 127.0.0.1 by default; on a loopback bind, requests whose Host header is not a loopback name are refused
(DNS-rebinding guard).
Resources are bounded: each connection has a socket timeout (REQUEST_TIMEOUT_S, so idle clients cannot hold
threads), at most MAX_THREADS requests run at once (more get 503 at once), and crops decode large JPEGs at a
reduced scale and refuse other images above MAX_DECODE_PIXELS (a 100-megapixel gallery image would cost ~1.3 GB
per request). Bad parameters (too many, a bbox without area) are 400.
"""
import html
import io
import json
import os
import re
import sys
import threading
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

from PIL import Image, ImageDraw

from search.imaging import ImageTooLarge, open_rgb

MAX_QUERY_CHARS = 1000
MAX_TOP_N = 100
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
                 ".webp": "image/webp"}
CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
REQUEST_TIMEOUT_S = 10
MAX_THREADS = 32
MAX_DECODE_PIXELS = 16_000_000  # per crop: ~48 MB of RGB; JPEGs above it decode at 1/2..1/8 scale


class Forbidden(Exception):
    pass


def resolve_image_path(root_real, rel):
    """Absolute real path of `rel` inside `root_real`, or raise Forbidden / FileNotFoundError."""
    if not rel or "\x00" in rel:
        raise FileNotFoundError(rel)
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        raise Forbidden("absolute path")
    if ".." in re.split(r"[\\/]", rel):
        raise Forbidden("parent directory component")
    full = os.path.realpath(os.path.join(root_real, rel))
    if os.path.commonpath([root_real, full]) != root_real:
        raise Forbidden("outside the image root")  # e.g. a symlink pointing out of the root
    if not os.path.isfile(full):
        raise FileNotFoundError(rel)
    return full


def parse_bbox(s):
    """[x1, y1, x2, y2] with x2 > x1 and y2 > y1 (finite, |v| < 1e6), else None (a 400)."""
    try:
        b = [float(v) for v in s.split(",")]
    except ValueError:
        return None
    if len(b) != 4 or not all(abs(v) < 1e6 for v in b):  # also refuses nan (every comparison is False)
        return None
    return b if b[2] > b[0] and b[3] > b[1] else None


@lru_cache(maxsize=512)
def render_crop(full, bbox, mtime_ns, max_h=256):
    """JPEG bytes: the box with a 15% margin, the box outlined, scaled to max_h pixels high."""
    img, scale = open_rgb(full, MAX_DECODE_PIXELS)  # bounded: large JPEGs decode reduced, others are refused
    W, H = img.size
    x1, y1, x2, y2 = (v * scale for v in bbox)
    mx, my = 0.15 * (x2 - x1), 0.15 * (y2 - y1)
    cx1, cy1 = max(0, int(x1 - mx)), max(0, int(y1 - my))
    cx2, cy2 = min(W, int(x2 + mx) + 1), min(H, int(y2 + my) + 1)
    if cx2 - cx1 < 1 or cy2 - cy1 < 1:
        cx1, cy1, cx2, cy2 = 0, 0, W, H
    crop = img.crop((cx1, cy1, cx2, cy2))
    lw = max(2, round((cy2 - cy1) / 100))
    d = ImageDraw.Draw(crop)  # a black-edged yellow frame stays visible on any clothing colour
    box = [x1 - cx1, y1 - cy1, x2 - cx1 - 1, y2 - cy1 - 1]
    d.rectangle(box, outline=(0, 0, 0), width=lw + 2)
    d.rectangle([box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1], outline=(255, 220, 0), width=lw)
    if crop.height > max_h:
        crop = crop.resize((max(1, round(crop.width * max_h / crop.height)), max_h), Image.BILINEAR)
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def image_url(item):
    q = {"path": item["image"]}
    if item.get("bbox") is not None:
        q["bbox"] = ",".join(str(int(round(v))) for v in item["bbox"])
    return "/image?" + urlencode(q)


PAGE_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
form{display:flex;gap:.5em;margin-bottom:1em}
input[name=q]{flex:1;font-size:1.1em;padding:.4em}
input[name=top_n]{width:5em}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;width:180px}
figure img{max-width:100%;max-height:256px;display:block;margin:auto}
figcaption{font-size:.8em;word-break:break-all;margin-top:4px}
.score{font-weight:bold}.note{color:#a60}.meta{color:#666;font-size:.85em}
"""


def render_page(title, info, query=None, top_n=10, res=None, error=None):
    e = html.escape
    parts = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
             "<meta name=viewport content='width=device-width,initial-scale=1'>",
             f"<title>{e(title)}</title><style>{PAGE_CSS}</style></head><body>",
             f"<h2>{e(title)}</h2>",
             "<form method=get action='/'>",
             f"<input id=q name=q type=search placeholder='describe a person, e.g. a woman in a red coat' "
             f"maxlength={MAX_QUERY_CHARS} value=\"{e(query or '', quote=True)}\" autofocus>",
             f"<input id=top_n name=top_n type=number min=1 max={MAX_TOP_N} value=\"{int(top_n)}\">",
             "<button id=go type=submit>Search</button></form>",
             f"<p class=meta>{e(info)}</p>"]
    if error:
        parts.append(f"<p class=note id=error>{e(error)}</p>")
    if res is not None:
        parts.append(f"<p id=status>Query: <q>{e(res['query'])}</q> — {len(res['results'])} results, "
                     f"search completed in {res['time_s']:.4f} seconds.</p>")
        for n in res["notes"]:
            parts.append(f"<p class=note>{e(n)}</p>")
        parts.append("<div class=grid id=results>")
        for r in res["results"]:
            bbox = "whole image" if r["bbox"] is None else str([int(round(v)) for v in r["bbox"]])
            parts.append(f"<figure class=result><img src=\"{e(image_url(r), quote=True)}\" alt=\"{e(r['image'], quote=True)}\">"
                         f"<figcaption><span class=score>{r['rank']}. Score: {r['score']:.4f}</span><br>"
                         f"{e(r['image'])}<br>BBox: {e(bbox)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)


class SearchHandler(BaseHTTPRequestHandler):
    server_version = "PersonSearch/1"
    timeout = REQUEST_TIMEOUT_S  # socket timeout: a silent client is dropped instead of holding a thread
    # set by make_server: searcher (its has_image() says which files may be served), root_real, title, quiet,
    # loopback_only

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))

    def _send(self, code, body, ctype, extra=None):
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code, obj):
        self._send(code, json.dumps(obj, ensure_ascii=False), "application/json; charset=utf-8",
                   {"Cache-Control": "no-store"})

    def _text(self, code, msg):
        self._send(code, msg + "\n", "text/plain; charset=utf-8")

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        try:
            if self.server.loopback_only:
                host = (self.headers.get("Host") or "").strip()
                name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
                if host and name.lower() not in LOOPBACK_NAMES:
                    return self._text(403, "forbidden host")
            u = urlsplit(self.path)
            try:
                qs = parse_qs(u.query, keep_blank_values=True, max_num_fields=20)
            except ValueError:  # more than 20 fields
                return self._text(400, "too many query parameters")
            if u.path == "/":
                return self._page(qs)
            if u.path == "/api/search":
                return self._api(qs)
            if u.path == "/image":
                return self._image(qs)
            if u.path == "/favicon.ico":
                return self._send(204, b"", "image/x-icon")
            return self._text(404, "not found")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as ex:  # noqa: BLE001 - one bad request must never take the server down
            sys.stderr.write(f"error serving {self.path[:200]!r}: {ex.__class__.__name__}: {ex}\n")
            try:
                self._text(500, "internal error")
            except OSError:
                pass

    def _params(self, qs):
        """-> (query|None, top_n, error|None)"""
        q = qs.get("q", [None])[0]
        notes = []
        if q is not None and len(q) > MAX_QUERY_CHARS:
            q = q[:MAX_QUERY_CHARS]
            notes.append(f"query cut to {MAX_QUERY_CHARS} characters")
        raw = qs.get("top_n", [str(self.server.default_top_n)])[0]
        try:
            top_n = int(raw)
        except ValueError:
            return q, self.server.default_top_n, notes, f"top_n must be an integer 1..{MAX_TOP_N}"
        if not 1 <= top_n <= MAX_TOP_N:
            return q, min(max(top_n, 1), MAX_TOP_N), notes, f"top_n must be 1..{MAX_TOP_N}"
        return q, top_n, notes, None

    def _search(self, q, top_n, notes, folder=None):
        res = self.server.searcher.search(q, top_n, folder)
        res["notes"] = notes + res["notes"]
        for r in res["results"]:
            r.pop("path", None)  # never reveal server filesystem paths
            r["image_url"] = image_url(r)
        return res

    def _page(self, qs):
        q, top_n, notes, err = self._params(qs)
        res = None
        if q is not None and err is None:
            res = self._search(q, top_n, notes)
        page = render_page(self.server.title, self.server.info, q, top_n, res, err)
        self._send(400 if err else 200, page, "text/html; charset=utf-8", {"Cache-Control": "no-store"})

    def _api(self, qs):
        q, top_n, notes, err = self._params(qs)
        if err:
            return self._json(400, {"error": err})
        if q is None:
            return self._json(400, {"error": "missing parameter q"})
        self._json(200, self._search(q, top_n, notes, qs.get("folder", [None])[0]))

    def _image(self, qs):
        rel = qs.get("path", [""])[0]
        try:
            full = resolve_image_path(self.server.root_real, rel)
        except Forbidden:
            return self._text(403, "forbidden")
        except (FileNotFoundError, ValueError):
            return self._text(404, "not found")
        if not self.server.searcher.has_image(rel.replace("\\", "/")):
            return self._text(404, "not found")  # only gallery images are served, nothing else in the root
        ext = os.path.splitext(full)[1].lower()
        if ext not in CONTENT_TYPES:
            return self._text(403, "forbidden")
        bb = qs.get("bbox", [None])[0]
        cache = {"Cache-Control": "private, max-age=300"}
        if bb is not None:
            b = parse_bbox(bb)
            if b is None:
                return self._text(400, "bad bbox")
            try:
                data = render_crop(full, tuple(b), os.stat(full).st_mtime_ns)
            except ImageTooLarge:
                return self._text(413, "image too large to crop")
            except Exception:  # noqa: BLE001 - undecodable/vanished image
                return self._text(404, "not found")
            return self._send(200, data, "image/jpeg", cache)
        with open(full, "rb") as f:
            data = f.read()
        self._send(200, data, CONTENT_TYPES[ext], cache)


class BoundedThreadingHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `max_threads` requests in flight; the next ones get a 503 at once."""

    max_threads = MAX_THREADS

    def server_activate(self):
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_threads)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nConnection: close"
                                b"\r\nRetry-After: 1\r\n\r\nbusy\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        t = threading.Thread(target=self._run_bounded, args=(request, client_address), daemon=True)
        t.start()

    def _run_bounded(self, request, client_address):
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._slots.release()


def image_root_problem(image_root):
    """Why `image_root` cannot be served from (None: fine)."""
    if not image_root:
        return "--image-root is required: the folder the gallery images are in"
    if not os.path.isdir(image_root):
        return f"--image-root {image_root!r}: not a folder (the UI serves the gallery images from it)"
    return None


def make_server(searcher, image_root, host="127.0.0.1", port=5005, title="Person search", default_top_n=10,
                quiet=False):
    """A bounded threading HTTP server bound to (host, port); port 0 picks a free one (server.server_address[1])."""
    if image_root_problem(image_root):
        raise ValueError(image_root_problem(image_root))
    srv = BoundedThreadingHTTPServer((host, port), SearchHandler)
    srv.daemon_threads = True
    srv.searcher = searcher
    srv.root_real = os.path.realpath(image_root or ".")
    srv.title = title
    srv.default_top_n = max(1, min(MAX_TOP_N, int(default_top_n)))
    srv.quiet = quiet
    srv.loopback_only = host in LOOPBACK_NAMES or host.startswith("127.")
    c = searcher.collection
    srv.info = (f"{len(searcher)} gallery entries · {c.dim}-dim · index {searcher.index.kind} · "
                f"enrolled with {c.model.get('kind', '?')} ({c.model.get('space', '?')})")
    return srv


def serve_in_thread(srv):
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    return t


def main_serve(args, encoder, title):
    """Shared main of app_onnx.py / app_siglip.py (after the encoder is built)."""
    from search.api import Searcher, data_args_problem

    from search.backends import open_store

    problem = data_args_problem(args) or image_root_problem(args.image_root)
    if problem:
        raise ValueError(problem)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    s = Searcher(encoder, args.image_feature, image_root=args.image_root, folder=args.folder, expr=args.filter,
                 store=open_store(args, log=lambda m: print(m, file=sys.stderr, flush=True)),
                 hub_weight=getattr(args, "hub_weight", None))
    s.search("warm-up", 1)
    try:
        srv = make_server(s, args.image_root, args.host, args.port, title, args.top_n, args.quiet)
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    host, port = srv.server_address[:2]
    print(f"Serving {len(s)} gallery entries on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
