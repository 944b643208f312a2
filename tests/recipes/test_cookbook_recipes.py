"""Real tinker-cookbook recipes, unmodified, run for a few steps against the live server.

Each recipe runs as `python -m tinker_cookbook.recipes...` in `.venv-cookbook` with only
command-line flags and environment variables (see conftest.py), exactly as a user would run
it against hosted Tinker, and must exit 0 having written its training metrics and checkpoints.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from recipe_testing import FEW_SLOTS, FEW_SLOTS_MODEL, RECIPE_MODEL, RecipeServer


class RecipeRun:
    def __init__(self, log_path: Path, returncode: int, output: str) -> None:
        self.log_path = log_path
        self.returncode = returncode
        self.output = output

    def metrics(self) -> list[dict]:
        path = self.log_path / "metrics.jsonl"
        assert path.is_file(), f"no metrics.jsonl in {self.log_path}"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def checkpoints(self) -> list[dict]:
        path = self.log_path / "checkpoints.jsonl"
        assert path.is_file(), f"no checkpoints.jsonl in {self.log_path}"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_recipe(
    server: RecipeServer, python: Path, module: str, *flags: str, name: str, timeout: float = 300
) -> RecipeRun:
    log_path = server.root / "runs" / name
    workdir = server.root / "work" / name  # recipes write code.diff etc. relative to the cwd
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [str(python), "-m", module, *flags, f"log_path={log_path}"],
        cwd=workdir,
        env=server.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=timeout,
    )
    (workdir / "output.log").write_text(proc.stdout)
    return RecipeRun(log_path, proc.returncode, proc.stdout)


def assert_succeeded(run: RecipeRun, server: RecipeServer) -> None:
    assert run.returncode == 0, (
        f"recipe exited with {run.returncode}\n--- recipe output (tail) ---\n{run.output[-6000:]}"
        f"\n--- server log (tail) ---\n{server.log_tail()}"
    )


def assert_final_checkpoint(run: RecipeRun) -> None:
    final = run.checkpoints()[-1]
    assert final["name"] == "final", final
    assert final["state_path"].startswith("tinker://") and "/weights/" in final["state_path"], final
    assert final["sampler_path"].startswith("tinker://") and "/sampler_weights/" in final["sampler_path"], final


def finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_sl_loop_trains_then_resumes(recipe_server: RecipeServer, cookbook_python: Path) -> None:
    """recipes/sl_loop.py on the no_robots stand-in; re-running it resumes from its checkpoint."""
    flags = ("batch_size=8", "max_length=512", "max_steps=2", "save_every=1")
    run = run_recipe(recipe_server, cookbook_python, "tinker_cookbook.recipes.sl_loop", *flags, name="sl_loop")
    assert_succeeded(run, recipe_server)
    metrics = run.metrics()
    assert [m["step"] for m in metrics] == [0, 1]
    for m in metrics:
        assert m["num_sequences"] == 8 and finite(m["train_mean_nll"]) and m["train_mean_nll"] > 0, m
    names = [c["name"] for c in run.checkpoints()]
    assert names == ["000001", "final"], names
    assert_final_checkpoint(run)

    # Same command again: loads the final state with its optimizer, finds the epoch done, saves.
    again = run_recipe(recipe_server, cookbook_python, "tinker_cookbook.recipes.sl_loop", *flags, name="sl_loop")
    assert_succeeded(again, recipe_server)
    assert "Resuming from batch" in again.output
    assert [c["name"] for c in again.checkpoints()] == ["000001", "final", "final"]
    assert_final_checkpoint(again)


def test_chat_sl_on_bundled_jsonl(recipe_server: RecipeServer, cookbook_python: Path) -> None:
    """recipes/chat_sl on the conversations JSONL that ships in the tinker_cookbook wheel."""
    dataset = subprocess.run(
        [
            str(cookbook_python), "-c",
            "from importlib import resources;"
            "print(resources.files('tinker_cookbook') / 'example_data' / 'conversations.jsonl')",
        ],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    run = run_recipe(
        recipe_server, cookbook_python, "tinker_cookbook.recipes.chat_sl.train",
        f"model_name={RECIPE_MODEL}", f"dataset={dataset}", "batch_size=8", "max_length=512",
        "max_steps=2", "save_every=1", "behavior_if_log_dir_exists=delete",
        name="chat_sl",
    )
    assert_succeeded(run, recipe_server)
    metrics = run.metrics()
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(finite(m["train_mean_nll"]) for m in metrics), metrics
    assert_final_checkpoint(run)


def _assert_rl_steps(run: RecipeRun, steps: int) -> list[dict]:
    trained = [m for m in run.metrics() if "env/all/reward/total" in m]
    assert [m["step"] for m in trained] == list(range(steps)), run.metrics()
    for m in trained:
        assert finite(m["env/all/reward/total"]) and m["env/all/ac_tokens_per_turn"] > 0, m
        # The learner's logprobs of the sampled tokens match the sampler's (same weights).
        assert abs(m["optim/kl_sample_train_v1"]) < 1e-3, m
    return trained


def test_preference_shorter_rl(recipe_server: RecipeServer, cookbook_python: Path) -> None:
    """recipes/preference/shorter: sampling, importance_sampling with non-zero advantages,
    sampler refresh every step and post-update KL from prompt logprobs."""
    run = run_recipe(
        recipe_server, cookbook_python, "tinker_cookbook.recipes.preference.shorter.train",
        f"model_name={RECIPE_MODEL}", "renderer_name=role_colon", "batch_size=4", "group_size=4",
        "max_tokens=16", "max_steps=2", "eval_every=0", "behavior_if_log_dir_exists=delete",
        name="shorter",
    )
    assert_succeeded(run, recipe_server)
    for m in _assert_rl_steps(run, 2):
        assert finite(m["kl_pre_post_v1"]), m
    assert_final_checkpoint(run)


def test_math_rl_arithmetic_importance_sampling(recipe_server: RecipeServer, cookbook_python: Path) -> None:
    """recipes/math_rl env=arithmetic with loss_fn=importance_sampling (0.6.1's default,
    stable_reinforce, needs server-recorded sampling provenance)."""
    run = run_recipe(
        recipe_server, cookbook_python, "tinker_cookbook.recipes.math_rl.train",
        f"model_name={RECIPE_MODEL}", "renderer_name=role_colon", "env=arithmetic",
        "groups_per_batch=4", "group_size=4", "max_tokens=8", "max_steps=2",
        "loss_fn=importance_sampling", "eval_every=0", "behavior_if_log_dir_exists=delete",
        name="math_rl",
    )
    assert_succeeded(run, recipe_server)
    _assert_rl_steps(run, 2)
    assert_final_checkpoint(run)


def test_rl_runs_longer_than_the_adapter_slots(recipe_server: RecipeServer, cookbook_python: Path) -> None:
    """An RL run refreshes its sampler every step (`save_weights_and_get_sampling_client`);
    it must not run out of adapter slots after `max_adapters` steps."""
    steps = FEW_SLOTS + 2
    run = run_recipe(
        recipe_server, cookbook_python, "tinker_cookbook.recipes.math_rl.train",
        f"model_name={FEW_SLOTS_MODEL}", "renderer_name=role_colon", "env=arithmetic",
        "groups_per_batch=1", "group_size=2", "max_tokens=2", f"max_steps={steps}",
        "loss_fn=importance_sampling", "eval_every=0", "save_every=0", "behavior_if_log_dir_exists=delete",
        name="math_rl_slots",
    )
    assert_succeeded(run, recipe_server)
    _assert_rl_steps(run, steps)
