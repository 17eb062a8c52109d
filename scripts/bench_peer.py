"""`scripts/bench_search.py --peer`: patcher search and the peer (heretic-llm 1.4.0) on the real
SmolLM2-135M-Instruct, same prompts, token count and trial budget, both Pareto fronts re-scored by
ONE evaluator (patcher's Evaluator, numpy engine) on held-out prompts neither search saw:

  - marker rate over `--eval-tokens` (96) greedy tokens on the held-out harmful prompts,
  - first-token KL and KL over the first 16 tokens of the original's own completion (harmless),
  - optionally a judge's refusal rate (`--judge MODEL`, patcher/search/judge.py) beside the markers.

Prompts: scripts/prompt_sets.py (train: directions; search: what both searches score trials on;
test: the final scoring). The peer runs in its own venv (`--heretic-python`, default
/work/venvs/heretic/bin/python; `pip install heretic-llm==1.4.0` there): its CLI for the search (stdin
closed, so it ends after the trials), then scripts/heretic_export.py writes its front as merged
checkpoints. The two searches run at the same time (the machine is shared: each sees the same
load). Trials/hour: trials run (pruned ones too) x 3600 / their summed wall time, from each
study's own trial timestamps.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import prompt_sets  # noqa: E402
from prompt_sets import SYSTEM  # noqa: E402


def _label(model) -> str:
    """A model's name for a title (real_models' folders all end in hf/)."""
    p = Path(model).resolve()
    return p.parent.name if p.name == "hf" else p.name


def _toml_str(p) -> str:
    return json.dumps(str(p))


def heretic_config(
    model: Path, P: dict, trials: int, startup: int, tokens: int, seed: int, batch: int, dtype: str = "auto"
) -> str:
    sets = {
        "good_prompts": P["harmless-train"],
        "bad_prompts": P["harmful-train"],
        "good_evaluation_prompts": P["harmless-search"],
        "bad_evaluation_prompts": P["harmful-search"],
    }
    lines = [
        f"model = {_toml_str(model)}",
        'device_map = "cpu"',
        f"dtypes = [{_toml_str(dtype)}]",
        f"batch_size = {batch}",
        f"max_response_length = {tokens}",
        'response_prefix = ""',  # SmolLM2 has none; skips the peer's 200-prompt prefix check
        f"n_trials = {trials}",
        f"n_startup_trials = {startup}",
        f"seed = {seed}",
        'study_checkpoint_dir = "checkpoints"',
        f"system_prompt = {_toml_str(SYSTEM)}",
    ]
    for name, path in sets.items():
        lines += ["", f"[{name}]", f"dataset = {_toml_str(path)}"]
    return "\n".join(lines) + "\n"


def start_heretic(work: Path, model: Path, P: dict, args):
    """The peer's search (its CLI, stdin closed so it ends after the trials), started in the
    background; `finish_heretic` waits for it and writes its front as merged checkpoints."""
    folder = work / "heretic"
    done = folder / "front" / "front.json"
    if done.is_file():  # a finished peer run is kept: rerunning the benchmark only re-scores
        return None
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    startup = min(60, max(1, int(0.3 * args.trials)))
    (folder / "config.toml").write_text(
        heretic_config(
            model, P, args.trials, startup, args.tokens, args.seed, args.batch_size, args.heretic_dtype
        )
    )
    heretic = Path(args.heretic_python).with_name("heretic")
    log = open(folder / "heretic.log", "w")
    proc = subprocess.Popen([str(heretic)], cwd=folder, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    return proc, log, time.perf_counter()


def finish_heretic(work: Path, started, args, limit: int) -> dict:
    """Wait for the peer (at most until --search-minutes after its start), then write the front of
    its first `limit` completed trials (patcher's count: equal budgets) as merged checkpoints."""
    folder = work / "heretic"
    done = folder / "front" / "front.json"
    if started is None:
        return json.loads(done.read_text())
    proc, log, t_start = started
    t0 = time.perf_counter()
    left = None if args.search_minutes is None else max(t_start + args.search_minutes * 60 - t0, 0)
    try:
        proc.wait(timeout=left)
    except subprocess.TimeoutExpired:  # the same wall-clock budget as patcher's search
        proc.terminate()
        proc.wait()
    log.close()
    with open(folder / "export.log", "w") as log:
        subprocess.run(
            [args.heretic_python, str(HERE / "heretic_export.py"), str(folder / "front"), str(limit)],
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            check=True,
        )
    data = json.loads(done.read_text())
    data["waited_s"] = time.perf_counter() - t0
    done.write_text(json.dumps(data, indent=2) + "\n")
    return data


def run_patcher(work: Path, model: Path, P: dict, args):
    from patcher.search import study as st

    folder = work / "patcher"  # a study that holds its trials already is resumed, not rerun
    folder.mkdir(parents=True, exist_ok=True)
    dirs = folder / "dirs.safetensors"
    t0 = time.perf_counter()
    s = prompt_sets.search_setup(
        model,
        P,
        dirs,
        tokens=args.tokens,
        batch_size=args.batch_size,
        space_items=args.space,
        winsorize=args.winsorize,
        project_out_negative_mean=args.project,
        objective=args.objective,
        refused_only=not args.all_positives,
    )
    startup = min(60, max(1, int(0.3 * args.trials)))
    db = folder / "study.db"
    done = db.is_file() and len(st.completed(st.open_study(db, None, create=False))) >= args.trials
    if done:  # only re-scored: read it as it is (the shared model cache may have been re-derived since)
        study = st.open_study(db, None, create=False)
    else:
        study = st.open_study(db, s.attrs, seed=args.seed, startup=startup)
        s.evaluator.reference()
        budget = (
            None if args.search_minutes is None else args.search_minutes * 60 - (time.perf_counter() - t0)
        )
        st.optimize(study, s.run_trial, args.trials, budget)
    wall = time.perf_counter() - t0
    # every trial run counts, pruned ones too: trials/hour is what the whole study takes per trial
    ran = sorted(st.completed(study) + st.pruned_trials(study), key=lambda t: t.number)
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in ran]
    pruned = len(st.pruned_trials(study))
    return s, study, {"wall_s": wall, "trial_seconds": seconds, "pruned": pruned, "setup_seconds": s.seconds}


