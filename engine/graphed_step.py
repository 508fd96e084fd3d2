"""`train.cuda_graphs`: the whole training step of a member captured as CUDA graphs and replayed.

A step of these models is a few hundred small kernels (docs/method.md, "The training step on a
GPU"): on an H100 the launches, not the arithmetic, set its time. A CUDA graph replays all of
them with one launch. What capture needs, and where it comes from:
- no host sync anywhere in forward, backward and optimizer step (tests/test_sync_free.py);
- static shapes: a batch's shapes take a few values (batch size, the sampler's target bucket),
  and one graph is captured per *shape bucket*, all sharing one memory pool;
- static inputs: every batch is copied into that bucket's input buffers before the replay;
- an optimizer whose step runs on the device: Adam with `capturable=True` (fused on CUDA),
  with bf16 from autocast over fp32 weights instead of DeepSpeed's bf16 optimizer, whose
  overflow check reads the device. The DeepSpeed engine still owns the module and the optimizer
  (checkpoints, resume); the graph calls them directly.

Warm-up and capture run real steps on the bucket's first batch; the weights, the optimizer state,
the model's counters and the CUDA random stream are restored afterwards (in place, so the
graph's pointers stay valid), so capturing changes nothing: the first replay is the step the
batch would have had. Each bucket keeps its gradients alive, so a later capture in the shared
pool cannot be handed their memory. With `capture=False` the same static-buffer step runs
eagerly; the CPU tests use it to check this path against the DeepSpeed step.

Off by default. The README says when a GPU run of the device check has passed it.
"""

from __future__ import annotations

import contextlib

import torch

from adarec.errors import ConfigError

from .nonfinite_watch import gradient_norms

WARMUP_STEPS = 3
GRAD_NORMS = "_grad_norms"
"""Output key of the per-parameter gradient norms [n] (names in GraphedStep.grad_names), which
the trainer hands to its non-finite watch rather than logging."""


def check_graph_config(train_cfg, device: torch.device, world_size: int, model_cfg=None,
                       ds_config: dict | None = None) -> None:
    """Refuse the settings the captured step cannot honour, saying why."""
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graphs=true needs a CUDA device (the run is on {device})")
    if world_size > 1:
        raise ConfigError("train.cuda_graphs=true is for one GPU: DeepSpeed's gradient all-reduce across "
                          f"{world_size} ranks runs outside the graph; use cuda_graphs=false when launching several")
    if train_cfg.zero_stage != 0:
        raise ConfigError("train.cuda_graphs=true needs train.zero_stage=0 (ZeRO partitions the optimizer "
                          "state outside the captured step)")
    if model_cfg is not None and getattr(model_cfg, "level_layout", "auto") == "compact":
        raise ConfigError("train.cuda_graphs=true needs model.level_layout grid or auto: the compact layout's "
                          "size is read on the host, which a captured step cannot do")
    if ds_config is not None:
        zero = ds_config.get("zero_optimization", {}).get("stage", 0)
        if ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled") or zero:
            raise ConfigError("train.cuda_graphs=true: the DeepSpeed config (train.ds_config) turns on bf16, fp16 "
                              "or ZeRO, whose optimizer steps read the device; bf16 comes from autocast here")


class GraphedStep:
    """One member's step (forward, backward, clipping, Adam) as replayable graphs."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, autocast_dtype=None,
                 grad_clip: float = 0.0, capture: bool = True):
        self.module, self.optimizer = module, optimizer
        self.autocast_dtype, self.grad_clip, self.capture = autocast_dtype, grad_clip, capture
        self.buckets: dict[tuple, tuple] = {}   # shape key -> (graph or None, inputs, outputs, kept)
        self.pool = None
        self.grad_names: tuple[str, ...] = ()   # the parameters behind the GRAD_NORMS output

    @staticmethod
    def bucket_key(batch: dict) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.module.parameters()).device.type
        # No cast cache: cached bf16 copies of the weights made during capture would be stale
        # at replay after the optimizer step (CUDA graphs must run autocast uncached).
        return torch.autocast(device_type, dtype=self.autocast_dtype, cache_enabled=False)

    def _step(self, inputs: dict) -> dict[str, torch.Tensor]:
        with self._autocast():
            loss, terms = self.module(inputs)
        loss.backward()
        # Part of the graph, so the trainer's non-finite watch sees every replay's gradients.
        norms = gradient_norms(self.module)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        out = {"loss": loss.detach(), **terms}
        if norms is not None:
            self.grad_names = norms[0]
            out[GRAD_NORMS] = norms[1]
        return out

    def _state_tensors(self) -> list[torch.Tensor]:
        """What a step changes besides its outputs: the parameters themselves, the optimizer's
        state and the model's counters (the same objects on every call, so identity finds them)."""
        tensors = list(self.module.parameters())
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return tensors + list(getattr(self.module, "stat_tensors", list)())

    def snapshot(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the state, keyed by the identity of the live tensors."""
        return {id(t): (t, t.detach().clone()) for t in self._state_tensors()}

    @torch.no_grad()
    def restore(self, saved: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put the saved values back in place; state created since the snapshot (Adam's moments and
        step counts on a first step, the model's counters) goes back to zero, its initial value."""
        for tensor in self._state_tensors():
            if id(tensor) in saved:
                tensor.copy_(saved[id(tensor)][1])
            else:
                tensor.zero_()

    def _build(self, batch: dict) -> tuple:
        inputs = {k: v.clone() for k, v in batch.items()}
        if not self.capture:
            return None, inputs, None, None
        saved = self.snapshot()
        rng = torch.cuda.get_rng_state()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self._step(inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self._step(inputs)
        self.pool = self.pool or graph.pool()
        # The gradients this graph writes live in the shared pool: hold them, or the next bucket's
        # capture (after zero_grad(set_to_none)) could be given their memory.
        kept = [p.grad for p in self.module.parameters()]
        # Undo the warm-up: state and random stream as they were, so the first replay is the step
        # the batch would have had without capture.
        self.restore(saved)
        torch.cuda.set_rng_state(rng)
        return graph, inputs, outputs, kept

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        key = self.bucket_key(batch)
        if key not in self.buckets:
            self.buckets[key] = self._build(batch)
        graph, inputs, outputs, _ = self.buckets[key]
        for name, value in batch.items():
            inputs[name].copy_(value)
        if graph is None:
            self.optimizer.zero_grad(set_to_none=True)
            return self._step(inputs)
        graph.replay()
        return outputs
