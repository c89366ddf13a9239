"""A web page for a BLIP-2 model: upload an image, read its caption, ask questions, score texts against it.

    python -m runners.serve                       # http://127.0.0.1:7860 (the newest trained models under output/, else tiny ones)
    python -m runners.serve --model blip2_opt:pretrain_opt2.7b --match-model blip2:pretrain --port 8000

One HTML page and a small JSON API on Python's standard ``http.server`` (nothing to install, starts offline):
``POST /api/upload`` (raw image bytes) -> ``{"id", "width", "height", "caption"}``; ``POST /api/ask``
``{"id", "question"}`` -> ``{"answer"}``; ``POST /api/match`` ``{"id", "texts": [...]}`` -> ``{"scores": [{"text",
"itm", "itc"}]}``. Bad input (not an image, too many bytes or pixels, an empty question) gets a 400/413 with a
message the page shows; the server keeps serving. It binds loopback addresses only: it is a local tool, with no
authentication, and runs the model for whoever can reach it.
"""
from __future__ import annotations

import argparse
import io
import ipaddress
import json
import logging
import socket
import sys
import threading
import uuid
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from PIL import Image, UnidentifiedImageError

from runners.inference import PRECISION_CHOICES, PRECISION_HELP, default_serve_specs, load_spec

logger = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("serve_page.html")
MAX_TEXTS = 20


class BadRequest(ValueError):
    """A request the page should explain to the user (HTTP 400, or 413 for size)."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def check_loopback(host: str) -> str:
    """Only loopback addresses (127.0.0.0/8, ::1, localhost): the page runs a model for anyone who reaches it."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as err:
        raise ValueError(f"--host {host!r}: cannot resolve it ({err})") from err
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"--host {host!r} is not a loopback address; this server binds 127.0.0.1, ::1 or localhost "
                         "only (it has no authentication). Use an SSH tunnel to reach it from elsewhere.")
    return host


