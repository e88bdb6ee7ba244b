"""The source session of a device (edgeshard/device/service.py wires it): the sequences this device started,
its tokenizer and EOS ids.

The generation ring (see docs/architecture.md): the controller submits raw prompt text to the source; the source
tokenises it (prompt token ids never leave this process), runs its stage and sends activations to the next stage,
and so on; the last stage samples and sends the 8-byte token id to the source, which records it, decides whether
the sequence is done (EOS or max_new_tokens) and otherwise embeds the token and starts the next step. A
sequence's next step starts as soon as its token is back, whatever other sequences do (pipeline mode = several
submitted sequences; no global barrier).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edgeshard.device.stage import StageWorker


@dataclass
class SeqState:
    """A sequence on the source device."""

    seq: int
    prompt_tokens: int
    max_new_tokens: int
    generated: list = field(default_factory=list)  # token ids so far
    prefix_offset: int = 0  # incremental detokenisation window (see SourceSession._piece)
    read_offset: int = 0


class SourceSession:
    """What only the source of a run holds. Every method but submit runs under the stage's compute lock (on the
    worker thread, or in the reader thread of the TOKEN frame that brought a token back)."""

    def __init__(self, stage: StageWorker):
        self.stage = stage
        self.seqs: dict[int, SeqState] = {}
        self.tokenizer = None
        self.tokenizer_model = None  # the model name tokenizer was loaded for (None: not loaded)
        self.eos_ids: set[int] = set()

    def forget(self) -> int:
        """Drop every sequence (a new run, cancel, or the stage is gone); returns how many there were."""
        n = len(self.seqs)
        self.seqs.clear()
        return n

    def submit(self, seq: int, prompt, opts: dict) -> None:
        """Queue a prompt (raw text, or a list of token ids) for the worker thread (rpyc thread)."""
        if not self.stage.cfg.get("is_source"):
            raise RuntimeError(f"device {self.stage.name!r} is not configured as the source")
        seq = int(seq)
        self.stage.enqueue("prompt", seq, lambda: self._start(seq, prompt, opts))

    def load_tokenizer(self, model: str) -> None:
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
        ids = getattr(self.stage.model, "eos_token_ids", None)
        if ids is None and self.tokenizer is not None:
            ids = self.tokenizer.eos_token_id
        ids = [] if ids is None else ids
        self.eos_ids = {int(i) for i in (ids if isinstance(ids, (list, tuple, set)) else [ids])}

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

    def _start(self, seq: int, text, opts: dict) -> None:
        """A submitted prompt on the worker thread: tokenise it and run its prefill, (1, prompt tokens) ids."""
        import torch

        stage = self.stage
        cfg = stage.cfg
        if not cfg.get("is_source"):
            raise RuntimeError(f"device {stage.name!r} is not the source of this run")
        t = time.time()
        ids = self._tokenize(text, bool(cfg.get("chat")))
        if not ids:
            raise ValueError(f"prompt of sequence {seq} has no tokens")
        ctx = stage.context_tokens
        if ctx is not None and len(ids) > ctx:  # its prefill would be refused
            raise ValueError(f"prompt of sequence {seq} has {len(ids)} tokens, more than this run's context of "
                             f"{ctx} tokens (configure context_tokens)")
        max_new = int(opts.get("max_new_tokens", cfg.get("max_new_tokens", 32)))
        self.seqs[seq] = SeqState(seq, len(ids), max_new)
        stage.emit({"type": "request", "seq": seq, "t_s": t, "t_submit_controller_s": opts.get("t_submit"),
                    "prompt_tokens": len(ids)})
        stage.compute(seq, 0, 0, torch.tensor([ids], dtype=torch.long))

    def on_token(self, seq: int, step: int, token: int, t: float) -> None:
        """The source learns token `step` of `seq`: finish the sequence, or start its next step at once."""
        stage = self.stage
        st = self.seqs.get(seq)
        if st is None:
            return  # cancelled
        st.generated.append(token)
        ev = {"type": "token", "seq": seq, "step": step, "token_id": token, "t_s": t}
        eos = token in self.eos_ids
        if eos or len(st.generated) >= st.max_new_tokens:
            del self.seqs[seq]
            ev["text"] = self._piece(st)
            stage.emit(ev)
            text = self.tokenizer.decode(st.generated, skip_special_tokens=True) if self.tokenizer else ""
            stage.emit(urgent=True, ev={"type": "seq_done", "seq": seq, "t_s": time.time(),
                                        "token_ids": st.generated, "text": text, "prompt_tokens": st.prompt_tokens,
                                        "reason": "eos" if eos else "length"})
            stage.end(seq)
            return
        position = st.prompt_tokens + len(st.generated) - 1
        import torch

        def next_step() -> None:  # the next step's input: the token, (1, 1) ids
            stage.compute(seq, step + 1, position, torch.tensor([[token]], dtype=torch.long))

        if stage.cfg["is_last"]:  # one device: queue the next step (lets other sequences and cancel in)
            stage.enqueue("next", seq, next_step, epoch=stage.epoch)
        else:
            next_step()
        ev["text"] = self._piece(st)  # detokenise after the next step is on its way
        stage.emit(ev)

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