def test_evaluator(s, P: dict, tokens: int, kl_tokens: int, limit: int | None = None):
    from patcher.model.prompts import encode_prompts, read_prompt_file
    from patcher.onnx.verify import stop_tokens
    from patcher.search.objectives import Evaluator

    tok = s.ck.tokenizer()

    def enc(path):
        return encode_prompts(tok, read_prompt_file(path, limit), chat_template=True, system=SYSTEM)

    ev = Evaluator(
        s.engine,
        tok,
        enc(P["harmful-test"]),
        enc(P["harmless-test"]),
        tokens=tokens,
        kl_tokens=kl_tokens,
        eos=stop_tokens(s.ck.folder, tok),
        batch_size=s.evaluator.batch_size,
    )
    ev.reference()
    return ev


def score(ev, engine, edits) -> dict:
    """One evaluator for every edit: marker rate (completions end at their first marker, which cannot
    change it; a judge reads them cut there), first-token KL and KL over the original's first
    kl_tokens tokens (kl_seq)."""
    import copy

    e = copy.copy(ev)
    e.engine = engine
    comp, _ = e.generate(e.positive, edits, e.tokens)
    kl, first = e.kl(edits)
    return {"marker_rate": e.rate(comp), "kl_first": first, "kl_seq": kl, "texts": e.texts(comp)}


def first_front(study, n: int) -> list:
    """patcher's Pareto front of its first n trials."""
    from patcher.search import study as st

    return st.pareto([t for t in st.completed(study) if t.number < n])


