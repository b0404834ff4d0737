"""Where per-prompt work runs: in this process (local, the default) or on Ray workers.

Work is cut into shards of `execution.shard_size` prompts in prompt order; a shard is the unit of
batching, of fan-out and of checkpointing. Each backend runs the same task function on the same
shards, so the results do not depend on the backend. Ray workers each hold one model replica (one
GPU each when the cluster has GPUs), built from the run's config; the driver alone writes the run
store, so a run resumes the same way whichever backend it used before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm

from ..errors import UserError


def shards(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class LocalBackend:
    name = "local"
    workers = 1

    def __init__(self, ctx):
        self.ctx = ctx

    def map(self, task: str, items: Sequence, payload: dict, desc: str) -> Iterator[list[dict]]:
        from .stages import TASKS

        parts = shards(items, self.ctx.cfg.execution.shard_size)
        for part in tqdm(parts, desc=desc, unit="shard", disable=self.ctx.quiet or len(parts) < 2):
            yield TASKS[task](self.ctx, part, payload)

    def close(self) -> None:
        pass


class _Worker:
    """A model replica on a Ray worker: the run's config, loaded lazily like the driver's."""

    def __init__(self, cfg_data: dict, threads: int | None):
        import torch

        from .config import Config
        from .pipeline import Context

        if threads:
            torch.set_num_threads(threads)
        # a worker holds no run store: only the driver writes it, and tasks never read it
        self.ctx = Context(Config.model_validate(cfg_data), store=None,  # type: ignore[arg-type]
                           quiet=True, log=lambda *_: None)

    def run(self, task: str, items: list, payload: dict) -> list[dict]:
        from .stages import TASKS

        return TASKS[task](self.ctx, items, payload)


class RayBackend:
    name = "ray"

    def __init__(self, ctx):
        try:
            import ray
        except ImportError:
            raise UserError("--backend ray needs Ray: pip install 'refusalscope[ray]' "
                            "(or use --backend local)") from None
        self.ray, self.ctx = ray, ctx
        ex = ctx.cfg.execution
        self.started = not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=ex.address, include_dashboard=False, log_to_driver=False,
                         num_cpus=None if ex.address else ex.workers and ex.workers * ex.cpus_per_worker)
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise UserError(f"cannot reach Ray at {ex.address or 'a new local cluster'} ({err}): "
                                "check --address or start the cluster with `ray start --head`") from None
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        n = ex.workers or (gpus if gpus else max(1, int(res.get("CPU", 1)) // ex.cpus_per_worker))
        opts = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": ex.cpus_per_worker}
        worker = ray.remote(**opts)(_Worker)
        data = ctx.cfg.model_dump(mode="json")
        self.actors = [worker.remote(data, None if gpus else ex.cpus_per_worker) for _ in range(n)]
        self.workers = n
        ctx.log(f"ray: {n} workers ({'1 GPU' if gpus else f'{ex.cpus_per_worker} CPU'} each) on "
                f"{ex.address or 'a local cluster'}")

    def map(self, task: str, items: Sequence, payload: dict, desc: str) -> Iterator[list[dict]]:
        """Shards go to idle workers; results come back in completion order (the caller keys
        records by prompt id, so order does not matter)."""
        ray = self.ray
        parts = shards(items, self.ctx.cfg.execution.shard_size)
        ref = ray.put(payload)
        queue, idle = list(parts), list(self.actors)
        pending: dict = {}  # Ray object ref -> the actor computing it
        bar = tqdm(total=len(parts), desc=f"{desc} [ray]", unit="shard", disable=self.ctx.quiet)
        try:
            while queue or pending:
                while queue and idle:
                    actor = idle.pop()
                    pending[actor.run.remote(task, queue.pop(0), ref)] = actor
                done, _ = ray.wait(list(pending), num_returns=1)
                idle.append(pending.pop(done[0]))
                try:
                    out = ray.get(done[0])
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, UserError):
                        raise UserError(str(cause)) from None
                    raise
                bar.update(1)
                yield out
        finally:
            bar.close()

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self.started:
            self.ray.shutdown()


def make_backend(ctx):
    return RayBackend(ctx) if ctx.cfg.execution.backend == "ray" else LocalBackend(ctx)


def fan_out(ctx, task: str, items: Sequence, payload: dict, ck, desc: str) -> None:
    """Run `task` on the items (tuples whose first element is the prompt id) not yet in the
    checkpoint `ck`, adding each returned record to it as its shard finishes. Shards are cut from
    all the items, so a resumed run batches every prompt with the same neighbours as an
    uninterrupted one (same padding, same numbers); a shard cut short by a kill is redone whole."""
    size = ctx.cfg.execution.shard_size
    todo = [it for part in shards(items, size) if any(it[0] not in ck for it in part) for it in part]
    if not todo:
        return
    backend = ctx.backend
    if ck.owner is not None:  # provenance in the manifest (results do not depend on it)
        ck.owner.executed[task] = {"backend": backend.name, "workers": backend.workers,
                                   "items": len(todo), "shards": len(shards(todo, size))}
    for records in backend.map(task, todo, payload, desc):
        for r in records:
            ck.add(r)  # a redone shard's finished items are already there: not added twice
