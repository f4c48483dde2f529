"""
Serving throughput and latency of the real server (python -m scripts.chat_web) in one run:
  1. aggregate generated tokens/s with 1, 4, 16 and 32 concurrent streaming clients, and the ratio vs 1 client
     (target on CPU: >= 6x at 16 clients)
  2. p50/p95 time to first token per concurrency level (client side: request sent -> first content chunk)
  3. failed requests over >= 500 requests at concurrency 32 (must be 0)
  4. replicas in worker processes (--cpu-workers): aggregate tokens/s of 2 workers at 2N clients against 1
     worker at N clients (--scaling-clients N, default 16; target >= 1.3x on 2 cores, where the 2 workers and
     the HTTP front share 2 cores; on 8 GPUs each worker has a GPU and a core of its own)
  5. overload: 16x the batch slots of clients for 60 s against the server's own admission limits: completed
     tokens/s against the best level of stage 1 (target >= 85%), 503 share, p95 latency of admitted requests,
     admitted requests that failed (must be 0)
  6. prefix reuse: time to first token of turn 5 of a chat with ~950 tokens of history, with the prefix
     cache and without (target >= 3x lower with), and the hit rate from /metrics

python dev/bench_serve.py                                   a temporary tiny sft checkpoint, all levels
python dev/bench_serve.py --base-dir ~/.cache/nanochat -g d20 --max-tokens 64    a real sft checkpoint
python dev/bench_serve.py --levels 1,16 --requests-per-level 64 --client openai  quicker; through the openai SDK

Each client streams /v1/chat/completions (stream_options.include_usage, so tokens come from the usage chunk)
in a loop until its share of the level's requests is done. A request fails on an exception, a non-200
status, a missing finish_reason or a missing usage. Prints a table and ends with one JSON line.

The default client parses SSE by hand over httpx: on a 2-core CPU the openai SDK's per-chunk parsing costs
about twice the client CPU per token, which the server (about one core: its Python threads share the GIL)
then lacks. The CPU columns (cores used by this process and by the server during a level) show which side
is the bottleneck. On a 2-core machine, --server-cpus 0 (the server on one core, the clients on the
other) keeps the server's threads and the clients from competing for the same core.
"""

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import psutil

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = ["the sea", "a fox", "numbers", "the weather", "music", "a small town", "the moon", "coffee", "trains", "bees"]
ASKS = ["Tell me about {}.", "Write a short poem about {}.", "What do you know about {}?", "Describe {} in one line."]
PROMPTS = [ask.format(topic) for topic in TOPICS for ask in ASKS]


def make_tiny_checkpoint(base_dir, n_layer=2, n_embd=32):
    """Tokenizer + a random sft model whose replies practically never end before max_tokens."""
    import torch

    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import RustBPETokenizer
    corpus = [" ".join(PROMPTS) * 10, "the quick brown fox jumps over the lazy dog. " * 30, "1 + 2 = 3, 45 67 890. " * 20]
    tokenizer = RustBPETokenizer.train_from_iterator(iter(corpus), 320)
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=1024, vocab_size=tokenizer.get_vocab_size(), n_layer=n_layer, n_head=2, n_kv_head=2,
                       n_embd=n_embd)
    model = GPT(config)
    model.init_weights()
    # Peaked logits, with the terminal tokens' pinned at 0 (zero weight rows), far below the top ones
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    with torch.no_grad():
        for token in (tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")):
            model.lm_head.weight[token] = 0.0
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", f"d{n_layer}"), 1, model.state_dict(), None,
                    {"model_config": model.config_dict()})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, base_dir, port, log_file, extra=(), env=None):
    environment = dict(os.environ, NANOCHAT_BASE_DIR=base_dir)
    environment.pop("NANOCHAT_API_KEYS", None)  # loopback without keys: auth is off
    # The benchmark is one caller firing hundreds of requests a minute with up to 32 in flight; lift the
    # admission limits (concurrent requests, queue, per-key rate limit) so it measures generation, not 429/503
    # (the overload stage sets its own).
    environment.update({"NANOCHAT_MAX_CONCURRENT_REQUESTS": "1024", "NANOCHAT_MAX_QUEUED_REQUESTS": "4096",
                        "NANOCHAT_RATE_LIMIT_MAX_REQUESTS": "1000000", **(env or {})})
    env = environment
    cmd = [sys.executable, "-m", "scripts.chat_web", "-i", "sft", "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), *shlex.split(args.server_args), *extra] + \
        (["-g", args.model_tag] if args.model_tag else [])
    pin = (lambda: os.sched_setaffinity(0, args.server_cpus)) if args.server_cpus else None  # before torch starts
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                               preexec_fn=pin)  # noqa: PLW1509 (the child only makes a syscall before exec)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1, trust_env=False).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(process)
    log_file.seek(0)
    raise SystemExit(f"error: the server did not become healthy (exit code {process.returncode}):\n{log_file.read()[-3000:]}")


