"""`GET /server_info`: the settings a run was served with (scheduler, balancer, their knobs, workers,
KV size, token budget, model), so that `loadgen` can record them and `loadgen replay` can simulate
the same engine. Built once at startup from the parsed flags and the workers' ready reports."""

from __future__ import annotations

import dataclasses

from starlette.requests import Request
from starlette.responses import Response


def server_settings(args, engine_args, ready: list, model_path: str) -> dict:
    """`args`: the parsed flags; `engine_args`: the EngineArgs sent to workers; `ready`: WorkerReady
    of each worker."""
    from balancer import BALANCERS
    from scheduling import SCHEDULERS
    from scheduling.registry import knob_values
    sched_cls, sched_knobs = SCHEDULERS.lookup(args.scheduler, knob_values(args, SCHEDULERS, args.scheduler))
    bal_cls, bal_knobs = BALANCERS.lookup(args.balancer, knob_values(args, BALANCERS, args.balancer))
    first = ready[0]
    return {
        "model": model_path,
        "scheduler": args.scheduler,
        "scheduler_knobs": dataclasses.asdict(sched_knobs),
        "balancer": args.balancer,
        "balancer_knobs": dataclasses.asdict(bal_knobs),
        "seed": args.seed,
        "workers": [{"worker_id": r.worker_id, "device": r.device, "num_kv_blocks": r.num_kv_blocks,
                     "attention_backend": r.attention_backend, "node": r.node} for r in ready],
        "num_workers": len(ready),
        "num_kv_blocks": first.num_kv_blocks,
        "block_size": first.block_size,
        "max_model_len": first.max_model_len,
        "max_num_seqs": engine_args.max_num_seqs,
        "max_num_batched_tokens": engine_args.token_budget(first.device),
        "enable_prefix_caching": engine_args.enable_prefix_caching,
        "output_length": engine_args.output_length,
        "dtype": engine_args.dtype,
        "step_log": engine_args.step_log,
    }


async def server_info(request: Request) -> Response:
    from .app import json_response
    return json_response(request.app.state.server_info)
