"""Parameter grouping by meta-architecture submodule: which AGVM module each parameter is in.

Default module names (in this order, anchor moved first): ``backbone``, ``neck``, ``rpn``,
``box_head``, ``mask_head``, ``keypoint_head``, ``sem_seg_head``, ``dense_head``. The default
rules work structurally on detectron2's attribute names, so they cover every meta-architecture
(GeneralizedRCNN with FPN or C4 backbones and cascade heads, RetinaNet, FCOS, PanopticFPN,
SemanticSegmentor, ProposalNetwork, ViT + SimpleFeaturePyramid):

==================  =================================================================
module              parameters (names relative to the model, DDP wrapper removed)
==================  =================================================================
backbone            ``backbone.bottom_up.*`` (FPN) / ``backbone.net.*`` (ViT + SFP);
                    all of ``backbone.*`` when the backbone has no neck (C4, DC5)
neck                the rest of ``backbone.*``: FPN lateral/output convs, top block, SFP
rpn                 ``proposal_generator.*``
box_head            ``roi_heads.box_head*``, ``roi_heads.box_predictor*`` (every cascade
                    stage), ``roi_heads.res5`` (the C4 head's shared res5 stage)
mask_head           ``roi_heads.mask_head.*``
keypoint_head       ``roi_heads.keypoint_head.*``
sem_seg_head        ``sem_seg_head.*``
dense_head          ``head.*`` (RetinaNet / FCOS)
==================  =================================================================

User rules ``[(module, regex), ...]`` are tried first (``re.search`` on the parameter name),
then the defaults; the first match wins. Every trainable parameter must land in exactly one
module, otherwise :func:`group_parameters` raises with the list of the ones that did not.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

__all__ = ["DEFAULT_MODULE_ORDER", "default_rules", "group_parameters", "module_of_parameters"]

DEFAULT_MODULE_ORDER = (
    "backbone", "neck", "rpn", "box_head", "mask_head", "keypoint_head", "sem_seg_head", "dense_head",
)

Rule = Tuple[str, str]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def default_rules(model: nn.Module) -> List[Rule]:
    """The default ``(module, regex)`` rules for ``model`` (see the module docstring)."""
    model = _unwrap(model)
    backbone = getattr(model, "backbone", None)
    inner = [name for name in ("bottom_up", "net") if backbone is not None and hasattr(backbone, name)]
    rules: List[Rule] = []
    if inner:
        rules.append(("backbone", r"^backbone\.(%s)\." % "|".join(inner)))
        rules.append(("neck", r"^backbone\."))
    else:
        rules.append(("backbone", r"^backbone\."))
    rules += [
        ("rpn", r"^proposal_generator\."),
        ("box_head", r"^roi_heads\.(box_head|box_predictor|res5)\b"),
        ("mask_head", r"^roi_heads\.mask_head\."),
        ("keypoint_head", r"^roi_heads\.keypoint_head\."),
        ("sem_seg_head", r"^sem_seg_head\."),
        ("dense_head", r"^head\."),
    ]
    return rules


def module_of_parameters(
    model: nn.Module, rules: Optional[Sequence[Rule]] = None
) -> "OrderedDict[str, str]":
    """``{parameter name: module name}`` for every trainable parameter of ``model``.

    Raises:
        ValueError: a user rule is malformed or matches no parameter, or some trainable
            parameters match no rule (all of them are listed).
    """
    model = _unwrap(model)
    user = [_check_rule(r) for r in (rules or [])]
    compiled = [(name, re.compile(rx), True) for name, rx in user]
    compiled += [(name, re.compile(rx), False) for name, rx in default_rules(model)]
    assignment: "OrderedDict[str, str]" = OrderedDict()
    used = set()
    stragglers = []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for module, rx, is_user in compiled:
            if rx.search(pname):
                assignment[pname] = module
                if is_user:
                    used.add((module, rx.pattern))
                break
        else:
            stragglers.append(pname)
    unused = [f"({m!r}, {rx!r})" for m, rx in user if (m, rx) not in used]
    if unused:
        raise ValueError(f"SOLVER.AGVM.GROUPS rules match no trainable parameter: {', '.join(unused)}")
    if stragglers:
        shown = ", ".join(stragglers[:20]) + (f", ... ({len(stragglers)} in all)" if len(stragglers) > 20 else "")
        raise ValueError(
            f"{len(stragglers)} trainable parameters of {type(model).__name__} belong to no AGVM module: "
            f"{shown}. Add (module, regex) rules for them in SOLVER.AGVM.GROUPS."
        )
    return assignment


def group_parameters(
    model: nn.Module, rules: Optional[Sequence[Rule]] = None, anchor: str = "backbone"
) -> "OrderedDict[str, List[nn.Parameter]]":
    """Ordered ``{module name: [parameters]}`` of ``model``'s trainable parameters, anchor first.

    Args:
        model: a detectron2 model (a DDP wrapper is looked through).
        rules: optional user ``(module, regex)`` pairs, tried before the defaults.
        anchor: the module to put first (default ``"backbone"``); must be a module that has
            parameters.

    Modules without trainable parameters are left out. Order: anchor, then
    :data:`DEFAULT_MODULE_ORDER`, then user-defined modules in rule order.
    """
    assignment = module_of_parameters(model, rules)
    params = dict(_unwrap(model).named_parameters())
    by_module: Dict[str, List[nn.Parameter]] = {}
    for pname, module in assignment.items():
        by_module.setdefault(module, []).append(params[pname])
    if anchor not in by_module:
        raise ValueError(
            f"SOLVER.AGVM.ANCHOR={anchor!r} is not a module of this model; modules: {list(by_module)}"
        )
    user_names = [m for m, _ in (rules or []) if m not in DEFAULT_MODULE_ORDER]
    order = [anchor] + [m for m in list(DEFAULT_MODULE_ORDER) + user_names if m != anchor]
    return OrderedDict((m, by_module[m]) for m in _unique(order) if m in by_module)


def _unique(items: Iterable[str]) -> List[str]:
    out: List[str] = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


def _check_rule(rule) -> Rule:
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and all(isinstance(x, str) for x in rule)):
        raise ValueError(f"SOLVER.AGVM.GROUPS entries must be (module name, regex) pairs of strings, got {rule!r}")
    try:
        re.compile(rule[1])
    except re.error as e:
        raise ValueError(f"SOLVER.AGVM.GROUPS regex {rule[1]!r} of module {rule[0]!r} is invalid: {e}") from None
    return rule[0], rule[1]
