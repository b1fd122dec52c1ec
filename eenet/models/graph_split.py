"""Real early exit on any torch.fx-traceable model: the traced graph cut into segments.

A model without an explicit stage list (a torchvision or timm network, a
user's own model with skip connections) is traced with torch.fx and cut at
named nodes. Each piece is a ``GraphModule`` that takes and returns the
*live values*: every tensor computed before the cut that a later part of the
graph still reads. A skip connection that crosses one or more cuts is
therefore carried, as one more live value, to the segment that uses it. The
dynamic engine (``eenet.inference``) runs the segments in order and, after
each exit, keeps only the remaining samples of every live value, so the
later segments run on fewer samples at any batch size.

Node names are torchvision's (``torchvision.models.feature_extraction``): a
node's qualified name, and a module's name stands for the last node inside
it (``layer2`` is the output of ResNet's second stage).

The split is this module's own pass over the graph (no copy of
``torch.fx.passes.split_module``): nodes keep the graph's execution order;
segment k holds the nodes after cut k-1 up to and including cut k; a value
that does not depend on the input (a parameter read with ``get_attr``, a
constant) is not carried but re-created in every segment that reads it.

Limits, each one line naming the node and how to proceed: a model torch.fx
cannot trace (data-dependent control flow), an unknown node (nearest names
suggested), a cut whose live values are not batch tensors (a Python number
such as the batch size, a tuple), an exit node whose output is neither a
feature map ``(B, C, H, W)`` nor a token sequence ``(B, N, D)``. In all of
them, another node or an explicit stage list (:class:`eenet.models.StagedBackbone`)
is the way on.

Exit heads are chosen from the traced shape: on a feature map an
:class:`eenet.models.ExitBlock` (``pool``/``bnpool``/``plain`` pre-block), on
tokens a :class:`TokenExit` (mean over tokens or the class token, LayerNorm,
then the classifier and confidence heads).

Traced code can differ between train and eval mode (torchvision's stochastic
depth passes ``self.training`` as a constant): both modes are traced and cut at
the same nodes, and the network runs the graph of the backbone's current mode.
The segments share the model's modules (parameters and buffers exist once,
under ``backbone.``).
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import fx, nn

from eenet.errors import EENetError
from eenet.models.early_exit import ExitOutputs, Step, check_input_shape, static_walk
from eenet.models.exits import ExitBlock, ExitHeads

TOKEN_POOLS = ("mean", "cls")
EXIT_PREBLOCKS = ("pool", "bnpool", "plain")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tracer_kwargs() -> dict:
    """torchvision's leaf modules and wrapped functions (its ops, e.g. stochastic depth), and
    timm's when timm is installed, so that their models trace as their own helpers do."""
    from torchvision.models import feature_extraction as fe

    kwargs = fe._set_default_tracer_kwargs(None)
    try:
        from timm.models import _features_fx as tfx
    except Exception:  # timm absent or changed: torchvision's defaults only
        return kwargs
    leaf = list(kwargs.get("leaf_modules", [])) + list(getattr(tfx, "_leaf_modules", ()))
    wrap = list(kwargs.get("autowrap_functions", ())) + list(getattr(tfx, "_autowrap_functions", ()))
    kwargs["leaf_modules"] = leaf
    kwargs["autowrap_functions"] = tuple(wrap)
    return kwargs


def trace(model: nn.Module, training: bool) -> tuple[fx.GraphModule, dict[fx.Node, str]]:
    """The model's graph traced in train or eval mode, and each node's qualified name."""
    from torchvision.models.feature_extraction import NodePathTracer

    was_training = model.training
    model.train(training)
    try:
        tracer = NodePathTracer(**_tracer_kwargs())
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except EENetError:
        raise
    except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
        raise EENetError(f"torch.fx cannot trace {type(model).__name__} ({_first_line(exc)}); "
                         "make the model traceable (no control flow on tensor values) or give it "
                         "an explicit stage list (a StagedBackbone)") from exc
    finally:
        model.train(was_training)
    names = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    for node, qual in tracer.node_to_qualname.items():
        if node.name in by_name:
            names[by_name[node.name]] = qual
    return gm, names


