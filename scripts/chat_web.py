"""
Serve a chat model: the browser UI and an OpenAI-compatible API, one continuous-batching scheduler per replica.

python -m scripts.chat_web -i sft                                   UI + API on http://127.0.0.1:8000
python -m scripts.chat_web -i sft --config config.json --host 0.0.0.0   public: needs API keys (or --insecure)
python -m scripts.chat_web -i sft --num-gpus 8                      one model replica per GPU
python -m scripts.chat_web -i sft --speculative-proposals 4 --draft-model-tag d4   speculative decoding for lone requests

API keys come from config.json ("valid_api_keys") or NANOCHAT_API_KEYS=key1,key2. Clients send
"Authorization: Bearer <key>"; /health and /metrics stay open.
"""

import argparse
import dataclasses
import functools
import logging
import os
import sys
from urllib.parse import urlsplit

import torch

from nanochat.checkpoint_manager import (SOURCES, CheckpointError, find_largest_model, load_draft, load_model,
                                         speculative_flags_error)
from nanochat.common import DEVICE_TYPES, get_base_dir
from nanochat.serving.config import load_config, validate_config
from nanochat.serving.origins import is_loopback

# CLI flag -> config field: the UI and the API read the same (possibly overridden) bounds
SAMPLING_FLAGS = {"temperature": "default_temperature", "top_k": "default_top_k", "top_p": "default_top_p",
                  "max_tokens": "default_max_tokens", "min_temperature": "min_temperature",
                  "max_temperature": "max_temperature", "min_top_k": "min_top_k", "max_top_k": "max_top_k",
                  "min_top_p": "min_top_p", "max_top_p": "max_top_p"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a nanochat model: chat UI + OpenAI-compatible API")
    p.add_argument("-i", "--source", default="sft", choices=list(SOURCES), help="which checkpoints: base|mid|sft|rl")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (non-loopback needs API keys)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", default=None, help="server config JSON (keys, rate limits, sampling bounds)")
    p.add_argument("--num-gpus", type=int, default=None,
                   help="replicas, one worker process per GPU (default: 1 GPU if any, else CPU)")
    p.add_argument("--cpu-workers", type=int, default=None,
                   help="CPU: replicas in this many worker processes (default: 1 with 2+ cores, so generation has a "
                        "GIL of its own and keeps its pace however busy the HTTP front is; 0: one replica in the server "
                        "process, which starts a few seconds sooner)")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES, help="default: autodetect")
    p.add_argument("--max-batch-size", type=int, default=32, help="running sequences per replica")
    p.add_argument("--prefix-cache-rows", type=int, default=8,
                   help="KV rows per replica keeping finished conversations for the next turn to reuse (0: off)")
    p.add_argument("--prefill-chunk-tokens", type=int, default=512,
                   help="longer prompts are prefilled this many tokens per step, between decode steps of the others")
    p.add_argument("--speculative-proposals", type=int, default=0, help="draft tokens per target forward (0 = off)")
    p.add_argument("--draft-model-tag", default=None, help="a smaller model of the same source, or 'ngram'")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback host without API keys")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM/SIGINT: seconds running streams may finish (new and queued requests are refused "
                   "at once); a second signal exits immediately")
    p.add_argument("--cors-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="browser origins (e.g. https://app.example) that may call the API; others are refused")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads when serving on CPU (default: all cores but one, which the HTTP side needs)")
    for flag in SAMPLING_FLAGS:
        kind = int if "top_k" in flag or flag == "max_tokens" else float
        p.add_argument("--" + flag.replace("_", "-"), type=kind, default=None,
                       help=f"overrides config {SAMPLING_FLAGS[flag]}")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.error("--port must be in 1..65535")
    if args.max_batch_size < 1:
        p.error("--max-batch-size must be >= 1")
    if args.prefix_cache_rows < 0:
        p.error("--prefix-cache-rows must be >= 0")
    if args.prefill_chunk_tokens < 1:
        p.error("--prefill-chunk-tokens must be >= 1")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        p.error("--cpu-threads must be >= 1")
    if args.num_gpus is not None and args.num_gpus < 1:
        p.error("--num-gpus must be >= 1")
    if args.cpu_workers is not None and args.cpu_workers < 0:
        p.error("--cpu-workers must be >= 0")
    if not args.shutdown_timeout >= 0:
        p.error("--shutdown-timeout must be >= 0")
    for origin in args.cors_origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query):
            p.error(f"--cors-origins: {origin!r} is not an origin like https://app.example or http://localhost:3000")
    if error := speculative_flags_error(args.speculative_proposals, args.draft_model_tag):
        p.error(error)
    return args


def server_config(args):
    """config file + env + CLI overrides, validated; raises ValueError with the bad field named."""
    config = load_config(args.config)
    overrides = {field: getattr(args, flag) for flag, field in SAMPLING_FLAGS.items() if getattr(args, flag) is not None}
    config = dataclasses.replace(config, **overrides)
    for field in ("default_temperature", "min_temperature", "max_temperature", "default_top_p", "min_top_p", "max_top_p"):
        setattr(config, field, float(getattr(config, field)))
    return validate_config(config)


def replica_devices(args):
    """(one device per replica, whether replicas run in worker processes rather than in this process)."""
    device_type = args.device_type or ("cuda" if torch.cuda.is_available() else
                                       "mps" if torch.backends.mps.is_available() else "cpu")
    if device_type != "cuda":
        if args.num_gpus not in (None, 1):
            raise ValueError(f"--num-gpus {args.num_gpus} needs CUDA GPUs; this run uses {device_type}")
        if args.cpu_workers and device_type != "cpu":
            raise ValueError(f"--cpu-workers runs replicas on the CPU; this run uses {device_type}")
        workers = args.cpu_workers
        if workers is None:  # a flood of requests took a third of an in-process replica's rate (its GIL) on 2 cores
            workers = 1 if device_type == "cpu" and (os.cpu_count() or 1) >= 2 else 0
        return [torch.device(device_type)] * max(1, workers), workers > 0
    if args.cpu_workers:
        raise ValueError("--cpu-workers is for CPU serving; on CUDA every GPU gets a worker process (--num-gpus)")
    available = torch.cuda.device_count()
    wanted = args.num_gpus or 1
    if wanted > available:
        raise ValueError(f"--num-gpus {wanted} but torch sees {available} CUDA GPU(s)")
    return [torch.device("cuda", i) for i in range(wanted)], True


def build_replicas(args, config, devices, in_workers):
    """
    One replica per device, each with the config's request limits. On CUDA (and on a CPU by default) each
    runs in its own worker process, so replicas never share a GIL; otherwise the one replica runs in this
    process, on a thread. Returns (started replicas, tokenizer).
    """
    if in_workers:
        from nanochat.serving.workers import WorkerReplica, default_cpu_threads
        from nanochat.tokenizer import get_tokenizer
        spec = dict(source=args.source, model_tag=args.model_tag, step=args.step, draft_model_tag=args.draft_model_tag,
                    speculative_proposals=args.speculative_proposals, max_batch_size=args.max_batch_size,
                    prefill_chunk_tokens=args.prefill_chunk_tokens, prefix_cache_rows=args.prefix_cache_rows,
                    cpu_threads=args.cpu_threads or default_cpu_threads(len(devices)))
        replicas = [WorkerReplica(dict(spec, name=f"replica-{i}", device=str(device)), config.max_concurrent_requests,
                                  config.max_queued_requests) for i, device in enumerate(devices)]
        for replica in replicas:  # every worker loads its model at the same time
            replica.start()
        try:
            for replica in replicas:
                replica.wait_ready()
        except RuntimeError:
            for replica in replicas:
                replica.shutdown()
            raise
        return replicas, get_tokenizer()

    from nanochat.serving.scheduler import Scheduler
    # The event loop (HTTP, SSE, tokenizer) needs a core of its own: torch threads spinning on every core
    # slowed 16 streaming clients by ~25% on 2 cores (dev/bench_serve.py).
    if devices[0].type == "cpu":
        torch.set_num_threads(args.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
    model, tokenizer, _ = load_model(args.source, devices[0], "eval", model_tag=args.model_tag, step=args.step)
    draft = load_draft(args.source, args.draft_model_tag, devices[0])
    scheduler = Scheduler(model, tokenizer, max_batch_size=args.max_batch_size,
                          max_running_requests=config.max_concurrent_requests,
                          max_queued_requests=config.max_queued_requests, draft=draft,
                          speculative_proposals=args.speculative_proposals,
                          prefill_chunk_tokens=args.prefill_chunk_tokens, prefix_cache_rows=args.prefix_cache_rows,
                          name="replica-0")
    scheduler.start()
    return [scheduler], tokenizer


def main(argv=None):
    args = parse_args(argv)
    log = logging.getLogger("nanochat.serving")
    try:
        config = server_config(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: bad server config: {e}")
    if not config.valid_api_keys:
        if not is_loopback(args.host) and not args.insecure:
            sys.exit(f"error: refusing to listen on {args.host} without API keys: anyone who can reach it could use "
                     "the model. Set valid_api_keys in --config or NANOCHAT_API_KEYS, bind to 127.0.0.1, or pass "
                     "--insecure if the network is trusted.")
        log.warning(f"auth is OFF (no API keys configured); serving {args.host} "
                    f"{'only' if is_loopback(args.host) else '(--insecure)'}")
    try:
        devices, in_workers = replica_devices(args)
        model_tag = args.model_tag or find_largest_model(os.path.join(get_base_dir(), SOURCES[args.source]))
        schedulers, tokenizer = build_replicas(args, config, devices, in_workers)
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")

    import uvicorn

    from nanochat.serving.app import create_app
    from nanochat.serving.connections import GracefulServer, TimedH11Protocol
    app = create_app(schedulers, tokenizer, config, model_name=f"{args.source}-{model_tag}", bound_host=args.host,
                     cors_origins=args.cors_origins)
    where = "in worker processes" if in_workers else f"in this process, {torch.get_num_threads()} torch threads"
    log.info(f"serving {args.source}-{model_tag} on {len(devices)} replica(s) {[str(d) for d in devices]} ({where}), "
             f"max batch {args.max_batch_size}, speculative {args.speculative_proposals or 'off'}; "
             f"open http://{args.host}:{args.port}/")
    try:
        server = GracefulServer(uvicorn.Config(
            app, host=args.host, port=args.port, log_level="warning", access_log=False,
            http=functools.partial(TimedH11Protocol, header_timeout=config.header_timeout_seconds),
            timeout_keep_alive=config.keep_alive_seconds, limit_concurrency=config.max_connections,
            timeout_graceful_shutdown=args.shutdown_timeout + 5),  # a backstop: the app ends streams by then
            on_first_signal=lambda: app.state.nanochat.begin_shutdown(args.shutdown_timeout))
        server.run()
    finally:
        for scheduler in schedulers:
            scheduler.shutdown()


if __name__ == "__main__":
    main()
