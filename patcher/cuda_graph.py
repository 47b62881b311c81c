"""One cached training step recorded as a CUDA graph and replayed (``PatcherConfig.cuda_graph``).

On a GPU the cached step is a few hundred tiny kernels whose cost is the host launching them,
not the device running them. Recorded once per edit (after ``WARMUP`` eager steps: Adam's
state, the autograd buffers and any compile exist by then), a step is one graph launch. The
whole edit trains on one side stream, the recording included.

The graph reads its inputs from tensors it recorded (the step's batch, the memory candidates and
validation rows: copied in before each replay) and writes one packed vector: the parameters the
step was computed at, the four losses and the leak flag. The training loop clones that vector
once per step, since the next replay overwrites it. Forward, backward, gradient clipping and the
Adam update are all inside the graph, so the live parameters have already moved one step when a
replay returns: the snapshot is what the stopping rules read.

Without capture (``capture=False``: any device) the same step runs eagerly from the same
recorded tensors, which is how the logic is tested on a CPU.

A recording that the driver or a library refuses (seen on an H200: cuBLAS failing inside the
capture of a compiled step) costs the edit nothing but speed: nothing recorded has run, so the step
runs again without a graph and the rest of the edit trains as the ordinary loop does, with a
``RecordingFailed`` warning saying why.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .steps import Params, StepOut

WARMUP = 3  # ordinary steps before recording, as torch's whole-network capture recipe warms up


class RecordingFailed(UserWarning):
    """An edit's step could not be recorded as a CUDA graph; the edit trained without one."""


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """A side stream for the whole edit's training: warm-up and replays run on one non-default stream."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


class StepGraph:
    """``one_step`` (forward, backward, clip, Adam) over recorded inputs: ``WARMUP`` steps run
    eagerly from them, then the step is recorded (when ``capture``) and every later one replays it."""

    def __init__(self, one_step: Callable, params: Params, inputs: tuple, capture: bool):
        """``inputs``: (batch, candidates, validation rows), as ``one_step`` takes them."""
        batch, *rows = inputs
        self.shapes = [(k, v.shape) for k, v in params.items()]
        # the warm-up steps read the recorded tensors too: a compiled step then meets the same inputs when recorded
        self.static = tuple(t.clone() for t in (*batch, *rows))
        self._seen = (*batch, *rows)  # copied in again only when the loop hands over another tensor
        tensors, n_batch = list(params.values()), len(batch)

        def run() -> tuple[StepOut, torch.Tensor]:
            with torch.no_grad():
                at = torch.cat([p.detach().flatten() for p in tensors])
            out, losses, leak_ok = one_step(self.static[:n_batch], *self.static[n_batch:])
            return out, torch.cat([at, losses.float(), leak_ok.float()[None]])

        self._run, self.capture, self.calls, self.graph = run, capture, 0, None

    def close(self) -> None:
        """Free the recording and its memory pool (on a GPU, over a gigabyte at the 1.1B shape) when
        the edit ends; the step closure refers back to this object, so without this they would wait
        for Python's cycle collector, which may run in the middle of the next edit."""
        self.graph = self.out = self.packed = self._run = None

    def step(self, batch: tuple, candidates: torch.Tensor, val_top: torch.Tensor
             ) -> tuple[StepOut, torch.Tensor, torch.Tensor, Params]:
        """One step: (its output, valid until the next step; losses (4,); leak flag; the
        parameters the step was computed at). The live parameters are one update further."""
        given = (*batch, candidates, val_top)
        with torch.no_grad():
            for static, seen, t in zip(self.static, self._seen, given):
                if t is not seen:
                    static.copy_(t)
        self._seen = given
        if self.capture and self.graph is None and self.calls == WARMUP:
            # recorded on the stream the warm-up ran on (the autograd nodes it made belong to it); one_step's
            # zero_grad leaves no gradients, so the recorded backward writes them afresh at every replay
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph, stream=torch.cuda.current_stream()):
                    self.out, self.packed = self._run()
            except RuntimeError as exc:  # nothing recorded ran: the parameters and Adam's state are this step's
                self.graph = self.out = self.packed = None
                self.capture = False
                shapes = ", ".join("x".join(map(str, t.shape)) for t in self.static)
                warnings.warn(f"cuda_graph: the training step could not be recorded ({str(exc).strip().splitlines()[0]}; "
                              f"inputs {shapes}); this edit trains without a graph", RecordingFailed, stacklevel=2)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            out, packed = self.out, self.packed
        else:
            out, packed = self._run()
        parts = packed.clone().split([s.numel() for _, s in self.shapes] + [4, 1])
        at = {k: part.view(shape) for (k, shape), part in zip(self.shapes, parts)}
        return out, parts[-2], parts[-1][0] > 0.5, at