def _resolve(query: str, order: Sequence[fx.Node], names: dict[fx.Node, str], model: str) -> int:
    """Position of the node ``query`` names: itself, or the last node inside a module of that name."""
    hits = [i for i, n in enumerate(order) if n in names
            and (names[n] == query or names[n].startswith(query + "."))]
    if not hits:
        known = [names[n] for n in order if n in names]
        known += sorted({".".join(k.split(".")[:i]) for k in known for i in range(1, k.count(".") + 1)})
        close = difflib.get_close_matches(query, known, n=5, cutoff=0.5)
        hint = f"; nearest names: {', '.join(close)}" if close else ""
        raise EENetError(f"node '{query}' is not in the traced graph of {model}{hint}; list the "
                         "nodes with torchvision.models.feature_extraction.get_graph_node_names(model)")
    return hits[-1]


@dataclass
class _Split:
    """One traced graph cut into segments (one mode: train or eval)."""

    segments: list[fx.GraphModule]
    #: for each cut, the position of the exit node's value in the segment's outputs
    exit_pos: list[int]
    #: for each cut, the names of the live values the segment returns
    live: list[list[str]]


def _split(gm: fx.GraphModule, names: dict[fx.Node, str], at: Sequence[str], model: str) -> _Split:
    order = list(gm.graph.nodes)
    inputs = [n for n in order if n.op == "placeholder"]
    if len(inputs) != 1:
        raise EENetError(f"{model}.forward takes {len(inputs)} inputs; a split model takes one "
                         "input tensor (wrap it in a module with one input)")
    pos = {n: i for i, n in enumerate(order)}
    cuts = [_resolve(q, order, names, model) for q in at]
    if len(set(cuts)) != len(cuts) or sorted(cuts) != cuts:
        raise EENetError(f"exit nodes must be distinct and in execution order, got {list(at)}")
    depends = set(inputs)  # nodes computed from the input: per-sample values
    for n in order:
        if any(a in depends for a in n.all_input_nodes):
            depends.add(n)
    out_node = order[-1]
    for q, c in zip(at, cuts):
        if order[c] not in depends:
            raise EENetError(f"node '{q}' does not depend on the input; choose a node on the "
                             "path from the input to the output")
        if c >= pos[out_node.all_input_nodes[0]] if out_node.all_input_nodes else c >= len(order) - 1:
            raise EENetError(f"node '{q}' is the model's output or after it; early exits read "
                             "nodes before the output")
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in order}
    bounds = [*cuts, len(order) - 1]
    segments, exit_pos, live_names = [], [], []
    carried: list[fx.Node] = inputs
    start = 0
    for k, end in enumerate(bounds):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in carried:
            env[n] = g.placeholder(n.name)

        def lookup(a: fx.Node, env=env, g=g) -> fx.Node:
            if a not in env:  # a value that does not depend on the input: re-created here
                if a in depends:
                    raise AssertionError(f"internal: {a.name} read before it is carried")
                env[a] = g.node_copy(a, lookup)
            return env[a]

        for n in order[start:end + 1]:
            if n.op == "placeholder" or n not in depends and n.op != "output":
                continue
            if n.op == "output":
                g.output(fx.node.map_arg(n.args[0], lookup))
            else:
                env[n] = g.node_copy(n, lookup)
        if k < len(cuts):
            live = [n for n in order[:end + 1] if n in depends and last_use[n] > end]
            outs = sorted({*live, order[end]}, key=pos.__getitem__)
            g.output(tuple(env[n] for n in outs))
            exit_pos.append(outs.index(order[end]))
            live_names.append([names.get(n, n.name) for n in outs])
            carried = outs
        g.lint()
        segments.append(fx.GraphModule(gm, g, f"{model}Segment{k}"))
        start = end + 1
    return _Split(segments, exit_pos, live_names)


