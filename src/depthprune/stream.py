"""Where each path of a decoder layer reads and writes the residual stream.

This is the one place that knows it. Scoring (:mod:`depthprune.score.static`), emulator
fitting (:mod:`depthprune.recover.emulate`), emulator installation
(:mod:`depthprune.recover.install`, through :mod:`depthprune.units`) and prefix reuse
(:mod:`depthprune.score.adaptive`) all ask this module instead of deriving it from the
architecture file themselves.

For a decoder layer with input ``h_in`` and output ``h_out`` (both ``(B, T, D)``):

- the attention path reads ``h_in`` (raw, before its pre-norms) and adds ``u_attn``: the
  output of its last post-norm, or of the attention module when it has none;
- the MLP path reads ``h_mid`` and adds ``u_mlp`` (same rule). ``h_mid`` is ``h_in`` with
  a parallel residual (GPT-NeoX, Phi), and otherwise the stream after the attention add,
  ``h_in + u_attn``, taken where the layer hands it to the path: the input of the path's
  first pre-norm, or of the MLP module itself when the path has no pre-norm;
- ``h_out = h_in + u_attn + u_mlp``.

So a unit enters and updates the stream as follows (:meth:`LayerStreams.passage`):
``block.i``: ``h_in`` and ``h_out - h_in``; ``attn.i``: ``h_in`` and ``u_attn``;
``mlp.i``: ``h_mid`` and ``u_mlp``.

The stream's writers, in order, are the embeddings, then per layer the attention and the
MLP path (in a parallel layer both write at the same point, after both have read).
:meth:`ResidualStream.writer_before` finds the last kept writer before a removed unit:
what its stand-in can be folded into (:mod:`depthprune.recover.fold`), and the output a
linear emulator reads.

Hooks are ``functools.partial`` objects of module-level functions, so ``copy.deepcopy``
of a model maps a hook's callback to the copy's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from depthprune.architectures import ArchSpec, get_submodule

StreamFn = Callable[[torch.Tensor], None]


def hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-states argument of a forward call (a decoder layer's, a path module's or a norm's).

    Decoder layers and their modules take it first, by position or as ``hidden_states``.
    """
    return args[0] if args else kwargs["hidden_states"]


