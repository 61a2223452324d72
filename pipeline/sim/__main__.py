"""``python -m pipeline.sim``: run the simulator until Ctrl-C, printing its URL."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.errors import ConfigError
from pipeline.sim.config import SimConfig
from pipeline.sim.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sim",
        description="Run the local FLUX.2 [klein] API simulator (dialect A).",
    )
    parser.add_argument("--config", help="TOML settings file (see pipeline/sim/demo.toml)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free)")
    parser.add_argument("--seed", type=int, help="fault seed: the same seed repeats a faulty run")
    parser.add_argument(
        "--regional-port",
        type=int,
        default=0,
        help="port of the regional listener dialect B's polling_url names (default: any free)",
    )
    parser.add_argument(
        "--task-id-seed",
        type=int,
        help="make task ids repeatable from this seed (default: random per start, as production)",
    )
    args = parser.parse_args(argv)
    try:
        config = SimConfig.from_toml(args.config) if args.config else SimConfig()
        if args.seed is not None:
            config.faults.seed = args.seed
        if args.task_id_seed is not None:
            config.task_id_seed = args.task_id_seed
        config.validate(source=args.config or "defaults")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        serve(
            config,
            args.host,
            args.port,
            announce=lambda line: print(line, flush=True),
            regional_port=args.regional_port,
        )
    except OSError as exc:
        print(
            f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
