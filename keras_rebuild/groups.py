"""Channel dependency analysis: which channels must be removed together, and which may go.

Every channel of every tensor in the (flattened) graph is an *element*. Layer
handlers tie elements that must be removed together (a BatchNorm's channel
``c`` with its input's channel ``c``; a Concatenate's output channel
``offset + c`` with channel ``c`` of one input; a Flatten's output ``s*C + c``
with channel ``c``). The connected components of these ties are the units of
removal, found with one sparse connected-components pass.

A component can be removed exactly when it touches no model input or output
and no blocked layer, and wherever a kernel (Dense, Conv, ...) reads one of its
channels, that channel is provably zero or the kernel ignores it. Zeros are
propagated forward through the graph once.

Components written by the same set of kernel layers form a :class:`ChannelGroup`:
the "output channels of conv1, bn1 and everything that shares them", the unit
that pruning ranks.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from keras_rebuild.errors import InvalidWeightsError
from keras_rebuild.graph import Graph
from keras_rebuild.handlers import LayerHandler, get_handler

_UNKNOWN = LayerHandler()


@dataclasses.dataclass
class ChannelGroup:
    """Channels that share one index set across several layers.

    Attributes:
        name: The first layer that writes the group (used in reports and plans).
        writers: Paths of the kernel layers that write these channels.
        members: Paths of every layer whose weights are indexed by these channels.
        components: Component ids, one per channel, in the first writer's order.
        blocked: Per channel, whether it must stay whatever its weights.
        reasons: Why blocked channels stay.
    """

    name: str
    writers: Tuple[str, ...]
    members: Tuple[str, ...]
    components: np.ndarray
    blocked: np.ndarray
    reasons: Tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.components)

    @property
    def prunable(self) -> bool:
        return bool(len(self.writers)) and not bool(self.blocked.all())

    def __repr__(self):
        state = "prunable" if self.prunable else "kept: " + "; ".join(self.reasons[:2])
        return f"ChannelGroup({self.name!r}, channels={self.size}, writers={len(self.writers)}, {state})"


class Analysis:
    """The channel dependency analysis of a model.

    Args:
        model: A Keras 3 or tf_keras Functional or Sequential model (nested
            models allowed). It is only read.
        check_weights: Raise on NaN or Inf weights.
        weights: ``{layer path: [numpy arrays]}`` to analyse instead of the
            layers' own weights (e.g. masked weights); layers not listed use
            their own.

    Attributes:
        graph: The flattened :class:`~keras_rebuild.graph.Graph`.
        labels: Component id of every element (channel of a tensor).
        num_components: How many components there are.
        zero: Per element, whether that channel is provably always zero.
        groups: The :class:`ChannelGroup` list, in graph order.

    Example:
        >>> a = Analysis(model)                 # doctest: +SKIP
        >>> [g for g in a.groups if g.prunable]  # doctest: +SKIP
    """

    def __init__(self, model, check_weights: bool = True, weights: Optional[Dict[str, List[np.ndarray]]] = None):
        self.graph = graph = Graph(model)
        self.model = model
        n = graph.num_elements
        self.weights: Dict[str, List[np.ndarray]] = {}
        for path, layer in graph.iter_layers():
            self.weights[path] = weights[path] if weights and path in weights else _layer_weights(layer)
            if check_weights:
                _check_finite(path, layer, self.weights[path])
        self._edges_a: List[np.ndarray] = []
        self._edges_b: List[np.ndarray] = []
        self.blocked = np.zeros(n, bool)
        self.block_log: List[Tuple[int, str, str]] = []
        self.read_log: List[Tuple[object, int, int]] = []  # (kernel op, input position, tensor)
        self.write_log: List[Tuple[object, int]] = []  # (kernel op, output tensor)
        self.zero_required: List[int] = []  # tensors whose channels go only when zero
        self._connect()
        self._components()
        self._check_selections()
        self._forward_zero()
        self._groups()

    # ------------------------------------------------------------------ context API for handlers
    def channels(self, t: int) -> int:
        return self.graph.tensors[t].channels

    def shape(self, t: int) -> tuple:
        return self.graph.tensors[t].shape

    def elements(self, t: int) -> np.ndarray:
        info = self.graph.tensors[t]
        return np.arange(info.offset, info.offset + info.channels)

    def tie(self, a: int, b: int, index_map: Optional[np.ndarray] = None):
        """Tie channel ``index_map[j]`` of tensor ``a`` to channel ``j`` of tensor ``b``."""
        ea, eb = self.elements(a), self.elements(b)
        if index_map is None:
            if len(ea) != len(eb):
                raise ValueError(f"cannot tie tensors of {len(ea)} and {len(eb)} channels")
            index_map = np.arange(len(eb))
        self._edges_a.append(ea[index_map])
        self._edges_b.append(eb)

    def tie_slice(self, big: int, offset: int, small: int):
        """Tie channels ``offset:offset+C`` of ``big`` to the ``C`` channels of ``small``."""
        es = self.elements(small)
        eb = self.elements(big)[offset: offset + len(es)]
        self._edges_a.append(eb)
        self._edges_b.append(es)

    def block(self, t: int, reason: str, path: str = ""):
        """Keep every channel of tensor ``t`` (and all channels tied to them)."""
        self.blocked[self.elements(t)] = True
        self.block_log.append((t, reason, path))
        op = self._current_op
        if op is not None and t in op.inputs and not getattr(op.handler, "claims_outputs", False):
            op.blocked_inputs = getattr(op, "blocked_inputs", set()) | {t}
            # A layer that blocks all its inputs is opaque: claim nothing about its outputs.
            op.opaque = op.blocked_inputs >= set(op.inputs)

    def block_all(self, op, reason: str):
        """Keep every channel of every input and output of ``op``."""
        for t in op.inputs + op.outputs:
            self.block(t, reason, op.path)

    def reads(self, op, t: int):
        """Record that a kernel layer reads tensor ``t`` (checked before removal)."""
        self.read_log.append((op, op.inputs.index(t), t))

    def writes(self, op, t: int):
        """Record that a kernel layer writes tensor ``t`` (defines channel groups)."""
        self.write_log.append((op, t))

    def requires_zero(self, t: int):
        """Channels of ``t`` may go only where provably zero (a recurrent layer reads its own output)."""
        self.zero_required.append(t)

    # ------------------------------------------------------------------ passes
    def _connect(self):
        g = self.graph
        self._current_op = None
        for i, t in enumerate(g.inputs):
            self.block(t, f"model input '{g.input_names[i]}'", "")
        for i, t in enumerate(g.outputs):
            self.block(t, f"model output '{g.output_names[i]}'", "")
        for op in g.ops:
            if op.kind != "layer":
                for a, b in zip(op.inputs, op.outputs):
                    self.tie(a, b)
                continue
            handler = get_handler(op.layer) or _UNKNOWN
            op.handler = handler
            self._current_op = op
            handler.connect(self, op)
            self._current_op = None
        # A layer called several times owns one set of weights: its calls share channels.
        for path, ops in g.layer_ops.items():
            ops = [o for o in ops if o.kind == "layer"]
            if len(ops) > 1 and ops[0].layer.weights:
                for o in ops[1:]:
                    for a, b in zip(ops[0].inputs + ops[0].outputs, o.inputs + o.outputs):
                        self.tie(a, b)

    def _components(self):
        n = self.graph.num_elements
        if self._edges_a:
            a = np.concatenate(self._edges_a)
            b = np.concatenate(self._edges_b)
        else:
            a = b = np.zeros(0, np.int64)
        adj = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
        self.num_components, self.labels = connected_components(adj, directed=False)
        self.comp_blocked = np.bincount(self.labels, weights=self.blocked, minlength=self.num_components) > 0

    def _check_selections(self):
        """Keep the output channels of a layer that can drop them only through a selection after it
        (LayerNormalization), unless the selection costs fewer weights than its readers lose.

        The selection keeps the layer's ``C`` outputs and costs ``C`` weights per kept channel; each
        removed channel saves what the kernels reading it spend on it.
        """
        from keras_rebuild.handlers.base import resolve_role

        changed = False
        for op, t in self.write_log:
            if not op.handler.selects_outputs(op.layer) or self.comp_blocked[self.labels[self.elements(t)]].all():
                continue
            comps = np.unique(self.labels[self.elements(t)])
            spent, seen = 0.0, set()
            for reader, pos, rt in self.read_log:
                if (reader.path, pos) in seen:
                    continue
                n = int(np.isin(self.labels[self.elements(rt)], comps).sum())
                if not n:
                    continue
                seen.add((reader.path, pos))
                weights = self.weights.get(reader.path, [])
                roles = reader.handler.weight_roles(reader.layer)
                reads_input = [any(resolve_role(role, 1, 1)[0] == "in" for role in r.values()) for r in roles]
                per_input = sum(np.size(w) for w, r in zip(weights, reads_input) if r) / max(self.channels(rt), 1)
                spent += n * per_input
            channels = self.channels(t)
            per_channel = spent / max(channels, 1)
            if per_channel <= channels:
                self.blocked[self.elements(t)] = True
                self.block_log.append((t, (
                    f"dropping output channels of {type(op.layer).__name__} '{op.layer.name}' needs a selection "
                    f"after it ({channels} weights per kept channel) that costs more than the layers reading "
                    f"them spend ({per_channel:.0f} weights per channel)"), op.path))
                changed = True
        if changed:
            self.comp_blocked = np.bincount(self.labels, weights=self.blocked, minlength=self.num_components) > 0

    def _forward_zero(self):
        g = self.graph
        zero = np.zeros(g.num_elements, bool)
        for op in g.ops:
            in_zero = [zero[self.elements(t)] for t in op.inputs]
            if op.kind != "layer":
                for t, z in zip(op.outputs, in_zero):
                    # A shared nested model's inputs are not known zero (each call differs), so
                    # what its outputs are known to be is true for every call and may flow out.
                    zero[self.elements(t)] = z if op.kind == "link_out" or not op.multi_call else False
                continue
            if getattr(op, "opaque", False):
                continue  # outputs stay "not known to be zero"
            outs = op.handler.forward_zero(
                op.layer, self.weights.get(op.path, []), op, in_zero, [self.channels(t) for t in op.outputs]
            )
            for t, z in zip(list(op.outputs) + list(op.internal.values()), outs):
                zero[self.elements(t)] = np.broadcast_to(z, (self.channels(t),))
        for t in g.inputs:
            zero[self.elements(t)] = False
        self.zero = zero

    def _groups(self):
        g = self.graph
        paths = list(g.layers)
        order = {path: i for i, path in enumerate(paths)}
        first_elem = np.full(self.num_components, np.iinfo(np.int64).max)
        np.minimum.at(first_elem, self.labels, np.arange(len(self.labels)))
        # (component, writer) pairs, then the writer set of every written component, in graph order.
        comp_parts, writer_parts = [], []
        sort_key = dict(order)
        for op, t in self.write_log:
            comps = np.unique(self.labels[self.elements(t)])
            comp_parts.append(comps)
            writer = op.path
            for name, it in op.internal.items():
                if it == t:  # internal channels (heads) form groups of their own: "mha:heads"
                    writer = f"{op.path}:{name}"
                    if writer not in order:
                        order[writer] = len(paths)
                        paths.append(writer)
                        sort_key[writer] = order.get(op.path, 0) + 0.5
            writer_parts.append(np.full(len(comps), order.get(writer, 0), np.int64))
        by_key: Dict[Tuple[int, ...], List[int]] = {}
        if comp_parts:
            pairs = np.unique(np.stack([np.concatenate(comp_parts), np.concatenate(writer_parts)], 1), axis=0)
            comps, first, counts = np.unique(pairs[:, 0], return_index=True, return_counts=True)
            # Most components have one writer: group those per writer at once; the rest one by one.
            single = counts == 1
            for comp, start, n in zip(comps[~single], first[~single], counts[~single]):
                by_key.setdefault(tuple(pairs[start:start + n, 1].tolist()), []).append(int(comp))
            one_comp, one_writer = comps[single], pairs[first[single], 1]
            for w in np.unique(one_writer):
                by_key.setdefault((int(w),), []).extend(one_comp[one_writer == w].tolist())
            by_key = dict(sorted(by_key.items(), key=lambda item: min(item[1])))
        keys = list(by_key)
        group_of = np.full(self.num_components, -1, np.int64)
        comps_of = []
        for i, key in enumerate(keys):
            comps = np.array(sorted(by_key[key], key=lambda c: first_elem[c]), np.int64)
            group_of[comps] = i
            comps_of.append(comps)
        # Layers indexed by each group (weights sliced when it shrinks), and why channels stay.
        members = [set() for _ in keys]
        reasons = [set() for _ in keys]
        for op in g.ops:
            if op.kind != "layer" or op.call_index or not self.weights.get(op.path):
                continue
            for t in op.inputs[:1] + op.outputs[:1] + list(op.internal.values()):
                for i in np.unique(group_of[self.labels[self.elements(t)]]):
                    if i >= 0:
                        members[i].add(op.path)
        for t, reason, _ in self.block_log:
            for i in np.unique(group_of[self.labels[self.elements(t)]]):
                if i >= 0:
                    reasons[i].add(reason)
        groups = []
        for i, key in enumerate(keys):
            writers = tuple(paths[w] for w in key)
            groups.append(ChannelGroup(
                name=writers[0],
                writers=writers,
                members=tuple(sorted(members[i], key=lambda p: order.get(p, 0))),
                components=comps_of[i],
                blocked=self.comp_blocked[comps_of[i]],
                reasons=tuple(sorted(reasons[i])),
            ))
        groups.sort(key=lambda grp: sort_key.get(grp.name, 0))
        # Group names key plans and scores: make them unique when two writer sets share a first writer.
        seen: Dict[str, int] = {}
        for grp in groups:
            seen[grp.name] = seen.get(grp.name, 0) + 1
        for grp in groups:
            if seen[grp.name] > 1:
                grp.name = "+".join(grp.writers)
        self.groups = groups

    # ------------------------------------------------------------------ queries
    def removable(self) -> np.ndarray:
        """Per component: removing it leaves the model's function unchanged."""
        bad = self.blocked.copy()
        cache = {}
        for op, pos, t in self.read_log:
            if op.path not in cache:
                cache[op.path] = op.handler.ignored_inputs(op.layer, self.weights.get(op.path, []), op)
            ignored = cache[op.path][pos]
            ok = self.zero[self.elements(t)]
            if ignored is not None:
                ok = ok | ignored
            bad[self.elements(t)] |= ~ok
        for t in self.zero_required:
            bad[self.elements(t)] |= ~self.zero[self.elements(t)]
        comp_bad = np.bincount(self.labels, weights=bad, minlength=self.num_components) > 0
        return self.keep_nonempty(~comp_bad)

    def keep_nonempty(self, remove: np.ndarray) -> np.ndarray:
        """Un-remove one component of any tensor that would lose every channel."""
        remove = remove.copy()
        while True:
            changed = False
            for t in self.graph.tensors:
                comps = self.labels[t.offset: t.offset + t.channels]
                if len(comps) and remove[comps].all():
                    remove[comps[0]] = False
                    changed = True
            if not changed:
                return remove

    def kept_indices(self, remove: np.ndarray) -> Dict[int, np.ndarray]:
        """Per tensor index: the sorted channel indices that stay."""
        keep = ~remove[self.labels]
        return {t.index: np.flatnonzero(keep[t.offset: t.offset + t.channels]) for t in self.graph.tensors}

    def reasons_for(self, component: int) -> Tuple[str, ...]:
        """Why the channels of one component stay (empty when nothing blocks them)."""
        return tuple(sorted({reason for t, reason, _ in self.block_log
                             if int(component) in self.labels[self.elements(t)]}))

    def summary(self) -> str:
        """A text table of the channel groups: size, writers, prunable or why kept."""
        rows = [("group", "channels", "layers", "status")]
        for grp in self.groups:
            status = "prunable" if grp.prunable else "kept: " + "; ".join(grp.reasons[:2])
            rows.append((grp.name, str(grp.size), str(len(grp.members)), status))
        return _table(rows)


def _layer_weights(layer) -> List[np.ndarray]:
    """The numpy weights of a layer; a plain operation (Keras 3 ``x + y``) has none."""
    return layer.get_weights() if hasattr(layer, "get_weights") else []


def _check_finite(path, layer, weights):
    for w, var in zip(weights, getattr(layer, "weights", ())):
        if np.issubdtype(np.asarray(w).dtype, np.floating) and not np.isfinite(w).all():
            bad = int(np.size(w) - np.isfinite(w).sum())
            raise InvalidWeightsError(
                f"Expected finite weights in layer '{path}'. Received: {bad} NaN/Inf values in "
                f"weight '{var.name}' of shape {tuple(np.shape(w))}"
            )


def _table(rows, align=None) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = []
        for i, cell in enumerate(r):
            right = align[i] if align else i > 0 and str(cell).replace(",", "").replace(".", "").replace("%", "").lstrip("-").isdigit()
            cells.append(str(cell).rjust(widths[i]) if right else str(cell).ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
