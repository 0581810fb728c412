#!/usr/bin/python3
"""Follows Vigil's gateway watch (`POST /v3/watch`) and keeps sending requests on it.

Each line read from standard input (a JSON WatchRequest: create_request, cancel_request,
progress_request) goes to the server as the next piece of the request body, as it is read; each
response line is printed as it arrives. curl cannot do this: while it uploads from standard input
it does not read the answer.

  scripts/gateway-watch.py http://127.0.0.1:2379/v3/watch            # chunked HTTP/1.1
  scripts/gateway-watch.py --http2 http://127.0.0.1:2379/v3/watch    # an h2c stream (python3-h2)

then type, for instance:
  {"create_request":{"key":"Zm9v"}}
  {"progress_request":{}}
  {"cancel_request":{"watch_id":"0"}}

The end of standard input ends the request body; the watches go on until the process is stopped.
"""
import os
import select
import socket
import sys
import urllib.parse


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run(sock, stdin, send_piece, end_body, received):
    """Sends each piece of standard input as it is read and hands what the server sends to
    `received`, until it returns True or the server closes."""
    open_input = True
    while True:
        r, _, _ = select.select([sock] + ([stdin] if open_input else []), [], [])
        if stdin in r:
            piece = os.read(stdin, 65536)
            if piece:
                send_piece(piece)
            else:
                end_body()
                open_input = False
        if sock in r:
            data = sock.recv(65536)
            if not data or received(data):
                return


def http1(sock, host, path, stdin):
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    state = {"buf": b"", "head": False, "body": b""}

    def received(data):
        state["buf"] += data
        if not state["head"]:
            if b"\r\n\r\n" not in state["buf"]:
                return False
            head, state["buf"] = state["buf"].split(b"\r\n\r\n", 1)
            out(head.split(b"\r\n", 1)[0].decode())
            state["head"] = True
        # Chunked response: take whole chunks, print whole lines.
        ended = False
        buf = state["buf"]
        while b"\r\n" in buf:
            size_line, rest = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                break
            state["body"] += rest[:size]
            buf = rest[size + 2:]
            if size == 0:
                ended = True
                break
        state["buf"] = buf
        while b"\n" in state["body"]:
            line, state["body"] = state["body"].split(b"\n", 1)
            out(line.decode())
        return ended

    run(sock, stdin, lambda piece: sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n"),
        lambda: sock.sendall(b"0\r\n\r\n"), received)


def http2(sock, host, path, stdin):
    import h2.config
    import h2.connection
    import h2.events
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", host),
                               ("content-type", "application/json")])
    sock.sendall(conn.data_to_send())
    state = {"body": b""}

    def send_piece(piece):
        conn.send_data(stream, piece)
        sock.sendall(conn.data_to_send())

    def end_body():
        conn.end_stream(stream)
        sock.sendall(conn.data_to_send())

    def received(data):
        done = False
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                out("HTTP/2 " + dict(event.headers).get(b":status", b"?").decode())
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                state["body"] += event.data
                while b"\n" in state["body"]:
                    line, state["body"] = state["body"].split(b"\n", 1)
                    out(line.decode())
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                done = True
        sock.sendall(conn.data_to_send())
        return done

    run(sock, stdin, send_piece, end_body, received)


def main():
    args = sys.argv[1:]
    use_h2 = "--http2" in args
    args = [a for a in args if a != "--http2"]
    if len(args) != 1:
        sys.exit(__doc__)
    url = urllib.parse.urlsplit(args[0])
    sock = socket.create_connection((url.hostname, url.port or 80))
    host = url.netloc
    path = url.path or "/v3/watch"
    (http2 if use_h2 else http1)(sock, host, path, sys.stdin.fileno())


if __name__ == "__main__":
    main()
