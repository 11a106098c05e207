"""Screen variants of the demo's training recipe, each trained for the same CPU-equivalent work.

The demo trains the ``cpu`` preset for 12 minutes on 2 CPU cores, which is one recipe per quarter
of an hour. On a GPU the same recipe runs its ~2000 steps in about a minute, so several variants
can be compared in one short session. Each variant is the ``cpu`` preset with some fields changed
(dotted keys, as in the plan file) and a fixed number of full-phase epochs: the number of epochs
the 2-core CPU fits into the demo's budget at that variant's step time (measured there with the
same plan, see docs/results.md), so variants are compared at equal CPU time, not equal steps.

The screens of docs/results.md changed the ``cpu`` preset of commit 0dbc806; to repeat them,
pass that file: ``git show 0dbc806:plans/cpu.json > cpu_0dbc806.json`` and ``--preset cpu_0dbc806.json``.

Every variant runs through the real stages: ``plan --preset`` (so the planner resizes patches
for the variant), ``preprocess``, ``train``, ``infer`` and ``evaluate`` on the demo's held-out
test cases and on a separate screening set of synthetic cases (different indices), so that a
choice need not rest on the six test cases alone.

    python3 bench/recipe_screen.py VARIANTS.json --out DIR --device cuda --parallel 4

VARIANTS.json: ``{"name": {"epochs": 9, "pretraining_epochs": 2, "set": {"low.base_filters": 16}}}``.
Only for exploration: nothing here changes kitspipe, and the figures are single runs (seed 0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
KP = [sys.executable, "-m", "kitspipe", "--no-progress"]


def run(args: list[str], log: Path, timeout: float | None = None) -> float:
    """Run one command with its output appended to ``log``; returns its seconds, raises on failure."""
    started = time.monotonic()
    with log.open("a") as stream:
        stream.write("$ " + " ".join(args) + "\n")
        stream.flush()
        subprocess.run(args, stdout=stream, stderr=subprocess.STDOUT, check=True, timeout=timeout, cwd=REPO)
    return time.monotonic() - started


def patched_preset(base: Path, changes: dict, path: Path) -> None:
    """The preset file ``base`` with dotted-key ``changes`` applied, written to ``path`` (a field
    the file leaves out is added; ``kitspipe plan`` rejects one that is not a plan field)."""
    plans = json.loads(base.read_text())
    for dotted, value in changes.items():
        node = plans
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(json.dumps(plans, indent=1))


def screen_variant(name: str, spec: dict, base: Path, data: dict[str, Path], out: Path, options) -> dict:
    """Plan, preprocess, train, infer and evaluate one variant; returns its summary row."""
    work = base.parent / name
    log = out / f"{name}.log"
    shutil.copytree(base, work, ignore=shutil.ignore_patterns("plans.json"))
    patched_preset(options.preset, spec.get("set", {}), work / "preset.json")
    seconds = {"plan": run(KP + ["plan", str(work), "--preset", str(work / "preset.json"), "--force"], log)}
    seconds["preprocess"] = run(KP + ["preprocess", str(work), "-j", "2"], log)
    plans = json.loads((work / "plans.json").read_text())
    plans["training"].update(max_epochs=int(spec["epochs"]), max_minutes=None, num_workers=options.workers,
                             steps_per_epoch=options.steps_per_epoch or plans["training"]["steps_per_epoch"],
                             pretraining_max_epochs=int(spec.get("pretraining_epochs",
                                                                 plans["training"]["pretraining_max_epochs"])))
    (work / "plans.json").write_text(json.dumps(plans, indent=1))
    seconds["train"] = run(KP + ["train", str(work), "--fold", "0", "--device", options.device], log,
                           timeout=options.train_timeout)
    row = {"variant": name, "epochs": spec["epochs"], "pretraining_epochs": plans["training"]["pretraining_max_epochs"],
           "changes": json.dumps(spec.get("set", {})),
           "high_in": plans["high"]["input_patch"][0], "high_out": plans["high"]["output_patch"][0],
           "low_in": plans["low"]["input_patch"][0], "low_out": plans["low"]["output_patch"][0]}
    history = pd.read_csv(work / "fold_0" / plans["training"]["trainer"] / "training_log.csv")
    history.to_csv(out / f"{name}_training_log.csv", index=False)
    last = history.dropna(subset=["val_kidney_dice"]).iloc[-1]
    row.update(val_kidney=last["val_kidney_dice"], val_tumour=last["val_tumour_dice"], val_low=last["val_low_dice"])
    for set_name, folder in data.items():
        if set_name == "train":
            continue
        predictions = work / f"pred_{set_name}"
        seconds[f"infer_{set_name}"] = run(KP + ["infer", str(work), str(folder), str(predictions), "--folds", "0",
                                                 "--device", options.device], log)
        run(KP + ["evaluate", str(predictions), str(folder)], log)
        table = pd.read_csv(predictions / "evaluation" / "metrics_per_case.csv")
        table.to_csv(out / f"{name}_{set_name}_metrics.csv", index=False)
        row[f"{set_name}_kidney"] = table["kidney_dice"].mean()
        row[f"{set_name}_tumour"] = table["tumour_dice"].mean()
    row.update({f"s_{k}": round(v, 1) for k, v in seconds.items()})
    shutil.rmtree(work, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", type=Path, default=REPO / "plans" / "cpu.json",
                        help="the preset file the variants change (default: this checkout's plans/cpu.json)")
    parser.add_argument("--parallel", type=int, default=4, help="variants trained at once")
    parser.add_argument("--workers", type=int, default=3, help="loader workers per variant")
    parser.add_argument("--screen-cases", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="override (dry runs)")
    parser.add_argument("--train-timeout", type=float, default=None, help="seconds per training run")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run")
    options = parser.parse_args()
    variants = json.loads(options.variants.read_text())
    if options.only:
        variants = {k: v for k, v in variants.items() if k in options.only}
    options.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="kitspipe-screen-"))
    data = {"train": tmp / "data", "test": tmp / "test", "screen": tmp / "screen"}
    log = options.out / "setup.log"
    run(KP + ["synth", str(data["train"]), "--cases", "24", "--seed", "0", "--size", "small"], log)
    run(KP + ["synth", str(data["test"]), "--cases", "6", "--seed", "0", "--size", "small", "--first-index", "10000"], log)
    run(KP + ["synth", str(data["screen"]), "--cases", str(options.screen_cases), "--seed", "0", "--size", "small",
              "--first-index", "20000"], log)
    base = tmp / "work" / "_base"  # the variants are its siblings
    run(KP + ["fingerprint", str(data["train"]), "--work", str(base)], log)
    run(KP + ["plan", str(base), "--preset", "cpu"], log)
    run(KP + ["preprocess", str(base), "-j", "8"], log)
    rows = []

    def one(item):
        name, spec = item
        try:
            row = screen_variant(name, spec, base, data, options.out, options)
        except Exception as error:  # one failing variant must not lose the others' results
            row = {"variant": name, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(options.parallel) as pool:
        rows = list(pool.map(one, variants.items()))
    table = pd.DataFrame(rows)
    table.to_csv(options.out / "summary.csv", index=False)
    print(table.round(3).to_string())
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
