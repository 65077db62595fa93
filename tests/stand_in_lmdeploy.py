"""A stand-in for `lmdeploy serve api_server` (stdlib only): a real HTTP server on the host and
port it is given, requiring the `--api-keys` key like LMDeploy does, naming itself "lmdeploy" in
GET /v1/models and answering chats with free text (it honours no grammar). It prints its argv
to its log first. STAND_IN_IGNORE_TERM=1: it ignores SIGTERM; STAND_IN_EXIT=N: it exits at once."""
import argparse
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

print(json.dumps(sys.argv[1:]), flush=True)
if os.environ.get("STAND_IN_EXIT"):
    sys.exit(int(os.environ["STAND_IN_EXIT"]))
if os.environ.get("STAND_IN_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
parser = argparse.ArgumentParser()
parser.add_argument("command", nargs=2)  # serve api_server
parser.add_argument("model_dir")
parser.add_argument("--model-name", default="imelodist")
parser.add_argument("--chat-template")
parser.add_argument("--server-name", default="0.0.0.0")
parser.add_argument("--server-port", type=int, default=23333)
parser.add_argument("--api-keys", nargs="*")
args, _ = parser.parse_known_args()
ANSWER = "Here is a cheerful tune for you: X:1 T:Free M:6/8 K:G GAB c2 d | e3 d3 |]"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        print("request", self.command, self.path, flush=True)

    def _json(self, code, payload):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self):
        if args.api_keys and self.headers.get("Authorization") not in [f"Bearer {k}" for k in args.api_keys]:
            self._json(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
            return False
        return True

    def do_GET(self):
        if self._authorised():
            self._json(200, {"object": "list", "data": [
                {"id": args.model_name, "object": "model", "created": 0, "owned_by": "lmdeploy"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if not self._authorised():
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": args.model_name}
        for word in ANSWER.split(" "):
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        done = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        self.wfile.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())


ThreadingHTTPServer((args.server_name, args.server_port), Handler).serve_forever()
