#!/usr/bin/env python
"""Submit a training run to SLURM through submitit; README, "On a SLURM cluster".

    python tools/submit.py --job-dir jobs/b4 --nodes 2 --gpus-per-node 8 --partition learn \\
        --timeout 4320 --config-file configs/mixformer_b4_mask_rcnn_3x.yaml OUTPUT_DIR output/b4

One task per node runs train_net.py as one Detectron2 machine (hybrid_d2.engine.slurm says why).
On preemption or timeout the run saves a checkpoint at its current iteration and the job is
requeued with --resume, which continues exactly. Prints the job id and the log files.
"""

import warnings

warnings.filterwarnings(  # Detectron2's dependencies' torch.jit use, at import time
    "ignore", r"`torch\.jit\.(script|interface)` is deprecated", FutureWarning, r"torch\.jit\."
)

import sys
from typing import List, Optional

from hybrid_d2.engine.slurm import parse_submit_args, submit


def main(argv: Optional[List[str]] = None) -> int:
    """Submit; exit status 2 with one line on a bad setting."""
    args = parse_submit_args(argv)
    try:
        job = submit(
            args.train_argv,
            args.job_dir,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            cpu=args.cpu,
            tasks_per_node=args.tasks_per_node,
            partition=args.partition,
            timeout_min=args.timeout,
            signal_delay_s=args.signal_delay,
            cpus_per_task=args.cpus_per_task,
            cluster=args.cluster,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Submitted job {job.job_id}; logs: {job.paths.stdout} (task 0), {args.job_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
