"""halffull's load generator and benchmark report, after `vllm bench serve`.

    workload.py  workloads (Azure trace CSV, synthetic lengths, JSONL prompts) and arrival times
    prompts.py   prompts of an exact token length, from the server's tokenizer
    sse.py       incremental Server-Sent Events parsing
    client.py    one streamed, timed request
    transport.py the HTTP/1.1 connection pool under the client's httpx.AsyncClient
    scrape.py    the server's Prometheus /metrics, polled during a run
    metrics.py   per-request records and the summary (TTFT, TPOT, ITL, E2E, throughput, goodput)
    report.py    results.json, the terminal table and the plots
    bench.py     a live run (the default command); compare.py and sweep.py the other commands
    args.py      command-line options shared by the commands and the simulator
"""
