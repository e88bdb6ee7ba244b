"""DeviceClient: the controller's handle on one device server (authenticated rpyc control connection).

Every call sends and receives plain values (JSON strings); failures become RuntimeError naming the device.
"""

from __future__ import annotations

import json
import socket
import threading

import rpyc
from rpyc.core.stream import SocketStream

from edgeshard.device import auth, weights, wire
from edgeshard.device.service import PROTOCOL_CONFIG

DEFAULT_TIMEOUT_S = 60.0  # ordinary calls
LONG_TIMEOUT_S = 3600.0  # model loads, profiling, link probes


class DeviceError(RuntimeError):
    """A device failed, refused, or cannot be reached; the message names it."""


class DeviceClient:
    def __init__(self, name: str, host: str, port: int, secret: bytes, timeout: float = DEFAULT_TIMEOUT_S,
                 connect_timeout: float = 10.0, diagnose=None):
        """diagnose: a callable returning why the device stopped answering (testbeds.diagnosis for a testbed that
        is up), used in the error when the connection drops."""
        self.name, self.host, self.port, self.secret = name, host, int(port), secret
        self.diagnose = diagnose
        self.timeout = timeout
        self._lock = threading.Lock()
        try:
            sock = auth.connect(host, self.port, secret, b"control", connect_timeout, where=f"device {name!r}")
        except auth.AuthError as e:
            raise DeviceError(str(e)) from None
        except ConnectionError as e:
            raise DeviceError(f"device {name!r} at {host}:{port} is unreachable: {e} (is it up? `edgeshard testbed status`)") from None
        config = dict(PROTOCOL_CONFIG)
        config["sync_request_timeout"] = timeout
        self.conn = rpyc.connect_stream(SocketStream(sock), config=config)
        self._info: dict | None = None

    def __repr__(self) -> str:
        return f"DeviceClient({self.name!r}, {self.host}:{self.port})"

    def call(self, method: str, *args, timeout: float | None = None):
        """Call an exposed method; the raw result (a str or bytes)."""
        try:
            fn = getattr(self.conn.root, method)
            if timeout is None:
                return fn(*args)
            res = rpyc.async_(fn)(*args)
            res.set_expiry(timeout)
            return res.value
        except (EOFError, ConnectionError, OSError) as e:
            why = self.diagnose() if self.diagnose else "process died or was OOM-killed? see its log"
            raise DeviceError(f"device {self.name!r} at {self.host}:{self.port} is gone ({type(e).__name__}: {e}) "
                              f"{why}") from None
        except rpyc.AsyncResultTimeout:
            raise DeviceError(f"device {self.name!r}: {method} took longer than {timeout or self.timeout:.0f} s") from None
        except DeviceError:
            raise
        except Exception as e:  # an exception raised on the device
            text = str(e).strip().splitlines()
            msg = text[-1] if text else type(e).__name__
            raise DeviceError(f"device {self.name!r}: {method} failed: {msg}") from e

    def _json(self, method: str, *args, timeout: float | None = None):
        return json.loads(self.call(method, *args, timeout=timeout))

    # --- the control API ---------------------------------------------------------------------------------
    def ping(self) -> dict:
        return self._json("ping")

    def info(self) -> dict:
        self._info = self._json("info")
        return self._info

    @property
    def data_port(self) -> int:
        return (self._info or self.info())["data_port"]

    def load_stage(self, model: str, start: int, stop: int, dtype: str = "float32", seed: int = 0,
                   timeout: float = LONG_TIMEOUT_S) -> dict:
        weights.prepare_for_devices(model)  # here, never inside the device's memory share (weights.py)
        spec = {"model": model, "start": int(start), "stop": int(stop), "dtype": dtype, "seed": int(seed)}
        return self._json("load_stage", json.dumps(spec), timeout=timeout)

    def configure(self, cfg: dict, timeout: float = 600.0) -> dict:
        return self._json("configure", json.dumps(cfg), timeout=timeout)

    def submit(self, seq: int, prompt, opts: dict | None = None) -> None:
        """Start a sequence on the source: prompt is raw text, or a list of token ids (models without tokenizer)."""
        opts = dict(opts or {})
        if isinstance(prompt, (list, tuple)):
            opts["token_ids"] = True
            prompt = json.dumps([int(i) for i in prompt])
        self.call("submit", int(seq), str(prompt), json.dumps(opts))

    def cancel(self) -> dict:
        return self._json("cancel")

    def debug_logits(self, seq: int) -> bytes:
        return self.call("debug_logits", int(seq), timeout=600.0)

    def profile_units(self, model: str, start: int, stop: int, dtype: str = "float32", context_tokens: int = 128,
                      prefill_tokens: int = 32, repeats: int = 5, seed: int = 0,
                      timeout: float = LONG_TIMEOUT_S) -> dict:
        weights.prepare_for_devices(model)
        spec = {"model": model, "start": start, "stop": stop, "dtype": dtype, "context_tokens": context_tokens,
                "prefill_tokens": prefill_tokens, "repeats": repeats, "seed": seed}
        return self._json("profile_units", json.dumps(spec), timeout=timeout)

    def measure_link(self, dst: str, host: str, port: int, pings: int = 20, target_s: float = 0.5,
                     timeout: float = 600.0) -> dict:
        spec = {"dst": dst, "host": host, "port": int(port), "pings": pings, "target_s": target_s}
        return self._json("measure_link", json.dumps(spec), timeout=timeout)

    def measure_step(self, activation_bytes: int, latency_s: float = 0.0, steps: int = 200, warmup: int = 20,
                     in_flight: int = 8, timeout: float = 600.0) -> dict:
        """The runtime's cost per stage step beyond the forward pass (service.Node.measure_step)."""
        spec = {"activation_bytes": int(activation_bytes), "latency_s": latency_s, "steps": steps, "warmup": warmup,
                "in_flight": in_flight, "timeout_s": timeout}
        return self._json("measure_step", json.dumps(spec), timeout=timeout + 30)

    def set_links(self, links: dict) -> None:
        self.call("set_links", json.dumps(links))

    def stats(self) -> dict:
        return self._json("stats")

    def subscribe(self, handler, on_close=None) -> wire.Connection:
        """Open an events stream (data plane): handler(conn, frame) gets EVENTS frames in a reader thread."""
        info = self._info or self.info()
        conn = wire.dial(self.host, info["data_port"], self.secret, {"from": "controller", "role": "events"},
                         peer=self.name)
        conn.start_reader(handler, on_close, name="events")
        return conn

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(name: str, host: str, port: int, token_file=None, **kw) -> DeviceClient:
    return DeviceClient(name, host, port, auth.load_secret(token_file), **kw)


def is_loopback(host: str) -> bool:
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return False
