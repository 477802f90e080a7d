#!/usr/bin/env bash
# Soak test of `paligemma serve` on loopback: N concurrent clients for D seconds against the tiny golden model.
# Every response is compared with the same request's sequential result (ids and text), so an error or a response
# mixed up between requests counts as a failure; the server's RSS is sampled at start, middle and end.
#
#   scripts/soak-serve.sh [--bin PATH] [--seconds 60] [--clients 8] [--concurrency 4] [--port 18080]
#
# --bin: the paligemma executable (a NativeAOT publish) or paligemma.dll (run with dotnet); default: the Release build.
# Requests go only to 127.0.0.1; the run is bounded by --seconds. Exit code 1 when any request failed.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="tools/PaliGemma.Cli/bin/Release/net10.0/paligemma.dll"
SECONDS_TOTAL=60 CLIENTS=8 CONCURRENCY=4 PORT=18080
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --seconds) SECONDS_TOTAL="$2"; shift 2 ;;
    --clients) CLIENTS="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
MODEL=tests/golden/tiny-mqa-56
[[ -d "$MODEL" ]] || { echo "missing $MODEL" >&2; exit 2; }
if [[ "$BIN" == *.dll ]]; then
  [[ -f "$BIN" ]] || { echo "build first: dotnet build tools/PaliGemma.Cli -c Release" >&2; exit 2; }
  RUN=(dotnet "$BIN")
else
  RUN=("$BIN")
fi

"${RUN[@]}" serve --model "$MODEL" --urls "http://127.0.0.1:$PORT" --max-concurrency "$CONCURRENCY" --max-queue 64 --quiet &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT

STATUS=0
python3 - "$PORT" "$SERVER" "$SECONDS_TOTAL" "$CLIENTS" "$MODEL" <<'PY' || STATUS=$?
import base64, http.client, json, sys, threading, time, uuid, os

port, pid, seconds, clients, model = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def rss_mib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return -1

def health():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/healthz")
    p = json.loads(c.getresponse().read())["process"]
    c.close()
    return {"heap_mib": round(p["gc_heap_bytes"] / 2**20, 1), "committed_mib": round(p["gc_committed_bytes"] / 2**20, 1), "gen2": p["gc_gen2_collections"], "threads": p["thread_pool_threads"]}

def multipart(image_path, fields):
    boundary = uuid.uuid4().hex
    parts = []
    with open(image_path, "rb") as f:
        data = f.read()
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{os.path.basename(image_path)}"\r\n'
                 f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"

def chat(image_path, prompt, extra):
    with open(image_path, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]}]}
    body.update(extra)
    return json.dumps(body).encode(), "application/json"

images = [f"{model}/{n}" for n in ("rgb_640x480.png", "gray_200x150.png", "rgba_300x200.png", "rgb_123x457.jpg")]
requests = []   # (name, path, body, content_type)
for i, img in enumerate(images):
    requests.append((f"caption-{i}", "/v1/generate", *multipart(img, {"prompt": "caption en", "max_new_tokens": "32"})))
    requests.append((f"sampled-{i}", "/v1/generate", *multipart(img, {"prompt": "answer en what is here?", "max_new_tokens": "32",
                                                                        "temperature": "0.9", "top_k": "40", "seed": str(11 + i)})))
    requests.append((f"detect-{i}", "/v1/generate", *multipart(img, {"task": "detect", "objects": "cat ; dog", "max_new_tokens": "24"})))
    requests.append((f"stream-{i}", "/v1/generate", *multipart(img, {"prompt": "ocr", "max_new_tokens": "24", "stream": "true"})))
    requests.append((f"chat-{i}", "/v1/chat/completions", *chat(img, "caption es", {"max_tokens": 24})))

