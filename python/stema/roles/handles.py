"""Role handles: one interface over a role worker in this process or in a Ray actor.

    actor = start_role("actor", ActorWorker, backend="local", timeout_s=600, config=cfg)
    future = actor.submit(ActorWorker.logprobs, batch)    # returns at once
    ...                                                   # other roles work meanwhile
    logprobs = future.result()                            # RoleError naming the role on failure

Calls name the worker's method itself (`ActorWorker.logprobs`), never a string, so a typo is an
AttributeError at the call site and editors follow the call. Each handle runs its calls one at a
time, in submission order (a local handle on one thread of its own; a Ray actor is sequential by
default), while different roles run concurrently: critic and reward inference overlap the actor's
log-probs, as in NeMo-Aligner. Ray is imported only when a Ray handle is made. With `workers` > 1
a role is a group of Ray actors forming one torch.distributed world behind the same `submit`
(`stema.roles.groups`).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

import torch


class RoleError(RuntimeError):
    """A role call that failed or did not return in time; the message names the role and method."""


class RoleFuture:
    """The pending result of one role call (`rank`: the Ray actor's rank in its role, 0 for a
    one-actor role; None for a local role)."""

    def __init__(self, role: str, method: str, future: concurrent.futures.Future, *, timeout_s: float, rank: int | None = None):
        self.role, self.method = role, method
        self._future = future
        self._timeout_s = timeout_s
        self._where = f"role {role}" if rank is None else f"role {role} rank {rank}"

    def result(self) -> Any:
        """The call's return value; RoleError if it raised, its process died or it took longer
        than the timeout. A remote error is named by its first line (Ray's own message carries
        the remote traceback); the whole error stays chained."""
        try:
            return self._future.result(timeout=self._timeout_s)
        except concurrent.futures.TimeoutError:
            raise RoleError(f"{self._where}: {self.method} did not return within {self._timeout_s:g} s (roles.call_timeout_s)") from None
        except RoleError:
            raise
        except Exception as error:
            remote = getattr(error, "cause", None)  # ray.exceptions.RayTaskError: the exception raised in the actor
            cause = remote if isinstance(remote, BaseException) else error
            first_line = (str(cause).strip().splitlines() or [""])[0][:500]
            raise RoleError(f"{self._where}: {self.method} failed: {type(cause).__name__}: {first_line}") from error


def _method_name(worker_class: type, method: Callable) -> str:
    name = getattr(method, "__name__", None)
    if name is None or getattr(worker_class, name, None) is not method:
        raise TypeError(f"{method!r} is not a method of {worker_class.__name__}")
    return name


class LocalHandle:
    """A worker object in this process; calls run on the handle's own thread. `close()` waits for
    them, then calls the worker's own `close()` where it has one (what a Ray actor's end does)."""

    def __init__(self, role: str, worker: Any, *, timeout_s: float):
        self.role = role
        self.worker = worker
        self.timeout_s = timeout_s
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stema-{role}")

    def submit(self, method: Callable, *args: Any, **kwargs: Any) -> RoleFuture:
        name = _method_name(type(self.worker), method)
        future = self._executor.submit(method, self.worker, *args, **kwargs)
        return RoleFuture(self.role, name, future, timeout_s=self.timeout_s)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if hasattr(self.worker, "close"):
            self.worker.close()


class RayHandle:
    """A worker in a Ray actor (its own process, possibly on another machine)."""

    def __init__(self, role: str, worker_class: type, actor: Any, *, timeout_s: float):
        self.role = role
        self.worker_class = worker_class
        self.actor = actor
        self.timeout_s = timeout_s

    def submit(self, method: Callable, *args: Any, **kwargs: Any) -> RoleFuture:
        name = _method_name(self.worker_class, method)
        reference = getattr(self.actor, name).remote(*args, **kwargs)
        return RoleFuture(self.role, name, reference.future(), timeout_s=self.timeout_s, rank=0)

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


def ensure_ray(address: str = "") -> None:
    """Start (or join, with `address`) Ray once per process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=True, configure_logging=False)


def start_role(role: str, worker_class: type, *, backend: str, timeout_s: float, ray_address: str = "", workers: int = 1,
               model_parallel: tuple[int, int] = (1, 1), **kwargs: Any):
    """A handle to `worker_class(**kwargs)`, built in this process ('local') or in a new Ray actor
    ('ray'); with `workers` > 1 (Ray only) a group of Ray actors forming one torch.distributed
    world (`stema.roles.groups`) whose model replicas are `model_parallel` = (tp_size, pp_size)
    ranks each. Construction errors surface here as RoleError naming the role."""
    if workers > 1:
        if backend != "ray":
            raise ValueError(f"role {role}: {workers} workers need roles.backend ray")
        from .groups import start_group

        return start_group(role, worker_class, workers=workers, timeout_s=timeout_s, ray_address=ray_address,
                           model_parallel=model_parallel, **kwargs)
    if backend == "local":
        try:
            return LocalHandle(role, worker_class(**kwargs), timeout_s=timeout_s)
        except Exception as error:
            raise RoleError(f"role {role}: could not start {worker_class.__name__}: {type(error).__name__}: {error}") from error
    if backend != "ray":
        raise ValueError(f"unknown role backend {backend!r} (local or ray)")
    import ray

    ensure_ray(ray_address)
    # Roles only placed, not CPU-reserved: the roles of one run take turns more than they compete,
    # and a laptop has fewer cores than a run has roles. On a GPU they share it.
    options = {"num_cpus": 0, "num_gpus": 0.25 if torch.cuda.is_available() else 0, "name": None}
    actor = ray.remote(worker_class).options(**options).remote(**kwargs)
    handle = RayHandle(role, worker_class, actor, timeout_s=timeout_s)
    handle.submit(worker_class.ready).result()  # construction errors surface now, naming the role
    return handle