def block_outputs(model: nn.Module, input_size: Sequence[int]) -> list[str]:
    """Candidate exit nodes: the outputs of the model's blocks, in execution order.

    A block is a module with submodules (a residual block, a transformer layer, a
    ``Sequential``) whose last node is a cut with exactly one live value (nothing
    else crosses it: no skip connection is carried) and gives a feature map or a
    token sequence; nodes shared by nested blocks are named by the outermost.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    gm, names = trace(model, False)
    order = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(order)}
    out_inputs = order[-1].all_input_nodes
    end = pos[out_inputs[0]] if out_inputs else len(order) - 1
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(2, *input_size))
    except Exception as exc:
        raise EENetError(f"{type(model).__name__} does not run on an input of shape "
                         f"{(2, *input_size)} ({_first_line(exc)}); check input_size") from exc
    finally:
        model.train(was_training)
    depends = {n for n in order if n.op == "placeholder"}
    for n in order:
        if any(a in depends for a in n.all_input_nodes):
            depends.add(n)
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in order}
    # how many per-sample values cross the cut after position i
    starts = [0] * (len(order) + 1)
    for n in depends:
        if last_use[n] > pos[n]:
            starts[pos[n]] += 1
            starts[last_use[n]] -= 1
    crossing, acc = [], 0
    for i in range(len(order)):
        acc += starts[i]
        crossing.append(acc)
    found: dict[int, str] = {}
    for qual, module in model.named_modules():
        if not qual or not any(True for _ in module.children()):
            continue
        hits = [i for i, n in enumerate(order) if n in names
                and (names[n] == qual or names[n].startswith(qual + "."))]
        if not hits or hits[-1] in found or hits[-1] >= end:
            continue
        i = hits[-1]
        meta = order[i].meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if order[i] in depends and crossing[i] == 1 and shape is not None \
                and len(shape) in (3, 4) and shape[0] == 2:
            found[i] = qual
    return [found[i] for i in sorted(found)]


def _run_split(split: _Split, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Every segment's outputs for input ``x`` (the last one as a 1-tuple)."""
    live: tuple = (x,)
    outs = []
    for seg in split.segments:
        y = seg(*live)
        live = y if isinstance(y, tuple) else (y,)
        outs.append(live)
    return outs


class TokenExit(ExitHeads):
    """An exit on a token sequence (B, N, D): pool the tokens, LayerNorm, then the two heads.

    ``pool``: ``mean`` over the tokens or ``cls``, the first (class) token, as a
    vision transformer's own classifier reads it (Dosovitskiy et al., ICLR 2021).
    The LayerNorm mirrors the transformer's final norm before its head.
    """

    def __init__(self, dim: int, num_classes: int, pool: str = "mean",
                 confidence_input: str = "features"):
        super().__init__()
        if pool not in TOKEN_POOLS:
            raise EENetError(f"unknown token pool '{pool}'; accepted: {', '.join(TOKEN_POOLS)}")
        self.pool = pool
        self.pre = nn.Sequential(_TokenPool(pool), nn.LayerNorm(dim))
        self._build_heads(dim, num_classes, confidence_input)
        self.preblock = f"tokens_{pool}"


class _TokenPool(nn.Module):
    def __init__(self, pool: str):
        super().__init__()
        self.mode = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.mode == "cls" else x.mean(1)


