"""Sharing the CPUs between training and the work that runs beside it.

On a small machine the training worker's torch threads use every core. Anything else that runs at the same
priority (an evaluation actor scoring the previous stage, Ray Data reading the next stage's shards, MLflow writing
to its database) takes a core away from one of those threads in the middle of an operation, and the others then
wait for it at the operation's end. Measured on 2 cores (MLP 784-400-400-10, batch 128, 2 torch threads): an epoch
of 18,000 rows takes 0.48 s alone, 0.95 s beside a process that computes 20% of the time, and 0.53 s when that
process runs at the lowest priority (``nice 19``).

So the training workers run at the normal priority (Ray starts its worker processes at ``nice 15``, below the driver
and Ray's own agents, which is why ``WorkerGroup`` asks Ray for niceness 0), and the work whose result nobody waits
for runs as **background work** at the lowest priority, taking only the cycles training leaves idle: the evaluation
actors and the MLflow thread. Shard reads are not background work: the next stage waits for them, and at the lowest
priority they did not finish within the current stage (measured on 2 cores, Permuted-MNIST T = 10: the next stage
then waited 0.1-1.8 s for its first batch, against 0.01 s at Ray's default). Where cores are to spare (a cluster node
with more cores than the training threads, a GPU worker) the priorities change nothing.
"""

from __future__ import annotations

import os
import threading

BACKGROUND_NICE = 19  # the lowest priority Linux gives a thread


def background_priority() -> None:
    """Give the calling thread (and every thread it starts from now on) the lowest CPU priority.

    On Linux the niceness of a thread is its own (``setpriority(PRIO_PROCESS, <thread id>)``) and threads inherit
    it from the thread that starts them; elsewhere this does nothing. An unprivileged process cannot raise the
    priority again, so only threads and processes that do nothing but background work call this.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at the normal priority
        pass
