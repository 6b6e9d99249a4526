r"""Evaluate a run's policy at checkpointed steps on its eval split (``alignjax.training.loop.evaluate_run``).

The run's own config (stored with its checkpoints) and eval step: the loss and its metrics
(DPO: rewards, margins, reward accuracy, ``policy/preference_accuracy``) against the run's
reference, as the run prints them at its start and end. A run in progress may be evaluated.

  python -m launch.evaluate --workdir=runs/dpo_tiny                # the newest checkpoint
  python -m launch.evaluate --workdir=runs/dpo_tiny --steps=all    # the start and every checkpoint
  python -m launch.evaluate --workdir=runs/dpo_tiny --steps=0,4 --output=eval.json

Prints one line per step and writes them as a JSON list to --output (default
<workdir>/evaluation.json). Exit codes: 0 finished; 1 a bug (traceback); 2 user error (no
run in --workdir, a step that is not checkpointed or lies inside the SFT warm-up), one line.
"""

import json
import os

from absl import flags

from launch import common

_WORKDIR = flags.DEFINE_string("workdir", "runs/dpo_tiny", "The run's directory (as given to launch.train).")
_STEPS = flags.DEFINE_list(
    "steps", [], "Checkpointed steps to evaluate (comma-separated; 0 is the start of a run without SFT), 'all' "
    "for the preference phase's start and every checkpoint; default: the newest checkpoint.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the results (default: <workdir>/evaluation.json).")


def _steps(workdir: str):
  """The ``steps`` argument of ``evaluate_run`` from --steps (``None``: the newest)."""
  from alignjax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from alignjax.training import loop  # pylint: disable=import-outside-toplevel
  values = [v.strip() for v in _STEPS.value if v.strip()]
  if not values:
    return None
  if values == ["all"]:
    return loop.evaluable_steps(workdir)
  try:
    return [int(v) for v in values]
  except ValueError:
    raise config_lib.ConfigError(f"--steps: expected 'all' or comma-separated step numbers, got {_STEPS.value}.") \
        from None


def main(argv):
  del argv
  from alignjax.training import loop  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(_WORKDIR.value)
  results = loop.evaluate_run(workdir, steps=_steps(workdir))
  for r in results:
    who = "start (policy = reference)" if r["phase"] == "start" else "policy"
    print(f"[eval @ {r['step']}] {r['loss']} {who}: " + " ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items()))
  output = os.path.abspath(_OUTPUT.value or os.path.join(workdir, "evaluation.json"))
  os.makedirs(os.path.dirname(output), exist_ok=True)
  with open(output, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {len(results)} evaluation(s) to {output}")
  return 0


if __name__ == "__main__":
  common.run(main, help_fn=lambda: "launch.evaluate reads the run's stored config; its flags: --workdir, --steps, "
             "--output.")
