"""L replicas of one model whose parameters, gradients and buffers are rows of stacks.

The stacked-local-workers contract (docs/design.md): a process hosts L workers and every
parameter is one tensor `[L, *shape]`; gossip algorithms and the optimizer work on
those stacks in a few batched ops. Each replica is an ordinary `nn.Module` whose
parameters are views into the stacks (row l), whose `.grad` are views into the
gradient stacks (autograd accumulates into them in place), and whose buffers (batch
norm statistics) are views into buffer stacks. So a replica trains like any model,
and what it learns is immediately in the stacks, with no copies.

    replicas = StackedReplicas(template_model, num_replicas=L, device=device, compute="loop")
    losses, corrects, counts, hidden = replicas.gradients(x, y)   # x: [L, batch, ...]; fills replicas.grads
    gossip.step(replicas.params)                                  # edits every replica at once

How the replicas' forward/backward runs is chosen once, at construction: "loop" (one
replica after the other; any model, the LSTM's hidden states), "vmap" (torch.func over
the stacks; image models, float32) or "graph" (a CUDA graph of the loop over several
streams; image models on a GPU).

All replicas start as copies of `template` (the same initialization, as in the paper).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


COMPUTES = ("loop", "vmap", "graph")


def loss_and_correct(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy in float32 (mean or sum over every prediction) and the number of correct
    predictions: the loss of every compute path, of evaluation, of image and language models."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction=reduction)
    return loss, (logits.detach().argmax(dim=-1) == targets).sum()


def _owner(module: nn.Module, dotted_name: str) -> tuple[nn.Module, str]:
    *path, attribute = dotted_name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, attribute


def views(buffer: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """A flat buffer seen as stacks of the shapes of `like`, back to back."""
    return [part.view(t.shape) for t, part in zip(like, buffer.split([t.numel() for t in like]))]


def in_one_buffer(stacks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the stacks back to back in one flat buffer, when they share a dtype and device
    (else one copy each): kernels that walk the buffer reach every stack from one launch."""
    if len({(t.dtype, t.device) for t in stacks}) > 1:
        return [t.clone() for t in stacks]
    return views(torch.cat([t.reshape(-1) for t in stacks]), stacks)


