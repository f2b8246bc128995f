"""`python -m server`: flags named as vLLM names them, plus one flag per policy knob
(`--<policy>-<knob>`), generated from each policy's Knobs so adding a policy touches nothing here."""

from __future__ import annotations

import argparse
import json
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

log = logging.getLogger("server")


def parse_args(argv=None) -> argparse.Namespace:
    from balancer import BALANCERS
    from scheduling import SCHEDULERS
    from scheduling.output_length import MODES as OUTPUT_LENGTH_MODES
    from scheduling.registry import add_knob_flags

    from .reasoning import REASONING_PARSERS
    from .tool_parsers import TOOL_CALL_PARSERS
    p = argparse.ArgumentParser(prog="python -m server", description="OpenAI-compatible LLM server")
    p.add_argument("--model", default=None, help="local Hugging Face model directory (default: the built-in demo model)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("HALFFULL_API_KEY"))
    p.add_argument("--protect-metrics", action="store_true", help="require the API key on /metrics too")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "half", "float"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size per worker")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks per worker (overrides the size)")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--prefix-cache-hash-salt", default=os.environ.get("HALFFULL_PREFIX_CACHE_HASH_SALT", ""),
                   help="a secret mixed into the prefix cache's block digests, so they cannot be predicted "
                        "(or $HALFFULL_PREFIX_CACHE_HASH_SALT, which ps does not show)")
    p.add_argument("--attention-backend", default="auto",
                   choices=["auto", "flash-attn", "torch-flash", "triton", "cpu", "torch"])
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights")
    p.add_argument("--cpu-prepack-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: multiply with oneDNN over weights packed at load time (the default; faster than "
                        "F.linear at small batches, costs start-up time and ~1 MB per weight shape and row bucket)")
    p.add_argument("--cpu-parallel-min-gflop-per-token", type=float, default=0.05,
                   help="CPU: steps with at least this much matmul work per token (about the model's size: 0.05 "
                        "is a 25M-parameter model) run on all the worker's cores, lighter ones leave one core to "
                        "the server, whose work is per token (default 0.05; 0: every step takes all cores; 1000: "
                        "none does)")
    p.add_argument("--workers", type=int, default=None,
                   help="engine workers (default: one per GPU, or per --tensor-parallel-size GPUs; else 1)")
    p.add_argument("--devices", default=None,
                   help="comma-separated CUDA device ids, one worker each (its first, under tensor parallelism)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks per worker, each holding a shard of the model (GPUs, or CPU processes over gloo)")
    p.add_argument("--data-parallel-backend", "-dpb", default="mp", choices=["mp", "ray"],
                   help="mp: workers are processes on this machine; ray: workers are engine actors on a Ray "
                        "cluster (pip install -e '.[ray]'), each behind a local proxy process")
    p.add_argument("--data-parallel-size-local", "-dpl", type=int, default=None,
                   help="with the ray backend: how many of the --workers run on this machine as usual (the "
                        "first ones; default 0), the rest on the Ray cluster")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="the Ray cluster's head (HOST:PORT; default $RAY_ADDRESS, else the cluster this "
                        "machine is a node of)")
    p.add_argument("--structured-outputs-backend", default="auto", choices=["auto", "xgrammar", "guidance"],
                   help="grammar engine for structured outputs (auto: guidance, see BENCHMARKS.md)")
    p.add_argument("--scheduler", default="fcfs", choices=sorted(SCHEDULERS))
    p.add_argument("--balancer", default="round-robin", choices=sorted(BALANCERS))
    p.add_argument("--output-length", default="history", choices=OUTPUT_LENGTH_MODES,
                   help="what output-length predictions may know (LARRY, SCLS, SAL): see scheduling/output_length.py")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="refuse new requests with 429 while this many wait for their first token")
    p.add_argument("--max-request-body-bytes", type=int, default=8 << 20)
    p.add_argument("--shutdown-grace-s", type=float, default=10.0,
                   help="on SIGTERM, how long in-flight requests may take to finish")
    p.add_argument("--allowed-origins", type=json_list, default=None,
                   help="""CORS: allowed origins as a JSON list (e.g. '["https://a.example"]'); off without it""")
    p.add_argument("--allowed-methods", type=json_list, default=["*"], help="CORS: allowed methods as a JSON list")
    p.add_argument("--allowed-headers", type=json_list, default=["*"], help="CORS: allowed headers as a JSON list")
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser')
    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_CALL_PARSERS),
                   help="how tool calls read in this model's output (hermes: Qwen2.5/Qwen3)")
    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split <think>...</think> into the message's `reasoning` field")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-log", metavar="DIR", default=None,
                   help="each worker appends one JSON line per step to DIR/worker-<id>.jsonl (loadgen simulate fit)")
    p.add_argument("--log-level", default="info")
    add_knob_flags(p, SCHEDULERS)
    add_knob_flags(p, BALANCERS)
    args = p.parse_args(argv)
    cors_flags = [f for f, given in (("--allowed-methods", args.allowed_methods != ["*"]),
                                     ("--allowed-headers", args.allowed_headers != ["*"]),
                                     ("--allow-credentials", args.allow_credentials)) if given]
    if args.allowed_origins is None and cors_flags:
        p.error(f"{', '.join(cors_flags)} without --allowed-origins: CORS is off unless origins are given")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        p.error("--enable-auto-tool-choice needs --tool-call-parser")
    if args.data_parallel_backend == "mp" and args.data_parallel_size_local is not None:
        p.error("--data-parallel-size-local needs --data-parallel-backend ray (with mp every worker is local)")
    if args.data_parallel_backend == "ray":
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            p.error("--data-parallel-backend ray needs Ray: pip install -e '.[ray]'")
        workers, local = args.workers or 1, args.data_parallel_size_local or 0
        if not 0 <= local <= workers:
            p.error(f"--data-parallel-size-local must be between 0 and --workers ({workers})")
        if args.devices and len(args.devices.split(",")) != local:
            p.error("with the ray backend, --devices lists the local workers' devices: one per "
                    "--data-parallel-size-local")
    return args