def with_hidden_arg(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The arguments of a forward call with the hidden states replaced by ``hidden``."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module's output: a tensor, or a tuple led by one."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _on_input(fn: StreamFn, _module: nn.Module, args: tuple, kwargs: dict) -> None:
    fn(hidden_arg(args, kwargs))


def _on_output(fn: StreamFn, _module: nn.Module, _args: tuple, output: Any) -> None:
    fn(hidden_of(output))


def on_layer_input(layer: nn.Module, fn: StreamFn) -> RemovableHandle:
    """Call ``fn(h_in)`` with the stream entering ``layer`` on every forward pass."""
    return layer.register_forward_pre_hook(functools.partial(_on_input, fn), with_kwargs=True)


def on_layer_output(layer: nn.Module, fn: StreamFn) -> RemovableHandle:
    """Call ``fn(h_out)`` with the stream leaving ``layer`` on every forward pass."""
    return layer.register_forward_hook(functools.partial(_on_output, fn))


@dataclass(frozen=True)
class Passage:
    """How the residual stream passes one unit.

    Attributes:
        entering: The raw stream entering the unit.
        update: What the unit adds to it.
        output: The stream leaving a block (the layer's output); ``None`` for a sublayer,
            whose :attr:`leaving` is computed.
    """

    entering: torch.Tensor
    update: torch.Tensor
    output: torch.Tensor | None = None

    @property
    def leaving(self) -> torch.Tensor:
        """``entering + update``: for a sublayer of a parallel family, the stream the layer
        would output without the other sublayer."""
        return self.output if self.output is not None else self.entering + self.update


@dataclass
class LayerStreams:
    """The residual stream around one decoder layer during one forward pass, ``(B, T, D)`` each.

    Attributes:
        h_in: The layer's input.
        h_out: The layer's output.
        entering: Sublayer kind -> the raw stream entering its path.
        update: Sublayer kind -> what its path adds to the stream.
    """

    h_in: torch.Tensor | None = None
    h_out: torch.Tensor | None = None
    entering: dict[str, torch.Tensor] = field(default_factory=dict)
    update: dict[str, torch.Tensor] = field(default_factory=dict)

    def passage(self, kind: str, select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Passage:
        """The stream entering, the update of, and the stream leaving a unit of ``kind``.

        Args:
            kind: ``block``, ``attn`` or ``mlp``.
            select: Applied to the recorded tensors first (e.g. to keep real tokens only,
                ``(B, T, D) -> (M, D)``), so the arithmetic runs on what is kept.
        """
        sel = select or (lambda x: x)
        if kind == "block":
            h, h_out = sel(self.h_in), sel(self.h_out)  # type: ignore[arg-type]
            return Passage(h, h_out - h, h_out)
        return Passage(sel(self.entering[kind]), sel(self.update[kind]))

    def clear(self) -> None:
        self.h_in = self.h_out = None
        self.entering.clear()
        self.update.clear()


def _record_input(rec: LayerStreams, kinds: tuple[str, ...], h: torch.Tensor) -> None:
    rec.h_in = h
    for kind in kinds:
        rec.entering[kind] = h


def _record_output(rec: LayerStreams, done: Callable[[LayerStreams], None], h: torch.Tensor) -> None:
    rec.h_out = h
    try:
        done(rec)
    finally:
        rec.clear()  # no hidden state outlives its layer


@dataclass(frozen=True, order=True)
class Writer:
    """A module whose output is added to the residual stream.

    Attributes:
        layer: The layer index, or ``-1`` for the token embeddings.
        kind: ``attn`` or ``mlp``; ``embeddings`` for the token embeddings.
    """

    layer: int
    kind: str

    @classmethod
    def embeddings(cls) -> Writer:
        return cls(-1, "embeddings")

    @property
    def is_embeddings(self) -> bool:
        return self.layer < 0

    def __str__(self) -> str:
        return "embeddings" if self.is_embeddings else f"{self.kind}.{self.layer}"


@dataclass(frozen=True)
class ResidualStream:
    """Where the decoder layers of one family read and write the residual stream.

    Attributes:
        spec: The family spec.
        parallel: Whether attention and MLP both read the layer input.
    """

    spec: ArchSpec
    parallel: bool

    @classmethod
    def of(cls, spec: ArchSpec, config: Any) -> ResidualStream:
        return cls(spec, spec.is_parallel(config))

    def reads_layer_input(self, kind: str) -> bool:
        """Whether path ``kind`` reads the layer input (attention always; MLP in parallel families)."""
        self.spec.path(kind)  # validates the kind
        return kind == "attn" or self.parallel

    def reader(self, kind: str) -> str | None:
        """Dotted name, in the layer, of the module whose input is the raw stream entering
        path ``kind``; ``None`` when that stream is the layer input."""
        if self.reads_layer_input(kind):
            return None
        path = self.spec.path(kind)
        return path.pre_norms[0] if path.pre_norms else path.module

    def writer(self, kind: str) -> str:
        """Dotted name, in the layer, of the module whose output is path ``kind``'s update
        as added to the stream (after any post-norms)."""
        path = self.spec.path(kind)
        return path.post_norms[-1] if path.post_norms else path.module

    def writer_before(
        self, kind: str, index: int, removed: Mapping[int, Iterable[str]]
    ) -> tuple[Writer, list[tuple[int, str]]]:
        """The last kept writer at or before the point where unit ``kind.index`` adds its update.

        A constant or a linear function of that writer's output, added there instead of
        at the unit, reaches everything after it alike, provided nothing reads the stream
        in between: every path passed over on the way back is removed, so only its
        stand-in could (the caller checks those). In a parallel layer the two paths write
        at one point after both have read, so a kept sibling is the writer itself.

        Args:
            kind: ``block``, ``attn`` or ``mlp``.
            index: The unit's layer.
            removed: Layer -> the path kinds removed there (``attn``, ``mlp``).

        Returns:
            ``(writer, passed)``: the writer (:meth:`Writer.embeddings` when no kept path
            precedes), and the removed ``(layer, kind)`` paths passed over, latest first,
            not counting the unit's own.
        """
        gone = {i: set(k) for i, k in removed.items()}
        order = ("attn", "mlp")
        if kind == "block":
            candidates: list[tuple[int, str]] = []
        elif self.parallel:
            candidates = [(index, "mlp" if kind == "attn" else "attn")]
        else:
            candidates = [(index, "attn")] if kind == "mlp" else []
        candidates += [(i, k) for i in range(index - 1, -1, -1) for k in reversed(order)]
        passed = []
        for layer, k in candidates:
            if k not in gone.get(layer, set()):
                return Writer(layer, k), passed
            passed.append((layer, k))
        return Writer.embeddings(), passed

    def on_writer(self, model: nn.Module, layers: nn.Module, writer: Writer, fn: StreamFn) -> RemovableHandle:
        """Call ``fn(y)`` with the output of ``writer`` (embeddings or a path's update)."""
        if writer.is_embeddings:
            return model.get_input_embeddings().register_forward_hook(functools.partial(_on_output, fn))
        return self.on_update(layers[writer.layer], writer.kind, fn)

    def on_input(self, layer: nn.Module, kind: str, fn: StreamFn) -> RemovableHandle:
        """Call ``fn(h)`` with the raw stream entering path ``kind`` of ``layer``.

        The hook sits on whatever module holds the reader's place when it is registered,
        so it also feeds a stand-in that replaced a removed path or its norms.
        """
        name = self.reader(kind)
        if name is None:
            return on_layer_input(layer, fn)
        return get_submodule(layer, name).register_forward_pre_hook(functools.partial(_on_input, fn), with_kwargs=True)

    def on_update(self, layer: nn.Module, kind: str, fn: StreamFn) -> RemovableHandle:
        """Call ``fn(u)`` with the update that path ``kind`` of ``layer`` adds to the stream."""
        return get_submodule(layer, self.writer(kind)).register_forward_hook(functools.partial(_on_output, fn))

    def record(
        self, layer: nn.Module, kinds: Iterable[str], done: Callable[[LayerStreams], None]
    ) -> list[RemovableHandle]:
        """Hook ``layer`` so that each forward pass calls ``done`` with its :class:`LayerStreams`.

        Args:
            layer: A decoder layer.
            kinds: Sublayer kinds (``attn``, ``mlp``) whose entering stream and update are
                needed; the layer's input and output are always recorded.
            done: Called once the layer has run; the tensors are dropped after it returns.

        Returns:
            The hook handles, to remove.
        """
        rec = LayerStreams()
        wanted = tuple(dict.fromkeys(kinds))
        direct = tuple(k for k in wanted if self.reads_layer_input(k))
        handles = [on_layer_input(layer, functools.partial(_record_input, rec, direct))]
        for kind in wanted:
            if kind not in direct:
                handles.append(self.on_input(layer, kind, functools.partial(rec.entering.__setitem__, kind)))
            handles.append(self.on_update(layer, kind, functools.partial(rec.update.__setitem__, kind)))
        handles.append(on_layer_output(layer, functools.partial(_record_output, rec, done)))
        return handles
