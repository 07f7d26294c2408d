"""The README's batch command: every row of a manifest edited, on this machine or on a Ray cluster.

    python -m realedit.batch edits.jsonl --model CHECKPOINT --out out/batch            # one machine
    python -m realedit.batch edits.jsonl --model CHECKPOINT --out /shared/out --ray    # Ray (local or cluster)

Rows are validated first (every bad row listed by line, nothing loaded); a re-run skips finished rows.
--model is a diffusers folder, a single-file checkpoint (with --model-config offline) or a registered
name; the default is the built-in random-weight tiny model (a dry run: it shows what a run writes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from .batching.methods import METHODS
    from .batching.models import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m realedit.batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="methods: " + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    p.add_argument("manifest", type=Path, help="a .jsonl or .csv file, one edit per row")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"diffusers folder, .safetensors/.ckpt file or registered name (default: {DEFAULT_MODEL})")
    p.add_argument("--model-config", type=Path, help="for a single-file checkpoint offline: a local diffusers "
                                                     "folder of the same architecture (configs and tokenizer)")
    p.add_argument("--ip2p-model", help="InstructPix2Pix diffusers folder (or registered name) for zone rows "
                                        "without an edited image (default with --model tiny: tiny-ip2p)")
    p.add_argument("--out", type=Path, default=Path("out/batch"), help="output folder (shared by all Ray nodes)")
    p.add_argument("--steps", type=int, help="sampling steps for rows whose settings do not give them")
    p.add_argument("--skip-invalid", action="store_true", help="run the valid rows even if some are invalid")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray: alone, a local instance (or the running one); with an address, that cluster")
    p.add_argument("--workers", type=int, help="Ray: number of model-holding actors (default: one per GPU, "
                                               "else one per CPU)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker (Ray default: 1)")
    p.add_argument("--validate-only", action="store_true", help="check the manifest and stop")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .batching import BatchOptions, InvalidManifestError, ManifestError, run_batch, validate
    from .batching.models import DEFAULT_IP2P
    from .batching.run import RAY_INSTALL, ray_available

    if args.ray is not None and not ray_available():
        print(RAY_INSTALL, file=sys.stderr)
        return 2
    try:
        if args.validate_only:
            ip2p = args.ip2p_model or DEFAULT_IP2P.get(args.model)
            rows, problems = validate(args.manifest.resolve(), args.steps, ip2p=ip2p is not None)
            for problem in problems:
                print(f"RealEdit: invalid {problem}", file=sys.stderr)
            print(f"{len(rows)} valid row(s), {len(problems)} invalid")
            return 1 if problems else 0
        options = BatchOptions(skip_invalid=args.skip_invalid, ray=args.ray is not None,
                               ray_address=args.ray or None, workers=args.workers, model_config=args.model_config,
                               ip2p_model=args.ip2p_model,
                               default_steps=args.steps, device=args.device, threads=args.threads)
        summary = run_batch(args.manifest, args.model, args.out, options)
    except (InvalidManifestError, ManifestError, ValueError, RuntimeError) as e:
        print(e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
