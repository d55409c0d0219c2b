"""Tiny servers and clients for the forward tests, run as processes (also in namespaces).

    python -m tests.servers http PORT FILE [HOST]  serve FILE's bytes at every path
    python -m tests.servers echo PORT [HOST]    echo every byte, half-close after EOF
    python -m tests.servers linecount PORT      read to EOF, then answer "<lines>\\n"
    python -m tests.servers fetch URL N         N concurrent GETs; print each body's sha256
    python -m tests.servers banner PORT         like sshd: write an SSH banner, await input
    python -m tests.servers gallery PORT N      HTTP/1.1 keep-alive: a page of N PNG images;
                                                prints "request PATH" for every request
    python -m tests.servers chargen PORT        send endless bytes to every client, read none
    python -m tests.servers echocount PORT      echo, and print "accepts N" as connections come
Servers print "ready <port>" once listening (PORT 0: any free port).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import socket
import struct
import sys
import threading
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor


def serve_http(port: int, path: str, host: str = "127.0.0.1") -> None:
    body = open(path, "rb").read()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 512
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, port), Handler)
    print("ready", server.server_address[1], flush=True)
    server.serve_forever()


async def serve_stream(port: int, kind: str, host: str = "127.0.0.1") -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        writer.close()

    async def linecount(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # only after the client's EOF
        lines = data.count(b"\n")
        writer.write(f"{lines}\n".encode())
        await writer.drain()
        writer.close()

    handler = echo if kind == "echo" else linecount
    server = await asyncio.start_server(handler, host, port, backlog=1024)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


BANNER = b"SSH-2.0-OpenSSH_9.2\r\n"


async def serve_banner(port: int) -> None:
    """Write the banner first, like sshd; a client line that is no SSH version ends it."""

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(BANNER)
            await writer.drain()
            while line := await reader.readline():
                if not line.startswith(b"SSH-"):
                    writer.write(b"Invalid SSH identification string.\r\n")
                    await writer.drain()
                    break
        except OSError:
            pass  # the client reset: that is its business
        finally:
            writer.close()

    server = await asyncio.start_server(talk, "127.0.0.1", port, backlog=1024)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A real PNG: a solid `rgb` rectangle."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\0" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def gallery_page(n: int) -> bytes:
    """A page that writes "LOADED <n>" once all its images loaded (or says which failed)."""
    images = "\n".join(
        f'<img src="/img/{i}.png" width="16" height="16" onload="loaded()" onerror="failed()">'
        for i in range(n)
    )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>gallery</title><script>
var ok = 0, bad = 0;
function show() {{
  document.getElementById("status").textContent =
    (ok + bad < {n} ? "WAITING " : bad ? "FAILED " + bad + " LOADED " : "LOADED ") + ok;
}}
function loaded() {{ ok++; show(); }}
function failed() {{ bad++; show(); }}
</script></head><body>
<p id="status">WAITING</p>
{images}
</body></html>
""".encode()


def serve_gallery(port: int, n: int) -> None:
    page = gallery_page(n)
    images = {f"/img/{i}.png": png(16, 16, (i * 6 % 256, 255 - i * 5 % 256, 99)) for i in range(n)}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as browsers like it

        def do_GET(self) -> None:
            with lock:  # one whole line per request, whatever the threads do
                sys.stdout.write(f"request {self.path}\n")
                sys.stdout.flush()
            if self.path == "/":
                body, kind, status = page, "text/html; charset=utf-8", 200
            elif self.path in images:
                body, kind, status = images[self.path], "image/png", 200
            else:
                body, kind, status = b"not found\n", "text/plain", 404
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer.daemon_threads = True
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", server.server_address[1], flush=True)
    server.serve_forever()


CHARGEN_CHUNK = bytes(range(256)) * 256  # 64 KiB


async def serve_chargen(port: int) -> None:
    """A target that sends a lot: CHARGEN_CHUNK over and over until the client goes away."""

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                writer.write(CHARGEN_CHUNK)
                await writer.drain()
        except OSError:
            pass  # the client closed or reset
        finally:
            writer.close()

    server = await asyncio.start_server(talk, "127.0.0.1", port, backlog=1024)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


async def serve_echocount(port: int) -> None:
    """Echo, and count accepted connections: "accepts N" on stdout, at most 10 times a
    second, whenever N changed (the last line is the total so far)."""
    accepts = 0

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepts
        accepts += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except OSError:
            pass  # the client reset: that is its business
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", port, backlog=1024)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    reported = -1
    while True:
        if accepts != reported:
            reported = accepts
            print("accepts", accepts, flush=True)
        await asyncio.sleep(0.1)


def fetch(url: str, n: int) -> None:
    def one(_: int) -> str:
        with urllib.request.urlopen(url, timeout=60) as response:
            return hashlib.sha256(response.read()).hexdigest()

    with ThreadPoolExecutor(n) as pool:
        for digest in pool.map(one, range(n)):
            print(digest, flush=True)


def main() -> None:
    kind = sys.argv[1]
    if kind == "http":
        serve_http(int(sys.argv[2]), sys.argv[3], *sys.argv[4:5])
    elif kind in ("echo", "linecount"):
        asyncio.run(serve_stream(int(sys.argv[2]), kind, *sys.argv[3:4]))
    elif kind == "banner":
        asyncio.run(serve_banner(int(sys.argv[2])))
    elif kind == "gallery":
        serve_gallery(int(sys.argv[2]), int(sys.argv[3]))
    elif kind == "chargen":
        asyncio.run(serve_chargen(int(sys.argv[2])))
    elif kind == "echocount":
        asyncio.run(serve_echocount(int(sys.argv[2])))
    elif kind == "fetch":
        fetch(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":
    main()
