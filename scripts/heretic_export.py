"""Write the Pareto-front trials of a finished heretic study as merged HF checkpoints, so that
scripts/bench_search.py --peer scores them with the same evaluator as patcher's trials.

Runs in the peer's own environment (heretic-llm is AGPL and needs its own torch stack):

    cd WORK/heretic && /work/venvs/heretic/bin/python scripts/heretic_export.py OUT [LIMIT]

It reads heretic's config.toml and study journal from the current folder, recomputes heretic's
per-layer refusal directions with heretic's own Model (the study stores parameters, not directions),
then for each front trial applies heretic's abliteration and saves `merge_and_unload()` to OUT/trial-N.
"""

import json
import sys
from pathlib import Path


def front(trials: list) -> list:
    """heretic's own front: by refusals then KL, each trial lowering the best KL so far."""
    best, out = float("inf"), []
    for t in sorted(trials, key=lambda t: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"])):
        if t.user_attrs["kl_divergence"] < best:
            best = t.user_attrs["kl_divergence"]
            out.append(t)
    return out


def main() -> None:
    out = Path(sys.argv[1]).resolve()
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else None  # the front of the first LIMIT trials
    sys.argv = sys.argv[:1]  # heretic's Settings parse the command line
    import optuna
    import torch
    import torch.nn.functional as F
    from heretic.config import Settings
    from heretic.model import AbliterationParameters, Model
    from heretic.utils import load_prompts
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    torch.set_grad_enabled(False)
    settings = Settings()
    done = []
    for journal in Path(settings.study_checkpoint_dir).glob("*.jsonl"):
        storage = JournalStorage(JournalFileBackend(str(journal)))
        if storage.get_all_studies():  # a peer stopped before its first trial has none
            study = optuna.load_study(study_name="heretic", storage=storage)
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE][:limit]
    out.mkdir(parents=True, exist_ok=True)
    if not done:
        (out / "front.json").write_text(json.dumps({"front": [], "trial_seconds": [], "completed": 0}) + "\n")
        return
    model = Model(settings)
    good = model.get_residuals_mean(load_prompts(settings, settings.good_prompts))
    bad = model.get_residuals_mean(load_prompts(settings, settings.bad_prompts))
    r = F.normalize(bad - good, p=2, dim=1)
    if settings.orthogonalize_direction:  # heretic's projected abliteration: drop r's part along ĝood
        g = F.normalize(good, p=2, dim=1)
        r = F.normalize(r - (r * g).sum(1, keepdim=True) * g, p=2, dim=1)
    rows = []
    for t in front(done):
        model.reset_model()
        params = {k: AbliterationParameters(**v) for k, v in t.user_attrs["parameters"].items()}
        model.abliterate(r, t.user_attrs["direction_index"], params)
        folder = out / f"trial-{t.number}"
        model.get_merged_model().save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
        rows.append(
            {
                "trial": t.number,
                "folder": str(folder),
                "refusals": t.user_attrs["refusals"],
                "kl": t.user_attrs["kl_divergence"],
                "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    data = {"front": rows, "trial_seconds": seconds, "completed": len(done)}
    (out / "front.json").write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