def exit_for_shape(node: str, shape: Sequence[int], num_classes: int,
                   exit: str | Callable[..., nn.Module] = "pool", tokens: str = "mean") -> nn.Module:
    """An exit head for a node whose per-sample output has ``shape``: (C, H, W) or (N, D).

    ``exit`` is a pre-block name (``pool``, ``bnpool``, ``plain``) or a factory called as
    ``exit(in_channels=C, num_classes=K, in_size=(H, W))`` for feature maps; token
    sequences get a :class:`TokenExit` (``tokens``: ``mean`` or ``cls``), with the factory's
    ``confidence_input`` when it is a partial that sets one.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        c, h, w = shape
        if callable(exit):
            return exit(in_channels=c, num_classes=num_classes, in_size=(h, w))
        if exit not in EXIT_PREBLOCKS:
            raise EENetError(f"unknown exit '{exit}'; accepted: {', '.join(EXIT_PREBLOCKS)} or a "
                             "factory exit(in_channels=, num_classes=, in_size=)")
        return ExitBlock(c, num_classes, (h, w), preblock=exit)
    if len(shape) == 2:
        conf = "features"
        if isinstance(exit, functools.partial):
            conf = exit.keywords.get("confidence_input", conf)
        return TokenExit(shape[1], num_classes, pool=tokens, confidence_input=conf)
    raise EENetError(f"node '{node}' gives shape (batch, {', '.join(map(str, shape))}): an exit "
                     "reads a feature map (batch, C, H, W) or a token sequence (batch, N, D); "
                     "choose another node")


class GraphSplitNetwork(nn.Module):
    """Any traceable model cut at named nodes, with one exit per cut (see module doc).

    The static path (:meth:`forward`) returns every early exit's outputs and the
    model's own output as the final exit (confidence +inf, h_N = 1), equal to
    the unsplit model's output; :meth:`walk` gives the dynamic engine, the
    latency and the cost tables the same segments.

    Args:
        model: the model; one input tensor, one ``(B, K)`` output. Its modules are
            shared (registered here as ``backbone``), not copied.
        at: the nodes the exits read (graph nodes or module names), in execution order.
        input_size: one input's shape ``(C, H, W)``, for the shape probe and input checks.
        exit: ``pool``, ``bnpool``, ``plain`` or an exit factory (see :func:`exit_for_shape`).
        exits: built exit modules instead of ``exit`` (one per node).
        num_classes: checked against the model's output width when given.
        tokens: ``mean`` or ``cls``: how a token exit pools (see :class:`TokenExit`).
        fixed_size: whether only ``input_size`` is accepted (default: true, since a
            traced graph may hold shapes as constants).
    """

    carry_exit = None

    def __init__(self, model: nn.Module, at: Sequence[str], input_size: Sequence[int],
                 exit: str | Callable[..., nn.Module] = "pool",
                 exits: Sequence[nn.Module] | None = None, num_classes: int | None = None,
                 tokens: str = "mean", fixed_size: bool = True):
        super().__init__()
        at = [str(a) for a in at]
        name = type(model).__name__
        self.backbone = model
        self.exit_nodes = at
        self.input_size = tuple(int(v) for v in input_size)
        self.fixed_size = bool(fixed_size)
        was_training = model.training
        eval_gm, eval_names = trace(model, False)
        train_gm, train_names = trace(model, True)
        eval_split = _split(eval_gm, eval_names, at, name)
        same = train_gm.code == eval_gm.code
        train_split = eval_split if same else _split(train_gm, train_names, at, name)
        # plain lists: the segments share the model's modules, which are registered once
        self._splits = {False: eval_split, True: train_split}
        model.train(was_training)

        x = torch.randn(3, *self.input_size, generator=torch.Generator().manual_seed(0))
        param = next(model.parameters(), None)
        if param is not None:
            x = x.to(param.device, param.dtype)
        model.eval()
        try:
            with torch.no_grad():
                expected = model(x)
                outs = _run_split(eval_split, x)
        except EENetError:
            raise
        except Exception as exc:
            raise EENetError(f"{name} does not run on an input of shape {tuple(x.shape)} "
                             f"({_first_line(exc)}); check input_size") from exc
        finally:
            model.train(was_training)
        for k, (live, names) in enumerate(zip(outs[:-1], eval_split.live)):
            for v, vname in zip(live, names):
                if not isinstance(v, torch.Tensor):
                    raise EENetError(f"cut at '{at[k]}': value '{vname}' is read after the cut but "
                                     f"is a {type(v).__name__}, not a tensor, so it cannot follow "
                                     "the samples that go on; cut at another node or use a "
                                     "StagedBackbone")
                if v.dim() == 0 or v.shape[0] != x.shape[0]:
                    raise EENetError(f"cut at '{at[k]}': value '{vname}' is read after the cut but "
                                     f"its shape {tuple(v.shape)} has no batch axis first, so it "
                                     "cannot follow the samples that go on; cut at another node "
                                     "or use a StagedBackbone")
        if not (isinstance(expected, torch.Tensor) and expected.dim() == 2):
            shape = tuple(expected.shape) if isinstance(expected, torch.Tensor) else ""
            raise EENetError(f"{name} must return one (batch, classes) tensor, got "
                             f"{type(expected).__name__}{shape}")
        self.num_classes = int(expected.shape[1])
        if num_classes is not None and int(num_classes) != self.num_classes:
            raise EENetError(f"num_classes={num_classes} but {name} returns {self.num_classes} "
                             "logits; give the model a classifier with that many outputs")
        self.shapes = [tuple(outs[k][p].shape[1:]) for k, p in enumerate(eval_split.exit_pos)]
        if exits is None:
            exits = [exit_for_shape(a, s, self.num_classes, exit, tokens)
                     for a, s in zip(at, self.shapes)]
        elif len(exits) != len(at):
            raise EENetError(f"one exit per node: {len(exits)} exits for {len(at)} nodes")
        self.exits = nn.ModuleList(exits)
        self.exits.train(was_training)
        #: where each exit sits, for cost tables and for rebuilding (segment index by
        #: default; eenet.build sets the index among block_outputs when it placed them)
        self.exit_stages = list(range(len(at)))
        self._steps_cache: dict[bool, list[Step]] = {}

    @property
    def num_exits(self) -> int:
        """All exits, the final one included (N+1)."""
        return len(self.exits) + 1

    def exit_names(self) -> list[str]:
        return [f"exit{i}" for i in range(self.num_exits)]

    def exit_stage_indices(self) -> list[int]:
        """:attr:`exit_stages` and, for the final exit, one past the last of them."""
        return [*self.exit_stages, (self.exit_stages[-1] + 1) if self.exit_stages else 0]

    def live_values(self) -> list[list[str]]:
        """For each cut, the names of the values carried past it (the exit node's included)."""
        return [list(v) for v in self._splits[False].live]

    def segment_modules(self) -> list[fx.GraphModule]:
        """The segments of the backbone's current mode, in order (the last ends at the output)."""
        return list(self._splits[self.backbone.training].segments)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise an error naming the expected shape when ``x`` does not fit."""
        check_input_shape(x, self.input_size, self.fixed_size)

    def walk(self) -> list[Step]:
        """One :class:`Step` per exit: segment k's graph, then exit k's head (the final exit
        returns the model's output with confidence +inf)."""
        mode = bool(self.backbone.training)
        if mode not in self._steps_cache:
            split = self._splits[mode]
            steps = []
            for k, seg in enumerate(split.segments):
                if k < len(split.exit_pos):
                    steps.append(Step(_body(seg), _early_head(self.exits[k], split.exit_pos[k]),
                                      True))
                else:
                    steps.append(Step(_last_body(seg), _final_head, False))
            self._steps_cache[mode] = steps
        return self._steps_cache[mode]

    def forward(self, x: torch.Tensor) -> ExitOutputs:
        """Static path: every segment and every exit; returns all exits' outputs."""
        self.check_input(x)
        return static_walk(self.walk(), x)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_steps_cache"] = {}
        return state


def _body(seg: fx.GraphModule):
    def body(live: tuple) -> tuple:
        return seg(*live)
    return body


def _last_body(seg: fx.GraphModule):
    def body(live: tuple) -> tuple:
        return (seg(*live),)
    return body


def _early_head(exit_block: nn.Module, p: int):
    def head(live: tuple):
        f = live[p]
        if torch.is_grad_enabled():
            f = f.clone()  # a later in-place operation of the model must not change what it read
        logits, z = exit_block(f)
        return logits, z, live
    return head


def _final_head(live: tuple):
    out = live[0]
    return out, torch.full(out.shape[:1], math.inf, dtype=out.dtype, device=out.device), live
