"""metrics.summarize on hand-built event lists; times are binary fractions so every number is exact."""

import json

import pytest

from edgeshard.run import metrics


def run_events():
    # Two devices a (source, units [0, k)) and b; two sequences; a ring a -> b -> a.
    ev = [
        {"type": "request", "seq": 0, "t_s": 10.0},
        # seq 0, step 0 (prefill)
        {"type": "compute", "device": "a", "seq": 0, "step": 0, "start_s": 10.0, "end_s": 10.5},
        {"type": "send", "device": "a", "peer": "b", "seq": 0, "step": 0, "bytes": 1000, "start_s": 10.5,
         "end_s": 10.625},
        {"type": "recv", "device": "b", "peer": "a", "seq": 0, "step": 0, "bytes": 1000, "start_s": 10.5625,
         "end_s": 10.75},
        {"type": "compute", "device": "b", "seq": 0, "step": 0, "start_s": 10.75, "end_s": 11.0},
        {"type": "token", "seq": 0, "step": 0, "token_id": 7, "t_s": 11.0},
        # seq 0, step 1
        {"type": "compute", "device": "a", "seq": 0, "step": 1, "start_s": 11.0, "end_s": 11.25},
        {"type": "send", "device": "a", "peer": "b", "seq": 0, "step": 1, "bytes": 100, "start_s": 11.25,
         "end_s": 11.3125},
        {"type": "recv", "device": "b", "peer": "a", "seq": 0, "step": 1, "bytes": 100, "start_s": 11.25,
         "end_s": 11.375},
        {"type": "compute", "device": "b", "seq": 0, "step": 1, "start_s": 11.375, "end_s": 11.5},
        {"type": "token", "seq": 0, "step": 1, "token_id": 8, "t_s": 11.5},
        # seq 1 has no request event: its start is its earliest step-0 event (compute at 10.5)
        {"type": "compute", "device": "a", "seq": 1, "step": 0, "start_s": 10.5, "end_s": 10.75},
        {"type": "token", "seq": 1, "step": 0, "token_id": 3, "t_s": 11.5},
        {"type": "token", "seq": 1, "step": 1, "token_id": 4, "t_s": 12.0},
        {"type": "token", "seq": 1, "step": 2, "token_id": 5, "t_s": 13.0},
        # a send whose recv was never logged counts its own interval
        {"type": "send", "device": "b", "peer": "a", "seq": 1, "step": 2, "bytes": 8, "start_s": 12.5,
         "end_s": 12.75},
        {"type": "note", "text": "ignored"},
    ]
    return ev


def test_summarize_exact_numbers():
    s = metrics.summarize(run_events())
    assert s["span_s"] == 3.0  # 10.0 .. 13.0
    assert s["n_seqs"] == 2 and s["n_tokens"] == 5
    assert s["tokens_per_s"] == 5 / 3.0
    # decode gaps: seq 0: 0.5; seq 1: 0.5, 1.0 -> sorted [0.5, 0.5, 1.0]
    lat = s["token_latency_s"]
    assert lat["n"] == 3
    assert lat["mean"] == 2.0 / 3
    assert lat["p50"] == 0.5
    assert lat["p95"] == 0.5 + 0.9 * 0.5  # rank 0.95 * 2 = 1.9
    first = s["first_token_latency_s"]
    assert first["per_seq"] == {"0": 1.0, "1": 1.0}  # 11.0 - 10.0 (request); 11.5 - 10.5 (first event)
    assert first["n"] == 2 and first["p50"] == 1.0
    # device a: [10, 10.5] u [10.5, 10.75] u [11, 11.25] = 1.0; b: 0.25 + 0.125
    assert s["devices"]["a"] == {"compute_s": 1.0, "share": 1.0 / 3.0, "n": 3}
    assert s["devices"]["b"] == {"compute_s": 0.375, "share": 0.125, "n": 2}
    # a->b: [10.5, 10.75] + [11.25, 11.375]; b->a: unmatched send [12.5, 12.75]
    assert s["links"]["a->b"] == {"src": "a", "dst": "b", "transfer_s": 0.375, "share": 0.125, "bytes": 1100,
                                  "n": 2}
    assert s["links"]["b->a"] == {"src": "b", "dst": "a", "transfer_s": 0.25, "share": 0.25 / 3.0, "bytes": 8,
                                  "n": 1}
    json.dumps(s)  # JSON-ready as it is


def test_overlapping_compute_counts_once_and_empty_run():
    ev = [{"type": "compute", "device": "d", "seq": s, "step": 0, "start_s": a, "end_s": b}
          for s, (a, b) in enumerate([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)])]
    s = metrics.summarize(ev)
    assert s["devices"]["d"]["compute_s"] == 4.0 and s["span_s"] == 6.0
    assert s["tokens_per_s"] == 0.0 and s["token_latency_s"]["p50"] is None
    empty = metrics.summarize([])
    assert empty["span_s"] == 0.0 and empty["tokens_per_s"] is None and empty["devices"] == {}


def test_percentile_matches_linear_interpolation():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert metrics.percentile(xs, 0.0) == 1.0 and metrics.percentile(xs, 1.0) == 4.0
    assert metrics.percentile(xs, 0.5) == 2.5
    assert metrics.percentile([7.0], 0.95) == 7.0
    with pytest.raises(ValueError, match="q=1.5"):
        metrics.percentile(xs, 1.5)


def test_bad_events_are_named():
    with pytest.raises(ValueError, match="lacks end_s"):
        metrics.summarize([{"type": "compute", "device": "a", "seq": 0, "step": 0, "start_s": 1.0}])
    with pytest.raises(ValueError, match="ends before it starts"):
        metrics.summarize([{"type": "compute", "device": "a", "seq": 0, "step": 0, "start_s": 2.0, "end_s": 1.0}])


def test_read_events_roundtrip(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text("\n".join(json.dumps(e) for e in run_events()) + "\n\n")
    assert metrics.summarize(metrics.read_events(p)) == metrics.summarize(run_events())
    p.write_text("{bad\n")
    with pytest.raises(ValueError, match="events.jsonl:1"):
        metrics.read_events(p)


def test_message_lasts_until_both_sides_are_done():
    ev = [{"type": "send", "device": "a", "peer": "b", "seq": 0, "step": 0, "bytes": 4, "start_s": 0.0, "end_s": 2.0},
          {"type": "recv", "device": "b", "peer": "a", "seq": 0, "step": 0, "bytes": 4, "start_s": 0.5,
           "end_s": 1.0},
          {"type": "recv", "device": "b", "peer": "a", "seq": 0, "step": 1, "bytes": 4, "start_s": 3.0,
           "end_s": 3.5}]  # a recv without its send counts its own interval
    link = metrics.summarize(ev)["links"]["a->b"]
    assert (link["transfer_s"], link["n"], link["bytes"], link["share"]) == (2.5, 2, 8, 2.5 / 3.5)
