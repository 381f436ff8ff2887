"""Layer-streamed execution: every batch passes a layer while it is loaded, then it is freed.

:class:`StreamedModel` runs the model's own code on a meta-device skeleton
(:class:`~depthprune.streamed.checkpoint.LazyCheckpoint`):

1. The input embeddings are loaded, and the model's forward runs with every decoder layer
   swapped for a recorder: the recorders keep the first layer's input and the arguments
   each layer is called with (attention masks, rotary embeddings, position ids), as the
   model computes them, and the pass stops before the final norm. The embeddings are freed.
2. Layer by layer: the layer's weights are read from the memory-mapped safetensors files,
   every calibration batch of every branch runs through it, and the weights are freed.
3. The model's forward runs again with every layer swapped for a module that hands over
   the final hidden state, so the model's own final norm, head and logit post-processing
   (soft-capping, scaling) turn it into logits. The LM head (a ``nn.Linear``, or a tied
   embedding) is not loaded whole: it is swapped for a module holding a block of
   vocabulary rows read from the checkpoint, so each call gives one chunk of the logits
   (:meth:`StreamedModel.head_chunks`; the losses are folded over the chunks, see
   :mod:`depthprune.streamed.head`). A head of another kind is loaded whole.

A branch is a set of masked units. Branches that mask the same units before layer ``i``
share their hidden states there, so a pass evaluates any number of branches (leave-one-out
candidates, coalitions) while reading each layer once: a branch splits off the shared
prefix at its first masked unit.

Layer arguments are recomputed per batch at each layer from a shell pass (the recorders
again, fed zeros): cheap, and nothing of size ``T x T`` is kept for all batches.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from depthprune.errors import InputError
from depthprune.progress import counter
from depthprune.stream import hidden_arg, hidden_of, with_hidden_arg
from depthprune.streamed.checkpoint import LazyCheckpoint
from depthprune.streamed.spill import ActivationStore
from depthprune.units import ModelLayout, Unit, expand_sublayers, mask_units

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids (B, T), attention_mask (B, T)
Branch = frozenset[Unit]  # masked sublayer units
LayerCall = tuple[tuple, dict]  # a layer's forward arguments, the hidden states left out


class _Stop(Exception):
    """Ends a shell pass once the last layer's arguments are recorded."""


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records its call and passes the stream on."""

    def __init__(self, index: int, calls: list[LayerCall | None], inputs: list[torch.Tensor], last: bool) -> None:
        super().__init__()
        self.index, self.calls, self.inputs, self.last = index, calls, inputs, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = hidden_arg(args, kwargs)
        if self.index == 0:
            self.inputs.append(hidden)
        a, k = with_hidden_arg(args, kwargs, None)  # type: ignore[arg-type]
        self.calls[self.index] = (a, k)
        if self.last:
            raise _Stop
        return hidden


class _Feed(nn.Module):
    """Stands in for a decoder layer in the head pass: returns the final hidden state."""

    def __init__(self, hidden: torch.Tensor, returns_tuple: bool) -> None:
        super().__init__()
        self.hidden, self.returns_tuple = hidden, returns_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.hidden,) if self.returns_tuple else self.hidden


class _ChunkHead(nn.Module):
    """Stands in for the LM head: the logits of a block of vocabulary rows only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias  # (C, D), (C,); plain tensors, not parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


DEFAULT_HEAD_CHUNK = 4096  # vocabulary rows per LM-head chunk when no budget says otherwise


