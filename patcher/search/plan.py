"""One trial's edit as an ordinary ablation Plan: the exact tensors, bases (post-norm corrected) and
strengths `patcher ablate` would write. The forward-pass engines read their edit from this Plan
too, so a trial evaluated in the forward pass and the checkpoint `--from-study` writes come from
one description and cannot drift apart."""

from patcher import __version__
from patcher.edit.directions import Direction, digest
from patcher.edit.plan import Plan, plan_ablation
from patcher.errors import PatcherError
from patcher.io.storage import Storage
from patcher.model.architectures import Resolved
from patcher.model.opened import Model, as_model
from patcher.search.space import EditSpec


def build_plan(
    ck: Model | Storage,
    resolved: Resolved,
    spec: EditSpec,
    source: str,
    untie: bool = False,
    record: dict | None = None,
) -> Plan:
    """Merge one plan_ablation per (role, layer) group (each group has its own direction and strength)."""
    model = as_model(ck).resolved_as(resolved)  # one Model: the FP8 rule and input paths come with it
    plan = Plan(model, resolved)
    for (role, layer), (vector, strength) in spec.groups.items():
        d = Direction(vector[None, :], source, None, digest(vector[None, :]))
        try:
            part = plan_ablation(
                model,
                d,
                layers=None if layer is None else {layer},
                roles=(role,),
                scale=strength,
                preserve=spec.preserve,
                untie=untie,
            )
        except PatcherError:
            continue  # this model has no tensor for the group (e.g. no embedding writer selected)
        plan.edits.update(part.edits)
        plan.new.extend(e for e in part.new if all(e.name != n.name for n in plan.new))
        plan.config_updates.update(part.config_updates)
        plan.notes.extend(n for n in part.notes if n not in plan.notes)
    plan.record = {
        "op": "ablate",
        "direction": source,
        "direction_sha256": (record or {}).get("direction_sha256"),
        "rank": 1,
        "targets": sorted({r for r, _ in spec.groups}),
        "norm_preserve": spec.preserve,
        "untie_embeddings": untie,
        "groups": spec.as_record(),
        "post_norm_corrected": bool(resolved.arch.post_norm_gain),
        "patcher": __version__,
        **(record or {}),
    }
    return plan
