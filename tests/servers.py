"""Tiny servers and clients for the forward tests, run as processes (also in namespaces).

    python -m tests.servers http PORT FILE      serve FILE's bytes at every path
    python -m tests.servers echo PORT [HOST]    echo every byte, half-close after EOF
    python -m tests.servers linecount PORT      read to EOF, then answer "<lines>\\n"
    python -m tests.servers fetch URL N         N concurrent GETs; print each body's sha256
Servers print "ready <port>" once listening (PORT 0: any free port).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def serve_http(port: int, path: str) -> None:
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

    http.server.ThreadingHTTPServer.request_queue_size = 512
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
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
        serve_http(int(sys.argv[2]), sys.argv[3])
    elif kind in ("echo", "linecount"):
        asyncio.run(serve_stream(int(sys.argv[2]), kind, *sys.argv[3:4]))
    elif kind == "fetch":
        fetch(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":
    main()
