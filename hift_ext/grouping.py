"""Cut a model into ordered layer units and HiFT groups.

A *unit* is one layer of the model in the HiFT sense, ordered bottom (input
side) to top (output side): the embeddings, each transformer block, the final
norm, the head. A *group* is a run of ``group_size`` consecutive units (or,
with a list such as ``[24, 8]``, of those sizes, bottom to top); HiFT updates
one group per optimizer step.

How units are found (no per-architecture configuration):

1. **Block lists.** Every ``nn.ModuleList`` holding parameters (children may
   differ in class: hybrid models), or ``nn.Sequential`` of >= 2 children of one
   class that all hold parameters, is a candidate; candidates nested inside another candidate are ignored (so MoE
   expert lists inside blocks do not count). The candidate with the most
   parameters is the block list; further candidates with at least 10% of its
   parameters are kept too (encoder-decoder models: T5/BART have two lists).
2. **Walk.** The module tree is walked in registration order. A block list
   yields one unit per block. A module that contains a block list is walked
   into; any other module is an atomic *piece*. At the direct parent of a block
   list, a sibling registered before the list but named like an output-side
   module (``final*``, ``ln_f``, ``norm_f``, ``project_out``) is moved after
   the list (OPT registers ``final_layer_norm`` before ``layers``), and a
   sibling registered after the list but named/typed like an embedding
   (``embed*``/``wte``/``wpe`` without ``out``/``head``, or ``nn.Embedding``) is
   moved before it (BART's ``layernorm_embedding``). Parameters held directly by
   a module that contains a block list count as a piece before its children.
3. **Pieces -> units.** All pieces before the first block list form ONE unit
   (the embeddings: word + position + token-type (+ embedding norm)). Pieces
   after the last block list: each norm is its own unit; consecutive non-norm
   pieces form one unit (the head, e.g. BERT's pooler + classifier). Between two
   block lists (encoder-decoder) the pieces up to the first embedding-like one
   are handled like the top pieces (encoder final norm), the rest form the next
   stack's embedding unit.
4. **Fallback.** A model without a block list: one unit per module that holds
   parameters directly, in registration order (the ordered leaf modules).

Tied or shared parameters (embedding = lm_head) are assigned to the FIRST unit
that holds them (deduplicated by identity); units left without trainable
parameters are dropped. Only parameters with ``requires_grad=True`` at the time
of the call are grouped, and every one of them is in exactly one unit.

Models whose forward order differs from this can always pass explicit groups
(:func:`groups_from_params`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "Unit",
    "Group",
    "model_units",
    "group_model",
    "group_bounds",
    "normalize_group_size",
    "format_group_size",
    "proportional_split",
    "groups_from_params",
    "describe_groups",
    "compact_names",
]


# --------------------------------------------------------------------------- data


@dataclass
class Unit:
    """One layer unit: a name (module path, or ``a+b`` for merged modules) and its params."""

    name: str
    param_names: List[str] = field(default_factory=list)
    params: List[nn.Parameter] = field(default_factory=list, repr=False)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


@dataclass
class Group:
    """A HiFT group: consecutive units (bottom to top) and their parameters."""

    index: int
    unit_names: List[str] = field(default_factory=list)
    param_names: List[str] = field(default_factory=list)
    params: List[nn.Parameter] = field(default_factory=list, repr=False)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


# --------------------------------------------------------------------------- helpers

_FINAL_RE = re.compile(r"final|^ln_f$|^norm_f$|^(project|proj)_out$", re.IGNORECASE)
_EMBED_RE = re.compile(r"embed|^wte$|^wpe$", re.IGNORECASE)
_OUT_RE = re.compile(r"out|head", re.IGNORECASE)
_SECONDARY_LIST_FRACTION = 0.1


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _children(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, c) for n, c in module._modules.items() if c is not None]


def _is_block_list(module: nn.Module) -> bool:
    """A ModuleList with a child holding parameters (children may differ in class:
    hybrid models mix layer types), or an nn.Sequential of >= 2 children of one class
    that all hold parameters (a pipeline like Linear-ReLU-Linear is not a block list)."""
    kids = [c for _, c in _children(module)]
    if isinstance(module, nn.ModuleList):
        return any(_numel(c) > 0 for c in kids)
    if type(module) is nn.Sequential:
        return (
            len(kids) >= 2
            and len({type(c) for c in kids}) == 1
            and all(_numel(c) > 0 for c in kids)
        )
    return False


def _find_block_lists(model: nn.Module) -> List[str]:
    """Names of the chosen block lists (outermost candidates, large enough)."""
    found: List[Tuple[str, nn.Module]] = []

    def rec(mod: nn.Module, prefix: str) -> None:
        if _is_block_list(mod):
            found.append((prefix, mod))
            return  # nested candidates are ignored
        for n, c in _children(mod):
            rec(c, _join(prefix, n))

    rec(model, "")
    if not found:
        return []
    sizes = {name: _numel(mod) for name, mod in found}
    largest = max(sizes.values())
    return [name for name, _ in found if sizes[name] >= _SECONDARY_LIST_FRACTION * largest]


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _is_embedding_like(name: str, module: nn.Module) -> bool:
    last = name.rsplit(".", 1)[-1]
    if isinstance(module, nn.Embedding) or isinstance(module, nn.EmbeddingBag):
        return True
    if any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in module.modules()):
        return not _OUT_RE.search(last)
    return bool(_EMBED_RE.search(last)) and not _OUT_RE.search(last)


# A walk item: ("piece", name, module, direct_only) or ("block", name, module, False).
_Item = Tuple[str, str, nn.Module, bool]


def _walk(model: nn.Module, lists: Sequence[str]) -> List[_Item]:
    list_set = set(lists)
    ancestors = set()
    for name in lists:
        parts = name.split(".") if name else []
        for i in range(len(parts)):
            ancestors.add(".".join(parts[:i]))

    items: List[_Item] = []

    def rec(mod: nn.Module, prefix: str) -> None:
        if prefix in list_set:
            if mod._parameters:
                items.append(("piece", prefix, mod, True))
            for n, c in _children(mod):
                items.append(("block", _join(prefix, n), c, False))
            return
        if prefix not in ancestors:
            items.append(("piece", prefix, mod, False))
            return
        if mod._parameters:
            items.append(("piece", prefix, mod, True))
        kids = _children(mod)
        list_pos = [i for i, (n, _) in enumerate(kids) if _join(prefix, n) in list_set]
        if list_pos:
            # Reorder siblings of a block list that are registered on the wrong side of it.
            first, last = list_pos[0], list_pos[-1]
            before = [kc for kc in kids[:first]]
            middle = kids[first:last + 1]
            after = [kc for kc in kids[last + 1:]]
            moved_up = [kc for kc in before if _FINAL_RE.search(kc[0]) and _numel(kc[1]) > 0]
            moved_down = [
                kc for kc in after if _is_embedding_like(kc[0], kc[1]) and _numel(kc[1]) > 0
            ]
            before = [kc for kc in before if not any(kc is m for m in moved_up)]
            after = [kc for kc in after if not any(kc is m for m in moved_down)]
            kids = before + moved_down + middle + moved_up + after
        for n, c in kids:
            rec(c, _join(prefix, n))

    rec(model, "")
    return items


def _item_params(item: _Item) -> Iterable[Tuple[str, nn.Parameter]]:
    _, name, mod, direct_only = item
    if direct_only:
        for n, p in mod._parameters.items():
            if p is not None:
                yield _join(name, n), p
    else:
        for n, p in mod.named_parameters(remove_duplicate=False):
            yield _join(name, n), p


def _pieces_to_unit_specs(pieces: List[_Item], where: str) -> List[List[_Item]]:
    """Split a run of pieces (between block lists) into units (lists of pieces)."""
    if not pieces:
        return []
    if where == "bottom":
        return [pieces]
    if where == "middle":
        split = next(
            (i for i, it in enumerate(pieces) if _is_embedding_like(it[1], it[2])), len(pieces)
        )
        return _pieces_to_unit_specs(pieces[:split], "top") + (
            [pieces[split:]] if split < len(pieces) else []
        )
    # top: each norm its own unit, consecutive non-norm pieces merged (the head)
    specs: List[List[_Item]] = []
    run: List[_Item] = []
    for it in pieces:
        if not it[3] and _is_norm(it[2]):
            if run:
                specs.append(run)
                run = []
            specs.append([it])
        else:
            run.append(it)
    if run:
        specs.append(run)
    return specs


def _fallback_specs(model: nn.Module) -> List[List[_Item]]:
    return [
        [("piece", name, mod, True)]
        for name, mod in model.named_modules()
        if any(p is not None for p in mod._parameters.values())
    ]


def _unit_specs(model: nn.Module) -> List[List[_Item]]:
    lists = _find_block_lists(model)
    if not lists:
        return _fallback_specs(model)
    items = _walk(model, lists)
    specs: List[List[_Item]] = []
    pieces: List[_Item] = []
    seen_block = False
    for it in items:
        if it[0] == "block":
            specs.extend(_pieces_to_unit_specs(pieces, "middle" if seen_block else "bottom"))
            pieces = []
            seen_block = True
            specs.append([it])
        else:
            pieces.append(it)
    specs.extend(_pieces_to_unit_specs(pieces, "top"))
    return specs


def _spec_name(spec: List[_Item]) -> str:
    return "+".join(it[1] if it[1] else "(root)" for it in spec)


def _trainable_params(model: nn.Module) -> Dict[int, Tuple[str, nn.Parameter]]:
    out: Dict[int, Tuple[str, nn.Parameter]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in out:
            out[id(p)] = (n, p)
    return out


# --------------------------------------------------------------------------- public API


def model_units(model: nn.Module) -> List[Unit]:
    """The model's ordered layer units, bottom (input side) to top (output side).

    Only parameters with ``requires_grad=True`` are included; each appears in exactly
    one unit (tied parameters in the first unit holding them); units without trainable
    parameters are omitted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_units expects an nn.Module, got {type(model).__name__}")
    seen: set = set()
    units: List[Unit] = []
    for spec in _unit_specs(model):
        unit = Unit("")
        contributing: List[_Item] = []  # name the unit after the pieces that hold its params
        for item in spec:
            n_before = len(unit.params)
            for pname, p in _item_params(item):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if p.requires_grad:
                    unit.param_names.append(pname)
                    unit.params.append(p)
            if len(unit.params) > n_before:
                contributing.append(item)
        if unit.params:
            unit.name = _spec_name(contributing)
            units.append(unit)

    # Invariant: every trainable parameter of the model is in exactly one unit.
    trainable = _trainable_params(model)
    assigned = [id(p) for u in units for p in u.params]
    if len(assigned) != len(set(assigned)) or set(assigned) != set(trainable):
        missing = [n for i, (n, _) in trainable.items() if i not in set(assigned)]
        raise AssertionError(
            "hift_ext.grouping: internal error, units do not cover every trainable parameter "
            f"exactly once (missing: {missing[:5]}); please report this model and pass explicit groups"
        )
    return units