def zeros_in_one_buffer(like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero stacks shaped like `like` (dtype and device included), held as `in_one_buffer` holds
    copies, without zeroed copies to gather first."""
    if len({(t.dtype, t.device) for t in like}) > 1:
        return [torch.zeros_like(t) for t in like]
    return views(like[0].new_zeros(sum(t.numel() for t in like)), like)


class StackedReplicas:
    """`params[k]`, `grads[k]`: `[L, *shape]` float32 stacks in `parameter_names` order;
    `buffers[k]`: `[L, *shape]` stacks in `buffer_names` order; `replicas[l]`: the modules."""

    def __init__(self, template: nn.Module, num_replicas: int, device: torch.device, compute: str = "loop",
                 autocast_dtype: torch.dtype | None = None, graph_streams: int = 8, language_model: bool = False,
                 compile_replicas: bool = False):
        if compute not in COMPUTES:
            raise ValueError(f"compute={compute!r} is not one of {', '.join(COMPUTES)}")
        if compile_replicas and compute != "graph":
            raise ValueError(f"compile_replicas compiles each replica's forward for the CUDA graph of compute='graph', "
                             f"not compute={compute!r}")
        self.compute, self.autocast_dtype, self.graph_streams = compute, autocast_dtype, graph_streams
        self.language_model = language_model
        template = template.to(device)
        unique = dict(template.named_parameters())  # ties (LSTM decoder = embedding) appear once
        self.parameter_names = list(unique)
        self.buffer_names = [name for name, _ in template.named_buffers()]
        stack = lambda t: t.detach().unsqueeze(0).repeat((num_replicas,) + (1,) * t.dim()).contiguous()
        self.params = in_one_buffer([stack(p).float() for p in unique.values()])  # fused gossip kernels read them in place
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.buffers = [stack(b) for _, b in template.named_buffers()]
        index_of_tensor = {id(p): k for k, p in enumerate(unique.values())}
        every_parameter_name = [(name, index_of_tensor[id(p)]) for name, p in template.named_parameters(remove_duplicate=False)]

        self.replicas = []
        for row in range(num_replicas):
            replica = copy.deepcopy(template)
            views = {}
            for k in range(len(self.params)):
                views[k] = nn.Parameter(self.params[k][row])
                views[k].grad = self.grads[k][row]
            for name, k in every_parameter_name:
                module, attribute = _owner(replica, name)
                module._parameters[attribute] = views[k]
            for name, buffer_stack in zip(self.buffer_names, self.buffers):
                module, attribute = _owner(replica, name)
                module._buffers[attribute] = buffer_stack[row]
            if compile_replicas:  # Inductor's fused kernels, recorded into the graph with the rest
                replica.forward = torch.compile(replica.forward)
            self.replicas.append(replica)
        self.template = template
        self._standalone = None  # model_from_rows's model
        self._vmapped = None
        self._graphed = None  # (key, CapturedStep) of graphed_gradients

    def __len__(self) -> int:
        return len(self.replicas)

    def zero_grad(self) -> None:
        for grad in self.grads:
            grad.zero_()

    def train(self, mode: bool = True) -> None:
        for replica in self.replicas:
            replica.train(mode)

    def float_buffer_indices(self) -> list[int]:
        """Buffers that can be averaged (batch-norm statistics; not counters)."""
        return [k for k, b in enumerate(self.buffers) if b.is_floating_point()]

    def model_from_rows(self, params: list[torch.Tensor], buffers: list[torch.Tensor]) -> nn.Module:
        """A standalone model holding copies of the given per-parameter / per-buffer tensors (e.g.
        averages). It is one copy of the template, made on the first call and refilled on every
        call (a deep copy per epoch cost an H100 13 ms, a third of the test pass it served):
        use it before the next call. Under bfloat16 autocast on a GPU an image model's weights
        are channels_last, as the test's images are (metrics.evaluate)."""
        if self._standalone is None:
            self._standalone = copy.deepcopy(self.template)
            if self.autocast_dtype is not None and self.params[0].is_cuda and not self.language_model:
                self._standalone.to(memory_format=torch.channels_last)
        state = dict(zip(self.parameter_names, params)) | dict(zip(self.buffer_names, buffers))
        self._standalone.load_state_dict(state, strict=False)
        return self._standalone

    def gradients(self, x: torch.Tensor, y: torch.Tensor, hidden=None):
        """Every replica's loss gradient at its own parameters, into `grads`, computed the way
        chosen at construction. x, y: `[L, batch, ...]`. Returns per-replica float32 losses,
        correct predictions and prediction counts, and (language model) the hidden states."""
        if self.compute == "vmap":
            losses, corrects = self.vmapped_gradients(x, y)
        elif self.compute == "graph":
            losses, corrects = self.graphed_gradients(x, y, self.autocast_dtype, self.graph_streams)
        else:
            losses, corrects, hidden = self.looped_gradients(x, y, hidden)
        counts = torch.full((len(self),), float(y[0].numel()), device=x.device)
        return losses.float(), corrects.float(), counts, hidden

    def looped_gradients(self, x: torch.Tensor, y: torch.Tensor, hidden=None):
        """compute="loop": one replica after the other (any model; the LSTM carries its hidden states)."""
        self.zero_grad()
        losses, corrects, new_hidden = [], [], []
        autocast = torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                  enabled=self.autocast_dtype is not None)
        for row, replica in enumerate(self.replicas):
            with autocast:
                if self.language_model:
                    logits, state = replica(x[row], None if hidden is None else hidden[row])
                    new_hidden.append(tuple(h.detach() for h in state))
                else:
                    logits = replica(x[row])
                loss, correct = loss_and_correct(logits, y[row])
            loss.backward()
            losses.append(loss.detach())
            corrects.append(correct)
        return torch.stack(losses), torch.stack(corrects), (new_hidden if self.language_model else None)

    def gradient_of(self, row: int, x: torch.Tensor, y: torch.Tensor):
        """Replica `row`'s gradient at its own parameters, into its rows of `grads` (the other rows
        kept: an asynchronous run's pending gradients), whatever `compute` says. x, y: `[batch, ...]`
        (an image model's). Returns its float32 loss and correct predictions."""
        for grad in self.grads:
            grad[row].zero_()
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None):
            loss, correct = loss_and_correct(self.replicas[row](x), y)
        loss.backward()
        return loss.detach().float(), correct.float()

    def vmapped_gradients(self, x: torch.Tensor, y: torch.Tensor):
        """Every replica's cross-entropy gradient in one pass: torch.func.vmap over the
        stacks (convolutions become grouped convolutions; one kernel serves all replicas
        instead of one per replica). Fills `grads`, updates batch-norm buffers in place,
        and returns per-replica (loss, correct predictions). float32; the same numbers as
        the per-replica loop up to float rounding."""
        from torch.func import functional_call, grad_and_value, vmap

        if self._vmapped is None:
            template = self.template

            def loss(params, buffers, inputs, targets):
                logits = functional_call(template, {**params, **buffers}, (inputs,))
                value, correct = loss_and_correct(logits, targets)
                return value, (value.detach(), correct)

            self._vmapped = vmap(grad_and_value(loss, has_aux=True))
        params = dict(zip(self.parameter_names, self.params))
        buffers = dict(zip(self.buffer_names, self.buffers))
        grads, (_, (losses, corrects)) = self._vmapped(params, buffers, x, y)
        for stack, name in zip(self.grads, self.parameter_names):
            stack.copy_(grads[name])
        return losses, corrects

    def graphed_gradients(self, x: torch.Tensor, y: torch.Tensor, autocast_dtype: torch.dtype | None = None,
                          num_streams: int = 8):
        """Every replica's forward/backward replayed from one CUDA graph (CUDA only).

        The replicas run exactly as in the per-replica loop (their own dense
        convolutions, batch-norm statistics and losses; the numerics of independent
        workers), recorded once and then replayed with one launch per step. The
        replicas are spread over `num_streams` streams inside the graph, so the
        small per-replica kernels (batch 128 fills a fraction of a GPU) run side by
        side. Images are laid out channels_last; `autocast_dtype` (e.g. bfloat16)
        is the compute dtype of torch.autocast, parameters stay float32. Fills
        `grads`, updates batch-norm buffers in place, returns per-replica
        (loss, correct predictions). The graph is recorded again when the batch
        shape or the settings change."""
        key = (tuple(x.shape), x.dtype, tuple(y.shape), autocast_dtype, num_streams)
        if self._graphed is None or self._graphed[0] != key:
            self._graphed = (key, _CapturedStep(self, x, y, autocast_dtype, num_streams))
        return self._graphed[1].replay(x, y)