def score_trial(s, ev, t) -> dict:
    """One patcher trial's edit, scored (and printed) as a row."""
    from patcher.search import space as sp
    from patcher.search.plan import build_plan

    spec = sp.edit_spec(sp.complete(t.params, s.attrs["fixed"]), s.table, s.n_layers, s.directions)
    edits = s.engine.edits(build_plan(s.ck, s.resolved, spec, str(s.directions), s.untie))
    row = {"who": "patcher", "trial": t.number, "search": list(t.values), **score(ev, s.engine, edits)}
    print(json.dumps({k: v for k, v in row.items() if k != "texts"}), flush=True)
    return row


def judged(rows: list, judge, prompts: list[str], markers) -> None:
    """The judge's refusal rate beside the marker rate, and how often the two agree per completion."""
    from patcher.search.objectives import hits

    for r in rows:
        verdicts = judge.refusals(prompts, r["texts"])
        marked = [hits(t, markers) for t in r["texts"]]
        r["judge_rate"] = float(np.mean(verdicts))
        r["judge_agreement"] = float(np.mean([a == b for a, b in zip(verdicts, marked)]))


def main(args) -> None:
    sys.path.insert(0, str(HERE))
    import real_models

    from patcher.model.execution import StreamedModel
    from patcher.model.opened import Model
    from patcher.search import study as st
    from patcher.search.engine import ResidentModel

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    P = cut(prompt_sets.ensure(), work / "prompts", args.search_prompts)
    if args.train_extra:  # both tools' directions from the 128 training + 160 extra harmful prompts
        texts = read_texts(P["harmful-train"]) + read_texts(P["harmful-extra"])
        P["harmful-train"] = work / "prompts" / "harmful-train-extra.txt"
        P["harmful-train"].parent.mkdir(parents=True, exist_ok=True)
        P["harmful-train"].write_text("\n".join(texts) + "\n", encoding="utf-8")
    model = args.model or real_models.ensure().hf
    load = {"start": os.getloadavg()}
    report = {"model": str(model), "trials": args.trials, "tokens": args.tokens, "cores": os.cpu_count()}
    # both searches run at the same time, so they share whatever else loads the machine
    started = None if args.skip_heretic else start_heretic(work, model, P, args)
    s, study, report["patcher"] = run_patcher(work, model, P, args)
    load["after_patcher"] = os.getloadavg()
    print(json.dumps({"patcher": report["patcher"]}), flush=True)
    if not args.skip_heretic:
        n_patcher = len(report["patcher"]["trial_seconds"])  # trials run, pruned ones too
        report["heretic"] = finish_heretic(work, started, args, n_patcher)
        load["after_heretic"] = os.getloadavg()
        print(json.dumps({"heretic": report["heretic"]}), flush=True)
    cache = work / "scores.json"  # scored rows are kept: a rerun with --judge only judges
    rows = json.loads(cache.read_text()) if cache.is_file() else []
    if not rows:
        ev = test_evaluator(s, P, args.eval_tokens, args.kl_tokens, args.test_prompts)
        rows = [{"who": "original", **score(ev, s.engine, None)}]
        ran = len(report["patcher"]["trial_seconds"])  # completed and pruned
        n = min(ran, report.get("heretic", {}).get("completed", 10**9))
        report["equal_trials"] = n  # both fronts from the first n trials each (a pruned one adds nothing)
        rows += [score_trial(s, ev, t) for t in first_front(study, n)]
        for f in report.get("heretic", {}).get("front", []):
            engine = ResidentModel(StreamedModel(Model.open(Path(f["folder"]))))
            rows.append(
                {
                    "who": "heretic",
                    "trial": f["trial"],
                    "search": [f["refusals"], f["kl"]],
                    **score(ev, engine, None),
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "texts"}), flush=True)
            del engine
        cache.write_text(json.dumps(rows) + "\n")
    if args.fronts_at:  # patcher's fronts of its first n trials: their points the full front dropped
        report["fronts_at"] = {n: [t.number for t in first_front(study, n)] for n in args.fronts_at}
        scored = {r.get("trial") for r in rows if r["who"] == "patcher"}
        todo = sorted({t for ts in report["fronts_at"].values() for t in ts} - scored)
        ev = test_evaluator(s, P, args.eval_tokens, args.kl_tokens, args.test_prompts) if todo else None
        for t in st.completed(study):
            if t.number in todo:
                rows.append(score_trial(s, ev, t))
                cache.write_text(json.dumps(rows) + "\n")
    if args.judge:
        from patcher.search.judge import Judge
        from patcher.search.objectives import MARKERS

        judged(rows, Judge.open(args.judge), read_texts(P["harmful-test"])[: args.test_prompts], MARKERS)
    load["end"] = os.getloadavg()
    report.update(
        rows=rows, load=load, uptime=subprocess.run(["uptime"], capture_output=True, text=True).stdout
    )
    for who in ("patcher", "heretic"):
        if who in report and report[who]["trial_seconds"]:
            sec = report[who]["trial_seconds"]
            report[who]["trials_per_hour"] = round(3600 * len(sec) / float(np.sum(sec)), 1)
    (work / "peer.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    from patcher.search.report import write_fronts

    last = set(report.get("fronts_at", {}).get(args.trials, [])) or None  # plotted: the full budget's
    series = {
        who: [
            (r["marker_rate"], r["kl_first"])
            for r in rows
            if r["who"] == who and (who != "patcher" or last is None or r["trial"] in last)
        ]
        for who in ("patcher", "heretic")
    }
    (work / "peer.svg").unlink(missing_ok=True)  # this benchmark's own plot, redrawn on every run
    write_fronts(
        work / "peer.svg",
        series,
        f"{_label(model)}: Pareto fronts of {args.trials} trials each, held-out prompts",
        {"original": (rows[0]["marker_rate"], rows[0]["kl_first"])},
    )
    print(json.dumps({k: report[k] for k in ("load",)}), flush=True)


def cut(P: dict, folder: Path, n: int | None) -> dict:
    """The search split cut to its first n prompts of each kind (both searches score trials on it)."""
    if not n:
        return P
    folder.mkdir(parents=True, exist_ok=True)
    out = dict(P)
    for key in ("harmful-search", "harmless-search"):
        out[key] = folder / f"{key}.txt"
        out[key].write_text("\n".join(read_texts(P[key])[:n]) + "\n", encoding="utf-8")
    return out


def read_texts(path: Path) -> list[str]:
    return [x for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def add_arguments(ap) -> None:
    g = ap.add_argument_group("--peer")
    g.add_argument("--peer", action="store_true", help="patcher search vs heretic on SmolLM2-135M-Instruct")
    g.add_argument("--heretic-python", default="/work/venvs/heretic/bin/python")
    g.add_argument("--model", type=Path, default=None, help="default: scripts/real_models.py's SmolLM2")
    g.add_argument("--heretic-dtype", default="auto", help="the peer's torch dtype (its default: auto)")
    g.add_argument("--search-minutes", type=float, default=None, help="wall-clock cap for each search")
    g.add_argument("--skip-heretic", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-tokens", type=int, default=96)
    g.add_argument("--kl-tokens", type=int, default=16)
    g.add_argument("--test-prompts", type=int, default=64, help="held-out prompts of each kind scored")
    g.add_argument("--space", action="append", default=[], help="narrow patcher's space (NAME=LOW:HIGH)")
    g.add_argument("--judge", type=Path, default=None, help="a chat model that judges refusals")
    g.add_argument("--search-prompts", type=int, default=None, help="cut the search split to N of each kind")
    g.add_argument("--project", action="store_true", help="patcher's directions: ⟂ the harmless mean")
    g.add_argument("--train-extra", action="store_true", help="directions from harmful-train + harmful-extra")
    g.add_argument(
        "--all-positives", action="store_true", help="patcher's directions from every harmful training prompt"
    )
    g.add_argument("--winsorize", type=float, default=None, help="patcher's directions: winsorized means")
    g.add_argument(
        "--objective", default="likelihood", help="patcher's refusal objective: likelihood | markers"
    )
    g.add_argument(
        "--fronts-at",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[],
        help="also score patcher's fronts of its first N trials (comma list, e.g. 8,16,24,32)",
    )