def stop_server(process):
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def request_body(model, prompt, max_tokens):
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}}


async def stream_httpx(http, model, prompt, max_tokens):
    """One streamed request, SSE parsed by hand: (completion tokens, or None if it failed; seconds to first content)."""
    t0, ttft, finish, usage = time.perf_counter(), None, None, None
    async with http.stream("POST", "/v1/chat/completions", json=request_body(model, prompt, max_tokens)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                if ttft is None and choice["delta"].get("content"):
                    ttft = time.perf_counter() - t0
                finish = choice.get("finish_reason") or finish
    return (usage["completion_tokens"] if finish and usage else None), ttft


async def stream_openai(client, model, prompt, max_tokens):
    """The same through the official SDK."""
    t0, ttft, finish, usage = time.perf_counter(), None, None, None
    stream = await client.chat.completions.create(**request_body(model, prompt, max_tokens))
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if ttft is None and choice.delta.content:
                ttft = time.perf_counter() - t0
            finish = choice.finish_reason or finish
    return (usage.completion_tokens if finish and usage else None), ttft


async def run_level(args, url, model, concurrency, num_requests, server):
    """num_requests split over `concurrency` looping clients; returns the level's figures."""
    http = httpx.AsyncClient(base_url=url + "/v1" if args.client == "openai" else url, trust_env=False,
                             timeout=httpx.Timeout(args.request_timeout),
                             limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
    if args.client == "openai":
        from openai import AsyncOpenAI
        sdk = AsyncOpenAI(base_url=url + "/v1", api_key="unused", http_client=http, max_retries=0)
        one_request = lambda prompt: stream_openai(sdk, model, prompt, args.max_tokens)
    else:
        one_request = lambda prompt: stream_httpx(http, model, prompt, args.max_tokens)
    tokens, ttfts, failed, errors = 0, [], 0, {}

    async def client(index):
        nonlocal tokens, failed
        rng = random.Random(index)
        for _ in range(num_requests // concurrency + (index < num_requests % concurrency)):
            try:
                count, ttft = await one_request(rng.choice(PROMPTS))
            except Exception as e:  # noqa: BLE001 (any failure counts; the progress line lists them)
                count, ttft = None, None
                status = getattr(e, "status_code", None) or getattr(getattr(e, "response", None), "status_code", None)
                kind = f"HTTP {status}" if status else type(e).__name__
                errors[kind] = errors.get(kind, 0) + 1
            if count is None:
                failed += 1
            else:
                tokens += count
                ttfts.append(ttft)

    server_cpu = lambda: sum(server.cpu_times()[:2])  # user + system seconds, all threads
    cpu0, server_cpu0, t0 = time.process_time(), server_cpu(), time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    seconds, client_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    server_cpu_seconds = server_cpu() - server_cpu0
    await http.aclose()
    ttfts = sorted(t for t in ttfts if t is not None)
    pct = lambda q: 1000 * ttfts[math.ceil(q * len(ttfts)) - 1] if ttfts else float("nan")  # nearest rank
    return {"level": concurrency, "requests": num_requests, "failed": failed, "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds, "ttft_p50_ms": pct(0.5), "ttft_p95_ms": pct(0.95),
            "client_cpu": client_cpu / seconds, "server_cpu": server_cpu_seconds / seconds, "errors": errors}


def scrape_metrics(url):
    """A few server-side figures from /metrics: statuses by count, TTFT histogram count and mean."""
    try:
        text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    except httpx.HTTPError as e:  # e.g. the server died mid-run: the client-side figures still stand
        return {"statuses": {}, "ttft_count": 0, "ttft_mean_ms": None, "error": f"{type(e).__name__}: {e}"}
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    statuses = {}
    for name, value in samples.items():
        if name.startswith("nanochat_requests_total{"):
            status = name.split('status="')[1].split('"')[0]
            statuses[status] = statuses.get(status, 0) + int(value)
    count = samples.get("nanochat_time_to_first_token_seconds_count", 0)
    mean = 1000 * samples.get("nanochat_time_to_first_token_seconds_sum", 0) / count if count else float("nan")
    return {"statuses": statuses, "ttft_count": int(count), "ttft_mean_ms": None if math.isnan(mean) else round(mean, 1)}


def print_table(rows, base_tps):
    print(f"\n{'clients':>7} {'requests':>8} {'failed':>6} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} "
          f"{'speedup':>7} {'TTFT p50 ms':>11} {'TTFT p95 ms':>11} {'client CPU':>10} {'server CPU':>10}")
    for r in rows:
        speedup = r["tokens_per_second"] / base_tps if base_tps else float("nan")
        print(f"{r['level']:>7} {r['requests']:>8} {r['failed']:>6} {r['tokens']:>7} {r['seconds']:>8.1f} "
              f"{r['tokens_per_second']:>9,.0f} {speedup:>6.2f}x {r['ttft_p50_ms']:>11.0f} {r['ttft_p95_ms']:>11.0f} "
              f"{r['client_cpu']:>10.2f} {r['server_cpu']:>10.2f}")


def summarize(args, rows, base_tps, server, seconds):
    fmt = lambda key, digits: {str(r["level"]): None if math.isnan(r[key]) else round(r[key], digits) for r in rows}
    at_32 = next((r for r in rows if r["level"] == 32), None)
    speedup = {str(r["level"]): round(r["tokens_per_second"] / base_tps, 2) for r in rows} if base_tps else {}
    return {"bench": "serve", "client": args.client, "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
            "server_cpus": sorted(args.server_cpus) if args.server_cpus else None,
            "tokens_per_second": fmt("tokens_per_second", 1), "speedup": speedup, "ttft_p50_ms": fmt("ttft_p50_ms", 1),
            "ttft_p95_ms": fmt("ttft_p95_ms", 1), "failed": sum(r["failed"] for r in rows),
            "requests_at_32": at_32["requests"] if at_32 else 0, "failed_at_32": at_32["failed"] if at_32 else None,
            "speedup_16_target_met": speedup.get("16", 0) >= 6.0, "client_cpu_cores": fmt("client_cpu", 2),
            "server_cpu_cores": fmt("server_cpu", 2), "server": server, "seconds_total": round(seconds, 1)}


async def warm_up(args, url):
    """The served model's name, after a few requests (first forwards, allocator, connection setup)."""
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=args.request_timeout) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        for prompt in PROMPTS[:3]:
            response = await http.post("/v1/chat/completions", json=request_body(model, prompt, args.max_tokens))
            if response.status_code != 200:
                raise SystemExit(f"error: a warm-up request failed: HTTP {response.status_code} {response.text[:500]}")
    return model


async def benchmark(args, url, pid):
    model = await warm_up(args, url)
    rows = []
    for level in args.levels:
        num_requests = args.requests_at_32 if level == 32 else max(args.requests_per_level, level)
        print(f"level {level:>2}: {num_requests} requests from {level} client(s)...", end=" ", flush=True)
        r = await run_level(args, url, model, level, num_requests, psutil.Process(pid))
        print(f"{r['seconds']:.1f} s, {r['tokens_per_second']:,.0f} tok/s, {r['failed']} failed"
              + (f" {r['errors']}" if r["errors"] else ""), flush=True)
        rows.append(r)
    return model, rows


def worker_scaling(args, base_dir, log_file):
    """
    Aggregate tokens/s of 1 worker process at N clients and of 2 at 2N clients. Without --base-dir it serves
    a model of --scaling-depth x --scaling-width: a decode step of the tiny model is all Python overhead, and
    on 2 cores the front, the clients and two such workers just take turns; with a step that computes,
    as on a GPU, the second worker brings its own core's work.
    """
    base_dir = compute_model_dir(args, base_dir)
    rows = []
    for workers in (1, 2):
        clients = args.scaling_clients * workers
        process, url = start_server(args, base_dir, free_port(), log_file, extra=["--cpu-workers", str(workers)])
        try:
            model = asyncio.run(warm_up(args, url))
            print(f"{workers} worker process(es): {args.requests_per_level * workers} requests from {clients} clients...",
                  end=" ", flush=True)
            server = psutil.Process(process.pid)
            r = asyncio.run(run_level(args, url, model, clients, args.requests_per_level * workers, server))
        finally:
            stop_server(process)
        r["workers"] = workers
        print(f"{r['seconds']:.1f} s, {r['tokens_per_second']:,.0f} tok/s, {r['failed']} failed"
              + (f" {r['errors']}" if r["errors"] else ""), flush=True)
        rows.append(r)
    return rows


def compute_model_dir(args, base_dir):
    """The model the worker-scaling and prefix stages serve: a step that computes, as on a GPU (see worker_scaling)."""
    if args.base_dir:
        return base_dir
    model_dir = os.path.join(base_dir, "compute")
    if not os.path.exists(model_dir):
        make_tiny_checkpoint(model_dir, args.scaling_depth, args.scaling_width)
    return model_dir


async def chat_turns(http, model, first_message, turns, max_tokens):
    """A chat of `turns` turns (each resending the whole history); returns the last turn's time to first token (s)."""
    messages = [{"role": "user", "content": first_message}]
    for turn in range(turns):
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        t0, ttft, reply = time.perf_counter(), None, ""
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise SystemExit(f"error: turn {turn + 1} got {response.status_code}: {(await response.aread())[:500]}")
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:]).get("choices", []):
                        if choice["delta"].get("content"):
                            ttft = ttft or time.perf_counter() - t0
                            reply += choice["delta"]["content"]
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": PROMPTS[turn]}]
    return ttft


