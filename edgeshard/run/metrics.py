"""Metrics: turn a run's event stream (events.jsonl) into latency, throughput and busy-time numbers. Stdlib only.

EVENT SCHEMA (the contract between the runtime, which writes events, and this module, which reads them).
One JSON object per line in events.jsonl; every time is wall-clock seconds (`time.time()`) on the machine
that did the work. On one host (local processes, network namespaces) all clocks are the same clock.

  {"type": "compute", "device": str, "seq": int, "step": int, "start_s": float, "end_s": float}
      One stage's forward pass on `device` for sequence `seq`; step 0 = the prompt (prefill), step k >= 1 =
      the decode pass that consumes generated token k-1. start_s/end_s bracket the compute only (not waiting
      for input, not sending output).
  {"type": "send", "device": str, "peer": str, "seq": int, "step": int, "bytes": int, "start_s": float,
   "end_s": float}
      `device` starts writing a message of `bytes` bytes (header + payload) to `peer` at start_s; end_s is
      when the write call returned.
  {"type": "recv", "device": str, "peer": str, "seq": int, "step": int, "bytes": int, "start_s": float,
   "end_s": float}
      `device` reads a message from `peer`: start_s = first byte available (NOT when it began waiting),
      end_s = last byte read.
  {"type": "token", "seq": int, "step": int, "token_id": int, "t_s": float}
      Generated token number `step` (0 = first generated token) of `seq` became known at the source;
      t_s on the controller/source clock.
  {"type": "request", "seq": int, "t_s": float}                                        (optional)
      The prompt of `seq` was submitted at the source. Without it, a sequence's start is the earliest
      start_s of its step-0 compute/send/recv events.
Other keys are ignored (a runtime may add e.g. "run", "stage", "position"); other types are ignored.

WHAT summarize() RETURNS (all times in seconds; a dict that json.dumps writes as it is):
  span_s               wall span: earliest start (start_s, t_s) to latest end (end_s, t_s) over all events
  n_seqs, n_tokens     sequences that produced at least one token; token events
  tokens_per_s         n_tokens / span_s
  token_latency_s      {"n", "mean", "p50", "p95"}: per-token decode latency, pooled over sequences: for each
                       seq, t_s(step k) - t_s(step k-1) for consecutive steps k >= 1 (a gap in steps is skipped)
  first_token_latency_s {"n", "mean", "p50", "p95", "per_seq": {str(seq): s}}: t_s(step 0) - the seq's start
  devices              {device: {"compute_s", "share", "n"}}: compute_s is the union of the device's compute
                       intervals (busy time; overlaps are not counted twice); share = compute_s / span_s
  links                {"src->dst": {"src", "dst", "transfer_s", "share", "bytes", "n"}}: one message per
                       matched send/recv pair (same src, dst, seq, step, in order), its interval
                       [send.start_s, max(recv.end_s, send.end_s)] (latency + bytes/bandwidth, as the cost
                       model counts a hop);
                       a send or recv without its partner counts its own interval. transfer_s is the union of
                       the link's message intervals; bytes and n count messages once (from the send when
                       there is one).
Percentiles: linear interpolation between closest ranks (numpy's default "linear" method):
p(q) = x[floor(r)] + (r - floor(r)) * (x[floor(r)+1] - x[floor(r)]), r = q * (n - 1) over sorted x.
An empty list gives None for mean and percentiles.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path


def percentile(values: Iterable[float], q: float) -> float | None:
    """q in [0, 1]; linear interpolation between closest ranks (numpy's default)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile q={q!r} must be in [0, 1]")
    xs = sorted(values)
    if not xs:
        return None
    r = q * (len(xs) - 1)
    lo = math.floor(r)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (r - lo) * (xs[hi] - xs[lo])


def _stats(values: list[float]) -> dict:
    return {"n": len(values), "mean": sum(values) / len(values) if values else None,
            "p50": percentile(values, 0.50), "p95": percentile(values, 0.95)}


def _union_s(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by a set of [start, end] intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def _check(e: dict, keys: tuple[str, ...], i: int) -> None:
    missing = [k for k in keys if k not in e]
    if missing:
        raise ValueError(f"event #{i} ({e.get('type')!r}) lacks {', '.join(missing)}: {e!r}")


_REQUIRED = {
    "compute": ("device", "seq", "step", "start_s", "end_s"),
    "send": ("device", "peer", "seq", "step", "bytes", "start_s", "end_s"),
    "recv": ("device", "peer", "seq", "step", "bytes", "start_s", "end_s"),
    "token": ("seq", "step", "t_s"),
    "request": ("seq", "t_s"),
}


def summarize(events: Iterable[dict]) -> dict:
    """Summarize one run's events (schema in the module docstring)."""
    events = list(events)
    starts, ends = [], []
    tokens: dict = defaultdict(dict)  # seq -> {step: t_s}
    requests: dict = {}  # seq -> t_s
    seq_first: dict = {}  # seq -> earliest start_s of its step-0 events
    busy: dict = defaultdict(list)  # device -> [(start, end)]
    n_compute: dict = defaultdict(int)
    sends: dict = defaultdict(list)  # (src, dst, seq, step) -> [event] in order
    recvs: dict = defaultdict(list)
    for i, e in enumerate(events):
        kind = e.get("type")
        if kind not in _REQUIRED:
            continue
        _check(e, _REQUIRED[kind], i)
        if kind in ("token", "request"):
            starts.append(e["t_s"])
            ends.append(e["t_s"])
            if kind == "token":
                tokens[e["seq"]][e["step"]] = e["t_s"]
            else:
                requests[e["seq"]] = e["t_s"]
            continue
        if e["end_s"] < e["start_s"]:
            raise ValueError(f"event #{i} ends before it starts: {e!r}")
        starts.append(e["start_s"])
        ends.append(e["end_s"])
        if e["step"] == 0:
            seq_first[e["seq"]] = min(seq_first.get(e["seq"], math.inf), e["start_s"])
        if kind == "compute":
            busy[e["device"]].append((e["start_s"], e["end_s"]))
            n_compute[e["device"]] += 1
        elif kind == "send":
            sends[(e["device"], e["peer"], e["seq"], e["step"])].append(e)
        else:
            recvs[(e["peer"], e["device"], e["seq"], e["step"])].append(e)

    span_s = (max(ends) - min(starts)) if starts else 0.0

    def share(x: float) -> float | None:
        return x / span_s if span_s > 0 else None

    # Token latencies: consecutive steps of one sequence.
    gaps, first, n_tokens = [], {}, 0
    for seq, by_step in tokens.items():
        n_tokens += len(by_step)
        for step, t in by_step.items():
            if step >= 1 and step - 1 in by_step:
                gaps.append(t - by_step[step - 1])
        start = requests.get(seq, seq_first.get(seq))
        if 0 in by_step and start is not None:
            first[seq] = by_step[0] - start
    first_stats = _stats([first[s] for s in sorted(first, key=str)])
    first_stats["per_seq"] = {str(s): first[s] for s in sorted(first, key=str)}

    devices = {d: {"compute_s": _union_s(iv), "share": share(_union_s(iv)), "n": n_compute[d]}
               for d, iv in sorted(busy.items())}

    # Links: pair the k-th send with the k-th recv of the same (src, dst, seq, step).
    link_iv: dict = defaultdict(list)
    link_bytes: dict = defaultdict(int)
    for key in sorted(set(sends) | set(recvs), key=lambda k: tuple(map(str, k))):
        ss, rr = sends.get(key, []), recvs.get(key, [])
        for k in range(max(len(ss), len(rr))):
            s = ss[k] if k < len(ss) else None
            r = rr[k] if k < len(rr) else None
            lo = s["start_s"] if s else r["start_s"]
            hi = max(r["end_s"] if r else -math.inf, s["end_s"] if s else -math.inf)
            link_iv[key[:2]].append((lo, max(lo, hi)))
            link_bytes[key[:2]] += (s or r)["bytes"]
    links = {}
    for (src, dst), iv in sorted(link_iv.items(), key=lambda kv: tuple(map(str, kv[0]))):
        t = _union_s(iv)
        links[f"{src}->{dst}"] = {"src": src, "dst": dst, "transfer_s": t, "share": share(t),
                                  "bytes": link_bytes[(src, dst)], "n": len(iv)}

    return {
        "span_s": span_s,
        "n_seqs": len(tokens),
        "n_tokens": n_tokens,
        "tokens_per_s": n_tokens / span_s if span_s > 0 else None,
        "token_latency_s": _stats(gaps),
        "first_token_latency_s": first_stats,
        "devices": devices,
        "links": links,
    }


def read_events(path: str | Path) -> list[dict]:
    """Read events.jsonl (one JSON object per line; blank lines skipped)."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
    return out