@dataclass(frozen=True)
class StreamConfig:
    """How streamed execution uses memory.

    Attributes:
        budget: Bytes for the weights in memory at a time (one layer, or the embeddings)
            plus the activations kept in memory; activations beyond it spill to disk.
            ``None``: no limit, nothing spills.
        spill_dir: Where the temporary spill folder is made (default: the system's).
        head_rows: Sequences per LM-head call at the end (the logits of a whole batch
            can be larger than the model's layers).
        head_chunk: Vocabulary rows of the LM head read at a time. ``None``: 4096, or
            fewer under a budget (no more bytes than the largest decoder layer).
    """

    budget: int | None = None
    spill_dir: str | None = None
    head_rows: int = 1
    head_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget < 1:
            raise InputError(f"stream budget must be a positive number of bytes, got {self.budget}")
        if self.head_rows < 1:
            raise InputError(f"head_rows must be at least 1, got {self.head_rows}")
        if self.head_chunk is not None and self.head_chunk < 1:
            raise InputError(f"head_chunk must be at least 1, got {self.head_chunk}")


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "T": 1 << 40, "TB": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"512MB"``, ``"2.5GB"``, ``"1048576"`` -> bytes (binary multiples: 1 GB = 2**30)."""
    s = text.strip().upper().replace("IB", "B")
    num = s.rstrip("KMGTB")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise InputError(f"memory size {text!r} is not understood; expected a positive number with an optional unit, e.g. 512MB or 2GB")
    return int(value * _UNITS[unit])


def branch_of(units: Sequence[Unit]) -> Branch:
    """The branch that masks ``units`` (a block masks both of its sublayers)."""
    return frozenset(expand_sublayers(units))


class StreamedModel:
    """A model too large for memory, run layer by layer from its safetensors checkpoint.

    Args:
        ckpt: The skeleton and its checkpoint.
        config: Memory budget and spilling.
    """

    def __init__(self, ckpt: LazyCheckpoint, config: StreamConfig | None = None) -> None:
        self.ckpt = ckpt
        self.config = config or StreamConfig()
        self.model = ckpt.model
        self.layout = ModelLayout(ckpt.model, ckpt.spec)
        self.n_layers = self.layout.n_layers
        self._returns_tuple = False
        self._layer_names = [ckpt.parameter_names(layer) for layer in self.layout.layers]
        embed_in = self.model.get_input_embeddings()
        embed_out = self.model.get_output_embeddings()
        self._in_names = ckpt.parameter_names(embed_in)
        self._out_names = ckpt.parameter_names(embed_out) if embed_out is not None else []
        self._head = embed_out
        self._head_path = ckpt._prefix(embed_out)[:-1] if embed_out is not None else ""
        layer_set = {n for names in self._layer_names for n in names}
        edge = set(self._in_names) | set(self._out_names)
        self._core_names = [n for n, _ in self.model.named_parameters(remove_duplicate=False) if n not in layer_set and n not in edge]
        self.hidden_size = int(embed_in.weight.shape[-1])
        self.layer_reads = 0  # decoder layers read from the checkpoint so far
        self._swap: Callable[[list[Any]], contextlib.AbstractContextManager[Any]] | None = None
        # What runs now, for hooks: (layer, batch index, the branch's items up to this
        # layer); layer -1 while the embeddings run.
        self.context: tuple[int, int, frozenset[Any]] | None = None

    # -- memory ----------------------------------------------------------------------------

    def weight_bytes(self) -> int:
        """The most weight bytes in memory at a time: the core plus a layer, the input
        embeddings, or a chunk of the LM head (the whole head if it is not chunked)."""
        nb = self.ckpt.nbytes
        rows = self.head_chunk_rows()
        head = nb(self._out_names) if rows is None else rows * self._head_row_bytes()
        largest = max([nb(n) for n in self._layer_names] + [nb(self._in_names), head])
        return nb(self._core_names) + largest

    # -- the LM head in vocabulary chunks ----------------------------------------------------

    @property
    def head_is_chunked(self) -> bool:
        """Whether the LM head is read in vocabulary chunks: it is a ``nn.Linear`` (its weight
        and bias have one row per vocabulary entry), so a block of rows gives a block of
        logits. Any other head (none in the supported families) is loaded whole."""
        head = self._head
        return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward and not head._forward_hooks

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head."""
        return int(self._head.out_features) if self.head_is_chunked else 0  # type: ignore[union-attr]

    def _head_row_bytes(self) -> int:
        size = torch.empty((), dtype=self.ckpt.dtype).element_size()
        return size * sum(int(p[0].numel()) for p in self._head.parameters())  # type: ignore[union-attr]

    def head_chunk_rows(self) -> int | None:
        """Vocabulary rows per chunk of the LM head; ``None`` when it is loaded whole."""
        if not self.head_is_chunked:
            return None
        if self.config.head_chunk is not None:
            return min(self.config.head_chunk, self.vocab_size)
        rows = DEFAULT_HEAD_CHUNK
        if self.config.budget is not None:
            layer = max(self.ckpt.nbytes(n) for n in self._layer_names)
            rows = min(rows, max(1, layer // self._head_row_bytes()))
        return min(rows, self.vocab_size)

    def n_head_chunks(self) -> int:
        """How many chunks :meth:`head_chunks` yields."""
        rows = self.head_chunk_rows()
        return 1 if rows is None else -(-self.vocab_size // rows)

    def head_chunks(self) -> Iterator[tuple[int, nn.Module | None]]:
        """The LM head one block of vocabulary rows at a time, inside :meth:`output_stage`.

        Yields:
            ``(start, chunk)``: pass ``chunk`` to :meth:`head` for the logits of vocabulary
            rows ``[start, start + C)``. A head that is not chunked comes as ``(0, None)``:
            the whole head, already loaded.
        """
        rows = self.head_chunk_rows()
        if rows is None:
            yield 0, None
            return
        for start in range(0, self.vocab_size, rows):
            stop = min(start + rows, self.vocab_size)
            tensors = self.ckpt.read_rows(self._out_names, start, stop)
            prefix = f"{self._head_path}."
            chunk = _ChunkHead(tensors[prefix + "weight"], tensors.get(prefix + "bias"))
            yield start, chunk
            del chunk, tensors

    @contextlib.contextmanager
    def _head_as(self, chunk: nn.Module | None) -> Iterator[None]:
        if chunk is None:
            yield
            return
        parent_name, _, attr = self._head_path.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        saved = parent._modules[attr]
        parent._modules[attr] = chunk
        try:
            yield
        finally:
            parent._modules[attr] = saved

    def activation_budget(self, batch_bytes: int) -> int | None:
        """Bytes of activations kept in memory; checks that the budget holds a layer and a batch.

        Args:
            batch_bytes: Bytes of one batch's hidden states ``(B, T, D)``.

        Raises:
            InputError: the budget cannot hold one layer and one batch's input and output.
        """
        if self.config.budget is None:
            return None
        need = self.weight_bytes() + 2 * batch_bytes
        if self.config.budget < need:
            raise InputError(
                f"stream budget {self.config.budget:,} bytes cannot hold one layer's weights and one batch's "
                f"activations ({need:,} bytes); raise --stream-budget to at least {need:,} or use smaller batches"
            )
        return self.config.budget - self.weight_bytes()

    def store(self, batch_bytes: int) -> ActivationStore:
        """A fresh activation store under this config's budget (use it in a ``with``)."""
        return ActivationStore(self.activation_budget(batch_bytes), self.config.spill_dir, self.ckpt.device)

    # -- the model's own forward, with the layers swapped ----------------------------------

    @contextlib.contextmanager
    def _layers_as(self, stand_ins: Sequence[nn.Module]) -> Iterator[None]:
        layers = self.layout.layers
        saved = [layers._modules[str(j)] for j in range(self.n_layers)]
        for j, m in enumerate(stand_ins):
            layers._modules[str(j)] = m
        try:
            yield
        finally:
            for j, m in enumerate(saved):
                layers._modules[str(j)] = m

    def _shell(self, batch: Batch, embed: bool) -> tuple[torch.Tensor | None, list[LayerCall]]:
        """Run the model up to its first layer: that layer's input (with ``embed``) and every layer's call."""
        ids, mask = batch
        device = self.ckpt.device
        calls: list[LayerCall | None] = [None] * self.n_layers
        inputs: list[torch.Tensor] = []
        recorders = [_Recorder(j, calls, inputs, j == self.n_layers - 1) for j in range(self.n_layers)]
        if embed:
            kwargs: dict[str, Any] = {"input_ids": ids.to(device)}
        else:
            kwargs = {"inputs_embeds": torch.zeros(*ids.shape, self.hidden_size, dtype=self.ckpt.dtype, device=device)}
        with self._layers_as(recorders), contextlib.suppress(_Stop):
            self.model(**kwargs, attention_mask=mask.to(device), use_cache=False)
        return (inputs[0] if inputs else None), calls  # type: ignore[return-value]

    @torch.no_grad()
    def head(
        self, hidden: torch.Tensor, mask: torch.Tensor, logits_to_keep: torch.Tensor | int = 0, chunk: nn.Module | None = None
    ) -> torch.Tensor:
        """Logits from final hidden states ``(B, T, D)``, through the model's own norm and head.

        Must run inside :meth:`output_stage`. With ``chunk`` (from :meth:`head_chunks`) the
        head is swapped for it, and the result is that chunk's logits ``(B, T, C)``, after
        the model's own elementwise post-processing (soft-capping, scaling).
        """
        with self._layers_as([_Feed(hidden, self._returns_tuple)] * self.n_layers), self._head_as(chunk):
            out = self.model(inputs_embeds=hidden, attention_mask=mask.to(hidden.device), use_cache=False, logits_to_keep=logits_to_keep)
        logits = out.logits
        if chunk is not None and logits.shape[-1] != chunk.weight.shape[0]:  # type: ignore[union-attr]
            raise RuntimeError(
                f"{type(self.model).__name__} turns {chunk.weight.shape[0]} head rows into {logits.shape[-1]} logits; "  # type: ignore[union-attr]
                "its logits are not an elementwise function of the head's rows, so its head cannot be streamed in chunks"
            )
        return logits

    @contextlib.contextmanager
    def output_stage(self) -> Iterator[None]:
        """Inside the block, the final norm is loaded, and the LM head too if it is not
        read in chunks (see :meth:`head_chunks`)."""
        names = [*self._core_names, *([] if self.head_is_chunked else self._out_names)]
        self.ckpt.load_(names)
        try:
            yield
        finally:
            self.ckpt.free_(names)

    # -- the pass ---------------------------------------------------------------------------

    @torch.no_grad()
    def run(
        self,
        batches: Sequence[Batch],
        branches: Sequence[Branch],
        store: ActivationStore,
        on_trunk: Callable[[int, int, Batch], contextlib.AbstractContextManager[Any]] | None = None,
        show_progress: bool = True,
        *,
        swap: Callable[[list[Any]], contextlib.AbstractContextManager[Any]] | None = None,
        upto: int | None = None,
    ) -> dict[Branch, int]:
        """Run every batch of every branch through all layers, each layer read once.

        Args:
            batches: ``(input_ids, attention_mask)`` pairs.
            branches: Sets of masked sublayer units (see :func:`branch_of`); the empty set
                is the full model.
            store: Receives the final hidden state of branch state ``s`` and batch ``b``
                under ``(s, b)``.
            on_trunk: Called as ``on_trunk(layer, batch_index, batch)`` around the full
                model's run of a layer on a batch (e.g. to attach metric hooks); the
                full model (the empty branch) runs at every layer when it is given.
            show_progress: Show a progress bar on a terminal.
            swap: Instead of masking: called as ``swap(items)`` with the items of a branch
                at the current layer, a context manager that puts them in place (e.g.
                emulators, :func:`depthprune.recover.emulate.emulate`). A branch's items
                then need only an ``index`` (their layer) and to sort among themselves;
                ones with a ``unit`` attribute are checked as that unit.
            upto: Stop after this layer (default: the last); the store then holds each
                branch's output of layer ``upto``.

        Returns:
            Branch -> its state id in ``store``.
        """
        self.layout.check_units(getattr(u, "unit", u) for b in branches for u in b)
        self._swap = swap
        wanted = list(dict.fromkeys(branches))
        if on_trunk is not None and frozenset() not in wanted:
            wanted.append(frozenset())
        self.ckpt.load_(self._core_names)
        try:
            self.ckpt.load_(self._in_names)
            try:
                for b, batch in enumerate(batches):
                    self.context = (-1, b, frozenset())
                    h0, _ = self._shell(batch, embed=True)
                    store.put((0, b), h0)  # (B, T, D)
            finally:
                self.ckpt.free_(self._in_names)
            states: dict[Branch, int] = {frozenset(): 0}
            next_id = 1
            n_run = self.n_layers if upto is None else min(upto + 1, self.n_layers)
            with counter(n_run, "streamed layers", disable=not show_progress) as bar:
                for i in range(n_run):
                    groups: dict[Branch, dict[Branch, int]] = {}
                    for br in wanted:
                        sig_in = frozenset(u for u in br if u.index < i)
                        sig_out = frozenset(u for u in br if u.index <= i)
                        outs = groups.setdefault(sig_in, {})
                        if sig_out not in outs:
                            outs[sig_out] = next_id
                            next_id += 1
                    self.ckpt.load_(self._layer_names[i])
                    self.layer_reads += 1
                    try:
                        self._layer_step(i, batches, store, states, groups, on_trunk)
                    finally:
                        self.ckpt.free_(self._layer_names[i])
                    states = {sig: sid for outs in groups.values() for sig, sid in outs.items()}
                    bar.update()
        finally:
            self.ckpt.free_(self._core_names)
            self.context = None
        return {br: states[br] for br in wanted}

    def _layer_step(
        self,
        i: int,
        batches: Sequence[Batch],
        store: ActivationStore,
        states: dict[Branch, int],
        groups: dict[Branch, dict[Branch, int]],
        on_trunk: Callable[[int, int, Batch], contextlib.AbstractContextManager[Any]] | None,
    ) -> None:
        """Run every batch of every branch through layer ``i`` (its arguments computed once per batch)."""
        layer = self.layout.layers[i]
        for b, batch in enumerate(batches):
            args, kwargs = self._shell(batch, embed=False)[1][i]
            for sig_in, outs in groups.items():
                self._branch_step(layer, i, b, batch, (args, kwargs), store, states[sig_in], sig_in, outs, on_trunk)

    def _branch_step(
        self,
        layer: nn.Module,
        i: int,
        b: int,
        batch: Batch,
        call: LayerCall,
        store: ActivationStore,
        sid_in: int,
        sig_in: Branch,
        outs: dict[Branch, int],
        on_trunk: Callable[[int, int, Batch], contextlib.AbstractContextManager[Any]] | None,
    ) -> None:
        """Run batch ``b`` of one shared prefix through layer ``i``, once per way it continues."""
        args, kwargs = call
        hidden = store.take((sid_in, b))  # (B, T, D)
        for sig_out, sid in outs.items():
            self.context = (i, b, sig_out)
            here = sorted(u for u in sig_out if u.index == i)
            trunk = on_trunk is not None and not sig_in and not here
            guard = on_trunk(i, b, batch) if trunk else contextlib.nullcontext()
            if not here:
                masking: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            elif self._swap is not None:
                masking = self._swap(here)
            else:
                masking = mask_units(self.model, here, self.ckpt.spec)
            a, k = with_hidden_arg(args, kwargs, hidden)
            with guard, masking:
                out = layer(*a, **k)
            self._returns_tuple = isinstance(out, tuple)
            store.put((sid, b), hidden_of(out))