GroupSize = Union[int, Sequence[int]]


def normalize_group_size(group_size: Any, owner: str = "group_size") -> Union[int, Tuple[int, ...]]:
    """``group_size`` as an int (units per group; the last group takes the rest) or a tuple of ints
    (units per group, bottom to top: an unequal split such as ``(24, 8)``). TypeError / ValueError
    that say what is accepted; the count of units is checked by :func:`group_model`."""
    if isinstance(group_size, (list, tuple)):
        sizes = tuple(group_size)
        if not sizes or any(isinstance(n, bool) or not isinstance(n, int) for n in sizes):
            raise TypeError(f"{owner} as a list must hold ints (layer units per group, bottom to top), "
                            f"got {group_size!r}")
        if min(sizes) < 1:
            raise ValueError(f"{owner}: every group needs at least 1 layer unit, got {list(sizes)}")
        return sizes
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{owner} must be an int (layer units per group) or a list of ints (units per "
                        f"group, bottom to top), got {group_size!r}")
    if group_size < 1:
        raise ValueError(f"{owner} must be >= 1 (layer units per group), got {group_size}")
    return group_size


def group_bounds(group_size: GroupSize, num_units: int) -> List[Tuple[int, int]]:
    """``[start, stop)`` unit ranges of the groups, bottom to top. An int must be at most
    ``num_units``; a list must add up to exactly ``num_units``."""
    if isinstance(group_size, int) and not isinstance(group_size, bool) and not 1 <= group_size <= num_units:
        raise ValueError(
            f"group_size must be between 1 and {num_units} (the model has {num_units} "
            f"layer units), got {group_size}"
        )
    gs = normalize_group_size(group_size)
    if isinstance(gs, int):
        return [(s, min(s + gs, num_units)) for s in range(0, num_units, gs)]
    if sum(gs) != num_units:
        raise ValueError(
            f"group_size {list(gs)} covers {sum(gs)} layer units but the model has {num_units}: the sizes "
            f"(bottom to top) must add up to {num_units} (`hift-ext groups` lists the units)"
        )
    bounds, start = [], 0
    for n in gs:
        bounds.append((start, start + n))
        start += n
    return bounds