def json_list(text: str) -> list[str]:
    """A flag's JSON list of strings, as vLLM takes its CORS flags."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value


def worker_devices(args) -> list[str]:
    """The device of each worker on this machine (with the ray backend, of the local ones only)."""
    if args.devices:
        return [f"cuda:{d.strip()}" for d in args.devices.split(",")]
    n = (args.workers or None) if args.data_parallel_backend == "mp" else args.data_parallel_size_local or 0
    import torch
    if torch.cuda.is_available():  # worker i's ranks on GPUs i*tp .. i*tp+tp-1
        tp, count = args.tensor_parallel_size, torch.cuda.device_count()
        n = max(1, count // tp) if n is None else n
        return [f"cuda:{i * tp % count}" for i in range(n)]
    return ["cpu"] * (1 if n is None else n)


def main(argv=None) -> None:
    args = parse_args(argv)
    level = getattr(logging, args.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvicorn

    from balancer import BALANCERS
    from engine.config import EngineArgs
    from engine.demo import ensure_demo_model
    from engine.tokenizer import load_tokenizer
    from scheduling import SCHEDULERS
    from scheduling.registry import knob_values

    from .app import AppState, ServerConfig, build_app
    from .engine_client import EngineClient
    from .middleware import CorsConfig, add_middleware
    from .server_info import server_info, server_settings

    model_path = Path(args.model) if args.model else ensure_demo_model()
    if not (model_path / "config.json").is_file():
        raise SystemExit(f"error: no config.json in {model_path}: --model must be a local Hugging Face model directory")
    name = args.served_model_name or (args.model or "halffull-demo")
    if args.tensor_parallel_size < 1:
        raise SystemExit("error: --tensor-parallel-size must be at least 1")
    engine_args = EngineArgs(
        dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gb=args.kv_cache_gb,
        num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=args.enable_prefix_caching,
        prefix_cache_hash_salt=args.prefix_cache_hash_salt,
        scheduler=args.scheduler, scheduler_knobs=knob_values(args, SCHEDULERS, args.scheduler),
        output_length=args.output_length,
        attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
        load_format=args.load_format, tensor_parallel_size=args.tensor_parallel_size, seed=args.seed,
        cpu_parallel_min_gflop_per_token=args.cpu_parallel_min_gflop_per_token,
        cpu_prepack_weights=args.cpu_prepack_weights,
        step_log=args.step_log, structured_outputs_backend=args.structured_outputs_backend)
    devices = worker_devices(args)
    ray_workers = (args.workers or 1) - len(devices) if args.data_parallel_backend == "ray" else 0
    tokenizer = load_tokenizer(model_path)
    vocab_size = json.loads((model_path / "config.json").read_text())["vocab_size"]

    @asynccontextmanager
    async def lifespan(app):
        client = EngineClient(str(model_path), engine_args, devices, args.balancer,
                              knob_values(args, BALANCERS, args.balancer), args.seed, level, ray_workers,
                              args.ray_address or "auto")
        ready = await client.start()
        for r in ready:
            log.info("worker %d ready on %s (node %s): %d KV blocks of %d tokens (%d tokens), attention %s, "
                     "max_model_len %d", r.worker_id, r.device, r.node, r.num_kv_blocks, r.block_size,
                     r.num_kv_blocks * r.block_size, r.attention_backend, r.max_model_len)
        log.info("serving %s (%s) with %d worker(s), scheduler %s, balancer %s, at http://%s:%d/v1",
                 name, model_path, len(ready), args.scheduler, args.balancer, args.host, args.port)
        app.state.server_info = server_settings(args, engine_args, ready, str(model_path))
        app.state.halffull = AppState(client, tokenizer, ServerConfig(
            served_model_name=name, max_model_len=ready[0].max_model_len, vocab_size=vocab_size,
            api_key=args.api_key, protect_metrics=args.protect_metrics,
            max_queued_requests=args.max_queued_requests, max_request_body_bytes=args.max_request_body_bytes,
            scheduler=args.scheduler, honors_priority=SCHEDULERS[args.scheduler].honors_priority,
            tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
            reasoning_parser=args.reasoning_parser, structured_outputs_backend=args.structured_outputs_backend))
        try:
            yield
        finally:
            await client.shutdown(args.shutdown_grace_s)
            log.info("shut down cleanly")

    app = build_app(lifespan)
    add_middleware(app, None if args.allowed_origins is None else CorsConfig(
        args.allowed_origins, args.allowed_methods, args.allowed_headers, args.allow_credentials))
    app.add_route("/server_info", server_info, methods=["GET"])

    def stop_accepting():
        if app.state.halffull is not None:
            app.state.halffull.client.stop_accepting(args.shutdown_grace_s)
    # The client fails what is still running when the grace period ends, so that each connection ends with a
    # clean error; uvicorn's own deadline, which would cut connections, is only the backstop.
    config = uvicorn.Config(app, host=args.host, port=args.port, loop="uvloop", http="httptools",
                            access_log=False, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_grace_s + 5.0)
    server = _clean_exit_server(stop_accepting)(config)
    server.run()
    if not server.started:
        raise SystemExit(1)


def _clean_exit_server(on_shutdown):
    import contextlib
    import signal

    import uvicorn

    class CleanExitServer(uvicorn.Server):
        """uvicorn re-raises SIGINT/SIGTERM after a graceful shutdown, so the process would die by
        the signal; a server that shut down cleanly should exit 0. `on_shutdown` runs as shutdown begins,
        before uvicorn waits for the open connections."""

        async def shutdown(self, sockets=None):
            on_shutdown()
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    return CleanExitServer
