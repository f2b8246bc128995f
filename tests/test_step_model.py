"""The step model (loadgen/step_model.py), its fit, its presets, and the engine's step log it is fitted on."""

import json

import numpy as np
import pytest

from engine import LLM, SamplingParams
from loadgen.step_model import (PRESETS, SPEED_WINDOW_S, SPREAD, MachineSpeed, StepModel, fit_main, fit_steps,
                                lag_correlation, read_step_logs)
from scheduling.step_cost import StepFeatures


def features(tokens: int, seqs: int, kv: int, pairs: int = 0) -> StepFeatures:
    return StepFeatures(tokens, seqs, 0, 0, kv, pairs)


def test_the_linear_model_is_the_special_case():
    m = StepModel(6e-3, 2e-5, 3e-6, 4e-8)  # the design's c0 + c1*T + c2*S + c3*K
    expected = 6e-3 + 300 * 2e-5 + 40 * 3e-6 + 90_000 * 4e-8  # attention pairs cost nothing here
    assert m.step_seconds(features(300, 40, 90_000, 10**9)) == pytest.approx(expected)
    with pytest.raises(ValueError):
        StepModel(-1e-3, 0, 0, 0)
    with pytest.raises(ValueError, match="no time"):
        StepModel(0, 0, 0, 1e-8)
    # A fit may leave only the per-sequence term: every step has a sequence, so steps still take time.
    assert StepModel(0, 0, 3e-6, 0).step_seconds(features(1, 1, 0)) == pytest.approx(3e-6)


def test_h100_preset_meets_the_design_anchors():
    m = PRESETS["h100-llama3-8b"][0]
    no_attention = lambda b: m.step_seconds(features(b, b, 0))  # noqa: E731 - the cuBLAS anchors exclude attention
    assert no_attention(1) == pytest.approx(6.1e-3, rel=0.01)
    assert no_attention(32) == pytest.approx(6.4e-3, rel=0.02)
    assert no_attention(256) == pytest.approx(8.5e-3, rel=0.01)
    # A 512-token chunk at 8k context: about 2.7 ms of attention FLOPs on top of its matmuls.
    chunk = StepFeatures.of_chunks([(8192 - 512, 512, False)])
    matmuls = m.step_seconds(features(512, 1, 0))
    assert m.step_seconds(chunk) - matmuls == pytest.approx(2.7e-3, rel=0.1)
    # Memory and compute overlap: a 256-sequence decode at 1k context costs less than their sum.
    decode = features(256, 256, 256 * 1024, 256 * 1024)
    memory = m.weights_s + m.c3 * decode.kv_tokens_read
    assert m.step_seconds(decode) == pytest.approx(m.c0 + m.c2 * 256 + memory)


def synthetic_log(model: StepModel, n: int, seed: int = 0, noise: float = 1e-3) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        seqs = int(rng.integers(1, 256))
        decode_kv = int(seqs * rng.integers(16, 4096))
        chunk = int(rng.integers(0, 2048)) if rng.random() < 0.5 else 0
        start = int(rng.integers(0, 8192))
        pairs = decode_kv + chunk * start + chunk * (chunk + 1) // 2
        f = features(seqs + chunk, seqs + (chunk > 0), decode_kv + start + chunk, pairs)
        rows.append({"batched_tokens": f.batched_tokens, "num_seqs": f.num_seqs, "kv_tokens_read": f.kv_tokens_read,
                     "attention_pairs": f.attention_pairs,
                     "seconds": model.step_seconds(f) * (1 + rng.normal(0, noise))})
    return rows


def test_fit_recovers_a_roofline_model_and_its_overlap():
    true = PRESETS["h100-llama3-8b"][0]
    model, quality = fit_steps(synthetic_log(true, 2000))
    assert model.overlap == 1.0
    for name in ("c1", "c3", "c4", "weights_s"):
        assert getattr(model, name) == pytest.approx(getattr(true, name), rel=0.05), name
    assert quality["heldout"]["steps"] == 400 and quality["heldout"]["mean_abs_rel_error"] < 0.01
    assert quality["standard_errors"]["c1"] < 0.05 * model.c1


def test_fit_chooses_the_sum_when_memory_and_compute_add_up():
    true = StepModel(2e-3, 3e-4, 1e-3, 1e-6, c4=5e-7)
    model, quality = fit_steps(synthetic_log(true, 1000, seed=1))
    assert model.overlap == 0.0
    for name in ("c1", "c2", "c3", "c4"):
        assert getattr(model, name) == pytest.approx(getattr(true, name), rel=0.05), name
    # The fixed cost is small beside steps of up to a second: right within its standard error.
    assert abs(model.c0 - true.c0) < 4 * quality["standard_errors"]["c0"]


def test_offline_llm_writes_a_step_log_the_fit_reads(tmp_path, tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", num_kv_blocks=128, max_num_batched_tokens=64,
              step_log=str(tmp_path))
    prompts = [[5 + i] * (20 + 30 * i) for i in range(4)]
    llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))
    rows = read_step_logs(tmp_path)
    assert (tmp_path / "worker-0.jsonl").exists() and len(rows) >= 40
    assert sorted(a[3] for r in rows for a in r["arrived"]) == [len(p) for p in prompts]
    got = {}
    for r in rows:
        f = StepFeatures.of_chunks([(s, n, False) for _, s, n, _ in r["chunks"]])
        assert (r["batched_tokens"], r["kv_tokens_read"], r["attention_pairs"]) == \
               (f.batched_tokens, f.kv_tokens_read, f.attention_pairs)
        assert r["batched_tokens"] <= 64 and r["prefill_tokens"] + r["decode_seqs"] <= r["batched_tokens"]
        for rid, *_, token in r["chunks"]:
            got[rid] = got.get(rid, 0) + token
    assert sorted(got.values()) == [40] * 4  # one token per step that finished a chunk, 40 each
    assert rows[1]["gap_s"] is not None and rows[1]["busy_before"]
    json.dumps(fit_steps(rows)[0].as_dict())  # enough varied steps to fit


