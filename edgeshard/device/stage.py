"""The stage worker of a device (edgeshard/device/service.py wires it): the loaded StageModel
(edgeshard/device/model.py), the run's configuration, the links to the next stage / the source, and the one
worker thread that runs all compute.

A forward pass runs under compute_lock, either in the reader thread of the connection its ACT frame came on (no
hand-off between a frame's arrival and its forward pass) or on the worker thread (new prompts, the next step of
a one-device ring, control calls: load, configure, profile). So a device never runs two forwards at once, and a
control call never overlaps one.

KV per sequence lives in the StageModel (reset(seq) when a sequence ends, reset_all when a run starts or is
cancelled); the last stage samples, with a torch.Generator per sequence when the temperature is above 0.

Epochs: every ACT/TOKEN/END frame carries the epoch of the run it belongs to (one byte, the frame flags).
configure sets it, cancel and measure_step bump it; a frame of another epoch is dropped on arrival.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable

from edgeshard.device import wire
from edgeshard.device.outbox import Outbox

# Headroom on top of the exact largest activation frame, (1, context_tokens, hidden) in the stage's dtype
# (StageModel.forward's output, model.py). The bound asked for in issue 8 ("Data-plane bounds": the largest
# activation frame of any configured stage, plus headroom). 1 MiB covers at least 32 tokens beyond the
# configured context for the widest catalog model (llama2-70b: hidden 8192, fp32 = 32 KiB a token; hundreds for
# small ones), e.g. tokens a chat template adds to a prompt whose context was counted from its text, and it
# costs a device at most 1 MiB per connection, against the 8 GiB that made one stop answering.
ACT_HEADROOM_BYTES = 1 << 20
log = logging.getLogger("edgeshard.serve")


class StageWorker:
    """The shard this device runs and everything a step of it touches.

    name: the device's name (configure may rename it; events and error messages use it). limits: the
    wire.FrameLimits shared by all of this device's data connections (set_act_limit changes its ACT entry).
    counters: {"frames_in", "frames_out", "computes", "errors"}, shared with the data-plane dispatcher.
    on_frame, on_close: the dispatcher's callbacks, for the connections this worker dials. source: the device's
    SourceSession (edgeshard/device/source.py), set by the Node once both exist: tokens reach it, and it forgets
    its sequences when a run starts, is cancelled or the stage is dropped.
    """

    def __init__(self, name: str, device: str, secret: bytes, limits: wire.FrameLimits, outbox: Outbox,
                 counters: dict, on_frame: Callable, on_close: Callable):
        self.name, self.device, self.secret, self.limits = name, device, secret, limits
        self.outbox, self.counters = outbox, counters
        self._on_frame, self._on_close = on_frame, on_close
        self.source = None  # SourceSession, set by the Node
        self.model = None  # StageModel (or measure_step's identity stage)
        self.spec: dict | None = None  # {"model", "start", "stop", "dtype", "seed"} of the loaded StageModel
        self.cfg: dict = {}  # the run's configuration (configure's argument)
        self.epoch = 0
        self.context_tokens: int | None = None  # longest prompt of the configured run (bounds ACT frames)
        self.out: dict[str, wire.Link] = {}  # destination name -> link (dialed by us)
        self.out_addr: dict[str, tuple] = {}  # destination name -> (host, port) it was dialed at
        self.shaping: dict[str, dict] = {}  # destination name -> {"bandwidth_bytes_s", "latency_s"}
        self.gens: dict = {}  # seq -> torch.Generator (last stage, sampling)
        self.logits: dict[int, list[bytes]] = {}  # seq -> raw logits per step (cfg["debug_logits"])
        # ("call", fn, box) control calls; (kind, seq, epoch, fn) sequence work, kind "prompt" or "next"
        # (epoch None: whatever the current one)
        self.work: queue.Queue = queue.Queue()
        self.compute_lock = threading.Lock()  # one forward pass at a time, whichever thread runs it
        threading.Thread(target=self._work_loop, name="worker", daemon=True).start()

    def emit(self, ev: dict, urgent: bool = False) -> None:
        self.outbox.emit(ev, urgent)

    # ------------------------------------------------------------------ links
    def dial(self, name: str, host: str, port: int) -> wire.Link:
        """Our link to `name` (dialed again when its address changed or it closed), shaped as configured."""
        link = self.out.get(name)
        if link is not None and (self.out_addr.get(name) != (host, port) or link.conn.closed):
            link.close()
            link.conn.close()
            link = None
        if link is None:
            conn = wire.dial(host, port, self.secret, {"from": self.name, "role": "stage"}, peer=name,
                             limits=self.limits)
            conn.start_reader(self._on_frame, self._on_close, name="out")
            link = wire.Link(conn)
            self.out[name], self.out_addr[name] = link, (host, port)
        s = self.shaping.get(name, {})
        link.configure(s.get("bandwidth_bytes_s"), s.get("latency_s", 0.0))
        return link

    def forget_link(self, name: str) -> None:
        """Drop our link to `name` from the tables (the caller closes it)."""
        self.shaping.pop(name, None)
        self.out.pop(name, None)
        self.out_addr.pop(name, None)

    def set_shaping(self, shaping: dict) -> None:
        """{destination name: {"bandwidth_bytes_s", "latency_s"}}, applied to the links already dialed too."""
        self.shaping = shaping
        for name, link in self.out.items():
            s = self.shaping.get(name, {})
            link.configure(s.get("bandwidth_bytes_s"), s.get("latency_s", 0.0))

    def send(self, dst: str, kind: int, seq: int, step: int, position: int, tensor, epoch: int) -> None:
        link = self.out.get(dst)
        if link is None:
            raise RuntimeError(f"device {self.name!r} has no data link to {dst!r} (configure first)")
        payload, code, shape = wire.tensor_payload(tensor)
        n = wire.HEADER_BYTES + payload.nbytes
        start = time.time()
        ev = {"type": "send", "peer": dst, "seq": seq, "step": step, "bytes": n, "start_s": start,
              "kind": wire.KIND_NAMES[kind]}

        def done(t: float) -> None:
            ev["end_s"] = t
            self.emit(ev)

        self.counters["frames_out"] += 1
        link.send(kind, seq, position, step, payload, code, shape, flags=epoch, done=done)

    # ------------------------------------------------------------------ compute
    def error(self, seq, e: BaseException) -> None:
        """Report a failed step to the controllers (urgent: the run fails at once)."""
        self.counters["errors"] += 1
        log.exception("compute failed")
        self.emit({"type": "error", "seq": seq, "t_s": time.time(), "message": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=8)}, urgent=True)

    def on_frame(self, conn: wire.Connection, f: wire.Frame) -> None:
        """An ACT, TOKEN or END frame, in its connection's reader thread."""
        if f.flags != self.epoch:
            return  # a frame of an earlier run
        if f.kind != wire.END:
            self.emit({"type": "recv", "peer": conn.peer, "seq": f.seq, "step": f.aux, "bytes": f.nbytes,
                       "start_s": f.t_first, "end_s": f.t_recv, "kind": wire.KIND_NAMES[f.kind]})
        self._step(f.kind, f)

    def _step(self, kind: int, f: wire.Frame) -> None:
        """One frame's work (activations in, a token back at the source, or a finished sequence)."""
        with self.compute_lock:
            if f.flags != self.epoch:
                return
            try:
                if kind == wire.ACT:
                    self.compute(f.seq, f.aux, f.position, wire.frame_tensor(f))
                elif kind == wire.TOKEN:
                    token = int(wire.frame_tensor(f).reshape(-1)[0])
                    self.source.on_token(f.seq, f.aux, token, f.t_recv)
                elif kind == wire.END:
                    self.end(f.seq)
            except Exception as e:
                self.error(f.seq, e)

    def enqueue(self, kind: str, seq: int, fn: Callable[[], None], epoch: int | None = None) -> None:
        """Queue sequence work for the worker thread: kind "prompt" (a new sequence) or "next" (the next step of a
        one-device ring). Skipped when epoch is given and no longer current; an exception fails the sequence."""
        self.work.put((kind, seq, epoch, fn))

    def _work_loop(self) -> None:
        """New prompts and control calls (load, configure, profile), under the same compute lock."""
        while True:
            item = self.work.get()
            with self.compute_lock:
                if item[0] == "call":
                    _, fn, box = item
                    try:
                        box["value"] = fn()
                    except BaseException as e:  # returned to the rpyc caller
                        box["error"] = e
                    finally:
                        box["done"].set()
                else:
                    _, seq, epoch, fn = item
                    if epoch is not None and epoch != self.epoch:
                        continue
                    try:
                        fn()
                    except Exception as e:
                        self.error(seq, e)

    def run_in_worker(self, fn, timeout: float | None = None):
        """Run fn on the worker thread (so it never overlaps a forward pass) and return its result."""
        box = {"done": threading.Event()}
        self.work.put(("call", fn, box))
        if not box["done"].wait(timeout):
            raise TimeoutError(f"device {self.name!r}: worker busy for more than {timeout} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def drop_queued(self) -> int:
        """Remove queued sequence work (control calls stay queued: their callers wait for them)."""
        keep, dropped = [], 0
        while True:
            try:
                item = self.work.get_nowait()
            except queue.Empty:
                break
            if item[0] in ("prompt", "next"):
                dropped += 1
            else:
                keep.append(item)
        for item in keep:
            self.work.put(item)
        return dropped

    def compute(self, seq: int, step: int, position: int, x) -> None:
        """Run this stage on x, (1, tokens) ids on the first stage, (1, tokens, hidden) activations after, then
        pass the result on (next stage, or sample and return the token). The caller holds compute_lock."""
        cfg, epoch = self.cfg, self.epoch  # what this step sends belongs to the epoch it started in
        if self.model is None:
            raise RuntimeError(f"device {self.name!r} has no stage loaded")
        t0 = time.time()
        out = self.model.forward(seq, x if self.device == "cpu" else x.to(self.device), position)
        token = None
        if cfg["is_last"]:
            token = self._sample(seq, out)
        t1 = time.time()
        self.counters["computes"] += 1
        self.emit({"type": "compute", "seq": seq, "step": step, "start_s": t0, "end_s": t1,
                   "stage": cfg.get("stage"), "position": position, "tokens": int(x.shape[1])})
        if not cfg["is_last"]:
            self.send(cfg["next"]["name"], wire.ACT, seq, step, position, out, epoch)
        elif cfg["is_source"]:  # a one-device ring: the next step goes through the work queue (no recursion)
            self.source.on_token(seq, step, token, t1)
        else:
            import torch
            self.send(cfg["source"]["name"], wire.TOKEN, seq, step, position,
                      torch.tensor([token], dtype=torch.int64), epoch)

    def _sample(self, seq: int, logits) -> int:
        """The last stage's token for seq: greedy at temperature 0, else top-p from a generator seeded per
        (run seed, seq), so a run is reproducible whatever the order its sequences interleave in."""
        from edgeshard.device import model as M

        s = self.cfg.get("sampling", {})
        temp, top_p = float(s.get("temperature", 0.0)), float(s.get("top_p", 1.0))
        if self.cfg.get("debug_logits"):
            self.logits.setdefault(seq, []).append(logits.detach().float().cpu().numpy().tobytes())
        gen = None
        if temp > 0:
            gen = self.gens.get(seq)
            if gen is None:
                import torch
                gen = self.gens[seq] = torch.Generator().manual_seed(int(s.get("seed", 0)) * 1_000_003 + seq)
        return int(M.sample(logits, temperature=temp, top_p=top_p, generator=gen))

    def end(self, seq: int) -> None:
        """A sequence is done: free its KV and sampler, and tell the next stage (END) to do the same."""
        if self.model is not None:
            self.model.reset(seq)
        self.gens.pop(seq, None)
        if not self.cfg.get("is_last") and self.cfg.get("next"):
            link = self.out.get(self.cfg["next"]["name"])
            if link is not None:
                link.send(wire.END, seq, flags=self.epoch)

    # ------------------------------------------------------------------ control (called from rpyc threads)
    def load(self, spec: dict) -> dict:
        """Load (or keep, when identical) the shard [start, stop) of a model."""
        def load():
            from edgeshard.device import model as M

            key = {k: spec.get(k) for k in ("model", "start", "stop", "dtype", "seed")}
            t0 = time.time()
            reused = self.model is not None and self.spec == key
            if reused:
                self.model.reset_all()
            else:
                self.model = self.spec = None
                self.set_act_limit(None)  # until this stage is configured
                import gc
                gc.collect()
                self.model = M.StageModel(key["model"], int(key["start"]), int(key["stop"]),
                                          dtype=key["dtype"] or "float32", device=self.device,
                                          seed=int(key["seed"] or 0))
                self.spec = key
            st = self.model
            return {"load_s": time.time() - t0, "reused": reused, "weight_bytes": int(st.weight_bytes()),
                    "hidden": st.hidden, "vocab": st.vocab, "n_units": st.n_units,
                    "is_first": st.is_first, "is_last": st.is_last}
        return self.run_in_worker(load)

    def configure(self, cfg: dict) -> dict:
        """Set up a run: who is next, who is the source, link shaping, sampling; drop any earlier run's state.
        cfg keys: run_id, name, epoch, stage, is_source, is_last, next/source {"name", "host", "port"}, links,
        sampling, chat, max_new_tokens, context_tokens, debug_logits, model."""
        def setup():
            act = self.set_act_limit(cfg)  # first: a bad context_tokens changes nothing else
            self.drop_queued()  # prompts of an earlier run
            self.epoch = int(cfg.get("epoch", 0)) & 0xFF
            self.name = cfg.get("name", self.name)

            def start():
                self.cfg = dict(cfg)
            self.outbox.new_run(start)  # events of an earlier run that nobody collected are dropped
            self.source.forget()
            self.gens.clear()
            self.logits.clear()
            if self.model is not None:
                self.model.reset_all()
            self.set_shaping({k: v for k, v in cfg.get("links", {}).items()})
            if cfg.get("is_source"):
                self.source.load_tokenizer(cfg["model"])
            if not cfg.get("is_last"):
                n = cfg["next"]
                self.dial(n["name"], n["host"], int(n["port"]))
            elif not cfg.get("is_source"):
                s = cfg["source"]
                self.dial(s["name"], s["host"], int(s["port"]))
            return {"epoch": self.epoch, "stage": self.spec, "context_tokens": self.context_tokens,
                    "max_act_frame_bytes": act}
        # the worker may be busy; configure runs on it so it never races a forward pass
        return self.run_in_worker(setup)

    def set_act_limit(self, cfg: dict | None) -> int:
        """The largest ACT frame this device accepts: what the configured stage sends or receives, a whole
        prompt's prefill (1, context_tokens, hidden) in the stage's dtype, plus ACT_HEADROOM_BYTES. context_tokens:
        the run's (cfg["context_tokens"]), else the model's (max_position_embeddings). None (or no stage
        loaded): the small unconfigured cap. Returns the limit."""
        st = self.model
        hidden = getattr(st, "hidden", None)
        if cfg is None or not hidden:
            self.context_tokens = None
            limit = wire.ACT_UNCONFIGURED_BYTES
        else:
            ctx = cfg.get("context_tokens") or getattr(getattr(st, "config", None), "max_position_embeddings", None)
            if not ctx or int(ctx) < 1:
                raise ValueError(f"device {self.name!r}: context_tokens must be a positive integer, got {ctx!r}")
            self.context_tokens = int(ctx)
            item = st.torch_dtype.itemsize
            limit = int(hidden) * self.context_tokens * item + ACT_HEADROOM_BYTES
        self.limits.set(wire.ACT, min(limit, wire.MAX_PAYLOAD))
        return self.limits.max_bytes(wire.ACT)

    def cancel(self) -> dict:
        """Stop every sequence: drop queued prompts, forget sequences, ignore frames still in flight."""
        with self.compute_lock:  # waits for at most the forward pass in progress
            dropped = self.drop_queued()
            n = self.source.forget()
            self.epoch = (self.epoch + 1) & 0xFF  # frames still in flight are now stale
            if self.model is not None:
                self.model.reset_all()
        return {"dropped_prompts": dropped, "cancelled_seqs": n}

    def install(self, model, cfg: dict) -> int:
        """Replace the stage by `model` (forward(seq, x, position), reset(seq)) under a configuration of its own,
        in a new epoch (returned); no StageModel stays loaded. The caller holds compute_lock (measure_step,
        edgeshard/device/prober.py)."""
        self.model, self.spec = model, None
        self.source.forget()
        self.epoch = (self.epoch + 1) & 0xFF  # an epoch is one byte on the wire (frame flags)
        self.cfg = cfg
        self.context_tokens = None
        return self.epoch

    def profile_units(self, spec: dict) -> dict:
        """Time each unit of [start, stop) of a model (model.unit_timings) on a StageModel of its own."""
        def prof():
            from edgeshard.device import model as M

            # The profiler sizes its chunks to half the device's memory; a stage still loaded from a run would
            # come on top (on an emulated device: an OOM kill). The next run's load_stage loads it again.
            if self.model is not None:
                self.model = self.spec = None
                self.source.forget()
                self.set_act_limit(None)
                import gc
                gc.collect()
            st = M.StageModel(spec["model"], int(spec["start"]), int(spec["stop"]),
                              dtype=spec.get("dtype", "float32"), device=self.device, seed=int(spec.get("seed", 0)))
            try:
                t0 = time.time()
                out = M.unit_timings(st, int(spec["context_tokens"]), int(spec["prefill_tokens"]),
                                     int(spec["repeats"]))
                out = dict(out)
                out["wall_s"] = time.time() - t0
                out["weight_bytes"] = int(st.weight_bytes())
                return out
            finally:
                del st
                import gc
                gc.collect()
        return self.run_in_worker(prof)

    def debug_logits(self, seq: int) -> bytes:
        return b"".join(self.logits.get(int(seq), []))