def outcome(path, status, body, ctype):
    """What must match between runs: ids/text (generate), the streamed concatenation, or the chat content."""
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
    text = body.decode()
    if path == "/v1/chat/completions":
        r = json.loads(text)
        return ("chat", r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"])
    if ctype.startswith("text/event-stream"):
        tokens, result = [], None
        for block in text.split("\n\n"):
            if not block.strip():
                continue
            lines = dict(l.split(": ", 1) for l in block.split("\n"))
            if lines["event"] == "token":
                tokens.append(json.loads(lines["data"])["text"])
            elif lines["event"] == "result":
                result = json.loads(lines["data"])
            else:
                raise RuntimeError("error event: " + lines["data"])
        if "".join(tokens) != result["text"]:
            raise RuntimeError("streamed tokens do not add up to the result text")
        return ("stream", result["text"], tuple(result["generated_ids"]))
    r = json.loads(text)
    return ("json", r["text"], tuple(r["generated_ids"]), json.dumps(r.get("objects")))

def send(conn, req):
    name, path, body, ctype = req
    conn.request("POST", path, body=body, headers={"Content-Type": ctype})
    resp = conn.getresponse()
    data = resp.read()
    return outcome(path, resp.status, data, resp.getheader("Content-Type", ""))

# Health, then the sequential reference results.
deadline = time.time() + 60
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/healthz"); r = c.getresponse(); r.read()
        if r.status == 200:
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("server did not become healthy in 60 s")
    time.sleep(0.2)
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
expected = {}
for req in list(requests):
    try:
        expected[req[0]] = send(conn, req)
    except Exception as e:   # noqa: BLE001 - a request that fails alone says nothing about concurrency
        print(f"  dropped {req[0]}: fails when sent alone: {e}", file=sys.stderr)
        requests.remove(req)
conn.close()
if not requests:
    sys.exit("every request failed when sent alone")

samples = [("start", 0.0, rss_mib())]
lock = threading.Lock()
counts = {"requests": 0, "errors": 0, "mismatches": 0}
latencies = []
errors = []
start = time.time()
stop_at = start + seconds

def client(k):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i = k
    while time.time() < stop_at:
        req = requests[i % len(requests)]
        i += 7   # clients walk the request list in different orders
        t0 = time.time()
        try:
            got = send(conn, req)
            bad = got != expected[req[0]]
            with lock:
                counts["requests"] += 1
                latencies.append(time.time() - t0)
                if bad:
                    counts["mismatches"] += 1
                    errors.append(f"{req[0]}: mismatch")
        except Exception as e:   # noqa: BLE001 - every failure is counted and reported
            with lock:
                counts["requests"] += 1
                counts["errors"] += 1
                errors.append(f"{req[0]}: {e}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.close()

threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
for t in threads:
    t.start()
mid_taken = False
series, next_sample = [], start + 10
while any(t.is_alive() for t in threads):
    time.sleep(0.5)
    if not mid_taken and time.time() >= start + seconds / 2:
        samples.append(("middle", round(time.time() - start, 1), rss_mib()))
        mid_taken = True
    if time.time() >= next_sample:
        series.append({"t": round(time.time() - start), "rss_mib": round(rss_mib(), 1), **health()})
        next_sample += 10
for t in threads:
    t.join()
elapsed = time.time() - start
samples.append(("end", round(elapsed, 1), rss_mib()))
latencies.sort()
pct = lambda p: round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 1) if latencies else None
summary = {
    "clients": clients, "seconds": round(elapsed, 1), "distinct_requests": len(requests), **counts,
    "requests_per_second": round(counts["requests"] / elapsed, 1),
    "latency_ms_p50": pct(0.50), "latency_ms_p99": pct(0.99),
    "rss_mib": {name: round(v, 1) for name, _, v in samples},
    "every_10s": series,
}
print(json.dumps(summary))
for e in errors[:10]:
    print("  " + e, file=sys.stderr)
sys.exit(1 if counts["errors"] or counts["mismatches"] else 0)
PY
kill -TERM $SERVER
wait $SERVER || true
trap - EXIT
exit $STATUS
