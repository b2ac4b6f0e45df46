"""Command line: `python -m jaxppo.train [--config FILE.yaml] [--output-dir DIR] [--resume | --overwrite] [key=value ...]`.

With no arguments it runs the built-in demo: a tiny GPT-2 policy learns the `vowels` task on the
CPU in a few minutes. Point it at real checkpoints with a config file or overrides, e.g.

    python -m jaxppo.train model.policy=/ckpt/qwen2-0.5b model.reward_model=/ckpt/rm \\
        data.prompts=prompts.jsonl reward.task=null train.total_steps=500

One run per folder: a fresh run into a folder that holds one is refused (`--overwrite` moves the
old run to `<folder>.old-<time>`), and a lock refuses a second process. `--resume` continues the
run with its own config.yaml; overrides may change only what `jaxppo.config.resume` allows.
"""

from __future__ import annotations

import argparse
import os
import sys


def _epilog() -> str:
    from jaxppo.config import describe_fields

    lines = ["config fields (override any with key=value; defaults are the demo):"]
    for key, default, help_text in describe_fields():
        lines.append(f"  {key} = {default!r}\n      {help_text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxppo.train", description="PPO for language models (RLHF) in JAX.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (fields below; missing ones keep their defaults)")
    p.add_argument("--output-dir", help="run directory (same as train.output_dir=DIR)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the output dir from its latest checkpoint, with its own config.yaml "
                        "(overrides may change total_steps, eval/save/log frequency, early stopping, logging)")
    p.add_argument("--resume-from", metavar="PATH",
                   help="continue from a given checkpoint folder (of this run, or of another: a new run dir)")
    p.add_argument("--overwrite", action="store_true",
                   help="a fresh run into a folder that holds a run moves the old one to <dir>.old-<time>")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    return p


def preflight(config, resume: str | None, overwrite: bool = False) -> None:
    """The checks that need no model, run before any model is loaded (which may take minutes):
    prompt files (every line parsed), reward sources, the resume checkpoint, the run directory
    (its lock; a fresh run into a folder that holds one). The trainer makes them again; here they
    just fail sooner. Raises JaxppoError."""
    from jaxppo.data import tasks
    from jaxppo.run.checkpoint import find_checkpoint_dir
    from jaxppo.run.runfolder import RunLock, check_fresh, same_folder, source_folder
    from jaxppo.data.prompts import load_prompt_records
    from jaxppo.errors import ConfigError

    d, r = config.data, config.reward
    if d.prompts:
        load_prompt_records(d.prompts, field=d.prompt_field, columns=d.columns)
    elif not r.task:
        raise ConfigError("data.prompts is not set and reward.task is null: no prompts to train on")
    if d.eval_prompts:
        load_prompt_records(d.eval_prompts, field=d.prompt_field, columns=d.columns)
    if r.task:
        tasks.get_task(r.task)
    for spec in r.functions:
        tasks.import_function(spec)
    if not r.task and not r.functions and config.model.reward_model is None:
        raise ConfigError("no reward source: set reward.task, reward.functions or model.reward_model")
    if resume is not None:
        find_checkpoint_dir(os.path.join(config.train.output_dir, "checkpoints") if resume == "latest" else resume)
    out = config.train.output_dir
    from jaxppo.runtime import is_primary
    if not is_primary():        # the other processes of a multi-process run use process 0's folder
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"train.output_dir={out!r} is a file, not a directory")
    RunLock(out).check()
    if resume is None or not same_folder(source_folder(resume, out), out):
        check_fresh(out, overwrite)
    if config.logging.wandb:
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb is on but wandb is not installed: pip install 'jaxppo[wandb]'")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)   # overrides may come before and after the flags
    from jaxppo.errors import JaxppoError

    try:
        from jaxppo import runtime
        from jaxppo.config import load_config

        overrides = list(args.overrides)
        if args.output_dir:
            overrides.append(f"train.output_dir={args.output_dir}")
        resume = args.resume_from or ("latest" if args.resume else None)
        if resume is not None:      # the run's own config.yaml (or --config), the overrides on top
            from jaxppo.run.runfolder import resume_config
            config = resume_config(args.config, overrides, resume)
        else:
            config = load_config(args.config, overrides)
        # the process-wide settings (two CPU host devices, XLA options, compilation cache) before
        # anything can start JAX (the preflight imports the user's reward modules); the trainer
        # asks again, which is then a no-op
        runtime.configure(deterministic=config.train.deterministic)
        if os.environ.get("JAXPPO_DISTRIBUTED") == "1":   # several processes: process 0 alone checks the folder
            runtime.initialize_distributed()
        preflight(config, resume, args.overwrite)

        from jaxppo.run.trainer import PPOTrainer

        trainer = PPOTrainer(config, resume_from_checkpoint=resume, overwrite=args.overwrite)
        summary = trainer.train()
    except JaxppoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if not str(summary.get("stopped") or "").startswith("received signal") else 143


if __name__ == "__main__":
    sys.exit(main())