def prefix_reuse(args, base_dir, log_file):
    """
    Time to first token of turn 5 of chats whose first message is --prefix-history-tokens long, with the prefix
    cache (the history's KV is copied) and without (--prefix-cache-rows 0: re-read every turn), and the hit rate.
    """
    from nanochat.tokenizer import RustBPETokenizer
    model_dir = compute_model_dir(args, base_dir)
    tokenizer = RustBPETokenizer.from_directory(os.path.join(model_dir, "tokenizer"))
    words, first = " ".join(PROMPTS).split(), []
    while len(tokenizer.encode(" ".join(first))) < args.prefix_history_tokens:
        first.append(words[len(first) % len(words)])
    results = {}
    for rows in (8, 0):
        process, url = start_server(args, model_dir, free_port(), log_file, extra=["--prefix-cache-rows", str(rows)])
        try:
            async def chats():
                async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=args.request_timeout) as http:
                    model = (await http.get("/v1/models")).json()["data"][0]["id"]
                    return [await chat_turns(http, model, " ".join(first[i:] + first[:i]), 5, 16) for i in range(3)]
            ttfts = sorted(asyncio.run(chats()))
            text = httpx.get(url + "/metrics", trust_env=False).text
            hit_rate = float(next(line.split()[-1] for line in text.splitlines()
                                  if line.startswith("nanochat_prefix_cache_hit_rate ")))
        finally:
            stop_server(process)
        results[rows] = {"turn5_ttft_ms": round(1000 * ttfts[1], 1), "hit_rate": round(hit_rate, 3)}
        print(f"prefix cache rows {rows}: turn-5 TTFT (median of 3 chats) {results[rows]['turn5_ttft_ms']} ms, "
              f"hit rate {hit_rate:.2f}", flush=True)
    ratio = results[0]["turn5_ttft_ms"] / results[8]["turn5_ttft_ms"]
    print(f"turn-5 TTFT without reuse / with: {ratio:.1f}x")
    return {"history_tokens": args.prefix_history_tokens, "with_reuse": results[8], "without_reuse": results[0],
            "ttft_ratio": round(ratio, 2), "target_met": ratio >= 3}


