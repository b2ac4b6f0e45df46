"""Command line: `python -m jaxppo.train [--config FILE.yaml] [--output-dir DIR] [--resume] [key=value ...]`.

With no arguments it runs the built-in demo: a tiny GPT-2 policy learns the `vowels` task on the
CPU in a few minutes. Point it at real checkpoints with a config file or overrides, e.g.

    python -m jaxppo.train model.policy=/ckpt/qwen2-0.5b model.reward_model=/ckpt/rm \\
        data.prompts=prompts.jsonl reward.task=null train.total_steps=500
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
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    p.add_argument("--resume-from", metavar="PATH", help="continue from a given checkpoint folder")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from jaxppo.errors import JaxppoError

    try:
        from jaxppo.config import load_config
        from jaxppo.trainer import PPOTrainer

        overrides = list(args.overrides)
        if args.output_dir:
            overrides.append(f"train.output_dir={args.output_dir}")
        config = load_config(args.config, overrides)
        resume = args.resume_from or ("latest" if args.resume else None)
        if args.resume and not args.resume_from:
            from jaxppo.checkpoint import find_checkpoint_dir
            find_checkpoint_dir(os.path.join(config.train.output_dir, "checkpoints"))  # fail before loading models
        trainer = PPOTrainer(config, resume_from_checkpoint=resume)
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
