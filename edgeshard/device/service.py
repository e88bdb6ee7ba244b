"""The device server (`edgeshard serve`): rpyc control plane + data plane + one compute worker.

Control (rpyc, explicit `exposed_` methods only; JSON strings in and out; no pickle, no public attrs, never
classic mode; HMAC handshake in the authenticator before rpyc speaks):
    ping, info, load_stage, configure, submit, cancel, debug_logits, profile_units, measure_link, stats.
Data plane (wire.py frames on the port `info` reports; same handshake):
    ACT (activations, stage -> next stage), TOKEN (last stage -> source), END (free a sequence's KV cache),
    PING/PONG and BULK/BULK_ACK (link probes), EVENTS (device -> controller, JSON lines).
    Every frame is bounded before its payload is allocated (wire.FrameLimits, shared by all of this device's
    connections): control kinds wire.CONTROL_MAX_BYTES, BULK the probe's frame (PROBE_FRAME_BYTES), ACT
    what the configured stage can send or receive (act_limit_bytes; wire.ACT_UNCONFIGURED_BYTES until a
    stage is configured). A larger frame gets an ERROR and its connection is dropped.

The generation ring (see docs/architecture.md): the controller submits raw prompt text to the source; the
source tokenises it (prompt token ids never leave this process), runs its stage and sends activations to the
next stage, and so on; the last stage samples and sends the 8-byte token id to the source, which records it,
decides whether the sequence is done (EOS or max_new_tokens) and otherwise embeds the token and starts the
next step. A sequence's next step starts as soon as its token is back, whatever other sequences do (pipeline
mode = several submitted sequences; no global barrier). One worker thread per device runs all compute in
arrival order, so a device never runs two forwards at once.

Every device timestamps its compute, sends and receives (time.time()) and pushes them to subscribed
controllers as events (schema: edgeshard/metrics.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import rpyc
from rpyc.utils.authenticators import AuthenticationError
from rpyc.utils.server import ThreadedServer

from edgeshard.device import auth, wire

PROTOCOL_CONFIG = {
    "allow_pickle": False,
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_setattr": False,
    "allow_delattr": False,
    "allow_exposed_attrs": True,
    "import_custom_exceptions": False,
    "instantiate_custom_exceptions": False,
    "instantiate_oldstyle_exceptions": False,
    "sync_request_timeout": 3600,  # server -> client requests (none are made); loads and profiles are long
}
EVENT_BACKLOG = 500_000  # events kept while no controller is subscribed
PROBE_FRAME_BYTES = 1 << 16  # BULK frames of measure_link; also the largest BULK frame a device accepts
EVENTS_FRAME_BYTES = 4 << 20  # event batches go out in EVENTS frames of at most this (< wire.EVENTS_MAX_BYTES)
# Headroom on top of the exact largest activation frame, (1, context_tokens, hidden) in the stage's dtype
# (StageModel.forward's output, model.py). The bound asked for in issue 8 ("Data-plane bounds": the largest
# activation frame of any configured stage, plus headroom). 1 MiB covers at least 32 tokens beyond the
# configured context for the widest catalog model (llama2-70b: hidden 8192, fp32 = 32 KiB a token; hundreds for
# small ones), e.g. tokens a chat template adds to a prompt whose context was counted from its text, and it
# costs a device at most 1 MiB per connection, against the 8 GiB that made one stop answering.
ACT_HEADROOM_BYTES = 1 << 20
FLUSH_S = 0.02  # events are pushed to the controller in batches at most this old
STEP_PROBE_PEER = "\x00step-probe"  # measure_step's ring: this device as its own next stage (no device has this name)
log = logging.getLogger("edgeshard.serve")


def _boot_id() -> str:
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        return ""


def detected_memory_bytes() -> int | None:
    """Memory this process may use: MemAvailable, capped by a cgroup (v1 or v2) limit."""
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            avail = min(avail, int(text)) if avail else int(text)
    return avail


@dataclass
class SeqState:
    """A sequence on the source device."""

    seq: int
    prompt_tokens: int
    max_new_tokens: int
    generated: list = field(default_factory=list)
    prefix_offset: int = 0  # incremental detokenisation window (see Node._piece)
    read_offset: int = 0


class Node:
    """Everything one device process holds: data server, stage shard, sequences, event outbox."""

    def __init__(self, host: str, secret: bytes, device: str = "cpu", name: str = "", data_port: int = 0,
                 memory_bytes: int | None = None, auth_timeout: float = auth.DEFAULT_TIMEOUT_S):
        self.host, self.secret, self.device, self.name = host, secret, device, name or socket.gethostname()
        self.declared_memory_bytes = memory_bytes
        # What this device accepts on any data connection (shared: configure() changes the ACT entry). A device
        # never receives EVENTS (it sends them), so they get the control cap.
        self.limits = wire.FrameLimits(act=wire.ACT_UNCONFIGURED_BYTES, bulk=PROBE_FRAME_BYTES,
                                       events=wire.CONTROL_MAX_BYTES)
        self.context_tokens: int | None = None  # longest prompt of the configured run (bounds ACT frames)
        self.data = wire.DataServer(host, data_port, secret, self._on_frame, self._on_close,
                                    auth_timeout=auth_timeout, log=log.warning, on_open=self._on_open,
                                    limits=self.limits)
        self.lock = threading.RLock()
        self.work: queue.Queue = queue.Queue()
        self.stage = None
        self.stage_spec: dict | None = None
        self.cfg: dict = {}
        self.epoch = 0
        self.out: dict[str, wire.Link] = {}  # destination name -> link (dialed by us)
        self.out_addr: dict[str, tuple] = {}
        self.reply_links: dict[int, wire.Link] = {}  # id(conn) -> link replying on an accepted connection
        self.shaping: dict[str, dict] = {}  # destination name -> {"bandwidth_bytes_s", "latency_s"}
        self.subscribers: list[wire.Connection] = []
        self.outbox: list[dict] = []
        self.outbox_cond = threading.Condition()
        self.seqs: dict[int, SeqState] = {}
        self.gens: dict = {}  # seq -> torch.Generator (last stage, sampling)
        self.logits: dict[int, list[bytes]] = {}
        self.tokenizer = None
        self.tokenizer_model = None
        self.eos_ids: set[int] = set()
        self.probe_waiters: dict[int, queue.Queue] = {}
        self.bulk: dict[tuple, dict] = {}
        self.probe_counter = 0
        self.started = time.time()
        self.n_emitted = 0  # events of the current run (the controller drains until it has them all)
        self._urgent = False
        self.compute_lock = threading.Lock()  # one forward pass at a time, whichever thread runs it
        self.counters = {"frames_in": 0, "frames_out": 0, "computes": 0, "errors": 0}
        threading.Thread(target=self._work_loop, name="worker", daemon=True).start()
        threading.Thread(target=self._push_loop, name="events", daemon=True).start()

    # ------------------------------------------------------------------ events
    def emit(self, ev: dict, urgent: bool = False) -> None:
        """Queue an event for the subscribed controllers. Events go out in batches every FLUSH_S (so pushing
        them costs the compute path one thread wake-up per batch, not one per event); urgent ones at once."""
        ev.setdefault("device", self.name)
        ev["run"] = self.cfg.get("run_id")
        with self.outbox_cond:
            if len(self.outbox) < EVENT_BACKLOG:
                self.outbox.append(ev)
            self.n_emitted += 1
            if urgent:
                self._urgent = True
                self.outbox_cond.notify()

    def _push_loop(self) -> None:
        """Every FLUSH_S (or at once for an urgent event) send what accumulated. A timer, not a wake-up per
        event: the compute path never waits for this thread."""
        while True:
            with self.outbox_cond:
                if not self._urgent:
                    self.outbox_cond.wait(FLUSH_S)
                if not (self.outbox and self.subscribers):
                    self._urgent = False
                    continue
                batch, self.outbox, self._urgent = self.outbox, [], False
                subs = list(self.subscribers)
            for n, data in _event_frames(batch, EVENTS_FRAME_BYTES):
                for c in subs:
                    try:
                        c.send(wire.EVENTS, aux=n, payload=data)
                    except wire.WireError:
                        with self.outbox_cond:
                            if c in self.subscribers:
                                self.subscribers.remove(c)

    # ------------------------------------------------------------------ data plane
    def _on_open(self, conn: wire.Connection) -> None:
        if conn.hello.get("role") == "events":
            with self.outbox_cond:
                self.subscribers.append(conn)
                self.outbox_cond.notify()

    def _on_close(self, conn: wire.Connection, err) -> None:
        if isinstance(err, wire.FrameRefused) and not conn.hello:  # a connection we dialed (the server logs its own)
            log.warning("data plane: dropped %s: %s", conn.peer, err)
        with self.outbox_cond:
            if conn in self.subscribers:
                self.subscribers.remove(conn)
        link = self.reply_links.pop(id(conn), None)
        if link:
            link.close()

    def _reply_link(self, conn: wire.Connection) -> wire.Link:
        """Replies (probe echoes) go back on the connection they came on, shaped as our link to that peer."""
        link = self.reply_links.get(id(conn))
        if link is None:
            s = self.shaping.get(conn.peer, {})
            link = wire.Link(conn, s.get("bandwidth_bytes_s"), s.get("latency_s", 0.0))
            self.reply_links[id(conn)] = link
        return link

    def _on_frame(self, conn: wire.Connection, f: wire.Frame) -> None:
        """Runs in the connection's reader thread. Stage work runs right here, under the compute lock: no
        hand-off to another thread between a frame's arrival and its forward pass."""
        self.counters["frames_in"] += 1
        k = f.kind
        if k in (wire.ACT, wire.TOKEN, wire.END):
            if f.flags != self.epoch:
                return  # a frame of an earlier run
            if k != wire.END:
                self.emit({"type": "recv", "peer": conn.peer, "seq": f.seq, "step": f.aux, "bytes": f.nbytes,
                           "start_s": f.t_first, "end_s": f.t_recv, "kind": wire.KIND_NAMES[k]})
            self._step(k, f)
        elif k == wire.PING:
            self._reply_link(conn).send(wire.PONG, f.seq, f.position, f.aux,
                                        json.dumps({"t_recv": f.t_recv}).encode())
        elif k == wire.BULK:
            key = (id(conn), f.aux)
            b = self.bulk.setdefault(key, {"first": f.t_recv, "bytes": 0, "frames": 0})
            if f.position > 0:
                b["bytes"] += f.nbytes
            b["frames"] += 1
            b["last"] = f.t_recv
            if f.position == f.seq - 1:  # the last frame of the burst
                self.bulk.pop(key, None)
                self._reply_link(conn).send(wire.BULK_ACK, f.seq, f.position, f.aux, json.dumps(b).encode())
        elif k in (wire.PONG, wire.BULK_ACK):
            q = self.probe_waiters.get(f.aux)
            if q is not None:
                q.put(f)
        elif k == wire.ERROR:  # a peer refused a frame of ours (and dropped the connection): fail the run loudly
            try:
                msg = str(f.json().get("message"))
            except (ValueError, AttributeError):
                msg = bytes(f.payload[:200]).decode(errors="replace")
            self.counters["errors"] += 1
            log.warning("data plane: %s refused a frame: %s", conn.peer, msg)
            self.emit({"type": "error", "seq": f.seq, "t_s": time.time(),
                       "message": f"{conn.peer} refused a frame from {self.name}: {msg}"}, urgent=True)

    def _dial(self, name: str, host: str, port: int) -> wire.Link:
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

    def _send(self, dst: str, kind: int, seq: int, step: int, position: int, tensor, epoch: int) -> None:
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
    def _error(self, seq, e: BaseException) -> None:
        self.counters["errors"] += 1
        log.exception("compute failed")
        self.emit({"type": "error", "seq": seq, "t_s": time.time(), "message": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=8)}, urgent=True)

    def _step(self, kind: int, f: wire.Frame) -> None:
        """One frame's work (activations in, a token back at the source, or a finished sequence)."""
        with self.compute_lock:
            if f.flags != self.epoch:
                return
            try:
                if kind == wire.ACT:
                    self._compute(f.seq, f.aux, f.position, wire.frame_tensor(f))
                elif kind == wire.TOKEN:
                    token = int(wire.frame_tensor(f).reshape(-1)[0])
                    self._on_token(f.seq, f.aux, token, f.t_recv)
                elif kind == wire.END:
                    self._end(f.seq)
            except Exception as e:
                self._error(f.seq, e)

    def _work_loop(self) -> None:
        """New prompts and control calls (load, configure, profile), under the same compute lock."""
        while True:
            item = self.work.get()
            kind = item[0]
            with self.compute_lock:
                if kind == "call":
                    fn, box = item[1], item[2]
                    try:
                        box["value"] = fn()
                    except BaseException as e:  # returned to the rpyc caller
                        box["error"] = e
                    finally:
                        box["done"].set()
                elif kind == "prompt":
                    _, seq, text, opts = item
                    try:
                        self._do_prompt(seq, text, opts)
                    except Exception as e:
                        self._error(seq, e)
                elif kind == "next":  # the next step of a sequence on a one-device ring
                    _, epoch, seq, step, position, token = item
                    if epoch != self.epoch:
                        continue
                    try:
                        import torch
                        self._compute(seq, step, position, torch.tensor([[token]], dtype=torch.long))
                    except Exception as e:
                        self._error(seq, e)

    def run_in_worker(self, fn, timeout: float | None = None):
        """Run fn on the worker thread (so it never overlaps a forward pass) and return its result."""
        box = {"done": threading.Event()}
        self.work.put(("call", fn, box))
        if not box["done"].wait(timeout):
            raise TimeoutError(f"device {self.name!r}: worker busy for more than {timeout} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _tokenize(self, text, chat: bool) -> list[int]:
        if isinstance(text, list):  # token ids (models without a tokenizer)
            return [int(i) for i in text]
        tok = self.tokenizer
        if tok is None:
            raise ValueError(f"model {self.tokenizer_model!r} has no tokenizer here: give the prompt as token ids")
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in tok(text)["input_ids"]]

    def _do_prompt(self, seq: int, text: str, opts: dict) -> None:
        import torch

        if not self.cfg.get("is_source"):
            raise RuntimeError(f"device {self.name!r} is not the source of this run")
        t = time.time()
        ids = self._tokenize(text, bool(self.cfg.get("chat")))
        if not ids:
            raise ValueError(f"prompt of sequence {seq} has no tokens")
        if self.context_tokens is not None and len(ids) > self.context_tokens:  # its prefill would be refused
            raise ValueError(f"prompt of sequence {seq} has {len(ids)} tokens, more than this run's context of "
                             f"{self.context_tokens} tokens (configure context_tokens)")
        max_new = int(opts.get("max_new_tokens", self.cfg.get("max_new_tokens", 32)))
        self.seqs[seq] = SeqState(seq, len(ids), max_new)
        self.emit({"type": "request", "seq": seq, "t_s": t, "t_submit_controller_s": opts.get("t_submit"),
                   "prompt_tokens": len(ids)})
        self._compute(seq, 0, 0, torch.tensor([ids], dtype=torch.long))

    def _compute(self, seq: int, step: int, position: int, x) -> None:
        """Run this stage on x, then pass the result on (next stage, or sample and return the token)."""
        cfg, epoch = self.cfg, self.epoch  # what this step sends belongs to the epoch it started in
        if self.stage is None:
            raise RuntimeError(f"device {self.name!r} has no stage loaded")
        t0 = time.time()
        out = self.stage.forward(seq, x if self.device == "cpu" else x.to(self.device), position)
        token = None
        if cfg["is_last"]:
            token = self._sample(seq, out)
        t1 = time.time()
        self.counters["computes"] += 1
        self.emit({"type": "compute", "seq": seq, "step": step, "start_s": t0, "end_s": t1,
                   "stage": cfg.get("stage"), "position": position, "tokens": int(x.shape[1])})
        if not cfg["is_last"]:
            self._send(cfg["next"]["name"], wire.ACT, seq, step, position, out, epoch)
        elif cfg["is_source"]:  # a one-device ring: the next step goes through the work queue (no recursion)
            self._on_token(seq, step, token, t1)
        else:
            import torch
            self._send(cfg["source"]["name"], wire.TOKEN, seq, step, position, torch.tensor([token], dtype=torch.int64),
                       epoch)

    def _sample(self, seq: int, logits) -> int:
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

    def _on_token(self, seq: int, step: int, token: int, t: float) -> None:
        """The source learns token `step` of `seq`: finish the sequence, or start its next step at once."""
        st = self.seqs.get(seq)
        if st is None:
            return  # cancelled
        st.generated.append(token)
        ev = {"type": "token", "seq": seq, "step": step, "token_id": token, "t_s": t}
        eos = token in self.eos_ids
        if eos or len(st.generated) >= st.max_new_tokens:
            del self.seqs[seq]
            ev["text"] = self._piece(st)
            self.emit(ev)
            text = self.tokenizer.decode(st.generated, skip_special_tokens=True) if self.tokenizer else ""
            self.emit(urgent=True, ev={"type": "seq_done", "seq": seq, "t_s": time.time(),
                                       "token_ids": st.generated, "text": text, "prompt_tokens": st.prompt_tokens,
                                       "reason": "eos" if eos else "length"})
            self._end(seq)
            return
        position = st.prompt_tokens + len(st.generated) - 1
        if self.cfg["is_last"]:  # one device: queue the next step (lets other sequences and cancel in)
            self.work.put(("next", self.epoch, seq, step + 1, position, token))
        else:
            import torch
            self._compute(seq, step + 1, position, torch.tensor([[token]], dtype=torch.long))
        ev["text"] = self._piece(st)  # detokenise after the next step is on its way
        self.emit(ev)

    def _piece(self, st: SeqState) -> str:
        """The text the newest token adds (incremental detokenisation: bounded work per token; a piece that
        ends inside a multi-byte character waits for the next token)."""
        tok = self.tokenizer
        if tok is None:
            return ""
        ids = st.generated
        prefix = tok.decode(ids[st.prefix_offset:st.read_offset], skip_special_tokens=True)
        new = tok.decode(ids[st.prefix_offset:], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            st.prefix_offset, st.read_offset = st.read_offset, len(ids)
            return new[len(prefix):]
        return ""

    def _end(self, seq: int) -> None:
        if self.stage is not None:
            self.stage.reset(seq)
        self.gens.pop(seq, None)
        if not self.cfg.get("is_last") and self.cfg.get("next"):
            link = self.out.get(self.cfg["next"]["name"])
            if link is not None:
                link.send(wire.END, seq, flags=self.epoch)

    # ------------------------------------------------------------------ control (called from rpyc threads)
    def info(self) -> dict:
        import platform

        mem = detected_memory_bytes()
        return {"name": self.name, "pid": os.getpid(), "host": self.host, "data_port": self.data.port,
                "device": self.device, "hostname": socket.gethostname(), "boot_id": _boot_id(),
                "python": platform.python_version(), "memory_bytes": self.declared_memory_bytes or mem,
                "detected_memory_bytes": mem, "stage": self.stage_spec, "uptime_s": time.time() - self.started,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "time_s": time.time()}

    def load_stage(self, spec: dict) -> dict:
        """Load (or keep, when identical) the shard [start, stop) of a model."""
        def load():
            from edgeshard.device import model as M

            key = {k: spec.get(k) for k in ("model", "start", "stop", "dtype", "seed")}
            t0 = time.time()
            reused = self.stage is not None and self.stage_spec == key
            if reused:
                self.stage.reset_all()
            else:
                self.stage = self.stage_spec = None
                self._set_act_limit(None)  # until this stage is configured
                import gc
                gc.collect()
                self.stage = M.StageModel(key["model"], int(key["start"]), int(key["stop"]),
                                          dtype=key["dtype"] or "float32", device=self.device,
                                          seed=int(key["seed"] or 0))
                self.stage_spec = key
            st = self.stage
            return {"load_s": time.time() - t0, "reused": reused, "weight_bytes": int(st.weight_bytes()),
                    "hidden": st.hidden, "vocab": st.vocab, "n_units": st.n_units,
                    "is_first": st.is_first, "is_last": st.is_last}
        return self.run_in_worker(load)

    def configure(self, cfg: dict) -> dict:
        """Set up a run: who is next, who is the source, link shaping, sampling; drop any earlier run's state."""
        def setup():
            act = self._set_act_limit(cfg)  # first: a bad context_tokens changes nothing else
            self._drop_prompts()  # of an earlier run
            self.epoch = int(cfg.get("epoch", 0)) & 0xFF
            self.name = cfg.get("name", self.name)
            with self.outbox_cond:  # events of an earlier run that nobody collected
                self.cfg = dict(cfg)
                self.outbox = []
                self.n_emitted = 0
            self.seqs.clear()
            self.gens.clear()
            self.logits.clear()
            if self.stage is not None:
                self.stage.reset_all()
            self.shaping = {k: v for k, v in cfg.get("links", {}).items()}
            for name, link in self.out.items():
                s = self.shaping.get(name, {})
                link.configure(s.get("bandwidth_bytes_s"), s.get("latency_s", 0.0))
            if cfg.get("is_source"):
                self._load_tokenizer(cfg["model"])
            if not cfg.get("is_last"):
                n = cfg["next"]
                self._dial(n["name"], n["host"], int(n["port"]))
            elif not cfg.get("is_source"):
                s = cfg["source"]
                self._dial(s["name"], s["host"], int(s["port"]))
            return {"epoch": self.epoch, "stage": self.stage_spec, "context_tokens": self.context_tokens,
                    "max_act_frame_bytes": act}
        # the worker may be busy; configure runs on it so it never races a forward pass
        return self.run_in_worker(setup)

    def _set_act_limit(self, cfg: dict | None) -> int:
        """The largest ACT frame this device accepts: what the configured stage sends or receives, a whole
        prompt's prefill (1, context_tokens, hidden) in the stage's dtype, plus ACT_HEADROOM_BYTES. context_tokens:
        the run's (cfg["context_tokens"]), else the model's (max_position_embeddings). None (or no stage
        loaded): the small unconfigured cap. Returns the limit."""
        st = self.stage
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

    def _load_tokenizer(self, model: str) -> None:
        """The source's tokenizer (None for random-weight models without one: prompts are then token ids).
        EOS ids come from the model config, as transformers generate takes them."""
        from edgeshard.config.errors import ConfigError
        from edgeshard.device import model as M

        if self.tokenizer_model != model:
            try:
                self.tokenizer = M.load_tokenizer(model)
            except ConfigError:
                self.tokenizer = None
            self.tokenizer_model = model
        ids = getattr(self.stage, "eos_token_ids", None)
        if ids is None and self.tokenizer is not None:
            ids = self.tokenizer.eos_token_id
        ids = [] if ids is None else ids
        self.eos_ids = {int(i) for i in (ids if isinstance(ids, (list, tuple, set)) else [ids])}

    def submit(self, seq: int, prompt: str, opts: dict) -> None:
        if not self.cfg.get("is_source"):
            raise RuntimeError(f"device {self.name!r} is not configured as the source")
        self.work.put(("prompt", int(seq), prompt, opts))

    def _drop_prompts(self) -> int:
        """Remove queued prompts (control calls stay queued: their callers wait for them)."""
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

    def cancel(self) -> dict:
        """Stop every sequence: drop queued prompts, forget sequences, ignore frames still in flight."""
        with self.compute_lock:  # waits for at most the forward pass in progress
            dropped = self._drop_prompts()
            n = len(self.seqs)
            self.seqs.clear()
            self.epoch = (self.epoch + 1) & 0xFF  # frames still in flight are now stale
            if self.stage is not None:
                self.stage.reset_all()
        return {"dropped_prompts": dropped, "cancelled_seqs": n}

    def profile_units(self, spec: dict) -> dict:
        def prof():
            from edgeshard.device import model as M

            # The profiler sizes its chunks to half the device's memory; a stage still loaded from a run would
            # come on top (on an emulated device: an OOM kill). The next run's load_stage loads it again.
            if self.stage is not None:
                self.stage = self.stage_spec = None
                self.seqs.clear()
                self._set_act_limit(None)
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

    def measure_link(self, spec: dict) -> dict:
        """Measure our link to another device over the data plane (through our shaping, as the run sends)."""
        name, host, port = spec["dst"], spec["host"], int(spec["port"])
        pings = int(spec.get("pings", 20))
        target_s = float(spec.get("target_s", 0.5))
        max_bytes = int(spec.get("max_bytes", 256 << 20))
        s = self.shaping.get(name, {})
        conn = wire.dial(host, port, self.secret, {"from": self.name, "role": "probe"}, peer=name,
                         limits=self.limits)
        with self.lock:
            self.probe_counter += 1
            pid = (os.getpid() << 20) + self.probe_counter
        q: queue.Queue = queue.Queue()
        self.probe_waiters[pid] = q
        conn.start_reader(self._on_frame, None, name="probe")
        link = wire.Link(conn, s.get("bandwidth_bytes_s"), s.get("latency_s", 0.0))
        try:
            rtts, one_way = [], []
            for i in range(pings):
                t0 = time.time()
                link.send(wire.PING, i, 0, pid)
                f = q.get(timeout=30)
                t1 = time.time()
                rtts.append(t1 - t0)
                one_way.append(json.loads(bytes(f.payload))["t_recv"] - t0)

            def burst(total: int) -> dict:
                frames = max(2, -(-total // PROBE_FRAME_BYTES))
                chunk = bytes(PROBE_FRAME_BYTES)
                for j in range(frames):
                    link.send(wire.BULK, frames, j, pid, chunk)
                f = q.get(timeout=600)
                b = json.loads(bytes(f.payload))
                dt = b["last"] - b["first"]
                return {"bytes": b["bytes"], "seconds": dt, "bandwidth_bytes_s": b["bytes"] / dt if dt > 0 else None}

            first = burst(1 << 20)
            bw = first["bandwidth_bytes_s"] or 1e9
            second = burst(int(min(max_bytes, max(1 << 20, bw * target_s))))
            rtts.sort()
            one_way.sort()
            med = lambda xs: xs[len(xs) // 2]  # noqa: E731
            return {"src": self.name, "dst": name, "rtt_s": med(rtts), "rtt_min_s": rtts[0],
                    "one_way_s": med(one_way), "pings": pings,
                    "bandwidth_bytes_s": second["bandwidth_bytes_s"] or first["bandwidth_bytes_s"],
                    "bulk_bytes": second["bytes"], "bulk_seconds": second["seconds"],
                    "shaping": s, "frame_bytes": PROBE_FRAME_BYTES + wire.HEADER_BYTES}
        finally:
            self.probe_waiters.pop(pid, None)
            link.close()
            conn.close()

    def measure_step(self, spec: dict) -> dict:
        """The runtime's own cost of one stage step here, beyond the forward pass (profile step_overhead_s).

        A ring on this device alone, through the run's own code: `in_flight` activation frames of
        `activation_bytes` go out to our own data server; each arrival is a real step (_on_frame: recv event, the
        compute lock, frame parse; _compute with an identity stage: compute event, then _send to the next stage,
        which is us again, through a wire.Link shaped with `latency_s` as the run's links are). With several
        frames in flight the device keeps stepping, so what a step costs is what a pipelined stage pays on top of
        its units: returned as wall time per step (step_s) and process CPU time per step, all threads
        (cpu_per_step_s; the profiler scales it by the device's slowdown on the CPU, as it does the units). A
        controller subscribed to our events (the profiler) gets them pushed as in a run. Measured over the
        `steps` steps after `warmup`. Not during a run: it replaces the stage and configuration, as
        profile_units drops the stage (the next run loads and configures again).
        """
        import torch

        steps, warmup = int(spec.get("steps", 200)), int(spec.get("warmup", 20))
        in_flight = int(spec.get("in_flight", 8))
        if steps < 1 or warmup < 1 or in_flight < 1:
            raise ValueError(f"measure_step needs steps, warmup and in_flight >= 1; got {steps}, {warmup}, "
                             f"{in_flight}")
        floats = max(1, int(spec["activation_bytes"]) // 4)
        if floats * 4 + ACT_HEADROOM_BYTES > wire.MAX_PAYLOAD:
            raise ValueError(f"measure_step: activation_bytes {spec['activation_bytes']} is too large")
        done = threading.Event()
        marks: list[tuple[float, float]] = []  # (wall, process CPU) at the warm-up step and the last one

        class Echo:  # the identity stage: counts steps, ends the ring after the last
            n = 0

            def forward(_, seq, x, position):
                Echo.n += 1
                if Echo.n in (warmup, warmup + steps):
                    marks.append((time.perf_counter(), time.process_time()))
                if Echo.n == warmup + steps:
                    self.epoch = (self.epoch + 1) & 0xFF  # this step's frames keep the old epoch: dropped on arrival
                    done.set()
                return x

            def reset(_, seq):
                pass

        with self.compute_lock:
            self.stage, self.stage_spec, self.seqs = Echo(), None, {}
            self.epoch = epoch = (self.epoch + 1) & 0xFF  # an epoch is one byte on the wire (frame flags)
            self.cfg = {"run_id": "measure_step", "stage": 0, "is_source": False, "is_last": False,
                        "next": {"name": STEP_PROBE_PEER}}
            self.context_tokens = None
            self.limits.set(wire.ACT, floats * 4 + ACT_HEADROOM_BYTES)  # the probe's frames (1, 1, floats) fp32
            self.shaping[STEP_PROBE_PEER] = {"bandwidth_bytes_s": None, "latency_s": float(spec.get("latency_s", 0))}
            link = self._dial(STEP_PROBE_PEER, self.data.host, self.data.port)
        x = torch.zeros((1, 1, floats), dtype=torch.float32)
        for seq in range(in_flight):
            self._send(STEP_PROBE_PEER, wire.ACT, seq, 0, 0, x, epoch)
        ok = done.wait(float(spec.get("timeout_s", 120)))
        with self.compute_lock:
            self.epoch = (self.epoch + 1) & 0xFF
            self.stage, self.cfg = None, {}
            self._set_act_limit(None)
            self.shaping.pop(STEP_PROBE_PEER, None)
            self.out.pop(STEP_PROBE_PEER, None)
            self.out_addr.pop(STEP_PROBE_PEER, None)
        link.close()
        link.conn.close()
        if not ok:
            raise TimeoutError(f"device {self.name!r}: {warmup + steps} probe steps did not finish in time")
        (w0, c0), (w1, c1) = marks
        return {"step_s": (w1 - w0) / steps, "cpu_per_step_s": (c1 - c0) / steps, "steps": steps,
                "warmup": warmup, "in_flight": in_flight, "activation_bytes": floats * 4,
                "latency_s": float(spec.get("latency_s", 0))}

    def debug_logits(self, seq: int) -> bytes:
        return b"".join(self.logits.get(int(seq), []))

    def stats(self) -> dict:
        return {"counters": dict(self.counters), "queue": self.work.qsize(), "seqs": sorted(self.seqs),
                "events_emitted": self.n_emitted, "run_id": self.cfg.get("run_id"),
                "epoch": self.epoch, "links": {k: {"shaped": v.shaped, "pending": v.pending()} for k, v in self.out.items()},
                "subscribers": len(self.subscribers), "frame_limits": self.limits.as_dict(),
                "context_tokens": self.context_tokens}


def _event_frames(batch: list[dict], max_bytes: int):
    """(events, payload) pairs: the batch as JSON lines, split so that no payload exceeds max_bytes. An event
    that alone is larger is left out (logged): no receiver would take it."""
    lines, size = [], 0
    for ev in batch:
        line = json.dumps(ev, separators=(",", ":")).encode()
        if len(line) > max_bytes:
            log.warning("event of %d bytes (type %s) exceeds an EVENTS frame (%d bytes): not sent", len(line),
                        ev.get("type"), max_bytes)
            continue
        if lines and size + 1 + len(line) > max_bytes:
            yield len(lines), b"\n".join(lines)
            lines, size = [], 0
        size += len(line) + (1 if lines else 0)
        lines.append(line)
    if lines:
        yield len(lines), b"\n".join(lines)


def _j(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


class DeviceService(rpyc.Service):
    """The control plane. Only these exposed_ methods are reachable; every argument and result is a str,
    bytes, int or float (JSON for structure)."""

    def __init__(self, node: Node):
        super().__init__()
        self._node = node

    def exposed_ping(self) -> str:
        return _j({"name": self._node.name, "pid": os.getpid(), "time_s": time.time()})

    def exposed_info(self) -> str:
        return _j(self._node.info())

    def exposed_load_stage(self, spec: str) -> str:
        return _j(self._node.load_stage(json.loads(spec)))

    def exposed_configure(self, cfg: str) -> str:
        return _j(self._node.configure(json.loads(cfg)))

    def exposed_submit(self, seq: int, prompt: str, opts: str = "{}") -> str:
        """prompt: the raw text; or, with opts {"token_ids": true}, a JSON list of ids (no tokenizer)."""
        o = json.loads(opts)
        self._node.submit(int(seq), json.loads(prompt) if o.get("token_ids") else str(prompt), o)
        return "ok"

    def exposed_cancel(self) -> str:
        return _j(self._node.cancel())

    def exposed_measure_step(self, spec: str) -> str:
        return _j(self._node.measure_step(json.loads(spec)))

    def exposed_debug_logits(self, seq: int) -> bytes:
        return self._node.debug_logits(int(seq))

    def exposed_profile_units(self, spec: str) -> str:
        return _j(self._node.profile_units(json.loads(spec)))

    def exposed_measure_link(self, spec: str) -> str:
        return _j(self._node.measure_link(json.loads(spec)))

    def exposed_set_links(self, links: str) -> str:
        node = self._node
        node.shaping = json.loads(links)
        for name, link in node.out.items():
            s = node.shaping.get(name, {})
            link.configure(s.get("bandwidth_bytes_s"), s.get("latency_s", 0.0))
        return "ok"

    def exposed_stats(self) -> str:
        return _j(self._node.stats())


def make_authenticator(secret: bytes, timeout: float = auth.DEFAULT_TIMEOUT_S):
    def authenticator(sock):
        try:
            auth.server_handshake(sock, secret, b"control", timeout)
        except (auth.AuthError, OSError) as e:
            log.warning("control: refused %s: %s", _peer(sock), e)
            raise AuthenticationError(str(e)) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, None
    return authenticator


def _peer(sock) -> str:
    try:
        h, p = sock.getpeername()[:2]
        return f"{h}:{p}"
    except OSError:
        return "?"


DEVICE_ROLE_ENV = "EDGESHARD_ROLE"  # read by model.py before it prepares weights


def serve(host: str, port: int, token_file: str | None = None, device: str = "cpu", name: str | None = None,
          data_port: int = 0, memory_gib: float | None = None, auth_timeout: float = auth.DEFAULT_TIMEOUT_S,
          ready=None) -> None:
    """Run a device server until the process is killed (blocking).

    token_file None: $EDGESHARD_HOME/token (~/.cache/edgeshard/token), created with a random secret (0600)
    if missing. Prints one ready line: `edgeshard serve: device NAME control H:P data H:D pid N ready`.
    """
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device {device!r}: use cpu or cuda")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available to this torch ({torch.__version__})")
    path = auth.ensure_token_file(None) if token_file is None else token_file
    secret = auth.load_secret(path)
    # torch (imported on the first load) takes its thread count from OMP_NUM_THREADS, set by the launcher
    node = Node(host, secret, device, name or "", data_port,
                int(memory_gib * 2**30) if memory_gib else None, auth_timeout)
    server = ThreadedServer(DeviceService(node), hostname=host, port=port,
                            authenticator=make_authenticator(secret, auth_timeout),
                            protocol_config=dict(PROTOCOL_CONFIG), logger=logging.getLogger("edgeshard.rpyc"))
    line = (f"edgeshard serve: device {node.name} control {server.host}:{server.port} "
            f"data {node.data.host}:{node.data.port} pid {os.getpid()} ready")
    (ready or (lambda s: print(s, flush=True)))(line)
    try:
        server.start()
    finally:
        node.data.close()


def build_parser(prog: str = "edgeshard serve") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Serve this device's shard (control: rpyc; data: binary frames).")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (control and data); default 127.0.0.1")
    ap.add_argument("--port", type=int, default=18861, help="control port (0: pick a free one); default 18861")
    ap.add_argument("--token-file", help="shared secret (default $EDGESHARD_HOME/token, created if missing)")
    ap.add_argument("--device", default="cpu", help="torch device for the shard: cpu or cuda")
    ap.add_argument("--data-port", type=int, default=0, help="data plane port (default 0: a free one)")
    ap.add_argument("--name", help="device name (the controller sets it per run)")
    ap.add_argument("--memory-gib", type=float, help="memory to report (default: what the machine has free)")
    ap.add_argument("--auth-timeout", type=float, default=auth.DEFAULT_TIMEOUT_S,
                    help="seconds a new connection has to authenticate")
    ap.add_argument("--log-level", default="WARNING")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A device process never converts weights (model.py, ALLOW_PREPARE): its memory share is sized for its shard.
    os.environ[DEVICE_ROLE_ENV] = "device"
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        serve(args.host, args.port, args.token_file, args.device, args.name, args.data_port, args.memory_gib,
              args.auth_timeout)
    except (auth.AuthError, ValueError, OSError) as e:
        print(f"edgeshard serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