def test_fit_separates_the_machine_speed_per_window_from_the_per_step_spread():
    true = StepModel(2e-3, 3e-4, 1e-3, 1e-6, c4=5e-7)
    rows = synthetic_log(true, 2000, seed=2)
    # 40 steps per SPEED_WINDOW_S of wall time, the machine alternately 20% slower and faster.
    for i, r in enumerate(rows):
        r["start"] = 1000.0 + i * SPEED_WINDOW_S / 40
        r["seconds"] *= 1.2 if (i // 40) % 2 else 0.8
    model, _ = fit_steps(rows)
    speed = np.array(model.speed_spread)
    assert speed.mean() == pytest.approx(1.0)
    assert speed[:45] == pytest.approx(0.8, rel=0.02) and speed[55:] == pytest.approx(1.2, rel=0.02)
    step = np.array(model.step_spread)
    assert step[1] > 0.95 and step[-2] < 1.05, "what the windows explain (20%) is not in the per-step spread"
    assert model.speed_correlation == 0, "each window the opposite of the one before: no stretch lasts"
    # Slow and fast stretches of 8 windows: one window's speed carries into the next.
    for i, r in enumerate(rows):
        r["seconds"] *= (1.2 if (i // 40) % 2 else 0.8) ** -1 * (1.2 if (i // 320) % 2 else 0.8)
    model, _ = fit_steps(rows)
    assert model.speed_spread[-1] / model.speed_spread[0] == pytest.approx(1.2 / 0.8, rel=0.03)
    assert model.speed_correlation > 0.3  # the steps' own noise orders the windows within a stretch
    # Windows as long as a slow and a fast stretch together all see the same speed; a correlation given
    # is kept.
    model, _ = fit_steps(rows[:1920], speed_window_s=16 * SPEED_WINDOW_S, speed_correlation=0.0)
    assert model.speed_window_s == 16 * SPEED_WINDOW_S and model.speed_correlation == 0
    assert model.speed_spread[-1] / model.speed_spread[0] < 1.05
    # Without start times (older logs) there is no speed to fit, and the simulator's speed is 1.
    model, _ = fit_steps([{k: v for k, v in r.items() if k != "start"} for r in rows])
    assert model.speed_spread == () and model.draw("speed", np.random.default_rng(0)) == 1.0


def test_the_simulated_machine_speed_has_the_fitted_spread_and_correlation():
    spread = np.linspace(0.7, 1.3, len(SPREAD))
    model = StepModel(2e-3, 0, 0, 0, speed_spread=tuple(spread), speed_window_s=2.0, speed_correlation=0.8)
    speed = MachineSpeed(model, np.random.default_rng(3))
    windows = np.array([speed.at((k + 0.5) * 2.0) for k in range(20_000)])
    assert speed.at(20_000 * 2.0 - 1e-9) == windows[-1]  # one factor per window: the model's
    assert np.quantile(windows, [0.1, 0.5, 0.9]) == pytest.approx(np.quantile(spread, [0.1, 0.5, 0.9]), rel=0.02)
    assert lag_correlation(windows) == pytest.approx(0.8, abs=0.02)
    # Five windows on, the carry is 0.8 ** 5; a model without a speed spread runs at 1 and draws nothing.
    later = np.array([speed.at((20_000 + 5 * k) * 2.0) for k in range(10_000)])
    assert lag_correlation(later) == pytest.approx(0.8 ** 5, abs=0.03)
    rng = np.random.default_rng(0)
    flat = MachineSpeed(StepModel(2e-3, 0, 0, 0), rng)
    assert {flat.at(k * SPEED_WINDOW_S) for k in range(100)} == {1.0} and rng.random() == np.random.default_rng(0).random()


@pytest.mark.parametrize("option", [["--speed-window-s", "0"], ["--speed-correlation", "-0.5"],
                                    ["--speed-correlation", "1"]])
def test_fit_refuses_a_speed_window_or_correlation_it_cannot_use(option, capsys):
    with pytest.raises(SystemExit):
        fit_main(["--step-log", "unused", *option])
    assert f"argument {option[0]}" in capsys.readouterr().err


def test_a_model_at_another_speed_scales_every_time_it_charges_but_not_its_factors():
    spread = tuple(np.linspace(0.5, 1.5, len(SPREAD)))
    path = tuple(np.linspace(1e-3, 3e-3, len(SPREAD)))
    m = StepModel(2e-3, 1e-5, 3e-4, 1e-7, c4=1e-9, weights_s=1e-3, overlap=0.5, loop_s=1e-3, request_s=2e-3,
                  first_token_s=5e-3, token_s=1e-3, step_spread=spread, speed_spread=spread,
                  first_token_spread=path, speed_correlation=0.6)
    slow = m.at_speed(1.25)
    f = features(300, 40, 90_000, 10**6)
    assert slow.step_seconds(f) == pytest.approx(1.25 * m.step_seconds(f))
    assert (slow.loop_s, slow.request_s, slow.first_token_s, slow.token_s) == pytest.approx((1.25e-3, 2.5e-3, 6.25e-3, 1.25e-3))
    assert slow.first_token_spread == pytest.approx(tuple(1.25 * v for v in path)) and slow.request_spread == ()
    assert (slow.step_spread, slow.speed_spread, slow.overlap, slow.speed_correlation) == (spread, spread, 0.5, 0.6)