def overload(args, base_dir, log_file, peak_tps):
    """
    --overload-factor x the batch slots of looping clients for --overload-seconds against the server's own
    admission limits (a request past them gets 503 and its client retries after 50 ms): completed tokens/s
    against the best level of stage 1, the 503 share, and p95 latency and failures of admitted requests.
    """
    env = {"NANOCHAT_MAX_CONCURRENT_REQUESTS": str(args.max_batch_size), "NANOCHAT_MAX_QUEUED_REQUESTS": str(args.max_batch_size)}
    process, url = start_server(args, base_dir, free_port(), log_file, env=env)
    server = psutil.Process(process.pid)
    server_cpu = lambda: sum(server.cpu_times()[:2])  # user + system seconds, all threads
    clients = args.overload_factor * args.max_batch_size
    done = {"tokens": 0, "admitted": 0, "refused": 0, "failed": 0, "latencies": [], "errors": {}}

    async def client(http, model, index, deadline):
        rng = random.Random(index)
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                count, _ = await stream_httpx(http, model, rng.choice(PROMPTS), args.max_tokens)
            except httpx.HTTPStatusError as e:
                if e.response.status_code == 503:
                    done["refused"] += 1
                    await asyncio.sleep(0.05)
                    continue
                count, kind = None, f"HTTP {e.response.status_code}"
            except Exception as e:  # noqa: BLE001 (an admitted request that did not complete)
                count, kind = None, type(e).__name__
            done["admitted"] += 1
            if count is None:
                done["failed"] += 1
                done["errors"][kind] = done["errors"].get(kind, 0) + 1
            else:
                done["tokens"] += count
                done["latencies"].append(time.perf_counter() - t0)

    async def run():
        # One connection per client, each in its own pool: one pool of 512 connections costs the client a full
        # core in httpcore's per-request scans of the pool, which on 2 cores the server then lacks.
        https = [httpx.AsyncClient(base_url=url, trust_env=False, timeout=args.request_timeout, verify=False,  # plain http: no
                                   # TLS context to build (loading the CA bundle 512 times takes a minute)
                                   limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
                 for _ in range(clients)]
        model = (await https[0].get("/v1/models")).json()["data"][0]["id"]
        cpu0, server_cpu0, t0 = time.process_time(), server_cpu(), time.perf_counter()
        await asyncio.gather(*(client(http, model, i, t0 + args.overload_seconds) for i, http in enumerate(https)))
        seconds = time.perf_counter() - t0
        cpu = (time.process_time() - cpu0) / seconds, (server_cpu() - server_cpu0) / seconds
        await asyncio.gather(*(http.aclose() for http in https))
        return seconds, cpu

    try:
        print(f"overload: {clients} clients for {args.overload_seconds:g} s against {args.max_batch_size} slots...",
              end=" ", flush=True)
        seconds, (client_cpu, server_cpu_cores) = asyncio.run(run())
    finally:
        stop_server(process)
    latencies = sorted(done["latencies"])
    tps = done["tokens"] / seconds
    result = {"clients": clients, "seconds": round(seconds, 1), "tokens_per_second": round(tps, 1),
              "of_peak": round(tps / peak_tps, 3) if peak_tps else None,
              "refused_share": round(done["refused"] / max(1, done["refused"] + done["admitted"]), 3),
              "admitted": done["admitted"], "admitted_failed": done["failed"], "admitted_errors": done["errors"],
              "admitted_p95_latency_ms": round(1000 * latencies[math.ceil(0.95 * len(latencies)) - 1], 1) if latencies else None,
              "client_cpu_cores": round(client_cpu, 2), "server_cpu_cores": round(server_cpu_cores, 2)}
    result["target_met"] = bool(peak_tps) and tps >= 0.85 * peak_tps and done["failed"] == 0
    print(f"{tps:,.0f} tok/s ({result['of_peak']} of peak), {result['refused_share']:.0%} refused, "
          f"{done['failed']} admitted failed {done['errors'] or ''}, p95 {result['admitted_p95_latency_ms']} ms, "
          f"CPU cores: client {result['client_cpu_cores']}, server {result['server_cpu_cores']}", flush=True)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--base-dir", default=None, help="NANOCHAT_BASE_DIR with sft checkpoints (default: a temporary tiny one)")
    p.add_argument("-g", "--model-tag", default=None, help="sft model tag (default: the largest)")
    p.add_argument("--levels", default="1,4,16,32", help="comma-separated client counts")
    p.add_argument("--requests-per-level", type=int, default=256, help="requests at each level except 32")
    p.add_argument("--requests-at-32", type=int, default=512, help="requests at concurrency 32 (the failure check)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--client", default="httpx", choices=["httpx", "openai"], help="hand-parsed SSE or the openai SDK")
    p.add_argument("--server-args", default="", help="more chat_web flags for every server, e.g. '--cpu-workers 1'")
    p.add_argument("--server-cpus", default=None, help="pin the server to these CPU ids, e.g. 0 (default: not pinned)")
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument("--startup-timeout", type=float, default=180)
    p.add_argument("--scaling-clients", type=int, default=16,
                   help="worker scaling: N clients for 1 worker process, 2N for 2 (0: skip the stage)")
    p.add_argument("--scaling-depth", type=int, default=4, help="worker scaling: layers of the temporary model")
    p.add_argument("--scaling-width", type=int, default=512, help="worker scaling: width of the temporary model")
    p.add_argument("--prefix-history-tokens", type=int, default=700,
                   help="prefix reuse: tokens of the chats' first message, ~950 of history by turn 5 (0: skip the stage)")
    p.add_argument("--overload-factor", type=int, default=16, help="overload: clients per batch slot (0: skip)")
    p.add_argument("--overload-seconds", type=float, default=60)
    args = p.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    args.server_cpus = {int(x) for x in args.server_cpus.split(",")} if args.server_cpus else None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        base_dir = os.path.expanduser(args.base_dir) if args.base_dir else tmp
        if not args.base_dir:
            print("writing a tiny sft checkpoint...", flush=True)
            make_tiny_checkpoint(tmp)
        with open(os.path.join(tmp, "server.log"), "w+") as log_file:
            process, url = start_server(args, base_dir, free_port(), log_file)
            try:
                model, rows = asyncio.run(benchmark(args, url, process.pid))
                server = scrape_metrics(url)
            finally:
                stop_server(process)
            peak = max((r["tokens_per_second"] for r in rows), default=None)
            overloaded = overload(args, base_dir, log_file, peak) if args.overload_factor else None
            scaling = worker_scaling(args, base_dir, log_file) if args.scaling_clients else []
            prefix = prefix_reuse(args, base_dir, log_file) if args.prefix_history_tokens else None
            log_file.seek(0)
            problems = [line for line in log_file if "Traceback" in line or "ERROR" in line or "failed" in line]
    server["log_problem_lines"] = len(problems)
    base_tps = next((r["tokens_per_second"] for r in rows if r["level"] == 1), None)
    seconds = time.perf_counter() - started
    print(f"\nmodel {model}, max_tokens {args.max_tokens}, client {args.client}, server statuses {server['statuses']}, "
          f"server TTFT count {server['ttft_count']} (mean {server['ttft_mean_ms']} ms), total {seconds:.0f} s")
    for line in problems[:5]:
        print("server log:", line.rstrip())
    print_table(rows, base_tps)
    summary = summarize(args, rows, base_tps, server, seconds)
    if scaling:
        one, two = scaling
        ratio = two["tokens_per_second"] / one["tokens_per_second"]
        print(f"\n{'workers':>7} {'clients':>7} {'requests':>8} {'failed':>6} {'tokens/s':>9} {'TTFT p95 ms':>11}")
        for r in scaling:
            print(f"{r['workers']:>7} {r['level']:>7} {r['requests']:>8} {r['failed']:>6} {r['tokens_per_second']:>9,.0f} "
                  f"{r['ttft_p95_ms']:>11.0f}")
        print(f"2 workers at {two['level']} clients / 1 worker at {one['level']}: {ratio:.2f}x")
        summary["worker_scaling"] = {"one_worker_tokens_per_second": round(one["tokens_per_second"], 1),
                                     "two_workers_tokens_per_second": round(two["tokens_per_second"], 1),
                                     "ratio": round(ratio, 2), "target_met": ratio >= 1.3,
                                     "failed": one["failed"] + two["failed"]}
    if overloaded:
        summary["overload"] = overloaded
    if prefix:
        summary["prefix_reuse"] = prefix
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
