"""The Ray backend: an existing cluster by address, or a local one started for the sweep (token authentication
required: Ray's local cluster listens beyond the loopback, see ray_security); every run is one Ray task with
its CPU/GPU request."""
from __future__ import annotations

from typing import Any

from ....params import ConfigError
from .. import point
from ..locks import mark_lost
from ..progress import Tracker
from ..spec import Sweep
from . import ray_security
from .local import available_cores


RAY_MIN_VERSION = (2, 59)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _run_ray(sweep: Sweep, tracker: Tracker, force: bool, address: str | None, num_cpus: int | None,
             num_gpus: int | None, cpus_per_run: float, gpus_per_run: float) -> int:
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray backend needs Ray: pip install 'splitveil[ray]'") from None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            # a local cluster runs arbitrary code for whoever can reach it, and Ray listens on all interfaces
            # whatever address it is given: require its token authentication (see ray_security)
            if _version_tuple(ray.__version__) < RAY_MIN_VERSION:
                raise ConfigError(f"the ray backend needs Ray >= {'.'.join(map(str, RAY_MIN_VERSION))} (token "
                                  f"authentication by default); found {ray.__version__}: pip install -U 'ray>=2.59'")
            ray_security.check_auth_not_disabled()
            ray.init(num_cpus=num_cpus or available_cores(), num_gpus=num_gpus, **kwargs)
            try:
                ray_security.check_started_cluster()
            except ConfigError:
                ray.shutdown()
                raise
        started = True
    try:
        cluster = ray.cluster_resources()
        slots = max(1, int(cluster.get("CPU", 1) // max(cpus_per_run, 1e-9)))
        if gpus_per_run:
            slots = min(slots, max(1, int(cluster.get("GPU", 0) // gpus_per_run)))
        task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(point.execute_point)
        threads = max(1, int(cpus_per_run))
        refs = {task.remote(p.config.to_dict(), str(sweep.out.resolve()), force, threads): p.run_id
                for p in tracker.todo}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in done:
                    try:
                        tracker.record(ray.get(ref))
                    except Exception as e:  # the task's worker died (killed, out of memory, node lost)
                        rid = refs[ref]
                        reason = f"Ray task lost: {type(e).__name__}"
                        tracker.pending.discard(rid)
                        mark_lost(sweep.out, [rid], reason)
                        tracker.lost[rid] = reason
                        tracker.progress.event(f"  LOST     {tracker.by_id[rid].label}: {reason}; re-run the sweep to resume")
                tracker.epoch_progress()
                tracker.progress.update(running=tracker.running())
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            tracker.lose_pending("sweep interrupted")
            raise
        return slots
    finally:
        if started:
            ray.shutdown()