class _CapturedStep:
    """The CUDA graph behind StackedReplicas.graphed_gradients, with its static inputs
    and outputs. Recording runs a few warm-up steps (cuDNN and the allocator need
    them); the batch-norm buffers they touch are put back afterwards, so recording
    leaves the replicas as they were."""

    def __init__(self, workers: StackedReplicas, x, y, autocast_dtype, num_streams: int):
        if x.device.type != "cuda":
            raise RuntimeError("graphed_gradients records a CUDA graph; its inputs must be on a CUDA device")
        device, num_replicas = x.device, len(workers)
        # [L, B, C, H, W] with every replica's batch channels_last; always a copy of its own
        self.x = x.permute(0, 1, 3, 4, 2).clone(memory_format=torch.contiguous_format).permute(0, 1, 4, 2, 3)
        self.y = y.clone()
        self.losses = torch.zeros(num_replicas, device=device)
        self.corrects = torch.zeros(num_replicas, device=device)
        streams = [torch.cuda.Stream(device) for _ in range(num_streams)]

        def every_replica():
            workers.zero_grad()
            start = torch.cuda.current_stream(device)
            for stream in streams:
                stream.wait_stream(start)
            for row, replica in enumerate(workers.replicas):
                with torch.cuda.stream(streams[row % num_streams]):
                    with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None,
                                        cache_enabled=False):  # a graph cannot keep autocast's weight cache
                        logits = replica(self.x[row])
                        loss, correct = loss_and_correct(logits, self.y[row])
                    loss.backward()
                    self.losses[row] = loss.detach()
                    self.corrects[row] = correct
            for stream in streams:
                start.wait_stream(stream)

        saved_buffers = [b.clone() for b in workers.buffers]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                every_replica()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            every_replica()
        with torch.no_grad():
            for buffer, saved in zip(workers.buffers, saved_buffers):
                buffer.copy_(saved)

    def replay(self, x, y):
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.losses.clone(), self.corrects.clone()