class App:
    """The models and the uploaded images (the newest ``keep`` of them), shared by the request threads."""

    def __init__(self, generator, matcher, max_bytes: int, max_pixels: int, keep: int = 32,
                 decoding: dict[str, Any] | None = None) -> None:
        self.generator, self.matcher = generator, matcher
        self.max_bytes, self.max_pixels, self.keep = max_bytes, max_pixels, keep
        self.decoding = dict(decoding or {})
        self.images: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()  # one model call at a time (torch modules are not re-entrant safe)

    def info(self) -> dict[str, Any]:
        return {"caption_model": self.generator.name if self.generator else None,
                "match_model": self.matcher.name if self.matcher else None,
                "max_bytes": self.max_bytes, "max_pixels": self.max_pixels}

    def decode_image(self, data: bytes):
        if not data:
            raise BadRequest("the upload is empty: choose an image file")
        previous = Image.MAX_IMAGE_PIXELS
        try:
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                width, height = probe.size
                if width * height > self.max_pixels:
                    raise BadRequest(f"the image is {width}x{height} = {width * height:,} pixels; this server takes "
                                     f"at most {self.max_pixels:,} pixels", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                Image.MAX_IMAGE_PIXELS = self.max_pixels
                probe.load()
                return probe.convert("RGB")
        except UnidentifiedImageError:
            raise BadRequest("the upload is not an image file (PNG, JPEG, GIF, BMP, WebP, TIFF ...)") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            if isinstance(err, BadRequest):
                raise
            raise BadRequest(f"the image could not be decoded ({err})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous

    def image(self, image_id: Any):
        if not isinstance(image_id, str) or image_id not in self.images:
            raise BadRequest("upload an image first (or upload it again: this server keeps the last "
                             f"{self.keep} images)")
        return self.images[image_id]

    def upload(self, data: bytes) -> dict[str, Any]:
        image = self.decode_image(data)
        image_id = uuid.uuid4().hex
        with self.lock:
            self.images[image_id] = image
            while len(self.images) > self.keep:
                self.images.popitem(last=False)
            caption = self.generator.caption([image], **self.decoding)[0][0] if self.generator else None
        return {"id": image_id, "width": image.width, "height": image.height, "caption": caption}

    def ask(self, body: dict[str, Any]) -> dict[str, Any]:
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise BadRequest("the question is empty: type a question about the image")
        if self.generator is None or not self.generator.is_generative:
            raise BadRequest("this server's caption model cannot answer questions (it is not a stage-2 model)")
        image = self.image(body.get("id"))
        with self.lock:
            answer = self.generator.answer([image], [question.strip()[:500]],
                                           num_beams=self.decoding.get("num_beams", 5))[0]
        return {"question": question.strip(), "answer": answer}

    def match(self, body: dict[str, Any]) -> dict[str, Any]:
        texts = body.get("texts")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise BadRequest("texts must be a list of strings")
        texts = [t.strip()[:300] for t in texts if t.strip()]
        if not texts:
            raise BadRequest("type at least one text (one per line) to score against the image")
        if len(texts) > MAX_TEXTS:
            raise BadRequest(f"at most {MAX_TEXTS} texts at a time, got {len(texts)}")
        if self.matcher is None:
            raise BadRequest("this server has no matching model (start it with --match-model)")
        image = self.image(body.get("id"))
        with self.lock:
            scores = self.matcher.scores([image], texts)
        return {"scores": [{"text": t, "itm": round(float(scores["itm"][0, j]), 4),
                            "itc": round(float(scores["itc"][0, j]), 4)} for j, t in enumerate(texts)]}


class Handler(BaseHTTPRequestHandler):
    app: App  # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict[str, Any]) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _drain(self, length: int, most: int) -> None:
        """Read and drop a refused body (up to ``most`` bytes), so the client reads the answer rather than a reset
        connection; beyond that the connection is closed after the answer."""
        if length > most:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/api/info":
            self._json(HTTPStatus.OK, self.app.info())
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/api/upload": None, "/api/ask": self.app.ask, "/api/match": self.app.match}
        if self.path not in routes:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            limit = self.app.max_bytes if self.path == "/api/upload" else 64 * 1024
            if length > limit:
                self._drain(length, 16 * limit)
                raise BadRequest(f"the upload is {length / 2**20:.1f} MiB; this server takes at most "
                                 f"{limit / 2**20:.1f} MiB", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            data = self.rfile.read(length)
            if self.path == "/api/upload":
                result = self.app.upload(data)
            else:
                try:
                    body = json.loads(data or b"{}")
                except json.JSONDecodeError as err:
                    raise BadRequest(f"the request is not JSON ({err})") from None
                if not isinstance(body, dict):
                    raise BadRequest("the request must be a JSON object")
                result = routes[self.path](body)
            self._json(HTTPStatus.OK, result)
        except BadRequest as err:
            self._json(err.status, {"error": str(err)})
        except Exception as err:  # a model failure must not take the server down: report it on the page
            logger.exception("request %s failed", self.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(err).__name__}: {err}"})


def make_server(app: App, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    check_loopback(host)
    handler = type("BoundHandler", (Handler,), {"app": app})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_cls = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
    return server_cls((host, port), handler)


def main(argv: Sequence[str] | None = None) -> int:
    default_gen, default_match = default_serve_specs()
    parser = argparse.ArgumentParser(prog="python -m runners.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_gen,
                        help="captions and answers (stage 2: zoo ARCH:TYPE, job or checkpoint dir); default: "
                             "%(default)s")
    parser.add_argument("--match-model", default=default_match,
                        help="ITM/ITC scores (stage 1); 'none' to leave it out; default: %(default)s")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address only (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES, help=PRECISION_HELP)
    parser.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE", help="caption model overrides")
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=30, help="caption length in new tokens")
    parser.add_argument("--max-upload-mb", type=float, default=20.0)
    parser.add_argument("--max-pixels", type=int, default=40_000_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_loopback(args.host)
        overrides = OmegaConf.to_container(OmegaConf.from_dotlist(list(args.options))) if args.options else {}
        generator = load_spec(args.model, args.device, args.precision, overrides=overrides)
        matcher = None if args.match_model == "none" else load_spec(args.match_model, args.device, args.precision)
        if matcher is not None:
            matcher.require("match")
        app = App(generator, matcher, int(args.max_upload_mb * 2**20), args.max_pixels,
                  decoding={"num_beams": args.num_beams, "max_length": args.max_length})
        server = make_server(app, args.host, args.port)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"blip2-serve: error: {err}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    print(f"serving {generator.name} (captions, answers) and {matcher.name if matcher else 'no'} (ITM) on {url}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