def proportional_split(shares: Sequence[int], num_units: int) -> Tuple[int, ...]:
    """An unequal split tuned on one model (``shares``, units per group bottom to top) carried to a
    model of ``num_units`` units in the same proportions: each group at least 1 unit, the sizes
    adding up to ``num_units`` (largest remainders get the leftover units, lower groups first on a
    tie). ``shares`` itself when it already adds up; one group per unit when the model has fewer
    units than ``shares`` has groups."""
    shares = normalize_group_size(tuple(shares), "shares")
    if num_units < 1:
        raise ValueError(f"proportional_split: the model has no layer units ({num_units})")
    if sum(shares) == num_units:
        return shares
    if num_units <= len(shares):
        return (1,) * num_units
    spare = num_units - len(shares)  # every group keeps 1 unit; the rest is shared out
    exact = [(n - 1) * spare / (sum(shares) - len(shares)) if sum(shares) > len(shares) else spare / len(shares)
             for n in shares]
    sizes = [1 + int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for i in by_remainder[:num_units - sum(sizes)]:
        sizes[i] += 1
    return tuple(sizes)


def group_model(model: nn.Module, group_size: GroupSize = 1) -> List[Group]:
    """Groups of consecutive units of :func:`model_units`, bottom to top.

    ``group_size`` an int: runs of that many units, the last group holding the remaining units
    when it does not divide the number of units. A list of ints: the units of each group, bottom
    to top (they must add up to the number of units): an unequal split, e.g. a large bottom group
    and a small top one, whose steps cost less on average (a step's backward runs from the loss
    down to its group's lowest layer, whatever the group's size).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"group_model expects an nn.Module, got {type(model).__name__}")
    trainable = _trainable_params(model)
    if not trainable:
        raise ValueError(
            "the model has no trainable parameters (every parameter has requires_grad=False); "
            "unfreeze the parameters to fine-tune (e.g. model.requires_grad_(True))"
        )
    bad = [f"{n} ({p.dtype})" for n, p in trainable.values() if not p.is_floating_point()]
    if bad:
        raise TypeError(
            "HiFT only trains floating-point parameters; these trainable parameters are not: "
            + ", ".join(bad)
            + ". Freeze them (requires_grad_(False)) or pass explicit groups"
        )
    units = model_units(model)
    groups: List[Group] = []
    for start, stop in group_bounds(group_size, len(units)):
        chunk = units[start:stop]
        groups.append(
            Group(
                index=len(groups),
                unit_names=[u.name for u in chunk],
                param_names=[n for u in chunk for n in u.param_names],
                params=[p for u in chunk for p in u.params],
            )
        )
    return groups


def groups_from_params(list_of_param_lists, model: Optional[nn.Module] = None) -> List[Group]:
    """Validate explicit groups (a list of lists of parameters, bottom to top).

    Errors: a non-list argument or a group that is not a list of parameters, an empty
    group, a non-Parameter, a frozen (``requires_grad=False``) or non-floating parameter,
    a parameter listed twice. When ``model`` is given, every trainable parameter of the
    model must be in some group and every listed parameter must belong to the model.
    """
    if isinstance(list_of_param_lists, torch.Tensor) or not isinstance(
        list_of_param_lists, (list, tuple)
    ):
        raise TypeError(
            "explicit groups must be a list of groups, each a list of parameters "
            f"([[p1, p2], [p3]]), got {type(list_of_param_lists).__name__}"
        )
    if len(list_of_param_lists) == 0:
        raise ValueError("explicit groups: the list of groups is empty")
    names: Dict[int, str] = {}
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), n)

    def describe(gi: int, pi: int, p) -> str:
        shape = tuple(p.shape) if isinstance(p, torch.Tensor) else None
        label = f"group {gi}, position {pi}"
        if isinstance(p, torch.Tensor) and id(p) in names:
            label += f" ({names[id(p)]})"
        return f"{label}, shape {shape}" if shape is not None else label

    where: Dict[int, Tuple[int, int]] = {}
    groups: List[Group] = []
    for gi, plist in enumerate(list_of_param_lists):
        if isinstance(plist, torch.Tensor):
            raise TypeError(
                f"explicit groups: item {gi} is a single tensor, not a group; pass a list of "
                "groups, each a list of parameters ([[p1, p2], [p3]])"
            )
        if isinstance(plist, dict):
            raise TypeError(
                f"explicit groups: group {gi} is a dict; pass a list of parameters per group"
            )
        try:
            plist = list(plist)
        except TypeError:
            raise TypeError(
                f"explicit groups: group {gi} is a {type(plist).__name__}, not a list of parameters"
            ) from None
        if not plist:
            raise ValueError(f"explicit groups: group {gi} is empty; every group needs parameters")
        group = Group(index=gi, unit_names=[f"group{gi}"])
        for pi, p in enumerate(plist):
            if not isinstance(p, nn.Parameter):
                raise TypeError(
                    f"explicit groups: {describe(gi, pi, p)} is a {type(p).__name__}, not an "
                    "nn.Parameter"
                )
            if id(p) in where:
                g0, p0 = where[id(p)]
                raise ValueError(
                    f"explicit groups: the parameter at {describe(gi, pi, p)} is also listed at "
                    f"group {g0}, position {p0}; each parameter must be in exactly one group"
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"explicit groups: parameter at {describe(gi, pi, p)} has dtype {p.dtype}; "
                    "only floating-point parameters can be trained"
                )
            if not p.requires_grad:
                raise ValueError(
                    f"explicit groups: parameter at {describe(gi, pi, p)} is frozen "
                    "(requires_grad=False); remove it from the groups or unfreeze it"
                )
            where[id(p)] = (gi, pi)
            group.params.append(p)
            group.param_names.append(names.get(id(p), f"group{gi}.{pi}"))
        groups.append(group)

    if model is not None:
        trainable = _trainable_params(model)
        missing = [n for i, (n, _) in trainable.items() if i not in where]
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ValueError(
                "explicit groups: these trainable parameters of the model are in no group: "
                + ", ".join(missing[:10])
                + more
                + "; add them to a group or freeze them (requires_grad_(False))"
            )
        foreign = [(gi, pi) for i, (gi, pi) in where.items() if i not in names]
        if foreign:
            gi, pi = foreign[0]
            p = list_of_param_lists[gi][pi] if isinstance(list_of_param_lists[gi], (list, tuple)) else None
            shape = tuple(p.shape) if p is not None else "?"
            raise ValueError(
                f"explicit groups: the parameter at group {gi}, position {pi}, shape {shape} "
                f"does not belong to the model ({len(foreign)} such parameter(s))"
            )
    return groups


_INDEXED = re.compile(r"^(.*)\.(\d+)$")


def compact_names(names: Sequence[str]) -> str:
    """``["model.layers.0", "model.layers.1", "model.norm"]`` -> ``"model.layers.0-1, model.norm"``."""
    out: List[str] = []
    run_prefix: Optional[str] = None
    run_start = run_end = -1

    def flush() -> None:
        if run_prefix is not None:
            rng = f"{run_start}" if run_start == run_end else f"{run_start}-{run_end}"
            out.append(f"{run_prefix}.{rng}")

    for name in names:
        m = _INDEXED.match(name)
        if m and m.group(1) == run_prefix and int(m.group(2)) == run_end + 1:
            run_end += 1
            continue
        flush()
        run_prefix = None
        if m:
            run_prefix, run_start = m.group(1), int(m.group(2))
            run_end = run_start
        else:
            out.append(name)
    flush()
    return ", ".join(out)


def format_group_size(group_size: GroupSize, sep: str = ",") -> str:
    """``4``, or ``24,8`` for an unequal split (as ``--group-size`` takes it; ``sep="+"``: ``24+8``)."""
    if isinstance(group_size, (list, tuple)):
        return sep.join(str(n) for n in group_size)
    return str(group_size)


def describe_groups(model: nn.Module, group_size: GroupSize = 1, file=None) -> str:
    """Print (to ``file``, default stdout) and return a table of the model's HiFT groups:
    group index, modules, parameter count and share of the grouped parameters."""
    groups = group_model(model, group_size)
    total = sum(g.numel for g in groups)
    rows = [
        (str(g.index), compact_names(g.unit_names), f"{g.numel:,}", f"{100.0 * g.numel / total:.1f}%")
        for g in groups
    ]
    header = ("group", "modules", "params", "share")
    footer = ("total", f"{len(groups)} groups, group_size={format_group_size(group_size)}", f"{total:,}", "100.0%")
    widths = [max(len(r[i]) for r in rows + [header, footer]) for i in range(4)]

    def fmt(r) -> str:
        return "  ".join(
            r[i].rjust(widths[i]) if i in (0, 2, 3) else r[i].ljust(widths[i]) for i in range(4)
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    text = "\n".join([fmt(header), sep] + [fmt(r) for r in rows] + [sep, fmt(footer)]) + "\n"
    print(text, end="", file=file if file is not None else sys.stdout)
    return text
